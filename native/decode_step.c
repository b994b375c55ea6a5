/* kvpager._native: the allocator's decode step (one token for each sequence of
 * a batch) as two loops over the batch's rows, for `kvpager.seq_append`.
 *
 * The NumPy path in seq_append._decode is the reference; this module computes
 * exactly the same state change, in one call for a step where no row crosses
 * a block boundary (15 of 16 steps of a synchronised batch) and two where
 * some do (the caller takes the blocks in between). A step where some row
 * writes into a shared last block (copy-on-write, once after a fork) is
 * declined: the NumPy path decides which sharers copy for the whole batch. It exists because a
 * daemon's decode step is a dozen NumPy calls on a few hundred rows, each
 * costing a microsecond or more of fixed overhead: one C call replaces them.
 *
 * Arrays arrive through the buffer protocol (no NumPy headers): every one is
 * checked for its item size and C-contiguity, and every index it reads is
 * bounds-checked, so a wrong call raises instead of touching memory it must
 * not. State is written only after every check of a call has passed.
 *
 * row_data: int64 [rows, columns]; column 0 the number of blocks, column 1 the
 * token count, column `c_last` the row's last block id (seq_lookup.COLUMNS).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "block_keys.h"
#include "buffers.h"
#include "plan_slots.h"
#include "shared_prefixes.h"

#define ROWS(b) ((b).view.ndim ? (b).view.shape[0] : 0)

/* Whether a row of ``tokens`` needs a new block for its next token: at a block boundary. */
static inline int needs_block(int64_t tokens, int64_t mask) { return (tokens & mask) == 0; }

/* Whether a row of ``tokens`` whose last block is ``last`` would write into that
 * block while it is shared: a copy-on-write (or, for the last of its sharers in
 * the batch, a write in place), which the NumPy path decides for the whole batch. */
static inline int shared_write(int64_t tokens, int64_t mask, int64_t last, const int32_t *ref_cnt) {
    return (tokens & mask) != 0 && ref_cnt[last] > 1;
}

/* Shared argument checks of both calls: ``rows`` index ``row_data``, each at
 * most once, and a row's last block and token count are in range. A row given
 * twice would step twice: place's checks (the table's width, the count of new
 * blocks) see each row once, so its second step wrote past the table and read
 * past ``new``. */
static int check_rows(const int64_t *rows, Py_ssize_t n, const int64_t *data, Py_ssize_t nrows,
                      Py_ssize_t ncols, Py_ssize_t c_last, Py_ssize_t nblocks) {
    if (c_last < 2 || c_last >= ncols) {
        PyErr_SetString(PyExc_IndexError, "decode step: last-block column out of range");
        return -1;
    }
    uint8_t *seen = PyMem_Calloc((size_t)nrows / 8 + 1, 1);
    if (seen == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int status = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r = rows[i];
        if (r < 0 || r >= nrows) {
            PyErr_Format(PyExc_IndexError, "decode step: row %lld out of range", (long long)r);
            status = -1;
            break;
        }
        if (seen[r >> 3] & (1u << (r & 7))) {
            PyErr_Format(PyExc_ValueError, "decode step: row %lld given twice", (long long)r);
            status = -1;
            break;
        }
        seen[r >> 3] |= (uint8_t)(1u << (r & 7));
        const int64_t *d = data + r * ncols;
        if (d[c_last] < 0 || d[c_last] >= nblocks || d[1] < 0) {
            PyErr_Format(PyExc_IndexError, "decode step: row %lld has last block %lld, %lld tokens",
                         (long long)r, (long long)d[c_last], (long long)d[1]);
            status = -1;
            break;
        }
    }
    PyMem_Free(seen);
    return status;
}

/* scan(rows, row_data, c_last, ref_cnt, cached, shift, slots, old_tokens)
 *   -> (needs, widest)
 *
 * needs: how many rows need a block (at a block boundary); -1 if some row
 * writes into a shared, partly filled last block (copy-on-write: which of its
 * sharers copy depends on the whole batch, see seq_append._in_place) or in
 * place into a last block that is still published (un-published first): the
 * caller takes the NumPy path for those, rare, steps. widest: the largest
 * block column a needing row writes (-1 if none; undefined with -1).
 *
 * When needs is 0 the step is done here: ``slots`` (int64 [n]) holds each
 * row's slot and every row's token count went up by one. Otherwise nothing
 * changed. ``old_tokens`` (int64 [n] or None) receives the counts before the
 * step in both cases (not with -1: the scan stops at the first such row). ``cached`` (bool [blocks]) or None when nothing is
 * published. */
static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_data, *o_ref, *o_cached, *o_slots, *o_old;
    Py_ssize_t c_last;
    int shift;
    if (!PyArg_ParseTuple(args, "OOnOOiOO", &o_rows, &o_data, &c_last, &o_ref, &o_cached, &shift, &o_slots,
                          &o_old)) {
        return NULL;
    }
    Buf rows = {0}, data = {0}, ref = {0}, cached = {0}, slots = {0}, old = {0};
    PyObject *result = NULL;
    if (shift < 0 || shift > 30) {
        PyErr_SetString(PyExc_ValueError, "decode step: shift out of range");
        return NULL;
    }
    if (get_ints(o_rows, &rows, 1, 8, 0, "rows") < 0 || get_ints(o_data, &data, 2, 8, 1, "row_data") < 0 ||
        get_ints(o_ref, &ref, 1, 4, 0, "ref_cnt") < 0 || get_ints(o_slots, &slots, 1, 8, 1, "slots") < 0) {
        goto done;
    }
    if (o_cached != Py_None && get(o_cached, &cached, 1, 1, 0, "cached") < 0) {
        goto done;
    }
    if (o_old != Py_None && get_ints(o_old, &old, 1, 8, 1, "old_tokens") < 0) {
        goto done;
    }
    Py_ssize_t n = ROWS(rows), ncols = data.view.shape[1], nblocks = ROWS(ref);
    if (ROWS(slots) != n || (old.held && ROWS(old) != n) || (cached.held && ROWS(cached) != nblocks)) {
        PyErr_SetString(PyExc_ValueError, "decode step: array lengths disagree");
        goto done;
    }
    const int64_t *r = rows.view.buf;
    int64_t *d = data.view.buf;
    const int32_t *rc = ref.view.buf;
    const uint8_t *pub = cached.held ? cached.view.buf : NULL;
    int64_t *out = slots.view.buf, *prev = old.held ? old.view.buf : NULL;
    if (check_rows(r, n, d, data.view.shape[0], ncols, c_last, nblocks) < 0) {
        goto done;
    }
    const int64_t mask = ((int64_t)1 << shift) - 1;
    Py_ssize_t needs = 0;
    int64_t widest = -1;
    int fallback = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t *row = d + r[i] * ncols;
        int64_t nt = row[1], last = row[c_last];
        if (prev) {
            prev[i] = nt;
        }
        if (needs_block(nt, mask)) {
            needs++;
            if ((nt >> shift) > widest) {
                widest = nt >> shift;
            }
        } else if (shared_write(nt, mask, last, rc) || (pub && pub[last])) {
            fallback = 1;
            break;
        }
    }
    if (fallback) {
        result = Py_BuildValue("(nL)", (Py_ssize_t)-1, (long long)widest);
        goto done;
    }
    if (needs == 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t *row = d + r[i] * ncols;
            out[i] = (row[c_last] << shift) | (row[1] & mask);
            row[1] += 1;
        }
    }
    result = Py_BuildValue("(nL)", needs, (long long)widest);
done:
    release(&rows);
    release(&data);
    release(&ref);
    release(&cached);
    release(&slots);
    release(&old);
    return result;
}

/* place(rows, row_data, c_last, ref_cnt, table, shift, new, slots) -> None
 *
 * The rest of a step whose scan found needing rows: the i-th needing row (in
 * batch order) gets block new[i] at column tokens >> shift of its table row
 * (which the caller made wide enough), its block count and last block follow.
 * Every row's slot goes to ``slots`` and its token count up by one. ``new``
 * must hold exactly as many blocks as rows need them, and no row may write
 * into a shared last block (the scan declined those steps). */
static PyObject *place(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_data, *o_ref, *o_table, *o_new, *o_slots;
    Py_ssize_t c_last;
    int shift;
    if (!PyArg_ParseTuple(args, "OOnOOiOO", &o_rows, &o_data, &c_last, &o_ref, &o_table, &shift, &o_new,
                          &o_slots)) {
        return NULL;
    }
    Buf rows = {0}, data = {0}, ref = {0}, table = {0}, fresh = {0}, slots = {0};
    PyObject *result = NULL;
    if (shift < 0 || shift > 30) {
        PyErr_SetString(PyExc_ValueError, "decode step: shift out of range");
        return NULL;
    }
    if (get_ints(o_rows, &rows, 1, 8, 0, "rows") < 0 || get_ints(o_data, &data, 2, 8, 1, "row_data") < 0 ||
        get_ints(o_ref, &ref, 1, 4, 0, "ref_cnt") < 0 || get_ints(o_table, &table, 2, 4, 1, "table") < 0 ||
        get_ints(o_new, &fresh, 1, 8, 0, "new") < 0 || get_ints(o_slots, &slots, 1, 8, 1, "slots") < 0) {
        goto done;
    }
    Py_ssize_t n = ROWS(rows), ncols = data.view.shape[1], nblocks = ROWS(ref);
    Py_ssize_t width = table.view.shape[1], k = ROWS(fresh);
    if (ROWS(slots) != n || table.view.shape[0] != data.view.shape[0]) {
        PyErr_SetString(PyExc_ValueError, "decode step: array shapes disagree");
        goto done;
    }
    const int64_t *r = rows.view.buf, *nb = fresh.view.buf;
    int64_t *d = data.view.buf, *out = slots.view.buf;
    const int32_t *rc = ref.view.buf;
    int32_t *tab = table.view.buf;
    if (check_rows(r, n, d, data.view.shape[0], ncols, c_last, nblocks) < 0) {
        goto done;
    }
    const int64_t mask = ((int64_t)1 << shift) - 1;
    Py_ssize_t needs = 0;
    for (Py_ssize_t i = 0; i < n; i++) {  /* every check before any write */
        const int64_t *row = d + r[i] * ncols;
        if (needs_block(row[1], mask)) {
            if ((row[1] >> shift) >= width) {
                PyErr_SetString(PyExc_IndexError, "decode step: block table too narrow");
                goto done;
            }
            needs++;
        } else if (shared_write(row[1], mask, row[c_last], rc)) {
            PyErr_Format(PyExc_ValueError, "decode step: row %lld writes into shared block %lld (copy-on-write "
                         "is the NumPy path's)", (long long)r[i], (long long)row[c_last]);
            goto done;
        }
    }
    if (needs != k) {
        PyErr_Format(PyExc_ValueError, "decode step: %zd rows need a block, %zd given", needs, k);
        goto done;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        if (nb[j] <= 0 || nb[j] >= nblocks || nb[j] > INT32_MAX) {
            PyErr_Format(PyExc_IndexError, "decode step: new block %lld out of range", (long long)nb[j]);
            goto done;
        }
    }
    Py_ssize_t j = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t *row = d + r[i] * ncols;
        int64_t nt = row[1], last = row[c_last];
        if (needs_block(nt, mask)) {
            int64_t col = nt >> shift;
            last = nb[j++];
            tab[r[i] * width + col] = (int32_t)last;
            row[0] = col + 1;
            row[c_last] = last;
        }
        out[i] = (last << shift) | (nt & mask);
        row[1] = nt + 1;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release(&rows);
    release(&data);
    release(&ref);
    release(&table);
    release(&fresh);
    release(&slots);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "A decode step's first pass (see native/decode_step.c)."},
    {"place", place, METH_VARARGS, "A decode step's second pass, with the new blocks (see native/decode_step.c)."},
    {"chain_keys", kvpager_chain_keys, METH_VARARGS, KVPAGER_CHAIN_KEYS_DOC},
    {"shared_prefixes", kvpager_shared_prefixes, METH_VARARGS, KVPAGER_SHARED_PREFIXES_DOC},
    {"slots_own", kvpager_slots_own, METH_VARARGS, KVPAGER_SLOTS_OWN_DOC},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvpager._native",
                                    "The allocator's decode step (kvpager.seq_append), the prefix cache's block keys "
                                    "(kvpager.prefix_cache), a step's shared prefixes (kvpager.cascade) and its slots' check "
                                    "(kvpager.plan_guard) in C.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
