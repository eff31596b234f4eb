/*
 * asgi_pprof._memsample: a sampled allocation profiler for CPython, Go's way.
 *
 * Hooks the PYMEM_DOMAIN_MEM and PYMEM_DOMAIN_OBJ allocator domains with
 * PyMem_SetAllocator, chaining to whatever allocator was there (pymalloc, the
 * PYTHONMALLOC=debug hooks, tracemalloc's hooks). Allocations are sampled as a
 * Poisson process over allocated bytes with mean `rate` (Go's MemProfileRate):
 * a countdown drawn from an exponential distribution; an allocation that reaches
 * it is sampled, so one of `size` bytes is sampled with probability
 * 1 - exp(-size/rate). Each sampled allocation records its size and the Python
 * stack that made it; frees (and reallocs) of sampled pointers are seen, so the
 * in-use figures of the sampled set are right.
 *
 * Only Python/C API reads, no internal headers: the stack is read with
 * PyThreadState_GetFrame / PyFrame_GetBack (which skip incomplete frames), with the
 * cyclic GC disabled while frame objects are made (on 3.11 a GC object allocation
 * can run a collection, and with it finalizers, inside the allocator call we are in).
 *
 * What runs where:
 * - The fast path (every malloc/calloc/realloc/free) is a countdown and, for frees,
 *   a bit filter test: no lock, no call into Python.
 * - The RAW domain is not hooked: it runs without the GIL (no stack to read) and
 *   pymalloc passes its large requests to it, which would count them twice.
 * - MEM and OBJ run with the GIL held, which orders all sampling. The tables are
 *   also guarded by a pthread mutex held only around plain C table updates (never
 *   around a Python call), so fork() (pthread_atfork) always sees them consistent
 *   and a sub-interpreter with its own GIL cannot race a free against an update.
 * - Re-entrancy: the stack capture allocates (frame objects); the countdown is
 *   parked at SIZE_MAX while it runs and a flag refuses nested sampling.
 * - Only the main interpreter samples; importing the module elsewhere fails.
 * - Interpreter finalization stops sampling (Py_AtExit and the finalizing check).
 *
 * The tables keep strong references to the code objects (and module name strings)
 * of recorded stacks: naming a frame then costs nothing at sampling time, and the
 * names are exactly the CPU profile's (module.co_qualname, co_filename,
 * co_firstlineno, the frame's line). A bucket is (stack, size class, rate) with raw
 * counts and exact bytes. Stacks and buckets are bounded; past the bound samples go to
 * one overflow stack.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 256 /* as the CPU sampler */
#define MAX_STACKS (1u << 18)
#define MAX_BUCKETS (1u << 20)
#define STACK_NONE 0u     /* an allocation with no Python frame */
#define STACK_OVERFLOW 1u /* the stack table was full */
/* The free path's bit filter of sampled pointers: at least 16 bits per live sample (a
 * false positive, a locked table lookup, on < 1/16 of frees), 512 bytes (8 cache lines)
 * for up to 256 live samples (a 128 MB heap at 512 KiB), up to 512 KiB. Static so it
 * never moves; untouched pages cost no memory. */
#define FILTER_MIN_BITS 12
#define FILTER_MAX_BITS 22
#define FILTER_WORDS ((1u << FILTER_MAX_BITS) / 64)

#if PY_VERSION_HEX >= 0x030D0000
#define MS_TSTATE() PyThreadState_GetUnchecked()
#define MS_FINALIZING() Py_IsFinalizing()
#else
#define MS_TSTATE() _PyThreadState_UncheckedGet()
#define MS_FINALIZING() _Py_IsFinalizing()
#endif

typedef struct {
    PyObject *code;   /* strong ref */
    PyObject *module; /* strong ref or NULL */
    int line;
} ms_frame;

typedef struct {
    uint64_t hash;
    ms_frame *frames; /* own malloc block, never moved: readable outside the lock */
    uint32_t n;
} ms_stack;

typedef struct {
    uint32_t stack;
    uint64_t size; /* size class of the allocations here (0: any, the overflow bucket) */
    uint64_t rate; /* the rate these allocations were sampled at */
    uint64_t allocs, alloc_bytes, frees, free_bytes;
} ms_bucket;

typedef struct {
    uintptr_t ptr; /* 0: empty slot */
    uint64_t size;
    uint32_t bucket;
} ms_live;

typedef struct {
    PyMemAllocatorDomain domain;
    unsigned bit;
    PyMemAllocatorEx under;
} ms_domain;

/* --- state (guarded by the GIL; tables also by `lock`) ------------------------------ */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static ms_domain domains[2] = {
    {PYMEM_DOMAIN_MEM, 1u, {0}},
    {PYMEM_DOMAIN_OBJ, 2u, {0}},
};

static size_t rate = 0;                   /* 0 off, 1 every allocation */
static size_t until_sample = SIZE_MAX;    /* bytes left before the next sample */
static uint64_t rng = 0x9E3779B97F4A7C15u; /* xorshift64* state */
static int in_hook = 0;
static int probing = 0;
static unsigned probe_hit = 0;
static int shutting_down = 0;
static int snapshot_readers = 0;
static uint64_t generation = 1;
static PyInterpreterState *main_interp = NULL;
static PyObject *name_str = NULL; /* "__name__" */

static ms_stack *stacks = NULL;
static uint32_t nstacks = 0, stacks_cap = 0;
static uint32_t *stack_index = NULL; /* open addressing: stack id + 1, 0 empty */
static uint32_t stack_index_cap = 0;

static ms_bucket *buckets = NULL;
static uint32_t nbuckets = 0, buckets_cap = 0;
static uint32_t *bucket_index = NULL;
static uint32_t bucket_index_cap = 0;

static ms_live *live = NULL;
static size_t live_count = 0, live_cap = 0;
static uint64_t filter[FILTER_WORDS];
static unsigned filter_bits = FILTER_MIN_BITS;
static size_t filter_stale = 0; /* removals since the filter was rebuilt */

static uint64_t n_samples = 0, n_skipped = 0, n_stale = 0, n_displaced = 0;
static uint64_t n_lost = 0; /* samples dropped because a table could not grow */
static size_t table_bytes = 0;

/* --- small helpers ----------------------------------------------------------------- */

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint64_t ptr_hash(uintptr_t p) { return (uint64_t)(p >> 4) * 0x9E3779B97F4A7C15ULL; }

static inline int filter_test(const void *p) {
    uint64_t h = ptr_hash((uintptr_t)p) >> (64 - filter_bits);
    return (int)((filter[h >> 6] >> (h & 63)) & 1u);
}

static inline void filter_set(uintptr_t p) {
    uint64_t h = ptr_hash(p) >> (64 - filter_bits);
    filter[h >> 6] |= (uint64_t)1 << (h & 63);
}

static uint64_t rng_next(void) {
    uint64_t x = rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void rng_seed(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    rng = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ ((uint64_t)getpid() << 16)) | 1u;
}

/* Return the bytes until the next sample: exponential with mean r (Go's nextSample). */
static size_t next_sample(size_t r) {
    if (r == 0) {
        return SIZE_MAX;
    }
    if (r == 1) {
        return 0; /* every allocation */
    }
    double u = (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
    if (u <= 0.0) {
        u = 1.0 / 9007199254740992.0;
    }
    double d = -log(u) * (double)r;
    if (d >= 4.0e18) {
        return (size_t)4000000000000000000ULL;
    }
    return (size_t)d;
}

static void *xrealloc_array(void *p, size_t n, size_t elem) {
    if (n != 0 && elem > SIZE_MAX / n) {
        return NULL;
    }
    return realloc(p, n * elem);
}

/* --- the live table (sampled pointers): linear probing, backward-shift delete ------ */

static void filter_rebuild(void) {
    unsigned bits = FILTER_MIN_BITS;
    while (bits < FILTER_MAX_BITS && ((uint64_t)1 << bits) < (uint64_t)live_count * 16) {
        bits++;
    }
    memset(filter, 0, ((size_t)1 << (bits > filter_bits ? bits : filter_bits)) / 8);
    filter_bits = bits;
    for (size_t i = 0; i < live_cap; i++) {
        if (live[i].ptr) {
            filter_set(live[i].ptr);
        }
    }
    filter_stale = 0;
}

static int live_grow(void) {
    size_t cap = live_cap ? live_cap * 2 : 1024;
    ms_live *t = calloc(cap, sizeof(ms_live));
    if (t == NULL) {
        return -1;
    }
    size_t mask = cap - 1;
    for (size_t i = 0; i < live_cap; i++) {
        if (live[i].ptr) {
            size_t j = (size_t)(ptr_hash(live[i].ptr) >> 32) & mask;
            while (t[j].ptr) {
                j = (j + 1) & mask;
            }
            t[j] = live[i];
        }
    }
    free(live);
    table_bytes += (cap - live_cap) * sizeof(ms_live);
    live = t;
    live_cap = cap;
    return 0;
}

static ms_live *live_find(uintptr_t p) {
    if (live_cap == 0) {
        return NULL;
    }
    size_t mask = live_cap - 1;
    size_t j = (size_t)(ptr_hash(p) >> 32) & mask;
    while (live[j].ptr) {
        if (live[j].ptr == p) {
            return &live[j];
        }
        j = (j + 1) & mask;
    }
    return NULL;
}

static void live_delete(ms_live *slot) {
    size_t mask = live_cap - 1;
    size_t i = (size_t)(slot - live);
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!live[j].ptr) {
            break;
        }
        size_t home = (size_t)(ptr_hash(live[j].ptr) >> 32) & mask;
        /* Move j into the hole at i unless its home lies cyclically in (i, j]. */
        int in_range = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!in_range) {
            live[i] = live[j];
            i = j;
        }
    }
    live[i].ptr = 0;
    live_count--;
    /* A freed entry's bit stays set until a rebuild: every stale bit is a false positive
     * (a locked lookup) for 1/2^filter_bits of all frees, so rebuild early. A rebuild
     * scans the live table: amortized over 64+ removals it is a few ns each. */
    if (++filter_stale > 64 + live_count / 4) {
        filter_rebuild();
    }
}

/* Account a free of `slot`'s allocation to its bucket and drop it (lock held). */
static void live_release(ms_live *slot) {
    ms_bucket *b = &buckets[slot->bucket];
    b->frees++;
    b->free_bytes += slot->size;
    live_delete(slot);
}

/* --- interned stacks and buckets ---------------------------------------------------- */

static uint64_t frames_hash(const ms_frame *f, uint32_t n) {
    uint64_t h = 0x84222325CBF29CE4ULL ^ n;
    for (uint32_t i = 0; i < n; i++) {
        h = mix64(h ^ (uint64_t)(uintptr_t)f[i].code);
        h = mix64(h ^ (uint64_t)(uintptr_t)f[i].module ^ ((uint64_t)(uint32_t)f[i].line << 40));
    }
    return h;
}

static int index_grow(uint32_t **index, uint32_t *cap, uint32_t count,
                      uint64_t (*hash_of)(uint32_t)) {
    uint32_t ncap = *cap ? *cap * 2 : 1024;
    uint32_t *t = calloc(ncap, sizeof(uint32_t));
    if (t == NULL) {
        return -1;
    }
    for (uint32_t id = 0; id < count; id++) {
        uint32_t j = (uint32_t)(hash_of(id) >> 32) & (ncap - 1);
        while (t[j]) {
            j = (j + 1) & (ncap - 1);
        }
        t[j] = id + 1;
    }
    free(*index);
    table_bytes += (size_t)(ncap - *cap) * sizeof(uint32_t);
    *index = t;
    *cap = ncap;
    return 0;
}

static uint64_t stack_hash_of(uint32_t id) { return stacks[id].hash; }

static uint64_t bucket_key_hash(uint32_t stack, uint64_t size, uint64_t r) {
    return mix64(mix64((uint64_t)stack * 0x9E3779B97F4A7C15ULL ^ size) ^ r);
}

static uint64_t bucket_hash_of(uint32_t id) {
    return bucket_key_hash(buckets[id].stack, buckets[id].size, buckets[id].rate);
}

static int stack_push(const ms_frame *f, uint32_t n, uint64_t h) {
    if (nstacks == stacks_cap) {
        uint32_t cap = stacks_cap ? stacks_cap * 2 : 256;
        ms_stack *t = xrealloc_array(stacks, cap, sizeof(ms_stack));
        if (t == NULL) {
            return -1;
        }
        table_bytes += (size_t)(cap - stacks_cap) * sizeof(ms_stack);
        stacks = t;
        stacks_cap = cap;
    }
    ms_frame *copy = NULL;
    if (n) {
        copy = malloc((size_t)n * sizeof(ms_frame));
        if (copy == NULL) {
            return -1;
        }
        memcpy(copy, f, (size_t)n * sizeof(ms_frame));
        table_bytes += (size_t)n * sizeof(ms_frame);
        for (uint32_t i = 0; i < n; i++) {
            Py_INCREF(copy[i].code);
            Py_XINCREF(copy[i].module);
        }
    }
    stacks[nstacks].hash = h;
    stacks[nstacks].frames = copy;
    stacks[nstacks].n = n;
    return (int)nstacks++;
}

/* Return the id of the stack `f[:n]`, adding it if new; STACK_OVERFLOW if full. */
static uint32_t stack_intern(const ms_frame *f, uint32_t n) {
    if (n == 0) {
        return STACK_NONE;
    }
    uint64_t h = frames_hash(f, n);
    if (stack_index_cap) {
        uint32_t mask = stack_index_cap - 1;
        uint32_t j = (uint32_t)(h >> 32) & mask;
        while (stack_index[j]) {
            ms_stack *s = &stacks[stack_index[j] - 1];
            if (s->hash == h && s->n == n && memcmp(s->frames, f, (size_t)n * sizeof(ms_frame)) == 0) {
                return stack_index[j] - 1;
            }
            j = (j + 1) & mask;
        }
    }
    if (nstacks >= MAX_STACKS) {
        return STACK_OVERFLOW;
    }
    if ((uint64_t)(nstacks + 1) * 2 > stack_index_cap &&
        index_grow(&stack_index, &stack_index_cap, nstacks, stack_hash_of) < 0) {
        return STACK_OVERFLOW;
    }
    int id = stack_push(f, n, h);
    if (id < 0) {
        return STACK_OVERFLOW;
    }
    uint32_t mask = stack_index_cap - 1;
    uint32_t j = (uint32_t)(h >> 32) & mask;
    while (stack_index[j]) {
        j = (j + 1) & mask;
    }
    stack_index[j] = (uint32_t)id + 1;
    return (uint32_t)id;
}

/* Return the bucket id for (stack, size, rate), adding it if new; UINT32_MAX on failure. */
static uint32_t bucket_intern(uint32_t stack, uint64_t size, uint64_t r) {
    if (nbuckets >= MAX_BUCKETS) {
        stack = STACK_OVERFLOW;
        size = 0;
    }
    uint64_t h = bucket_key_hash(stack, size, r);
    if (bucket_index_cap) {
        uint32_t mask = bucket_index_cap - 1;
        uint32_t j = (uint32_t)(h >> 32) & mask;
        while (bucket_index[j]) {
            ms_bucket *b = &buckets[bucket_index[j] - 1];
            if (b->stack == stack && b->size == size && b->rate == r) {
                return bucket_index[j] - 1;
            }
            j = (j + 1) & mask;
        }
    }
    if ((uint64_t)(nbuckets + 1) * 2 > bucket_index_cap &&
        index_grow(&bucket_index, &bucket_index_cap, nbuckets, bucket_hash_of) < 0) {
        return UINT32_MAX;
    }
    if (nbuckets == buckets_cap) {
        uint32_t cap = buckets_cap ? buckets_cap * 2 : 1024;
        ms_bucket *t = xrealloc_array(buckets, cap, sizeof(ms_bucket));
        if (t == NULL) {
            return UINT32_MAX;
        }
        table_bytes += (size_t)(cap - buckets_cap) * sizeof(ms_bucket);
        buckets = t;
        buckets_cap = cap;
    }
    uint32_t id = nbuckets++;
    memset(&buckets[id], 0, sizeof(ms_bucket));
    buckets[id].stack = stack;
    buckets[id].size = size;
    buckets[id].rate = r;
    uint32_t mask = bucket_index_cap - 1;
    uint32_t j = (uint32_t)(h >> 32) & mask;
    while (bucket_index[j]) {
        j = (j + 1) & mask;
    }
    bucket_index[j] = id + 1;
    return id;
}

/* Return the size class a bucket is keyed by: as Go's buckets are keyed by size class
 * (exact sizes would make a bucket per distinct length of every list and string).
 * 16-byte steps up to 512 (pymalloc's classes), then 8 classes per doubling (<= 12.5 %). */
static uint64_t size_class(uint64_t s) {
    if (s <= 512) {
        return (s + 15) & ~(uint64_t)15;
    }
    int b = 63 - __builtin_clzll(s - 1); /* 2^b < s <= 2^(b+1), b >= 9 */
    uint64_t step = (uint64_t)1 << (b - 3);
    return (s + step - 1) & ~(step - 1);
}

/* Record one sampled allocation (lock held; no Python calls). */
static void record(uintptr_t p, size_t size, size_t r, const ms_frame *f, uint32_t n) {
    uint32_t sid = stack_intern(f, n);
    uint32_t bid = bucket_intern(sid, size_class(size), r);
    if (bid == UINT32_MAX) {
        n_lost++;
        return;
    }
    ms_live *old = live_find(p);
    if (old != NULL) {
        /* Freed while our hooks were displaced (we never saw the free). */
        n_stale++;
        live_release(old);
    }
    if ((live_count + 1) * 2 > live_cap && live_grow() < 0) {
        n_lost++;
        return;
    }
    size_t mask = live_cap - 1;
    size_t j = (size_t)(ptr_hash(p) >> 32) & mask;
    while (live[j].ptr) {
        j = (j + 1) & mask;
    }
    live[j].ptr = p;
    live[j].size = size;
    live[j].bucket = bid;
    live_count++;
    if (((uint64_t)1 << filter_bits) < (uint64_t)live_count * 16 && filter_bits < FILTER_MAX_BITS) {
        filter_rebuild(); /* grows it; the new entry is in `live`, so it is set too */
    } else {
        filter_set(p);
    }
    buckets[bid].allocs++;
    buckets[bid].alloc_bytes += size;
    n_samples++;
}

/* --- the stack capture --------------------------------------------------------------- */

static ms_frame capture_buf[MAX_DEPTH];

/* Read the calling thread's Python stack, leaf first, into capture_buf (borrowed refs:
 * every code object and module name is held by a frame still executing). */
static uint32_t capture(PyThreadState *ts) {
    uint32_t n = 0;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
#endif
    int gc_was = PyGC_Disable();
    PyFrameObject *f = PyThreadState_GetFrame(ts);
    while (f != NULL && n < MAX_DEPTH) {
        PyCodeObject *code = PyFrame_GetCode(f);
        int line = PyFrame_GetLineNumber(f);
        PyObject *globals = PyFrame_GetGlobals(f);
        PyObject *mod = NULL;
        if (globals != NULL && PyDict_Check(globals)) {
            mod = PyDict_GetItemWithError(globals, name_str);
            if (mod != NULL && !PyUnicode_Check(mod)) {
                mod = NULL;
            }
        }
        Py_XDECREF(globals);
        capture_buf[n].code = (PyObject *)code;
        capture_buf[n].module = mod;
        capture_buf[n].line = line < 0 ? 0 : line;
        Py_DECREF(code);
        n++;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    if (gc_was) {
        PyGC_Enable();
    }
    PyErr_Clear(); /* whatever the walk may have set is ours */
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(et, ev, etb);
#endif
    return n;
}

/* The slow path: an allocation reached the countdown. */
__attribute__((noinline, cold)) static void sampled(ms_domain *d, void *p, size_t size) {
    if (probing) {
        probe_hit |= d->bit;
        return;
    }
    if (in_hook) {
        return;
    }
    size_t r = rate;
    until_sample = SIZE_MAX; /* nested allocations (the capture's) never sample */
    PyThreadState *ts = MS_TSTATE();
    if (r == 0 || shutting_down || ts == NULL || PyThreadState_GetInterpreter(ts) != main_interp ||
        MS_FINALIZING()) {
        n_skipped++;
    } else {
        in_hook = 1;
        uint32_t n = capture(ts);
        pthread_mutex_lock(&lock);
        record((uintptr_t)p, size, r, capture_buf, n);
        pthread_mutex_unlock(&lock);
        in_hook = 0;
    }
    until_sample = next_sample(rate);
}

__attribute__((noinline, cold)) static void untrack(void *p) {
    pthread_mutex_lock(&lock);
    ms_live *slot = live_find((uintptr_t)p);
    if (slot != NULL) {
        live_release(slot);
    }
    pthread_mutex_unlock(&lock);
}

/* --- the hooks ------------------------------------------------------------------------ */

/* The fast paths decide before calling the allocator below, so they end in a tail
 * call with no stack frame of their own; the rare rest is in cold functions. */

__attribute__((noinline, cold)) static void *malloc_sampled(ms_domain *d, size_t size) {
    void *p = d->under.malloc(d->under.ctx, size);
    if (p != NULL) {
        sampled(d, p, size);
    }
    return p;
}

static void *ms_malloc(void *ctx, size_t size) {
    ms_domain *d = (ms_domain *)ctx;
    if (__builtin_expect(size >= until_sample, 0)) {
        return malloc_sampled(d, size);
    }
    until_sample -= size;
    return d->under.malloc(d->under.ctx, size);
}

__attribute__((noinline, cold)) static void *calloc_sampled(ms_domain *d, size_t nelem,
                                                            size_t elsize, size_t size) {
    void *p = d->under.calloc(d->under.ctx, nelem, elsize);
    if (p != NULL) {
        sampled(d, p, size);
    }
    return p;
}

static void *ms_calloc(void *ctx, size_t nelem, size_t elsize) {
    ms_domain *d = (ms_domain *)ctx;
    size_t size;
    if (__builtin_mul_overflow(nelem, elsize, &size)) {
        return d->under.calloc(d->under.ctx, nelem, elsize); /* fails below */
    }
    if (__builtin_expect(size >= until_sample, 0)) {
        return calloc_sampled(d, nelem, elsize, size);
    }
    until_sample -= size;
    return d->under.calloc(d->under.ctx, nelem, elsize);
}

static void *ms_realloc(void *ctx, void *ptr, size_t size) {
    ms_domain *d = (ms_domain *)ctx;
    void *p = d->under.realloc(d->under.ctx, ptr, size);
    if (p == NULL) {
        return NULL; /* ptr is untouched, and still tracked if it was */
    }
    if (ptr != NULL && live_count && filter_test(ptr)) {
        untrack(ptr);
    }
    /* A realloc allocates `size` bytes (whether it moved or grew in place). */
    if (size >= until_sample) {
        sampled(d, p, size);
    } else {
        until_sample -= size;
    }
    return p;
}

__attribute__((noinline, cold)) static void free_tracked(ms_domain *d, void *ptr) {
    untrack(ptr);
    d->under.free(d->under.ctx, ptr);
}

static void ms_free(void *ctx, void *ptr) {
    ms_domain *d = (ms_domain *)ctx;
    if (__builtin_expect(live_count && ptr != NULL && filter_test(ptr), 0)) {
        free_tracked(d, ptr);
        return;
    }
    d->under.free(d->under.ctx, ptr);
}

/* Return the domains (bits) whose allocation calls pass through our hooks now. */
static unsigned probe_chain(void) {
    size_t saved = until_sample;
    probe_hit = 0;
    probing = 1;
    until_sample = 0;
    void *a = PyMem_Malloc(1);
    PyMem_Free(a);
    void *b = PyObject_Malloc(1);
    PyObject_Free(b);
    probing = 0;
    until_sample = saved;
    return probe_hit;
}

/* Put our hooks on every domain they are missing from; return how many were added. */
static int install(void) {
    unsigned hit = probe_chain();
    int added = 0;
    for (int i = 0; i < 2; i++) {
        ms_domain *d = &domains[i];
        if (hit & d->bit) {
            continue;
        }
        PyMemAllocatorEx ours = {d, ms_malloc, ms_calloc, ms_realloc, ms_free};
        PyMemAllocatorEx under;
        PyMem_GetAllocator(d->domain, &under);
        /* Nobody calls our hook for this domain now, so `under` may change. */
        d->under = under;
        PyMem_SetAllocator(d->domain, &ours);
        added++;
    }
    return added;
}

/* --- pthread_atfork / Py_AtExit -------------------------------------------------------- */

static void atfork_prepare(void) { pthread_mutex_lock(&lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&lock); }
static void atfork_child(void) {
    pthread_mutex_unlock(&lock);
    rng_seed(); /* workers must not all sample the same allocations */
}

static void at_exit(void) {
    shutting_down = 1;
    rate = 0;
    until_sample = SIZE_MAX;
}

/* --- Python API ------------------------------------------------------------------------ */

static int installed_any = 0;

static PyObject *py_set_rate(PyObject *self, PyObject *arg) {
    (void)self;
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n > (1ULL << 62)) {
        PyErr_SetString(PyExc_ValueError, "rate must be at most 2**62 bytes");
        return NULL;
    }
    size_t prev = rate;
    if (n > 0 && !shutting_down) {
        if (install() > 0 && installed_any) {
            n_displaced++;
        }
        installed_any = 1;
    }
    rate = (size_t)n;
    until_sample = next_sample(rate);
    return PyLong_FromSize_t(prev);
}

static PyObject *py_get_rate(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromSize_t(rate);
}

static PyObject *py_rehook(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    if (!installed_any || shutting_down) {
        return PyLong_FromLong(0);
    }
    int added = install();
    if (added) {
        n_displaced++;
    }
    return PyLong_FromLong(added);
}

/* rehook_after(fn) -> fn(), then our hooks back at once: tracemalloc.stop() restores the
 * allocator it found, which drops ours if tracemalloc started first. Done in C so that
 * no other thread runs (no GIL switch) between the two, and no free goes unseen. */
static PyObject *py_rehook_after(PyObject *self, PyObject *fn) {
    (void)self;
    PyObject *result = PyObject_CallNoArgs(fn);
    if (installed_any && !shutting_down && install() > 0) {
        n_displaced++;
    }
    return result;
}

/* uninstall() -> domains our hooks were taken off: only where they are the outermost
 * (anything stacked on top of them keeps calling them). For benchmarks that compare
 * with no hooks in one process; frees while off go unseen (stale in-use figures). */
static PyObject *py_uninstall(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    int removed = 0;
    for (int i = 0; i < 2; i++) {
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(domains[i].domain, &cur);
        if (cur.malloc == ms_malloc && cur.ctx == &domains[i]) {
            PyMem_SetAllocator(domains[i].domain, &domains[i].under);
            removed++;
        }
    }
    return PyLong_FromLong(removed);
}

static PyObject *py_hooked(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(installed_any ? probe_chain() : 0);
}

static PyObject *py_bucket_count(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(nbuckets);
}

/* buckets(start, count) -> list of (stack, size, rate, allocs, alloc_bytes, frees, free_bytes) */
static PyObject *py_buckets(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t start, count;
    if (!PyArg_ParseTuple(args, "nn", &start, &count)) {
        return NULL;
    }
    if (start < 0 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "start and count must be >= 0");
        return NULL;
    }
    pthread_mutex_lock(&lock);
    Py_ssize_t end = start + count;
    if (end > (Py_ssize_t)nbuckets) {
        end = (Py_ssize_t)nbuckets;
    }
    Py_ssize_t n = end > start ? end - start : 0;
    ms_bucket *copy = n ? malloc((size_t)n * sizeof(ms_bucket)) : NULL;
    if (copy != NULL) {
        memcpy(copy, &buckets[start], (size_t)n * sizeof(ms_bucket));
    }
    pthread_mutex_unlock(&lock);
    if (n && copy == NULL) {
        return PyErr_NoMemory();
    }
    /* Python objects are made after the lock is released: they allocate, and an
     * allocation may be sampled, which takes the lock. */
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        free(copy);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        ms_bucket *b = &copy[i];
        PyObject *t = Py_BuildValue("(IKKKKKK)", b->stack, (unsigned long long)b->size,
                                    (unsigned long long)b->rate, (unsigned long long)b->allocs,
                                    (unsigned long long)b->alloc_bytes, (unsigned long long)b->frees,
                                    (unsigned long long)b->free_bytes);
        if (t == NULL) {
            Py_DECREF(out);
            free(copy);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    free(copy);
    return out;
}

/* stack(id) -> tuple of (code, module or None, line), leaf first; None for the overflow. */
static PyObject *py_stack(PyObject *self, PyObject *arg) {
    (void)self;
    unsigned long id = PyLong_AsUnsignedLong(arg);
    if (id == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (id == STACK_OVERFLOW) {
        Py_RETURN_NONE;
    }
    pthread_mutex_lock(&lock);
    if (id >= nstacks) {
        pthread_mutex_unlock(&lock);
        PyErr_SetString(PyExc_IndexError, "no such stack");
        return NULL;
    }
    ms_frame *frames = stacks[id].frames;
    uint32_t n = stacks[id].n;
    snapshot_readers++;
    pthread_mutex_unlock(&lock);
    /* `frames` is stable: a stack's frames never move, and reset waits for readers. Not
     * cached here: the caller keeps what it makes of it, and a cached tuple per stack
     * (and one per frame) would be long-lived objects for every collection to scan. */
    PyObject *t = PyTuple_New(n);
    for (uint32_t i = 0; t != NULL && i < n; i++) {
        PyObject *item = Py_BuildValue("(OOi)", frames[i].code,
                                       frames[i].module ? frames[i].module : Py_None, frames[i].line);
        if (item == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, item);
    }
    snapshot_readers--;
    return t;
}

static void stack_zero_init(void) {
    /* Ids 0 (no Python frame) and 1 (overflow) are reserved, empty stacks. */
    stack_push(NULL, 0, 0);
    stack_push(NULL, 0, 1);
}

/* reset() -> forget every sample, stack and bucket (the table starts empty). */
static PyObject *py_reset(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    if (snapshot_readers) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reset while a snapshot is read");
        return NULL;
    }
    pthread_mutex_lock(&lock);
    ms_stack *old_stacks = stacks;
    uint32_t old_n = nstacks;
    void *old[4] = {stack_index, buckets, bucket_index, live};
    stacks = NULL;
    nstacks = stacks_cap = 0;
    stack_index = NULL;
    stack_index_cap = 0;
    buckets = NULL;
    nbuckets = buckets_cap = 0;
    bucket_index = NULL;
    bucket_index_cap = 0;
    live = NULL;
    live_count = live_cap = 0;
    memset(filter, 0, ((size_t)1 << filter_bits) / 8);
    filter_bits = FILTER_MIN_BITS;
    filter_stale = 0;
    table_bytes = 0;
    n_samples = n_skipped = n_stale = n_lost = 0;
    generation++;
    stack_zero_init();
    pthread_mutex_unlock(&lock);
    /* References are dropped outside the lock: a dealloc frees, and frees look here. */
    for (uint32_t i = 0; i < old_n; i++) {
        for (uint32_t k = 0; k < old_stacks[i].n; k++) {
            Py_DECREF(old_stacks[i].frames[k].code);
            Py_XDECREF(old_stacks[i].frames[k].module);
        }
        free(old_stacks[i].frames);
    }
    free(old_stacks);
    for (int i = 0; i < 4; i++) {
        free(old[i]);
    }
    Py_RETURN_NONE;
}

static PyObject *py_stats(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    pthread_mutex_lock(&lock);
    unsigned long long v[11] = {n_samples, n_skipped, n_stale, n_lost, n_displaced,
                                live_count, nbuckets, nstacks, table_bytes, generation, rate};
    pthread_mutex_unlock(&lock);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsK}", "samples", v[0], "skipped", v[1], "stale", v[2],
                         "lost", v[3], "displaced", v[4], "live", v[5], "buckets", v[6], "stacks",
                         v[7], "table_bytes", v[8], "generation", v[9], "rate", v[10]);
}

static PyMethodDef methods[] = {
    {"set_rate", py_set_rate, METH_O, "set_rate(n) -> previous rate. 0 off, 1 every allocation."},
    {"get_rate", py_get_rate, METH_NOARGS, "get_rate() -> the sampling rate in bytes."},
    {"rehook", py_rehook, METH_NOARGS, "rehook() -> domains our hooks were put back on."},
    {"rehook_after", py_rehook_after, METH_O, "rehook_after(fn) -> fn(), then rehook at once."},
    {"uninstall", py_uninstall, METH_NOARGS, "uninstall() -> domains taken off (benchmarks)."},
    {"hooked", py_hooked, METH_NOARGS, "hooked() -> bits of the domains passing through us."},
    {"bucket_count", py_bucket_count, METH_NOARGS, "bucket_count() -> number of buckets."},
    {"buckets", py_buckets, METH_VARARGS, "buckets(start, count) -> list of bucket tuples."},
    {"stack", py_stack, METH_O, "stack(id) -> tuple of (code, module, line), leaf first."},
    {"reset", py_reset, METH_NOARGS, "reset() -> forget all samples."},
    {"stats", py_stats, METH_NOARGS, "stats() -> dict of counters."},
    {NULL, NULL, 0, NULL},
};

/* Multi-phase init: the exec slot runs in every interpreter that imports us (a
 * single-phase module would be copied into a sub-interpreter without running init). */
static int ms_exec(PyObject *module) {
    (void)module;
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_ImportError,
                        "asgi_pprof._memsample cannot be used in a sub-interpreter: its allocator "
                        "hooks and tables are process-wide; import it in the main interpreter");
        return -1;
    }
    if (main_interp != NULL) {
        return 0;
    }
    name_str = PyUnicode_InternFromString("__name__");
    if (name_str == NULL) {
        return -1;
    }
    if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0) {
        PyErr_SetString(PyExc_ImportError, "asgi_pprof._memsample: cannot register fork handlers");
        return -1;
    }
    (void)Py_AtExit(at_exit); /* if its 32 slots are taken, the finalizing check still stops us */
    rng_seed();
    stack_zero_init();
    main_interp = PyInterpreterState_Main();
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)ms_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_memsample", "Sampled allocation profiler (see memprofile.py).", 0,
    methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__memsample(void) {
#ifdef Py_GIL_DISABLED
    PyErr_SetString(PyExc_ImportError,
                    "asgi_pprof._memsample does not support the free-threaded build");
    return NULL;
#endif
    return PyModuleDef_Init(&moduledef);
}
