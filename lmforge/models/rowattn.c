/* Self-attention over packed rows, without gradients: each sequence's real tokens are consecutive
 * rows of q, k and v (lmforge.nn.attention.Unpadded's layout), sequence b the rows
 * starts[b] .. starts[b+1], and each of its rows attends to all of them and to nothing else:
 *
 *   out_h[i] = sum_j p_j v_g[j],   p = softmax_j(scale q_h[i] . k_g[j]),   g = h / (H / KV)
 *
 * The padded path unpacks q, k and v into (B, H, T, hd) with zeros at the padding, masks the
 * padded keys, and packs the result back: for sentence embeddings (12 heads of 32, 7-22 tokens)
 * that is more copying than arithmetic. Here one (sequence, head) pair is one task: its keys are
 * staged transposed in float32 (hd x T, so that scores are eight keys to a vector) and its
 * values in float32; scores, softmax and the weighted sum run in float32, the output is rounded
 * once to the inputs' dtype. q, k, v and out are float32 or bfloat16 (all one), rows of any
 * stride (q, k and v may be column blocks of one stacked product). The tasks are shared among
 * torch's OpenMP threads (this module shares torch's runtime; see qkernel.c). */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RA_X86 1
#include "simd.h"
#endif

typedef struct {
    const void *q, *k, *v;
    void *out;
    int64_t qs, ks, vs, os; /* row strides, in elements */
    int64_t hd, group;      /* head size; query heads per key/value head */
    float scale;
    int bf;
} rowattn;

/* One task's scratch: kt (hd x tp), vb (t x hd), s (4 x tp), acc (8 x hd: queries, then outputs),
 * all float32; tp = t rounded up to 16. */
typedef struct {
    float *kt, *vb, *s, *acc;
} scratch;

/* k's rows r0.. of head g, transposed into kt (zeros past t), and v's into vb */
static void stage(const rowattn *a, int64_t r0, int64_t t, int64_t g, const scratch *w) {
    const int64_t hd = a->hd, tp = pad16(t);
    for (int64_t j = 0; j < t; j++) {
        const int64_t kr = (r0 + j) * a->ks + g * hd, vr = (r0 + j) * a->vs + g * hd;
        for (int64_t d = 0; d < hd; d++) {
            w->kt[d * tp + j] = load1(a->k, kr + d, a->bf);
            w->vb[j * hd + d] = load1(a->v, vr + d, a->bf);
        }
    }
    for (int64_t d = 0; d < hd; d++)
        for (int64_t j = t; j < tp; j++) w->kt[d * tp + j] = 0.f;
}

/* query row r of head h over the staged keys and values: the portable form */
static void query1(const rowattn *a, int64_t r, int64_t h, int64_t t, const scratch *w) {
    const int64_t hd = a->hd, tp = pad16(t), qr = r * a->qs + h * hd;
    for (int64_t j = 0; j < t; j++) w->s[j] = 0.f;
    for (int64_t d = 0; d < hd; d++) {
        const float qd = a->scale * load1(a->q, qr + d, a->bf);
        for (int64_t j = 0; j < t; j++) w->s[j] += qd * w->kt[d * tp + j];
    }
    float m = w->s[0], sum = 0.f;
    for (int64_t j = 1; j < t; j++) m = w->s[j] > m ? w->s[j] : m;
    for (int64_t j = 0; j < t; j++) sum += (w->s[j] = expf(w->s[j] - m));
    for (int64_t d = 0; d < hd; d++) w->acc[d] = 0.f;
    for (int64_t j = 0; j < t; j++)
        for (int64_t d = 0; d < hd; d++) w->acc[d] += w->s[j] * w->vb[j * hd + d];
    const int64_t orow = r * a->os + h * hd;
    for (int64_t d = 0; d < hd; d++) store1(a->out, orow + d, w->acc[d] / sum, a->bf);
}

#ifdef RA_X86
/* up to four queries i0.. (nq of them) at once, in eight lanes: scores for 4 queries x 16 keys
 * per step over hd, the weighted sum for 4 queries x 16 of hd per step over the keys; enough
 * independent sums to keep two FMA units busy. kt padded to a multiple of 16 keys; hd a
 * multiple of 8. */
AVX2 static void tile8(const rowattn *a, int64_t r0, int64_t i0, int nq, int64_t h, int64_t t, const scratch *w) {
    const int64_t hd = a->hd, tp = pad16(t);
    float *qv = w->acc, *s = w->s; /* qv: 4 x hd scaled queries; s: 4 x tp scores, then weights */
    for (int r = 0; r < 4; r++) {
        const int64_t qr = (r0 + i0 + (r < nq ? r : 0)) * a->qs + h * hd;
        for (int64_t d = 0; d < hd; d++) qv[r * hd + d] = a->scale * load1(a->q, qr + d, a->bf);
    }
    scores4(qv, w->kt, tp, tp, hd, s);
    float inv[4];
    for (int r = 0; r < 4; r++) softmax_row(s + r * tp, t - 1, tp, inv + r); /* keys past t get weight 0 */
    float *acc = w->acc + 4 * hd;
    rowsum4(s, tp, w->vb, hd, t, hd, acc);
    for (int r = 0; r < nq; r++)
        for (int64_t d = 0; d < hd; d += 8)
            store8(a->out, (r0 + i0 + r) * a->os + h * hd + d,
                   _mm256_mul_ps(_mm256_loadu_ps(acc + r * hd + d), _mm256_set1_ps(inv[r])), a->bf);
}
#endif

/* attend_rows(out, q, k, v, starts, nseq, heads, kv_heads, hd, qs, ks, vs, os, bf16, scale):
 * starts int64 (nseq + 1), rows as above; the caller checks shapes, strides and dtypes. */
PyObject *py_attend_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[5];
    int64_t v[9];
    const char *usage = "attend_rows(out, q, k, v, starts, nseq, heads, kv_heads, hd, qs, ks, vs, os, bf16, scale)";
    if (nargs != 15) {
        PyErr_Format(PyExc_TypeError, "%s takes 15 arguments", usage);
        return NULL;
    }
    if (qk_read_args(args, 14, 14, usage, p, 5, v)) return NULL;
    const double scale = PyFloat_AsDouble(args[14]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    const int64_t nseq = v[0], heads = v[1], kv = v[2], hd = v[3];
    if (nseq < 0 || heads <= 0 || kv <= 0 || heads % kv || hd <= 0) {
        PyErr_Format(PyExc_ValueError, "attend_rows: nseq=%lld, heads=%lld, kv_heads=%lld, hd=%lld do not fit",
                     (long long)nseq, (long long)heads, (long long)kv, (long long)hd);
        return NULL;
    }
    const rowattn a = {p[1], p[2], p[3], p[0], v[4], v[5], v[6], v[7], hd, heads / kv, (float)scale, (int)v[8]};
    const int64_t *starts = p[4];
    int64_t tmax = 0;
    for (int64_t b = 0; b < nseq; b++) tmax = starts[b + 1] - starts[b] > tmax ? starts[b + 1] - starts[b] : tmax;
    int simd = 0;
#ifdef RA_X86
    simd = hd % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    const size_t floats = (size_t)(hd * pad16(tmax) + tmax * hd + 4 * pad16(tmax) + 8 * hd);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        float *buf = malloc(floats * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        const scratch w = {buf, buf ? buf + hd * pad16(tmax) : NULL, buf ? buf + hd * pad16(tmax) + tmax * hd : NULL,
                           buf ? buf + hd * pad16(tmax) + tmax * hd + 4 * pad16(tmax) : NULL};
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < nseq * kv; task++) {
            const int64_t b = task / kv, g = task % kv, r0 = starts[b], t = starts[b + 1] - r0;
            if (!buf || t <= 0) continue;
            stage(&a, r0, t, g, &w);
            for (int64_t h = g * a.group; h < (g + 1) * a.group; h++) {
#ifdef RA_X86
                if (simd) {
                    for (int64_t i = 0; i < t; i += 4) tile8(&a, r0, i, t - i < 4 ? (int)(t - i) : 4, h, t, &w);
                    continue;
                }
#endif
                for (int64_t i = 0; i < t; i++) query1(&a, r0 + i, h, t, &w);
            }
        }
        free(buf);
    }
    Py_END_ALLOW_THREADS
    (void)simd;
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
