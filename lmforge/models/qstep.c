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
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qkernel.h"

enum { ATTN_NORM, WQ, WK, WV, WO, FF_NORM, WGATE, WUP, WDOWN, KCACHE, VCACHE, PER_LAYER };

typedef struct {
    int64_t d, heads, kv, hd, ff, pos, max_len;
    int simd;
    float eps, scale;
} shape_t;

static void rmsnorm(const float *x, const float *g, int64_t d, float eps, float *out) {
    float ss = 0.f;
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * r * g[i];
}

/* x (n heads of hd) rotated in place: x cos + rotate_half(x) sin. */
static void rope(float *x, int64_t n, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < n; h++, x += hd)
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* out (heads, hd) = softmax(scale q K^T) V over the cache's first pos + 1 columns. */
static void attend(const float *q, const float *kc, const float *vc, const shape_t *s, float *out) {
    const int64_t group = s->heads / s->kv, len = s->pos + 1;
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < s->heads; h++) {
        const float *qh = q + h * s->hd, *k = kc + (h / group) * s->max_len * s->hd,
                    *v = vc + (h / group) * s->max_len * s->hd;
        float *p = malloc(sizeof(float) * (size_t)len), *o = out + h * s->hd, top = -INFINITY, sum = 0.f;
        if (!p) continue; /* the caller checks for NaN-free output; see py_decode_step */
        for (int64_t j = 0; j < len; j++) {
            float dot = 0.f;
            for (int64_t i = 0; i < s->hd; i++) dot += qh[i] * k[j * s->hd + i];
            p[j] = dot * s->scale;
            top = fmaxf(top, p[j]);
        }
        for (int64_t j = 0; j < len; j++) sum += (p[j] = expf(p[j] - top));
        for (int64_t i = 0; i < s->hd; i++) o[i] = 0.f;
        for (int64_t j = 0; j < len; j++) {
            const float w = p[j] / sum;
            for (int64_t i = 0; i < s->hd; i++) o[i] += w * v[j * s->hd + i];
        }
        free(p);
    }
}

static int64_t blocks_of(int64_t k) { return (k + QK - 1) / QK; }

/* y = x W^T for up to three weights side by side (their rows n1, n2, n3; 0 ends the list). */
static int product(float *y, const float *x, int64_t k, const shape_t *s, const uint8_t *w1, int64_t n1,
                   const uint8_t *w2, int64_t n2, const uint8_t *w3, int64_t n3) {
    const qseg segs[3] = {{w1, n1}, {w2, n2}, {w3, n3}};
    return qk_matmul(y, x, 1, k, blocks_of(k), 4, s->simd, segs, n3 ? 3 : n2 ? 2 : 1);
}

static int layer(float *x, int64_t *const t, const shape_t *s, const float *cos, const float *sin, float *work) {
    const int64_t d = s->d, nq = s->heads * s->hd, nk = s->kv * s->hd;
    float *h = work, *qkv = h + d, *att = qkv + nq + 2 * nk, *ff = att + nq, *y = ff + 2 * s->ff;
    float *kc = (float *)(intptr_t)t[KCACHE], *vc = (float *)(intptr_t)t[VCACHE];
    rmsnorm(x, (const float *)(intptr_t)t[ATTN_NORM], d, s->eps, h);
    if (product(qkv, h, d, s, (const uint8_t *)(intptr_t)t[WQ], nq, (const uint8_t *)(intptr_t)t[WK], nk,
                (const uint8_t *)(intptr_t)t[WV], nk)) return -1;
    rope(qkv, s->heads + s->kv, s->hd, cos, sin); /* the q heads, then the k heads */
    for (int64_t g = 0; g < s->kv; g++) {
        memcpy(kc + (g * s->max_len + s->pos) * s->hd, qkv + nq + g * s->hd, sizeof(float) * (size_t)s->hd);
        memcpy(vc + (g * s->max_len + s->pos) * s->hd, qkv + nq + nk + g * s->hd, sizeof(float) * (size_t)s->hd);
    }
    attend(qkv, kc, vc, s, att);
    if (product(y, att, nq, s, (const uint8_t *)(intptr_t)t[WO], d, NULL, 0, NULL, 0)) return -1;
    for (int64_t i = 0; i < d; i++) x[i] += y[i];
    rmsnorm(x, (const float *)(intptr_t)t[FF_NORM], d, s->eps, h);
    if (product(ff, h, d, s, (const uint8_t *)(intptr_t)t[WGATE], s->ff, (const uint8_t *)(intptr_t)t[WUP], s->ff,
                NULL, 0)) return -1;
    for (int64_t i = 0; i < s->ff; i++) ff[i] = ff[i] / (1.f + expf(-ff[i])) * ff[s->ff + i];
    if (product(y, ff, s->ff, s, (const uint8_t *)(intptr_t)t[WDOWN], d, NULL, 0, NULL, 0)) return -1;
    for (int64_t i = 0; i < d; i++) x[i] += y[i];
    return 0;
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
    const int64_t nq = s.heads * s.hd, nk = s.kv * s.hd;
    float *work = malloc(sizeof(float) * (size_t)(2 * s.d + 2 * nq + 2 * nk + 2 * s.ff + s.d));
    if (!work) return PyErr_NoMemory();
    int rc = 0;
    float *x = p[1];
    int64_t *table = p[2];
    Py_BEGIN_ALLOW_THREADS
    for (int64_t l = 0; l < v[0] && !rc; l++) rc = layer(x, table + l * PER_LAYER, &s, p[3], p[4], work);
    if (!rc) rmsnorm(x, p[5], s.d, s.eps, p[0]);
    Py_END_ALLOW_THREADS
    free(work);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
