/* Scaled dot-product attention in bfloat16 for training under autocast, forward and backward,
 * per (batch, head): FlashAttention's recomputation from the log-sum-exp (Dao et al. 2022) with one
 * head's keys and values whole in cache, as attend32.c, and every product on AVX512-BF16's pair dot
 * product (vdpbf16ps: each float32 lane gains a0 b0 + a1 b1), so the operand that runs along a
 * product's sum is staged in pairs along it:
 *
 *   s = scale q k^T + mask, dp = do v^T   sum over hd: k, v as 32-bit pairs transposed (hd/2 x keys)
 *   o = p v, dq = scale ds k              sum over keys: v, k with rows paired (keys/2 x hd x 2)
 *   dv^T = do^T p, dk^T = scale q^T ds    sum over a block's queries: p, ds, q, do with rows paired
 *   dmask = ds = p (dp - D)
 *
 * Scores, softmax, lse and the sums are float32; p and ds are rounded to bfloat16 for their
 * products, as torch's flash kernel does in bfloat16. Queries come in blocks of QB. q (B, H, T, hd)
 * has strides (qb, qh, qt); k and v (B, H, S, hd) share (kb, kh, kt); o, do and dq have (ob, oh,
 * ot), dk and dv (gb, gh, gt) (a (B, T, H, hd) layout spares the caller its transposing copies);
 * all with unit stride along hd and even. The mask (none: a null pointer) is additive, float32 or bfloat16, with
 * strides (mb, mh, mt) and unit stride along the keys (0 strides broadcast it); causal (T = S):
 * query i sees keys 0 .. i. lse (B, H, T) and dmask (B, H, T, S, float32; null: not wanted) are
 * contiguous. hd a multiple of 32. The caller checks the CPU. */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#include <immintrin.h>
#include "simd.h"

#define BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))
enum { QB = 16 }; /* queries per block: 8 pairs for the sums over queries */

static inline int64_t pad32(int64_t t) { return (t + 31) & ~(int64_t)31; }

static inline uint32_t pair_at(const uint16_t *p) { /* two bfloat16 as one 32-bit lane */
    uint32_t u;
    memcpy(&u, p, sizeof u);
    return u;
}

#define BCAST(u) ((__m512bh)_mm512_set1_epi32((int)(u)))
#define LOADBH(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))

#define ROUND16(v) _mm512_roundscale_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
DEFINE_EXP(exp16, BF16, __m512, _mm512, ROUND16, _mm512_scalef_ps) /* e^x in sixteen lanes (simd.h) */

/* the lanes of columns c .. c + 15 at or before `last` */
BF16 static inline __mmask16 visible(int64_t last, int64_t c) {
    return _mm512_cmpgt_epi32_mask(_mm512_set1_epi32((int)(last + 1 - c)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

/* simd.h's softmax_row in sixteen lanes */
BF16 static float softmax16(float *s, int64_t last, int64_t n, float *inv) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < n; c += 16) mx = _mm512_mask_max_ps(mx, visible(last, c), mx, _mm512_loadu_ps(s + c));
    const float m = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) {
        const __m512 e = _mm512_maskz_mov_ps(visible(last, c), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), mv)));
        _mm512_storeu_ps(s + c, e);
        sum = _mm512_add_ps(sum, e);
    }
    *inv = last < 0 ? 0.f : 1.f / _mm512_reduce_add_ps(sum);
    return m;
}

/* the backward's row: p = e^(s - lse) for the visible keys (0 past last) into s, ds = p (dp - D) into dp */
BF16 static void grad16(float *s, float *dp, int64_t last, int64_t n, float lse, float D) {
    const __m512 l = _mm512_set1_ps(lse), dv = _mm512_set1_ps(D);
    for (int64_t c = 0; c < n; c += 16) {
        const __m512 p = _mm512_maskz_mov_ps(visible(last, c), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), l)));
        _mm512_storeu_ps(s + c, p);
        _mm512_storeu_ps(dp + c, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + c), dv)));
    }
}
/* out (npairs x hd x 2) = rows 2 r2 and 2 r2 + 1 of x (stride xs) interleaved, rows past n 0 */
BF16 static void pair_rows(const uint16_t *x, int64_t xs, int64_t n, int64_t npairs, int64_t hd, uint16_t *out) {
    for (int64_t r2 = 0; r2 < npairs; r2++)
        for (int64_t d = 0; d < hd; d += 16) {
            const int64_t a = 2 * r2, b = a + 1;
            const __m512i lo = a < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + a * xs + d)))
                                     : _mm512_setzero_si512();
            const __m512i hi = b < n ? _mm512_slli_epi32(
                                           _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + b * xs + d))), 16)
                                     : _mm512_setzero_si512();
            _mm512_storeu_si512(out + (r2 * hd + d) * 2, _mm512_or_si512(lo, hi));
        }
}

/* the same for float32 rows (stride tp), rounded: out (npairs x tp x 2), columns 0 .. n */
BF16 static void pair_rows_f(const float *s, int64_t tp, int64_t npairs, int64_t n, uint16_t *out) {
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i idx = _mm512_loadu_si512(order);
    for (int64_t r2 = 0; r2 < npairs; r2++)
        for (int64_t c = 0; c < n; c += 16) {
            const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + (2 * r2 + 1) * tp + c),
                                                   _mm512_loadu_ps(s + 2 * r2 * tp + c));
            _mm512_storeu_si512(out + (r2 * tp + c) * 2, _mm512_permutexvar_epi16(idx, (__m512i)h));
        }
}

/* rows x rows of s (stride tp, columns 0 .. n, a multiple of 32) rounded into out (stride tp) */
BF16 static void round_rows(const float *s, int64_t tp, int rows, int64_t n, uint16_t *out) {
    for (int r = 0; r < rows; r++)
        for (int64_t c = 0; c < n; c += 32)
            _mm512_storeu_si512(out + r * tp + c, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + r * tp + c + 16),
                                                                               _mm512_loadu_ps(s + r * tp + c)));
}

/* s (4 x tp) = f x (4 rows of hd, contiguous) kp^T, columns 0 .. n (a multiple of 32); kp: the
 * keys' pairs transposed (hd/2 x tp, 32-bit) */
BF16 static void scores(const uint16_t *x, int64_t hd, const uint32_t *kp, int64_t tp, int64_t n, float f, float *s) {
    for (int64_t c = 0; c < n; c += 32) {
        __m512 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t d2 = 0; d2 < hd / 2; d2++) {
            const __m512bh k0 = LOADBH(kp + d2 * tp + c), k1 = LOADBH(kp + d2 * tp + c + 16);
            for (int r = 0; r < 4; r++) {
                const __m512bh xr = BCAST(pair_at(x + r * hd + 2 * d2));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, k0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, k1);
            }
        }
        const __m512 fv = _mm512_set1_ps(f);
        for (int r = 0; r < 4; r++) {
            _mm512_storeu_ps(s + r * tp + c, _mm512_mul_ps(acc[r][0], fv));
            _mm512_storeu_ps(s + r * tp + c + 16, _mm512_mul_ps(acc[r][1], fv));
        }
    }
}

/* out (4 x NB·16 floats, stride hd) = w (4 rows, stride ws, columns 0 .. n, n even) times mp
 * (rows paired: n/2 x hd x 2), for the NB·16 of hd from d0 */
BF16 INLINE void weigh_block(const uint16_t *w, int64_t ws, const uint16_t *mp, int64_t n, int64_t hd, int64_t d0,
                             const int NB, float *out) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t j2 = 0; j2 < n / 2; j2++) {
        __m512bh m[4];
        for (int b = 0; b < NB; b++) m[b] = LOADBH(mp + (j2 * hd + d0 + 16 * b) * 2);
        for (int r = 0; r < 4; r++) {
            const __m512bh wr = BCAST(pair_at(w + r * ws + 2 * j2));
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wr, m[b]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(out + r * hd + d0 + 16 * b, acc[r][b]);
}

BF16 static void weigh(const uint16_t *w, int64_t ws, const uint16_t *mp, int64_t n, int64_t hd, float *out) {
    for (int64_t d0 = 0; d0 < hd; d0 += 64)
        if (hd - d0 >= 64)
            weigh_block(w, ws, mp, n, hd, d0, 4, out);
        else
            weigh_block(w, ws, mp, n, hd, d0, 2, out);
}

/* acc (hd x tp floats) += x^T w summed over the block's query pairs: x paired (QB/2 x hd x 2),
 * w paired (QB/2 x tp x 2), columns 0 .. n (a multiple of 32) */
BF16 static void outer(const uint16_t *x, const uint16_t *w, int64_t tp, int64_t n, int64_t hd, float *acc) {
    for (int64_t d = 0; d < hd; d += 4)
        for (int64_t c = 0; c < n; c += 32) {
            __m512 a[4][2];
            for (int r = 0; r < 4; r++) {
                a[r][0] = _mm512_loadu_ps(acc + (d + r) * tp + c);
                a[r][1] = _mm512_loadu_ps(acc + (d + r) * tp + c + 16);
            }
            for (int64_t r2 = 0; r2 < QB / 2; r2++) {
                const __m512bh w0 = LOADBH(w + (r2 * tp + c) * 2), w1 = LOADBH(w + (r2 * tp + c + 16) * 2);
                for (int r = 0; r < 4; r++) {
                    const __m512bh xr = BCAST(pair_at(x + (r2 * hd + d + r) * 2));
                    a[r][0] = _mm512_dpbf16_ps(a[r][0], xr, w0);
                    a[r][1] = _mm512_dpbf16_ps(a[r][1], xr, w1);
                }
            }
            for (int r = 0; r < 4; r++) {
                _mm512_storeu_ps(acc + (d + r) * tp + c, a[r][0]);
                _mm512_storeu_ps(acc + (d + r) * tp + c + 16, a[r][1]);
            }
        }
}

/* n rows of x (stride xs) into out (QB x hd, contiguous), the rows past n 0 */
static void take_rows(const uint16_t *x, int64_t xs, int64_t n, int64_t hd, uint16_t *out) {
    for (int64_t r = 0; r < QB; r++)
        if (r < n)
            memcpy(out + r * hd, x + r * xs, (size_t)hd * sizeof *out);
        else
            memset(out + r * hd, 0, (size_t)hd * sizeof *out);
}

/* the row of hd floats, times f, rounded into out */
BF16 static void put_row(const float *x, float f, int64_t hd, uint16_t *out) {
    const __m512 fv = _mm512_set1_ps(f);
    for (int64_t d = 0; d < hd; d += 16)
        _mm256_storeu_si256((__m256i *)(out + d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + d), fv)));
}

/* the key pairs of the head at x (T rows of stride xs) transposed into kp (hd/2 x tp, 32-bit) */
BF16 static void pairs_t(const uint16_t *x, int64_t xs, int64_t T, int64_t hd, int64_t tp, uint32_t *kp) {
    stage_t((const float *)(const void *)x, xs / 2, T, hd / 2, tp, (float *)(void *)kp); /* moves bits only */
}

/* the block's score rows (QB x tp) plus the mask's rows i0 .., and each row's last visible key */
BF16 static void add_mask(const qk_attention *a, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t tp, float *s,
                          int64_t *last) {
    for (int64_t r = 0; r < QB; r++) {
        last[r] = r >= nq ? -1 : a->causal ? i0 + r : a->S - 1;
        if (!a->mask || r >= nq) continue;
        add_row(s + r * tp, a->mask, b * a->mb + h * a->mh + (i0 + r) * a->mt, a->S, (int)a->mask_bf);
    }
}

BF16 static void forward_head(const qk_attention *a, int64_t b, int64_t h, uint16_t *o, float *lse, char *buf) {
    const int64_t T = a->T, S = a->S, hd = a->hd, tp = pad32(S), qt = a->qt, kt = a->kt;
    const uint16_t *q = (const uint16_t *)a->q + b * a->qb + h * a->qh;
    const uint16_t *k = (const uint16_t *)a->k + b * a->kb + h * a->kh, *v = (const uint16_t *)a->v + b * a->kb + h * a->kh;
    uint32_t *kp = (uint32_t *)buf;
    uint16_t *vp = (uint16_t *)(kp + hd / 2 * tp), *pb = vp + tp * hd, *xq = pb + QB * tp;
    float *s = (float *)(xq + QB * hd), *acc = s + QB * tp;
    o += b * a->ob + h * a->oh;
    lse += (b * a->H + h) * T;
    pairs_t(k, kt, S, hd, tp, kp);
    pair_rows(v, kt, S, tp / 2, hd, vp);
    for (int64_t i0 = 0; i0 < T; i0 += QB) {
        const int64_t nq = T - i0 < QB ? T - i0 : QB, n = a->causal ? pad32(i0 + nq) : tp;
        int64_t last[QB];
        take_rows(q + i0 * qt, qt, nq, hd, xq);
        for (int g = 0; g < QB; g += 4) scores(xq + g * hd, hd, kp, tp, n, a->scale, s + g * tp);
        add_mask(a, b, h, i0, nq, tp, s, last);
        float inv[QB];
        for (int r = 0; r < QB; r++) {
            const float m = softmax16(s + r * tp, last[r], n, inv + r);
            if (r < nq) lse[i0 + r] = m - logf(inv[r]);
        }
        round_rows(s, tp, QB, n, pb);
        for (int g = 0; g < nq; g += 4) {
            weigh(pb + g * tp, tp, vp, n, hd, acc);
            for (int r = g; r < nq && r < g + 4; r++) put_row(acc + (r - g) * hd, inv[r], hd, o + (i0 + r) * a->ot);
        }
    }
}

BF16 static void backward_head(const qk_attention *a, int64_t b, int64_t h, const uint16_t *o, const uint16_t *dout,
                               const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv, float *dmask, char *buf) {
    const int64_t T = a->T, S = a->S, hd = a->hd, tp = pad32(S), qt = a->qt, kt = a->kt, ot = a->ot;
    const int64_t oo = b * a->ob + h * a->oh;
    const uint16_t *q = (const uint16_t *)a->q + b * a->qb + h * a->qh;
    const uint16_t *k = (const uint16_t *)a->k + b * a->kb + h * a->kh, *v = (const uint16_t *)a->v + b * a->kb + h * a->kh;
    uint32_t *kp = (uint32_t *)buf, *vq = kp + hd / 2 * tp;
    uint16_t *kj = (uint16_t *)(vq + hd / 2 * tp), *pi = kj + tp * hd, *dsi = pi + QB * tp, *dsb = dsi + QB * tp;
    uint16_t *xq = dsb + QB * tp, *xd = xq + QB * hd, *qp = xd + QB * hd, *dop = qp + QB * hd;
    float *s = (float *)(dop + QB * hd), *dp = s + QB * tp, *dkt = dp + QB * tp, *dvt = dkt + hd * tp;
    float *rows = dvt + hd * tp, *acc = rows + tp * hd;
    o += oo, dout += oo, dq += oo, dk += b * a->gb + h * a->gh, dv += b * a->gb + h * a->gh;
    lse += (b * a->H + h) * T;
    if (dmask) dmask += (b * a->H + h) * T * S;
    pairs_t(k, kt, S, hd, tp, kp);
    pairs_t(v, kt, S, hd, tp, vq);
    pair_rows(k, kt, S, tp / 2, hd, kj);
    memset(dkt, 0, (size_t)(2 * hd * tp) * sizeof *dkt); /* dkt and dvt */
    for (int64_t i0 = 0; i0 < T; i0 += QB) {
        const int64_t nq = T - i0 < QB ? T - i0 : QB, n = a->causal ? pad32(i0 + nq) : tp;
        int64_t last[QB];
        take_rows(q + i0 * qt, qt, nq, hd, xq);
        take_rows(dout + i0 * ot, ot, nq, hd, xd);
        pair_rows(xq, hd, QB, QB / 2, hd, qp);
        pair_rows(xd, hd, QB, QB / 2, hd, dop);
        for (int g = 0; g < QB; g += 4) {
            scores(xq + g * hd, hd, kp, tp, n, a->scale, s + g * tp);
            scores(xd + g * hd, hd, vq, tp, n, 1.f, dp + g * tp);
        }
        add_mask(a, b, h, i0, nq, tp, s, last);
        for (int r = 0; r < QB; r++) {
            __m256 dsum = _mm256_setzero_ps();
            for (int64_t d = 0; d < hd && r < nq; d += 8)
                dsum = _mm256_fmadd_ps(load8(xd + r * hd, d, 1), load8(o + (i0 + r) * ot, d, 1), dsum);
            /* p = e^(s - lse) and ds = p (dp - D), unscaled: dmask's */
            grad16(s + r * tp, dp + r * tp, last[r], n, r < nq ? lse[i0 + r] : 0.f, hsum8(dsum));
            if (dmask && r < nq) memcpy(dmask + (i0 + r) * S, dp + r * tp, (size_t)S * sizeof *dmask);
        }
        pair_rows_f(s, tp, QB / 2, n, pi);   /* p */
        pair_rows_f(dp, tp, QB / 2, n, dsi); /* ds */
        round_rows(dp, tp, QB, n, dsb);
        for (int g = 0; g < nq; g += 4) {
            weigh(dsb + g * tp, tp, kj, n, hd, acc);
            for (int r = g; r < nq && r < g + 4; r++) put_row(acc + (r - g) * hd, a->scale, hd, dq + (i0 + r) * ot);
        }
        outer(dop, pi, tp, n, hd, dvt);
        outer(qp, dsi, tp, n, hd, dkt);
    }
    for (int t = 0; t < 2; t++) { /* dk^T and dv^T back to rows, rounded */
        stage_t(t ? dvt : dkt, tp, hd, tp, hd, rows);
        for (int64_t j = 0; j < S; j++) put_row(rows + j * hd, t ? 1.f : a->scale, hd, (t ? dv : dk) + j * a->gt);
    }
}

/* the bytes one thread's buffer takes */
static size_t buffer_bytes(int64_t T, int64_t hd, int back) {
    const int64_t tp = pad32(T);
    if (!back) return (size_t)(2 * hd * tp * 2 + QB * tp * 2 + QB * hd * 2 + QB * tp * 4 + 4 * hd * 4);
    return (size_t)(3 * hd * tp * 2 + 3 * QB * tp * 2 + 4 * QB * hd * 2 + 2 * QB * tp * 4 + 3 * hd * tp * 4 + 4 * hd * 4);
}

typedef struct {
    const qk_attention *a;
    void **p; /* run's pointers */
} task;

BF16 static void forward_task(int64_t i, char *buf, const void *ctx) {
    const task *t = ctx;
    forward_head(t->a, i / t->a->H, i % t->a->H, t->p[0], t->p[1], buf);
}

BF16 static void backward_task(int64_t i, char *buf, const void *ctx) {
    const task *t = ctx;
    void **p = t->p;
    backward_head(t->a, i / t->a->H, i % t->a->H, p[7], p[8], p[9], p[0], p[1], p[2], p[3], buf);
}

static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int back) {
    void *p[QK_ATTENTION_POINTERS];
    qk_attention a;
    if (qk_attention_args(args, nargs, back, "attend16", 32, 1, p, &a)) return NULL;
    const task t = {&a, p};
    if (qk_each_task(a.B * a.H, buffer_bytes(a.S, a.hd, back), back ? backward_task : forward_task, &t)) return NULL;
    Py_RETURN_NONE;
}

#else
QK_RUN_UNAVAILABLE("attend16: built without AVX512-BF16 support")
#endif

QK_FORWARD_BACKWARD(attend16)
