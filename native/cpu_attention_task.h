/* The task of native/cpu_attention.c (see there), included once per
 * instruction set by native/cpu_attention_{avx512,avx2,base}.c, each under
 * its own target and with its own TASK name: its vector types, declared after
 * the target, take that target's registers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_attention.h"

/* VW floats, one register of the build's target (GCC and Clang vector
 * extensions): 16 for AVX-512, 8 for AVX2, 4 for the baseline (SSE2, NEON).
 * Vectors wider than the target's registers were lowered through the stack
 * (an AVX2 build of 16-float vectors ran no faster than SSE2 and 3x slower
 * than AVX-512). VXB: vectors of head dims one pass over V accumulates for
 * RB rows, RB x VXB of them held in registers (AVX-512 has 32, AVX2 and SSE 16).
 * W (cpu_attention.h) stays the scratch's padding, a multiple of every VW. */
#ifndef VW
#define VW 16
#endif
#ifndef VXB
#define VXB XB
#endif
typedef float vf __attribute__((vector_size(4 * VW), aligned(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW), aligned(4 * VW)));
/* the same, at any float's address */
typedef float vfu __attribute__((vector_size(4 * VW), aligned(4), may_alias));

static inline __attribute__((always_inline)) vf splat(float x) { return x - (vf){0}; }

/* Lanes of ``a`` where ``take`` is all ones, else of ``b`` (C has no vector ?:). */
static inline __attribute__((always_inline)) vf pick(vi take, vf a, vf b) { return (vf)(((vi)a & take) | ((vi)b & ~take)); }

/* e^x, 16 at a time: x = n ln2 + r, e^r by its degree-6 Taylor polynomial on
 * |r| <= ln2 / 2 (relative error under 2e-7), 2^n into the exponent bits.
 * x under -87.3 gives about 1e-38 (callers zero what must be zero); NaN stays NaN. */
static inline __attribute__((always_inline)) vf vexp(vf x) {
    const vf lo = splat(-87.3f), hi = splat(88.7f);
    x = pick(x < lo, lo, x); /* NaN compares false: it stays */
    x = pick(x > hi, hi, x);
    vf t = x * splat(1.44269504f);
    vf n = (t + splat(12582912.0f)) - splat(12582912.0f); /* round to nearest */
    vf r = x - n * splat(0.693145752f);
    r = r - n * splat(1.42860677e-6f);
    vf p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    return (vf)((vi)p + (__builtin_convertvector(n, vi) << 23));
}

/* The sum of a vector's lanes, by halves folded onto each other (shuffles:
 * taking its address would keep the vector out of registers). */
#if defined(__clang__)
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, (vi){__VA_ARGS__})
#endif
static inline __attribute__((always_inline)) float hsum(vf v) {
#if VW == 16
    v += SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#elif VW == 8
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
#elif VW == 4
    v += SHUFFLE(v, 2, 3, 0, 1);
    v += SHUFFLE(v, 1, 0, 3, 2);
#else
#error "VW must be 4, 8 or 16"
#endif
    return v[0];
}

typedef uint16_t vhu __attribute__((vector_size(2 * VW), aligned(2), may_alias));

/* VW stored values at ``p`` as float32: float32 as is, bfloat16 as the high
 * half of a float32 (kinds 2 and 3 were converted to float32 before). */
static inline __attribute__((always_inline)) vf load(int bf16, const uint8_t *p) {
    vf f;
    if (bf16) {
        f = (vf)(__builtin_convertvector(*(const vhu *)p, vi) << 16);
    } else {
            f = *(const vfu *)p;
        }
        return f;
    }

    /* Points kp / vp at the K and V of head h for the chunk's blocks, keys
     * [k0, k0 + cnt) of sequence b; kinds 2 and 3 are converted to float32 first. */
    static void locate(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h, int64_t k0, Py_ssize_t cnt) {
        const Py_ssize_t bs = c->block_size, d = c->head_dim;
        const Py_ssize_t head_stride = bs * d * c->item;
        const Py_ssize_t block_stride = c->layers * 2 * c->heads * head_stride;
        const Py_ssize_t layer_off = c->layer * 2 * c->heads * head_stride;
        for (Py_ssize_t t = 0, j = 0; t < cnt; t += bs, j++) {
            const uint8_t *base = c->kv + c->tables[b * c->width + (k0 + t) / bs] * block_stride + layer_off;
            w->kp[j] = base + h * head_stride;
            w->vp[j] = base + (c->heads + h) * head_stride;
            if (c->kind >= 2) {
                const Py_ssize_t n = (cnt - t < bs ? cnt - t : bs) * d;
                float *kf = w->conv + t * d, *vf_ = w->conv + (w->chunk + t) * d;
                if (c->kind == 2) {
                    const uint16_t *ks = (const uint16_t *)w->kp[j], *vs = (const uint16_t *)w->vp[j];
                    for (Py_ssize_t x = 0; x < n; x++) kf[x] = c->lut[ks[x]];
                    for (Py_ssize_t x = 0; x < n; x++) vf_[x] = c->lut[vs[x]];
                } else {
                    for (Py_ssize_t x = 0; x < n; x++) kf[x] = c->lut[w->kp[j][x]];
                    for (Py_ssize_t x = 0; x < n; x++) vf_[x] = c->lut[w->vp[j][x]];
                }
                w->kp[j] = (const uint8_t *)kf;
                w->vp[j] = (const uint8_t *)vf_;
            }
        }
    }

    /* The located chunk's K, ``cnt`` keys, transposed into kt [d][cpad] as
     * float32 (padding keys zero). */
    static inline __attribute__((always_inline)) void transpose_k(const Call *c, Scratch *w, Py_ssize_t cnt, int bf16) {
        const Py_ssize_t d = c->head_dim, bs = c->block_size, cp = w->cpad;
        for (Py_ssize_t t = 0; t < cnt; t += bs) {
            const Py_ssize_t n = cnt - t < bs ? cnt - t : bs;
            if (bf16) {
                const uint16_t *k = (const uint16_t *)w->kp[t / bs];
                for (Py_ssize_t x = 0; x < d; x++)
                    for (Py_ssize_t u = 0; u < n; u++) {
                        const uint32_t bits = (uint32_t)k[u * d + x] << 16;
                        memcpy(w->kt + x * cp + t + u, &bits, 4);
                    }
            } else {
                const float *k = (const float *)w->kp[t / bs];
                for (Py_ssize_t x = 0; x < d; x++)
                    for (Py_ssize_t u = 0; u < n; u++) w->kt[x * cp + t + u] = k[u * d + x];
            }
        }
        for (Py_ssize_t x = 0; x < d; x++)
            for (Py_ssize_t t = cnt; t < cp; t++) w->kt[x * cp + t] = 0.0f;
    }

    /* Rows [r0, r0 + nr) of a task against the chunk of keys [k0, k0 + cnt)
     * (``locate`` done). ``bf16``: the blocks hold bfloat16, else float32 (the
     * item size ``item`` is 2 or 4). The softmax scale and K's scale multiply
     * the scores after the dot products (folded into the queries, a large FP8 K
     * scale overflowed q * k's terms where the scores themselves are finite);
     * V's is applied at the end. */
    static inline __attribute__((always_inline)) void rows_chunk(const Call *c, Scratch *w, Py_ssize_t b,
                                                                  Py_ssize_t h, Py_ssize_t r0, int nr, int64_t k0,
                                                                  Py_ssize_t cnt, int bf16, int tr) {
        const Py_ssize_t d = c->head_dim, g = c->group, bs = c->block_size, item = bf16 ? 2 : 4;
        const int64_t first_pos = c->seq_lens[b] - c->query_lens[b];
        const float kmul = c->scales ? c->scales[(c->layer * 2 + 0) * c->heads + h] : 1.0f;
        Py_ssize_t ta[RB], te[RB], t0 = cnt, t1 = 0;
        for (int i = 0; i < nr; i++) {
            const int64_t pos = first_pos + (r0 + i) / g;
            int64_t a = k0, e = k0 + cnt;
            if (e > pos + 1) e = pos + 1;
            if (c->window > 0 && a < pos - c->window + 1) a = pos - c->window + 1;
            ta[i] = (Py_ssize_t)(a - k0);
            te[i] = (Py_ssize_t)(e - k0);
            if (ta[i] < te[i]) {
                t0 = ta[i] < t0 ? ta[i] : t0;
                t1 = te[i] > t1 ? te[i] : t1;
            }
            const float *qr = c->q + (c->starts[b] + (r0 + i) / g) * c->q_heads * d + (h * g + (r0 + i) % g) * d;
            for (Py_ssize_t x = 0; x < d; x++) w->q[i * d + x] = qr[x];
        }
        if (t0 >= t1) return;
        const float sk = c->scale * kmul;
        const Py_ssize_t cs = w->cpad;
        const float *q0 = w->q, *q1 = w->q + d, *q2 = w->q + 2 * d, *q3 = w->q + 3 * d;
        float *s0 = w->s, *s1 = w->s + cs, *s2 = w->s + 2 * cs, *s3 = w->s + 3 * cs;
        if (tr) {
            /* scores from K transposed: VW keys of a row are d products of a
             * broadcast query value and a vector of K */
            for (Py_ssize_t t = t0 / VW * VW; t < t1; t += VW) {
                vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
                for (Py_ssize_t x = 0; x < d; x++) {
                    const vf kv = *(const vf *)(w->kt + x * cs + t);
                    a0 += splat(q0[x]) * kv;
                    if (nr > 1) a1 += splat(q1[x]) * kv;
                    if (nr > 2) a2 += splat(q2[x]) * kv;
                    if (nr > 3) a3 += splat(q3[x]) * kv;
                }
                *(vf *)(s0 + t) = a0 * splat(sk);
                if (nr > 1) *(vf *)(s1 + t) = a1 * splat(sk);
                if (nr > 2) *(vf *)(s2 + t) = a2 * splat(sk);
                if (nr > 3) *(vf *)(s3 + t) = a3 * splat(sk);
            }
        } else {
        /* scores: each key's row of K read once for the nr rows (named
         * accumulators: an array of them went to the stack); the next block's K
         * is prefetched, blocks lying anywhere in the pool */
        const Py_ssize_t row_bytes = d * item;
        for (Py_ssize_t t = t0; t < t1; t++) {
            if (t % bs == 0 || t == t0) {
                const Py_ssize_t next = t / bs + 1;
                if (next * bs < t1)
                    for (Py_ssize_t off = 0; off < bs * row_bytes; off += 64) __builtin_prefetch(w->kp[next] + off);
            }
            const uint8_t *k = w->kp[t / bs] + (t % bs) * row_bytes;
            vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
            for (Py_ssize_t x = 0; x < d; x += VW) {
                const vf kv = load(bf16, k + x * item);
                a0 += *(const vfu *)(q0 + x) * kv;
                if (nr > 1) a1 += *(const vfu *)(q1 + x) * kv;
                if (nr > 2) a2 += *(const vfu *)(q2 + x) * kv;
                if (nr > 3) a3 += *(const vfu *)(q3 + x) * kv;
            }
            s0[t] = hsum(a0) * sk;
            if (nr > 1) s1[t] = hsum(a1) * sk;
            if (nr > 2) s2[t] = hsum(a2) * sk;
            if (nr > 3) s3[t] = hsum(a3) * sk;
        }
    }
    float alpha[RB];
    for (int i = 0; i < nr; i++) {
        float *s = w->s + i * cs;
        const Py_ssize_t r = r0 + i;
        /* only up to t1: a row whose window starts past this chunk (a prefill's rows of one
         * group straddling the chunk's end) has ta past it, and past its row of scores */
        for (Py_ssize_t t = t0; t < (ta[i] < t1 ? ta[i] : t1); t++) s[t] = 0.0f;
        for (Py_ssize_t t = te[i] > t0 ? te[i] : t0; t < t1; t++) s[t] = 0.0f;
        if (ta[i] >= te[i]) {
            alpha[i] = 1.0f;
            continue;
        }
        if (c->softcap > 0.0f)
            for (Py_ssize_t t = ta[i]; t < te[i]; t++) s[t] = c->softcap * tanhf(s[t] / c->softcap);
        /* max and sum with vector accumulators (a float chain waits on each add) */
        vf vtop = splat(w->m[r]);
        Py_ssize_t t = ta[i];
        for (; t + VW <= te[i]; t += VW) {
            const vf y = *(const vfu *)(s + t);
            vtop = pick(y > vtop, y, vtop);
        }
        float top = vtop[0];
        for (int u = 1; u < VW; u++) top = vtop[u] > top ? vtop[u] : top;
        for (; t < te[i]; t++) top = s[t] > top ? s[t] : top;
        vf vsum = splat(0.0f);
        for (t = ta[i]; t + VW <= te[i]; t += VW) {
            const vf y = vexp(*(const vfu *)(s + t) - splat(top));
            *(vfu *)(s + t) = y;
            vsum += y;
        }
        float sum = hsum(vsum);
        for (; t < te[i]; t++) {
            s[t] = expf(s[t] - top);
            sum += s[t];
        }
        alpha[i] = w->m[r] == -INFINITY ? 0.0f : expf(w->m[r] - top);
        w->l[r] = w->l[r] * alpha[i] + sum;
        w->m[r] = top;
    }
    /* outputs: each key's row of V read once for the nr rows, VXB vectors of
     * dims at a time (RB x VXB accumulators stay in registers) */
    for (Py_ssize_t x0 = 0; x0 < d; x0 += VXB * VW) {
        const int xb = d - x0 >= VXB * VW ? VXB : (int)((d - x0) / VW);
        vf o[RB][VXB];
        for (int i = 0; i < nr; i++) {
            for (int u = 0; u < xb; u++) {
                o[i][u] = *(const vfu *)(w->acc + (r0 + i) * d + x0 + u * VW) * splat(alpha[i]);
            }
        }
        for (Py_ssize_t t = t0; t < t1; t++) {
            if (x0 == 0 && (t % bs == 0 || t == t0)) {
                const Py_ssize_t next = t / bs + 1;
                if (next * bs < t1)
                    for (Py_ssize_t off = 0; off < bs * d * item; off += 64) __builtin_prefetch(w->vp[next] + off);
            }
            const uint8_t *vrow = w->vp[t / bs] + ((t % bs) * d + x0) * item;
            vf p[RB];
            for (int i = 0; i < nr; i++) p[i] = splat(w->s[i * cs + t]);
            for (int u = 0; u < xb; u++) {
                const vf v = load(bf16, vrow + u * VW * item);
                for (int i = 0; i < nr; i++) o[i][u] += p[i] * v;
            }
        }
        for (int i = 0; i < nr; i++)
            for (int u = 0; u < xb; u++) *(vfu *)(w->acc + (r0 + i) * d + x0 + u * VW) = o[i][u];
    }
}

/* The rows of a task over one chunk, in groups of RB (the group's size a
 * constant in each call, so its loops unroll). */
static inline __attribute__((always_inline)) void chunk_rows(const Call *c, Scratch *w, Py_ssize_t b,
                                                              Py_ssize_t h, Py_ssize_t rows, int64_t k0,
                                                              Py_ssize_t cnt, int bf16) {
    const int tr = rows >= TRANSPOSE_ROWS;
    if (tr) transpose_k(c, w, cnt, bf16);
    Py_ssize_t r0 = 0;
    for (; r0 + RB <= rows; r0 += RB) rows_chunk(c, w, b, h, r0, RB, k0, cnt, bf16, tr);
    switch (rows - r0) {
    case 3: rows_chunk(c, w, b, h, r0, 3, k0, cnt, bf16, tr); break;
    case 2: rows_chunk(c, w, b, h, r0, 2, k0, cnt, bf16, tr); break;
    case 1: rows_chunk(c, w, b, h, r0, 1, k0, cnt, bf16, tr); break;
    default: break;
    }
}

/* The (sequence ``b``, kv head ``h``) task: every query row of the head's group. */
void TASK(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h) {
    const Py_ssize_t bs = c->block_size, d = c->head_dim, g = c->group;
    const int64_t n = c->seq_lens[b], ql = c->query_lens[b];
    const Py_ssize_t rows = (Py_ssize_t)(g * ql);
    /* row r = i * g + j: query token i (position n - ql + i), q head h * g + j */
    for (Py_ssize_t r = 0; r < rows; r++) {
        w->m[r] = c->sinks ? c->sinks[h * g + r % g] : -INFINITY;
        w->l[r] = c->sinks ? 1.0f : 0.0f; /* the sink's own e^(sink - max) */
        memset(w->acc + r * d, 0, sizeof(float) * (size_t)d);
    }
    int64_t lo = 0; /* the first key any row can see */
    if (c->window > 0 && n - ql - c->window + 1 > 0) lo = n - ql - c->window + 1;
    for (int64_t k0 = lo / bs * bs; k0 < n; k0 += w->chunk) {
        const Py_ssize_t cnt = (Py_ssize_t)(n - k0 < w->chunk ? n - k0 : w->chunk);
        locate(c, w, b, h, k0, cnt);
        if (c->kind == 1)
            chunk_rows(c, w, b, h, rows, k0, cnt, 1);
        else
            chunk_rows(c, w, b, h, rows, k0, cnt, 0);
    }
    const float vmul = c->scales ? c->scales[(c->layer * 2 + 1) * c->heads + h] : 1.0f;
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *dst = c->out + (c->starts[b] + r / g) * c->q_heads * d + (h * g + r % g) * d;
        const float *o = w->acc + r * d;
        const float mul = vmul / w->l[r];
        for (Py_ssize_t x = 0; x < d; x++) dst[x] = o[x] * mul;
    }
}
