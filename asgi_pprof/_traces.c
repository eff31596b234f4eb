/* asgi_pprof._traces: tracemalloc's raw traces grouped by traceback, and named, in C.
 *
 * The exact heap of a real app is ~700 000 live blocks over ~40 000 distinct tracebacks.
 * Grouped in Python that is one interpreted step and a list append per block, and under
 * tracemalloc (the exact heap runs under it) every object Python allocates meanwhile is
 * itself traced with its traceback: the grouping was the largest part of a heap request.
 * Here a block costs a pointer lookup. tracemalloc's _get_traces() shares one tuple per
 * distinct traceback, so grouping by identity is the fast path; tuples that are equal
 * but distinct still land in one group (by hash and ==), as a dict keyed by the tuples
 * would group them. Groups come out in first-seen order, as such a dict's would.
 *
 * The tables are C memory (PyMem_Raw*); the only Python objects made are the results.
 * Every entry point works on a slice its caller chooses, so the GIL is held in bounded
 * steps. Errors in the input raise TypeError; no state is left half-updated by them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_pbuf.h"

/* --- Groups: traces accumulated by traceback ------------------------------------------ */

typedef struct {
    PyObject_HEAD
    /* Row i: its traceback (a strong reference), block count and bytes. */
    PyObject **tbs;
    long long *count, *bytes;
    Py_ssize_t n, cap;
    /* Open addressing, capacity a power of two, a slot holds row + 1 (0: empty). By
     * identity: slots keyed by tbs[row]'s address (only tracebacks we hold a reference
     * to, so an address is never a freed object's). By equality: keyed by the hash. */
    Py_ssize_t *by_id, *by_eq;
    Py_hash_t *hashes; /* hashes[row], for by_eq probing */
    size_t slots;
    int busy; /* set while a call runs: == on odd input could re-enter */
} Groups;

static size_t ptr_hash(const void *p) {
    uintptr_t x = (uintptr_t)p;
    x ^= x >> 33; /* objects are 16-byte aligned: mix the high bits in */
    x *= (uintptr_t)0xff51afd7ed558ccdULL;
    x ^= x >> 29;
    return (size_t)x;
}

/* Make the tables hold `slots` slots (a power of two) and re-enter every row. */
static int groups_rehash(Groups *g, size_t slots) {
    Py_ssize_t *by_id = PyMem_RawCalloc(slots, sizeof(Py_ssize_t));
    Py_ssize_t *by_eq = PyMem_RawCalloc(slots, sizeof(Py_ssize_t));
    if (by_id == NULL || by_eq == NULL) {
        PyMem_RawFree(by_id);
        PyMem_RawFree(by_eq);
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = slots - 1;
    for (Py_ssize_t r = 0; r < g->n; r++) {
        size_t i = ptr_hash(g->tbs[r]) & mask;
        while (by_id[i])
            i = (i + 1) & mask;
        by_id[i] = r + 1;
        i = (size_t)g->hashes[r] & mask;
        while (by_eq[i])
            i = (i + 1) & mask;
        by_eq[i] = r + 1;
    }
    PyMem_RawFree(g->by_id);
    PyMem_RawFree(g->by_eq);
    g->by_id = by_id;
    g->by_eq = by_eq;
    g->slots = slots;
    return 0;
}

/* Make room for one more row (arrays and tables at most half full). */
static int groups_grow(Groups *g) {
    if (g->n == g->cap) {
        Py_ssize_t cap = g->cap ? g->cap * 2 : 1024;
        if ((size_t)cap > PY_SSIZE_T_MAX / sizeof(long long)) {
            PyErr_NoMemory();
            return -1;
        }
        PyObject **tbs = PyMem_RawRealloc(g->tbs, (size_t)cap * sizeof(PyObject *));
        if (tbs == NULL)
            return PyErr_NoMemory(), -1;
        g->tbs = tbs;
        long long *count = PyMem_RawRealloc(g->count, (size_t)cap * sizeof(long long));
        if (count == NULL)
            return PyErr_NoMemory(), -1;
        g->count = count;
        long long *bytes = PyMem_RawRealloc(g->bytes, (size_t)cap * sizeof(long long));
        if (bytes == NULL)
            return PyErr_NoMemory(), -1;
        g->bytes = bytes;
        Py_hash_t *hashes = PyMem_RawRealloc(g->hashes, (size_t)cap * sizeof(Py_hash_t));
        if (hashes == NULL)
            return PyErr_NoMemory(), -1;
        g->hashes = hashes;
        g->cap = cap;
    }
    if ((size_t)(g->n + 1) * 2 > g->slots)
        return groups_rehash(g, g->slots ? g->slots * 2 : 2048);
    return 0;
}

/* Return the row of traceback `tb`, adding it if new; -1 with an exception set. */
static Py_ssize_t groups_row(Groups *g, PyObject *tb) {
    size_t mask = g->slots - 1;
    if (g->slots) {
        for (size_t i = ptr_hash(tb) & mask; g->by_id[i]; i = (i + 1) & mask) {
            if (g->tbs[g->by_id[i] - 1] == tb)
                return g->by_id[i] - 1;
        }
    }
    Py_hash_t h = PyObject_Hash(tb);
    if (h == -1)
        return -1;
    if (g->slots) {
        for (size_t i = (size_t)h & mask; g->by_eq[i]; i = (i + 1) & mask) {
            Py_ssize_t r = g->by_eq[i] - 1;
            if (g->hashes[r] != h)
                continue;
            int eq = PyObject_RichCompareBool(g->tbs[r], tb, Py_EQ);
            if (eq < 0)
                return -1;
            if (eq)
                return r; /* equal, not identical: not entered by identity (see above) */
        }
    }
    if (groups_grow(g) < 0)
        return -1;
    Py_ssize_t r = g->n++;
    g->tbs[r] = Py_NewRef(tb);
    g->count[r] = g->bytes[r] = 0;
    g->hashes[r] = h;
    mask = g->slots - 1;
    size_t i = ptr_hash(tb) & mask;
    while (g->by_id[i])
        i = (i + 1) & mask;
    g->by_id[i] = r + 1;
    i = (size_t)h & mask;
    while (g->by_eq[i])
        i = (i + 1) & mask;
    g->by_eq[i] = r + 1;
    return r;
}

static int groups_enter(Groups *g) {
    if (g->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Groups is already in use by this call");
        return -1;
    }
    g->busy = 1;
    return 0;
}

/* Parse (seq, start, stop) with 0 <= start <= stop <= len(seq); seq must be a list. */
/* Read start (args[0]) and stop (args[1]) of a slice of n items, stop clamped to n.
 * 0, or -1 with an error set. */
static int range_args(PyObject *const *args, Py_ssize_t n, Py_ssize_t *start,
                      Py_ssize_t *stop) {
    *start = PyLong_AsSsize_t(args[0]);
    if (*start == -1 && PyErr_Occurred())
        return -1;
    *stop = PyLong_AsSsize_t(args[1]);
    if (*stop == -1 && PyErr_Occurred())
        return -1;
    if (*stop > n)
        *stop = n;
    if (*start < 0 || *start > *stop) {
        PyErr_SetString(PyExc_ValueError, "need 0 <= start <= stop");
        return -1;
    }
    return 0;
}

static int slice_args(PyObject *const *args, Py_ssize_t nargs, const char *what,
                      Py_ssize_t *start, Py_ssize_t *stop) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "takes (%s, start, stop)", what);
        return -1;
    }
    if (!PyList_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s must be a list", what);
        return -1;
    }
    return range_args(args + 1, PyList_GET_SIZE(args[0]), start, stop);
}

PyDoc_STRVAR(add_doc,
"add(traces, start, stop) -> None\n\n"
"Add ``traces[start:stop]`` (``_tracemalloc._get_traces()``'s list of ``(domain, size,\n"
"traceback, ...)`` tuples) to the groups: one more block and ``size`` more bytes for\n"
"the group of ``traceback`` (a tuple).");

static PyObject *groups_add(Groups *g, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t start, stop;
    if (slice_args(args, nargs, "traces", &start, &stop) < 0 || groups_enter(g) < 0)
        return NULL;
    PyObject *traces = args[0];
    PyObject *result = NULL;
    /* Held: an == on odd input could shrink the list under us. */
    Py_INCREF(traces);
    for (Py_ssize_t k = start; k < stop && k < PyList_GET_SIZE(traces); k++) {
        PyObject *t = PyList_GET_ITEM(traces, k);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 3 ||
            !PyTuple_Check(PyTuple_GET_ITEM(t, 2))) {
            PyErr_SetString(PyExc_TypeError,
                            "a trace is a (domain, size, traceback, ...) tuple, traceback a tuple");
            goto done;
        }
        Py_INCREF(t);
        long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
        Py_ssize_t r = (size == -1 && PyErr_Occurred()) ? -1 : groups_row(g, PyTuple_GET_ITEM(t, 2));
        Py_DECREF(t);
        if (r < 0)
            goto done;
        g->count[r] += 1;
        g->bytes[r] += size;
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(traces);
    g->busy = 0;
    return result;
}

/* Return 1 if a frame of `tb` is in a file under `prefix`, 0 if none, -1 on bad input. */
static int has_prefix(PyObject *tb, PyObject *prefix) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tb); i++) {
        PyObject *fr = PyTuple_GET_ITEM(tb, i);
        if (!PyTuple_Check(fr) || PyTuple_GET_SIZE(fr) < 1 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(fr, 0))) {
            PyErr_SetString(PyExc_TypeError, "a traceback frame is a (filename, line) tuple");
            return -1;
        }
        Py_ssize_t m = PyUnicode_Tailmatch(PyTuple_GET_ITEM(fr, 0), prefix, 0, PY_SSIZE_T_MAX, -1);
        if (m != 0)
            return m < 0 ? -1 : 1;
    }
    return 0;
}

PyDoc_STRVAR(rows_doc,
"rows(prefix, start, stop) -> (rows, own_objects, own_bytes)\n\n"
"Return groups ``start`` to ``stop`` (first-seen order) as ``(inuse_objects, inuse_space,\n"
"traceback)`` rows, leaving out the groups with a frame in a file whose name starts\n"
"with ``prefix``: those are only counted, in ``own_objects`` and ``own_bytes``.");

static PyObject *groups_rows(Groups *g, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "takes (prefix: str, start, stop)");
        return NULL;
    }
    Py_ssize_t start, stop;
    if (range_args(args + 1, g->n, &start, &stop) < 0 || groups_enter(g) < 0)
        return NULL;
    PyObject *result = NULL, *rows = PyList_New(0);
    long long own_objects = 0, own_bytes = 0;
    if (rows == NULL)
        goto done;
    for (Py_ssize_t r = start; r < stop; r++) {
        int ours = has_prefix(g->tbs[r], args[0]);
        if (ours < 0)
            goto done;
        if (ours) {
            own_objects += g->count[r];
            own_bytes += g->bytes[r];
            continue;
        }
        PyObject *row = Py_BuildValue("(LLO)", g->count[r], g->bytes[r], g->tbs[r]);
        if (row == NULL)
            goto done;
        int err = PyList_Append(rows, row);
        Py_DECREF(row);
        if (err < 0)
            goto done;
    }
    result = Py_BuildValue("(OLL)", rows, own_objects, own_bytes);
done:
    Py_XDECREF(rows);
    g->busy = 0;
    return result;
}

static Py_ssize_t groups_len(Groups *g) { return g->n; }

static int groups_traverse(Groups *g, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(g));
    for (Py_ssize_t r = 0; r < g->n; r++)
        Py_VISIT(g->tbs[r]);
    return 0;
}

static int groups_clear(Groups *g) {
    Py_ssize_t n = g->n;
    g->n = 0; /* first: a decref below may run code that looks at us */
    for (Py_ssize_t r = 0; r < n; r++)
        Py_CLEAR(g->tbs[r]);
    PyMem_RawFree(g->by_id);
    PyMem_RawFree(g->by_eq);
    g->by_id = g->by_eq = NULL;
    g->slots = 0;
    return 0;
}

static void groups_dealloc(Groups *g) {
    PyTypeObject *tp = Py_TYPE(g);
    PyObject_GC_UnTrack(g);
    groups_clear(g);
    PyMem_RawFree(g->tbs);
    PyMem_RawFree(g->count);
    PyMem_RawFree(g->bytes);
    PyMem_RawFree(g->hashes);
    tp->tp_free((PyObject *)g);
    Py_DECREF(tp);
}

static PyObject *groups_new(PyTypeObject *tp, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) || (kwargs && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "Groups() takes no arguments");
        return NULL;
    }
    return tp->tp_alloc(tp, 0); /* zeroed: no rows, no tables */
}

static PyMethodDef groups_methods[] = {
    {"add", (PyCFunction)(void (*)(void))groups_add, METH_FASTCALL, add_doc},
    {"rows", (PyCFunction)(void (*)(void))groups_rows, METH_FASTCALL, rows_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(groups_doc,
"Groups() -> tracemalloc traces grouped by traceback; len() is the number of groups.");

static PyType_Slot groups_slots[] = {
    {Py_tp_doc, (void *)groups_doc},
    {Py_tp_new, groups_new},
    {Py_tp_dealloc, groups_dealloc},
    {Py_tp_traverse, groups_traverse},
    {Py_tp_clear, groups_clear},
    {Py_tp_methods, groups_methods},
    {Py_sq_length, groups_len},
    {0, NULL},
};

static PyType_Spec groups_spec = {
    "asgi_pprof._traces.Groups",
    sizeof(Groups),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    groups_slots,
};

/* --- samples: rows named through the frame cache --------------------------------------- */

/* Return a borrowed frames[fr] (depth 0) or deeper[fr][depth - 1]; NULL with no
 * exception set when not cached. */
static PyObject *cached_frame(PyObject *fr, Py_ssize_t depth, PyObject *frames,
                              PyObject *deeper) {
    if (depth == 0)
        return PyDict_GetItemWithError(frames, fr);
    PyObject *outer = PyDict_GetItemWithError(deeper, fr);
    if (outer == NULL || !PyList_Check(outer) || PyList_GET_SIZE(outer) < depth)
        return NULL;
    return PyList_GET_ITEM(outer, depth - 1);
}

/* Return a new tuple naming each frame of tb. With `nested`, a frame on the line of the
 * one before it is one level further out (depth 1, 2, ...); without, every frame is at
 * depth 0. Each name comes from the caches; one not cached comes from frame(fr, depth),
 * which fills them, or with frame NULL the result is NULL with no exception set. */
static PyObject *name_stack(PyObject *tb, int nested, PyObject *frames, PyObject *deeper,
                            PyObject *frame) {
    Py_ssize_t n = PyTuple_GET_SIZE(tb);
    PyObject *stack = PyTuple_New(n);
    if (stack == NULL)
        return NULL;
    Py_ssize_t depth = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *fr = PyTuple_GET_ITEM(tb, i);
        if (nested && i > 0) {
            int same = PyObject_RichCompareBool(fr, PyTuple_GET_ITEM(tb, i - 1), Py_EQ);
            if (same < 0)
                goto fail;
            depth = same ? depth + 1 : 0;
        }
        PyObject *f = cached_frame(fr, depth, frames, deeper);
        if (f != NULL) {
            Py_INCREF(f); /* before any callback: it may clear the caches */
        } else if (PyErr_Occurred() || frame == NULL) {
            goto fail;
        } else if (depth == 0) {
            f = PyObject_CallOneArg(frame, fr);
        } else {
            PyObject *d = PyLong_FromSsize_t(depth);
            if (d == NULL)
                goto fail;
            PyObject *call[2] = {fr, d};
            f = PyObject_Vectorcall(frame, call, 2, NULL);
            Py_DECREF(d);
        }
        if (f == NULL)
            goto fail;
        PyTuple_SET_ITEM(stack, i, f);
    }
    return stack;
fail:
    Py_DECREF(stack);
    return NULL;
}

/* Return a new tuple naming tb from the caches alone, as Names.stack does: all at depth 0
 * when no frame is in `multi`, else nested; NULL with no exception set when a name is
 * not cached. On a miss, name_stack(tb, 1, ..., frame) names it as Names._nested does:
 * only new frames run Python (one new line of sixteen makes one call, not sixteen). */
static PyObject *cached_stack(PyObject *tb, PyObject *frames, PyObject *multi,
                              PyObject *deeper) {
    int nested = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tb) && !nested; i++) {
        nested = PySet_Contains(multi, PyTuple_GET_ITEM(tb, i));
        if (nested < 0)
            return NULL;
    }
    return name_stack(tb, nested, frames, deeper, NULL);
}

/* Check the arguments samples() and encode() share, (rows, start, stop, frames, multi,
 * deeper, frame, ...), `n` in all; set start and stop. 0, or -1 with an exception set. */
static int rows_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, const char *name,
                     Py_ssize_t *start, Py_ssize_t *stop) {
    if (nargs != n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, n);
        return -1;
    }
    if (slice_args(args, 3, "rows", start, stop) < 0)
        return -1;
    if (!PyDict_Check(args[3]) || !PyAnySet_Check(args[4]) || !PyDict_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "frames and deeper must be dicts, multi a set");
        return -1;
    }
    return 0;
}

/* Return a borrowed rows[k] (k in range), or NULL with TypeError if it is not an
 * (objects, bytes, traceback) tuple. */
static PyObject *row_at(PyObject *rows, Py_ssize_t k) {
    PyObject *row = PyList_GET_ITEM(rows, k);
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 3 ||
        !PyTuple_Check(PyTuple_GET_ITEM(row, 2))) {
        PyErr_SetString(PyExc_TypeError, "a row is an (objects, bytes, traceback) tuple");
        return NULL;
    }
    return row;
}

PyDoc_STRVAR(samples_doc,
"samples(rows, start, stop, frames, multi, deeper, frame, sample) -> list\n\n"
"Return ``sample(stack, [inuse_objects, inuse_space])`` for each row of\n"
"``rows[start:stop]``. A row's stack is its traceback's frames named from the caches\n"
"of heap_names.Names (``frames``, ``multi``, ``deeper``) as ``Names.stack`` names\n"
"them; when a name is not cached, as ``Names.stack`` does then, calling\n"
"``frame((filename, line), depth)`` for each frame not cached.");

static PyObject *samples(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t start, stop;
    if (rows_args(args, nargs, 8, "samples", &start, &stop) < 0)
        return NULL;
    PyObject *rows = args[0], *frames = args[3], *multi = args[4], *deeper = args[5];
    PyObject *frame = args[6], *sample = args[7];
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_INCREF(rows); /* the callbacks run Python code: keep what we walk alive */
    for (Py_ssize_t k = start; k < stop && k < PyList_GET_SIZE(rows); k++) {
        PyObject *row = row_at(rows, k);
        if (row == NULL)
            goto fail;
        Py_INCREF(row);
        PyObject *tb = PyTuple_GET_ITEM(row, 2);
        PyObject *stack = cached_stack(tb, frames, multi, deeper);
        if (stack == NULL && !PyErr_Occurred())
            stack = name_stack(tb, 1, frames, deeper, frame);
        PyObject *values = stack ? PyList_New(2) : NULL;
        PyObject *s = NULL;
        if (values != NULL) {
            PyList_SET_ITEM(values, 0, Py_NewRef(PyTuple_GET_ITEM(row, 0)));
            PyList_SET_ITEM(values, 1, Py_NewRef(PyTuple_GET_ITEM(row, 1)));
            PyObject *call[2] = {stack, values};
            s = PyObject_Vectorcall(sample, call, 2, NULL);
        }
        Py_XDECREF(values);
        Py_XDECREF(stack);
        Py_DECREF(row);
        if (s == NULL)
            goto fail;
        int err = PyList_Append(out, s);
        Py_DECREF(s);
        if (err < 0)
            goto fail;
    }
    Py_DECREF(rows);
    return out;
fail:
    Py_DECREF(rows);
    Py_DECREF(out);
    return NULL;
}

/* --- encode: rows straight to profile.proto samples ------------------------------------ */

/* Append the location id of each frame of tb to tmp, from the name caches and
 * `locations` alone: 1 when all were cached, 0 when one was not (tmp is then partial),
 * -1 with an exception set. Depths as cached_stack names them. No Python code runs but a
 * Frame's __hash__ and __eq__, and the Frame is held across those. */
static int cached_ids(PyObject *tb, PyObject *frames, PyObject *multi, PyObject *deeper,
                      PyObject *locations, Buf *tmp) {
    Py_ssize_t n = PyTuple_GET_SIZE(tb);
    int nested = 0;
    for (Py_ssize_t i = 0; i < n && !nested; i++) {
        nested = PySet_Contains(multi, PyTuple_GET_ITEM(tb, i));
        if (nested < 0)
            return -1;
    }
    Py_ssize_t depth = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *fr = PyTuple_GET_ITEM(tb, i);
        if (nested && i > 0) {
            int same = PyObject_RichCompareBool(fr, PyTuple_GET_ITEM(tb, i - 1), Py_EQ);
            if (same < 0)
                return -1;
            depth = same ? depth + 1 : 0;
        }
        PyObject *f = cached_frame(fr, depth, frames, deeper);
        if (f == NULL)
            return PyErr_Occurred() ? -1 : 0;
        Py_INCREF(f); /* its __hash__ is Python code: another thread may clear the cache */
        PyObject *id = PyDict_GetItemWithError(locations, f);
        Py_DECREF(f);
        if (id == NULL)
            return PyErr_Occurred() ? -1 : 0;
        if (!PyBytes_Check(id)) {
            PyErr_SetString(PyExc_TypeError, "locations' values must be bytes");
            return -1;
        }
        if (buf_put(tmp, PyBytes_AS_STRING(id), PyBytes_GET_SIZE(id)) < 0)
            return -1;
    }
    return 1;
}

/* Append tb's location ids to tmp the slow way: name the stack (calling frame() for
 * names not cached) and make missing locations with location(). */
static int named_ids(PyObject *tb, PyObject *frames, PyObject *multi, PyObject *deeper,
                     PyObject *frame, PyObject *locations, PyObject *location, Buf *tmp) {
    PyObject *stack = cached_stack(tb, frames, multi, deeper);
    if (stack == NULL && !PyErr_Occurred())
        stack = name_stack(tb, 1, frames, deeper, frame);
    if (stack == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(stack) && rc == 0; i++) {
        PyObject *id = cached_bytes(locations, PyTuple_GET_ITEM(stack, i), location);
        if (id == NULL) {
            rc = -1;
        } else {
            rc = buf_put(tmp, PyBytes_AS_STRING(id), PyBytes_GET_SIZE(id));
            Py_DECREF(id);
        }
    }
    Py_DECREF(stack);
    return rc;
}

PyDoc_STRVAR(encode_doc,
"encode(rows, start, stop, frames, multi, deeper, frame, locations, location) -> bytes\n\n"
"Return ``rows[start:stop]`` as profile.proto ``Profile.sample`` fields (2),\n"
"concatenated: values ``[inuse_objects, inuse_space]`` at the stack ``samples()`` would\n"
"name. ``locations`` maps a Frame to its location id's varint bytes and\n"
"``location(frame)`` makes a missing one, as for ``_wire.samples``. A row whose names\n"
"and locations are all cached makes no Python object.");

static PyObject *encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t start, stop;
    if (rows_args(args, nargs, 9, "encode", &start, &stop) < 0)
        return NULL;
    PyObject *rows = args[0], *frames = args[3], *multi = args[4], *deeper = args[5];
    PyObject *frame = args[6], *locations = args[7], *location = args[8];
    if (!PyDict_Check(locations)) {
        PyErr_SetString(PyExc_TypeError, "locations must be a dict");
        return NULL;
    }
    Buf out = {0}, one = {0}, tmp = {0};
    PyObject *result = NULL;
    Py_INCREF(rows); /* the callbacks run Python code: keep what we walk alive */
    for (Py_ssize_t k = start; k < stop && k < PyList_GET_SIZE(rows); k++) {
        PyObject *row = row_at(rows, k);
        if (row == NULL)
            goto done;
        Py_INCREF(row);
        PyObject *tb = PyTuple_GET_ITEM(row, 2);
        tmp.len = 0;
        int got = cached_ids(tb, frames, multi, deeper, locations, &tmp);
        if (got == 0) {
            tmp.len = 0;
            got = named_ids(tb, frames, multi, deeper, frame, locations, location, &tmp) < 0 ? -1 : 1;
        }
        one.len = 0;
        int err = got < 0 || (tmp.len && buf_field(&one, 0x0A, &tmp) < 0);
        long long v[2] = {0, 0};
        for (int j = 0; j < 2 && !err; j++) {
            v[j] = PyLong_AsLongLong(PyTuple_GET_ITEM(row, j));
            err = v[j] == -1 && PyErr_Occurred();
        }
        Py_DECREF(row);
        if (err)
            goto done;
        tmp.len = 0;
        if (buf_varint(&tmp, (uint64_t)v[0]) < 0 || buf_varint(&tmp, (uint64_t)v[1]) < 0 ||
            buf_field(&one, 0x12, &tmp) < 0 || buf_field(&out, 0x12, &one) < 0)
            goto done;
    }
    result = PyBytes_FromStringAndSize((const char *)out.data, out.len);
done:
    Py_DECREF(rows);
    PyMem_Free(out.data);
    PyMem_Free(one.data);
    PyMem_Free(tmp.data);
    return result;
}

/* --- last_line: the furthest line a code object's location table reaches ----------------- */

PyDoc_STRVAR(last_line_doc,
"last_line(linetable, first_line) -> int\n\n"
"Return the last line any instruction starts on, read from a code object's\n"
"``co_linetable`` (the 3.11+ location table) and its ``co_firstlineno``, as\n"
"heap_names.last_line reads it.");

static PyObject *last_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "last_line() takes (linetable: bytes, first_line: int)");
        return NULL;
    }
    long long first = PyLong_AsLongLong(args[1]);
    if (first == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const unsigned char *end = p + PyBytes_GET_SIZE(args[0]);
    long long line = 0, best = 0;
    while (p < end) {
        int kind = (*p++ >> 3) & 15;
        if (kind == 15) /* no location */
            continue;
        if (kind < 10) { /* short form: same line, one byte of columns */
            p++;
            continue;
        }
        if (kind < 13) { /* one-line form: delta 0-2, two bytes of columns */
            line += kind - 10;
            p += 2;
        } else { /* 13: no columns, 14: long form; both start with a signed varint delta */
            if (p >= end)
                break;
            unsigned v = *p++;
            unsigned long long val = v & 63;
            int shift = 6;
            while ((v & 64) && p < end && shift < 60) {
                v = *p++;
                val |= (unsigned long long)(v & 63) << shift;
                shift += 6;
            }
            line += (val & 1) ? -(long long)(val >> 1) : (long long)(val >> 1);
            if (kind == 14) { /* end line, start and end columns: skip three varints */
                for (int j = 0; j < 3; j++) {
                    while (p < end && (*p++ & 64))
                        ;
                }
            }
        }
        if (line > best)
            best = line;
    }
    return PyLong_FromLongLong(first + best);
}

/* --- the module ------------------------------------------------------------------------ */

static int exec_module(PyObject *m) {
    PyObject *tp = PyType_FromModuleAndSpec(m, &groups_spec, NULL);
    if (tp == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(m, "Groups", tp);
    Py_DECREF(tp);
    return rc;
}

static PyMethodDef methods[] = {
    {"samples", (PyCFunction)(void (*)(void))samples, METH_FASTCALL, samples_doc},
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL, encode_doc},
    {"last_line", (PyCFunction)(void (*)(void))last_line, METH_FASTCALL, last_line_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_traces", "tracemalloc traces grouped and named in C.", 0,
    methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__traces(void) { return PyModuleDef_Init(&module); }
