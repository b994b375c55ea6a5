/* Arrays through the buffer protocol, for the compiled parts
 * (native/decode_step.c, native/cpu_attention.c): no NumPy headers. */
#ifndef KVPAGER_BUFFERS_H
#define KVPAGER_BUFFERS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

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

/* Whether ``b``'s items are of one of the struct ``codes`` in this machine's byte
 * order (native, '=' or the explicit one); with the item size checked by `get`,
 * that is the C type. Else a TypeError naming ``name`` and ``what`` it holds. */
static inline int of_codes(Buf *b, const char *codes, const char *what, const char *name) {
    const char *f = b->view.format != NULL ? b->view.format : "B";
    if (*f == '@' || *f == '=') {
        f++;
    }
#if PY_LITTLE_ENDIAN
    if (*f == '<') {
        f++;
    }
#else
    if (*f == '>' || *f == '!') {
        f++;
    }
#endif
    if (f[0] != '\0' && f[1] == '\0' && strchr(codes, f[0]) != NULL) {
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "%s: expected %s, got format '%s'", name, what,
                 b->view.format != NULL ? b->view.format : "B");
    return -1;
}

/* Signed integers of the machine's byte order (`of_codes`). */
static inline int signed_ints(Buf *b, const char *name) {
    return of_codes(b, "bhilq", "signed integers", name);
}

/* `get`, its items signed integers (an array of floats or unsigned integers of the same
 * item size was read as ids and counts before). */
static inline int get_ints(PyObject *obj, Buf *b, int ndim, Py_ssize_t itemsize, int writable, const char *name) {
    if (get(obj, b, ndim, itemsize, writable, name) < 0) {
        return -1;
    }
    if (signed_ints(b, name) < 0) {
        release(b);
        return -1;
    }
    return 0;
}

/* `get`, its items float32 (an int32 array was read as floats before). */
static inline int get_floats(PyObject *obj, Buf *b, int ndim, int writable, const char *name) {
    if (get(obj, b, ndim, 4, writable, name) < 0) {
        return -1;
    }
    if (of_codes(b, "f", "float32", name) < 0) {
        release(b);
        return -1;
    }
    return 0;
}

#endif
