/* RMSNorm (T5's and Llama's norm) for training in float32, forward and backward:
 *
 *   forward   r_i = 1 / sqrt(mean_j x_ij^2 + eps),  y_ij = x_ij r_i w_j
 *   backward  g_ij = dy_ij w_j,  dx_ij = r_i (g_ij - x_ij r_i^2 mean_j g_ij x_ij),
 *             dw_j = sum_i dy_ij x_ij r_i
 *
 * With autograd torch runs F.rms_norm as its pieces (a square, a mean, an add, rsqrt, two
 * products, and each one's gradient), a dozen passes over the rows; here one pass forward and one
 * backward, r kept between them. Rows are split in equal blocks over torch's OpenMP threads; dw is
 * summed per thread, then over the threads in order, so a given thread count always gives the same
 * sums. x, dy, y and dx contiguous (n, d) float32, d a multiple of 8 (AVX2 + FMA; the caller checks
 * the CPU). */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "simd.h"

AVX2 static void forward_rows(const float *x, const float *w, float eps, int64_t lo, int64_t hi, int64_t d, float *y,
                              float *r) {
    for (int64_t i = lo; i < hi; i++) {
        const float *xi = x + i * d;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t j = 0; j < d; j += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(xi + j), _mm256_loadu_ps(xi + j), ss);
        const float ri = 1.f / sqrtf(hsum8(ss) / (float)d + eps);
        const __m256 rv = _mm256_set1_ps(ri);
        r[i] = ri;
        for (int64_t j = 0; j < d; j += 8)
            _mm256_storeu_ps(y + i * d + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + j), rv),
                                                          _mm256_loadu_ps(w + j)));
    }
}

AVX2 static void backward_rows(const float *x, const float *w, const float *dy, const float *r, int64_t lo, int64_t hi,
                               int64_t d, float *dx, float *dw) {
    for (int64_t i = lo; i < hi; i++) {
        const float *xi = x + i * d, *di = dy + i * d;
        __m256 gx = _mm256_setzero_ps();
        for (int64_t j = 0; j < d; j += 8)
            gx = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(di + j), _mm256_loadu_ps(w + j)), _mm256_loadu_ps(xi + j), gx);
        const __m256 rv = _mm256_set1_ps(r[i]), c = _mm256_set1_ps(hsum8(gx) / (float)d * r[i] * r[i]);
        for (int64_t j = 0; j < d; j += 8) {
            const __m256 xv = _mm256_loadu_ps(xi + j), dyv = _mm256_loadu_ps(di + j);
            const __m256 g = _mm256_mul_ps(dyv, _mm256_loadu_ps(w + j));
            _mm256_storeu_ps(dx + i * d + j, _mm256_mul_ps(rv, _mm256_fnmadd_ps(xv, c, g)));
            _mm256_storeu_ps(dw + j, _mm256_fmadd_ps(_mm256_mul_ps(dyv, xv), rv, _mm256_loadu_ps(dw + j)));
        }
    }
}

/* rmsnorm_forward(y, r, x, w, n, d, eps); rmsnorm_backward(dx, dw, x, w, dy, r, n, d) */
static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int back) {
    void *p[6];
    int64_t v[2];
    const int np = back ? 6 : 4;
    const char *usage = back ? "rmsnorm_backward(dx, dw, x, w, dy, r, n, d)" : "rmsnorm_forward(y, r, x, w, n, d, eps)";
    if (nargs != np + 2 + !back) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments", usage, np + 2 + !back);
        return NULL;
    }
    if (qk_read_args(args, np + 2, np + 2, usage, p, np, v)) return NULL;
    const double eps = back ? 0.0 : PyFloat_AsDouble(args[np + 2]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    const int64_t n = v[0], d = v[1];
    if (n < 0 || d <= 0 || d % 8) {
        PyErr_Format(PyExc_ValueError, "rmsnorm: n=%lld, d=%lld do not fit (d a multiple of 8)", (long long)n, (long long)d);
        return NULL;
    }
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    float *part = back ? calloc((size_t)(threads * d), sizeof(float)) : NULL; /* dw per thread */
    if (back && !part) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        if (back)
            backward_rows(p[2], p[3], p[4], p[5], lo, hi, d, p[0], part + t * d);
        else
            forward_rows(p[2], p[3], (float)eps, lo, hi, d, p[0], p[1]);
    }
    Py_END_ALLOW_THREADS
    if (back) {
        float *dw = p[1];
        for (int64_t j = 0; j < d; j++) dw[j] = 0.f;
        for (int t = 0; t < threads; t++)
            for (int64_t j = 0; j < d; j++) dw[j] += part[t * d + j];
        free(part);
    }
    Py_RETURN_NONE;
}

#else
QK_RUN_UNAVAILABLE("rmsnorm: built without x86-64 SIMD")
#endif

QK_FORWARD_BACKWARD(rmsnorm)
