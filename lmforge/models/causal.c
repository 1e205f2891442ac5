/* Causal self-attention in float32 for training, forward and backward, per (batch, head):
 *
 *   forward   s_ij = scale q_i . k_j (j <= i),  p = softmax_j(s),  o_i = sum_j p_ij v_j,
 *             lse_i = log sum_j e^s_ij (kept for the backward)
 *   backward  p_ij = e^(s_ij - lse_i),  D_i = do_i . o_i,  ds_ij = p_ij (do_i . v_j - D_i),
 *             dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i
 *
 * (FlashAttention's recomputation, Dao et al. 2022, with one head's keys whole in cache: a GPT-2-
 * like head is 256 x 64.) Each product runs on tiles of 4 queries x 16 keys, or 4 queries x 16 of
 * hd, in AVX2 + FMA; the keys (and for the backward the values) are staged transposed once per
 * head. q, k and v are (B, H, T, hd) with strides (sb, sh, st) and unit stride along hd (views of
 * one projection need no copy); o, do and the gradients have strides (ob, oh, ot) (a (B, T, H, hd)
 * layout spares the caller its transposing copies), unit stride along hd; lse (B, H, T) is
 * contiguous. hd a multiple of 16.
 * The (batch, head) tasks are shared among torch's OpenMP threads (see qkernel.c). The caller
 * checks shapes, strides and the CPU (AVX2 and FMA). */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "simd.h"

typedef struct {
    const float *q, *k, *v;
    int64_t B, H, T, hd, sb, sh, st, ob, oh, ot;
    float scale;
} heads;

/* acc_j (n rows of hd) += sum_r w_rj x_r, for the 4 rows x (4 x hd): 16 of hd at a time, the
 * rows' pieces held in registers while j runs (a load and a store of acc per 4 FMAs) */
AVX2 static void outer4(const float *w, int64_t tp, const float *x, int64_t n, int64_t hd, float *acc) {
    for (int64_t d = 0; d < hd; d += 16) {
        __m256 x0[4], x1[4];
        for (int r = 0; r < 4; r++) {
            x0[r] = _mm256_loadu_ps(x + r * hd + d);
            x1[r] = _mm256_loadu_ps(x + r * hd + d + 8);
        }
        for (int64_t j = 0; j < n; j++) {
            float *aj = acc + j * hd + d;
            __m256 a0 = _mm256_loadu_ps(aj), a1 = _mm256_loadu_ps(aj + 8);
            for (int r = 0; r < 4; r++) {
                const __m256 wr = _mm256_set1_ps(w[r * tp + j]);
                a0 = _mm256_fmadd_ps(wr, x0[r], a0);
                a1 = _mm256_fmadd_ps(wr, x1[r], a1);
            }
            _mm256_storeu_ps(aj, a0);
            _mm256_storeu_ps(aj + 8, a1);
        }
    }
}

/* rows i0 .. i0 + nq of the head at p (stride st) into x (4 x hd), times f; missing rows 0 */
static void rows4(const float *p, int64_t st, int64_t i0, int nq, int64_t hd, float f, float *x) {
    for (int r = 0; r < 4; r++)
        for (int64_t d = 0; d < hd; d++) x[r * hd + d] = r < nq ? f * p[(i0 + r) * st + d] : 0.f;
}

static void forward_head(const heads *a, int64_t b, int64_t h, float *o, float *lse, float *buf) {
    const int64_t T = a->T, hd = a->hd, tp = pad16(T), st = a->st, off = b * a->sb + h * a->sh;
    const float *q = a->q + off, *k = a->k + off, *v = a->v + off;
    float *kt = buf, *s = kt + hd * tp, *x = s + 4 * tp, *acc = x + 4 * hd;
    o += b * a->ob + h * a->oh;
    lse += (b * a->H + h) * T;
    stage_t(k, st, T, hd, tp, kt);
    for (int64_t i0 = 0; i0 < T; i0 += 4) {
        const int nq = T - i0 < 4 ? (int)(T - i0) : 4;
        const int64_t n = i0 + nq; /* keys the last of these queries sees */
        rows4(q, st, i0, nq, hd, a->scale, x);
        scores4(x, kt, tp, pad16(n), hd, s);
        float inv[4];
        for (int r = 0; r < 4; r++) {
            const int64_t last = r < nq ? i0 + r : -1; /* keys 0 .. last */
            const float m = softmax_row(s + r * tp, last, n, inv + r);
            if (r < nq) lse[i0 + r] = m + logf(1.f / inv[r]);
        }
        rowsum4(s, tp, v, st, n, hd, acc);
        for (int r = 0; r < nq; r++)
            for (int64_t d = 0; d < hd; d++) o[(i0 + r) * a->ot + d] = acc[r * hd + d] * inv[r];
    }
}

static void backward_head(const heads *a, int64_t b, int64_t h, const float *o, const float *dout, const float *lse,
                          float *dq, float *dk, float *dv, float *buf) {
    const int64_t T = a->T, hd = a->hd, tp = pad16(T), st = a->st, off = b * a->sb + h * a->sh;
    const int64_t ho = b * a->ob + h * a->oh, ot = a->ot;
    const float *q = a->q + off, *k = a->k + off, *v = a->v + off;
    float *kt = buf, *vt = kt + hd * tp, *p = vt + hd * tp, *dp = p + 4 * tp, *xq = dp + 4 * tp, *xd = xq + 4 * hd,
          *acc = xd + 4 * hd, *dkc = acc + 4 * hd, *dvc = dkc + T * hd; /* dk, dv summed contiguous */
    o += ho, dout += ho, lse += (b * a->H + h) * T, dq += ho, dk += ho, dv += ho;
    stage_t(k, st, T, hd, tp, kt);
    stage_t(v, st, T, hd, tp, vt);
    memset(dkc, 0, (size_t)(2 * T * hd) * sizeof *dkc);
    for (int64_t i0 = 0; i0 < T; i0 += 4) {
        const int nq = T - i0 < 4 ? (int)(T - i0) : 4;
        const int64_t n = i0 + nq;
        rows4(q, st, i0, nq, hd, 1.f, xq);
        rows4(dout, ot, i0, nq, hd, 1.f, xd);
        scores4(xq, kt, tp, pad16(n), hd, p);
        scores4(xd, vt, tp, pad16(n), hd, dp);
        for (int r = 0; r < 4; r++) {
            const int64_t last = r < nq ? i0 + r : -1;
            float D = 0.f;
            for (int64_t d = 0; d < hd && r < nq; d++) D += xd[r * hd + d] * o[(i0 + r) * ot + d];
            grad_row(p + r * tp, dp + r * tp, last, n, a->scale, r < nq ? lse[i0 + r] : 0.f, D);
        }
        rowsum4(dp, tp, k, st, n, hd, acc);
        for (int r = 0; r < nq; r++)
            for (int64_t d = 0; d < hd; d++) dq[(i0 + r) * ot + d] = acc[r * hd + d];
        outer4(p, tp, xd, n, hd, dvc);
        outer4(dp, tp, xq, n, hd, dkc);
    }
    for (int64_t j = 0; j < T; j++) {
        memcpy(dk + j * ot, dkc + j * hd, (size_t)hd * sizeof *dk);
        memcpy(dv + j * ot, dvc + j * hd, (size_t)hd * sizeof *dv);
    }
}

typedef struct {
    const heads *a;
    void **p; /* run's pointers */
} task;

static void forward_task(int64_t i, char *buf, const void *ctx) {
    const task *t = ctx;
    forward_head(t->a, i / t->a->H, i % t->a->H, t->p[0], t->p[1], (float *)(void *)buf);
}

static void backward_task(int64_t i, char *buf, const void *ctx) {
    const task *t = ctx;
    void **p = t->p;
    backward_head(t->a, i / t->a->H, i % t->a->H, p[6], p[7], p[8], p[0], p[1], p[2], (float *)(void *)buf);
}

/* forward: causal_forward(o, lse, q, k, v, B, H, T, hd, sb, sh, st, ob, oh, ot, scale);
 * backward: causal_backward(dq, dk, dv, q, k, v, o, do, lse, B, H, T, hd, sb, sh, st, ob, oh, ot, scale) */
static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int back) {
    void *p[9];
    int64_t v[10];
    const int np = back ? 9 : 5;
    const char *usage = back ? "causal_backward(dq, dk, dv, q, k, v, o, do, lse, B, H, T, hd, sb, sh, st, ob, oh, ot, scale)"
                             : "causal_forward(o, lse, q, k, v, B, H, T, hd, sb, sh, st, ob, oh, ot, scale)";
    if (nargs != np + 11) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments", usage, np + 11);
        return NULL;
    }
    if (qk_read_args(args, np + 10, np + 10, usage, p, np, v)) return NULL;
    const double scale = PyFloat_AsDouble(args[np + 10]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    if (v[0] < 0 || v[1] < 0 || v[2] < 0 || v[3] <= 0 || v[3] % 16) {
        PyErr_Format(PyExc_ValueError, "causal attention: B=%lld, H=%lld, T=%lld, hd=%lld do not fit (hd a multiple of 16)",
                     (long long)v[0], (long long)v[1], (long long)v[2], (long long)v[3]);
        return NULL;
    }
    const int qi = back ? 3 : 2;
    const heads a = {p[qi], p[qi + 1], p[qi + 2], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], (float)scale};
    const int64_t tp = pad16(a.T), floats = 2 * a.hd * tp + 8 * tp + 12 * a.hd + 2 * a.T * a.hd;
    const task t = {&a, p};
    if (qk_each_task(a.B * a.H, (size_t)floats * sizeof(float), back ? backward_task : forward_task, &t)) return NULL;
    Py_RETURN_NONE;
}

#else
static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int back) {
    (void)args, (void)nargs, (void)back;
    PyErr_SetString(PyExc_RuntimeError, "causal attention: built without x86-64 SIMD");
    return NULL;
}
#endif

PyObject *py_causal_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return run(args, nargs, 0);
}

PyObject *py_causal_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return run(args, nargs, 1);
}
