/* AVX2 pieces that fstep.c (a float32 decoding step), gelu.c (tanh-GELU for training), rowattn.c
 * (attention over packed rows), attend32.c and attend16.c (attention for training) share.
 * Include after <immintrin.h>, on x86-64 with GCC or clang; the functions are compiled for
 * AVX2 and FMA by attribute, so callers choose them at run time (__builtin_cpu_supports). */
#ifndef LMFORGE_SIMD_H
#define LMFORGE_SIMD_H

#define AVX2 __attribute__((target("avx2,fma")))

/* e^x within 2 ulp, as a function NAME(V x) of a vector type V with intrinsics prefix W (_mm256,
 * _mm512), compiled with ATTR: Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2, e^r by a
 * polynomial, then times 2^n by TIMES_2N(y, n); ROUND(v) rounds to the nearest integer */
#define DEFINE_EXP(NAME, ATTR, V, W, ROUND, TIMES_2N)                                                  \
    ATTR static inline V NAME(V x) {                                                                  \
        x = W##_max_ps(W##_min_ps(x, W##_set1_ps(88.3f)), W##_set1_ps(-87.3f));                      \
        const V n = ROUND(W##_mul_ps(x, W##_set1_ps(1.44269504088896341f)));                          \
        V r = W##_fnmadd_ps(n, W##_set1_ps(0.693359375f), x);                                         \
        r = W##_fnmadd_ps(n, W##_set1_ps(-2.12194440e-4f), r);                                        \
        V p = W##_set1_ps(1.9875691500e-4f);                                                          \
        p = W##_fmadd_ps(p, r, W##_set1_ps(1.3981999507e-3f));                                        \
        p = W##_fmadd_ps(p, r, W##_set1_ps(8.3334519073e-3f));                                        \
        p = W##_fmadd_ps(p, r, W##_set1_ps(4.1665795894e-2f));                                        \
        p = W##_fmadd_ps(p, r, W##_set1_ps(1.6666665459e-1f));                                        \
        p = W##_fmadd_ps(p, r, W##_set1_ps(5.0000001201e-1f));                                        \
        return TIMES_2N(W##_add_ps(W##_fmadd_ps(W##_mul_ps(p, r), r, r), W##_set1_ps(1.f)), n);       \
    }

#define ROUND8(v) _mm256_round_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* y 2^n with 2^n made in the exponent bits */
#define TIMES_2N_8(y, n) \
    _mm256_mul_ps((y), _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)))
DEFINE_EXP(exp8, AVX2, __m256, _mm256, ROUND8, TIMES_2N_8) /* e^x in eight lanes */

/* the largest, and the sum, of the eight lanes */
AVX2 static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

/* eight elements from i of a float32 (bf = 0) or bfloat16 (bf = 1) array, and back (rounded to
 * nearest even, as qkernel.h's float_bf16; NaN aside) */
AVX2 static inline __m256 load8(const void *p, int64_t i, int bf) {
    if (!bf) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static inline void store8(void *p, int64_t i, __m256 v, int bf) {
    if (!bf) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m256i b = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

/* row (n floats) += the mask's n elements from `at` (float32, or bfloat16 when bf) */
AVX2 static inline void add_row(float *row, const void *mask, int64_t at, int64_t n, int bf) {
    const int64_t whole = n & ~(int64_t)7;
    for (int64_t c = 0; c < whole; c += 8)
        _mm256_storeu_ps(row + c, _mm256_add_ps(_mm256_loadu_ps(row + c), load8(mask, at + c, bf)));
    for (int64_t c = whole; c < n; c++) row[c] += load1(mask, at + c, bf);
}

/* Attention in tiles of 4 queries (rowattn.c, attend32.c), the keys staged transposed in mt (hd x tp) */

/* s (4 x tp) = a (4 x hd) times the staged mt (hd x tp), columns 0 .. n (a multiple of 16) */
AVX2 static inline void scores4(const float *a, const float *mt, int64_t tp, int64_t n, int64_t hd, float *s) {
    for (int64_t c = 0; c < n; c += 16) {
        __m256 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < hd; d++) {
            const __m256 k0 = _mm256_loadu_ps(mt + d * tp + c), k1 = _mm256_loadu_ps(mt + d * tp + c + 8);
            for (int r = 0; r < 4; r++) {
                const __m256 x = _mm256_set1_ps(a[r * hd + d]);
                acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm256_storeu_ps(s + r * tp + c, acc[r][0]);
            _mm256_storeu_ps(s + r * tp + c + 8, acc[r][1]);
        }
    }
}

/* acc (4 x hd) = w (4 x tp, columns 0 .. n) times the rows m_j (stride ms); hd a multiple of 8 */
AVX2 static inline void rowsum4(const float *w, int64_t tp, const float *m, int64_t ms, int64_t n, int64_t hd,
                                float *acc) {
    for (int64_t d = 0; d < hd; d += 16) {
        const int two = d + 16 <= hd; /* else the last 8 of hd */
        __m256 o[4][2];
        for (int r = 0; r < 4; r++) o[r][0] = o[r][1] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 m0 = _mm256_loadu_ps(m + j * ms + d), m1 = two ? _mm256_loadu_ps(m + j * ms + d + 8) : m0;
            for (int r = 0; r < 4; r++) {
                const __m256 x = _mm256_set1_ps(w[r * tp + j]);
                o[r][0] = _mm256_fmadd_ps(x, m0, o[r][0]);
                o[r][1] = _mm256_fmadd_ps(x, m1, o[r][1]);
            }
        }
        for (int r = 0; r < 4; r++) {
            _mm256_storeu_ps(acc + r * hd + d, o[r][0]);
            if (two) _mm256_storeu_ps(acc + r * hd + d + 8, o[r][1]);
        }
    }
}

/* row s (n columns, the keys 0 .. last visible; last = -1: none) → e^(s_j - max) for the visible
 * keys, 0 for the rest; *inv = 1 / their sum (0 for none). Returns the max. */
AVX2 static inline float softmax_row(float *s, int64_t last, int64_t n, float *inv) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t c = 0; c < n; c += 8) {
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(last + 1 - c)), lane));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + c), keep));
    }
    const float m = hmax8(mx);
    if (last < 0) {
        for (int64_t j = 0; j < n; j++) s[j] = 0.f;
        *inv = 0.f;
        return m;
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8) { /* n rounded up to 8 stays within the row's 16-padded columns */
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(last + 1 - c)), lane));
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv)), keep);
        _mm256_storeu_ps(s + c, e);
        sum = _mm256_add_ps(sum, e);
    }
    *inv = 1.f / hsum8(sum);
    return m;
}

/* the backward's row: p_j = e^(scale s_j - lse) for the visible keys (0 past last), and in dp
 * ds_j = p_j (dp_j - D) scale */
AVX2 static inline void grad_row(float *s, float *dp, int64_t last, int64_t n, float scale, float lse, float D) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 sc = _mm256_set1_ps(scale), l = _mm256_set1_ps(lse), dv = _mm256_set1_ps(D);
    for (int64_t c = 0; c < n; c += 8) {
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(last + 1 - c)), lane));
        const __m256 p = _mm256_and_ps(exp8(_mm256_fmsub_ps(sc, _mm256_loadu_ps(s + c), l)), keep);
        _mm256_storeu_ps(s + c, p);
        _mm256_storeu_ps(dp + c, _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + c), dv)), sc));
    }
}

/* the head at p (T rows of stride st) transposed into mt (hd x tp), zeros past T: 8 x 8 blocks
 * transposed in registers, the rows past the last whole block one by one */
AVX2 static inline void stage_t(const float *p, int64_t st, int64_t T, int64_t hd, int64_t tp, float *mt) {
    const int64_t whole = T & ~(int64_t)7;
    for (int64_t j = 0; j < whole; j += 8)
        for (int64_t d = 0; d < hd; d += 8) {
            __m256 r[8], t[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(p + (j + i) * st + d);
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4)
                for (int h = 0; h < 2; h++) {
                    r[i + h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0x44);
                    r[i + h + 2] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0xEE);
                }
            /* r[0], r[2], r[1], r[3] hold columns 0, 1, 2, 3 of rows 0-3 (low lanes) and ... */
            const int order[4] = {0, 2, 1, 3};
            for (int c = 0; c < 4; c++) {
                _mm256_storeu_ps(mt + (d + c) * tp + j, _mm256_permute2f128_ps(r[order[c]], r[4 + order[c]], 0x20));
                _mm256_storeu_ps(mt + (d + c + 4) * tp + j, _mm256_permute2f128_ps(r[order[c]], r[4 + order[c]], 0x31));
            }
        }
    for (int64_t j = whole; j < tp; j++)
        for (int64_t d = 0; d < hd; d++) mt[d * tp + j] = j < T ? p[j * st + d] : 0.f;
}

#endif
