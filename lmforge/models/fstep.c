/* One decoding step in float32 of B rows through a pre-norm decoder stack, in one call:
 * lmforge.generate.native's float path (GPT-2-, Llama- and T5-like decoders, and the decoder of
 * an encoder-decoder). At a few rows a step of a small model is mostly the cost of calling its
 * ~100 kernels one by one; the products of few rows are also where the BLAS libraries are at
 * their weakest (MKL's 8 x 256 x 8192 ran at 18 GFLOP/s on an AVX2 EPYC). Here the step is its
 * products, tiled for few rows, and little else.
 *
 * For each layer, with x (B, d) the rows' hidden states:
 *   h = norm(x);  q, k, v = h W_q^T + b_q, ...;  rope(q, k) at each row's position (if given)
 *   the cache's keys and values at column pos = k, v
 *   a_h = softmax(scale q_h K_g^T + bias_h) V_g  over the columns 0..pos a row's mask keeps
 *     (bias: T5's relative position bias, column n-1 + j - pos of its (H, 2n-1) table)
 *   x = x + a W_o^T + b_o
 *   cross-attention (encoder-decoder): h = norm(x); q = h W^T + b; attention over the encoder
 *     memory's keys and values (B, KV, S, hd), projected once by the caller; x = x + a W_o^T + b_o
 *   h = norm(x);  x = x + act(h W_up^T + b) W_down^T + b   (gated: act(h W_gate^T + b) * (h W_up^T + b))
 * and last out = norm(x) (hidden states), or with an LM head W (V, d): out = (s norm(x)) W^T + b.
 * Given token ids, x starts as their rows of the embedding table (times the embedding scale),
 * plus each row's row of the position table (learned or sinusoidal); given somewhere to put it,
 * each row's argmax of the logits (the first largest; a NaN counts as largest, as torch.argmax).
 * norm: LayerNorm (weight, bias) or RMSNorm (weight). The same arithmetic as the eager step, in
 * other summation orders.
 *
 * One OpenMP parallel region runs the step: output columns of the products, and (row, head)
 * pairs of attention, are shared among its threads; the per-row pieces are shared by rows.
 */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FS_X86 1
#include "simd.h"
#endif

/* Each layer's row of the table: data pointers, 0 where absent (biases, LayerNorm's bias, the
 * gate of an ungated feed-forward, the cross-attention of a decoder-only model). */
enum { N1_W, N1_B, WQ, BQ, WK, BK, WV, BV, WO, BO, N2_W, N2_B, CQ, CBQ, CO, CBO,
       N3_W, N3_B, WUP, BUP, WGATE, BGATE, WDOWN, BDOWN, FIELDS };
enum { ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU };

typedef struct {
    int64_t B, d, heads, kv, hd, ff, rows, len, pos, S, vocab, rel_n;
    int rms, act, simd;
    float eps, scale, logit_scale;
} fshape;

typedef struct {
    const int64_t *cross;       /* (layers, 2): each layer's memory keys, values (B, KV, S, hd), or NULL */
    float *cache;               /* (layers, 2, rows, KV, len, hd) */
    const int64_t *mask;        /* (B, len) 1 for a real token, or NULL: every column */
    const int64_t *positions;   /* (B) each row's position for rotary, or NULL: pos */
    const float *cos, *sin;     /* (positions, hd) rotary tables, or NULL */
    const float *rel;           /* (heads, 2 rel_n - 1) relative bias of every distance, or NULL */
    const int64_t *mem_mask;    /* (B, S) 1 for a real source token, or NULL */
    const int64_t *ids;         /* (B) the rows' tokens, or NULL: x holds the input embeddings */
    const float *embed;         /* (vocab, d) token embeddings (with ids) */
    const float *pos_table;     /* (positions, d) learned or sinusoidal positions from position 0, or NULL */
    int64_t *argmax;            /* (B) each row's argmax of the logits, or NULL */
    float embed_scale;
} finputs;

static const float *fp(int64_t p) { return (const float *)(intptr_t)p; }

/* ---- products of few rows: y (rows, n) (+)= x (rows, k) W^T (+ b), W (n, k) as nn.Linear holds it ---- */

/* s[r][c] = x_r . W_c for r < nr (1 or 2; x's rows ldx apart) and nc (up to 4) consecutive rows c of W */
static void tile_plain(const float *x, int64_t ldx, int64_t k, int nr, const float *w, int nc, float s[2][4]) {
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) s[r][c] = qk_dot(x + r * ldx, w + c * k, k);
}

#ifdef FS_X86
/* v loaded into a register: with it the compiler loads each weight once, not once for each FMA
 * that reads it (as a memory operand), which made the two-row tile load-bound */
#define IN_REG(v) __asm__("" : "+x"(v))

/* the four sums of a0..a3, in one vector (three hadds instead of four reductions) */
AVX2 static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* u[i] = act(u[i]) (gate: act(gate[i]) u[i]) for i < n, SiLU and tanh-GELU as x / (1 + e^-z)
 * (z = x; z = 2 sqrt(2/pi) (x + 0.044715 x^3): 0.5 x (1 + tanh(z / 2)) is that); the tail, and
 * the other activations, by act_row */
AVX2 static int64_t act8(float *u, const float *gate, int64_t n, int kind) {
    if (kind != ACT_SILU && kind != ACT_GELU_TANH) return 0;
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.f), c = _mm256_set1_ps(-1.59576912160573072f), c3 = _mm256_set1_ps(0.044715f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(gate ? gate + i : u + i);
        __m256 z = kind == ACT_SILU ? _mm256_sub_ps(_mm256_setzero_ps(), v)
                                    : _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, v), _mm256_mul_ps(v, v), v));
        __m256 a = _mm256_div_ps(v, _mm256_add_ps(one, exp8(z)));
        _mm256_storeu_ps(u + i, gate ? _mm256_mul_ps(a, _mm256_loadu_ps(u + i)) : a);
    }
    return i;
}

/* a . b, and o += w b, for attention's head vectors */
AVX2 static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float t = _mm_cvtss_f32(hsum4(_mm256_add_ps(s0, s1), _mm256_setzero_ps(), _mm256_setzero_ps(),
                                  _mm256_setzero_ps()));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

AVX2 static void axpy_avx2(float *o, float w, const float *b, int64_t n) {
    const __m256 wv = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(b + i), _mm256_loadu_ps(o + i)));
    for (; i < n; i++) o[i] += w * b[i];
}

/* tile_plain for four rows of W and one x row: two running sums a row of W (eight chains) */
AVX2 static void tile1_avx2(const float *x, int64_t k, const float *w, float s[2][4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + i), a0), b0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + i + 8), b0);
        a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + k + i), a1);
        b1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + k + i + 8), b1);
        a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 2 * k + i), a2);
        b2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + 2 * k + i + 8), b2);
        a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 3 * k + i), a3);
        b3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + 3 * k + i + 8), b3);
    }
    for (; i + 8 <= k; i += 8) {
        const __m256 u = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + i), a0), a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + k + i), a1);
        a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 2 * k + i), a2);
        a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + 3 * k + i), a3);
    }
    _mm_storeu_ps(s[0], hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                              _mm256_add_ps(a3, b3)));
    for (; i < k; i++)
        for (int c = 0; c < 4; c++) s[0][c] += x[i] * w[c * k + i];
}

/* tile_plain for four rows of W and two x rows: eight running sums */
AVX2 static void tile2_avx2(const float *x, int64_t ldx, int64_t k, const float *w, float s[2][4]) {
    const float *x0 = x, *x1 = x + ldx;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i);
        __m256 c0 = _mm256_loadu_ps(w + i), c1 = _mm256_loadu_ps(w + k + i), c2 = _mm256_loadu_ps(w + 2 * k + i),
               c3 = _mm256_loadu_ps(w + 3 * k + i);
        IN_REG(c0);
        IN_REG(c1);
        IN_REG(c2);
        IN_REG(c3);
        a0 = _mm256_fmadd_ps(u, c0, a0), b0 = _mm256_fmadd_ps(v, c0, b0);
        a1 = _mm256_fmadd_ps(u, c1, a1), b1 = _mm256_fmadd_ps(v, c1, b1);
        a2 = _mm256_fmadd_ps(u, c2, a2), b2 = _mm256_fmadd_ps(v, c2, b2);
        a3 = _mm256_fmadd_ps(u, c3, a3), b3 = _mm256_fmadd_ps(v, c3, b3);
    }
    _mm_storeu_ps(s[0], hsum4(a0, a1, a2, a3));
    _mm_storeu_ps(s[1], hsum4(b0, b1, b2, b3));
    for (; i < k; i++)
        for (int c = 0; c < 4; c++) s[0][c] += x0[i] * w[c * k + i], s[1][c] += x1[i] * w[c * k + i];
}
#endif

/* y[r, j] (rows ldy apart) = (acc ? y[r, j] : 0) + b[j] + x[r] . W[j] for the block of W rows
 * j0..j0+3 (x's rows ldx apart; the block's W rows stay in L1 across x's rows) */
static inline void product_block(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t rows, int64_t k,
                                 const float *w, const float *b, int64_t n, int acc, int simd, int64_t j0) {
    (void)simd;
    const int nc = n - j0 < 4 ? (int)(n - j0) : 4;
    if (j0 + 8 <= n) /* the next block of W, a cache line at a time, while this one is multiplied */
        for (int64_t q = 0; q < 4 * k; q += 16) __builtin_prefetch(w + (j0 + 4) * k + q);
    for (int64_t r = 0; r < rows; r += 2) {
        const int nr = rows - r < 2 ? (int)(rows - r) : 2;
        float s[2][4];
#ifdef FS_X86
        if (simd && nc == 4 && nr == 2) tile2_avx2(x + r * ldx, ldx, k, w + j0 * k, s);
        else if (simd && nc == 4) tile1_avx2(x + r * ldx, k, w + j0 * k, s);
        else
#endif
            tile_plain(x + r * ldx, ldx, k, nr, w + j0 * k, nc, s);
        for (int i = 0; i < nr; i++)
            for (int c = 0; c < nc; c++) {
                float *out = y + (r + i) * ldy + j0 + c;
                *out = (acc ? *out : 0.f) + s[i][c] + (b ? b[j0 + c] : 0.f);
            }
    }
}

/* The product for every block of 4 output columns, the blocks shared by the enclosing region's
 * threads; the region waits for all of them at the end. */
static void product(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t rows, int64_t k, const float *w,
                    const float *b, int64_t n, int acc, int simd) {
#pragma omp for schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += 4) product_block(y, ldy, x, ldx, rows, k, w, b, n, acc, simd, j0);
}

/* The same without the wait at the end: for a product whose output nothing reads before the
 * next product's wait (q and k before v; the up projection before the gate) */
static void product_nowait(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t rows, int64_t k,
                           const float *w, const float *b, int64_t n, int acc, int simd) {
#pragma omp for schedule(static) nowait
    for (int64_t j0 = 0; j0 < n; j0 += 4) product_block(y, ldy, x, ldx, rows, k, w, b, n, acc, simd, j0);
}

/* ---- the per-row pieces ---- */

static void norm_row(const float *xr, const fshape *s, const float *g, const float *b, float *o) {
    if (s->rms) {
        qk_rmsnorm(xr, g, s->d, s->eps, o);
        return;
    }
    double mean = 0.0, var = 0.0; /* LayerNorm */
    for (int64_t i = 0; i < s->d; i++) mean += xr[i];
    mean /= (double)s->d;
    for (int64_t i = 0; i < s->d; i++) var += (xr[i] - mean) * (xr[i] - mean);
    const float m = (float)mean, inv = 1.f / sqrtf((float)(var / (double)s->d) + s->eps);
    for (int64_t i = 0; i < s->d; i++) o[i] = (xr[i] - m) * inv * g[i] + (b ? b[i] : 0.f);
}

/* out = norm(x), the rows shared by the region's threads */
static void norm_rows(const float *x, int64_t rows, const fshape *s, const float *g, const float *b, float *out) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * s->d, s, g, b, out + r * s->d);
}

/* The calling thread's own copy of norm(x), every row: the products that read it need no wait
 * for the other threads (a norm of a few rows costs less than the wait) */
static float *norm_mine(const float *x, int64_t rows, const fshape *s, const float *g, const float *b,
                        float *mine) {
    int64_t t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    float *out = mine + t * rows * s->d;
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * s->d, s, g, b, out + r * s->d);
    return out;
}

static float act(float v, int kind) {
    switch (kind) {
    case ACT_RELU: return v > 0.f ? v : 0.f;
    case ACT_GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v / (1.f + expf(-v));
    }
}

/* ---- attention ---- */

static float dot(const float *a, const float *b, int64_t n, int simd) {
#ifdef FS_X86
    if (simd) return dot_avx2(a, b, n);
#endif
    (void)simd;
    return qk_dot(a, b, n);
}

static void axpy(float *o, float w, const float *b, int64_t n, int simd) {
#ifdef FS_X86
    if (simd) {
        axpy_avx2(o, w, b, n);
        return;
    }
#endif
    (void)simd;
    for (int64_t i = 0; i < n; i++) o[i] += w * b[i];
}

/* out (B, heads*hd) = softmax(scale q K^T + bias) V for every (row, head), shared by the
 * region's threads. q: row r's heads at q + r*ldq. Keys of row r, kv head g at keys(r, g),
 * n of them (j < n), the row's mask (NULL: all) skipping columns; bias(h, j) added if rel. */
typedef struct {
    const float *base_k, *base_v;
    int64_t row_stride, head_stride, n;  /* floats between rows and between kv heads; keys per head */
    const int64_t *mask;                 /* (B, mask_ld) or NULL */
    int64_t mask_ld;
} keys_t;

static void attend(const float *q, int64_t ldq, const keys_t *kt, const fshape *s, const float *rel, float *p,
                   float *out) {
    const int64_t group = s->heads / s->kv, hd = s->hd, width = 2 * s->rel_n - 1;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s->B * s->heads; t++) {
        const int64_t r = t / s->heads, h = t % s->heads, g = h / group;
        const float *qh = q + r * ldq + h * hd;
        const float *k = kt->base_k + r * kt->row_stride + g * kt->head_stride;
        const float *v = kt->base_v + r * kt->row_stride + g * kt->head_stride;
        const int64_t *m = kt->mask ? kt->mask + r * kt->mask_ld : NULL;
        const float *bias = rel ? rel + h * width + (s->rel_n - 1 - s->pos) : NULL;
        float *ph = p + t * kt->n, *o = out + r * s->heads * hd + h * hd, top = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < kt->n; j++) {
            if (m && !m[j]) {
                ph[j] = -INFINITY;
                continue;
            }
            ph[j] = dot(qh, k + j * hd, hd, s->simd) * s->scale + (bias ? bias[j] : 0.f);
            top = fmaxf(top, ph[j]);
        }
        for (int64_t i = 0; i < hd; i++) o[i] = 0.f;
        if (top == -INFINITY) continue;  /* no key to see (cannot happen for a real token) */
        for (int64_t j = 0; j < kt->n; j++) sum += (ph[j] = ph[j] == -INFINITY ? 0.f : expf(ph[j] - top));
        for (int64_t j = 0; j < kt->n; j++) {
            const float w = ph[j] / sum;
            if (w == 0.f) continue;
            axpy(o, w, v + j * hd, hd, s->simd);
        }
    }
}

/* ---- the input embeddings and the greedy token ---- */

/* x[r] = embed[ids[r]] (* scale), + pos_table[the row's position]: the eager step's arithmetic,
 * one rounding at each operation (the two loops keep the compiler from fusing them) */
static void embed_rows(float *x, const fshape *s, const finputs *in) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s->B; r++) {
        float *o = x + r * s->d;
        const float *e = in->embed + in->ids[r] * s->d;
        if (in->embed_scale != 1.f)
            for (int64_t i = 0; i < s->d; i++) o[i] = e[i] * in->embed_scale;
        else
            memcpy(o, e, sizeof(float) * (size_t)s->d);
        if (in->pos_table) {
            const float *p = in->pos_table + (in->positions ? in->positions[r] : s->pos) * s->d;
            for (int64_t i = 0; i < s->d; i++) o[i] += p[i];
        }
    }
}

static void argmax_rows(const float *logits, const fshape *s, int64_t *out) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s->B; r++) {
        const float *v = logits + r * s->vocab;
        int64_t best = 0;
        for (int64_t i = 0; i < s->vocab; i++) {
            if (v[i] != v[i]) { /* NaN */
                best = i;
                break;
            }
            if (v[i] > v[best]) best = i;
        }
        out[r] = best;
    }
}

/* ---- the step ---- */

typedef struct {
    float *mine, *qkv, *att, *ff, *p; /* mine: each thread's (B, d) normed rows */
} fwork;

static void layer(float *x, int64_t l, const int64_t *t, const fshape *s, const finputs *in, const fwork *w) {
    const int64_t B = s->B, d = s->d, hd = s->hd, nq = s->heads * hd, nk = s->kv * hd, ld = nq + 2 * nk;
    float *keys = in->cache + (l * 2 + 0) * s->rows * s->kv * s->len * hd;
    float *values = in->cache + (l * 2 + 1) * s->rows * s->kv * s->len * hd;
    const float *h = norm_mine(x, B, s, fp(t[N1_W]), fp(t[N1_B]), w->mine);
    product_nowait(w->qkv, ld, h, d, B, d, fp(t[WQ]), fp(t[BQ]), nq, 0, s->simd);
    product_nowait(w->qkv + nq, ld, h, d, B, d, fp(t[WK]), fp(t[BK]), nk, 0, s->simd);
    product(w->qkv + nq + nk, ld, h, d, B, d, fp(t[WV]), fp(t[BV]), nk, 0, s->simd);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; r++) {
        float *row = w->qkv + r * ld;
        if (in->cos) {
            const int64_t at = in->positions ? in->positions[r] : s->pos;
            qk_rope(row, s->heads + s->kv, hd, in->cos + at * hd, in->sin + at * hd); /* q heads, then k heads */
        }
        for (int64_t g = 0; g < s->kv; g++) {
            const int64_t off = ((r * s->kv + g) * s->len + s->pos) * hd;
            memcpy(keys + off, row + nq + g * hd, sizeof(float) * (size_t)hd);
            memcpy(values + off, row + nq + nk + g * hd, sizeof(float) * (size_t)hd);
        }
    }
    const keys_t self = {keys, values, s->kv * s->len * hd, s->len * hd, s->pos + 1, in->mask, s->len};
    attend(w->qkv, ld, &self, s, in->rel, w->p, w->att);
    product(x, d, w->att, nq, B, nq, fp(t[WO]), fp(t[BO]), d, 1, s->simd);
    if (t[CQ]) {
        h = norm_mine(x, B, s, fp(t[N2_W]), fp(t[N2_B]), w->mine);
        product(w->qkv, nq, h, d, B, d, fp(t[CQ]), fp(t[CBQ]), nq, 0, s->simd);
        const keys_t mem = {fp(in->cross[2 * l]), fp(in->cross[2 * l + 1]), s->kv * s->S * hd, s->S * hd, s->S,
                            in->mem_mask, s->S};
        attend(w->qkv, nq, &mem, s, NULL, w->p, w->att);
        product(x, d, w->att, nq, B, nq, fp(t[CO]), fp(t[CBO]), d, 1, s->simd);
    }
    h = norm_mine(x, B, s, fp(t[N3_W]), fp(t[N3_B]), w->mine);
    const int gated = t[WGATE] != 0;
    if (gated) product_nowait(w->ff, 2 * s->ff, h, d, B, d, fp(t[WUP]), fp(t[BUP]), s->ff, 0, s->simd);
    else product(w->ff, 2 * s->ff, h, d, B, d, fp(t[WUP]), fp(t[BUP]), s->ff, 0, s->simd);
    if (gated) product(w->ff + s->ff, 2 * s->ff, h, d, B, d, fp(t[WGATE]), fp(t[BGATE]), s->ff, 0, s->simd);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; r++) {
        float *u = w->ff + r * 2 * s->ff;
        int64_t i = 0;
#ifdef FS_X86
        if (s->simd) i = act8(u, gated ? u + s->ff : NULL, s->ff, s->act);
#endif
        for (; i < s->ff; i++) u[i] = gated ? act(u[s->ff + i], s->act) * u[i] : act(u[i], s->act);
    }
    product(x, d, w->ff, 2 * s->ff, B, s->ff, fp(t[WDOWN]), fp(t[BDOWN]), d, 1, s->simd);
}

/* float_step(out, x, table, cross, cache, mask, positions, cos, sin, rel, mem_mask, final_w, final_b,
 *            head_w, head_b, ids, embed, pos_table, argmax,
 *            n_layers, B, d, heads, kv, hd, ff, rows, len, pos, S, vocab, rel_n, rms, act, simd, n_embed,
 *            n_pos, eps, scale, logit_scale, embed_scale)
 * x (B, d) the rows' input embeddings (positions added), updated in place; with ids, a work
 * buffer the step fills from embed (n_embed rows) and pos_table (n_pos rows) first. out:
 * (B, vocab) logits with head_w, else (B, d) final hidden states; argmax (with head_w) gets
 * each row's largest logit's index. Every pointer but x, table, cache, final_w and out may be 0
 * (see finputs). */
PyObject *py_float_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    enum { NP = 19, NV = 18, ND = 4 };
    void *p[NP];
    int64_t v[NV];
    const char *usage = "float_step(out, x, table, cross, cache, mask, positions, cos, sin, rel, mem_mask, final_w, "
                        "final_b, head_w, head_b, ids, embed, pos_table, argmax, n_layers, B, d, heads, kv, hd, ff, "
                        "rows, len, pos, S, vocab, rel_n, rms, act, simd, n_embed, n_pos, eps, scale, logit_scale, "
                        "embed_scale)";
    if (nargs != NP + NV + ND) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments", usage, NP + NV + ND);
        return NULL;
    }
    if (qk_read_args(args, NP + NV, NP + NV, usage, p, NP, v)) return NULL;
    const double eps = PyFloat_AsDouble(args[NP + NV]), scale = PyFloat_AsDouble(args[NP + NV + 1]),
                 logit_scale = PyFloat_AsDouble(args[NP + NV + 2]), embed_scale = PyFloat_AsDouble(args[NP + NV + 3]);
    if (PyErr_Occurred()) return NULL;
    const int64_t n_layers = v[0];
    int simd = (int)v[15];
#ifdef FS_X86
    simd = simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    simd = 0;
#endif
    const fshape s = {v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12],
                      (int)v[13], (int)v[14], simd, (float)eps, (float)scale, (float)logit_scale};
    if (n_layers < 1 || s.B < 1 || s.B > s.rows || s.d < 1 || s.kv < 1 || s.heads % s.kv || s.hd < 1 || s.ff < 1
        || s.pos < 0 || s.pos >= s.len || (p[3] && s.S < 1) || (p[9] && s.pos >= s.rel_n) || (p[7] && s.hd % 2)
        || !p[0] || !p[1] || !p[2] || !p[4] || !p[11] || (p[13] && s.vocab < 1) || (p[15] && !p[16])
        || (p[18] && !p[13])) {
        PyErr_Format(PyExc_ValueError, "float_step: n_layers=%lld B=%lld rows=%lld heads=%lld kv=%lld hd=%lld pos=%lld "
                     "len=%lld S=%lld rel_n=%lld do not fit", (long long)n_layers, (long long)s.B, (long long)s.rows,
                     (long long)s.heads, (long long)s.kv, (long long)s.hd, (long long)s.pos, (long long)s.len,
                     (long long)s.S, (long long)s.rel_n);
        return NULL;
    }
    const int64_t *ids = p[15], *rowpos = p[6];
    for (int64_t r = 0; p[15] && r < s.B; r++) {
        const int64_t at = rowpos ? rowpos[r] : s.pos;
        if (ids[r] < 0 || ids[r] >= v[16] || (p[17] && (at < 0 || at >= v[17]))) {
            PyErr_Format(PyExc_ValueError, "float_step: row %lld's token %lld or position %lld is outside the "
                         "embeddings (%lld tokens, %lld positions)", (long long)r, (long long)ids[r], (long long)at,
                         (long long)v[16], (long long)v[17]);
            return NULL;
        }
    }
    const finputs in = {p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[15], p[16], p[17], p[18],
                        (float)embed_scale};
    const int64_t nq = s.heads * s.hd, nk = s.kv * s.hd, keys = s.len > s.S ? s.len : s.S;
    int64_t threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    float *buf = malloc(sizeof(float) * (size_t)(s.B * (threads * s.d + nq + 2 * nk + nq + 2 * s.ff + s.heads * keys)));
    if (!buf) return PyErr_NoMemory();
    fwork w = {.mine = buf};
    w.qkv = w.mine + threads * s.B * s.d;
    w.att = w.qkv + s.B * (nq + 2 * nk);
    w.ff = w.att + s.B * nq;
    w.p = w.ff + s.B * 2 * s.ff;
    float *x = p[1], *out = p[0];
    const int64_t *table = p[2];
    const float *head = p[13], *head_b = p[14];
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
        if (in.ids) embed_rows(x, &s, &in);
        for (int64_t l = 0; l < n_layers; l++) layer(x, l, table + l * FIELDS, &s, &in, &w);
        if (head) {
            float *h = norm_mine(x, s.B, &s, p[11], p[12], w.mine);
            if (s.logit_scale != 1.f)
                for (int64_t i = 0; i < s.B * s.d; i++) h[i] *= s.logit_scale;
            product(out, s.vocab, h, s.d, s.B, s.d, head, head_b, s.vocab, 0, s.simd);
            if (in.argmax) argmax_rows(out, &s, in.argmax);
        } else {
            norm_rows(x, s.B, &s, p[11], p[12], out);
        }
    }
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

/* gather_rows(dst, src, index, outer, rows, segs, seg_len, used): beam search's cache reorder.
 * dst and src are (outer, rows, segs, seg_len) float32; for every o, r and s the first `used`
 * floats of dst[o, r, s] become those of src[o, index[r], s] (KV caches: outer = layers x 2,
 * segs = kv heads, seg_len = length x head_dim, used = the positions written x head_dim). The
 * copies are shared by the threads; torch's index_select of the same slices runs on one. */
PyObject *py_gather_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[3];
    int64_t v[5];
    if (qk_read_args(args, nargs, 8, "gather_rows(dst, src, index, outer, rows, segs, seg_len, used)", p, 3, v))
        return NULL;
    const int64_t outer = v[0], rows = v[1], segs = v[2], seg_len = v[3], used = v[4], *index = p[2];
    if (outer < 0 || rows < 0 || segs < 0 || used < 0 || used > seg_len || !p[0] || !p[1] || !p[2]) {
        PyErr_Format(PyExc_ValueError, "gather_rows: outer=%lld rows=%lld segs=%lld seg_len=%lld used=%lld do not fit",
                     (long long)outer, (long long)rows, (long long)segs, (long long)seg_len, (long long)used);
        return NULL;
    }
    for (int64_t r = 0; r < rows; r++)
        if (index[r] < 0 || index[r] >= rows) {
            PyErr_Format(PyExc_ValueError, "gather_rows: index[%lld] = %lld is not a row of %lld", (long long)r,
                         (long long)index[r], (long long)rows);
            return NULL;
        }
    float *dst = p[0];
    const float *src = p[1];
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < outer * rows * segs; t++) {
        const int64_t o = t / (rows * segs), r = t / segs % rows, s = t % segs;
        memcpy(dst + t * seg_len, src + ((o * rows + index[r]) * segs + s) * seg_len, sizeof(float) * (size_t)used);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
