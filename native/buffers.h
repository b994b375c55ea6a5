/* Arrays through the buffer protocol, for the compiled parts
 * (native/decode_step.c, native/cpu_attention.c): no NumPy headers. */
#ifndef KVPAGER_BUFFERS_H
#define KVPAGER_BUFFERS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static inline void release(Buf *b) {
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

/* ``obj``'s buffer: C-contiguous, ``ndim`` dimensions, items of ``itemsize``
 * bytes; writable if asked. */
static inline int get(PyObject *obj, Buf *b, int ndim, Py_ssize_t itemsize, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &b->view, flags) < 0) {
        return -1;
    }
    b->held = 1;
    if (b->view.ndim != ndim || b->view.itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected %d-d items of %zd bytes, got %d-d of %zd", name, ndim,
                     itemsize, b->view.ndim, b->view.itemsize);
        release(b);
        return -1;
    }
    return 0;
}

#endif
