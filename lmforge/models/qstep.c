/* One decoding step of a Llama-family decoder with 4-bit weights, for one sequence, in one call:
 * lmforge.generate.native's fast path. From Python, a step of a small model is mostly the cost
 * of calling ~150 small kernels one by one (dispatcher, wrapper code, thread wake-ups); here it
 * is the cost of its products (qk_matmul) and little else.
 *
 * For each layer, with x the token's hidden state (d):
 *   h = rmsnorm(x) g_attn;  q, k, v = h W_q^T, h W_k^T, h W_v^T           (one pass, three weights)
 *   q, k = rope(q), rope(k) at position pos (HF's rotate-half; cos, sin rows given by the caller)
 *   the cache's keys and values at pos = k, v;  a_h = softmax(scale q_h K_g^T) V_g  over 0..pos
 *     (query head h reads kv head g = h / (H / KV): GQA)
 *   x = x + a W_o^T
 *   h = rmsnorm(x) g_ff;  x = x + (silu(h W_gate^T) * h W_up^T) W_down^T
 * and last the final norm: out = rmsnorm(x) g_final (the caller applies its LM head).
 * The products quantise their input per block of 32 as every 4-bit product does (qkernel.c), so
 * the step computes what the same model's eager step computes, up to float summation order.
 *
 * One OpenMP parallel region runs the whole step: the products and the attention heads are
 * shared among its threads, the small serial pieces (norms, rotary, the cache write, SiLU,
 * residuals) run on one of them, each piece ending on a barrier. Its threads wait there
 * spinning, which costs less than starting a parallel region for each of ~150 pieces.
 */
#include "qkernel.h" /* first: it includes Python.h, which goes before the standard headers */
#include <math.h>
#include <stdlib.h>
#include <string.h>


enum { ATTN_NORM, WQ, WK, WV, WO, FF_NORM, WGATE, WUP, WDOWN, KCACHE, VCACHE, PER_LAYER };

typedef struct {
    int64_t d, heads, kv, hd, ff, pos, max_len;
    int simd;
    float eps, scale;
} shape_t;

void qk_rmsnorm(const float *x, const float *g, int64_t d, float eps, float *out) {
    float ss = 0.f;
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * r * g[i];
}

void qk_rope(float *x, int64_t n, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < n; h++, x += hd)
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

float qk_dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, s = 0.f;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 8; l++) s += acc[l];
    return s;
}

/* out (heads, hd) = softmax(scale q K^T) V over the cache's first pos + 1 columns; the heads
 * shared by the threads of the enclosing parallel region. p: heads x max_len scores. */
static void attend(const float *q, const float *kc, const float *vc, const shape_t *s, float *p, float *out) {
    const int64_t group = s->heads / s->kv, len = s->pos + 1;
#pragma omp for schedule(static)
    for (int64_t h = 0; h < s->heads; h++) {
        const float *qh = q + h * s->hd, *k = kc + (h / group) * s->max_len * s->hd,
                    *v = vc + (h / group) * s->max_len * s->hd;
        float *ph = p + h * s->max_len, *o = out + h * s->hd, top = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < len; j++) {
            ph[j] = qk_dot(qh, k + j * s->hd, s->hd) * s->scale;
            top = fmaxf(top, ph[j]);
        }
        for (int64_t j = 0; j < len; j++) sum += (ph[j] = expf(ph[j] - top));
        for (int64_t i = 0; i < s->hd; i++) o[i] = 0.f;
        for (int64_t j = 0; j < len; j++) {
            const float w = ph[j] / sum;
            for (int64_t i = 0; i < s->hd; i++) o[i] += w * v[j * s->hd + i];
        }
    }
}

/* The step's buffers, made before its parallel region (no allocation inside it). */
typedef struct {
    float *h, *qkv, *att, *ff, *y, *p, *dsx;
    int16_t *qx;
} work_t;

static const float *f32(int64_t p) { return (const float *)(intptr_t)p; }
static const uint8_t *u8(int64_t p) { return (const uint8_t *)(intptr_t)p; }

/* y = x W^T for up to three 4-bit weights side by side: x quantised by one thread, then the
 * products shared by all (each construct ends on a barrier). */
static void product(float *y, const float *x, int64_t k, const shape_t *s, const work_t *w, const uint8_t *w1,
                    int64_t n1, const uint8_t *w2, int64_t n2, const uint8_t *w3, int64_t n3) {
    const int64_t nb = (k + QK - 1) / QK;
    const qseg segs[3] = {{w1, n1}, {w2, n2}, {w3, n3}};
#pragma omp single
    qk_quantize(x, 1, k, nb, w->qx, w->dsx);
    qk_products(y, w->qx, w->dsx, 1, nb, 4, s->simd, segs, n3 ? 3 : n2 ? 2 : 1, NULL);
}

/* One layer, run by every thread of the step's parallel region. */
static void layer(float *x, const int64_t *t, const shape_t *s, const float *cos, const float *sin, const work_t *w) {
    const int64_t d = s->d, nq = s->heads * s->hd, nk = s->kv * s->hd;
    float *kc = (float *)(intptr_t)t[KCACHE], *vc = (float *)(intptr_t)t[VCACHE], *ff = w->ff;
#pragma omp single
    qk_rmsnorm(x, f32(t[ATTN_NORM]), d, s->eps, w->h);
    product(w->qkv, w->h, d, s, w, u8(t[WQ]), nq, u8(t[WK]), nk, u8(t[WV]), nk);
#pragma omp single
    {
        qk_rope(w->qkv, s->heads + s->kv, s->hd, cos, sin); /* the q heads, then the k heads */
        for (int64_t g = 0; g < s->kv; g++) {
            memcpy(kc + (g * s->max_len + s->pos) * s->hd, w->qkv + nq + g * s->hd, sizeof(float) * (size_t)s->hd);
            memcpy(vc + (g * s->max_len + s->pos) * s->hd, w->qkv + nq + nk + g * s->hd, sizeof(float) * (size_t)s->hd);
        }
    }
    attend(w->qkv, kc, vc, s, w->p, w->att);
    product(w->y, w->att, nq, s, w, u8(t[WO]), d, NULL, 0, NULL, 0);
#pragma omp single
    {
        for (int64_t i = 0; i < d; i++) x[i] += w->y[i];
        qk_rmsnorm(x, f32(t[FF_NORM]), d, s->eps, w->h);
    }
    product(ff, w->h, d, s, w, u8(t[WGATE]), s->ff, u8(t[WUP]), s->ff, NULL, 0);
#pragma omp single
    for (int64_t i = 0; i < s->ff; i++) ff[i] = ff[i] / (1.f + expf(-ff[i])) * ff[s->ff + i];
    product(w->y, ff, s->ff, s, w, u8(t[WDOWN]), d, NULL, 0, NULL, 0);
#pragma omp single
    for (int64_t i = 0; i < d; i++) x[i] += w->y[i];
}

/* decode_step(out, x, table, cos, sin, final_norm, n_layers, d, heads, kv, hd, ff, pos, max_len, simd, eps, scale):
 * x (d) the token's embedding, updated in place to the last layer's output; out (d) its final norm.
 * table (n_layers, 11) int64: each layer's pointers (attention norm, q, k, v, o, feed-forward norm,
 * gate, up, down, key cache, value cache; caches (kv, max_len, hd) float32). cos, sin (hd): position pos. */
PyObject *py_decode_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[6];
    int64_t v[9];
    const char *usage = "decode_step(out, x, table, cos, sin, final_norm, n_layers, d, heads, kv, hd, ff, pos, "
                        "max_len, simd, eps, scale)";
    if (nargs != 17) {
        PyErr_Format(PyExc_TypeError, "%s takes 17 arguments", usage);
        return NULL;
    }
    if (qk_read_args(args, 15, 15, usage, p, 6, v)) return NULL;
    const double eps = PyFloat_AsDouble(args[15]), scale = PyFloat_AsDouble(args[16]);
    if (PyErr_Occurred()) return NULL;
    const shape_t s = {v[1], v[2], v[3], v[4], v[5], v[6], v[7], (int)v[8], (float)eps, (float)scale};
    if (v[0] < 1 || s.d < 1 || s.kv < 1 || s.heads % s.kv || s.hd % 2 || s.pos < 0 || s.pos >= s.max_len) {
        PyErr_Format(PyExc_ValueError, "decode_step: n_layers=%lld heads=%lld kv=%lld hd=%lld pos=%lld max_len=%lld "
                     "do not fit", (long long)v[0], (long long)s.heads, (long long)s.kv, (long long)s.hd,
                     (long long)s.pos, (long long)s.max_len);
        return NULL;
    }
    const int64_t nq = s.heads * s.hd, nk = s.kv * s.hd, widest = s.ff > nq ? s.ff : nq;
    const int64_t nb = (widest > s.d ? widest : s.d) / QK + 1;
    float *buf = malloc(sizeof(float) * (size_t)(2 * s.d + 2 * nq + 2 * nk + 2 * s.ff + s.heads * s.max_len + 2 * nb));
    int16_t *qx = malloc(sizeof(int16_t) * (size_t)(nb * QK));
    if (!buf || !qx) {
        free(buf);
        free(qx);
        return PyErr_NoMemory();
    }
    work_t w = {.h = buf, .qkv = buf + s.d, .qx = qx};
    w.att = w.qkv + nq + 2 * nk;
    w.ff = w.att + nq;
    w.y = w.ff + 2 * s.ff;
    w.p = w.y + s.d;
    w.dsx = w.p + s.heads * s.max_len;
    float *x = p[1];
    const int64_t *table = p[2];
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        for (int64_t l = 0; l < v[0]; l++) layer(x, table + l * PER_LAYER, &s, p[3], p[4], &w);
#pragma omp single
        qk_rmsnorm(x, p[5], s.d, s.eps, p[0]);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    free(qx);
    Py_RETURN_NONE;
}
