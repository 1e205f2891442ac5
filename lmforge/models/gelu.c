/* tanh-GELU (HF's gelu_new, torch's approximate="tanh") and its input gradient, for training:
 *
 *   y  = 0.5 x (1 + tanh(u)) = x s,   s = 1 / (1 + e^-z),  z = 2u = 2 sqrt(2/pi) (x + 0.044715 x^3)
 *   dx = dy (s + x s (1 - s) z'),     z' = 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 *
 * torch computes tanh with SLEEF's accurate tanhf, the costly part: on a 2-core Zen 4 EPYC its
 * forward and backward each took ~3.5 ms for 2,048 x 1,536 elements. Here one e^x (simd.h's
 * Cephes exp, within 2 ulp) gives s for both. float32 or bfloat16 in and out (bfloat16 rounded
 * to nearest even), float32 inside; the elements are split in chunks over torch's OpenMP threads
 * (this module shares torch's runtime; see qkernel.c). */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GK_X86 1
#include "simd.h"
#endif

#define KZ 1.59576912160573072f /* 2 sqrt(2/pi) */
#define A3 0.044715f
#define CHUNK 8192

/* element i: y (dy == NULL) or dx */
static inline float gelu1(const void *x, const void *dy, int64_t i, int bf) {
    const float v = load1(x, i, bf), s = 1.f / (1.f + expf(-KZ * (v + A3 * v * v * v)));
    if (!dy) return v * s;
    return load1(dy, i, bf) * (s + v * s * (1.f - s) * KZ * (1.f + 3.f * A3 * v * v));
}

#ifdef GK_X86
/* elements lo.. in eights; returns where the scalar tail starts */
AVX2 static int64_t gelu8(void *out, const void *x, const void *dy, int64_t lo, int64_t hi, int bf) {
    const __m256 one = _mm256_set1_ps(1.f), kz = _mm256_set1_ps(KZ), a3 = _mm256_set1_ps(A3);
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        const __m256 v = load8(x, i, bf), v2 = _mm256_mul_ps(v, v);
        const __m256 z = _mm256_mul_ps(kz, _mm256_fmadd_ps(_mm256_mul_ps(a3, v2), v, v));
        const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
        __m256 r = _mm256_mul_ps(v, s);
        if (dy) {
            const __m256 dz = _mm256_mul_ps(kz, _mm256_fmadd_ps(_mm256_set1_ps(3.f * A3), v2, one));
            r = _mm256_mul_ps(load8(dy, i, bf), _mm256_fmadd_ps(_mm256_mul_ps(r, _mm256_sub_ps(one, s)), dz, s));
        }
        store8(out, i, r, bf);
    }
    return i;
}
#endif

/* gelu_tanh(out, x, dy, n, bf16): out = y, or dx where dy is not 0; n elements, contiguous,
 * float32 (bf16 = 0) or bfloat16 (1), all of one dtype. The caller checks sizes and dtypes. */
PyObject *py_gelu_tanh(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[3];
    int64_t v[2];
    if (qk_read_args(args, nargs, 5, "gelu_tanh(out, x, dy, n, bf16)", p, 3, v)) return NULL;
    const int64_t n = v[0];
    const int bf = (int)v[1];
    int simd = 0;
#ifdef GK_X86
    simd = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    Py_BEGIN_ALLOW_THREADS
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
        int64_t i = lo;
#ifdef GK_X86
        if (simd) i = gelu8(p[0], p[1], p[2], lo, hi, bf);
#endif
        for (; i < hi; i++) store1(p[0], i, gelu1(p[1], p[2], i, bf), bf);
    }
    Py_END_ALLOW_THREADS
    (void)simd;
    Py_RETURN_NONE;
}
