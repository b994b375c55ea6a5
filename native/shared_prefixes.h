/* What native/shared_prefixes.c gives the kvpager._native module (its method
 * table is in native/decode_step.c). */
#ifndef KVPAGER_SHARED_PREFIXES_H
#define KVPAGER_SHARED_PREFIXES_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* shared_prefixes(...) -> (segments, members, levels, saved): see native/shared_prefixes.c. */
PyObject *kvpager_shared_prefixes(PyObject *self, PyObject *args);

#define KVPAGER_SHARED_PREFIXES_DOC \
    "shared_prefixes(tables, seq_lens, query_lens, block_size, levels, min_members, min_blocks, segments, members, own) -> " \
    "(segment rows, member rows, levels, saved): a step's shared prefixes, written into segments, members " \
    "and own (kvpager.cascade.find_shared_prefixes). See native/shared_prefixes.c."

#endif
