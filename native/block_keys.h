/* What native/block_keys.c gives the kvpager._native module (its method
 * table is in native/decode_step.c). */
#ifndef KVPAGER_BLOCK_KEYS_H
#define KVPAGER_BLOCK_KEYS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* chain_keys(parent, tokens, block_size, max_blocks) -> list[bytes]: see native/block_keys.c. */
PyObject *kvpager_chain_keys(PyObject *self, PyObject *args);

#define KVPAGER_CHAIN_KEYS_DOC \
    "chain_keys(parent, tokens, block_size, max_blocks) -> list of 16-byte keys: the prefix-cache keys of " \
    "the first min(max_blocks, len(tokens) // block_size) full blocks of tokens (int64, C-contiguous), " \
    "chained from parent (16 bytes). See native/block_keys.c."

#endif
