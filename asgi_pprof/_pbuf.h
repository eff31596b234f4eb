/* asgi_pprof/_pbuf.h: a growable byte buffer and protobuf's varint and
 * length-delimited fields, shared by the C encoders (_wire.c: samples; _traces.c:
 * heap rows). Memory from PyMem_* (the GIL is held); errors set MemoryError.
 */
#ifndef ASGI_PPROF_PBUF_H
#define ASGI_PPROF_PBUF_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    unsigned char *data;
    Py_ssize_t len, cap;
} Buf;

static inline int buf_reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    unsigned char *d = PyMem_Realloc(b->data, (size_t)cap);
    if (d == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const void *src, Py_ssize_t n) {
    if (n == 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

static inline int buf_varint(Buf *b, uint64_t v) {
    if (buf_reserve(b, 10) < 0)
        return -1;
    while (v >= 0x80) {
        b->data[b->len++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    b->data[b->len++] = (unsigned char)v;
    return 0;
}

/* Append a length-delimited field: tag, length, the bytes of `payload`. */
static inline int buf_field(Buf *b, unsigned char tag, const Buf *payload) {
    if (buf_put(b, &tag, 1) < 0 || buf_varint(b, (uint64_t)payload->len) < 0)
        return -1;
    return buf_put(b, payload->data, payload->len);
}

/* Return a new reference to cache[key], calling make(key) (which must return bytes) on a
 * miss and storing the result. */
static inline PyObject *cached_bytes(PyObject *cache, PyObject *key, PyObject *make) {
    PyObject *v = PyDict_GetItemWithError(cache, key);
    if (v != NULL) {
        Py_INCREF(v);
        return v;
    }
    if (PyErr_Occurred())
        return NULL;
    v = PyObject_CallOneArg(make, key);
    if (v == NULL)
        return NULL;
    if (!PyBytes_Check(v)) {
        Py_DECREF(v);
        PyErr_SetString(PyExc_TypeError, "callback must return bytes");
        return NULL;
    }
    if (PyDict_SetItem(cache, key, v) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

#endif
