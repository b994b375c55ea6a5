/* A step's shared prefixes (kvpager.cascade.find_shared_prefixes) in C, for
 * kvpager._native.
 *
 * cascade.find_shared_prefixes_numpy is the reference: this computes exactly
 * its segments, members, own starts and saved positions, in the same order.
 * Per level, each frontier entry (rows that share every column before ``col``;
 * level 0: every row from column 0) keeps its rows with a whole block at
 * ``col``, groups them by that block id (ascending id; a group's rows in
 * ascending order), and each group of at least ``min_members`` rows whose
 * common run of columns [col, end) (every member the same block, whole
 * blocks only) is at least ``min_blocks`` long becomes a segment; its group
 * is a frontier entry of the next level from ``end``. The NumPy version costs
 * a dozen array calls a group (120 us for 64 rows sharing one prompt, 530 us
 * for 256 rows in 8 groups on a 2-core VM), paid on every decode step whose
 * plan looks for a cascade; this walks the rows once a group.
 *
 * shared_prefixes(tables, seq_lens, query_lens, block_size, levels, min_members,
 *                 min_blocks, segments, members, own) -> (segments, members, levels, saved)
 * tables: int32 [B, W]; seq_lens: int32 [B]; query_lens: int32 [B] or None (one
 * query each: a decode step), a row's whole blocks those before the block of
 * its first query (at most W); segments: int32 [>= levels * B, 6] and
 * members: int32 [>= levels * B], written from the start; own: int32 [B],
 * written whole (0 for a row in no segment). Returns how many segment rows and
 * member rows were written, the levels that hold a segment, and the K/V
 * positions the cascade spares (a segment's (members - 1) * its positions).
 * Every argument is checked before anything is written, and the walk runs in
 * memory of its own: the outputs are written at its end, so arrays that
 * overlap (each other or the inputs) cannot steer it. */
#include "shared_prefixes.h"

#include <stdint.h>
#include <string.h>

#include "buffers.h"

#define FIELDS 6

/* A row's sort key: its block id at the column in the high word (mapped so that unsigned order is
 * the ids' signed order), the row in the low: distinct keys, ascending by id, then by row. */
static inline uint64_t row_key(int32_t id, int32_t row) {
    return ((uint64_t)((uint32_t)id ^ 0x80000000u) << 32) | (uint32_t)row;
}

static inline int32_t key_row(uint64_t key) { return (int32_t)(uint32_t)key; }

/* Sort ``a`` (n keys) ascending, ``tmp`` as scratch of n: a bottom-up merge sort. */
static void sort_keys(uint64_t *a, uint64_t *tmp, Py_ssize_t n) {
    uint64_t *src = a, *dst = tmp;
    for (Py_ssize_t width = 1; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                dst[k++] = src[i] <= src[j] ? src[i++] : src[j++];
            }
            while (i < mid) {
                dst[k++] = src[i++];
            }
            while (j < hi) {
                dst[k++] = src[j++];
            }
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) {
        memcpy(a, src, (size_t)n * sizeof(uint64_t));
    }
}

typedef struct {
    const int32_t *tab;
    const int64_t *full;
    Py_ssize_t width;
    int64_t block_size, min_members, min_blocks;
    int32_t *seg, *mem, *own;
    Py_ssize_t nseg, nmem;
    int64_t saved;
} Walk;

/* A row's whole blocks, at most the table's width. */
static inline int64_t whole(const Walk *w, int32_t row) {
    int64_t f = w->full[row];
    return f < w->width ? f : w->width;
}

/* The segments of one frontier entry (``rows``: n rows sharing every column before ``col``) at
 * ``level``, appended to w's segments and members. ``keys`` and ``tmp``: scratch of n. */
static void split(Walk *w, const int32_t *rows, Py_ssize_t n, int64_t col, int level, uint64_t *keys,
                  uint64_t *tmp) {
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (whole(w, rows[i]) > col) {
            keys[k++] = row_key(w->tab[rows[i] * w->width + col], rows[i]);
        }
    }
    if (k < w->min_members) {
        return;
    }
    Py_ssize_t sorted = 1;
    while (sorted < k && keys[sorted - 1] < keys[sorted]) {
        sorted++;
    }
    if (sorted < k) {  /* (one prompt shared by every row: its keys come in order already) */
        sort_keys(keys, tmp, k);
    }
    for (Py_ssize_t a = 0, b; a < k; a = b) {
        for (b = a + 1; b < k && (keys[b] >> 32) == (keys[a] >> 32); b++) {
        }
        if (b - a < w->min_members) {
            continue;
        }
        int32_t first = key_row(keys[a]);
        int64_t hi = whole(w, first);
        for (Py_ssize_t i = a + 1; i < b; i++) {
            int64_t f = whole(w, key_row(keys[i]));
            hi = f < hi ? f : hi;
        }
        /* the common run: each member's row against the first's, contiguous, up to the shortest run so far */
        const int32_t *lead = w->tab + first * w->width;
        int64_t end = hi;
        for (Py_ssize_t i = a + 1; i < b && end > col + 1; i++) {
            const int32_t *row = w->tab + key_row(keys[i]) * w->width;
            if (memcmp(row + col + 1, lead + col + 1, (size_t)(end - col - 1) * sizeof(int32_t)) == 0) {
                continue;  /* (the common case, whole runs alike: memcmp's wide compares) */
            }
            for (int64_t c = col + 1; c < end; c++) {
                if (row[c] != lead[c]) {
                    end = c;
                    break;
                }
            }
        }
        if (end - col < w->min_blocks) {
            continue;
        }
        int32_t *s = w->seg + w->nseg * FIELDS;
        s[0] = first;
        s[1] = (int32_t)(col * w->block_size);
        s[2] = (int32_t)(end * w->block_size);
        s[3] = (int32_t)w->nmem;
        s[4] = (int32_t)(b - a);
        s[5] = level;
        for (Py_ssize_t i = a; i < b; i++) {
            int32_t r = key_row(keys[i]);
            w->mem[w->nmem++] = r;
            w->own[r] = (int32_t)(end * w->block_size);
        }
        w->saved += (int64_t)(b - a - 1) * (end - col) * w->block_size;
        w->nseg++;
    }
}

PyObject *kvpager_shared_prefixes(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_tab, *o_lens, *o_qlens, *o_seg, *o_mem, *o_own;
    long long block_size, min_members, min_blocks;
    int levels;
    if (!PyArg_ParseTuple(args, "OOOLiLLOOO", &o_tab, &o_lens, &o_qlens, &block_size, &levels, &min_members,
                          &min_blocks, &o_seg, &o_mem, &o_own)) {
        return NULL;
    }
    Buf tab = {0}, lens = {0}, qlens = {0}, seg = {0}, mem = {0}, own = {0};
    PyObject *result = NULL;
    uint64_t *keys = NULL;
    if (get(o_tab, &tab, 2, 4, 0, "tables") < 0 || get(o_lens, &lens, 1, 4, 0, "seq_lens") < 0 ||
        get(o_seg, &seg, 2, 4, 1, "segments") < 0 || get(o_mem, &mem, 1, 4, 1, "members") < 0 ||
        get(o_own, &own, 1, 4, 1, "own") < 0) {
        goto done;
    }
    if (o_qlens != Py_None && get(o_qlens, &qlens, 1, 4, 0, "query_lens") < 0) {
        goto done;
    }
    if (signed_ints(&tab, "tables") < 0 || signed_ints(&lens, "seq_lens") < 0 ||
        (qlens.held && signed_ints(&qlens, "query_lens") < 0) || signed_ints(&seg, "segments") < 0 ||
        signed_ints(&mem, "members") < 0 || signed_ints(&own, "own") < 0) {
        goto done;
    }
    Py_ssize_t n = tab.view.shape[0], width = tab.view.shape[1];
    if (block_size < 1 || levels < 0 || levels > 64) {
        PyErr_SetString(PyExc_ValueError, "shared prefixes: block_size >= 1 and 0 <= levels <= 64");
        goto done;
    }
    if (lens.view.shape[0] != n || (qlens.held && qlens.view.shape[0] != n) || own.view.shape[0] != n ||
        seg.view.shape[1] != FIELDS) {
        PyErr_SetString(PyExc_ValueError, "shared prefixes: array shapes disagree");
        goto done;
    }
    /* (block_size first: a product past int32 must not wrap before the check) */
    if (block_size > INT32_MAX || (Py_ssize_t)levels * n > INT32_MAX ||
        (width > 0 && (long long)width > INT32_MAX / block_size)) {
        PyErr_SetString(PyExc_ValueError, "shared prefixes: positions or member rows past int32");
        goto done;
    }
    Py_ssize_t cap = (Py_ssize_t)levels * n;  /* each level's groups are disjoint sets of rows */
    if (seg.view.shape[0] < cap || mem.view.shape[0] < cap) {
        PyErr_SetString(PyExc_ValueError, "shared prefixes: segments and members need levels * rows");
        goto done;
    }
    /* Private memory for everything the walk reads back or writes (the caller's arrays are
     * written once at the end, so outputs that overlap each other or the inputs cannot feed
     * the walk): the sort's keys and its buffer, each row's whole blocks, the first level's
     * rows, own starts, segments, members. */
    size_t rows_n = (size_t)(n > 0 ? n : 1), cap_n = (size_t)(cap > 0 ? cap : 1);
    keys = PyMem_Malloc(rows_n * (2 * sizeof(uint64_t) + sizeof(int64_t) + 2 * sizeof(int32_t)) +
                        cap_n * (FIELDS + 1) * sizeof(int32_t));
    if (keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *full = (int64_t *)(keys + 2 * rows_n);
    int32_t *rows = (int32_t *)(full + rows_n);
    int32_t *own_at = rows + rows_n, *seg_at = own_at + rows_n, *mem_at = seg_at + cap_n * FIELDS;
    const int32_t *sl = lens.view.buf, *ql = qlens.held ? qlens.view.buf : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {  /* whole blocks before the block of the first query (floored) */
        int64_t before = (int64_t)sl[i] - (ql != NULL ? ql[i] : 1);
        full[i] = before >= 0 ? before / block_size : -((-before + block_size - 1) / block_size);
    }
    Walk w = {tab.view.buf, full, width, block_size, min_members, min_blocks, seg_at, mem_at, own_at, 0, 0, 0};
    memset(own_at, 0, (size_t)n * sizeof(int32_t));
    int used = 0;
    if (levels > 0 && n > 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            rows[i] = (int32_t)i;
        }
        split(&w, rows, n, 0, 0, keys, keys + n);
        Py_ssize_t begin = 0, end = w.nseg;
        used = end > 0;
        for (int level = 1; level < levels && end > begin; level++) {
            for (Py_ssize_t s = begin; s < end; s++) {
                const int32_t *e = w.seg + s * FIELDS;
                split(&w, w.mem + e[3], e[4], e[2] / block_size, level, keys, keys + n);
            }
            begin = end;
            end = w.nseg;
            used += end > begin;
        }
    }
    memcpy(own.view.buf, own_at, (size_t)n * sizeof(int32_t));
    memcpy(seg.view.buf, seg_at, (size_t)w.nseg * FIELDS * sizeof(int32_t));
    memcpy(mem.view.buf, mem_at, (size_t)w.nmem * sizeof(int32_t));
    result = Py_BuildValue("nniL", w.nseg, w.nmem, used, (long long)w.saved);
done:
    PyMem_Free(keys);
    release(&tab);
    release(&lens);
    release(&qlens);
    release(&seg);
    release(&mem);
    release(&own);
    return result;
}
