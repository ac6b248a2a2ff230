/*
 * Shared declarations of the AscendCL test double.
 *
 * The three libraries mirror CANN's split:
 *   libascendcl.so  runtime: init, devices, streams, "device" memory (host heap),
 *                   error messages, and the sim-only hooks (ascendsim_*).
 *   libnnopbase.so  aclnn meta API: tensors, int arrays, tensor lists, executors.
 *   libopapi.so     the operators, two-phase (GetWorkspaceSize + launch).
 *
 * Public names, argument orders, enum and status values follow the CANN
 * headers (acl_rt.h, acl_base.h, acl_meta.h, aclnn_flash_attention_score.h,
 * aclnn_flash_attention_score_grad.h,
 * aclnn_incre_flash_attention_v4.h). Everything prefixed ascendsim_ is
 * test-only and does not exist in CANN.
 */
#ifndef ASCEND_SIM_H
#define ASCEND_SIM_H

#include <stdint.h>
#include <stddef.h>

#define SIM_EXPORT __attribute__((visibility("default")))

typedef int aclError;
typedef int32_t aclnnStatus;
typedef void *aclrtStream;

/* aclDataType */
enum {
    ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_INT8 = 2, ACL_INT32 = 3, ACL_UINT8 = 4,
    ACL_INT16 = 6, ACL_UINT16 = 7, ACL_UINT32 = 8, ACL_INT64 = 9, ACL_UINT64 = 10,
    ACL_DOUBLE = 11, ACL_BOOL = 12, ACL_BF16 = 27
};
/* aclFormat */
enum { ACL_FORMAT_NCHW = 0, ACL_FORMAT_ND = 2 };
/* aclrtMemcpyKind */
enum {
    ACL_MEMCPY_HOST_TO_HOST = 0, ACL_MEMCPY_HOST_TO_DEVICE = 1,
    ACL_MEMCPY_DEVICE_TO_HOST = 2, ACL_MEMCPY_DEVICE_TO_DEVICE = 3
};

/* aclError */
#define ACL_SUCCESS 0
#define ACL_ERROR_INVALID_PARAM 100000
#define ACL_ERROR_UNINITIALIZE 100001
#define ACL_ERROR_REPEAT_INITIALIZE 100002
#define ACL_ERROR_REPEAT_FINALIZE 100037
#define ACL_ERROR_RT_PARAM_INVALID 107000
#define ACL_ERROR_RT_INVALID_DEVICEID 107001
#define ACL_ERROR_RT_CONTEXT_NULL 107002
#define ACL_ERROR_RT_FEATURE_NOT_SUPPORT 207000
#define ACL_ERROR_RT_MEMORY_ALLOCATION 207001
/* aclnnStatus */
#define ACLNN_SUCCESS 0
#define ACLNN_ERR_PARAM_NULLPTR 161001
#define ACLNN_ERR_PARAM_INVALID 161002
#define ACLNN_ERR_RUNTIME_ERROR 361001

#define SIM_MAX_DIMS 8

typedef struct aclTensor {
    uint32_t magic;
    int32_t dtype;
    int32_t format;
    uint64_t ndim;
    int64_t dims[SIM_MAX_DIMS];
    int64_t strides[SIM_MAX_DIMS]; /* in elements */
    int64_t offset;                /* in elements, from data */
    void *data;
} aclTensor;

typedef struct aclIntArray {
    uint32_t magic;
    uint64_t size;
    int64_t *values;
} aclIntArray;

typedef struct aclTensorList {
    uint32_t magic;
    uint64_t size;
    aclTensor **tensors; /* owned: destroying the list destroys them */
} aclTensorList;

typedef struct aclOpExecutor aclOpExecutor;

/* ---- sim-internal helpers exported by libascendcl.so ---- */
SIM_EXPORT void ascendsim_set_error(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
/* 1 if [ptr, ptr + nbytes) lies inside one live allocation. */
SIM_EXPORT int ascendsim_check_range(const void *ptr, uint64_t nbytes);
/* Called on entry by every acl/aclnn function: numbers (and traces) the call and
 * returns a non-zero status if a failure was injected for it (by name or position). */
SIM_EXPORT int ascendsim_injected_failure(const char *fn_name);
SIM_EXPORT int ascendsim_is_initialized(void);
SIM_EXPORT int ascendsim_stream_valid(aclrtStream stream);

/* ---- sim-internal helpers exported by libnnopbase.so ---- */
typedef void (*ascendsim_payload_free)(void *payload);
SIM_EXPORT aclOpExecutor *ascendsim_executor_new(int kind, void *payload,
                                                 ascendsim_payload_free free_fn,
                                                 uint64_t workspace_size);
/* Returns the payload of a live executor of this kind, or NULL. */
SIM_EXPORT void *ascendsim_executor_payload(aclOpExecutor *executor, int kind,
                                            uint64_t *workspace_size);
/* Called after a launch: frees the executor unless marked repeatable. */
SIM_EXPORT void ascendsim_executor_spend(aclOpExecutor *executor);
SIM_EXPORT int ascendsim_tensor_valid(const aclTensor *t);
SIM_EXPORT int ascendsim_int_array_valid(const aclIntArray *a);
SIM_EXPORT int ascendsim_tensor_list_valid(const aclTensorList *l);

#endif
