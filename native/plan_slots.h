/* What native/plan_slots.c gives the kvpager._native module (its method
 * table is in native/decode_step.c). */
#ifndef KVPAGER_PLAN_SLOTS_H
#define KVPAGER_PLAN_SLOTS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* slots_own(...) -> bool: see native/plan_slots.c. */
PyObject *kvpager_slots_own(PyObject *self, PyObject *args);

#define KVPAGER_SLOTS_OWN_DOC \
    "slots_own(tables, seq_lens, query_lens, slots, block_size, committed) -> bool: whether every slot of a " \
    "step plan is its own query token's open position (kvpager.plan_guard.check_positions). " \
    "See native/plan_slots.c."

#endif
