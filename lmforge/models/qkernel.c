/* y = x W^T for weights quantised in blocks of 32 inputs, with the activations quantised per
 * block of 32 too, to int16. (llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products take them
 * in int8, which is cheaper; on SmolLM2-135M that rounding alone turns "Paris" into another
 * answer. In int16 the product is within float rounding of the dequantised weight's.)
 *
 *   4-bit  W[o, i] = d[o, b] q[o, i] + m[o, b],  q in 0..15 (llama.cpp's Q4_1 form)
 *          sum_i W[o, i] x[i]  ~  sum_b ( d[o, b] dx[b] sum_j q[o, j] qx[j]  +  m[o, b] sx[b] )
 *   8-bit  W[o, i] = d[o, b] q[o, i],  q in -128..127 (Q8_0; per-channel int8 has one d per row)
 *          sum_i W[o, i] x[i]  ~  sum_b d[o, b] dx[b] sum_j q[o, j] qx[j]
 *
 * dx[b] = max |x| / 32767 over the block, qx = round(x / dx), sx[b] = dx sum_j qx[j]: the sum of the
 * rounded activations, so that the result is the weight's exact product with them (their
 * rounding error then meets the centred weight d (q - 8) + ..., not the codes 0..15 alone).
 *
 * Weight layout (made by lmforge.models.qkernel.pack4 and pack8), for each group g of 4 output rows and
 * each block b, one stream of BLOCK_BYTES: the codes of the 4 rows (4-bit: 16 bytes a row,
 * byte j holds element j in its low nibble and j + 16 in its high one, as in GGUF; 8-bit: 32
 * bytes a row), then d of the 4 rows, then (4-bit) m of the 4 rows, in half precision (as GGUF).
 *
 * Threads: the output groups are split with OpenMP. Built with -fopenmp, this module links
 * libgomp.so.1; torch is imported first, so the loader reuses torch's libgomp of that name and
 * the kernel runs on torch's own thread pool (torch.set_num_threads applies; no second runtime).
 *
 * The AVX2 loops are compiled for AVX2, FMA and F16C by function attribute and chosen at run time
 * (__builtin_cpu_supports); elsewhere the portable loops compute the same integer sums.
 */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QK_X86 1
#endif

#define QMAX 32767.f /* activations: int16 codes per block */
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead: measured best of 512-4096 on an AVX2 EPYC */
#endif

static int64_t block_bytes(int bits) { return bits == 4 ? ROWS * 16 + 2 * ROWS * 2 : ROWS * 32 + ROWS * 2; }

/* IEEE half → float (the scales are stored in half precision, as in GGUF). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | (mant << 13);       /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (mant << 13);  /* normal */
    else if (!mant) bits = sign;                                      /* zero */
    else {                                                            /* subnormal: normalise */
        int e = -1;
        uint32_t m = mant;
        do { e++; m <<= 1; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void halves(const uint8_t *p, float out[ROWS]) {
    for (int r = 0; r < ROWS; r++) {
        uint16_t h;
        memcpy(&h, p + 2 * r, sizeof h);
        out[r] = half_to_float(h);
    }
}

/* One activation row → per block: 32 int16 codes, scale dx and sum sx; k inputs, nb blocks
 * (inputs past k count as 0). */
static void quantize_row(const float *x, int64_t k, int64_t nb, int16_t *qx, float *dx, float *sx) {
    for (int64_t b = 0; b < nb; b++) {
        float v[QK], amax = 0.f;
        for (int j = 0; j < QK; j++) {
            int64_t i = b * QK + j;
            v[j] = i < k ? x[i] : 0.f;
            amax = fmaxf(amax, fabsf(v[j]));
        }
        float d = amax / QMAX, inv = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            qx[b * QK + j] = (int16_t)lrintf(v[j] * inv);
            sum += qx[b * QK + j];
        }
        dx[b] = d;
        sx[b] = d * (float)sum;
    }
}

typedef void (*dot4_fn)(const uint8_t *, const int16_t *, const float *, const float *, int64_t, float *);

/* The 4 dot products of one row group with one quantised activation row (portable). */
static void dot4_q4_plain(const uint8_t *w, const int16_t *qx, const float *dx, const float *sx, int64_t nb,
                          float out[ROWS]) {
    for (int r = 0; r < ROWS; r++) out[r] = 0.f;
    for (int64_t b = 0; b < nb; b++, w += block_bytes(4)) {
        float d[ROWS], m[ROWS];
        halves(w + ROWS * 16, d);
        halves(w + ROWS * 16 + 2 * ROWS, m);
        const int16_t *xb = qx + b * QK;
        for (int r = 0; r < ROWS; r++) {
            const uint8_t *c = w + 16 * r;
            int32_t s = 0;
            for (int j = 0; j < 16; j++) s += (c[j] & 15) * xb[j] + (c[j] >> 4) * xb[j + 16];
            out[r] += d[r] * dx[b] * (float)s + m[r] * sx[b];
        }
    }
}

static void dot4_q8_plain(const uint8_t *w, const int16_t *qx, const float *dx, const float *sx, int64_t nb,
                          float out[ROWS]) {
    (void)sx;
    for (int r = 0; r < ROWS; r++) out[r] = 0.f;
    for (int64_t b = 0; b < nb; b++, w += block_bytes(8)) {
        float d[ROWS];
        halves(w + ROWS * 32, d);
        const int16_t *xb = qx + b * QK;
        for (int r = 0; r < ROWS; r++) {
            const int8_t *c = (const int8_t *)(w + 32 * r);
            int32_t s = 0;
            for (int j = 0; j < QK; j++) s += c[j] * xb[j];
            out[r] += d[r] * dx[b] * (float)s;
        }
    }
}

#ifdef QK_X86
/* Four rows' 8 x int32 partial sums → lane r (and r + 4) holds half of row r's block sum;
 * scaled by the 4 rows' d times dx and added to acc. */
#define AVX2 __attribute__((target("avx2,fma,f16c")))
AVX2 static inline __m128 load_halves(const uint8_t *p) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p)); }

AVX2 static inline __m256 add_scaled(const __m256i p[ROWS], const uint8_t *d, float dx, __m256 acc) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m128 dd = _mm_mul_ps(load_halves(d), _mm_set1_ps(dx));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set_m128(dd, dd), acc);
}

AVX2 static void store4(__m256 acc, __m128 extra, float out[ROWS]) {
    _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)), extra));
}

AVX2 static void dot4_q4_avx2(const uint8_t *w, const int16_t *qx, const float *dx, const float *sx, int64_t nb,
                              float out[ROWS]) {
    const __m256i low = _mm256_set1_epi16(0x0F);
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += block_bytes(4)) {
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(qx + b * QK)), x1 = _mm256_loadu_si256((const __m256i *)(qx + b * QK + 16));
        __m256i p[ROWS];
        for (int r = 0; r < ROWS; r++) {
            /* byte j widened to lane j: element j in its low nibble, j + 16 in its high one */
            const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * r)));
            /* codes 0..15 as 16-bit times 16-bit activations → 32-bit pair sums (≤ 2·15·32767) */
            p[r] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(raw, low), x0),
                                    _mm256_madd_epi16(_mm256_srli_epi16(raw, 4), x1));
        }
        acc = add_scaled(p, w + ROWS * 16, dx[b], acc);
        accm = _mm_fmadd_ps(load_halves(w + ROWS * 16 + 2 * ROWS), _mm_set1_ps(sx[b]), accm); /* m · sx, 4 rows */
    }
    store4(acc, accm, out);
}

AVX2 static void dot4_q8_avx2(const uint8_t *w, const int16_t *qx, const float *dx, const float *sx, int64_t nb,
                              float out[ROWS]) {
    (void)sx;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += block_bytes(8)) {
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 128, _MM_HINT_T0);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(qx + b * QK)), x1 = _mm256_loadu_si256((const __m256i *)(qx + b * QK + 16));
        __m256i p[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 32 * r));
            /* codes -128..127 as 16-bit times 16-bit activations → 32-bit pair sums (≤ 2·128·32767) */
            p[r] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), x0),
                                    _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)), x1));
        }
        acc = add_scaled(p, w + ROWS * 32, dx[b], acc);
    }
    store4(acc, _mm_setzero_ps(), out);
}
#endif

#ifdef QK_X86
/* A row group's codes widened to int16, (nb, 4, 32): for products with several activation
 * rows, the codes are unpacked once per group instead of once per row. */
AVX2 static void widen_group(const uint8_t *w, int bits, int64_t nb, int16_t *wq) {
    const __m256i low = _mm256_set1_epi16(0x0F);
    for (int64_t b = 0; b < nb; b++, w += block_bytes(bits))
        for (int r = 0; r < ROWS; r++) {
            __m256i a, c;
            if (bits == 4) {
                const __m256i raw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * r)));
                a = _mm256_and_si256(raw, low);
                c = _mm256_srli_epi16(raw, 4);
            } else {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 32 * r));
                a = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                c = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
            }
            _mm256_storeu_si256((__m256i *)(wq + (b * ROWS + r) * QK), a);
            _mm256_storeu_si256((__m256i *)(wq + (b * ROWS + r) * QK + 16), c);
        }
}

/* dot4 with the group's widened codes wq (its scales still read from the packed group w). */
AVX2 static void dot4_wide(const int16_t *wq, const uint8_t *w, int bits, const int16_t *qx, const float *dx,
                           const float *sx, int64_t nb, float out[ROWS]) {
    const int64_t bytes = block_bytes(bits), codes = ROWS * (bits == 4 ? 16 : 32);
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bytes) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(qx + b * QK)), x1 = _mm256_loadu_si256((const __m256i *)(qx + b * QK + 16));
        __m256i p[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const int16_t *o = wq + (b * ROWS + r) * QK;
            p[r] = _mm256_add_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)o), x0),
                                    _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(o + 16)), x1));
        }
        acc = add_scaled(p, w + codes, dx[b], acc);
        if (bits == 4) accm = _mm_fmadd_ps(load_halves(w + codes + 2 * ROWS), _mm_set1_ps(sx[b]), accm);
    }
    store4(acc, accm, out);
}
#endif

static dot4_fn pick(int bits, int allow_simd) {
#ifdef QK_X86
    if (allow_simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return bits == 4 ? dot4_q4_avx2 : dot4_q8_avx2;
#endif
    (void)allow_simd;
    return bits == 4 ? dot4_q4_plain : dot4_q8_plain;
}

void qk_quantize(const float *x, int64_t rows, int64_t k, int64_t nb, int16_t *qx, float *dsx) {
    for (int64_t i = 0; i < rows; i++)
        quantize_row(x + i * k, k, nb, qx + i * nb * QK, dsx + 2 * i * nb, dsx + (2 * i + 1) * nb);
}

void qk_products(float *y, const int16_t *qx, const float *dsx, int64_t rows, int64_t nb, int bits, int allow_simd,
                 const qseg *segs, int nseg, int16_t *wq) {
    const dot4_fn dot4 = pick(bits, allow_simd);
    int64_t first[QSEG_MAX + 1] = {0}, col[QSEG_MAX] = {0}, n = 0; /* each segment's first group and column */
    for (int s = 0; s < nseg; s++) {
        first[s + 1] = first[s] + (segs[s].n + ROWS - 1) / ROWS;
        col[s] = n;
        n += segs[s].n;
    }
    const int64_t groups = first[nseg], stride = nb * block_bytes(bits);
#ifdef QK_X86
    if (dot4 == dot4_q4_plain || dot4 == dot4_q8_plain) wq = NULL;
#else
    wq = NULL;
#endif
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int s = 0;
        while (g >= first[s + 1]) s++;
        const int64_t local = g - first[s];
        const uint8_t *wg = segs[s].w + local * stride;
#ifdef QK_X86
        if (wq) widen_group(wg, bits, nb, wq);
#endif
        for (int64_t i = 0; i < rows; i++) {
            float out[ROWS];
            const int16_t *xi = qx + i * nb * QK;
            const float *dxi = dsx + 2 * i * nb, *sxi = dsx + (2 * i + 1) * nb;
#ifdef QK_X86
            if (wq) dot4_wide(wq, wg, bits, xi, dxi, sxi, nb, out);
            else
#endif
                dot4(wg, xi, dxi, sxi, nb, out);
            for (int r = 0; r < ROWS && local * ROWS + r < segs[s].n; r++)
                y[i * n + col[s] + local * ROWS + r] = out[r];
        }
    }
}

int qk_matmul(float *y, const float *x, int64_t rows, int64_t k, int64_t nb, int bits, int allow_simd,
              const qseg *segs, int nseg) {
    int16_t *qx = malloc(sizeof(int16_t) * (size_t)(rows * nb * QK));
    float *dsx = malloc(sizeof(float) * (size_t)(2 * rows * nb));
    if (!qx || !dsx) {
        free(qx);
        free(dsx);
        return -1;
    }
    qk_quantize(x, rows, k, nb, qx, dsx);
#pragma omp parallel
    {
        /* several rows: each thread widens a group's codes once for all of them */
        int16_t *wq = rows > 1 ? malloc(sizeof(int16_t) * (size_t)(nb * ROWS * QK)) : NULL;
        qk_products(y, qx, dsx, rows, nb, bits, allow_simd, segs, nseg, wq);
        free(wq);
    }
    free(qx);
    free(dsx);
    return 0;
}

/* One block of a row group → the 4 rows' 32 float weights (portable). */
static void expand_plain(const uint8_t *wb, int bits, float v[ROWS][QK]) {
    float d[ROWS], m[ROWS] = {0.f, 0.f, 0.f, 0.f};
    halves(wb + ROWS * (bits == 4 ? 16 : 32), d);
    if (bits == 4) halves(wb + ROWS * 16 + 2 * ROWS, m);
    for (int r = 0; r < ROWS; r++) {
        if (bits == 4) {
            const uint8_t *c = wb + 16 * r;
            for (int j = 0; j < 16; j++) {
                v[r][j] = d[r] * (float)(c[j] & 15) + m[r];
                v[r][j + 16] = d[r] * (float)(c[j] >> 4) + m[r];
            }
        } else {
            const int8_t *c = (const int8_t *)(wb + 32 * r);
            for (int j = 0; j < QK; j++) v[r][j] = d[r] * (float)c[j];
        }
    }
}

typedef void (*expand_fn)(const uint8_t *, int, float[ROWS][QK]);

#ifdef QK_X86
AVX2 static void expand_avx2(const uint8_t *wb, int bits, float v[ROWS][QK]) {
    float d[ROWS], m[ROWS] = {0.f, 0.f, 0.f, 0.f};
    _mm_storeu_ps(d, load_halves(wb + ROWS * (bits == 4 ? 16 : 32)));
    if (bits == 4) _mm_storeu_ps(m, load_halves(wb + ROWS * 16 + 2 * ROWS));
    for (int r = 0; r < ROWS; r++) {
        const __m256 dv = _mm256_set1_ps(d[r]), mv = _mm256_set1_ps(m[r]);
        __m128i bytes[2];  /* the row's 32 codes in element order */
        if (bits == 4) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(wb + 16 * r)), low = _mm_set1_epi8(0x0F);
            bytes[0] = _mm_and_si128(raw, low);
            bytes[1] = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        } else {
            bytes[0] = _mm_loadu_si128((const __m128i *)(wb + 32 * r));
            bytes[1] = _mm_loadu_si128((const __m128i *)(wb + 32 * r + 16));
        }
        for (int h = 0; h < 2; h++)
            for (int e = 0; e < 2; e++) {
                const __m128i part = _mm_srli_si128(bytes[h], 8 * e);
                const __m256i q = bits == 4 ? _mm256_cvtepu8_epi32(part) : _mm256_cvtepi8_epi32(part);
                _mm256_storeu_ps(v[r] + 16 * h + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), dv, mv));
            }
    }
}
#endif

/* The float weight W (n, k) of packed W, for products with many rows (a prompt), which go to
 * the float matrix product after this. */
static void dequantize(float *out, const uint8_t *w, int64_t n, int64_t k, int64_t nb, int bits, int allow_simd) {
    const int64_t groups = (n + ROWS - 1) / ROWS, bytes = block_bytes(bits);
    expand_fn expand = expand_plain;
#ifdef QK_X86
    if (pick(bits, allow_simd) != (bits == 4 ? dot4_q4_plain : dot4_q8_plain)) expand = expand_avx2;
#endif
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wb = w + g * nb * bytes;
        for (int64_t b = 0; b < nb; b++, wb += bytes) {
            float v[ROWS][QK];
            expand(wb, bits, v);
            const int64_t width = k - b * QK < QK ? k - b * QK : QK;
            for (int r = 0; r < ROWS && g * ROWS + r < n; r++)
                memcpy(out + (g * ROWS + r) * k + b * QK, v[r], sizeof(float) * (size_t)width);
        }
    }
}

int qk_each_task(int64_t n, size_t bytes, void (*fn)(int64_t task, char *buf, const void *ctx), const void *ctx) {
    int failed = 0;
    bytes = (bytes + 63) & ~(size_t)63;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        char *buf = aligned_alloc(64, bytes);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n; task++)
            if (buf) fn(task, buf, ctx);
        free(buf);
    }
    Py_END_ALLOW_THREADS
    if (failed) PyErr_NoMemory();
    return failed ? -1 : 0;
}

int qk_read_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage, void **p, int np,
                 int64_t *v) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", usage, want);
        return -1;
    }
    for (int i = 0; i < np; i++)
        if (!(p[i] = PyLong_AsVoidPtr(args[i])) && PyErr_Occurred()) return -1;
    for (Py_ssize_t i = np; i < want; i++)
        if ((v[i - np] = PyLong_AsLongLong(args[i])) == -1 && PyErr_Occurred()) return -1;
    return 0;
}

int qk_attention_args(PyObject *const *args, Py_ssize_t nargs, int back, const char *name, int64_t hd_multiple,
                      int even, void **p, qk_attention *a) {
    char usage[400];
    snprintf(usage, sizeof usage, back ? "%s_backward(dq, dk, dv, dmask, q, k, v, o, do, lse, mask, B, H, T, S, hd, "
                                         "qb, qh, qt, kb, kh, kt, ob, oh, ot, mb, mh, mt, mask_bf, causal, gb, gh, gt, scale)"
                                       : "%s_forward(o, lse, q, k, v, mask, B, H, T, S, hd, qb, qh, qt, kb, kh, kt, ob, "
                                         "oh, ot, mb, mh, mt, mask_bf, causal, scale)", name);
    const int np = back ? 11 : 6, ni = back ? 22 : 19;
    int64_t v[22];
    v[19] = v[20] = v[21] = 0;
    if (nargs != np + ni + 1) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments", usage, np + ni + 1);
        return -1;
    }
    if (qk_read_args(args, np + ni, np + ni, usage, p, np, v)) return -1;
    const double scale = PyFloat_AsDouble(args[np + ni]);
    if (scale == -1.0 && PyErr_Occurred()) return -1;
    int odd = 0;
    for (int i = 5; i < 22; i++) odd |= even && (i < 14 || i > 18) ? (int)(v[i] & 1) : 0;
    if (v[0] < 0 || v[1] < 0 || v[2] < 0 || v[3] <= 0 || v[4] <= 0 || v[4] % hd_multiple || odd || (v[18] && v[2] != v[3])) {
        PyErr_Format(PyExc_ValueError, "%s: B=%lld, H=%lld, T=%lld, S=%lld, hd=%lld do not fit (hd a multiple of %lld, %s"
                     "T = S when causal)", name, (long long)v[0], (long long)v[1], (long long)v[2], (long long)v[3],
                     (long long)v[4], (long long)hd_multiple, even ? "even strides, " : "");
        return -1;
    }
    const int qi = back ? 4 : 2;
    const qk_attention at = {p[qi], p[qi + 1], p[qi + 2], p[back ? 10 : 5], v[0], v[1], v[2], v[3], v[4], v[5], v[6],
                             v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15], v[16], v[17], v[18], v[19],
                             v[20], v[21], (float)scale};
    *a = at;
    return 0;
}

/* matmul(y, x, w, rows, n, k, nb, bits, simd): y (rows, n) and x (rows, k) contiguous float32,
 * w as `pack` made it; the caller checks shapes and dtypes. */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[3];
    int64_t v[6];
    if (qk_read_args(args, nargs, 9, "matmul(y, x, w, rows, n, k, nb, bits, simd)", p, 3, v)) return NULL;
    if (v[0] < 0 || v[1] < 0 || v[2] < 0 || v[3] * QK < v[2] || (v[4] != 4 && v[4] != 8)) {
        PyErr_Format(PyExc_ValueError, "matmul: rows=%lld, n=%lld, k=%lld, nb=%lld, bits=%lld do not fit",
                     (long long)v[0], (long long)v[1], (long long)v[2], (long long)v[3], (long long)v[4]);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    const qseg seg = {p[2], v[1]};
    rc = qk_matmul(p[0], p[1], v[0], v[2], v[3], (int)v[4], (int)v[5], &seg, 1);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequantize(out, w, n, k, nb, bits, simd): out (n, k) contiguous float32. */
static PyObject *py_dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[2];
    int64_t v[5];
    if (qk_read_args(args, nargs, 7, "dequantize(out, w, n, k, nb, bits, simd)", p, 2, v)) return NULL;
    if (v[0] < 0 || v[1] < 0 || v[2] * QK < v[1] || (v[3] != 4 && v[3] != 8)) {
        PyErr_Format(PyExc_ValueError, "dequantize: n=%lld, k=%lld, nb=%lld, bits=%lld do not fit", (long long)v[0],
                     (long long)v[1], (long long)v[2], (long long)v[3]);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    dequantize(p[0], p[1], v[0], v[1], v[2], (int)v[3], (int)v[4]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y = x W^T for packed W (see the source)."},
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_FASTCALL, "The float weight of packed W."},
    {"decode_step", (PyCFunction)(void (*)(void))py_decode_step, METH_FASTCALL, "One decoding step (see qstep.c)."},
    {"float_step", (PyCFunction)(void (*)(void))py_float_step, METH_FASTCALL, "One float32 decoding step (see fstep.c)."},
    {"gather_rows", (PyCFunction)(void (*)(void))py_gather_rows, METH_FASTCALL, "A KV cache's rows reordered (see fstep.c)."},
    {"gelu_tanh", (PyCFunction)(void (*)(void))py_gelu_tanh, METH_FASTCALL, "tanh-GELU or its input gradient (see gelu.c)."},
    {"attend_rows", (PyCFunction)(void (*)(void))py_attend_rows, METH_FASTCALL, "Attention over packed rows (see rowattn.c)."},
    {"attend32_forward", (PyCFunction)(void (*)(void))py_attend32_forward, METH_FASTCALL, "float32 attention for training, forward (see attend32.c)."},
    {"attend32_backward", (PyCFunction)(void (*)(void))py_attend32_backward, METH_FASTCALL, "float32 attention for training, backward (see attend32.c)."},
    {"rmsnorm_forward", (PyCFunction)(void (*)(void))py_rmsnorm_forward, METH_FASTCALL, "RMSNorm for training, forward (see rmsnorm.c)."},
    {"rmsnorm_backward", (PyCFunction)(void (*)(void))py_rmsnorm_backward, METH_FASTCALL, "RMSNorm for training, backward (see rmsnorm.c)."},
    {"attend16_forward", (PyCFunction)(void (*)(void))py_attend16_forward, METH_FASTCALL, "bfloat16 attention for training, forward (see attend16.c)."},
    {"attend16_backward", (PyCFunction)(void (*)(void))py_attend16_backward, METH_FASTCALL, "bfloat16 attention for training, backward (see attend16.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__qkernel(void) { return PyModule_Create(&module); }
