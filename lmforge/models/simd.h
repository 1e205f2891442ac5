/* AVX2 pieces that fstep.c (a float32 decoding step), gelu.c (tanh-GELU for training) and rowattn.c
 * (attention over packed rows) share.
 * Include after <immintrin.h>, on x86-64 with GCC or clang; the functions are compiled for
 * AVX2 and FMA by attribute, so callers choose them at run time (__builtin_cpu_supports). */
#ifndef LMFORGE_SIMD_H
#define LMFORGE_SIMD_H

#define AVX2 __attribute__((target("avx2,fma")))

/* e^x in eight lanes, within 2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a
 * polynomial, times 2^n made in the exponent bits) */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
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

#endif
