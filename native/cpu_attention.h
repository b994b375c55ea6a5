/* What native/cpu_attention.c and its per-ISA builds of the task
 * (native/cpu_attention_task.h) share: a call's arguments, a thread's scratch,
 * the tiling constants. No vector types here: each build declares its own
 * under its target. */
#ifndef KVPAGER_CPU_ATTENTION_H
#define KVPAGER_CPU_ATTENTION_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

#define W 16
#define RB 4 /* query rows run together over one chunk of K/V */
#define XB 4 /* vectors of head dims accumulated together */

/* Scratch of one thread: the scores of RB rows over a chunk [RB][cpad], per
 * query row its running max, sum and output [max_rows][head_dim], its scaled
 * query [RB][head_dim], the chunk's block addresses (K and V of the head), for
 * kinds 2 and 3 the chunk's K and V converted to float32, and for tasks of
 * many rows the chunk's K transposed [head_dim][cpad]. */
typedef struct {
    float *s, *m, *l, *acc, *q, *conv, *kt;
    const uint8_t **kp, **vp;
    Py_ssize_t chunk; /* tokens, whole blocks */
    Py_ssize_t cpad;  /* the chunk rounded up to whole vectors */
} Scratch;

/* Tasks of at least this many query rows transpose each chunk's K once, so
 * that a row's scores of W keys are d vector products, no sum across lanes. */
#define TRANSPOSE_ROWS 8

/* The (sequence b, kv head h) task: every query row of the head's group.
 * One build per instruction set (native/cpu_attention_*.c). */
typedef void (*TaskFn)(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h);
void kvpager_task_avx512(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h);
void kvpager_task_avx2(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h);
void kvpager_task_base(const Call *c, Scratch *w, Py_ssize_t b, Py_ssize_t h);

#endif
