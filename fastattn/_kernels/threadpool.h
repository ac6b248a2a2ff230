/*
 * threadpool.h -- the one parallel skeleton of every fastattn kernel.
 *
 * A kernel family hands fa_parallel_run its work as `nitems` independent items and one
 * hook, item(ctx, i, scratch); the skeleton does everything else once, here:
 *   - partitions the items over threads dynamically (an atomic counter, `grain` items a
 *     claim), so a thread that the OS does not schedule simply claims nothing;
 *   - gives each participating thread one 64-byte aligned scratch block of
 *     `scratch_bytes`, freed on every path;
 *   - reports an allocation failure once (FA_RUN_NOMEM): every participant stops
 *     claiming, and the caller raises one MemoryError.
 *
 * Why a pool of our own instead of OpenMP: libgomp's idle and barrier waits spin
 * (GOMP_SPINCOUNT, set process-wide by environment only), so on a busy machine a call
 * waited for a peer the OS had not scheduled (a 0.04 ms decode step took 15 ms with two
 * busy processes) and idle workers burnt cores other processes needed. Here the calling
 * thread works too and waits only for workers that are inside an item, never for one
 * that has not started; a worker that wakes after the items are gone goes back to
 * waiting without touching the run. Waits are short polls that yield the core
 * (sched_yield) for at most FA_POLL_NS, then sleep on a condition variable: back-to-back
 * calls of a fraction of a millisecond find their workers awake (a sleeping vCPU takes
 * tens of microseconds to wake: paged decode at S=512 ran 15-20% slower without the
 * poll), and an idle pool costs nothing after FA_POLL_NS.
 *
 * Calls from several Python threads at once each take the idle workers they can get
 * (none: the caller computes alone), so concurrent calls never oversubscribe the pool.
 * Workers are started lazily, up to the largest thread count asked for; the pool is
 * reset in a forked child (its threads do not survive fork).
 */
#ifndef FASTATTN_THREADPOOL_H
#define FASTATTN_THREADPOOL_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef void (*fa_item_fn)(void *ctx, ptrdiff_t item, void *scratch);

enum { FA_RUN_OK = 0, FA_RUN_NOMEM = 1, FA_RUN_NOTHREAD = 2 };
enum { FA_SCRATCH_ALIGN = 64 };

/* Test hooks and accounting, process-wide: the next `fa_fail_allocs` scratch
 * allocations fail; fa_live_scratch counts blocks allocated and not yet freed. */
static int fa_fail_allocs = 0;
static long fa_live_scratch = 0;

#if defined(_WIN32) || defined(FASTATTN_NO_THREADS)
/* No pthreads (or built without threads): every run is computed by the calling thread. */
#define FA_HAVE_THREADS 0
#else
#define FA_HAVE_THREADS 1
#include <pthread.h>
#endif

static void *fa_scratch_alloc(size_t nbytes)
{
    void *p;
    size_t size = (nbytes + FA_SCRATCH_ALIGN - 1) / FA_SCRATCH_ALIGN * FA_SCRATCH_ALIGN;
    if (size == 0)
        size = FA_SCRATCH_ALIGN;
    if (__atomic_load_n(&fa_fail_allocs, __ATOMIC_RELAXED) > 0
            && __atomic_sub_fetch(&fa_fail_allocs, 1, __ATOMIC_RELAXED) >= 0)
        return NULL;
#if defined(_WIN32)
    p = _aligned_malloc(size, FA_SCRATCH_ALIGN);
#else
    p = aligned_alloc(FA_SCRATCH_ALIGN, size);
#endif
    if (p)
        __atomic_add_fetch(&fa_live_scratch, 1, __ATOMIC_RELAXED);
    return p;
}

static void fa_scratch_free(void *p)
{
    if (!p)
        return;
    __atomic_sub_fetch(&fa_live_scratch, 1, __ATOMIC_RELAXED);
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

typedef struct fa_run {
    fa_item_fn item;
    void *ctx;
    ptrdiff_t nitems, grain;
    size_t scratch_bytes;
    ptrdiff_t next;          /* next unclaimed item (atomic) */
    int failed;              /* a participant had no scratch (atomic) */
#if FA_HAVE_THREADS
    int want;                /* workers this run may still take in; 0: closed */
    int active;              /* workers inside the run */
    pthread_cond_t left;     /* signalled when active drops to 0 */
    struct fa_run *older;    /* the open runs form a list, newest first */
#endif
} fa_run;

/* Claim and compute items until none are left or a participant failed. */
static void fa_participate(fa_run *r)
{
    void *scratch;
    ptrdiff_t i, end;
    if (__atomic_load_n(&r->next, __ATOMIC_RELAXED) >= r->nitems)
        return;
    scratch = r->scratch_bytes ? fa_scratch_alloc(r->scratch_bytes) : NULL;
    if (r->scratch_bytes && !scratch) {
        __atomic_store_n(&r->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    while (!__atomic_load_n(&r->failed, __ATOMIC_RELAXED)) {
        i = __atomic_fetch_add(&r->next, r->grain, __ATOMIC_RELAXED);
        if (i >= r->nitems)
            break;
        end = i + r->grain < r->nitems ? i + r->grain : r->nitems;
        for (; i < end; i++)
            r->item(r->ctx, i, scratch);
    }
    fa_scratch_free(scratch);
}

#if FA_HAVE_THREADS

#include <sched.h>
#include <time.h>

/* How long a thread polls, yielding, before it sleeps (see the top of this file). */
#define FA_POLL_NS 200000

static long long fa_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void fa_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Re-evaluate cond (atomic loads) until it holds, for at most FA_POLL_NS, yielding the
 * core every 16 checks. */
#define FA_POLL_UNTIL(cond)                                                                \
    do {                                                                                   \
        long long deadline_ = fa_now_ns() + FA_POLL_NS;                                    \
        for (int i_ = 1; !(cond); i_++) {                                                  \
            if (i_ % 16 == 0) {                                                            \
                if (fa_now_ns() > deadline_)                                               \
                    break;                                                                 \
                sched_yield();                                                             \
            }                                                                              \
            fa_pause();                                                                    \
        }                                                                                  \
    } while (0)

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;     /* idle workers sleep here */
    int nworkers;            /* workers started and not retired */
    int limit;               /* workers beyond this retire when idle */
    int nidle;
    fa_run *open;            /* runs still taking workers in */
    int atfork_registered;
} fa_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, 0};

static void fa_unlink_run(fa_run *r)
{
    fa_run **at = &fa_pool.open;
    while (*at && *at != r)
        at = &(*at)->older;
    if (*at)
        __atomic_store_n(at, r->older, __ATOMIC_RELEASE);
}

static void *fa_worker_main(void *arg)
{
    fa_run *r;
    (void)arg;
    pthread_mutex_lock(&fa_pool.mu);
    for (;;) {
        if (fa_pool.open == NULL) {
            pthread_mutex_unlock(&fa_pool.mu);
            FA_POLL_UNTIL(__atomic_load_n(&fa_pool.open, __ATOMIC_ACQUIRE) != NULL);
            pthread_mutex_lock(&fa_pool.mu);
        }
        while ((r = fa_pool.open) == NULL) {
            if (fa_pool.nworkers > fa_pool.limit) {
                fa_pool.nworkers--;
                pthread_mutex_unlock(&fa_pool.mu);
                return NULL;
            }
            fa_pool.nidle++;
            pthread_cond_wait(&fa_pool.wake, &fa_pool.mu);
            fa_pool.nidle--;
        }
        __atomic_store_n(&r->active, r->active + 1, __ATOMIC_RELEASE);
        if (--r->want == 0)
            fa_unlink_run(r);
        pthread_mutex_unlock(&fa_pool.mu);
        fa_participate(r);
        pthread_mutex_lock(&fa_pool.mu);
        __atomic_store_n(&r->active, r->active - 1, __ATOMIC_RELEASE);
        if (r->active == 0)
            pthread_cond_signal(&r->left);   /* r stays valid until its caller sees this */
    }
}

/* A forked child has none of the parent's threads: start from an empty pool. */
static void fa_pool_after_fork_child(void)
{
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
    memcpy(&fa_pool.mu, &mu, sizeof mu);
    memcpy(&fa_pool.wake, &wake, sizeof wake);
    fa_pool.nworkers = fa_pool.limit = fa_pool.nidle = 0;
    fa_pool.open = NULL;
}

/* Start workers until there are n (the lock is held). FA_RUN_NOTHREAD when the OS
 * refuses one: the workers started by this call are retired again. */
static int fa_pool_grow(int n)
{
    pthread_t tid;
    pthread_attr_t attr;
    int before = fa_pool.nworkers, err = 0;
    if (!fa_pool.atfork_registered) {
        pthread_atfork(NULL, NULL, fa_pool_after_fork_child);
        fa_pool.atfork_registered = 1;
    }
    if (n <= fa_pool.nworkers) {
        /* enough workers (some may be retiring after a refused grow: keep n of them) */
        if (fa_pool.limit < n)
            fa_pool.limit = n;
        return FA_RUN_OK;
    }
    if (pthread_attr_init(&attr) != 0)
        return FA_RUN_NOTHREAD;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    fa_pool.limit = n;
    while (fa_pool.nworkers < n) {
        if (pthread_create(&tid, &attr, fa_worker_main, NULL) != 0) {
            err = 1;
            break;
        }
        fa_pool.nworkers++;
    }
    pthread_attr_destroy(&attr);
    if (err) {
        fa_pool.limit = before;
        pthread_cond_broadcast(&fa_pool.wake);   /* the surplus ones retire */
        return FA_RUN_NOTHREAD;
    }
    return FA_RUN_OK;
}

static int fa_pool_workers(void)
{
    int n;
    pthread_mutex_lock(&fa_pool.mu);
    n = fa_pool.nworkers;
    pthread_mutex_unlock(&fa_pool.mu);
    return n;
}

#else
static int fa_pool_workers(void) { return 0; }
#endif  /* FA_HAVE_THREADS */

/* Run item(ctx, i, scratch) for i in [0, nitems) on up to nthreads threads, the caller
 * included. Returns FA_RUN_OK, FA_RUN_NOMEM (some items were not computed) or
 * FA_RUN_NOTHREAD (nothing was computed: the OS refused a thread). */
static int fa_parallel_run(fa_item_fn item, void *ctx, ptrdiff_t nitems, ptrdiff_t grain,
                           size_t scratch_bytes, int nthreads)
{
    fa_run r;
    ptrdiff_t claims;
    if (nitems <= 0)
        return FA_RUN_OK;
    if (grain < 1)
        grain = 1;
    claims = (nitems + grain - 1) / grain;
    if (nthreads > claims)
        nthreads = (int)claims;
    memset(&r, 0, sizeof r);
    r.item = item;
    r.ctx = ctx;
    r.nitems = nitems;
    r.grain = grain;
    r.scratch_bytes = scratch_bytes;
#if FA_HAVE_THREADS
    if (nthreads > 1) {
        pthread_mutex_lock(&fa_pool.mu);
        if (fa_pool_grow(nthreads - 1) != FA_RUN_OK) {
            pthread_mutex_unlock(&fa_pool.mu);
            return FA_RUN_NOTHREAD;
        }
        pthread_cond_init(&r.left, NULL);
        r.want = nthreads - 1;
        r.older = fa_pool.open;
        __atomic_store_n(&fa_pool.open, &r, __ATOMIC_RELEASE);
        if (fa_pool.nidle >= r.want)
            for (int w = 0; w < r.want; w++)
                pthread_cond_signal(&fa_pool.wake);
        else
            pthread_cond_broadcast(&fa_pool.wake);
        pthread_mutex_unlock(&fa_pool.mu);
    }
#endif
    fa_participate(&r);
#if FA_HAVE_THREADS
    if (nthreads > 1) {
        /* Close the run to latecomers, then wait for those inside an item. */
        pthread_mutex_lock(&fa_pool.mu);
        if (r.want > 0)
            fa_unlink_run(&r);
        r.want = 0;
        if (r.active > 0) {
            pthread_mutex_unlock(&fa_pool.mu);
            FA_POLL_UNTIL(__atomic_load_n(&r.active, __ATOMIC_ACQUIRE) == 0);
            pthread_mutex_lock(&fa_pool.mu);
        }
        while (r.active > 0)
            pthread_cond_wait(&r.left, &fa_pool.mu);
        pthread_mutex_unlock(&fa_pool.mu);
        pthread_cond_destroy(&r.left);
    }
#endif
    return r.failed ? FA_RUN_NOMEM : FA_RUN_OK;
}

#endif  /* FASTATTN_THREADPOOL_H */
