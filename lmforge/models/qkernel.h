/* What qkernel.c (the 4/8-bit products), qstep.c (a whole 4-bit decoding step), fstep.c (a whole
 * float32 decoding step), gelu.c (tanh-GELU for training), rowattn.c (attention over packed
 * rows), attend32.c and attend16.c (attention for training in float32 and bfloat16) and rmsnorm.c
 * (RMSNorm for training) share. */
#ifndef LMFORGE_QKERNEL_H
#define LMFORGE_QKERNEL_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { QK = 32, ROWS = 4, QSEG_MAX = 4 };

/* A packed weight (lmforge.models.qkernel.pack4 / pack8) and its number of output rows. */
typedef struct {
    const uint8_t *w;
    int64_t n;
} qseg;

/* y (rows, sum n) = x (rows, k) [W_1; ...]^T for up to QSEG_MAX weights of `bits` with nb blocks
 * of input each, in a parallel region of its own; 0, or -1 when out of memory. It is the two below. */
int qk_matmul(float *y, const float *x, int64_t rows, int64_t k, int64_t nb, int bits, int allow_simd,
              const qseg *segs, int nseg);

/* Each activation row x (rows, k) → its int16 codes qx (rows, nb, 32) and, per row, dx (nb) then sx (nb) in dsx. */
void qk_quantize(const float *x, int64_t rows, int64_t k, int64_t nb, int16_t *qx, float *dsx);

/* y (rows, sum n) from the quantised rows, as an OpenMP work-sharing loop over the weights' row
 * groups: inside a parallel region its threads share them (with a barrier at the end), outside
 * one the calling thread does all. wq: NULL, or the calling thread's nb x 4 x 32 int16 to widen
 * a group's codes into once for all rows (worth it for rows > 1). */
void qk_products(float *y, const int16_t *qx, const float *dsx, int64_t rows, int64_t nb, int bits, int allow_simd,
                 const qseg *segs, int nseg, int16_t *wq);

/* Integers from Python: np pointers (torch's data_ptr()) then want - np sizes; -1 and an exception on error. */
int qk_read_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage, void **p, int np,
                 int64_t *v);

/* fn(task, buf, ctx) for tasks 0 .. n - 1, shared among torch's OpenMP threads one at a time
 * (dynamic: heads of uneven cost), each thread with a 64-byte-aligned buffer of `bytes`, the GIL
 * released; 0, or -1 with MemoryError set when a buffer could not be had (attend32.c, attend16.c). */
int qk_each_task(int64_t n, size_t bytes, void (*fn)(int64_t task, char *buf, const void *ctx), const void *ctx);

/* The arguments of attend32.c's and attend16.c's attention for training (see attend16.c for the
 * layouts): q (B, H, T, hd) with strides (qb, qh, qt); k and v (B, H, S, hd) sharing (kb, kh, kt);
 * o, do and dq (ob, oh, ot); dk and dv (gb, gh, gt); an additive mask (null: none) with strides
 * (mb, mh, mt), bfloat16 when mask_bf; causal: query i sees keys 0 .. i (T = S). */
typedef struct {
    const void *q, *k, *v, *mask;
    int64_t B, H, T, S, hd, qb, qh, qt, kb, kh, kt, ob, oh, ot, mb, mh, mt, mask_bf, causal, gb, gh, gt;
    float scale;
} qk_attention;

enum { QK_ATTENTION_POINTERS = 11 };

/* Reads NAME_forward(o, lse, q, k, v, mask, B, H, T, S, hd, qb, qh, qt, kb, kh, kt, ob, oh, ot, mb,
 * mh, mt, mask_bf, causal, scale) or NAME_backward(dq, dk, dv, dmask, q, k, v, o, do, lse, mask, the
 * same sizes up to causal, gb, gh, gt, scale) into p (the pointers as listed, at most
 * QK_ATTENTION_POINTERS) and *a, and checks that the sizes fit: hd a multiple of hd_multiple,
 * strides even where `even` (bfloat16 pairs), T = S when causal. 0, or -1 with an exception set. */
int qk_attention_args(PyObject *const *args, Py_ssize_t nargs, int back, const char *name, int64_t hd_multiple,
                      int even, void **p, qk_attention *a);

/* qstep.c's pieces that fstep.c shares. out = x / sqrt(mean(x^2) + eps) * g: */
void qk_rmsnorm(const float *x, const float *g, int64_t d, float eps, float *out);
/* x (n heads of hd) rotated in place: x cos + rotate_half(x) sin (HF's rotate-half RoPE). */
void qk_rope(float *x, int64_t n, int64_t hd, const float *cos, const float *sin);
/* a . b in 8 running sums (a form compilers vectorise; one running sum is a chain they may not reorder). */
float qk_dot(const float *a, const float *b, int64_t n);

/* t rounded up to a multiple of 16 (the attention kernels' key tiles) */
static inline int64_t pad16(int64_t t) { return (t + 15) & ~(int64_t)15; }

/* Elements of float32 (bf = 0) or bfloat16 (bf = 1) arrays as float; bfloat16 rounded to nearest even. */
static inline float bf16_float(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t float_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

static inline float load1(const void *p, int64_t i, int bf) {
    return bf ? bf16_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, float v, int bf) {
    if (bf)
        ((uint16_t *)p)[i] = float_bf16(v);
    else
        ((float *)p)[i] = v;
}


/* run(args, nargs, back) for a file built without the SIMD its kernel needs: raises RuntimeError(MESSAGE) */
#define QK_RUN_UNAVAILABLE(MESSAGE)                                                              \
    static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int back) {                    \
        (void)args, (void)nargs, (void)back;                                                    \
        PyErr_SetString(PyExc_RuntimeError, MESSAGE);                                           \
        return NULL;                                                                            \
    }

/* py_NAME_forward and py_NAME_backward, the Python entries of a kernel with a forward and a
 * backward: the defining file's run(args, nargs, back) with back 0 and 1 */
#define QK_FORWARD_BACKWARD(NAME)                                                                \
    PyObject *py_##NAME##_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {    \
        (void)self;                                                                             \
        return run(args, nargs, 0);                                                             \
    }                                                                                           \
    PyObject *py_##NAME##_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {   \
        (void)self;                                                                             \
        return run(args, nargs, 1);                                                             \
    }

PyObject *py_float_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_gather_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_decode_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_gelu_tanh(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_attend_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_attend32_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_attend32_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_rmsnorm_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_rmsnorm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_attend16_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_attend16_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
#endif
