/* The calling thread's stack as a tuple of Frames, read through a table of known frames.
 *
 * frames.stack_now's C twin, for the CPU profile's SIGPROF tick on the main thread (also the
 * trace's CPU track): there the tick runs 100 times per second of the thread's CPU, between
 * two bytecodes of whatever the thread was doing, and its Python twin (a C-iterator walk,
 * then one dict lookup per frame keyed by a (code, line) tuple, which hashes the code
 * object's contents each time) took about 25 us of a 40-deep stack. Here the walk and the
 * lookups are one loop over a table keyed by the code object's address and the line: no
 * allocation when every (code, line) is known (issue 8, item 13).
 *
 * Only for the calling thread's own frames, or frames that are not running: another
 * thread's frames must be read with frames.current_stacks (see frames.py).
 *
 * A miss calls make(code, line, globals), which returns the Frame (and may run any Python
 * code); the table then holds strong references to the code object and the Frame. It is
 * cleared when it holds max_entries, as the Python cache is.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject *code; /* NULL: an empty slot */
    int line;
    PyObject *frame;
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *make;
    Entry *slots;
    Py_ssize_t size; /* a power of two */
    Py_ssize_t used;
    Py_ssize_t max_entries;
} FrameTable;

static Py_ssize_t
slot_of(const FrameTable *t, const PyObject *code, int line)
{
    uint64_t h = ((uint64_t)(uintptr_t)code >> 4) * 0x9E3779B97F4A7C15ULL;
    h ^= (uint64_t)(uint32_t)line * 0xC2B2AE3D27D4EB4FULL;
    Py_ssize_t mask = t->size - 1;
    Py_ssize_t i = (Py_ssize_t)(h >> 17) & mask;
    while (t->slots[i].code != NULL && (t->slots[i].code != code || t->slots[i].line != line))
        i = (i + 1) & mask;
    return i;
}

static void
table_clear_entries(FrameTable *t)
{
    if (t->slots == NULL)
        return;
    Entry *slots = t->slots;
    Py_ssize_t size = t->size;
    /* Detach first: a Frame's or code object's deallocation may run code that reads us. */
    t->slots = NULL;
    t->size = t->used = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        Py_XDECREF(slots[i].code);
        Py_XDECREF(slots[i].frame);
    }
    PyMem_Free(slots);
}

static int
table_alloc(FrameTable *t, Py_ssize_t size)
{
    Entry *slots = PyMem_Calloc((size_t)size, sizeof(Entry));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->slots = slots;
    t->size = size;
    t->used = 0;
    return 0;
}

/* Double the table, keeping its entries. 0, or -1 with an error set. */
static int
table_grow(FrameTable *t)
{
    Entry *old = t->slots;
    Py_ssize_t old_size = t->size, used = t->used;
    if (table_alloc(t, old_size * 2) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < old_size; i++) {
        if (old[i].code != NULL)
            t->slots[slot_of(t, old[i].code, old[i].line)] = old[i];
    }
    t->used = used;
    PyMem_Free(old);
    return 0;
}

/* Return a new reference to the Frame of (code, line), made on a miss. NULL on error. */
static PyObject *
table_frame(FrameTable *t, PyFrameObject *f, PyCodeObject *code, int line)
{
    if (t->slots == NULL && table_alloc(t, 1024) < 0)
        return NULL;
    Py_ssize_t i = slot_of(t, (PyObject *)code, line);
    if (t->slots[i].code != NULL)
        return Py_NewRef(t->slots[i].frame);
    PyObject *globals = PyFrame_GetGlobals(f);
    PyObject *lineno = PyLong_FromLong(line);
    PyObject *frame = NULL;
    if (globals != NULL && lineno != NULL)
        frame = PyObject_CallFunctionObjArgs(t->make, (PyObject *)code, lineno, globals, NULL);
    Py_XDECREF(globals);
    Py_XDECREF(lineno);
    if (frame == NULL)
        return NULL;
    /* make() ran Python code: the table may have been cleared or grown meanwhile. */
    if (t->slots == NULL && table_alloc(t, 1024) < 0)
        goto fail;
    if (t->used >= t->max_entries) {
        table_clear_entries(t);
        if (table_alloc(t, 1024) < 0)
            goto fail;
    }
    if ((t->used + 1) * 2 > t->size && table_grow(t) < 0)
        goto fail;
    i = slot_of(t, (PyObject *)code, line);
    if (t->slots[i].code == NULL) {
        t->slots[i].code = Py_NewRef((PyObject *)code);
        t->slots[i].line = line;
        t->slots[i].frame = Py_NewRef(frame);
        t->used++;
    }
    return frame;
fail:
    Py_DECREF(frame);
    return NULL;
}

PyDoc_STRVAR(stack_doc,
"stack(frame, max_depth) -> tuple of Frames\n\n"
"The Frames of frame and its callers, innermost first, at most max_depth of them. Only\n"
"for the calling thread's own frames or frames that are not running.");

static PyObject *
table_stack(FrameTable *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stack takes (frame, max_depth)");
        return NULL;
    }
    PyObject *first = args[0];
    Py_ssize_t max_depth = PyLong_AsSsize_t(args[1]);
    if (max_depth == -1 && PyErr_Occurred())
        return NULL;
    if (first != Py_None && !PyFrame_Check(first)) {
        PyErr_SetString(PyExc_TypeError, "stack() needs a frame or None");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    PyFrameObject *f = first == Py_None ? NULL : (PyFrameObject *)Py_NewRef(first);
    while (f != NULL && PyList_GET_SIZE(out) < max_depth) {
        PyCodeObject *code = PyFrame_GetCode(f);
        int line = PyFrame_GetLineNumber(f);
        PyObject *frame = table_frame(self, f, code, line < 0 ? 0 : line);
        Py_DECREF(code);
        if (frame == NULL || PyList_Append(out, frame) < 0) {
            Py_XDECREF(frame);
            Py_DECREF(f);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(frame);
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

static PyObject *
table_len(FrameTable *self, PyObject *unused)
{
    return PyLong_FromSsize_t(self->used);
}

static PyObject *
table_clear_method(FrameTable *self, PyObject *unused)
{
    table_clear_entries(self);
    Py_RETURN_NONE;
}

static PyMethodDef table_methods[] = {
    {"stack", (PyCFunction)(void (*)(void))table_stack, METH_FASTCALL, stack_doc},
    {"entries", (PyCFunction)table_len, METH_NOARGS, "entries() -> how many frames are known"},
    {"clear", (PyCFunction)table_clear_method, METH_NOARGS, "clear() -> forget every frame"},
    {NULL, NULL, 0, NULL},
};

static int
table_init(FrameTable *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"make", "max_entries", NULL};
    PyObject *make;
    Py_ssize_t max_entries = 200000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|n", kwlist, &make, &max_entries))
        return -1;
    if (!PyCallable_Check(make) || max_entries < 1) {
        PyErr_SetString(PyExc_TypeError, "FrameTable(make, max_entries=200000) needs a callable");
        return -1;
    }
    Py_XSETREF(self->make, Py_NewRef(make));
    self->max_entries = max_entries;
    table_clear_entries(self);
    return 0;
}

static int
table_traverse(FrameTable *self, visitproc visit, void *arg)
{
    Py_VISIT(self->make);
    for (Py_ssize_t i = 0; i < self->size; i++) {
        Py_VISIT(self->slots[i].code);
        Py_VISIT(self->slots[i].frame);
    }
    return 0;
}

static int
table_clear(FrameTable *self)
{
    Py_CLEAR(self->make);
    table_clear_entries(self);
    return 0;
}

static void
table_dealloc(FrameTable *self)
{
    PyObject_GC_UnTrack(self);
    table_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject FrameTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_pprof._stacks.FrameTable",
    .tp_doc = "FrameTable(make, max_entries=200000): the Frames of known (code, line) pairs.",
    .tp_basicsize = sizeof(FrameTable),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_clear,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
};

static int
exec_module(PyObject *m)
{
    if (PyType_Ready(&FrameTableType) < 0)
        return -1;
    return PyModule_AddObjectRef(m, "FrameTable", (PyObject *)&FrameTableType);
}

/* A static type (FrameTableType): one interpreter only, and the GIL (see native.py). */
static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stacks", "The calling thread's stack as Frames, in C.", 0, NULL,
    slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__stacks(void) { return PyModuleDef_Init(&module); }
