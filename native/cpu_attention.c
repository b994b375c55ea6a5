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
 * vectors of 16 floats (GCC / Clang vector extensions). A task of many rows
 * transposes each chunk's K once, so its scores need no sums across lanes.
 * The task (native/cpu_attention_task.h) is built three times, for AVX-512,
 * AVX2 and the baseline (native/cpu_attention_{avx512,avx2,base}.c); the
 * import picks the widest this CPU runs (``ISA``). Tasks run on up to
 * ``threads`` threads, the GIL released.
 *
 * Arrays arrive through the buffer protocol (no NumPy headers). Each is
 * checked for its item size, C-contiguity and shape, and every block id to be
 * read is bounds-checked before any task runs, so a wrong call raises and
 * writes nothing.
 *
 * Storage (``kind``): 0 float32, 1 bfloat16 (the high half of a float32),
 * 2 any 2-byte float through ``lut`` (float16: 65,536 entries), 3 any 1-byte
 * float through ``lut`` (FP8: 256 entries); K and V times the pool's
 * ``scales`` if given. head_dim must be a multiple of 4: one of 16 runs on
 * the widest build, one of 8 on AVX2 at most, others on the baseline build
 * (`task_for`: each build steps through head dims a register at a time).
 */
#include "cpu_attention.h"
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buffers.h"

/* ``obj``'s buffer as `get` takes it, or nothing held where ``optional`` and it is None. */
static int get_opt(PyObject *obj, Buf *b, int ndim, Py_ssize_t itemsize, int writable, int optional,
                   const char *name) {
    b->held = 0;
    if (optional && obj == Py_None) {
        return 0;
    }
    return get(obj, b, ndim, itemsize, writable, name);
}

static float *aligned(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(float) * (n ? n : 1)) == 0 ? p : NULL;
}

static int scratch_alloc(Scratch *w, const Call *c) {
    const Py_ssize_t bs = c->block_size, d = c->head_dim, r = c->max_rows > 0 ? c->max_rows : 1;
    Py_ssize_t chunk = (256 + bs - 1) / bs * bs; /* 256 tokens or one block */
    w->chunk = chunk;
    w->cpad = (chunk + W - 1) / W * W;
    const Py_ssize_t blocks = chunk / bs;
    w->s = aligned((size_t)(RB * w->cpad));
    w->kt = r >= TRANSPOSE_ROWS ? aligned((size_t)(d * w->cpad)) : NULL;
    w->m = aligned((size_t)r);
    w->l = aligned((size_t)r);
    w->acc = aligned((size_t)(r * d));
    w->q = aligned((size_t)(RB * d));
    w->conv = c->kind >= 2 ? aligned((size_t)(2 * chunk * d)) : NULL;
    w->kp = malloc(sizeof(*w->kp) * (size_t)blocks);
    w->vp = malloc(sizeof(*w->vp) * (size_t)blocks);
    return w->s && w->m && w->l && w->acc && w->q && (c->kind < 2 || w->conv) && (r < TRANSPOSE_ROWS || w->kt) &&
                   w->kp && w->vp
               ? 0
               : -1;
}

static void scratch_free(Scratch *w) {
    free(w->s);
    free(w->m);
    free(w->l);
    free(w->acc);
    free(w->q);
    free(w->conv);
    free(w->kt);
    free(w->kp);
    free(w->vp);
}

typedef struct {
    const Call *call;
    TaskFn task;            /* the build the call's head dim takes (`task_for`) */
    Py_ssize_t first, step; /* this worker's tasks: first, first + step, ... */
    int failed;
} Worker;

/* The widest build of the task this CPU runs (chosen at import). */
static TaskFn TASK = kvpager_task_base;

static const char *pick_task(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
        TASK = kvpager_task_avx512;
        return "avx512";
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        TASK = kvpager_task_avx2;
        return "avx2";
    }
#endif
    TASK = kvpager_task_base;
    return "base";
}

/* The widest build (TASK at most) whose registers step through ``d`` head dims
 * whole: AVX-512 takes multiples of 16, AVX2 of 8, the baseline build of 4. */
static TaskFn task_for(Py_ssize_t d) {
    if (d % 16 == 0 || TASK == kvpager_task_base) return TASK;
    return d % 8 == 0 ? kvpager_task_avx2 : kvpager_task_base;
}

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
        if (c->query_lens[b] > 0) wk->task(c, &w, b, h);
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
    if (get(kv_o, &kv, 6, items[kind], 0, "kv") < 0 || get_opt(lut_o, &lut, 1, 4, 0, kind < 2, "lut") < 0 ||
        get_floats(q_o, &q, 3, 0, "q") < 0 || get_ints(tab_o, &tab, 2, 4, 0, "tables") < 0 ||
        get_ints(sl_o, &sl, 1, 8, 0, "seq_lens") < 0 || get_ints(ql_o, &ql, 1, 8, 0, "query_lens") < 0 ||
        get_floats(out_o, &out, 3, 1, "out") < 0 || get_opt(sc_o, &sc, 3, 4, 0, 1, "scales") < 0 ||
        get_opt(sk_o, &sk, 1, 4, 0, 1, "sinks") < 0) {
        goto done;
    }
    /* (the optional float32 arrays: an int32 one of the same item size was read as floats) */
    if ((lut.held && of_codes(&lut, "f", "float32", "lut") < 0) ||
        (sc.held && of_codes(&sc, "f", "float32", "scales") < 0) ||
        (sk.held && of_codes(&sk, "f", "float32", "sinks") < 0)) {
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
        c.head_dim <= 0 || c.head_dim % 4 != 0 || c.q_heads % c.heads != 0 || q.view.shape[2] != c.head_dim) {
        PyErr_SetString(PyExc_ValueError, "cpu attention: kv, layer and q do not agree (head_dim a multiple of 4)");
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
    const TaskFn task = task_for(c.head_dim);
    for (int i = 0; i < threads; i++) workers[i] = (Worker){&c, task, i, threads, 0};
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

/* use(isa) -> None: runs that build of the task from now on (tests compare
 * every build the CPU can run); ValueError for a build the CPU lacks. */
static PyObject *use(PyObject *self, PyObject *args) {
    const char *isa;
    if (!PyArg_ParseTuple(args, "s", &isa)) return NULL;
    const char *best = pick_task();
    int rank_best = strcmp(best, "avx512") == 0 ? 2 : strcmp(best, "avx2") == 0 ? 1 : 0;
    int rank = strcmp(isa, "avx512") == 0 ? 2 : strcmp(isa, "avx2") == 0 ? 1 : strcmp(isa, "base") == 0 ? 0 : -1;
    if (rank < 0 || rank > rank_best) {
        PyErr_Format(PyExc_ValueError, "cpu attention: no %s build on this CPU (best: %s)", isa, best);
        return NULL;
    }
    TASK = rank == 2 ? kvpager_task_avx512 : rank == 1 ? kvpager_task_avx2 : kvpager_task_base;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"attend", attend, METH_VARARGS, "Paged attention over a CPU pool (see native/cpu_attention.c)."},
    {"use", use, METH_VARARGS, "use(isa): run the build for isa ('avx512', 'avx2', 'base'); for tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvpager._cpu_attention",
                                    "Paged attention on the CPU in C (kvpager.cpu_attention).", -1, methods};

PyMODINIT_FUNC PyInit__cpu_attention(void) {
    const char *isa = pick_task();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
