/* A step plan's slots checked against its sequences (kvpager.plan_guard.check_positions) in C,
 * for kvpager._native.
 *
 * slots_own(tables, seq_lens, query_lens, slots, block_size, committed) -> bool
 * tables: int32 [B, W]; seq_lens: int32 [B]; query_lens: int32 [B] or None (one
 * query each: a decode step); slots: int64 [sum(query_lens)]; committed: int64
 * [B] or None. True when every slot but -1 is its own query token's position:
 * token j of row i's q new tokens sits at position p = seq_lens[i] - q + j, in
 * block tables[i, p / block_size], and (with ``committed``) p >= committed[i].
 * False on the first one that is not, or on any length, position or block column
 * outside its array (the NumPy twin, which runs then, says which and why). The
 * NumPy version is a dozen array calls (12 us for a 64-row decode step, 2-core
 * VM), paid on every plan and refill with slots; this reads each row once. */
#include "plan_slots.h"

#include <stdint.h>

#include "buffers.h"

PyObject *kvpager_slots_own(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *tables_o, *lens_o, *qlens_o, *slots_o, *committed_o;
    long long block_size;
    Buf tables = {0}, lens = {0}, qlens = {0}, slots = {0}, committed = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOLO", &tables_o, &lens_o, &qlens_o, &slots_o, &block_size, &committed_o)) {
        return NULL;
    }
    if (block_size < 1) {
        PyErr_SetString(PyExc_ValueError, "slots_own: block_size must be >= 1");
        return NULL;
    }
    if (get_ints(tables_o, &tables, 2, 4, 0, "tables") < 0 || get_ints(lens_o, &lens, 1, 4, 0, "seq_lens") < 0 ||
        get_ints(slots_o, &slots, 1, 8, 0, "slots") < 0) {
        goto done;
    }
    if (qlens_o != Py_None && get_ints(qlens_o, &qlens, 1, 4, 0, "query_lens") < 0) {
        goto done;
    }
    if (committed_o != Py_None && get_ints(committed_o, &committed, 1, 8, 0, "committed") < 0) {
        goto done;
    }
    Py_ssize_t nseq = lens.view.shape[0], width = tables.view.shape[1], total = slots.view.shape[0];
    int ok = tables.view.shape[0] == nseq && (!qlens.held || qlens.view.shape[0] == nseq) &&
             (!committed.held || committed.view.shape[0] == nseq) && (qlens.held || total == nseq);
    const int32_t *t = tables.view.buf, *l = lens.view.buf, *q = qlens.held ? qlens.view.buf : NULL;
    const int64_t *s = slots.view.buf, *c = committed.held ? committed.view.buf : NULL;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; ok && i < nseq; i++) {
        int64_t n = q != NULL ? q[i] : 1, len = l[i];
        if (n < 0 || len < n || k + n > total) {
            ok = 0;
            break;
        }
        int64_t floor = c != NULL ? c[i] : 0;
        const int32_t *row = t + i * width;
        for (int64_t p = len - n; p < len; p++, k++) {
            int64_t slot = s[k];
            if (slot == -1) {
                continue;
            }
            int64_t col = p / block_size;
            if (p < floor || col >= width || slot != (int64_t)row[col] * block_size + p % block_size) {
                ok = 0;
                break;
            }
        }
    }
    if (k != total) {
        ok = 0;
    }
    result = PyBool_FromLong(ok);
done:
    release(&tables);
    release(&lens);
    release(&qlens);
    release(&slots);
    release(&committed);
    return result;
}
