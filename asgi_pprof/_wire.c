/* asgi_pprof._wire: profile.proto samples written straight into one buffer.
 *
 * A heap profile of a real app has tens of thousands of samples. Built as protobuf
 * message objects, each sample costs a dozen Python allocations, and under tracemalloc
 * (the exact heap runs under it) every allocation is traced with its traceback: that was
 * the largest part of a heap request. Here a whole profile's samples become one bytes
 * object; new locations and labels (a few thousand, not tens of thousands) are still
 * made by the Python callbacks, so ids and the string table come out exactly as
 * builder.py's pure-Python path makes them.
 *
 * Pure function of its arguments: no state, no threads, the GIL held throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_pbuf.h"

/* Attribute names, made once per call: PyObject_GetAttrString would make a new str
 * for every lookup, and each is a traced allocation under tracemalloc. */
typedef struct {
    PyObject *stack, *values, *labels, *num_labels;
} Names;

/* Append num label (key, num, unit) as a Sample.label field, string indexes from
 * strings(s) (which interns in first-use order: key, then unit). */
static int put_num_label(Buf *s, Buf *tmp, PyObject *lab, PyObject *strings) {
    if (!PyTuple_Check(lab) || PyTuple_GET_SIZE(lab) != 3) {
        PyErr_SetString(PyExc_TypeError, "a num label is a (key, num, unit) tuple");
        return -1;
    }
    long long idx[2] = {0, 0};
    PyObject *parts[2] = {PyTuple_GET_ITEM(lab, 0), PyTuple_GET_ITEM(lab, 2)};
    for (int j = 0; j < 2; j++) {
        int truth = PyObject_IsTrue(parts[j]);
        if (truth < 0)
            return -1;
        if (j == 1 && !truth)
            break; /* no unit: nothing interned */
        PyObject *i = PyObject_CallOneArg(strings, parts[j]);
        if (i == NULL)
            return -1;
        idx[j] = PyLong_AsLongLong(i);
        Py_DECREF(i);
        if (idx[j] == -1 && PyErr_Occurred())
            return -1;
    }
    long long num = PyLong_AsLongLong(PyTuple_GET_ITEM(lab, 1));
    if (num == -1 && PyErr_Occurred())
        return -1;
    /* proto3: fields at their default (0) are left out, as protobuf writes them. */
    unsigned char tag;
    tmp->len = 0;
    if (idx[0] && ((tag = 0x08), buf_put(tmp, &tag, 1) < 0 || buf_varint(tmp, (uint64_t)idx[0]) < 0))
        return -1;
    if (num && ((tag = 0x18), buf_put(tmp, &tag, 1) < 0 || buf_varint(tmp, (uint64_t)num) < 0))
        return -1;
    if (idx[1] && ((tag = 0x20), buf_put(tmp, &tag, 1) < 0 || buf_varint(tmp, (uint64_t)idx[1]) < 0))
        return -1;
    return buf_field(s, 0x1A, tmp);
}

static int put_bytes_obj(Buf *b, PyObject *bytes) {
    return buf_put(b, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

/* Append the fields of one sample (location ids, values, labels) to `s`. */
static int encode_sample(Buf *s, Buf *tmp, PyObject *sample, const Names *names,
                         PyObject *locations, PyObject *location, PyObject *labels,
                         PyObject *label, PyObject *strings) {
    int rc = -1;
    PyObject *stack = PyObject_GetAttr(sample, names->stack);
    PyObject *values = stack ? PyObject_GetAttr(sample, names->values) : NULL;
    PyObject *str_labels = values ? PyObject_GetAttr(sample, names->labels) : NULL;
    PyObject *num_labels = str_labels ? PyObject_GetAttr(sample, names->num_labels) : NULL;
    PyObject *seq = NULL;
    if (num_labels == NULL)
        goto done;

    /* location_id (1), packed: each frame's location id varint, made on first use. */
    seq = PySequence_Fast(stack, "stack must be a sequence");
    if (seq == NULL)
        goto done;
    tmp->len = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *id = cached_bytes(locations, PySequence_Fast_GET_ITEM(seq, i), location);
        if (id == NULL)
            goto done;
        int err = put_bytes_obj(tmp, id);
        Py_DECREF(id);
        if (err < 0)
            goto done;
    }
    Py_CLEAR(seq);
    if (tmp->len && buf_field(s, 0x0A, tmp) < 0)
        goto done;

    /* value (2), packed int64s (negatives as 64-bit two's complement, as protobuf does). */
    seq = PySequence_Fast(values, "values must be a sequence");
    if (seq == NULL)
        goto done;
    tmp->len = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred())
            goto done;
        if (buf_varint(tmp, (uint64_t)v) < 0)
            goto done;
    }
    Py_CLEAR(seq);
    if (tmp->len && buf_field(s, 0x12, tmp) < 0)
        goto done;

    /* label (3): string labels' encoded fields, cached (few distinct); numeric ones
     * (often one distinct value per sample: sizes) written here. */
    seq = PySequence_Fast(str_labels, "labels must be a sequence");
    if (seq == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *lab = cached_bytes(labels, PySequence_Fast_GET_ITEM(seq, i), label);
        if (lab == NULL)
            goto done;
        int err = put_bytes_obj(s, lab);
        Py_DECREF(lab);
        if (err < 0)
            goto done;
    }
    Py_CLEAR(seq);
    seq = PySequence_Fast(num_labels, "num_labels must be a sequence");
    if (seq == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        if (put_num_label(s, tmp, PySequence_Fast_GET_ITEM(seq, i), strings) < 0)
            goto done;
    }
    Py_CLEAR(seq);
    rc = 0;
done:
    Py_XDECREF(seq);
    Py_XDECREF(num_labels);
    Py_XDECREF(str_labels);
    Py_XDECREF(values);
    Py_XDECREF(stack);
    return rc;
}

PyDoc_STRVAR(samples_doc,
"samples(samples, locations, location, labels, label, strings) -> bytes\n\n"
"Return every sample as a profile.proto ``Profile.sample`` field (2), concatenated.\n"
"``locations`` maps a Frame to its location id's varint bytes; ``location(frame)``\n"
"makes a missing one. ``labels`` maps a (key, value) label to its encoded\n"
"``Sample.label`` field; ``label(pair)`` makes a missing one. Both caches fill in\n"
"first-use order. ``strings(s)`` returns a string's index (numeric labels' key, unit).");

static PyObject *samples(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "samples() takes 6 arguments");
        return NULL;
    }
    PyObject *locations = args[1], *location = args[2], *labels = args[3], *label = args[4];
    PyObject *strings = args[5];
    if (!PyDict_Check(locations) || !PyDict_Check(labels)) {
        PyErr_SetString(PyExc_TypeError, "locations and labels must be dicts");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "samples must be a sequence");
    if (seq == NULL)
        return NULL;
    Buf out = {0}, one = {0}, tmp = {0};
    PyObject *result = NULL;
    Names names = {
        PyUnicode_InternFromString("stack"),
        PyUnicode_InternFromString("values"),
        PyUnicode_InternFromString("labels"),
        PyUnicode_InternFromString("num_labels"),
    };
    if (!names.stack || !names.values || !names.labels || !names.num_labels)
        goto done;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        one.len = 0;
        if (encode_sample(&one, &tmp, PySequence_Fast_GET_ITEM(seq, i), &names, locations,
                          location, labels, label, strings) < 0)
            goto done;
        if (buf_field(&out, 0x12, &one) < 0)
            goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)out.data, out.len);
done:
    Py_XDECREF(names.stack);
    Py_XDECREF(names.values);
    Py_XDECREF(names.labels);
    Py_XDECREF(names.num_labels);
    PyMem_Free(out.data);
    PyMem_Free(one.data);
    PyMem_Free(tmp.data);
    Py_DECREF(seq);
    return result;
}

/* Return the uint64 values of args[0..n) (ints), or -1 with an exception set. */
static int as_u64s(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, uint64_t *out) {
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "takes %zd int arguments", n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(args[i]);
        if (v == -1 && PyErr_Occurred())
            return -1;
        out[i] = (uint64_t)v; /* int64 fields: negatives as two's complement */
    }
    return 0;
}

/* The small messages below are written into fixed arrays on the stack, not a Buf: a
 * cold heap makes ~20 000 locations, and under tracemalloc every heap buffer is a traced
 * allocation. A varint is at most 10 bytes, so a field is at most 11. */

/* Write `v` as a varint at `p`; return the bytes written. */
static size_t put_var(unsigned char *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (unsigned char)v;
    return n;
}

/* Write field `tag` as a varint unless it is proto3's default 0; return the bytes written. */
static size_t put_var_field(unsigned char *p, unsigned char tag, uint64_t v) {
    if (v == 0)
        return 0;
    p[0] = tag;
    return 1 + put_var(p + 1, v);
}

/* Write a length-delimited field (tag, length, `len` bytes of `src`) at `p`. */
static size_t put_len_field(unsigned char *p, unsigned char tag, const unsigned char *src,
                            size_t len) {
    p[0] = tag;
    size_t n = 1 + put_var(p + 1, len);
    memcpy(p + n, src, len);
    return n + len;
}

PyDoc_STRVAR(varint_doc, "varint(n) -> bytes\n\nReturn ``n`` as a protobuf (u)int64 varint.");

static PyObject *varint(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t v[1];
    unsigned char out[10];
    if (as_u64s(args, nargs, 1, v) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)put_var(out, v[0]));
}

PyDoc_STRVAR(location_doc,
"location(id, address, function_id, line) -> bytes\n\n"
"Return a ``Profile.location`` field (4): mapping 1, one Line.");

static PyObject *location(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t v[4];
    unsigned char line[2 * 11], body[4 * 11 + sizeof line], out[2 + 1 + sizeof body];
    if (as_u64s(args, nargs, 4, v) < 0)
        return NULL;
    size_t nl = put_var_field(line, 0x08, v[2]);
    nl += put_var_field(line + nl, 0x10, v[3]);
    size_t nb = put_var_field(body, 0x08, v[0]);
    nb += put_var_field(body + nb, 0x10, 1);
    nb += put_var_field(body + nb, 0x18, v[1]);
    nb += put_len_field(body + nb, 0x22, line, nl);
    size_t n = put_len_field(out, 0x22, body, nb);
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)n);
}

PyDoc_STRVAR(function_doc,
"function(id, name, filename, start_line) -> bytes\n\n"
"Return a ``Profile.function`` field (5); name and filename are string indexes, and\n"
"system_name is the name.");

static PyObject *function(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t v[4];
    unsigned char body[5 * 11], out[2 + 1 + sizeof body];
    if (as_u64s(args, nargs, 4, v) < 0)
        return NULL;
    size_t nb = put_var_field(body, 0x08, v[0]);
    nb += put_var_field(body + nb, 0x10, v[1]);
    nb += put_var_field(body + nb, 0x18, v[1]);
    nb += put_var_field(body + nb, 0x20, v[2]);
    nb += put_var_field(body + nb, 0x28, v[3]);
    size_t n = put_len_field(out, 0x2A, body, nb);
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)n);
}

/* The visit of untrack(): a referent that the collector tracks (other than the
 * object's type, which outlives every profile cache) could close a cycle. */
static int refers_to_tracked(PyObject *child, void *arg) {
    PyObject *obj = (PyObject *)arg;
    if (child == (PyObject *)Py_TYPE(obj)) {
        return 0;
    }
    return PyObject_IS_GC(child) && PyObject_GC_IsTracked(child);
}

PyDoc_STRVAR(untrack_doc,
"untrack(obj) -> obj\n\n"
"Return obj, no longer tracked by the cyclic garbage collector if it can be in no\n"
"cycle: everything it refers to but its type is untracked or not a container (as\n"
"CPython untracks such tuples and dicts itself, but at once rather than after a\n"
"collection has scanned it). For the profile caches' frames and stacks: a first read\n"
"of 100 000 new stacks left ~110 000 tracked objects, and the one young collection\n"
"after it held the GIL ~27 ms. Refcounting frees them as before. Only for immutable\n"
"objects: one changed later to refer to a container would never be collected.");

static PyObject *untrack(PyObject *self, PyObject *obj) {
    if (PyObject_IS_GC(obj) && PyObject_GC_IsTracked(obj)) {
        traverseproc traverse = Py_TYPE(obj)->tp_traverse;
        if (traverse != NULL && traverse(obj, refers_to_tracked, obj) == 0) {
            PyObject_GC_UnTrack(obj);
        }
    }
    return Py_NewRef(obj);
}

static PyMethodDef methods[] = {
    {"samples", (PyCFunction)(void (*)(void))samples, METH_FASTCALL, samples_doc},
    {"varint", (PyCFunction)(void (*)(void))varint, METH_FASTCALL, varint_doc},
    {"location", (PyCFunction)(void (*)(void))location, METH_FASTCALL, location_doc},
    {"function", (PyCFunction)(void (*)(void))function, METH_FASTCALL, function_doc},
    {"untrack", untrack, METH_O, untrack_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire", "profile.proto samples encoded in C.", 0, methods,
    slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wire(void) { return PyModuleDef_Init(&module); }
