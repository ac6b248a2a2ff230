/*
 * libnnopbase.so test double: the aclnn meta API (acl_meta.h) and executors.
 *
 * Objects carry a magic number so that a destroyed or foreign handle is
 * reported instead of dereferenced; live counts are exposed through
 * ascendsim_object_stats for leak tests.
 *
 * Every function passes through the fault injection of libascendcl.so on entry: an
 * injected failure makes aclCreate* return NULL and aclDestroy* / aclSet* return the
 * code without doing anything. The object a refused destroy left alive is remembered
 * (ascendsim_refused_object) so that a fault-injection test can account for it.
 */
#include "sim.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define TENSOR_MAGIC 0x54454e53u
#define INT_ARRAY_MAGIC 0x494e5441u
#define TENSOR_LIST_MAGIC 0x544c5354u
#define EXECUTOR_MAGIC 0x45584543u

struct aclOpExecutor {
    uint32_t magic;
    int kind;
    int repeatable;
    uint64_t workspace_size;
    void *payload;
    ascendsim_payload_free free_payload;
    struct aclOpExecutor *next;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static aclOpExecutor *g_executors = NULL; /* live executors */
static int64_t g_live_tensors = 0, g_live_int_arrays = 0, g_live_tensor_lists = 0;
static int64_t g_live_executors = 0;

static void count(int64_t *counter, int64_t delta) {
    __atomic_add_fetch(counter, delta, __ATOMIC_SEQ_CST);
}

/* The object whose destroy an injected failure refused, and its kind. */
enum { REFUSED_NONE, REFUSED_TENSOR, REFUSED_INT_ARRAY, REFUSED_TENSOR_LIST, REFUSED_EXECUTOR };
static const void *g_refused = NULL;
static int g_refused_kind = REFUSED_NONE;

static int refused(const char *name, const void *object, int kind) {
    int code = ascendsim_injected_failure(name);
    if (code != 0) {
        pthread_mutex_lock(&g_lock);
        g_refused = object;
        g_refused_kind = object ? kind : REFUSED_NONE;
        pthread_mutex_unlock(&g_lock);
    }
    return code;
}

/* Test hook: the object an injected aclDestroy* failure left alive (NULL if none) and
 * its kind (1 tensor, 2 int array, 3 tensor list, 4 executor); forgets it. */
SIM_EXPORT const void *ascendsim_refused_object(int *kind) {
    pthread_mutex_lock(&g_lock);
    const void *object = g_refused;
    *kind = g_refused_kind;
    g_refused = NULL;
    g_refused_kind = REFUSED_NONE;
    pthread_mutex_unlock(&g_lock);
    return object;
}

/* ------------------------------------------------------------------ */
/* tensors                                                             */
/* ------------------------------------------------------------------ */

SIM_EXPORT aclTensor *aclCreateTensor(const int64_t *viewDims, uint64_t viewDimsNum,
                                      int dataType, const int64_t *stride, int64_t offset,
                                      int format, const int64_t *storageDims,
                                      uint64_t storageDimsNum, void *tensorData) {
    if (ascendsim_injected_failure("aclCreateTensor")) return NULL;
    if (viewDimsNum > SIM_MAX_DIMS || (viewDimsNum > 0 && viewDims == NULL) ||
        storageDimsNum > SIM_MAX_DIMS || (storageDimsNum > 0 && storageDims == NULL) ||
        offset < 0) {
        ascendsim_set_error("EZ1001: aclCreateTensor: invalid shape arguments");
        return NULL;
    }
    aclTensor *t = calloc(1, sizeof *t);
    if (t == NULL) return NULL;
    t->magic = TENSOR_MAGIC;
    t->dtype = dataType;
    t->format = format;
    t->ndim = viewDimsNum;
    t->offset = offset;
    t->data = tensorData;
    int64_t contiguous = 1;
    for (int64_t i = (int64_t)viewDimsNum - 1; i >= 0; --i) {
        t->dims[i] = viewDims[i];
        /* NULL stride = contiguous, as in acl_meta.h samples */
        t->strides[i] = stride ? stride[i] : contiguous;
        contiguous *= viewDims[i];
    }
    count(&g_live_tensors, 1);
    return t;
}

int ascendsim_tensor_valid(const aclTensor *t) {
    return t != NULL && t->magic == TENSOR_MAGIC;
}

/* Frees a live tensor (no fault injection: also used by aclDestroyTensorList). */
static aclnnStatus tensor_free(const aclTensor *tensor) {
    if (tensor == NULL) return ACLNN_SUCCESS;
    if (!ascendsim_tensor_valid(tensor)) {
        ascendsim_set_error("EZ1001: aclDestroyTensor: not a live tensor");
        return ACLNN_ERR_PARAM_INVALID;
    }
    ((aclTensor *)tensor)->magic = 0;
    free((void *)tensor);
    count(&g_live_tensors, -1);
    return ACLNN_SUCCESS;
}

SIM_EXPORT aclnnStatus aclDestroyTensor(const aclTensor *tensor) {
    int injected = refused("aclDestroyTensor", tensor, REFUSED_TENSOR);
    if (injected) return injected;
    return tensor_free(tensor);
}

/* ------------------------------------------------------------------ */
/* int arrays and tensor lists                                         */
/* ------------------------------------------------------------------ */

SIM_EXPORT aclIntArray *aclCreateIntArray(const int64_t *value, uint64_t size) {
    if (ascendsim_injected_failure("aclCreateIntArray")) return NULL;
    if (size > 0 && value == NULL) return NULL;
    aclIntArray *a = calloc(1, sizeof *a);
    if (a == NULL) return NULL;
    a->values = malloc((size ? size : 1) * sizeof(int64_t));
    if (a->values == NULL) {
        free(a);
        return NULL;
    }
    if (size) memcpy(a->values, value, size * sizeof(int64_t));
    a->size = size;
    a->magic = INT_ARRAY_MAGIC;
    count(&g_live_int_arrays, 1);
    return a;
}

int ascendsim_int_array_valid(const aclIntArray *a) {
    return a != NULL && a->magic == INT_ARRAY_MAGIC;
}

SIM_EXPORT aclnnStatus aclDestroyIntArray(const aclIntArray *array) {
    int injected = refused("aclDestroyIntArray", array, REFUSED_INT_ARRAY);
    if (injected) return injected;
    if (array == NULL) return ACLNN_SUCCESS;
    if (!ascendsim_int_array_valid(array)) return ACLNN_ERR_PARAM_INVALID;
    aclIntArray *a = (aclIntArray *)array;
    a->magic = 0;
    free(a->values);
    free(a);
    count(&g_live_int_arrays, -1);
    return ACLNN_SUCCESS;
}

SIM_EXPORT aclTensorList *aclCreateTensorList(const aclTensor *const *value, uint64_t size) {
    if (ascendsim_injected_failure("aclCreateTensorList")) return NULL;
    if (size > 0 && value == NULL) return NULL;
    for (uint64_t i = 0; i < size; ++i)
        if (!ascendsim_tensor_valid(value[i])) return NULL;
    aclTensorList *l = calloc(1, sizeof *l);
    if (l == NULL) return NULL;
    l->tensors = malloc((size ? size : 1) * sizeof(aclTensor *));
    if (l->tensors == NULL) {
        free(l);
        return NULL;
    }
    for (uint64_t i = 0; i < size; ++i) l->tensors[i] = (aclTensor *)value[i];
    l->size = size;
    l->magic = TENSOR_LIST_MAGIC;
    count(&g_live_tensor_lists, 1);
    return l;
}

int ascendsim_tensor_list_valid(const aclTensorList *l) {
    return l != NULL && l->magic == TENSOR_LIST_MAGIC;
}

/* Destroys the list and the tensors in it, as CANN does. */
SIM_EXPORT aclnnStatus aclDestroyTensorList(const aclTensorList *list) {
    int injected = refused("aclDestroyTensorList", list, REFUSED_TENSOR_LIST);
    if (injected) return injected;
    if (list == NULL) return ACLNN_SUCCESS;
    if (!ascendsim_tensor_list_valid(list)) return ACLNN_ERR_PARAM_INVALID;
    aclTensorList *l = (aclTensorList *)list;
    for (uint64_t i = 0; i < l->size; ++i) tensor_free(l->tensors[i]);
    l->magic = 0;
    free(l->tensors);
    free(l);
    count(&g_live_tensor_lists, -1);
    return ACLNN_SUCCESS;
}

/* ------------------------------------------------------------------ */
/* executors                                                           */
/* ------------------------------------------------------------------ */

aclOpExecutor *ascendsim_executor_new(int kind, void *payload, ascendsim_payload_free free_fn,
                                      uint64_t workspace_size) {
    aclOpExecutor *e = calloc(1, sizeof *e);
    if (e == NULL) return NULL;
    e->magic = EXECUTOR_MAGIC;
    e->kind = kind;
    e->payload = payload;
    e->free_payload = free_fn;
    e->workspace_size = workspace_size;
    pthread_mutex_lock(&g_lock);
    e->next = g_executors;
    g_executors = e;
    pthread_mutex_unlock(&g_lock);
    count(&g_live_executors, 1);
    return e;
}

/* Live-ness is decided by registry membership, never by dereferencing a
 * pointer that may already have been freed. Lock held. */
static aclOpExecutor **find_executor(const aclOpExecutor *executor) {
    for (aclOpExecutor **link = &g_executors; *link; link = &(*link)->next)
        if (*link == executor) return link;
    return NULL;
}

void *ascendsim_executor_payload(aclOpExecutor *executor, int kind, uint64_t *workspace_size) {
    pthread_mutex_lock(&g_lock);
    aclOpExecutor **link = find_executor(executor);
    void *payload = NULL;
    if (link && (*link)->kind == kind) {
        payload = (*link)->payload;
        if (workspace_size) *workspace_size = (*link)->workspace_size;
    }
    pthread_mutex_unlock(&g_lock);
    return payload;
}

static void executor_free(aclOpExecutor *e) {
    if (e->free_payload) e->free_payload(e->payload);
    e->magic = 0;
    free(e);
    count(&g_live_executors, -1);
}

/* Removes a live executor; only_if_single_use: not if it is repeatable; require_repeatable:
 * refuse (161002) unless it is repeatable. */
static aclnnStatus executor_remove(aclOpExecutor *executor, int only_if_single_use,
                                   int require_repeatable) {
    pthread_mutex_lock(&g_lock);
    aclOpExecutor **link = find_executor(executor);
    if (link == NULL) {
        pthread_mutex_unlock(&g_lock);
        ascendsim_set_error("EZ1001: aclDestroyAclOpExecutor: not a live executor");
        return ACLNN_ERR_PARAM_INVALID;
    }
    aclOpExecutor *e = *link;
    if (only_if_single_use && e->repeatable) {
        pthread_mutex_unlock(&g_lock);
        return ACLNN_SUCCESS;
    }
    if (require_repeatable && !e->repeatable) {
        pthread_mutex_unlock(&g_lock);
        ascendsim_set_error("EZ1001: aclDestroyAclOpExecutor: the executor was not made "
                            "repeatable with aclSetAclOpExecutorRepeatable; a single-use "
                            "executor is released by its second-phase call");
        return ACLNN_ERR_PARAM_INVALID;
    }
    *link = e->next;
    pthread_mutex_unlock(&g_lock);
    executor_free(e);
    return ACLNN_SUCCESS;
}

void ascendsim_executor_spend(aclOpExecutor *executor) { executor_remove(executor, 1, 0); }

/* Documented (hiascend "aclSetAclOpExecutorRepeatable", CANN 8.0.0 aolapi operatorlist_00041):
 * called right after the first phase, it lets the second phase run any number of times
 * and leaves the executor to the caller, who destroys it with aclDestroyAclOpExecutor. */
SIM_EXPORT aclnnStatus aclSetAclOpExecutorRepeatable(aclOpExecutor *executor) {
    int injected = ascendsim_injected_failure("aclSetAclOpExecutorRepeatable");
    if (injected) return injected;
    pthread_mutex_lock(&g_lock);
    aclOpExecutor **link = find_executor(executor);
    if (link) (*link)->repeatable = 1;
    pthread_mutex_unlock(&g_lock);
    if (link == NULL) {
        ascendsim_set_error("EZ1001: aclSetAclOpExecutorRepeatable: not a live executor");
        return ACLNN_ERR_PARAM_INVALID;
    }
    return ACLNN_SUCCESS;
}

/* Documented (hiascend "aclDestroyAclOpExecutor", operatorlist_00021) for executors made
 * repeatable with aclSetAclOpExecutorRepeatable only ("本接口需与aclSetAclOpExecutorRepeatable
 * 接口配套使用"); a single-use executor is created by the first phase and released by the
 * second. What CANN does with a single-use executor here is not documented: refused. */
SIM_EXPORT aclnnStatus aclDestroyAclOpExecutor(aclOpExecutor *executor) {
    int injected = refused("aclDestroyAclOpExecutor", executor, REFUSED_EXECUTOR);
    if (injected) return injected;
    return executor_remove(executor, 0, 1);
}

/* out: [live tensors, live int arrays, live tensor lists, live executors] */
SIM_EXPORT void ascendsim_object_stats(int64_t out[4]) {
    out[0] = __atomic_load_n(&g_live_tensors, __ATOMIC_SEQ_CST);
    out[1] = __atomic_load_n(&g_live_int_arrays, __ATOMIC_SEQ_CST);
    out[2] = __atomic_load_n(&g_live_tensor_lists, __ATOMIC_SEQ_CST);
    out[3] = __atomic_load_n(&g_live_executors, __ATOMIC_SEQ_CST);
}
