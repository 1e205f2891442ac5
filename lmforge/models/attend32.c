/* Scaled dot-product attention in float32 for training, forward and backward, per (batch, head):
 *
 *   forward   s_ij = scale q_i . k_j + mask_ij,  p = softmax_j(s),  o_i = sum_j p_ij v_j,
 *             lse_i = log sum_j e^s_ij (kept for the backward)
 *   backward  p_ij = e^(s_ij - lse_i),  D_i = do_i . o_i,  ds_ij = p_ij (do_i . v_j - D_i) (dmask),
 *             dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i
 *
 * (FlashAttention's recomputation, Dao et al. 2022, with one head's keys whole in cache: a GPT-2-
 * like head is 256 x 64.) Each product runs on tiles of 4 queries x 16 keys, or 4 queries x 16 of
 * hd, in AVX2 + FMA; the keys (and for the backward the values) are staged transposed once per
 * head, and q comes in scaled, so that dk sums ds times the rows as they are. The arguments and
 * layouts are attend16.c's (qkernel.h's qk_attention): q (B, H, T, hd), k and v (B, H, S, hd), o,
 * do and dq, dk and dv with strides of their own (a (B, T, H, hd) layout spares the caller its
 * transposing copies), unit stride along hd; an additive mask (float32 or bfloat16, strides
 * broadcasting it) or a causal flag (T = S: query i sees keys 0 .. i); lse (B, H, T) and dmask
 * (B, H, T, S; null: not wanted) contiguous. hd a multiple of 16.
 * The (batch, head) tasks are shared among torch's OpenMP threads (see qkernel.c). The caller
 * checks the CPU (AVX2 and FMA). */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "simd.h"

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

/* the 4 score rows of queries i0 .. plus the mask's rows; each row's last visible key in last */
AVX2 static void mask4(const qk_attention *a, int64_t b, int64_t h, int64_t i0, int nq, int64_t tp, float *s,
                       int64_t *last) {
    for (int r = 0; r < 4; r++) {
        last[r] = r >= nq ? -1 : a->causal ? i0 + r : a->S - 1;
        if (a->mask && r < nq) add_row(s + r * tp, a->mask, b * a->mb + h * a->mh + (i0 + r) * a->mt, a->S, a->mask_bf);
    }
}

static void forward_head(const qk_attention *a, int64_t b, int64_t h, float *o, float *lse, float *buf) {
    const int64_t T = a->T, S = a->S, hd = a->hd, tp = pad16(S), qt = a->qt, kt = a->kt;
    const float *q = (const float *)a->q + b * a->qb + h * a->qh;
    const float *k = (const float *)a->k + b * a->kb + h * a->kh, *v = (const float *)a->v + b * a->kb + h * a->kh;
    float *kts = buf, *s = kts + hd * tp, *x = s + 4 * tp, *acc = x + 4 * hd;
    o += b * a->ob + h * a->oh;
    lse += (b * a->H + h) * T;
    stage_t(k, kt, S, hd, tp, kts);
    for (int64_t i0 = 0; i0 < T; i0 += 4) {
        const int nq = T - i0 < 4 ? (int)(T - i0) : 4;
        const int64_t n = a->causal ? i0 + nq : S; /* keys any of these queries sees */
        int64_t last[4];
        rows4(q, qt, i0, nq, hd, a->scale, x);
        scores4(x, kts, tp, pad16(n), hd, s);
        mask4(a, b, h, i0, nq, tp, s, last);
        float inv[4];
        for (int r = 0; r < 4; r++) {
            const float m = softmax_row(s + r * tp, last[r], n, inv + r);
            if (r < nq) lse[i0 + r] = m + logf(1.f / inv[r]);
        }
        rowsum4(s, tp, v, kt, n, hd, acc);
        for (int r = 0; r < nq; r++)
            for (int64_t d = 0; d < hd; d++) o[(i0 + r) * a->ot + d] = acc[r * hd + d] * inv[r];
    }
}

static void backward_head(const qk_attention *a, int64_t b, int64_t h, const float *o, const float *dout,
                          const float *lse, float *dq, float *dk, float *dv, float *dmask, float *buf) {
    const int64_t T = a->T, S = a->S, hd = a->hd, tp = pad16(S), qt = a->qt, kt = a->kt, ot = a->ot;
    const int64_t oo = b * a->ob + h * a->oh;
    const float *q = (const float *)a->q + b * a->qb + h * a->qh;
    const float *k = (const float *)a->k + b * a->kb + h * a->kh, *v = (const float *)a->v + b * a->kb + h * a->kh;
    float *kts = buf, *vts = kts + hd * tp, *p = vts + hd * tp, *dp = p + 4 * tp, *xq = dp + 4 * tp, *xd = xq + 4 * hd,
          *acc = xd + 4 * hd, *dkc = acc + 4 * hd, *dvc = dkc + S * hd; /* dk, dv summed contiguous */
    o += oo, dout += oo, dq += oo, lse += (b * a->H + h) * T;
    dk += b * a->gb + h * a->gh, dv += b * a->gb + h * a->gh;
    if (dmask) dmask += (b * a->H + h) * T * S;
    stage_t(k, kt, S, hd, tp, kts);
    stage_t(v, kt, S, hd, tp, vts);
    memset(dkc, 0, (size_t)(2 * S * hd) * sizeof *dkc);
    for (int64_t i0 = 0; i0 < T; i0 += 4) {
        const int nq = T - i0 < 4 ? (int)(T - i0) : 4;
        const int64_t n = a->causal ? i0 + nq : S;
        int64_t last[4];
        rows4(q, qt, i0, nq, hd, a->scale, xq);
        rows4(dout, ot, i0, nq, hd, 1.f, xd);
        scores4(xq, kts, tp, pad16(n), hd, p);
        scores4(xd, vts, tp, pad16(n), hd, dp);
        mask4(a, b, h, i0, nq, tp, p, last);
        for (int r = 0; r < 4; r++) {
            float D = 0.f;
            for (int64_t d = 0; d < hd && r < nq; d++) D += xd[r * hd + d] * o[(i0 + r) * ot + d];
            grad_row(p + r * tp, dp + r * tp, last[r], n, 1.f, r < nq ? lse[i0 + r] : 0.f, D);
            if (dmask && r < nq) { /* ds, and 0 for the keys past the block's (causal) */
                memcpy(dmask + (i0 + r) * S, dp + r * tp, (size_t)n * sizeof *dmask);
                memset(dmask + (i0 + r) * S + n, 0, (size_t)(S - n) * sizeof *dmask);
            }
        }
        rowsum4(dp, tp, k, kt, n, hd, acc);
        for (int r = 0; r < nq; r++)
            for (int64_t d = 0; d < hd; d++) dq[(i0 + r) * ot + d] = acc[r * hd + d] * a->scale;
        outer4(p, tp, xd, n, hd, dvc);
        outer4(dp, tp, xq, n, hd, dkc); /* xq holds scale q */
    }
    for (int64_t j = 0; j < S; j++) {
        memcpy(dk + j * a->gt, dkc + j * hd, (size_t)hd * sizeof *dk);
        memcpy(dv + j * a->gt, dvc + j * hd, (size_t)hd * sizeof *dv);
    }
}

typedef struct {
    const qk_attention *a;
    void **p; /* run's pointers */
} task;

static void forward_task(int64_t i, char *buf, const void *ctx) {
    const task *t = ctx;
    forward_head(t->a, i / t->a->H, i % t->a->H, t->p[0], t->p[1], (float *)(void *)buf);
}

static void backward_task(int64_t i, char *buf, const void *ctx) {
    const task *t = ctx;
    void **p = t->p;
    backward_head(t->a, i / t->a->H, i % t->a->H, p[7], p[8], p[9], p[0], p[1], p[2], p[3], (float *)(void *)buf);
}

static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int back) {
    void *p[QK_ATTENTION_POINTERS];
    qk_attention a;
    if (qk_attention_args(args, nargs, back, "attend32", 16, 0, p, &a)) return NULL;
    const int64_t tp = pad16(a.S), floats = back ? 2 * a.hd * tp + 8 * tp + 12 * a.hd + 2 * a.S * a.hd
                                                 : a.hd * tp + 4 * tp + 8 * a.hd;
    const task t = {&a, p};
    if (qk_each_task(a.B * a.H, (size_t)floats * sizeof(float), back ? backward_task : forward_task, &t)) return NULL;
    Py_RETURN_NONE;
}

#else
QK_RUN_UNAVAILABLE("attend32: built without x86-64 SIMD")
#endif

QK_FORWARD_BACKWARD(attend32)
