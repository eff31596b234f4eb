/* The execution trace's loop-step hook in C: what asgi_pprof/trace_hook.py's run_step does
 * in Python, for every step of every asyncio loop while a /debug/pprof/trace capture runs.
 *
 * A StepHook replaces asyncio.Handle._run (a class attribute) for the capture. For each
 * step it calls the original Handle._run (so a callback's exception reaches asyncio's
 * call_exception_handler exactly as before, and SystemExit/KeyboardInterrupt propagate),
 * times it with the clock of time.perf_counter_ns(), and records what the Python hook
 * appends to the recorder's bounded list: held in C (HeldRecord), made the same tuples
 * only when the trace is written (take_records). What is rare (a task's first step,
 * a loop not seen yet, a request's label, a callback that is not a function, a method or
 * a cached builtin, the bound) calls back into the recorder's Python methods.
 *
 * The hook is a method descriptor (Py_TPFLAGS_METHOD_DESCRIPTOR): `handle._run()` calls it
 * with the handle, without making a bound method per step.
 *
 * Every step holds its own reference to the capture it started with, so a capture that
 * ends during a step (the trace request's own step ends it) is freed only after that step
 * recorded. Only ever called with the GIL held; the free-threaded build is refused by the
 * Python side (trace_hook.py), which never imports this module there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Record kinds: trace_events.STEP and trace_events.DONE. */
#define KIND_STEP 0
#define KIND_GC 2
#define KIND_NEW 3
#define KIND_DONE 4

#if PY_VERSION_HEX >= 0x030D0000
#define lookup_attr PyObject_GetOptionalAttr
#else
#define lookup_attr _PyObject_LookupAttr
#endif

static PyObject *s_callback, *s_loop, *s_get_name, *s_get_coro, *s_cr_code, *s_done,
    *s_cancelled, *s_exception, *s_name, *s_self, *s_records, *s_finished,
    *s_see_loop, *s_full, *s_cancelled_state, *s_result_state,
    *s_exception_state, *s_code, *s_get_loop, *s_type, *s_path, *s_method, *s_scope, *s_http,
    *s_websocket, *s_start, *s_generation, *s_collected, *s_uncollectable, *k_step, *k_gc,
    *k_new, *k_done, *k_minus_one, *k_zero;

/* The clock of time.perf_counter_ns(): the other records of a trace are timed with it. */
static inline int64_t
now_ns(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    (void)PyTime_PerfCounterRaw(&t);
    return (int64_t)t;
#else
    return (int64_t)_PyTime_GetPerfCounter();
#endif
}

/* --- a capture --------------------------------------------------------------------------- */

/* A loop step or a task's end, held in C until the trace is written: trace_events' STEP
 * record (key == NULL) or DONE record, made a tuple only by take_records (in the writer's
 * thread). A tuple and two ints per step made on the loop cost it ~2.5 % of a request's
 * CPU, far beyond their instructions (allocation, and the cache lines they take). */
typedef struct {
    int64_t t0;          /* STEP: when it started */
    int64_t t1;          /* STEP: when it ended; DONE: when the task finished */
    PyObject *loop_id;   /* id(loop), the capture's cached int */
    PyObject *what;      /* STEP: a code object or a name; DONE: the coroutine's code */
    PyObject *name;      /* the task's name, NULL for a callback (None) */
    PyObject *req;       /* the request number, NULL for none (None) */
    PyObject *key;       /* DONE: id(task); NULL: a STEP */
    PyObject *state;     /* DONE: "result", "exception" or "cancelled" */
    unsigned long ident; /* DONE: the thread's ident */
} HeldRecord;

typedef struct {
    PyObject_HEAD
    PyObject *rec;          /* the Python recorder (tracing._Recorder) */
    PyObject *seen;         /* set: ids of tasks whose first step was seen */
    PyObject *loop;         /* the loop of the trace request: its new tasks get NEW records */
    PyObject *existing;     /* set: ids of that loop's tasks made before the capture */
    PyObject *requests;     /* trace_routes.Requests: labels what by_path does not know */
    PyObject *request_of;   /* requests.of_task: id(task) -> request number */
    PyObject *scopes;       /* requests.scopes: request number -> scope, until labelled */
    PyObject *labels;       /* requests.labels: request number -> label */
    PyObject *by_path;      /* requests.by_path: (method, path) -> label */
    PyObject *scope_at;     /* requests.scope_at: code -> where its scope was, or False */
    PyObject *numbers;      /* requests.numbers: an iterator of request numbers */
    PyObject *last_loop;    /* the loop of the last recorded step (strong: never a reused address) */
    PyObject *last_loop_id; /* id(last_loop) */
    PyObject *records;      /* the recorder's list of records (never rebound during a capture) */
    PyObject *last_code;    /* the code of the last task_request's coroutine (strong) ... */
    PyObject *last_at;      /* ... and scope_at[last_code]: most tasks run one coroutine, and
                             * 3.11 does not cache a code object's hash (~1 500 instructions) */
    HeldRecord *held;       /* the steps and task ends recorded in C, in order: */
    Py_ssize_t held_from;   /* held[held_from:n_held] (the first ones taken already) */
    Py_ssize_t n_held;
    Py_ssize_t held_room;
    Py_ssize_t limit;       /* of records in all: the list's and the held ones */
    int64_t step_start;
    int64_t step_end;
    int64_t gc_start; /* perf_counter_ns at the running collection's "start" */
    /* The wall-clock sampler's turn (see capture_wait): `want` is set while it waits for
     * the GIL, and a loop step about to start hands the GIL over instead of keeping it. */
    pthread_mutex_t turn_mu;
    pthread_cond_t turn_cv; /* on CLOCK_MONOTONIC */
    int turn_ready;         /* turn_mu and turn_cv initialised */
    int want;               /* atomic: the sampler waits for the GIL */
    int64_t sampled_at;     /* atomic: now_ns() of the last note_sample() (0: none yet) */
    int stopped;            /* under turn_mu: stop_waits() was called */
    pid_t pid;              /* the process that made them (a forked child never waits) */
} StepCapture;

#define CAPTURE_OBJECTS(X)                                                                   \
    X(rec) X(seen) X(loop) X(existing) X(requests) X(request_of) X(scopes) X(labels)         \
        X(by_path) X(scope_at) X(numbers) X(last_loop) X(last_loop_id) X(records) X(last_code) \
            X(last_at)

static int
capture_traverse(StepCapture *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    CAPTURE_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int
capture_clear(StepCapture *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    CAPTURE_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void untrack_atomic(PyObject *rec);

/* Release n records taken from a capture (their items are ints, strings and code objects:
 * no finaliser runs). */
static void
release_records(HeldRecord *held, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        HeldRecord *r = &held[i];
        Py_XDECREF(r->loop_id);
        Py_XDECREF(r->what);
        Py_XDECREF(r->name);
        Py_XDECREF(r->req);
        Py_XDECREF(r->key);
        Py_XDECREF(r->state);
    }
}

/* Return how many records the capture holds in C. */
static inline Py_ssize_t
n_held(StepCapture *self)
{
    return self->n_held - self->held_from;
}

/* Move the first (up to) max held records to a new buffer: return it (*n records, NULL
 * with MemoryError set if it could not be made); the capture holds the rest. */
static HeldRecord *
take_first(StepCapture *self, Py_ssize_t max, Py_ssize_t *n)
{
    Py_ssize_t k = n_held(self);
    if (max >= 0 && max < k)
        k = max;
    *n = 0;
    HeldRecord *out = PyMem_New(HeldRecord, (size_t)(k ? k : 1));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (k)
        memcpy(out, self->held + self->held_from, (size_t)k * sizeof *out);
    self->held_from += k;
    if (self->held_from == self->n_held)
        self->held_from = self->n_held = 0; /* all taken: fill from the start again */
    *n = k;
    return out;
}

static void
drop_held(StepCapture *self)
{
    HeldRecord *held = self->held;
    Py_ssize_t from = self->held_from, n = self->n_held;
    self->held = NULL;
    self->held_from = self->n_held = self->held_room = 0;
    if (held != NULL)
        release_records(held + from, n - from);
    PyMem_Free(held);
}

/* Return a zeroed slot at the end of the held records, NULL (MemoryError set) if none. */
static HeldRecord *
hold(StepCapture *self)
{
    if (self->n_held == self->held_room) {
        Py_ssize_t room = self->held_room ? self->held_room * 2 : 4096;
        HeldRecord *held = PyMem_Resize(self->held, HeldRecord, (size_t)room);
        if (held == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        self->held = held;
        self->held_room = room;
    }
    HeldRecord *r = &self->held[self->n_held++];
    memset(r, 0, sizeof *r);
    return r;
}

/* Hold a record of the step that ran from t0 to t1 on the last loop (name and req may be
 * NULL: None); a DONE record is one with its key, state and ident set too. NULL, with
 * MemoryError set, if there is no room. */
static HeldRecord *
hold_step(StepCapture *self, int64_t t0, int64_t t1, PyObject *what, PyObject *name,
          PyObject *req)
{
    HeldRecord *r = hold(self);
    if (r == NULL)
        return NULL;
    r->t0 = t0;
    r->t1 = t1;
    r->loop_id = Py_NewRef(self->last_loop_id);
    r->what = Py_NewRef(what);
    r->name = Py_XNewRef(name);
    r->req = Py_XNewRef(req);
    return r;
}

/* Return how many records the capture holds, the list's and the held ones. */
static inline Py_ssize_t
n_records(StepCapture *self, PyObject *records)
{
    return PyList_GET_SIZE(records) + n_held(self);
}

static void
capture_dealloc(StepCapture *self)
{
    PyObject_GC_UnTrack(self);
    capture_clear(self);
    drop_held(self);
    if (self->turn_ready && self->pid == getpid()) {
        pthread_cond_destroy(&self->turn_cv);
        pthread_mutex_destroy(&self->turn_mu);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
capture_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    StepCapture *self = (StepCapture *)PyType_GenericNew(type, args, kwds);
    if (self == NULL)
        return NULL;
    pthread_condattr_t attr;
    int err = pthread_condattr_init(&attr);
    if (err == 0) {
        err = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        if (err == 0 && (err = pthread_mutex_init(&self->turn_mu, NULL)) == 0) {
            err = pthread_cond_init(&self->turn_cv, &attr);
            if (err != 0)
                pthread_mutex_destroy(&self->turn_mu);
        }
        pthread_condattr_destroy(&attr);
    }
    if (err != 0) {
        Py_DECREF(self);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->turn_ready = 1;
    self->pid = getpid();
    return (PyObject *)self;
}

/* An absolute CLOCK_MONOTONIC time `ns` from now. */
static struct timespec
deadline_in(int64_t ns)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    int64_t total = (int64_t)t.tv_nsec + ns % 1000000000;
    t.tv_sec += (time_t)(ns / 1000000000 + total / 1000000000);
    t.tv_nsec = (long)(total % 1000000000);
    return t;
}

/* capture.wait(timeout[, stall_ns]): the wall-clock sampler's sleep between samples;
 * return True once stop_waits() was called.
 *
 * The GIL is let go for the sleep, and taking it back is where the sampler's cost was:
 * CPython wakes a thread waiting for the GIL each time its holder lets it go, and a busy
 * loop lets it go and takes it straight back around every select(): measured, the sampler
 * thread woke ~400 times per sample (6 500 context switches a second at 16 samples a
 * second instead of 50, 100 ms of CPU a second), and every futile wake-up was a futex
 * call on the loop's thread too. So it says it wants the GIL (`want`), and the next loop
 * step to start hands it over (yield_turn) instead of racing for it. A loop stuck in one
 * long step never gets there: the GIL then changes hands as before (within the switch
 * interval, or at once while the step waits without it), one hand-over per sample.
 *
 * And while the main thread's own CPU ticks take the samples (note_sample(): in its
 * SIGPROF handler it holds the GIL already, so a sample there costs no hand-over at all),
 * the sleep goes on without the GIL: a sample is due only `timeout` after the last one
 * taken anywhere, or as soon as a loop step has run `stall_ns` (when > 0), where the
 * finer rate is this thread's. Looked at again every two timeouts, not every one: each
 * look is a wake-up, and the cost of one here is a context switch (~50 us of CPU on a
 * busy VM, measured). */
static PyObject *
capture_wait(StepCapture *self, PyObject *args)
{
    double timeout;
    long long stall_ns = 0;
    if (!PyArg_ParseTuple(args, "d|L:wait", &timeout, &stall_ns))
        return NULL;
    if (!(timeout >= 0.0) || timeout > 3600.0 || stall_ns < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "wait() takes a timeout between 0 and 3600 s and stall_ns >= 0");
        return NULL;
    }
    if (self->pid != getpid()) {
        PyErr_SetString(PyExc_RuntimeError, "a capture made before fork() cannot wait");
        return NULL;
    }
    int stopped;
    Py_BEGIN_ALLOW_THREADS
    int64_t period = (int64_t)(timeout * 1e9);
    int64_t wake_at = now_ns() + period;
    pthread_mutex_lock(&self->turn_mu);
    for (;;) {
        int64_t left = wake_at - now_ns();
        struct timespec until = deadline_in(left > 0 ? left : 0);
        while (!self->stopped &&
               pthread_cond_timedwait(&self->turn_cv, &self->turn_mu, &until) == 0) {
        }
        if (self->stopped)
            break;
        int64_t now = now_ns();
        if (stall_ns > 0) {
            int64_t start = __atomic_load_n(&self->step_start, __ATOMIC_RELAXED);
            int64_t end = __atomic_load_n(&self->step_end, __ATOMIC_RELAXED);
            if (start > end && now - start >= stall_ns)
                break;
        }
        int64_t sampled = __atomic_load_n(&self->sampled_at, __ATOMIC_RELAXED);
        if (sampled == 0 || now - sampled >= period)
            break;
        wake_at = sampled + 2 * period;
    }
    stopped = self->stopped;
    if (!stopped)
        __atomic_store_n(&self->want, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&self->turn_mu);
    Py_END_ALLOW_THREADS
    if (!stopped) {
        pthread_mutex_lock(&self->turn_mu);
        __atomic_store_n(&self->want, 0, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&self->turn_cv); /* a step handing over may go on */
        pthread_mutex_unlock(&self->turn_mu);
    }
    return PyBool_FromLong(stopped);
}

/* capture.note_sample(): a wall-clock sample was just taken elsewhere (the main thread's
 * CPU tick): wait() sleeps on. */
static PyObject *
capture_note_sample(StepCapture *self, PyObject *unused)
{
    __atomic_store_n(&self->sampled_at, now_ns(), __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
capture_stop_waits(StepCapture *self, PyObject *unused)
{
    if (self->pid == getpid()) {
        pthread_mutex_lock(&self->turn_mu);
        self->stopped = 1;
        pthread_cond_broadcast(&self->turn_cv);
        pthread_mutex_unlock(&self->turn_mu);
    }
    Py_RETURN_NONE;
}

/* At the start of a loop step while the sampler waits for the GIL: let it go until the
 * sampler has it (at most 2 ms: it may have taken it already, or be gone). */
static void
yield_turn(StepCapture *cap)
{
    if (cap->pid != getpid())
        return;
    PyThreadState *ts = PyEval_SaveThread();
    struct timespec until = deadline_in(2000000);
    pthread_mutex_lock(&cap->turn_mu);
    while (__atomic_load_n(&cap->want, __ATOMIC_ACQUIRE) && !cap->stopped &&
           pthread_cond_timedwait(&cap->turn_cv, &cap->turn_mu, &until) == 0) {
    }
    pthread_mutex_unlock(&cap->turn_mu);
    PyEval_RestoreThread(ts);
}

/* Set *slot to a new reference to requests.<name>, which must be of type tp (NULL: an
 * iterator). 0, or -1 with an error set. */
static int
requests_part(PyObject *requests, const char *name, PyTypeObject *tp, PyObject **slot)
{
    PyObject *v = PyObject_GetAttrString(requests, name);
    if (v == NULL)
        return -1;
    if (tp != NULL ? !Py_IS_TYPE(v, tp) : !PyIter_Check(v)) {
        PyErr_Format(PyExc_TypeError, "requests.%s must be %s", name,
                     tp != NULL ? tp->tp_name : "an iterator");
        Py_DECREF(v);
        return -1;
    }
    Py_XSETREF(*slot, v);
    return 0;
}

static int
capture_init(StepCapture *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"recorder", "seen", "limit", "loop", "existing", "requests", NULL};
    PyObject *rec, *seen, *loop, *existing, *requests;
    Py_ssize_t limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!nOO!O:StepCapture", kwlist, &rec,
                                     &PySet_Type, &seen, &limit, &loop, &PySet_Type, &existing,
                                     &requests))
        return -1;
    if (requests_part(requests, "of_task", &PyDict_Type, &self->request_of) < 0 ||
        requests_part(requests, "scopes", &PyDict_Type, &self->scopes) < 0 ||
        requests_part(requests, "labels", &PyDict_Type, &self->labels) < 0 ||
        requests_part(requests, "by_path", &PyDict_Type, &self->by_path) < 0 ||
        requests_part(requests, "scope_at", &PyDict_Type, &self->scope_at) < 0 ||
        requests_part(requests, "numbers", NULL, &self->numbers) < 0)
        return -1;
    PyObject *records = PyObject_GetAttr(rec, s_records);
    if (records == NULL)
        return -1;
    if (!PyList_CheckExact(records)) {
        PyErr_SetString(PyExc_TypeError, "the recorder's records must be a list");
        Py_DECREF(records);
        return -1;
    }
    Py_XSETREF(self->records, records);
    Py_CLEAR(self->last_code);
    Py_CLEAR(self->last_at);
    Py_XSETREF(self->rec, Py_NewRef(rec));
    Py_XSETREF(self->seen, Py_NewRef(seen));
    Py_XSETREF(self->loop, Py_NewRef(loop));
    Py_XSETREF(self->existing, Py_NewRef(existing));
    Py_XSETREF(self->requests, Py_NewRef(requests));
    Py_CLEAR(self->last_loop);
    Py_CLEAR(self->last_loop_id);
    self->limit = limit;
    self->step_start = self->step_end = self->gc_start = 0;
    self->sampled_at = 0;
    return 0;
}

static PyObject *
capture_step_times(StepCapture *self, PyObject *unused)
{
    return Py_BuildValue("(LL)", (long long)self->step_start, (long long)self->step_end);
}

static PyObject *
capture_held(StepCapture *self, PyObject *unused)
{
    return PyLong_FromSsize_t(n_held(self));
}

/* take_records([max]): the first max held records (all without it) as tuples. They are
 * moved out first: making the tuples may run a collection, and so other threads' code (a
 * loop step that ends meanwhile holds its records for a later take). ~340 ns a record,
 * with the GIL held throughout: the writer takes a trace's records a chunk at a time, so
 * the loop gets the GIL between chunks. */
static PyObject *
capture_take_records(StepCapture *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t max = -1;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "take_records takes at most one argument (max)");
        return NULL;
    }
    if (nargs == 1 && ((max = PyLong_AsSsize_t(args[0])) == -1 && PyErr_Occurred()))
        return NULL;
    Py_ssize_t n;
    HeldRecord *held = take_first(self, max, &n);
    if (held == NULL)
        return NULL;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        HeldRecord *r = &held[i];
        PyObject *rec, *name = r->name ? r->name : Py_None, *req = r->req ? r->req : Py_None;
        PyObject *t1 = PyLong_FromLongLong(r->t1);
        if (t1 == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        if (r->key == NULL) {
            PyObject *t0 = PyLong_FromLongLong(r->t0);
            rec = t0 == NULL ? NULL
                             : PyTuple_Pack(7, k_step, r->loop_id, t0, t1, r->what, name, req);
            Py_XDECREF(t0);
        }
        else {
            PyObject *ident = PyLong_FromUnsignedLong(r->ident);
            rec = ident == NULL ? NULL
                                : PyTuple_Pack(9, k_done, ident, t1, r->loop_id, name, r->what,
                                               r->key, req, r->state);
            Py_XDECREF(ident);
        }
        Py_DECREF(t1);
        if (rec == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        untrack_atomic(rec);
        PyList_SET_ITEM(out, i, rec);
    }
done:
    release_records(held, n);
    PyMem_Free(held);
    return out;
}

static PyObject *
capture_drop_records(StepCapture *self, PyObject *unused)
{
    drop_held(self);
    Py_RETURN_NONE;
}

static PyObject *capture_on_gc(StepCapture *self, PyObject *const *args, Py_ssize_t nargs);
static PyObject *capture_task_created(StepCapture *self, PyObject *const *args, Py_ssize_t nargs);
static PyObject *capture_finished(StepCapture *self, PyObject *n);

static PyMethodDef capture_methods[] = {
    {"step_times", (PyCFunction)capture_step_times, METH_NOARGS,
     "Return (start, end) in perf_counter_ns of the running or last loop step."},
    {"held", (PyCFunction)capture_held, METH_NOARGS,
     "Return how many step and done records are held in C (not in the records list)."},
    {"take_records", (PyCFunction)(void (*)(void))capture_take_records, METH_FASTCALL,
     "take_records([max]) -> the first max held records (all without max) as STEP and\n"
     "DONE tuples, in order; they are held no more."},
    {"drop_records", (PyCFunction)capture_drop_records, METH_NOARGS,
     "Drop the held records; None."},
    {"on_gc", (PyCFunction)(void (*)(void))capture_on_gc, METH_FASTCALL,
     "on_gc(phase, info): a gc.callbacks entry recording each collection (tracing._Recorder.\n"
     "on_gc's twin: under load young collections run thousands of times a second)."},
    {"task_created", (PyCFunction)(void (*)(void))capture_task_created, METH_FASTCALL,
     "task_created(key, coro, code) -> request number or None: trace_routes.Requests.\n"
     "task_created's twin, for the task factory of loops whose steps are not seen (uvloop)."},
    {"wait", (PyCFunction)capture_wait, METH_VARARGS,
     "wait(timeout, stall_ns=0) -> bool: sleep timeout s without the GIL (longer while\n"
     "note_sample() is called: until timeout s after the last one, or a loop step has run\n"
     "stall_ns), then take the GIL back from the next loop step rather than racing for it;\n"
     "True once stop_waits() was called."},
    {"note_sample", (PyCFunction)capture_note_sample, METH_NOARGS,
     "note_sample(): a wall-clock sample was just taken elsewhere; wait() sleeps on."},
    {"stop_waits", (PyCFunction)capture_stop_waits, METH_NOARGS,
     "stop_waits(): end every wait() now and from now on."},
    {"finished", (PyCFunction)capture_finished, METH_O,
     "finished(n): label request n, whose task finished (Requests.finished's twin, with\n"
     "the (method, path) cache)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StepCaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asgi_pprof._tracestep.StepCapture",
    .tp_basicsize = sizeof(StepCapture),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One capture's state, read by StepHook on every loop step.",
    .tp_new = capture_new,
    .tp_init = (initproc)capture_init,
    .tp_dealloc = (destructor)capture_dealloc,
    .tp_traverse = (traverseproc)capture_traverse,
    .tp_clear = (inquiry)capture_clear,
    .tp_methods = capture_methods,
};

/* --- the hook ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *orig;          /* Handle._run before the capture */
    PyObject *task_types;    /* tuple of the task types (asyncio.Task, its Python twin) */
    PyObject *builtin_names; /* dict: (owner type, method name) -> name, shared with Python */
    PyObject *callback_name; /* trace_hook.callback_name: the name of any other callback */
    PyObject *code_of;       /* trace_hook.code_of: the code of a coroutine without cr_code */
    StepCapture *capture;    /* the running capture, NULL when none */
} StepHook;

static int
hook_traverse(StepHook *self, visitproc visit, void *arg)
{
    Py_VISIT(self->orig);
    Py_VISIT(self->task_types);
    Py_VISIT(self->builtin_names);
    Py_VISIT(self->callback_name);
    Py_VISIT(self->code_of);
    Py_VISIT(self->capture);
    return 0;
}

static int
hook_clear(StepHook *self)
{
    Py_CLEAR(self->orig);
    Py_CLEAR(self->task_types);
    Py_CLEAR(self->builtin_names);
    Py_CLEAR(self->callback_name);
    Py_CLEAR(self->code_of);
    Py_CLEAR(self->capture);
    return 0;
}

static void
hook_dealloc(StepHook *self)
{
    PyObject_GC_UnTrack(self);
    hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *hook_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames);

static PyObject *
hook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"original", "task_types", "builtin_names", "callback_name",
                             "code_of", NULL};
    PyObject *orig, *task_types, *builtin_names, *callback_name, *code_of;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O!OO:StepHook", kwlist, &orig,
                                     &PyTuple_Type, &task_types, &PyDict_Type, &builtin_names,
                                     &callback_name, &code_of))
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(task_types); i++) {
        if (!PyType_Check(PyTuple_GET_ITEM(task_types, i))) {
            PyErr_SetString(PyExc_TypeError, "task_types must be a tuple of types");
            return NULL;
        }
    }
    StepHook *self = (StepHook *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = hook_vectorcall;
    self->orig = Py_NewRef(orig);
    self->task_types = Py_NewRef(task_types);
    self->builtin_names = Py_NewRef(builtin_names);
    self->callback_name = Py_NewRef(callback_name);
    self->code_of = Py_NewRef(code_of);
    self->capture = NULL;
    return (PyObject *)self;
}

/* As a class attribute: `handle._run` is the hook bound to the handle. */
static PyObject *
hook_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

/* Save the pending exception (the step's SystemExit/KeyboardInterrupt) while recording. */
typedef struct {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *type, *value, *tb;
#endif
} SavedError;

static void
save_error(SavedError *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    e->exc = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&e->type, &e->value, &e->tb);
#endif
}

static void
restore_error(SavedError *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(e->exc);
#else
    PyErr_Restore(e->type, e->value, e->tb);
#endif
}

/* Recording failed after the step raised: raise the new error, the step's as its context
 * (as an exception in a Python `finally` would). */
static void
chain_error(SavedError *e)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *now = PyErr_GetRaisedException();
    if (now != NULL && e->exc != NULL)
        PyException_SetContext(now, e->exc); /* steals */
    else
        Py_XDECREF(e->exc);
    PyErr_SetRaisedException(now);
#else
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyErr_NormalizeException(&e->type, &e->value, &e->tb);
    if (v != NULL && e->value != NULL) {
        if (e->tb != NULL)
            PyException_SetTraceback(e->value, e->tb);
        PyException_SetContext(v, e->value); /* steals */
        e->value = NULL;
    }
    Py_XDECREF(e->type);
    Py_XDECREF(e->value);
    Py_XDECREF(e->tb);
    PyErr_Restore(t, v, tb);
#endif
}

/* Return a new reference to the name of a callback that is not a task's step: its code
 * object, or a str (trace_hook.run_step's rules, case by case). NULL on error. */
static PyObject *
callback_what(StepHook *hook, PyObject *cb, PyObject *owner)
{
    PyTypeObject *tp = Py_TYPE(cb);
    if (tp == &PyFunction_Type)
        return Py_NewRef(PyFunction_GET_CODE(cb));
    if (tp == &PyMethod_Type) {
        PyObject *code;
        if (lookup_attr(PyMethod_GET_FUNCTION(cb), s_code, &code) < 0)
            return NULL;
        if (code != NULL) {
            int truth = PyCode_Check(code) ? 1 : PyObject_IsTrue(code);
            if (truth > 0)
                return code;
            Py_DECREF(code);
            if (truth < 0)
                return NULL;
        }
    }
    else if (tp == &PyCFunction_Type && owner != NULL && owner != Py_None) {
        /* A builtin method, e.g. set.discard: named once per (owner type, name). */
        PyObject *name = PyObject_GetAttr(cb, s_name);
        if (name == NULL)
            return NULL;
        PyObject *key = PyTuple_Pack(2, (PyObject *)Py_TYPE(owner), name);
        Py_DECREF(name);
        if (key == NULL)
            return NULL;
        PyObject *known = PyDict_GetItemWithError(hook->builtin_names, key); /* borrowed */
        Py_DECREF(key);
        if (known != NULL) {
            int truth = PyObject_IsTrue(known);
            if (truth > 0)
                return Py_NewRef(known);
            if (truth < 0)
                return NULL;
        }
        else if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_CallOneArg(hook->callback_name, cb);
}

/* Return 1 if owner is a task (an instance of one of the task types), else 0. */
static int
is_task(StepHook *hook, PyObject *owner)
{
    if (owner == NULL || owner == Py_None)
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(hook->task_types); i++) {
        if (PyObject_TypeCheck(owner, (PyTypeObject *)PyTuple_GET_ITEM(hook->task_types, i)))
            return 1;
    }
    return 0;
}

/* Call obj.name(arg) for its effect. 0, or -1 with an error set. */
static int
call_for_effect(PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *r = PyObject_CallMethodOneArg(obj, name, arg);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Take rec (a new tuple) out of the collector's sight when no item of it is a tracked
 * container: such a tuple can be in no cycle, and a capture keeps up to trace_max_events
 * of them. Tracked, each would be scanned by every young collection until promoted, and
 * would then grow the old generation until full collections ran (issue 8, item 13).
 * CPython untracks such tuples itself, but only once a collection has scanned them. */
static void
untrack_atomic(PyObject *rec)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(rec); i++) {
        PyObject *item = PyTuple_GET_ITEM(rec, i);
        if (PyObject_IS_GC(item) && PyObject_GC_IsTracked(item))
            return;
    }
    PyObject_GC_UnTrack(rec);
}

/* Append rec (a new tuple) to records. 0, or -1 with an error set. */
static int
append_record(PyObject *records, PyObject *rec)
{
    untrack_atomic(rec);
    return PyList_Append(records, rec);
}

/* Return a new reference to the recorder's list of records (read once, at init: a getattr
 * per step cost ~370 instructions). Never NULL. */
static PyObject *
get_records(StepCapture *cap)
{
    return Py_NewRef(cap->records);
}

/* Return a new reference to the code object of a task's coroutine (None for an awaitable
 * that has none). NULL on error. */
static PyObject *
coro_code(StepHook *hook, PyObject *coro)
{
    PyObject *code;
    if (lookup_attr(coro, s_cr_code, &code) < 0)
        return NULL;
    if (code == NULL || code == Py_None) {
        Py_XDECREF(code);
        code = PyObject_CallOneArg(hook->code_of, coro);
    }
    return code;
}

/* Return a borrowed reference to info[key], or dflt when it is missing. NULL on error. */
static PyObject *
info_item(PyObject *info, PyObject *key, PyObject *dflt)
{
    if (!PyDict_Check(info))
        return dflt;
    PyObject *v = PyDict_GetItemWithError(info, key);
    if (v == NULL && !PyErr_Occurred())
        return dflt;
    return v;
}

static PyObject *
capture_on_gc(StepCapture *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "on_gc takes (phase, info)");
        return NULL;
    }
    int64_t t = now_ns();
    PyObject *phase = args[0], *info = args[1];
    if (phase == s_start ||
        (PyUnicode_Check(phase) && PyUnicode_Compare(phase, s_start) == 0)) {
        self->gc_start = t;
        Py_RETURN_NONE;
    }
    if (PyErr_Occurred()) /* PyUnicode_Compare failed */
        return NULL;
    PyObject *result = NULL, *records = NULL, *ident = NULL, *t0 = NULL, *t1 = NULL,
             *rec = NULL;
    records = get_records(self);
    t1 = PyLong_FromLongLong(t);
    if (records == NULL || t1 == NULL)
        goto done;
    if (n_records(self, records) >= self->limit) {
        if (call_for_effect(self->rec, s_full, t1) < 0) /* counts it as dropped */
            goto done;
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *gen = info_item(info, s_generation, k_minus_one);
    PyObject *collected = gen == NULL ? NULL : info_item(info, s_collected, k_zero);
    PyObject *uncollectable = collected == NULL ? NULL : info_item(info, s_uncollectable, k_zero);
    if (uncollectable == NULL)
        goto done;
    ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    t0 = self->gc_start ? PyLong_FromLongLong(self->gc_start) : Py_NewRef(t1);
    if (ident == NULL || t0 == NULL)
        goto done;
    rec = PyTuple_Pack(7, k_gc, ident, t0, t1, gen, collected, uncollectable);
    if (rec == NULL || append_record(records, rec) < 0)
        goto done;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(records);
    Py_XDECREF(ident);
    Py_XDECREF(t0);
    Py_XDECREF(t1);
    Py_XDECREF(rec);
    return result;
}

/* --- which request a task serves: trace_routes.find_scope's twin ---------------------------
 *
 * A task's coroutine that has not started holds only its arguments: what the coroutine's
 * tp_traverse visits (as gc.get_referents(coro) lists them) is its code, names and function,
 * then those arguments, in order. No frame object and no f_locals dict is made for it. */

#define MAX_REFS 32

typedef struct {
    int n;
    PyObject *items[MAX_REFS];
} Refs;

static int
collect_ref(PyObject *obj, void *arg)
{
    Refs *refs = (Refs *)arg;
    if (PyCell_Check(obj)) /* an argument a closure keeps: its value (as f_locals has it) */
        obj = PyCell_GET(obj);
    if (refs->n < MAX_REFS && obj != NULL)
        refs->items[refs->n++] = Py_NewRef(obj);
    return 0;
}

/* Return 1 if value is an ASGI http or websocket scope (a dict with a path), 0 if not, -1
 * on error. */
static int
is_scope(PyObject *value)
{
    if (!PyDict_CheckExact(value))
        return 0;
    PyObject *kind = PyDict_GetItemWithError(value, s_type); /* borrowed */
    if (kind == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyUnicode_Check(kind) ||
        (PyUnicode_Compare(kind, s_http) != 0 && PyUnicode_Compare(kind, s_websocket) != 0))
        return 0;
    return PyDict_Contains(value, s_path);
}

/* Return 1 if a class of tp's MRO defines name, 0 if none does, -1 on error. */
static int
class_defines(PyTypeObject *tp, PyObject *name)
{
    PyObject *mro = tp->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro))
        return 1; /* not ready: take the cautious path */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *d = PyType_GetDict(base); /* static builtin types keep theirs elsewhere */
#else
        PyObject *d = Py_XNewRef(base->tp_dict);
#endif
        if (d == NULL)
            return PyErr_Occurred() ? -1 : 1;
        int has = PyDict_Contains(d, name);
        Py_DECREF(d);
        if (has != 0)
            return has;
    }
    return 0;
}

/* Return a new reference to the scope that value is (attr 0) or holds as a plain instance
 * attribute `scope` (attr 1: never a class's, so no property or __getattr__ runs), NULL
 * when it has none (with an error set if the look failed). */
static PyObject *
scope_of(PyObject *value, int attr)
{
    if (!attr) {
        int yes = is_scope(value);
        return yes > 0 ? Py_NewRef(value) : NULL;
    }
    PyTypeObject *tp = Py_TYPE(value);
    /* Not a class (its __dict__ is a proxy), a function (its __dict__ would be made). */
    if (PyType_Check(value) || PyFunction_Check(value) || PyCode_Check(value))
        return NULL;
    if (tp->tp_dictoffset == 0 && !(tp->tp_flags & Py_TPFLAGS_MANAGED_DICT))
        return NULL;
    int in_class = class_defines(tp, s_scope);
    if (in_class < 0)
        return NULL;
    if (!in_class) {
        /* No class attribute, so no descriptor: the generic lookup reads the instance's
         * own attribute, without making its __dict__ (which would slow every later
         * attribute read of a server's request object: ~20 000 instructions per request). */
        PyObject *scope = PyObject_GenericGetAttr(value, s_scope);
        if (scope == NULL) {
            if (PyErr_ExceptionMatches(PyExc_AttributeError))
                PyErr_Clear();
            return NULL;
        }
        if (is_scope(scope) <= 0)
            Py_CLEAR(scope);
        return scope;
    }
    /* A class attribute `scope` (a property, a slot, a default): only the instance dict. */
    PyObject *d = PyObject_GenericGetDict(value, NULL);
    if (d == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError) ||
            PyErr_ExceptionMatches(PyExc_TypeError))
            PyErr_Clear();
        return NULL;
    }
    PyObject *scope = NULL;
    if (PyDict_CheckExact(d)) {
        scope = PyDict_GetItemWithError(d, s_scope); /* borrowed */
        Py_XINCREF(scope);
    }
    Py_DECREF(d);
    if (scope != NULL && is_scope(scope) <= 0)
        Py_CLEAR(scope);
    return scope;
}

/* Return a new reference to the scope a coroutine that has not started was called with,
 * NULL when there is none (an error set if the look failed). `known` is where the same code
 * had it last time (2 * index + attr, or NULL); *where is set to where it was found. */
static PyObject *
find_scope(PyObject *coro, PyObject *known, long *where)
{
    if (!PyCoro_CheckExact(coro) || Py_TYPE(coro)->tp_traverse == NULL)
        return NULL;
    Refs refs;
    refs.n = 0;
    (void)Py_TYPE(coro)->tp_traverse(coro, collect_ref, &refs); /* collect_ref never fails */
    PyObject *found = NULL;
    if (known != NULL && PyLong_CheckExact(known)) {
        long w = PyLong_AsLong(known);
        if (w >= 0 && (w >> 1) < refs.n) {
            found = scope_of(refs.items[w >> 1], (int)(w & 1));
            *where = w;
        }
    }
    for (int i = 0; found == NULL && !PyErr_Occurred() && i < refs.n; i++) {
        PyObject *item = refs.items[i];
        if (PyUnicode_Check(item)) /* its names */
            continue;
        for (int attr = 0; attr < 2 && found == NULL && !PyErr_Occurred(); attr++) {
            found = scope_of(item, attr);
            *where = 2L * i + attr;
        }
    }
    for (int i = 0; i < refs.n; i++)
        Py_DECREF(refs.items[i]);
    return found;
}

/* Drop key from a dict if there. 0, or -1 with an error set. */
static int
dict_discard(PyObject *dict, PyObject *key)
{
    if (PyDict_DelItem(dict, key) == 0)
        return 0;
    if (!PyErr_ExceptionMatches(PyExc_KeyError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* Return a new reference to the request number of a task at its first step (key: its id),
 * None if it serves none: trace_routes.Requests.task_created's twin. NULL on error. */
static PyObject *
task_request(StepCapture *cap, PyObject *key, PyObject *coro, PyObject *code)
{
    PyObject *known = NULL, *scope = NULL, *n = NULL;
    if (code == Py_None)
        goto none;
    if (code == cap->last_code)
        known = cap->last_at; /* borrowed, then held */
    else {
        known = PyDict_GetItemWithError(cap->scope_at, code); /* borrowed, then held */
        if (known == NULL && PyErr_Occurred())
            return NULL;
        if (known != NULL) {
            Py_XSETREF(cap->last_code, Py_NewRef(code));
            Py_XSETREF(cap->last_at, Py_NewRef(known));
        }
    }
    if (known == Py_False)
        goto none; /* this coroutine is not a server's request */
    Py_XINCREF(known);
    long where = 0;
    scope = find_scope(coro, known, &where);
    if (scope == NULL) {
        if (PyErr_Occurred())
            goto error;
        if (known == NULL && PyDict_SetItem(cap->scope_at, code, Py_False) < 0)
            goto error;
        Py_CLEAR(known);
        goto none;
    }
    if (known == NULL || !PyLong_CheckExact(known) || PyLong_AsLong(known) != where) {
        PyObject *w = PyLong_FromLong(where);
        if (w == NULL)
            goto error;
        int err = PyDict_SetItem(cap->scope_at, code, w);
        if (err == 0) {
            Py_XSETREF(cap->last_code, Py_NewRef(code));
            Py_XSETREF(cap->last_at, Py_NewRef(w));
        }
        Py_DECREF(w);
        if (err < 0)
            goto error;
    }
    n = PyIter_Next(cap->numbers);
    if (n == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "requests.numbers ran out");
        goto error;
    }
    if (PyDict_SetItem(cap->request_of, key, n) < 0 || PyDict_SetItem(cap->scopes, n, scope) < 0)
        goto error;
    Py_XDECREF(known);
    Py_DECREF(scope);
    return n;
error:
    Py_XDECREF(known);
    Py_XDECREF(scope);
    Py_XDECREF(n);
    return NULL;
none:
    if (dict_discard(cap->request_of, key) < 0) /* an id of a task gone before it finished */
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
capture_task_created(StepCapture *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "task_created takes (key, coro, code)");
        return NULL;
    }
    return task_request(self, args[0], args[1], args[2]);
}

/* A task's first step in this capture, before it runs (tracing._Recorder.first_step's
 * twin): note it seen, find the request it serves, and record it as created when it is a
 * new task of the trace request's loop. 0, or -1 with an error set. */
static int
first_step(StepHook *hook, StepCapture *cap, PyObject *task, PyObject *key)
{
    int ret = -1;
    PyObject *coro = NULL, *code = NULL, *req = NULL, *loop = NULL, *records = NULL,
             *t = NULL, *name = NULL, *ident = NULL, *loop_id = NULL, *rec = NULL;
    if (PySet_Add(cap->seen, key) < 0)
        goto done;
    coro = PyObject_CallMethodNoArgs(task, s_get_coro);
    if (coro == NULL || (code = coro_code(hook, coro)) == NULL)
        goto done;
    req = task_request(cap, key, coro, code);
    if (req == NULL)
        goto done;
    int existed = PySet_Discard(cap->existing, key); /* a later task with this id is new */
    if (existed != 0) {
        ret = existed < 0 ? -1 : 0;
        goto done;
    }
    loop = PyObject_CallMethodNoArgs(task, s_get_loop);
    if (loop == NULL)
        goto done;
    if (loop != cap->loop) { /* creation is tracked on the loop that serves the trace */
        ret = 0;
        goto done;
    }
    t = PyLong_FromLongLong(now_ns());
    records = get_records(cap);
    if (t == NULL || records == NULL)
        goto done;
    if (n_records(cap, records) < cap->limit) {
        name = PyObject_CallMethodNoArgs(task, s_get_name);
        ident = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
        loop_id = PyLong_FromVoidPtr(loop);
        if (name == NULL || ident == NULL || loop_id == NULL)
            goto done;
        rec = PyTuple_Pack(8, k_new, ident, t, loop_id, name, code, key, req);
        if (rec == NULL || append_record(records, rec) < 0)
            goto done;
    }
    else if (call_for_effect(cap->rec, s_full, t) < 0)
        goto done;
    ret = 0;
done:
    Py_XDECREF(coro);
    Py_XDECREF(code);
    Py_XDECREF(req);
    Py_XDECREF(loop);
    Py_XDECREF(records);
    Py_XDECREF(t);
    Py_XDECREF(name);
    Py_XDECREF(ident);
    Py_XDECREF(loop_id);
    Py_XDECREF(rec);
    return ret;
}

/* Label request n, whose task finished: from requests.by_path when its method and path were
 * labelled before (most requests), else through requests.finished(n) (the first of each,
 * websockets, odd scopes). 0, or -1 with an error set. */
static int
label_request(StepCapture *cap, PyObject *n)
{
    PyObject *scope = PyDict_GetItemWithError(cap->scopes, n); /* borrowed, then held */
    if (scope == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int ret = -1;
    PyObject *method = NULL, *path = NULL, *key = NULL, *text = NULL;
    Py_INCREF(scope);
    if (PyDict_CheckExact(scope)) {
        method = PyDict_GetItemWithError(scope, s_method);
        Py_XINCREF(method);
        if (method != NULL) {
            path = PyDict_GetItemWithError(scope, s_path);
            Py_XINCREF(path);
        }
        if (PyErr_Occurred())
            goto done;
        if (method != NULL && path != NULL && PyUnicode_CheckExact(method) &&
            PyUnicode_CheckExact(path)) {
            key = PyTuple_Pack(2, method, path);
            if (key == NULL)
                goto done;
            text = PyDict_GetItemWithError(cap->by_path, key);
            Py_XINCREF(text);
            if (text == NULL && PyErr_Occurred())
                goto done;
        }
    }
    if (text != NULL) {
        if (PyDict_SetItem(cap->labels, n, text) < 0 || PyDict_DelItem(cap->scopes, n) < 0)
            goto done;
    }
    else if (call_for_effect(cap->requests, s_finished, n) < 0)
        goto done;
    ret = 0;
done:
    Py_DECREF(scope);
    Py_XDECREF(method);
    Py_XDECREF(path);
    Py_XDECREF(key);
    Py_XDECREF(text);
    return ret;
}

static PyObject *
capture_finished(StepCapture *self, PyObject *n)
{
    if (label_request(self, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Hold the records of one step that ran from t0 to t1. 0, or -1 with an error set. */
static int
record_step(StepHook *hook, StepCapture *cap, PyObject *handle, PyObject *cb, PyObject *task,
            PyObject *owner, PyObject *key, int64_t t0, int64_t t1)
{
    int ret = -1;
    PyObject *records = NULL, *loop = NULL, *name = NULL, *coro = NULL, *code = NULL,
             *what = NULL, *start = NULL;
    records = get_records(cap);
    if (records == NULL)
        goto done;
    if (n_records(cap, records) >= cap->limit) {
        /* Counted as dropped; nothing else is done for this step (see the Python hook). */
        start = PyLong_FromLongLong(t0);
        if (start == NULL)
            goto done;
        if (call_for_effect(cap->rec, s_full, start) < 0)
            goto done;
        ret = 0;
        goto done;
    }
    loop = PyObject_GetAttr(handle, s_loop);
    if (loop == NULL)
        goto done;
    if (loop != cap->last_loop || cap->last_loop_id == NULL) {
        if (call_for_effect(cap->rec, s_see_loop, loop) < 0)
            goto done;
        PyObject *new_id = PyLong_FromVoidPtr(loop);
        if (new_id == NULL)
            goto done;
        Py_XSETREF(cap->last_loop_id, new_id);
        Py_XSETREF(cap->last_loop, Py_NewRef(loop));
    }
    if (task != NULL) {
        /* Named after the task's coroutine (and the request it serves). */
        name = PyObject_CallMethodNoArgs(task, s_get_name);
        if (name == NULL)
            goto done;
        coro = PyObject_CallMethodNoArgs(task, s_get_coro);
        if (coro == NULL || (code = coro_code(hook, coro)) == NULL)
            goto done;
        PyObject *req = PyDict_GetItemWithError(cap->request_of, key); /* borrowed */
        if (req == NULL && PyErr_Occurred())
            goto done;
        PyObject *r = PyObject_CallMethodNoArgs(task, s_done);
        if (r == NULL)
            goto done;
        int finished = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (finished < 0)
            goto done;
        PyObject *state = NULL;
        if (finished) {
            /* The step that finished it (one record past the limit at most). Not
             * task.exception(): that would mark the exception retrieved. */
            r = PyObject_CallMethodNoArgs(task, s_cancelled);
            if (r == NULL)
                goto done;
            int cancelled = PyObject_IsTrue(r);
            Py_DECREF(r);
            if (cancelled < 0)
                goto done;
            if (cancelled)
                state = s_cancelled_state;
            else {
                PyObject *exc;
                if (lookup_attr(task, s_exception, &exc) < 0)
                    goto done;
                state = (exc == NULL || exc == Py_None) ? s_result_state : s_exception_state;
                Py_XDECREF(exc);
            }
        }
        /* Every call that can run Python code is behind us: the slots are filled at once. */
        if (hold_step(cap, t0, t1, code, name, req) == NULL)
            goto done;
        if (finished) {
            HeldRecord *end = hold_step(cap, t1, t1, code, name, req);
            if (end == NULL)
                goto done;
            end->key = Py_NewRef(key);
            end->state = Py_NewRef(state);
            end->ident = PyThread_get_thread_ident();
            if (PySet_Discard(cap->seen, key) < 0) /* the id may be reused by a new task */
                goto done;
            if (req != NULL && label_request(cap, req) < 0)
                goto done;
        }
    }
    else {
        /* A code object or a name, never the callback: a record keeps nothing alive. */
        what = callback_what(hook, cb, owner);
        if (what == NULL)
            goto done;
        if (hold_step(cap, t0, t1, what, NULL, NULL) == NULL)
            goto done;
    }
    ret = 0;
done:
    Py_XDECREF(records);
    Py_XDECREF(loop);
    Py_XDECREF(name);
    Py_XDECREF(coro);
    Py_XDECREF(code);
    Py_XDECREF(what);
    Py_XDECREF(start);
    return ret;
}

static PyObject *
hook_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    StepHook *hook = (StepHook *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "StepHook takes exactly one handle");
        return NULL;
    }
    PyObject *handle = args[0];
    StepCapture *cap = hook->capture;
    if (cap == NULL)
        return PyObject_Vectorcall(hook->orig, &handle, 1, NULL);
    Py_INCREF(cap);
    if (__atomic_load_n(&cap->want, __ATOMIC_RELAXED))
        yield_turn(cap);
    PyObject *result = NULL, *owner = NULL, *key = NULL;
    PyObject *cb = PyObject_GetAttr(handle, s_callback);
    if (cb == NULL)
        goto out;
    PyTypeObject *tp = Py_TYPE(cb);
    if (tp == &PyFunction_Type)
        owner = NULL;
    else if (tp == &PyMethod_Type)
        owner = Py_NewRef(PyMethod_GET_SELF(cb));
    else if (PyCFunction_Check(cb))
        owner = Py_XNewRef(PyCFunction_GET_SELF(cb));
    else if (lookup_attr(cb, s_self, &owner) < 0) /* e.g. a C task's step wrapper */
        goto out;
    PyObject *task = is_task(hook, owner) ? owner : NULL; /* a task's step or wakeup */
    if (task != NULL) {
        key = PyLong_FromVoidPtr(task);
        if (key == NULL)
            goto out;
        int seen = PySet_Contains(cap->seen, key);
        if (seen < 0)
            goto out;
        if (!seen) {
            /* Its first step in this capture, before it runs: a new task's coroutine has
             * not started, so its arguments tell which request it serves. */
            if (first_step(hook, cap, task, key) < 0)
                goto out;
        }
    }
    /* Read without the GIL by the sampler's wait(): stored whole. */
    int64_t t0 = now_ns();
    __atomic_store_n(&cap->step_start, t0, __ATOMIC_RELAXED);
    result = PyObject_Vectorcall(hook->orig, &handle, 1, NULL);
    int64_t t1 = now_ns();
    __atomic_store_n(&cap->step_end, t1, __ATOMIC_RELAXED); /* the sampler sees it ended */
    if (result == NULL) {
        SavedError saved;
        save_error(&saved);
        if (record_step(hook, cap, handle, cb, task, owner, key, t0, t1) < 0)
            chain_error(&saved);
        else
            restore_error(&saved);
    }
    else if (record_step(hook, cap, handle, cb, task, owner, key, t0, t1) < 0) {
        Py_CLEAR(result);
    }
out:
    Py_XDECREF(cb);
    Py_XDECREF(owner);
    Py_XDECREF(key);
    Py_DECREF(cap);
    return result;
}

static PyObject *
hook_start(StepHook *self, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &StepCaptureType)) {
        PyErr_SetString(PyExc_TypeError, "start() takes a StepCapture");
        return NULL;
    }
    Py_XSETREF(self->capture, (StepCapture *)Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *
hook_stop(StepHook *self, PyObject *unused)
{
    Py_CLEAR(self->capture);
    Py_RETURN_NONE;
}

static PyObject *
hook_get_original(StepHook *self, void *closure)
{
    return Py_NewRef(self->orig);
}

static PyMethodDef hook_methods[] = {
    {"start", (PyCFunction)hook_start, METH_O, "Record every step into this capture; None."},
    {"stop", (PyCFunction)hook_stop, METH_NOARGS,
     "Record no more (steps that started keep their capture); None."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef hook_getset[] = {
    {"original", (getter)hook_get_original, NULL, "The Handle._run this hook calls.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StepHookType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asgi_pprof._tracestep.StepHook",
    .tp_basicsize = sizeof(StepHook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "asyncio.Handle._run during a trace: runs the step, then records it.",
    .tp_new = hook_new,
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_vectorcall_offset = offsetof(StepHook, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = hook_descr_get,
    .tp_methods = hook_methods,
    .tp_getset = hook_getset,
};

static struct PyModuleDef tracestep_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asgi_pprof._tracestep",
    .m_doc = "The execution trace's loop-step hook (asyncio.Handle._run) in C.",
    .m_size = -1,
};

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__tracestep(void)
{
    if (intern(&s_callback, "_callback") || intern(&s_loop, "_loop") ||
        intern(&s_get_name, "get_name") || intern(&s_get_coro, "get_coro") ||
        intern(&s_cr_code, "cr_code") || intern(&s_done, "done") ||
        intern(&s_cancelled, "cancelled") || intern(&s_exception, "_exception") ||
        intern(&s_name, "__name__") || intern(&s_self, "__self__") ||
        intern(&s_records, "records") ||
        intern(&s_finished, "finished") || intern(&s_see_loop, "see_loop") || intern(&s_full, "full") ||
        intern(&s_cancelled_state, "cancelled") || intern(&s_result_state, "result") ||
        intern(&s_exception_state, "exception") || intern(&s_code, "__code__") ||
        intern(&s_get_loop, "get_loop") || intern(&s_type, "type") || intern(&s_path, "path") ||
        intern(&s_method, "method") || intern(&s_scope, "scope") || intern(&s_http, "http") ||
        intern(&s_websocket, "websocket") || intern(&s_start, "start") ||
        intern(&s_generation, "generation") || intern(&s_collected, "collected") ||
        intern(&s_uncollectable, "uncollectable"))
        return NULL;
    k_gc = PyLong_FromLong(KIND_GC);
    k_minus_one = PyLong_FromLong(-1);
    k_zero = PyLong_FromLong(0);
    if (k_gc == NULL || k_minus_one == NULL || k_zero == NULL)
        return NULL;
    k_step = PyLong_FromLong(KIND_STEP);
    k_new = PyLong_FromLong(KIND_NEW);
    k_done = PyLong_FromLong(KIND_DONE);
    if (k_step == NULL || k_new == NULL || k_done == NULL)
        return NULL;
    if (PyType_Ready(&StepCaptureType) < 0 || PyType_Ready(&StepHookType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&tracestep_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "StepCapture", (PyObject *)&StepCaptureType) < 0 ||
        PyModule_AddObjectRef(m, "StepHook", (PyObject *)&StepHookType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
