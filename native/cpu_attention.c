/* kvpager._cpu_attention: paged attention on the CPU, reading a pool's blocks
 * where they lie.
 *
 * The NumPy twin (`kvpager.backends.numpy_backend.paged_attention`) is the
 * reference; this computes the same attention, in float32, for the pools of
 * the NumPy backend. The twin gathers each sequence's blocks into a copy and
 * runs a dozen NumPy calls over it; for a decode step those calls' fixed
 * costs, not the arithmetic, were the time.
 *
 * Work is split by (sequence, kv head). A task walks its sequence's keys in
 * chunks of whole blocks (about 256 tokens), with an online softmax across
 * chunks (a running max and sum per query row). Its query rows run RB at a
 * time: each key's K row and each V row is read once for the RB rows, in
 * vectors of 16 floats (GCC / Clang vector extensions; `task` is built for
 * AVX-512, AVX2 and the baseline on x86-64 and runs the widest the CPU has).
 * Tasks run on up to ``threads`` threads, the GIL released.
 *
 * Arrays arrive through the buffer protocol (no NumPy headers). Each is
 * checked for its item size, C-contiguity and shape, and every block id to be
 * read is bounds-checked before any task runs, so a wrong call raises and
 * writes nothing.
 *
 * Storage (``kind``): 0 float32, 1 bfloat16 (the high half of a float32),
 * 2 any 2-byte float through ``lut`` (float16: 65,536 entries), 3 any 1-byte
 * float through ``lut`` (FP8: 256 entries); K and V times the pool's
 * ``scales`` if given. head_dim must be a multiple of 16.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static void release(Buf *b) {
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

/* ``obj``'s buffer (None: not held, if ``optional``): C-contiguous, ``ndim``
 * dimensions, items of ``itemsize`` bytes (0: any); writable if asked. */
static int get(PyObject *obj, Buf *b, int ndim, Py_ssize_t itemsize, int writable, int optional,
               const char *name) {
    b->held = 0;
    if (optional && obj == Py_None) {
        return 0;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        return -1;
    }
    b->held = 1;
    if (b->view.ndim != ndim || (itemsize && b->view.itemsize != itemsize)) {
        PyErr_Format(PyExc_TypeError, "cpu attention: %s: expected %d-d items of %zd bytes, got %d-d of %zd",
                     name, ndim, itemsize, b->view.ndim, b->view.itemsize);
        release(b);
        return -1;
    }
    return 0;
}

/* One call's arguments, read-only to the tasks. */
typedef struct {
    const uint8_t *kv;
    Py_ssize_t blocks, layers, heads, block_size, head_dim, item;
    int kind;
    const float *lut; /* kinds 2 and 3 */
    Py_ssize_t layer;
    const float *q; /* [tokens, q heads, head_dim] */
    float *out;     /* same shape */
    Py_ssize_t q_heads, group;
    const int32_t *tables;
    Py_ssize_t width;
    const int64_t *seq_lens, *query_lens, *starts; /* starts: each sequence's first query row */
    Py_ssize_t seqs;
    float scale, softcap;
    int64_t window;         /* 0: none */
    const float *scales;    /* [layers, 2, heads] or NULL */
    const float *sinks;     /* [q heads] or NULL */
    Py_ssize_t max_rows;    /* the most query rows of one task */
} Call;

/* 16 floats: one AVX-512 register, two AVX ones, four SSE ones (GCC and Clang
 * vector extensions; the build's target picks the instructions). */
typedef float vf __attribute__((vector_size(64), aligned(64)));
typedef int32_t vi __attribute__((vector_size(64), aligned(64)));
/* the same, at any float's address */
typedef float vfu __attribute__((vector_size(64), aligned(4), may_alias));
#define W 16
#define RB 4 /* query rows run together over one chunk of K/V */
#define XB 4 /* vectors of head dims accumulated together */

static inline __attribute__((always_inline)) vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

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
    v += SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

typedef uint16_t vhu __attribute__((vector_size(32), aligned(2), may_alias));

/* W stored values at ``p`` as float32: float32 as is, bfloat16 as the high
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

/* Scratch of one thread: the scores of RB rows over a chunk [RB][chunk], per
 * query row its running max, sum and output [max_rows][head_dim], its scaled
 * query [RB][head_dim], the chunk's block addresses (K and V of the head), and
 * for kinds 2 and 3 the chunk's K and V converted to float32. */
typedef struct {
    float *s, *m, *l, *acc, *q, *conv;
    const uint8_t **kp, **vp;
    Py_ssize_t chunk; /* tokens, whole blocks */
} Scratch;

static float *aligned(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(float) * (n ? n : 1)) == 0 ? p : NULL;
}

static int scratch_alloc(Scratch *w, const Call *c) {
    const Py_ssize_t bs = c->block_size, d = c->head_dim, r = c->max_rows > 0 ? c->max_rows : 1;
    Py_ssize_t chunk = (256 + bs - 1) / bs * bs; /* 256 tokens or one block */
    w->chunk = chunk;
    const Py_ssize_t blocks = chunk / bs;
    w->s = aligned((size_t)(RB * chunk));
    w->m = aligned((size_t)r);
    w->l = aligned((size_t)r);
    w->acc = aligned((size_t)(r * d));
    w->q = aligned((size_t)(RB * d));
    w->conv = c->kind >= 2 ? aligned((size_t)(2 * chunk * d)) : NULL;
    w->kp = malloc(sizeof(*w->kp) * (size_t)blocks);
    w->vp = malloc(sizeof(*w->vp) * (size_t)blocks);
    return w->s && w->m && w->l && w->acc && w->q && (c->kind < 2 || w->conv) && w->kp && w->vp ? 0 : -1;
}

static void scratch_free(Scratch *w) {
    free(w->s);
    free(w->m);
    free(w->l);
    free(w->acc);
    free(w->q);
    free(w->conv);
    free(w->kp);
    free(w->vp);
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

/* Rows [r0, r0 + nr) of a task against the chunk of keys [k0, k0 + cnt)
 * (``locate`` done). ``bf16``: the blocks hold bfloat16, else float32 (the
 * item size ``item`` is 2 or 4). K's scale is in the queries, V's is applied
 * at the end. */
static inline __attribute__((always_inline)) void rows_chunk(const Call *c, Scratch *w, Py_ssize_t b,
                                                              Py_ssize_t h, Py_ssize_t r0, int nr, int64_t k0,
                                                              Py_ssize_t cnt, int bf16) {
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
        for (Py_ssize_t x = 0; x < d; x++) w->q[i * d + x] = qr[x] * (c->scale * kmul);
    }
    if (t0 >= t1) return;
    const Py_ssize_t cs = w->chunk;
    /* scores: each key's row of K read once for the nr rows (named
     * accumulators: an array of them went to the stack); the next block's K
     * is prefetched, blocks lying anywhere in the pool */
    const float *q0 = w->q, *q1 = w->q + d, *q2 = w->q + 2 * d, *q3 = w->q + 3 * d;
    float *s0 = w->s, *s1 = w->s + cs, *s2 = w->s + 2 * cs, *s3 = w->s + 3 * cs;
    const Py_ssize_t row_bytes = d * item;
    for (Py_ssize_t t = t0; t < t1; t++) {
        if (t % bs == 0 || t == t0) {
            const Py_ssize_t next = t / bs + 1;
            if (next * bs < t1)
                for (Py_ssize_t off = 0; off < bs * row_bytes; off += 64) __builtin_prefetch(w->kp[next] + off);
        }
        const uint8_t *k = w->kp[t / bs] + (t % bs) * row_bytes;
        vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (Py_ssize_t x = 0; x < d; x += W) {
            const vf kv = load(bf16, k + x * item);
            a0 += *(const vfu *)(q0 + x) * kv;
            if (nr > 1) a1 += *(const vfu *)(q1 + x) * kv;
            if (nr > 2) a2 += *(const vfu *)(q2 + x) * kv;
            if (nr > 3) a3 += *(const vfu *)(q3 + x) * kv;
        }
        s0[t] = hsum(a0);
        if (nr > 1) s1[t] = hsum(a1);
        if (nr > 2) s2[t] = hsum(a2);
        if (nr > 3) s3[t] = hsum(a3);
    }
    float alpha[RB];
    for (int i = 0; i < nr; i++) {
        float *s = w->s + i * cs;
        const Py_ssize_t r = r0 + i;
        for (Py_ssize_t t = t0; t < ta[i]; t++) s[t] = 0.0f;
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
        for (; t + W <= te[i]; t += W) {
            const vf y = *(const vfu *)(s + t);
            vtop = pick(y > vtop, y, vtop);
        }
        float top = vtop[0];
        for (int u = 1; u < W; u++) top = vtop[u] > top ? vtop[u] : top;
        for (; t < te[i]; t++) top = s[t] > top ? s[t] : top;
        vf vsum = splat(0.0f);
        for (t = ta[i]; t + W <= te[i]; t += W) {
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
    /* outputs: each key's row of V read once for the nr rows, XB vectors of
     * dims at a time (RB x XB accumulators stay in registers) */
    for (Py_ssize_t x0 = 0; x0 < d; x0 += XB * W) {
        const int xb = d - x0 >= XB * W ? XB : (int)((d - x0) / W);
        vf o[RB][XB];
        for (int i = 0; i < nr; i++) {
            for (int u = 0; u < xb; u++) {
                o[i][u] = *(const vfu *)(w->acc + (r0 + i) * d + x0 + u * W) * splat(alpha[i]);
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
                const vf v = load(bf16, vrow + u * W * item);
                for (int i = 0; i < nr; i++) o[i][u] += p[i] * v;
            }
        }
        for (int i = 0; i < nr; i++)
            for (int u = 0; u < xb; u++) *(vfu *)(w->acc + (r0 + i) * d + x0 + u * W) = o[i][u];
    }
}

/* The rows of a task over one chunk, in groups of RB (the group's size a
 * constant in each call, so its loops unroll). */
static inline __attribute__((always_inline)) void chunk_rows(const Call *c, Scratch *w, Py_ssize_t b,
                                                              Py_ssize_t h, Py_ssize_t rows, int64_t k0,
                                                              Py_ssize_t cnt, int bf16) {
    Py_ssize_t r0 = 0;
    for (; r0 + RB <= rows; r0 += RB) rows_chunk(c, w, b, h, r0, RB, k0, cnt, bf16);
    switch (rows - r0) {
    case 3: rows_chunk(c, w, b, h, r0, 3, k0, cnt, bf16); break;
    case 2: rows_chunk(c, w, b, h, r0, 2, k0, cnt, bf16); break;
    case 1: rows_chunk(c, w, b, h, r0, 1, k0, cnt, bf16); break;
    default: break;
    }
}

/* The (sequence ``b``, kv head ``h``) task: every query row of the head's group.
 * Built for AVX-512, AVX2 and the baseline; the loader picks the widest the
 * CPU has (x86-64 with GCC; elsewhere the compiler's target as it is). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void task(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h) {
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

typedef struct {
    const Call *call;
    Py_ssize_t first, step; /* this worker's tasks: first, first + step, ... */
    int failed;
} Worker;

static void *work(void *arg) {
    Worker *wk = arg;
    const Call *c = wk->call;
    Scratch w;
    if (scratch_alloc(&w, c) < 0) {
        scratch_free(&w);
        wk->failed = 1;
        return NULL;
    }
    const Py_ssize_t tasks = c->seqs * c->heads;
    for (Py_ssize_t i = wk->first; i < tasks; i += wk->step) {
        Py_ssize_t b = i / c->heads, h = i % c->heads;
        if (c->query_lens[b] > 0) task(c, &w, b, h);
    }
    scratch_free(&w);
    return NULL;
}

#define MAX_THREADS 64

/* attend(kv, kind, lut, layer, q, tables, seq_lens, query_lens, out, scale,
 *        window, softcap, scales, sinks, threads) -> None */
static PyObject *attend(PyObject *self, PyObject *args) {
    PyObject *kv_o, *lut_o, *q_o, *tab_o, *sl_o, *ql_o, *out_o, *sc_o, *sk_o;
    int kind, threads;
    Py_ssize_t layer;
    long long window;
    float scale, softcap;
    if (!PyArg_ParseTuple(args, "OiOnOOOOOfLfOOi", &kv_o, &kind, &lut_o, &layer, &q_o, &tab_o, &sl_o, &ql_o,
                          &out_o, &scale, &window, &softcap, &sc_o, &sk_o, &threads)) {
        return NULL;
    }
    static const Py_ssize_t items[] = {4, 2, 2, 1};
    if (kind < 0 || kind > 3) {
        PyErr_Format(PyExc_ValueError, "cpu attention: unknown storage kind %d", kind);
        return NULL;
    }
    Buf kv = {0}, lut = {0}, q = {0}, tab = {0}, sl = {0}, ql = {0}, out = {0}, sc = {0}, sk = {0};
    PyObject *result = NULL;
    int64_t *starts = NULL;
    if (get(kv_o, &kv, 6, items[kind], 0, 0, "kv") < 0 || get(lut_o, &lut, 1, 4, 0, kind < 2, "lut") < 0 ||
        get(q_o, &q, 3, 4, 0, 0, "q") < 0 || get(tab_o, &tab, 2, 4, 0, 0, "tables") < 0 ||
        get(sl_o, &sl, 1, 8, 0, 0, "seq_lens") < 0 || get(ql_o, &ql, 1, 8, 0, 0, "query_lens") < 0 ||
        get(out_o, &out, 3, 4, 1, 0, "out") < 0 || get(sc_o, &sc, 3, 4, 0, 1, "scales") < 0 ||
        get(sk_o, &sk, 1, 4, 0, 1, "sinks") < 0) {
        goto done;
    }
    Call c = {0};
    const Py_ssize_t *ks = kv.view.shape;
    c.kv = kv.view.buf;
    c.blocks = ks[0], c.layers = ks[1], c.heads = ks[3], c.block_size = ks[4], c.head_dim = ks[5];
    c.item = items[kind], c.kind = kind, c.layer = layer;
    c.lut = lut.held ? lut.view.buf : NULL;
    c.q = q.view.buf, c.out = out.view.buf;
    c.q_heads = q.view.shape[1];
    c.tables = tab.view.buf, c.width = tab.view.shape[1];
    c.seq_lens = sl.view.buf, c.query_lens = ql.view.buf, c.seqs = sl.view.shape[0];
    c.scale = scale, c.softcap = softcap, c.window = window > 0 ? window : 0;
    c.scales = sc.held ? sc.view.buf : NULL, c.sinks = sk.held ? sk.view.buf : NULL;
    if (ks[2] != 2 || layer < 0 || layer >= c.layers || c.heads <= 0 || c.block_size <= 0 ||
        c.head_dim <= 0 || c.head_dim % W != 0 || c.q_heads % c.heads != 0 || q.view.shape[2] != c.head_dim) {
        PyErr_SetString(PyExc_ValueError, "cpu attention: kv, layer and q do not agree (head_dim a multiple of 16)");
        goto done;
    }
    c.group = c.q_heads / c.heads;
    for (int i = 0; i < 3; i++) {
        if (out.view.shape[i] != q.view.shape[i]) {
            PyErr_SetString(PyExc_ValueError, "cpu attention: out must have q's shape");
            goto done;
        }
    }
    if (ql.view.shape[0] != c.seqs || tab.view.shape[0] != c.seqs) {
        PyErr_SetString(PyExc_ValueError, "cpu attention: tables, seq_lens, query_lens disagree in length");
        goto done;
    }
    if ((lut.held && lut.view.shape[0] != (kind == 2 ? 65536 : 256)) ||
        (sc.held && (sc.view.shape[0] != c.layers || sc.view.shape[1] != 2 || sc.view.shape[2] != c.heads)) ||
        (sk.held && sk.view.shape[0] != c.q_heads)) {
        PyErr_SetString(PyExc_ValueError, "cpu attention: lut, scales or sinks have the wrong shape");
        goto done;
    }
    starts = malloc(sizeof(int64_t) * (size_t)(c.seqs + 1));
    if (!starts) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t total = 0, most = 0;
    for (Py_ssize_t b = 0; b < c.seqs; b++) {
        int64_t n = c.seq_lens[b], m = c.query_lens[b];
        if (m < 0 || n < m || (n > 0 && (n - 1) / c.block_size >= c.width)) {
            PyErr_Format(PyExc_ValueError, "cpu attention: sequence %zd has %lld tokens, %lld queries", b,
                         (long long)n, (long long)m);
            goto done;
        }
        starts[b] = total;
        total += m;
        if (m > 0) {
            if (m > most) most = m;
            int64_t lo = 0;
            if (c.window > 0 && n - m - c.window + 1 > 0) lo = n - m - c.window + 1;
            for (int64_t blk = lo / c.block_size; blk * c.block_size < n; blk++) {
                int32_t id = c.tables[b * c.width + blk];
                if (id < 0 || id >= c.blocks) {
                    PyErr_Format(PyExc_IndexError, "cpu attention: block %d out of range", (int)id);
                    goto done;
                }
            }
        }
    }
    if (total != q.view.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "cpu attention: query_lens must sum to q's rows");
        goto done;
    }
    c.starts = starts, c.max_rows = (Py_ssize_t)(most * c.group);
    Py_ssize_t tasks = c.seqs * c.heads;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > tasks) threads = tasks > 0 ? (int)tasks : 1;
    Worker workers[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started = 0, failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    for (int i = 0; i < threads; i++) workers[i] = (Worker){&c, i, threads, 0};
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[i], NULL, work, &workers[i]) != 0) {
            /* fewer threads: this one takes the tasks of the ones not started */
            for (int j = i; j < threads; j++) workers[j].failed = 2;
            break;
        }
        started = i;
    }
    work(&workers[0]);
    for (int i = 1; i <= started; i++) pthread_join(ids[i], NULL);
    for (int i = 1; i < threads; i++) {
        if (workers[i].failed == 2) {
            workers[i].failed = 0;
            work(&workers[i]);
        }
    }
    for (int i = 0; i < threads; i++) failed |= workers[i].failed;
    Py_END_ALLOW_THREADS;
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(starts);
    release(&kv);
    release(&lut);
    release(&q);
    release(&tab);
    release(&sl);
    release(&ql);
    release(&out);
    release(&sc);
    release(&sk);
    return result;
}

static PyMethodDef methods[] = {
    {"attend", attend, METH_VARARGS, "Paged attention over a CPU pool (see native/cpu_attention.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvpager._cpu_attention",
                                    "Paged attention on the CPU in C (kvpager.cpu_attention).", -1, methods};

PyMODINIT_FUNC PyInit__cpu_attention(void) { return PyModule_Create(&module); }
