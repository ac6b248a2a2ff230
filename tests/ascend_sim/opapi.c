/*
 * libopapi.so test double: aclnnFlashAttentionScore, its backward
 * aclnnFlashAttentionScoreGrad, and aclnnIncreFlashAttentionV4, with the
 * documented two-phase protocol.
 *
 * Phase 1 (…GetWorkspaceSize) validates arguments the way the operator docs
 * describe (NULL required argument -> 161001, anything else out of range ->
 * 161002, message via aclGetRecentErrMsg) and captures copies of the tensor
 * descriptors in a single-use executor. Phase 2 checks the workspace, checks
 * that every tensor lies inside live device memory, then computes the
 * reference result on the host in double precision.
 *
 * Simulated subset (anything else is rejected with 161002 "not simulated"):
 *   FlashAttentionScore: layout BNSD, sparse modes 0-4, attenMask BOOL/UINT8
 *     (1 = masked out), realShift (pse, added before scaling), keepProb 1.
 *   FlashAttentionScoreGrad: as the forward, with the forward's statistics and
 *     output given (softmaxMax, softmaxSum, attentionIn).
 *   IncreFlashAttentionV4: layout BNSD, query S = 1, key/value lists of one
 *     tensor, paged cache (blocknum, KV_N, blockSize, D) or dense (B, KV_N, S, D);
 *     the pool holds at least the blocks the batch reads.
 *   FlashAttentionVarLenScore: layout TND, see opapi_varlen.c.
 */
#include "sim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { KIND_FLASH_ATTENTION_SCORE = 1, KIND_INCRE_FLASH_ATTENTION_V4 = 2 };
#define COMPRESSED_MASK_SIZE 2048

/* ------------------------------------------------------------------ */
/* element access                                                      */
/* ------------------------------------------------------------------ */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float f = ldexpf((float)mantissa, -24);
        return sign ? -f : f;
    }
    uint32_t bits = exponent == 31 ? (sign | 0x7f800000u | (mantissa << 13))
                                   : (sign | ((exponent + 112) << 23) | (mantissa << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, overflow to inf, NaN kept quiet. */
static uint16_t float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) /* inf or NaN */
        return sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u);
    if (magnitude >= 0x477ff000u) /* >= 65520 rounds to inf */
        return sign | 0x7c00u;
    if (magnitude < 0x38800000u) { /* below 2^-14: subnormal, exact scaling by 2^24 */
        float a;
        memcpy(&a, &magnitude, sizeof a);
        return sign | (uint16_t)nearbyintf(a * 16777216.0f);
    }
    uint32_t mantissa = magnitude & 0x7fffffu;
    uint32_t half = ((((magnitude >> 23) - 127 + 15)) << 10) | (mantissa >> 13);
    uint32_t rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half++; /* carry may bump exponent */
    return sign | (uint16_t)half;
}

static float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static int64_t itemsize(int dtype) {
    switch (dtype) {
    case ACL_FLOAT: case ACL_INT32: case ACL_UINT32: return 4;
    case ACL_FLOAT16: case ACL_BF16: case ACL_INT16: case ACL_UINT16: return 2;
    case ACL_INT8: case ACL_UINT8: case ACL_BOOL: return 1;
    case ACL_INT64: case ACL_UINT64: case ACL_DOUBLE: return 8;
    default: return 0;
    }
}

/* Element at flat storage index (offset and strides already applied). */
static double load(const aclTensor *t, int64_t index) {
    const char *p = (const char *)t->data + index * itemsize(t->dtype);
    switch (t->dtype) {
    case ACL_FLOAT: { float v; memcpy(&v, p, 4); return v; }
    case ACL_FLOAT16: { uint16_t v; memcpy(&v, p, 2); return half_to_float(v); }
    case ACL_BF16: { uint16_t v; memcpy(&v, p, 2); return bf16_to_float(v); }
    case ACL_INT32: { int32_t v; memcpy(&v, p, 4); return v; }
    case ACL_INT64: { int64_t v; memcpy(&v, p, 8); return (double)v; }
    case ACL_INT8: return *(const int8_t *)p;
    case ACL_UINT8: case ACL_BOOL: return *(const uint8_t *)p;
    default: return NAN;
    }
}

static void store(const aclTensor *t, int64_t index, double value) {
    char *p = (char *)t->data + index * itemsize(t->dtype);
    float f = (float)value;
    uint16_t h;
    switch (t->dtype) {
    case ACL_FLOAT: memcpy(p, &f, 4); break;
    case ACL_FLOAT16: h = float_to_half(f); memcpy(p, &h, 2); break;
    case ACL_BF16: h = float_to_bf16(f); memcpy(p, &h, 2); break;
    default: break;
    }
}

/* Storage index of a 4-D element; size-1 dims broadcast. */
static int64_t at4(const aclTensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    const int64_t idx[4] = {a, b, c, d};
    int64_t index = t->offset;
    for (int k = 0; k < 4; ++k) index += (t->dims[k] == 1 ? 0 : idx[k]) * t->strides[k];
    return index;
}

/* 1 if every element of t lies inside one live device allocation. */
static int in_device_memory(const aclTensor *t) {
    int64_t last = t->offset;
    for (uint64_t k = 0; k < t->ndim; ++k) {
        if (t->dims[k] == 0) return 1; /* empty: nothing is accessed */
        last += (t->dims[k] - 1) * t->strides[k];
    }
    return ascendsim_check_range(t->data, (uint64_t)(last + 1) * (uint64_t)itemsize(t->dtype));
}

static int same_shape(const aclTensor *t, uint64_t ndim, const int64_t *dims) {
    if (t->ndim != ndim) return 0;
    for (uint64_t k = 0; k < ndim; ++k)
        if (t->dims[k] != dims[k]) return 0;
    return 1;
}

static int strides_ok(const aclTensor *t) {
    for (uint64_t k = 0; k < t->ndim; ++k)
        if (t->strides[k] < 0 || t->dims[k] < 0) return 0;
    return t->data != NULL || t->ndim == 0;
}

static int is_float_dtype(int dtype) {
    return dtype == ACL_FLOAT || dtype == ACL_FLOAT16 || dtype == ACL_BF16;
}

#define FAIL(status, ...)                       \
    do {                                        \
        ascendsim_set_error(__VA_ARGS__);       \
        return (status);                        \
    } while (0)

#define REQUIRE(ptr, name) \
    if ((ptr) == NULL) FAIL(ACLNN_ERR_PARAM_NULLPTR, "EZ1001: %s must not be NULL", name)

#define CHECK_TENSOR(t, name)                                                          \
    if ((t) != NULL && (!ascendsim_tensor_valid(t) || !strides_ok(t)))                \
    FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: %s is not a valid tensor (destroyed, "      \
                                  "negative stride or NULL data)", name)

static int64_t g_launches = 0, g_launch_ns = 0;

/* Test hook: out = [launches, nanoseconds spent inside launches], to separate
 * the binding's overhead from the simulated computation. */
SIM_EXPORT void ascendsim_launch_stats(int64_t out[2]) {
    out[0] = __atomic_load_n(&g_launches, __ATOMIC_SEQ_CST);
    out[1] = __atomic_load_n(&g_launch_ns, __ATOMIC_SEQ_CST);
}

/* What the last successful launch received and produced, for the tests: the operator
 * kind, the aclDataType of its tensors and a copy of its output's bytes as the operator
 * stored them (C order), so that a test can check the dtypes a binding passes and that
 * results reach it bit-exact. Guarded by a spin lock (launches may run concurrently). */
enum { LAST_QUERY, LAST_KEY, LAST_VALUE, LAST_OUT, LAST_PSE, LAST_MASK, LAST_TENSORS };
static struct {
    int64_t kind;
    int64_t dtypes[LAST_TENSORS]; /* -1: not passed */
    int64_t out_dims[4];
    unsigned char *out_bytes;
    int64_t out_nbytes, capacity;
} g_last;
static int g_last_lock = 0;

static void last_lock(void) {
    while (__atomic_exchange_n(&g_last_lock, 1, __ATOMIC_ACQUIRE)) {
    }
}

static void last_unlock(void) { __atomic_store_n(&g_last_lock, 0, __ATOMIC_RELEASE); }

static int64_t itemsize(int dtype);
static int64_t at4(const aclTensor *t, int64_t a, int64_t b, int64_t c, int64_t d);

static void record_launch(int kind, const aclTensor *const tensors[LAST_TENSORS]) {
    const aclTensor *out = tensors[LAST_OUT];
    const int64_t size = itemsize(out->dtype);
    const int64_t nbytes = out->dims[0] * out->dims[1] * out->dims[2] * out->dims[3] * size;
    last_lock();
    if (nbytes > g_last.capacity) {
        unsigned char *grown = realloc(g_last.out_bytes, (size_t)nbytes);
        if (grown == NULL) { /* keep the old record, marked as having no output */
            g_last.out_nbytes = -1;
            last_unlock();
            return;
        }
        g_last.out_bytes = grown;
        g_last.capacity = nbytes;
    }
    g_last.kind = kind;
    for (int k = 0; k < LAST_TENSORS; ++k)
        g_last.dtypes[k] = tensors[k] != NULL ? tensors[k]->dtype : -1;
    unsigned char *dst = g_last.out_bytes;
    for (int k = 0; k < 4; ++k) g_last.out_dims[k] = out->dims[k];
    for (int64_t a = 0; a < out->dims[0]; ++a)
        for (int64_t b = 0; b < out->dims[1]; ++b)
            for (int64_t c = 0; c < out->dims[2]; ++c)
                for (int64_t d = 0; d < out->dims[3]; ++d, dst += size)
                    memcpy(dst, (const char *)out->data + at4(out, a, b, c, d) * size,
                           (size_t)size);
    g_last.out_nbytes = nbytes;
    last_unlock();
}

/* Test hook: info = [kind (0: none yet), aclDataType of query, key, value, out, pse,
 * mask (-1 if not passed), out dims x 4]; copies min(capacity, nbytes) bytes of the last
 * output into out and returns nbytes (-1 if it could not be recorded). */
SIM_EXPORT int64_t ascendsim_last_launch(int64_t info[11], void *out, int64_t capacity) {
    last_lock();
    info[0] = g_last.kind;
    for (int k = 0; k < LAST_TENSORS; ++k) info[1 + k] = g_last.dtypes[k];
    for (int k = 0; k < 4; ++k) info[7 + k] = g_last.out_dims[k];
    const int64_t nbytes = g_last.kind ? g_last.out_nbytes : 0;
    if (out != NULL && nbytes > 0)
        memcpy(out, g_last.out_bytes, (size_t)(capacity < nbytes ? capacity : nbytes));
    last_unlock();
    return nbytes;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Shared phase 2: executor, workspace and memory checks, then run. */
/* End of a GetWorkspaceSize call: the executor takes the checked arguments (freed with
 * it, or here when it cannot be created) and the workspace the launch will need. */
static aclnnStatus hand_over(int kind, void *args, ascendsim_payload_free free_fn,
                             uint64_t required, aclOpExecutor **executor,
                             uint64_t *workspaceSize) {
    *executor = ascendsim_executor_new(kind, args, free_fn, required);
    if (*executor == NULL) {
        free_fn(args);
        FAIL(561101, "EZ9999: could not create executor");
    }
    *workspaceSize = required;
    return ACLNN_SUCCESS;
}

typedef aclnnStatus (*RunFn)(void *payload, double *scratch);

static aclnnStatus launch(const char *name, int kind, void *workspace, uint64_t workspaceSize,
                          aclOpExecutor *executor, aclrtStream stream, RunFn run) {
    const int64_t start = now_ns();
    uint64_t required = 0;
    void *payload = ascendsim_executor_payload(executor, kind, &required);
    if (payload == NULL)
        FAIL(ACLNN_ERR_PARAM_INVALID,
             "EZ1001: %s: executor is not live (each executor runs once unless "
             "aclSetAclOpExecutorRepeatable was called)", name);
    int injected = ascendsim_injected_failure(name);
    aclnnStatus status = ACLNN_SUCCESS;
    if (injected) {
        status = injected;
    } else if (!ascendsim_is_initialized() || !ascendsim_stream_valid(stream)) {
        ascendsim_set_error("EZ1001: %s: runtime not initialised or invalid stream", name);
        status = ACLNN_ERR_RUNTIME_ERROR;
    } else if (required > 0 && (workspace == NULL || workspaceSize < required ||
                                !ascendsim_check_range(workspace, required))) {
        ascendsim_set_error("EZ1001: %s: workspace of %llu bytes required, got %llu bytes at %p",
                            name, (unsigned long long)required,
                            (unsigned long long)workspaceSize, workspace);
        status = ACLNN_ERR_PARAM_INVALID;
    } else {
        status = run(payload, (double *)workspace);
    }
    ascendsim_executor_spend(executor); /* single use, success or failure */
    __atomic_add_fetch(&g_launches, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&g_launch_ns, now_ns() - start, __ATOMIC_SEQ_CST);
    return status;
}

/* ------------------------------------------------------------------ */
/* what the attention operators share                                  */
/* ------------------------------------------------------------------ */
/*
 * FlashAttentionScore, its Grad and VarLenScore take the same query/key/value,
 * attenMask and statistics arguments and compute the same masked softmax of one head at a
 * time. The pieces below serve all three: the argument checks of phase 1, the checks at
 * launch, a head's rows inside a BNSD or TND tensor, its scores and its forward.
 */

#define TRY(call)                                              \
    do {                                                       \
        aclnnStatus try_status_ = (call);                      \
        if (try_status_ != ACLNN_SUCCESS) return try_status_;  \
    } while (0)

typedef struct {
    aclTensor query, key, value, pse, mask, softmax_max, softmax_sum, out;
    int has_pse, has_mask;
    double scale;
    int64_t pre_tokens, next_tokens, inner_precise, sparse_mode;
} FlashAttentionArgs;

/* The arguments a launch needs; pse and mask may be NULL (not passed). */
static void fa_args_fill(FlashAttentionArgs *a, const aclTensor *query, const aclTensor *key,
                         const aclTensor *value, const aclTensor *pse, const aclTensor *mask,
                         const aclTensor *softmax_max, const aclTensor *softmax_sum,
                         const aclTensor *out, double scale, int64_t pre_tokens,
                         int64_t next_tokens, int64_t inner_precise, int64_t sparse_mode) {
    a->query = *query;
    a->key = *key;
    a->value = *value;
    a->softmax_max = *softmax_max;
    a->softmax_sum = *softmax_sum;
    a->out = *out;
    if ((a->has_pse = pse != NULL)) a->pse = *pse;
    if ((a->has_mask = mask != NULL)) a->mask = *mask;
    a->scale = scale;
    a->pre_tokens = pre_tokens;
    a->next_tokens = next_tokens;
    a->inner_precise = inner_precise;
    a->sparse_mode = sparse_mode;
}

/* ---- phase 1 checks ---- */

enum { LAYOUT_TND = 3, LAYOUT_BNSD = 4 }; /* the rank of query/key/value */

static aclnnStatus check_bnsd_layout(const char *inputLayout) {
    if (strcmp(inputLayout, "BNSD") != 0) {
        if (strcmp(inputLayout, "BSH") && strcmp(inputLayout, "SBH") && strcmp(inputLayout, "BSND"))
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: inputLayout '%s' is invalid", inputLayout);
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: inputLayout '%s' is not simulated (BNSD only)",
             inputLayout);
    }
    return ACLNN_SUCCESS;
}

/* query/key/value in BNSD ([B, N, S, D]) or TND ([T, N, D]): equal float dtypes, key and
 * value consistent with the query (same B; same D for key; value = key but for Dv), nothing
 * empty, headNum = N, whole groups of query heads per key head, and the limits. */
static aclnnStatus check_qkv(const aclTensor *query, const aclTensor *key, const aclTensor *value,
                             const char *key_name, int rank, int64_t headNum) {
    const char *layout = rank == LAYOUT_BNSD ? "BNSD" : "TND";
    if (query->ndim != (uint64_t)rank || key->ndim != (uint64_t)rank ||
        value->ndim != (uint64_t)rank)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: %s query/%s/value must be %d-D", layout, key_name,
             rank);
    if (!is_float_dtype(query->dtype) || key->dtype != query->dtype || value->dtype != query->dtype)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query/%s/value dtypes must be equal and one of "
             "FLOAT16, BFLOAT16, FLOAT32 (got %d, %d, %d)", key_name, query->dtype, key->dtype,
             value->dtype);
    const int last = rank - 1, seq = rank == LAYOUT_BNSD ? 2 : 0;
    int consistent = key->dims[last] == query->dims[last] &&
                     (rank != LAYOUT_BNSD || key->dims[0] == query->dims[0]);
    for (int axis = 0; axis < last; ++axis) consistent &= value->dims[axis] == key->dims[axis];
    if (!consistent)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query/%s/value shapes are inconsistent", key_name);
    for (int axis = 0; axis < rank; ++axis)
        if (query->dims[axis] < 1 || key->dims[axis] < 1 || value->dims[axis] < 1)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: empty query/%s/value are not supported",
                 key_name);
    const int64_t N = query->dims[1], Nkv = key->dims[1], D = query->dims[last];
    const int64_t Dv = value->dims[last];
    if (headNum != N)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: headNum %lld != query N %lld", (long long)headNum,
             (long long)N);
    if (N % Nkv != 0)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query heads %lld not a multiple of key heads %lld",
             (long long)N, (long long)Nkv);
    if (N > 256 || D > 768 || Dv > D || query->dims[seq] > (1 << 20) ||
        key->dims[seq] > (1 << 20))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: limits exceeded: N <= 256, Dv <= D <= 768, "
             "%s <= 1M (N=%lld, D=%lld, Dv=%lld)", rank == LAYOUT_BNSD ? "S" : "T", (long long)N,
             (long long)D, (long long)Dv);
    return ACLNN_SUCCESS;
}

static aclnnStatus check_no_dropout(double keepProb, const aclTensor *dropMask,
                                    const aclTensor *paddingMask, const aclIntArray *prefix) {
    if (!(keepProb > 0.0 && keepProb <= 1.0))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: keepProb must be in (0, 1]");
    if (keepProb != 1.0 || dropMask || paddingMask || prefix)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: dropout, paddingMask and prefix are not simulated");
    return ACLNN_SUCCESS;
}

/* attenMask, 1 = masked out: BOOL or UINT8. Sparse modes 2-4 take the [2048, 2048]
 * compressed mask (its content is checked at launch), and mode 4 a band that is not empty
 * (sparse_mode_introduction.md, sparseMode=4: "preTokens and nextTokens must have an
 * intersection", -preTokens <= j - i' <= nextTokens). Modes 0 and 1 take the full mask,
 * [B,N,Sq,Skv], [B,1,Sq,Skv], [1,1,Sq,Skv] or [Sq,Skv]: bnss = {B, N, Sq, Skv}. */
static aclnnStatus check_atten_mask(const aclTensor *m, int64_t sparseMode, int64_t preTokens,
                                    int64_t nextTokens, const int64_t bnss[4]) {
    if (m->dtype != ACL_BOOL && m->dtype != ACL_UINT8)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attenMask dtype must be BOOL or UINT8");
    if (sparseMode >= 2 && sparseMode <= 4) {
        if (m->ndim != 2 || m->dims[0] != COMPRESSED_MASK_SIZE ||
            m->dims[1] != COMPRESSED_MASK_SIZE)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld needs a [2048, 2048] "
                 "compressed attenMask", (long long)sparseMode);
        if (sparseMode == 4 && preTokens < -nextTokens)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode 4: preTokens %lld and nextTokens "
                 "%lld have no intersection", (long long)preTokens, (long long)nextTokens);
        return ACLNN_SUCCESS;
    }
    const int64_t B = bnss[0], N = bnss[1], Sq = bnss[2], Skv = bnss[3];
    int ok;
    if (m->ndim == 2)
        ok = m->dims[0] == Sq && m->dims[1] == Skv;
    else
        ok = m->ndim == 4 && m->dims[2] == Sq && m->dims[3] == Skv &&
             ((m->dims[0] == B && (m->dims[1] == N || m->dims[1] == 1)) ||
              (m->dims[0] == 1 && m->dims[1] == 1));
    if (!ok)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attenMask shape must be [B,N,Sq,Skv], "
             "[B,1,Sq,Skv], [1,1,Sq,Skv] or [Sq,Skv]");
    return ACLNN_SUCCESS;
}

/* pse (realShift / pseShift), added before scaling: the query dtype, [B,N,Sq,Skv] (BNSS),
 * [B,N,1,Skv] (BN1S) or [1,N,Sq,Skv] (1NSS). */
static aclnnStatus check_pse(const aclTensor *p, const char *name, int dtype,
                             const int64_t bnss[4]) {
    const int64_t B = bnss[0], N = bnss[1], Sq = bnss[2], Skv = bnss[3];
    const int ok = p->dtype == dtype && p->ndim == 4 && p->dims[1] == N && p->dims[3] == Skv &&
                   ((p->dims[0] == B && (p->dims[2] == Sq || p->dims[2] == 1)) ||
                    (p->dims[0] == 1 && p->dims[2] == Sq));
    if (!ok)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: %s must have the query dtype and shape "
             "[B,N,Sq,Skv], [B,N,1,Skv] or [1,N,Sq,Skv]", name);
    return ACLNN_SUCCESS;
}

/* ---- launch checks ---- */

/* Every tensor passed (NULL: not passed) lies inside live device memory. */
static aclnnStatus check_in_device_memory(int count, const aclTensor *const tensors[],
                                          const char *const names[]) {
    for (int k = 0; k < count; ++k)
        if (tensors[k] != NULL && !in_device_memory(tensors[k]))
            FAIL(ACLNN_ERR_RUNTIME_ERROR, "EZ9999: %s lies outside device memory "
                 "(freed or too small)", names[k]);
    return ACLNN_SUCCESS;
}

/* Sparse modes 2-4: the mask must be exactly triu(ones(2048, 2048), diagonal=1). */
static aclnnStatus check_compressed_mask(const FlashAttentionArgs *a) {
    if (!a->has_mask || a->sparse_mode < 2 || a->sparse_mode > 4) return ACLNN_SUCCESS;
    const aclTensor *m = &a->mask;
    const uint8_t *row = (const uint8_t *)m->data + m->offset;
    const int contiguous = m->strides[1] == 1 && m->strides[0] == COMPRESSED_MASK_SIZE;
    uint8_t expected[COMPRESSED_MASK_SIZE]; /* row i: zeros up to i, then ones */
    for (int64_t i = 0; i < COMPRESSED_MASK_SIZE; ++i) {
        int row_ok = 1;
        if (contiguous) { /* fast path: compare whole rows */
            memset(expected, 0, (size_t)i + 1);
            memset(expected + i + 1, 1, (size_t)(COMPRESSED_MASK_SIZE - i - 1));
            row_ok = memcmp(row + i * COMPRESSED_MASK_SIZE, expected, COMPRESSED_MASK_SIZE) == 0;
        } else {
            for (int64_t j = 0; j < COMPRESSED_MASK_SIZE && row_ok; ++j)
                row_ok = (load(m, m->offset + i * m->strides[0] + j * m->strides[1]) != 0) ==
                         (j > i);
        }
        if (!row_ok)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld needs the compressed "
                 "mask triu(ones(2048,2048),1); row %lld differs",
                 (long long)a->sparse_mode, (long long)i);
    }
    return ACLNN_SUCCESS;
}

/* What aclnnFlashAttentionScore and aclnnFlashAttentionVarLenScore check at launch. */
static aclnnStatus fa_launch_checks(const FlashAttentionArgs *a) {
    const aclTensor *const tensors[] = {&a->query, &a->key, &a->value, &a->softmax_max,
                                        &a->softmax_sum, &a->out, a->has_pse ? &a->pse : NULL,
                                        a->has_mask ? &a->mask : NULL};
    static const char *const names[] = {"query", "key", "value", "softmaxMaxOut",
                                        "softmaxSumOut", "attentionOutOut", "realShiftOptional",
                                        "attenMaskOptional"};
    TRY(check_in_device_memory(8, tensors, names));
    return check_compressed_mask(a);
}

/* ---- one head in float64 ---- */

/* A matrix inside a tensor: element (r, c) at storage index origin + r * row + c * col. */
typedef struct {
    const aclTensor *t;
    int64_t origin, row, col;
} Rows;

static double rows_load(const Rows *m, int64_t r, int64_t c) {
    return load(m->t, m->origin + r * m->row + c * m->col);
}

static void rows_store(const Rows *m, int64_t r, int64_t c, double value) {
    store(m->t, m->origin + r * m->row + c * m->col, value);
}

/* [S, D] of head n of batch b of a BNSD tensor; size-1 dims broadcast (as at4). */
static Rows bnsd_head(const aclTensor *t, int64_t b, int64_t n) {
    return (Rows){t, at4(t, b, n, 0, 0), t->dims[2] == 1 ? 0 : t->strides[2],
                  t->dims[3] == 1 ? 0 : t->strides[3]};
}

static int64_t at3(const aclTensor *t, int64_t a, int64_t b, int64_t c) {
    return t->offset + a * t->strides[0] + b * t->strides[1] + c * t->strides[2];
}

/* Head n of the rows from `first` of a TND tensor [T, N, D]: [S, D]. */
static Rows tnd_head(const aclTensor *t, int64_t first, int64_t n) {
    return (Rows){t, at3(t, first, n, 0), t->strides[0], t->strides[2]};
}

/* One head of one batch (or sequence): the query rows against their key/value head. */
typedef struct {
    const FlashAttentionArgs *a;
    Rows q, k, v, out, max, sum; /* max/sum: the statistics, 8 columns per row */
    Rows pse, mask;              /* if passed; mask: modes 0 and 1 only */
} Head;

/* Head n of batch b, BNSD; its key/value head is n / group. */
static Head fa_head(const FlashAttentionArgs *a, int64_t b, int64_t n, int64_t group) {
    Head h = {a, bnsd_head(&a->query, b, n), bnsd_head(&a->key, b, n / group),
              bnsd_head(&a->value, b, n / group), bnsd_head(&a->out, b, n),
              bnsd_head(&a->softmax_max, b, n), bnsd_head(&a->softmax_sum, b, n),
              {0}, {0}};
    if (a->has_pse) h.pse = bnsd_head(&a->pse, b, n);
    if (a->has_mask && (a->sparse_mode < 2 || a->sparse_mode > 4)) {
        const aclTensor *m = &a->mask;
        h.mask = m->ndim == 2 ? (Rows){m, m->offset, m->strides[0], m->strides[1]}
                              : bnsd_head(m, b, n);
    }
    return h;
}

/* Is key j masked out for query i? Modes 2-4 are rule-based (the compressed mask is checked
 * at launch); without a mask, sparse mode and pre/next are ignored: "sparseMode、preTokens、
 * nextTokens参数不生效，固定为全计算" (ops-transformer attention/flash_attention_score/docs/
 * aclnnFlashAttentionScore.md, 约束说明). */
static int masked_out(const Head *h, int64_t i, int64_t j, int64_t Sq, int64_t Skv) {
    const FlashAttentionArgs *a = h->a;
    if (!a->has_mask) return 0;
    switch (a->sparse_mode) {
    case 2: return j > i;               /* causal, top-left origin */
    case 3: return j > i + (Skv - Sq);  /* causal, bottom-right origin */
    case 4: /* band, bottom-right origin: -preTokens <= j - (i + Skv - Sq) <= nextTokens */
        return j - (i + Skv - Sq) > a->next_tokens || (i + Skv - Sq) - j > a->pre_tokens;
    default:
        if (rows_load(&h->mask, i, j) != 0) return 1; /* Ascend polarity: 1 = masked out */
        /* mode 0 also applies the band -preTokens <= j - i <= nextTokens */
        return a->sparse_mode == 0 && (j - i > a->next_tokens || i - j > a->pre_tokens);
    }
}

/* Query row i's scores s_j = scale * (q_i . k_j + pse_ij), -inf where masked out. Returns
 * their maximum; *visible: whether any key is visible. */
static double score_row(const Head *h, int64_t i, int64_t Sq, int64_t Skv, int64_t D,
                        double *scores, int *visible) {
    const FlashAttentionArgs *a = h->a;
    double row_max = -INFINITY;
    *visible = 0;
    for (int64_t j = 0; j < Skv; ++j) {
        if (masked_out(h, i, j, Sq, Skv)) {
            scores[j] = -INFINITY;
            continue;
        }
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) dot += rows_load(&h->q, i, d) * rows_load(&h->k, j, d);
        if (a->has_pse) dot += rows_load(&h->pse, i, j);
        scores[j] = a->scale * dot;
        if (scores[j] > row_max) row_max = scores[j];
        *visible = 1;
    }
    return row_max;
}

/* What a row with no visible key gets: zeros with innerPrecise 2 ("使能无效行计算", also
 * implied by sparse mode 3 with Sq > Skv), undefined (NaN here) otherwise. */
static double empty_row_value(const FlashAttentionArgs *a, int64_t Sq, int64_t Skv) {
    return a->inner_precise == 2 || (a->sparse_mode == 3 && Sq > Skv) ? 0.0 : NAN;
}

/* The forward of one head: out_i = sum_j p_ij v_j / sum_j p_ij with p_ij = exp(s_ij - max_i),
 * and the statistics max_i and sum_j p_ij replicated over their 8 columns. A row with no
 * visible key gets empty_row_value in out and sum, and max -inf. */
static void attend_head(const Head *h, int64_t Sq, int64_t Skv, int64_t D, int64_t Dv,
                        double *scores) {
    const double empty = empty_row_value(h->a, Sq, Skv);
    for (int64_t i = 0; i < Sq; ++i) {
        int visible;
        const double row_max = score_row(h, i, Sq, Skv, D, scores, &visible);
        double row_sum = 0.0;
        if (row_max == -INFINITY) {
            for (int64_t d = 0; d < Dv; ++d) rows_store(&h->out, i, d, empty);
            row_sum = empty;
        } else {
            // p_j <- exp(s_j - max); out <- sum_j p_j v_j / sum_j p_j
            for (int64_t j = 0; j < Skv; ++j) {
                scores[j] = exp(scores[j] - row_max); /* exp(-inf) = 0 */
                row_sum += scores[j];
            }
            for (int64_t d = 0; d < Dv; ++d) {
                double acc = 0.0;
                for (int64_t j = 0; j < Skv; ++j)
                    if (scores[j] != 0.0) acc += scores[j] * rows_load(&h->v, j, d);
                rows_store(&h->out, i, d, acc / row_sum);
            }
        }
        for (int64_t r = 0; r < 8; ++r) {
            rows_store(&h->max, i, r, row_max);
            rows_store(&h->sum, i, r, row_sum);
        }
    }
}

/* ------------------------------------------------------------------ */
/* aclnnFlashAttentionScore                                            */
/* ------------------------------------------------------------------ */

static aclnnStatus fa_run(void *payload, double *scores) {
    const FlashAttentionArgs *a = payload;
    TRY(fa_launch_checks(a));
    const int64_t B = a->query.dims[0], N = a->query.dims[1], Sq = a->query.dims[2];
    const int64_t D = a->query.dims[3], Skv = a->key.dims[2], Dv = a->value.dims[3];
    const int64_t group = N / a->key.dims[1];
    for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) {
            const Head h = fa_head(a, b, n, group);
            attend_head(&h, Sq, Skv, D, Dv, scores);
        }
    const aclTensor *const seen[LAST_TENSORS] = {&a->query, &a->key, &a->value, &a->out,
                                                 a->has_pse ? &a->pse : NULL,
                                                 a->has_mask ? &a->mask : NULL};
    record_launch(KIND_FLASH_ATTENTION_SCORE, seen);
    return ACLNN_SUCCESS;
}

SIM_EXPORT aclnnStatus aclnnFlashAttentionScoreGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value,
    const aclTensor *realShiftOptional, const aclTensor *dropMaskOptional,
    const aclTensor *paddingMaskOptional, const aclTensor *attenMaskOptional,
    const aclIntArray *prefixOptional, double scaleValue, double keepProb, int64_t preTokens,
    int64_t nextTokens, int64_t headNum, char *inputLayout, int64_t innerPrecise,
    int64_t sparseMode, const aclTensor *softmaxMaxOut, const aclTensor *softmaxSumOut,
    const aclTensor *softmaxOutOut, const aclTensor *attentionOutOut, uint64_t *workspaceSize,
    aclOpExecutor **executor) {
    int injected = ascendsim_injected_failure("aclnnFlashAttentionScoreGetWorkspaceSize");
    if (injected) return injected;
    REQUIRE(query, "query");
    REQUIRE(key, "key");
    REQUIRE(value, "value");
    REQUIRE(inputLayout, "inputLayout");
    REQUIRE(softmaxMaxOut, "softmaxMaxOut");
    REQUIRE(softmaxSumOut, "softmaxSumOut");
    REQUIRE(attentionOutOut, "attentionOutOut");
    REQUIRE(workspaceSize, "workspaceSize");
    REQUIRE(executor, "executor");
    CHECK_TENSOR(query, "query");
    CHECK_TENSOR(key, "key");
    CHECK_TENSOR(value, "value");
    CHECK_TENSOR(realShiftOptional, "realShiftOptional");
    CHECK_TENSOR(attenMaskOptional, "attenMaskOptional");
    CHECK_TENSOR(softmaxMaxOut, "softmaxMaxOut");
    CHECK_TENSOR(softmaxSumOut, "softmaxSumOut");
    CHECK_TENSOR(attentionOutOut, "attentionOutOut");
    if (softmaxOutOut != NULL && !ascendsim_tensor_valid(softmaxOutOut))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: softmaxOutOut is not a valid tensor");

    TRY(check_bnsd_layout(inputLayout));
    TRY(check_qkv(query, key, value, "key", LAYOUT_BNSD, headNum));
    const int64_t B = query->dims[0], N = query->dims[1], Sq = query->dims[2];
    const int64_t Skv = key->dims[2], Dv = value->dims[3];
    TRY(check_no_dropout(keepProb, dropMaskOptional, paddingMaskOptional, prefixOptional));
    if (innerPrecise < 0 || innerPrecise > 2)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: innerPrecise must be 0, 1 or 2");
    if (sparseMode < 0 || sparseMode > 8)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld is invalid", (long long)sparseMode);
    if (sparseMode > 4)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld is not simulated",
             (long long)sparseMode);

    const int64_t stats_shape[4] = {B, N, Sq, 8}, out_shape[4] = {B, N, Sq, Dv};
    if (softmaxMaxOut->dtype != ACL_FLOAT || softmaxSumOut->dtype != ACL_FLOAT ||
        !same_shape(softmaxMaxOut, 4, stats_shape) || !same_shape(softmaxSumOut, 4, stats_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: softmaxMaxOut/softmaxSumOut must be FLOAT "
             "[B, N, Sq, 8]");
    if (attentionOutOut->dtype != query->dtype || !same_shape(attentionOutOut, 4, out_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attentionOutOut must be [B, N, Sq, Dv] with the "
             "query dtype");
    const int64_t bnss[4] = {B, N, Sq, Skv};
    if (attenMaskOptional)
        TRY(check_atten_mask(attenMaskOptional, sparseMode, preTokens, nextTokens, bnss));
    if (realShiftOptional) TRY(check_pse(realShiftOptional, "realShift", query->dtype, bnss));

    FlashAttentionArgs *a = calloc(1, sizeof *a);
    if (a == NULL) FAIL(561000, "EZ9999: out of host memory");
    fa_args_fill(a, query, key, value, realShiftOptional, attenMaskOptional, softmaxMaxOut,
                 softmaxSumOut, attentionOutOut, scaleValue, preTokens, nextTokens, innerPrecise,
                 sparseMode);
    /* the launch keeps one row of double scores in the workspace */
    uint64_t required = 4096 + (uint64_t)Skv * sizeof(double);
    return hand_over(KIND_FLASH_ATTENTION_SCORE, a, free, required, executor, workspaceSize);
}

SIM_EXPORT aclnnStatus aclnnFlashAttentionScore(void *workspace, uint64_t workspaceSize,
                                                aclOpExecutor *executor, aclrtStream stream) {
    return launch("aclnnFlashAttentionScore", KIND_FLASH_ATTENTION_SCORE, workspace,
                  workspaceSize, executor, stream, fa_run);
}

/* aclnnFlashAttentionVarLenScore (layout TND, packed variable-length sequences) */
#include "opapi_varlen.c"

/* ------------------------------------------------------------------ */
/* aclnnIncreFlashAttentionV4                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    aclTensor query, key, value, block_table, out;
    int paged;
    int64_t *seq_lens; /* per batch, NULL = full S (dense only) */
    int64_t block_size, num_kv_heads;
    double scale;
} IncreArgs;

static void incre_free(void *payload) {
    IncreArgs *a = payload;
    free(a->seq_lens);
    free(a);
}

static aclnnStatus incre_run(void *payload, double *scores) {
    const IncreArgs *a = payload;
    const aclTensor *const tensors[] = {&a->query, &a->key, &a->value, &a->out,
                                        a->paged ? &a->block_table : NULL};
    static const char *const names[] = {"query", "key", "value", "attentionOut", "blocktable"};
    TRY(check_in_device_memory(5, tensors, names));
    const int64_t B = a->query.dims[0], N = a->query.dims[1], D = a->query.dims[3];
    const int64_t group = N / a->num_kv_heads;
    const int64_t num_blocks = a->key.dims[0];
    if (a->paged) { /* a bad block id would be a device fault: refuse before reading */
        for (int64_t b = 0; b < B; ++b)
            for (int64_t pos = 0; pos < a->seq_lens[b]; pos += a->block_size) {
                const aclTensor *t = &a->block_table;
                int64_t id = (int64_t)load(t, t->offset + b * t->strides[0] +
                                                  (pos / a->block_size) * t->strides[1]);
                if (id < 0 || id >= num_blocks)
                    FAIL(ACLNN_ERR_RUNTIME_ERROR, "EZ9999: blocktable[%lld][%lld] = %lld is "
                         "outside [0, %lld)", (long long)b, (long long)(pos / a->block_size),
                         (long long)id, (long long)num_blocks);
            }
    }
    for (int64_t b = 0; b < B; ++b) {
        const int64_t length = a->seq_lens ? a->seq_lens[b] : a->key.dims[2];
        for (int64_t n = 0; n < N; ++n) {
            const int64_t h = n / group;
            double row_max = -INFINITY, row_sum = 0.0;
            // kv position -> (block id, slot) through the block table, or (b, pos) if dense
            for (int64_t pos = 0; pos < length; ++pos) {
                double dot = 0.0;
                int64_t outer = b, slot = pos;
                if (a->paged) {
                    const aclTensor *t = &a->block_table;
                    outer = (int64_t)load(t, t->offset + b * t->strides[0] +
                                                 (pos / a->block_size) * t->strides[1]);
                    slot = pos % a->block_size;
                }
                for (int64_t d = 0; d < D; ++d)
                    dot += load(&a->query, at4(&a->query, b, n, 0, d)) *
                           load(&a->key, at4(&a->key, outer, h, slot, d));
                scores[pos] = a->scale * dot;
                if (scores[pos] > row_max) row_max = scores[pos];
            }
            for (int64_t pos = 0; pos < length; ++pos) {
                scores[pos] = exp(scores[pos] - row_max);
                row_sum += scores[pos];
            }
            for (int64_t d = 0; d < D; ++d) {
                double acc = 0.0;
                for (int64_t pos = 0; pos < length; ++pos) {
                    int64_t outer = b, slot = pos;
                    if (a->paged) {
                        const aclTensor *t = &a->block_table;
                        outer = (int64_t)load(t, t->offset + b * t->strides[0] +
                                                     (pos / a->block_size) * t->strides[1]);
                        slot = pos % a->block_size;
                    }
                    acc += scores[pos] * load(&a->value, at4(&a->value, outer, h, slot, d));
                }
                /* empty sequence: zeros */
                store(&a->out, at4(&a->out, b, n, 0, d), length > 0 ? acc / row_sum : 0.0);
            }
        }
    }
    const aclTensor *const seen[LAST_TENSORS] = {&a->query, &a->key, &a->value, &a->out,
                                                 NULL, NULL};
    record_launch(KIND_INCRE_FLASH_ATTENTION_V4, seen);
    return ACLNN_SUCCESS;
}

SIM_EXPORT aclnnStatus aclnnIncreFlashAttentionV4GetWorkspaceSize(
    const aclTensor *query, const aclTensorList *key, const aclTensorList *value,
    const aclTensor *pseShift, const aclTensor *attenMask, const aclIntArray *actualSeqLengths,
    const aclTensor *dequantScale1, const aclTensor *quantScale1, const aclTensor *dequantScale2,
    const aclTensor *quantScale2, const aclTensor *quantOffset2, const aclTensor *antiquantScale,
    const aclTensor *antiquantOffset, const aclTensor *blocktable,
    const aclTensor *kvPaddingSize, int64_t numHeads, double scaleValue, char *inputLayout,
    int64_t numKeyValueHeads, int64_t blockSize, int64_t innerPrecise,
    const aclTensor *attentionOut, uint64_t *workspaceSize, aclOpExecutor **executor) {
    int injected = ascendsim_injected_failure("aclnnIncreFlashAttentionV4GetWorkspaceSize");
    if (injected) return injected;
    REQUIRE(query, "query");
    REQUIRE(key, "key");
    REQUIRE(value, "value");
    REQUIRE(inputLayout, "inputLayout");
    REQUIRE(attentionOut, "attentionOut");
    REQUIRE(workspaceSize, "workspaceSize");
    REQUIRE(executor, "executor");
    if (blocktable != NULL) REQUIRE(actualSeqLengths, "actualSeqLengths (page attention)");
    CHECK_TENSOR(query, "query");
    CHECK_TENSOR(attentionOut, "attentionOut");
    CHECK_TENSOR(blocktable, "blocktable");
    if (!ascendsim_tensor_list_valid(key) || !ascendsim_tensor_list_valid(value))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: key/value are not valid tensor lists");
    if (actualSeqLengths != NULL && !ascendsim_int_array_valid(actualSeqLengths))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: actualSeqLengths is not a valid int array");
    if (pseShift || attenMask || dequantScale1 || quantScale1 || dequantScale2 || quantScale2 ||
        quantOffset2 || antiquantScale || antiquantOffset || kvPaddingSize)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: pseShift, attenMask, quantisation and kv padding "
             "are not simulated");
    if (key->size != 1 || value->size != 1)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: key/value lists of %llu tensors are not simulated "
             "(one tensor only)", (unsigned long long)key->size);
    const aclTensor *k = key->tensors[0], *v = value->tensors[0];
    CHECK_TENSOR(k, "key[0]");
    CHECK_TENSOR(v, "value[0]");
    if (strcmp(inputLayout, "BNSD") != 0) {
        if (strcmp(inputLayout, "BSH") && strcmp(inputLayout, "BSND"))
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: inputLayout '%s' is invalid", inputLayout);
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: inputLayout '%s' is not simulated (BNSD only)",
             inputLayout);
    }
    if (query->ndim != 4 || (query->dtype != ACL_FLOAT16 && query->dtype != ACL_BF16))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query must be 4-D FLOAT16 or BFLOAT16 (dtype %d)",
             query->dtype);
    const int64_t B = query->dims[0], N = query->dims[1], D = query->dims[3];
    if (query->dims[2] != 1)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query S must be 1, got %lld",
             (long long)query->dims[2]);
    if (attentionOut->dtype != query->dtype || !same_shape(attentionOut, 4, query->dims))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attentionOut must match query shape and dtype");
    if (k->dtype != query->dtype || v->dtype != query->dtype || k->ndim != 4 ||
        !same_shape(v, 4, k->dims))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: key/value must be 4-D, equal shapes, query dtype");
    const int64_t kv_heads = numKeyValueHeads == 0 ? numHeads : numKeyValueHeads;
    if (numHeads != N || k->dims[1] != kv_heads || k->dims[3] != D)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: numHeads/numKeyValueHeads/D do not match the "
             "tensors");
    if (kv_heads < 1 || N % kv_heads != 0 || N / kv_heads > 64)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: numHeads must be a multiple of numKeyValueHeads "
             "with ratio <= 64");
    if (B < 1 || B > 65536 || N > 256 || D < 1 || D > 512)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: limits exceeded: B <= 65536, N <= 256, D <= 512");
    if (innerPrecise != 0 && innerPrecise != 1)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: innerPrecise must be 0 or 1");
    if (actualSeqLengths != NULL && actualSeqLengths->size != (uint64_t)B)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: actualSeqLengths needs B = %lld values",
             (long long)B);

    int64_t capacity; /* longest sequence the key tensor can hold */
    if (blocktable != NULL) {
        if (blockSize < 1 || blockSize > 512 || blockSize % 16 != 0)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: blockSize must be in [16, 512] and a multiple "
                 "of 16 for FLOAT16/BFLOAT16, got %lld", (long long)blockSize);
        if (k->dims[2] != blockSize)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: key cache must be (blocknum, KV_N, blockSize, D)");
        if (blocktable->dtype != ACL_INT32 || blocktable->ndim != 2 || blocktable->dims[0] != B)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: blocktable must be INT32 (B, maxBlockNumPerSeq)");
        capacity = blocktable->dims[1] * blockSize;
    } else {
        if (k->dims[0] != B)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: dense key must be (B, KV_N, S, D)");
        capacity = k->dims[2];
    }
    for (uint64_t b = 0; actualSeqLengths && b < actualSeqLengths->size; ++b)
        if (actualSeqLengths->values[b] < 0 || actualSeqLengths->values[b] > capacity)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: actualSeqLengths[%llu] = %lld outside "
                 "[0, %lld]", (unsigned long long)b, (long long)actualSeqLengths->values[b],
                 (long long)capacity);
    if (blocktable != NULL) {
        /* "blocknum不能小于根据actualSeqLengthsKv和blockSize计算的每个batch的block数量之和"
         * (ops-transformer attention/incre_flash_attention/docs/aclnnIncreFlashAttentionV4.md,
         * 约束说明, page attention): the pool holds at least the sum over the batch of the
         * blocks each sequence needs, ceil(actualSeqLengths[b] / blockSize), even when rows
         * of the block table share blocks. */
        int64_t needed = 0;
        for (uint64_t b = 0; b < actualSeqLengths->size; ++b)
            needed += (actualSeqLengths->values[b] + blockSize - 1) / blockSize;
        if (needed > k->dims[0])
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: blocknum %lld is less than the %lld blocks the "
                 "batch needs (sum over the batch of ceil(actualSeqLengths / blockSize))",
                 (long long)k->dims[0], (long long)needed);
    }

    IncreArgs *a = calloc(1, sizeof *a);
    if (a == NULL) FAIL(561000, "EZ9999: out of host memory");
    a->query = *query;
    a->key = *k;
    a->value = *v;
    a->out = *attentionOut;
    if ((a->paged = blocktable != NULL)) a->block_table = *blocktable;
    if (actualSeqLengths != NULL) {
        a->seq_lens = malloc((size_t)B * sizeof(int64_t));
        if (a->seq_lens == NULL) {
            free(a);
            FAIL(561000, "EZ9999: out of host memory");
        }
        memcpy(a->seq_lens, actualSeqLengths->values, (size_t)B * sizeof(int64_t));
    }
    a->block_size = blockSize;
    a->num_kv_heads = kv_heads;
    a->scale = scaleValue;
    uint64_t required = 1024 + (uint64_t)capacity * sizeof(double);
    return hand_over(KIND_INCRE_FLASH_ATTENTION_V4, a, incre_free, required, executor,
                     workspaceSize);
}

SIM_EXPORT aclnnStatus aclnnIncreFlashAttentionV4(void *workspace, uint64_t workspaceSize,
                                                  aclOpExecutor *executor, aclrtStream stream) {
    return launch("aclnnIncreFlashAttentionV4", KIND_INCRE_FLASH_ATTENTION_V4, workspace,
                  workspaceSize, executor, stream, incre_run);
}

/* ------------------------------------------------------------------ */
/* aclnnFlashAttentionScoreGrad                                        */
/* ------------------------------------------------------------------ */
/*
 * The backward of aclnnFlashAttentionScore (ops-transformer
 * attention/flash_attention_score_grad/docs/aclnnFlashAttentionScoreGrad.md and
 * op_api/aclnn_flash_attention_score_grad.h). With S = Mask(scale * (Q K^T + pse),
 * atten_mask) and the forward's statistics softmaxMax / softmaxSum ([B, N, Sq, 8] FLOAT,
 * one value per row replicated over the 32-byte block of 8, as AscendC SimpleSoftMax
 * takes its max/sum operands), the operator recomputes
 *     P = exp(S - softmaxMax) / softmaxSum        (SimpleSoftMax: dst = exp(src - max) / sum)
 * and, with attentionIn = the forward's output Y and dy = dL/dY,
 *     dV = P^T dy,  dP = dy V^T,  dS = P * (dP - rowsum(dy * Y)),
 *     dQ = scale * dS K,  dK = scale * dS^T Q,
 * key/value gradients summed over each group of query heads (Nq / Nkv). Masked entries get
 * P = 0; a row with no visible key gets dQ = empty_row_value: 0 with innerPrecise 2, also
 * implied by sparse mode 3 with Sq > Skv, undefined (NaN here) otherwise. dpseOut and
 * softmaxInOptional are reserved ("预留参数，暂未使用"): NULL or any tensor, untouched.
 * Simulated: layout BNSD, sparse modes 0-3, keepProb 1 without dropMask, no prefix, and the
 * statistics and attentionIn given (the recomputing variant is not documented).
 */

enum { KIND_FLASH_ATTENTION_SCORE_GRAD = 3 };

typedef struct {
    FlashAttentionArgs fwd; /* q, k, v, pse, mask, statistics, scale, modes; out = attentionIn */
    aclTensor dy, dq, dk, dv;
} GradArgs;

static aclnnStatus fag_run(void *payload, double *workspace) {
    const GradArgs *g = payload;
    const FlashAttentionArgs *a = &g->fwd;
    const aclTensor *const tensors[] = {&a->query, &a->key, &a->value, &g->dy, &a->softmax_max,
                                        &a->softmax_sum, &a->out, &g->dq, &g->dk, &g->dv,
                                        a->has_pse ? &a->pse : NULL,
                                        a->has_mask ? &a->mask : NULL};
    static const char *const names[] = {"query", "keyIn", "value", "dy", "softmaxMaxOptional",
                                        "softmaxSumOptional", "attentionInOptional", "dqOut",
                                        "dkOut", "dvOut", "pseShiftOptional",
                                        "attenMaskOptional"};
    TRY(check_in_device_memory(12, tensors, names));
    TRY(check_compressed_mask(a));
    const int64_t B = a->query.dims[0], N = a->query.dims[1], Sq = a->query.dims[2];
    const int64_t D = a->query.dims[3], Nkv = a->key.dims[1], Skv = a->key.dims[2];
    const int64_t Dv = a->value.dims[3], group = N / Nkv;
    double *scores = workspace, *probs = workspace + Skv;
    double *dk_acc = probs + Skv, *dv_acc = dk_acc + B * Nkv * Skv * D;
    memset(dk_acc, 0, (size_t)(B * Nkv * Skv * (D + Dv)) * sizeof(double));
    const double empty = empty_row_value(a, Sq, Skv);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) {
            const Head h = fa_head(a, b, n, group);
            const Rows dy = bnsd_head(&g->dy, b, n), dq = bnsd_head(&g->dq, b, n);
            double *dk_head = dk_acc + (b * Nkv + n / group) * Skv * D;
            double *dv_head = dv_acc + (b * Nkv + n / group) * Skv * Dv;
            for (int64_t i = 0; i < Sq; ++i) {
                int visible;
                score_row(&h, i, Sq, Skv, D, scores, &visible);
                if (!visible) { /* no key: nothing flows back through this row */
                    for (int64_t d = 0; d < D; ++d) rows_store(&dq, i, d, empty);
                    continue;
                }
                // P_ij = exp(S_ij - max_i) / sum_i from the forward's statistics (block entry 0)
                const double row_max = rows_load(&h.max, i, 0);
                const double row_sum = rows_load(&h.sum, i, 0);
                // D_i = rowsum(dy_i * Y_i)
                double delta = 0.0;
                for (int64_t d = 0; d < Dv; ++d)
                    delta += rows_load(&dy, i, d) * rows_load(&h.out, i, d);
                // dS_ij = P_ij (dy_i . v_j - D_i), kept in scores
                for (int64_t j = 0; j < Skv; ++j) {
                    probs[j] = scores[j] == -INFINITY ? 0.0 : exp(scores[j] - row_max) / row_sum;
                    double dp = 0.0;
                    if (probs[j] != 0.0)
                        for (int64_t d = 0; d < Dv; ++d)
                            dp += rows_load(&dy, i, d) * rows_load(&h.v, j, d);
                    scores[j] = probs[j] * (dp - delta);
                }
                // dQ_i = scale * sum_j dS_ij k_j;  dK_j += scale * dS_ij q_i;  dV_j += P_ij dy_i
                for (int64_t d = 0; d < D; ++d) {
                    const double q_id = rows_load(&h.q, i, d);
                    double acc = 0.0;
                    for (int64_t j = 0; j < Skv; ++j) {
                        if (probs[j] == 0.0) continue;
                        acc += scores[j] * rows_load(&h.k, j, d);
                        dk_head[j * D + d] += a->scale * scores[j] * q_id;
                    }
                    rows_store(&dq, i, d, a->scale * acc);
                }
                for (int64_t d = 0; d < Dv; ++d) {
                    const double dy_id = rows_load(&dy, i, d);
                    for (int64_t j = 0; j < Skv; ++j)
                        if (probs[j] != 0.0) dv_head[j * Dv + d] += probs[j] * dy_id;
                }
            }
        }
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Nkv; ++h) {
            const Rows dk = bnsd_head(&g->dk, b, h), dv = bnsd_head(&g->dv, b, h);
            for (int64_t j = 0; j < Skv; ++j) {
                const int64_t row = (b * Nkv + h) * Skv + j;
                for (int64_t d = 0; d < D; ++d) rows_store(&dk, j, d, dk_acc[row * D + d]);
                for (int64_t d = 0; d < Dv; ++d) rows_store(&dv, j, d, dv_acc[row * Dv + d]);
            }
        }
    const aclTensor *const seen[LAST_TENSORS] = {&a->query, &a->key, &a->value, &g->dq,
                                                 a->has_pse ? &a->pse : NULL,
                                                 a->has_mask ? &a->mask : NULL};
    record_launch(KIND_FLASH_ATTENTION_SCORE_GRAD, seen);
    return ACLNN_SUCCESS;
}

SIM_EXPORT aclnnStatus aclnnFlashAttentionScoreGradGetWorkspaceSize(
    const aclTensor *query, const aclTensor *keyIn, const aclTensor *value, const aclTensor *dy,
    const aclTensor *pseShiftOptional, const aclTensor *dropMaskOptional,
    const aclTensor *paddingMaskOptional, const aclTensor *attenMaskOptional,
    const aclTensor *softmaxMaxOptional, const aclTensor *softmaxSumOptional,
    const aclTensor *softmaxInOptional, const aclTensor *attentionInOptional,
    const aclIntArray *prefixOptional, double scaleValue, double keepProb, int64_t preTokens,
    int64_t nextTokens, int64_t headNum, char *inputLayout, int64_t innerPrecise,
    int64_t sparseMode, const aclTensor *dqOut, const aclTensor *dkOut, const aclTensor *dvOut,
    const aclTensor *dpseOut, uint64_t *workspaceSize, aclOpExecutor **executor) {
    int injected = ascendsim_injected_failure("aclnnFlashAttentionScoreGradGetWorkspaceSize");
    if (injected) return injected;
    REQUIRE(query, "query");
    REQUIRE(keyIn, "keyIn");
    REQUIRE(value, "value");
    REQUIRE(dy, "dy");
    REQUIRE(inputLayout, "inputLayout");
    REQUIRE(dqOut, "dqOut");
    REQUIRE(dkOut, "dkOut");
    REQUIRE(dvOut, "dvOut");
    REQUIRE(workspaceSize, "workspaceSize");
    REQUIRE(executor, "executor");
    CHECK_TENSOR(query, "query");
    CHECK_TENSOR(keyIn, "keyIn");
    CHECK_TENSOR(value, "value");
    CHECK_TENSOR(dy, "dy");
    CHECK_TENSOR(pseShiftOptional, "pseShiftOptional");
    CHECK_TENSOR(attenMaskOptional, "attenMaskOptional");
    CHECK_TENSOR(softmaxMaxOptional, "softmaxMaxOptional");
    CHECK_TENSOR(softmaxSumOptional, "softmaxSumOptional");
    CHECK_TENSOR(attentionInOptional, "attentionInOptional");
    CHECK_TENSOR(dqOut, "dqOut");
    CHECK_TENSOR(dkOut, "dkOut");
    CHECK_TENSOR(dvOut, "dvOut");
    if ((softmaxInOptional != NULL && !ascendsim_tensor_valid(softmaxInOptional)) ||
        (dpseOut != NULL && !ascendsim_tensor_valid(dpseOut)))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: softmaxInOptional/dpseOut is not a valid tensor");

    TRY(check_bnsd_layout(inputLayout));
    TRY(check_qkv(query, keyIn, value, "keyIn", LAYOUT_BNSD, headNum));
    const int dtype = query->dtype;
    const int64_t B = query->dims[0], N = query->dims[1], Sq = query->dims[2], D = query->dims[3];
    const int64_t Nkv = keyIn->dims[1], Skv = keyIn->dims[2], Dv = value->dims[3];
    const int64_t dy_shape[4] = {B, N, Sq, Dv}, stats_shape[4] = {B, N, Sq, 8};
    if (dy->dtype != dtype || !same_shape(dy, 4, dy_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: dy must be [B, N, Sq, Dv] like the forward's "
             "output, with the query dtype");
    if (!same_shape(dqOut, 4, query->dims) || !same_shape(dkOut, 4, keyIn->dims) ||
        !same_shape(dvOut, 4, value->dims) || dqOut->dtype != dtype || dkOut->dtype != dtype ||
        dvOut->dtype != dtype)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: dqOut/dkOut/dvOut must have the shapes of "
             "query/keyIn/value and the query dtype");
    TRY(check_no_dropout(keepProb, dropMaskOptional, paddingMaskOptional, prefixOptional));
    if (innerPrecise < 0 || innerPrecise > 2)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: innerPrecise must be 0, 1 or 2");
    if (sparseMode < 0 || sparseMode > 6)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld is invalid (0 to 6)",
             (long long)sparseMode);
    if (sparseMode > 3)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld is not simulated",
             (long long)sparseMode);
    if (softmaxMaxOptional == NULL || softmaxSumOptional == NULL || attentionInOptional == NULL)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: without softmaxMax, softmaxSum and attentionIn "
             "(the forward's statistics and output) the backward is not simulated");
    if (softmaxMaxOptional->dtype != ACL_FLOAT || softmaxSumOptional->dtype != ACL_FLOAT ||
        !same_shape(softmaxMaxOptional, 4, stats_shape) ||
        !same_shape(softmaxSumOptional, 4, stats_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: softmaxMax/softmaxSum must be FLOAT [B, N, Sq, 8]");
    if (attentionInOptional->dtype != dtype || !same_shape(attentionInOptional, 4, dy_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attentionIn must be the forward's output: "
             "[B, N, Sq, Dv] with the query dtype");
    const int64_t bnss[4] = {B, N, Sq, Skv};
    if (attenMaskOptional)
        TRY(check_atten_mask(attenMaskOptional, sparseMode, preTokens, nextTokens, bnss));
    if (pseShiftOptional) TRY(check_pse(pseShiftOptional, "pseShift", dtype, bnss));

    GradArgs *g = calloc(1, sizeof *g);
    if (g == NULL) FAIL(561000, "EZ9999: out of host memory");
    fa_args_fill(&g->fwd, query, keyIn, value, pseShiftOptional, attenMaskOptional,
                 softmaxMaxOptional, softmaxSumOptional, attentionInOptional, scaleValue,
                 preTokens, nextTokens, innerPrecise, sparseMode);
    g->dy = *dy;
    g->dq = *dqOut;
    g->dk = *dkOut;
    g->dv = *dvOut;
    /* the launch keeps two rows and the float64 dK/dV accumulators in the workspace */
    uint64_t required = 4096 + (uint64_t)(2 * Skv + B * Nkv * Skv * (D + Dv)) * sizeof(double);
    return hand_over(KIND_FLASH_ATTENTION_SCORE_GRAD, g, free, required, executor,
                     workspaceSize);
}

SIM_EXPORT aclnnStatus aclnnFlashAttentionScoreGrad(void *workspace, uint64_t workspaceSize,
                                                    aclOpExecutor *executor,
                                                    aclrtStream stream) {
    return launch("aclnnFlashAttentionScoreGrad", KIND_FLASH_ATTENTION_SCORE_GRAD, workspace,
                  workspaceSize, executor, stream, fag_run);
}
