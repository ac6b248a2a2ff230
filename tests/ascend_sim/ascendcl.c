/*
 * libascendcl.so test double: runtime, devices, streams, "device" memory.
 *
 * Device memory lives on the host heap. Every allocation is recorded so that
 * memcpy, memset and the operators can refuse any access outside a live
 * allocation, and so that tests can check allocs == frees (ascendsim_mem_stats)
 * and count the bytes each kind of copy moved (ascendsim_copy_stats).
 *
 * Environment (read by aclInit):
 *   ASCEND_SIM_DEVICE_COUNT  number of devices (default 2)
 *   ASCEND_SIM_MEM_LIMIT     bytes per device before aclrtMalloc fails (default 1 GiB)
 */
#define _GNU_SOURCE
#include "sim.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STREAM_MAGIC 0x5354524du
#define MAX_DEVICES 64

typedef struct {
    char *base;
    uint64_t size; /* usable size, ALIGN_UP(request, 32) + 32 as documented */
    int device;
} Allocation;

typedef struct {
    uint32_t magic;
    int device;
} SimStream;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_initialized = 0;
static int g_device_count = 2;
static uint64_t g_mem_limit = (uint64_t)1 << 30;
static uint64_t g_device_bytes[MAX_DEVICES];
static int g_device_open[MAX_DEVICES];

static Allocation *g_allocs = NULL;
static size_t g_alloc_count = 0, g_alloc_cap = 0;
static int64_t g_total_allocs = 0, g_total_frees = 0;
static int64_t g_live_streams = 0;

static __thread int t_device = -1;
static __thread char t_errmsg[1024];

static char g_fail_name[128];
static int g_fail_code = 0;

/* Fault injection by position: every exported acl and aclnn function (except
 * aclGetRecentErrMsg, which only reports) passes through ascendsim_injected_failure
 * on entry, which numbers the calls from the last ascendsim_calls_reset. The call
 * numbered g_fail_at returns g_fail_at_code (one shot); with tracing on, the names of
 * the calls are recorded so that a test can inject a failure into each one in turn. */
static int64_t g_call_index = 0;
static int64_t g_fail_at = -1;
static int g_fail_at_code = 0;
static int g_fail_at_hit = 0;
static int g_tracing = 0;
static char *g_trace = NULL;
static size_t g_trace_len = 0, g_trace_cap = 0;

/* ------------------------------------------------------------------ */
/* errors and fault injection                                          */
/* ------------------------------------------------------------------ */

void ascendsim_set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_errmsg, sizeof t_errmsg, fmt, ap);
    va_end(ap);
}

SIM_EXPORT const char *aclGetRecentErrMsg(void) {
    return t_errmsg[0] ? t_errmsg : NULL;
}

/* Test hook: the next call of fn_name returns code (one shot). */
SIM_EXPORT void ascendsim_fail_next(const char *fn_name, int code) {
    pthread_mutex_lock(&g_lock);
    snprintf(g_fail_name, sizeof g_fail_name, "%s", fn_name ? fn_name : "");
    g_fail_code = fn_name ? code : 0;
    g_fail_at = fn_name ? g_fail_at : -1; /* ascendsim_fail_next(NULL, 0) clears both */
    pthread_mutex_unlock(&g_lock);
}

/* Test hook: number calls from 0 again; tracing (1) records their names. */
SIM_EXPORT void ascendsim_calls_reset(int tracing) {
    pthread_mutex_lock(&g_lock);
    g_call_index = 0;
    g_fail_at_hit = 0;
    g_tracing = tracing;
    g_trace_len = 0;
    if (g_trace) g_trace[0] = 0;
    pthread_mutex_unlock(&g_lock);
}

/* Test hook: the call numbered index (from the last reset) returns code; -1 clears. */
SIM_EXPORT void ascendsim_fail_at(int64_t index, int code) {
    pthread_mutex_lock(&g_lock);
    g_fail_at = index;
    g_fail_at_code = code;
    g_fail_at_hit = 0;
    pthread_mutex_unlock(&g_lock);
}

/* Test hook: 1 once the failure set by ascendsim_fail_at has been returned. */
SIM_EXPORT int ascendsim_fail_at_hit(void) {
    pthread_mutex_lock(&g_lock);
    int hit = g_fail_at_hit;
    pthread_mutex_unlock(&g_lock);
    return hit;
}

/* Test hook: the names of the calls since ascendsim_calls_reset(1), one per line;
 * copies up to capacity bytes (NUL included) and returns the full length. */
SIM_EXPORT int64_t ascendsim_trace(char *out, int64_t capacity) {
    pthread_mutex_lock(&g_lock);
    int64_t length = (int64_t)g_trace_len;
    if (out != NULL && capacity > 0) {
        int64_t n = length < capacity - 1 ? length : capacity - 1;
        if (n > 0) memcpy(out, g_trace, (size_t)n);
        out[n] = 0;
    }
    pthread_mutex_unlock(&g_lock);
    return length;
}

static void trace_append(const char *fn_name) { /* lock held */
    size_t n = strlen(fn_name) + 1;
    if (g_trace_len + n + 1 > g_trace_cap) {
        size_t cap = g_trace_cap ? 2 * g_trace_cap : 4096;
        while (cap < g_trace_len + n + 1) cap *= 2;
        char *grown = realloc(g_trace, cap);
        if (grown == NULL) return; /* the trace is a test aid: drop the name */
        g_trace = grown;
        g_trace_cap = cap;
    }
    memcpy(g_trace + g_trace_len, fn_name, n - 1);
    g_trace[g_trace_len + n - 1] = '\n';
    g_trace_len += n;
    g_trace[g_trace_len] = 0;
}

int ascendsim_injected_failure(const char *fn_name) {
    int code = 0;
    pthread_mutex_lock(&g_lock);
    const int64_t index = g_call_index++;
    if (g_tracing) trace_append(fn_name);
    if (g_fail_at >= 0 && index == g_fail_at) {
        code = g_fail_at_code;
        g_fail_at = -1;
        g_fail_at_hit = 1;
    } else if (g_fail_code != 0 && strcmp(g_fail_name, fn_name) == 0) {
        code = g_fail_code;
        g_fail_code = 0;
    }
    pthread_mutex_unlock(&g_lock);
    if (code != 0)
        ascendsim_set_error("EZ9999: injected failure of %s (code %d)", fn_name, code);
    return code;
}

#define INJECTED(name)                                  \
    do {                                                \
        int injected_ = ascendsim_injected_failure(name); \
        if (injected_ != 0) return injected_;           \
    } while (0)

int ascendsim_is_initialized(void) { return g_initialized; }

/* ------------------------------------------------------------------ */
/* init / finalize / devices                                           */
/* ------------------------------------------------------------------ */

SIM_EXPORT aclError aclInit(const char *configPath) {
    (void)configPath;
    INJECTED("aclInit");
    pthread_mutex_lock(&g_lock);
    if (g_initialized) {
        pthread_mutex_unlock(&g_lock);
        ascendsim_set_error("EH9999: aclInit called twice in one process");
        return ACL_ERROR_REPEAT_INITIALIZE;
    }
    const char *count = getenv("ASCEND_SIM_DEVICE_COUNT");
    const char *limit = getenv("ASCEND_SIM_MEM_LIMIT");
    g_device_count = count ? atoi(count) : 2;
    if (g_device_count < 0) g_device_count = 0;
    if (g_device_count > MAX_DEVICES) g_device_count = MAX_DEVICES;
    g_mem_limit = limit ? strtoull(limit, NULL, 10) : ((uint64_t)1 << 30);
    g_initialized = 1;
    pthread_mutex_unlock(&g_lock);
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclFinalize(void) {
    INJECTED("aclFinalize");
    pthread_mutex_lock(&g_lock);
    if (!g_initialized) {
        pthread_mutex_unlock(&g_lock);
        ascendsim_set_error("EH9999: aclFinalize without aclInit");
        return ACL_ERROR_REPEAT_FINALIZE;
    }
    g_initialized = 0;
    pthread_mutex_unlock(&g_lock);
    t_device = -1;
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtGetDeviceCount(uint32_t *count) {
    INJECTED("aclrtGetDeviceCount");
    if (count == NULL) {
        ascendsim_set_error("EE1001: count is NULL");
        return ACL_ERROR_INVALID_PARAM;
    }
    const char *env = getenv("ASCEND_SIM_DEVICE_COUNT");
    int n = g_initialized ? g_device_count : (env ? atoi(env) : 2);
    *count = (uint32_t)(n < 0 ? 0 : n);
    return ACL_SUCCESS;
}

static aclError check_device_id(int32_t deviceId) {
    if (!g_initialized) {
        ascendsim_set_error("EH9999: aclInit has not been called");
        return ACL_ERROR_UNINITIALIZE;
    }
    if (deviceId < 0 || deviceId >= g_device_count) {
        ascendsim_set_error("EE1001: invalid device id %d, %d device(s) present",
                            deviceId, g_device_count);
        return ACL_ERROR_RT_INVALID_DEVICEID;
    }
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtSetDevice(int32_t deviceId) {
    INJECTED("aclrtSetDevice");
    aclError err = check_device_id(deviceId);
    if (err) return err;
    t_device = deviceId;
    g_device_open[deviceId] = 1;
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtResetDevice(int32_t deviceId) {
    INJECTED("aclrtResetDevice");
    aclError err = check_device_id(deviceId);
    if (err) return err;
    g_device_open[deviceId] = 0;
    if (t_device == deviceId) t_device = -1;
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtGetDevice(int32_t *deviceId) {
    INJECTED("aclrtGetDevice");
    if (deviceId == NULL) return ACL_ERROR_INVALID_PARAM;
    if (t_device < 0) {
        ascendsim_set_error("EE1001: no device set on this thread");
        return ACL_ERROR_RT_CONTEXT_NULL;
    }
    *deviceId = t_device;
    return ACL_SUCCESS;
}

static aclError need_context(void) {
    if (!g_initialized) {
        ascendsim_set_error("EH9999: aclInit has not been called");
        return ACL_ERROR_UNINITIALIZE;
    }
    if (t_device < 0) {
        ascendsim_set_error("EE1001: no context: call aclrtSetDevice first");
        return ACL_ERROR_RT_CONTEXT_NULL;
    }
    return ACL_SUCCESS;
}

/* ------------------------------------------------------------------ */
/* streams                                                             */
/* ------------------------------------------------------------------ */

SIM_EXPORT aclError aclrtCreateStream(aclrtStream *stream) {
    INJECTED("aclrtCreateStream");
    if (stream == NULL) return ACL_ERROR_INVALID_PARAM;
    aclError err = need_context();
    if (err) return err;
    SimStream *s = malloc(sizeof *s);
    if (s == NULL) return ACL_ERROR_RT_MEMORY_ALLOCATION;
    s->magic = STREAM_MAGIC;
    s->device = t_device;
    __atomic_add_fetch(&g_live_streams, 1, __ATOMIC_SEQ_CST);
    *stream = s;
    return ACL_SUCCESS;
}

int ascendsim_stream_valid(aclrtStream stream) {
    if (stream == NULL) return 1; /* default stream */
    return ((SimStream *)stream)->magic == STREAM_MAGIC;
}

SIM_EXPORT aclError aclrtDestroyStream(aclrtStream stream) {
    INJECTED("aclrtDestroyStream");
    if (stream == NULL || !ascendsim_stream_valid(stream)) {
        ascendsim_set_error("EE1001: invalid stream");
        return ACL_ERROR_INVALID_PARAM;
    }
    ((SimStream *)stream)->magic = 0;
    free(stream);
    __atomic_sub_fetch(&g_live_streams, 1, __ATOMIC_SEQ_CST);
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtSynchronizeStream(aclrtStream stream) {
    INJECTED("aclrtSynchronizeStream");
    if (!ascendsim_stream_valid(stream)) {
        ascendsim_set_error("EE1001: invalid stream");
        return ACL_ERROR_INVALID_PARAM;
    }
    return need_context(); /* work runs at launch: nothing is pending */
}

/* ------------------------------------------------------------------ */
/* memory                                                              */
/* ------------------------------------------------------------------ */

/* Index of the allocation containing [ptr, ptr + nbytes), or -1. Lock held. */
static long find_allocation(const void *ptr, uint64_t nbytes) {
    const char *p = ptr;
    for (size_t i = 0; i < g_alloc_count; ++i) {
        const Allocation *a = &g_allocs[i];
        if (p >= a->base && p < a->base + a->size &&
            nbytes <= (uint64_t)(a->base + a->size - p))
            return (long)i;
    }
    return -1;
}

int ascendsim_check_range(const void *ptr, uint64_t nbytes) {
    if (ptr == NULL) return 0;
    pthread_mutex_lock(&g_lock);
    long i = find_allocation(ptr, nbytes ? nbytes : 1);
    pthread_mutex_unlock(&g_lock);
    return i >= 0;
}

SIM_EXPORT aclError aclrtMalloc(void **devPtr, size_t size, int policy) {
    INJECTED("aclrtMalloc");
    if (devPtr == NULL || size == 0 || policy < 0 || policy > 7) {
        ascendsim_set_error("EE1001: aclrtMalloc: invalid argument (size %zu, policy %d)",
                            size, policy);
        return ACL_ERROR_INVALID_PARAM;
    }
    aclError err = need_context();
    if (err) return err;
    uint64_t padded = (((uint64_t)size + 31) & ~(uint64_t)31) + 32;
    pthread_mutex_lock(&g_lock);
    if (g_device_bytes[t_device] + padded > g_mem_limit) {
        pthread_mutex_unlock(&g_lock);
        ascendsim_set_error("EL0004: device %d out of memory: %llu bytes requested, "
                            "%llu in use, limit %llu", t_device,
                            (unsigned long long)padded,
                            (unsigned long long)g_device_bytes[t_device],
                            (unsigned long long)g_mem_limit);
        return ACL_ERROR_RT_MEMORY_ALLOCATION;
    }
    if (g_alloc_count == g_alloc_cap) {
        size_t cap = g_alloc_cap ? 2 * g_alloc_cap : 64;
        Allocation *grown = realloc(g_allocs, cap * sizeof *grown);
        if (grown == NULL) {
            pthread_mutex_unlock(&g_lock);
            return ACL_ERROR_RT_MEMORY_ALLOCATION;
        }
        g_allocs = grown;
        g_alloc_cap = cap;
    }
    void *mem = NULL;
    if (posix_memalign(&mem, 64, padded) != 0) {
        pthread_mutex_unlock(&g_lock);
        return ACL_ERROR_RT_MEMORY_ALLOCATION;
    }
    memset(mem, 0xFF, padded); /* not zeroed on hardware: poison with NaNs */
    g_allocs[g_alloc_count++] = (Allocation){mem, padded, t_device};
    g_device_bytes[t_device] += padded;
    g_total_allocs++;
    pthread_mutex_unlock(&g_lock);
    *devPtr = mem;
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtFree(void *devPtr) {
    INJECTED("aclrtFree");
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; i < g_alloc_count; ++i) {
        if (g_allocs[i].base == devPtr) {
            g_device_bytes[g_allocs[i].device] -= g_allocs[i].size;
            free(devPtr);
            g_allocs[i] = g_allocs[--g_alloc_count];
            g_total_frees++;
            pthread_mutex_unlock(&g_lock);
            return ACL_SUCCESS;
        }
    }
    pthread_mutex_unlock(&g_lock);
    ascendsim_set_error("EE1001: aclrtFree: %p is not a live device allocation", devPtr);
    return ACL_ERROR_RT_PARAM_INVALID;
}

/* Per aclrtMemcpyKind 0..3: [calls, bytes]; a 2-D copy counts as one call. */
static int64_t g_copy_stats[4][2];

static void count_copy(int kind, uint64_t nbytes) {
    __atomic_add_fetch(&g_copy_stats[kind][0], 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&g_copy_stats[kind][1], (int64_t)nbytes, __ATOMIC_SEQ_CST);
}

static aclError memcpy_checked(void *dst, size_t destMax, const void *src, size_t count,
                               int kind) {
    if (dst == NULL || src == NULL || count > destMax) {
        ascendsim_set_error("EE1001: aclrtMemcpy: invalid argument (count %zu, destMax %zu)",
                            count, destMax);
        return ACL_ERROR_INVALID_PARAM;
    }
    int dst_on_device = kind == ACL_MEMCPY_HOST_TO_DEVICE || kind == ACL_MEMCPY_DEVICE_TO_DEVICE;
    int src_on_device = kind == ACL_MEMCPY_DEVICE_TO_HOST || kind == ACL_MEMCPY_DEVICE_TO_DEVICE;
    if (kind < ACL_MEMCPY_HOST_TO_HOST || kind > ACL_MEMCPY_DEVICE_TO_DEVICE) {
        ascendsim_set_error("EE1001: aclrtMemcpy: unsupported kind %d", kind);
        return ACL_ERROR_INVALID_PARAM;
    }
    if (count == 0) return ACL_SUCCESS;
    if ((dst_on_device && !ascendsim_check_range(dst, count)) ||
        (src_on_device && !ascendsim_check_range(src, count))) {
        ascendsim_set_error("EE1001: aclrtMemcpy: %zu bytes outside device allocation", count);
        return ACL_ERROR_INVALID_PARAM;
    }
    memmove(dst, src, count);
    count_copy(kind, count);
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count,
                                int kind) {
    INJECTED("aclrtMemcpy");
    return memcpy_checked(dst, destMax, src, count, kind);
}

/* aclrtMemcpy2d: synchronous; height rows of width bytes, rows pitch bytes apart on each
 * side. Documented kinds: HOST_TO_DEVICE and DEVICE_TO_HOST only (hicann/runtime
 * docs/api_docs/aclrtMemcpy2d.md, "约束说明"); any other kind is refused with
 * ACL_ERROR_INVALID_PARAM, as the parameter check of hicann/runtime
 * src/acl/aclrt_impl/memory.cpp (CheckMemcpy2dSyncKind) does and as
 * docs/api_docs/aclrtMemcpy2dAsync.md states for unsupported kinds. A zero width or
 * height copies nothing and succeeds (IsZeroSizeMemcpy2d in the same file). */
SIM_EXPORT aclError aclrtMemcpy2d(void *dst, size_t dpitch, const void *src, size_t spitch,
                                  size_t width, size_t height, int kind) {
    INJECTED("aclrtMemcpy2d");
    if (kind != ACL_MEMCPY_HOST_TO_DEVICE && kind != ACL_MEMCPY_DEVICE_TO_HOST) {
        ascendsim_set_error("EE1001: aclrtMemcpy2d: invalid kind of memcpy, kind = %d "
                            "(HOST_TO_DEVICE or DEVICE_TO_HOST)", kind);
        return ACL_ERROR_INVALID_PARAM;
    }
    if (width == 0 || height == 0) return ACL_SUCCESS;
    if (dst == NULL || src == NULL || width > dpitch || width > spitch) {
        ascendsim_set_error("EE1001: aclrtMemcpy2d: invalid argument (width %zu, dpitch %zu, "
                            "spitch %zu)", width, dpitch, spitch);
        return ACL_ERROR_INVALID_PARAM;
    }
    const void *device = kind == ACL_MEMCPY_HOST_TO_DEVICE ? (const void *)dst : src;
    size_t pitch = kind == ACL_MEMCPY_HOST_TO_DEVICE ? dpitch : spitch;
    if (!ascendsim_check_range(device, (uint64_t)pitch * (height - 1) + width)) {
        ascendsim_set_error("EE1001: aclrtMemcpy2d: %zu rows of %zu bytes (pitch %zu) outside "
                            "device allocation", height, width, pitch);
        return ACL_ERROR_INVALID_PARAM;
    }
    for (size_t row = 0; row < height; ++row)
        memmove((char *)dst + row * dpitch, (const char *)src + row * spitch, width);
    count_copy(kind, (uint64_t)width * height);
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtMemset(void *devPtr, size_t maxCount, int32_t value, size_t count) {
    INJECTED("aclrtMemset");
    if (devPtr == NULL || count > maxCount) {
        ascendsim_set_error("EE1001: aclrtMemset: invalid argument (count %zu, maxCount %zu)",
                            count, maxCount);
        return ACL_ERROR_INVALID_PARAM;
    }
    if (count == 0) return ACL_SUCCESS;
    if (!ascendsim_check_range(devPtr, count)) {
        ascendsim_set_error("EE1001: aclrtMemset: %zu bytes outside device allocation", count);
        return ACL_ERROR_INVALID_PARAM;
    }
    memset(devPtr, value, count);
    return ACL_SUCCESS;
}

SIM_EXPORT aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count,
                                     int kind, aclrtStream stream) {
    INJECTED("aclrtMemcpyAsync");
    if (!ascendsim_stream_valid(stream)) return ACL_ERROR_INVALID_PARAM;
    return memcpy_checked(dst, destMax, src, count, kind);
}

/* ------------------------------------------------------------------ */
/* sim-only queries                                                    */
/* ------------------------------------------------------------------ */

/* out: [allocs, frees, live allocations, live bytes, live streams] */
SIM_EXPORT void ascendsim_mem_stats(int64_t out[5]) {
    pthread_mutex_lock(&g_lock);
    int64_t live_bytes = 0;
    for (size_t i = 0; i < g_alloc_count; ++i) live_bytes += (int64_t)g_allocs[i].size;
    out[0] = g_total_allocs;
    out[1] = g_total_frees;
    out[2] = (int64_t)g_alloc_count;
    out[3] = live_bytes;
    out[4] = g_live_streams;
    pthread_mutex_unlock(&g_lock);
}

/* out: [calls, bytes] for HOST_TO_HOST, HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE */
SIM_EXPORT void ascendsim_copy_stats(int64_t out[8]) {
    for (int kind = 0; kind < 4; ++kind) {
        out[2 * kind] = __atomic_load_n(&g_copy_stats[kind][0], __ATOMIC_SEQ_CST);
        out[2 * kind + 1] = __atomic_load_n(&g_copy_stats[kind][1], __ATOMIC_SEQ_CST);
    }
}
