"""Exceptions raised by the ascend package, and the names of CANN status codes."""

__all__ = ["AscendError", "AscendRuntimeNotFound", "status_name"]

# aclError (acl_base.h), runtime errors (rt_error_codes.h), aclnnStatus (aclnn return codes).
_STATUS_NAMES = {
    100000: "ACL_ERROR_INVALID_PARAM",
    100001: "ACL_ERROR_UNINITIALIZE",
    100002: "ACL_ERROR_REPEAT_INITIALIZE",
    100024: "ACL_ERROR_OP_NOT_FOUND",
    100026: "ACL_ERROR_UNSUPPORTED_DATA_TYPE",
    100037: "ACL_ERROR_REPEAT_FINALIZE",
    107000: "ACL_ERROR_RT_PARAM_INVALID",
    107001: "ACL_ERROR_RT_INVALID_DEVICEID",
    107002: "ACL_ERROR_RT_CONTEXT_NULL",
    107003: "ACL_ERROR_RT_STREAM_CONTEXT",
    107008: "ACL_ERROR_RT_ADDR_UNALIGNED",
    161001: "ACLNN_ERR_PARAM_NULLPTR",
    161002: "ACLNN_ERR_PARAM_INVALID",
    200000: "ACL_ERROR_BAD_ALLOC",
    200001: "ACL_ERROR_API_NOT_SUPPORT",
    200002: "ACL_ERROR_INVALID_DEVICE",
    200003: "ACL_ERROR_MEMORY_ADDRESS_UNALIGNED",
    207000: "ACL_ERROR_RT_FEATURE_NOT_SUPPORT",
    207001: "ACL_ERROR_RT_MEMORY_ALLOCATION",
    207004: "ACL_ERROR_RT_NO_DEVICE",
    207018: "ACL_ERROR_RT_DEVICE_OOM",
    300000: "ACL_ERROR_STORAGE_OVER_LIMIT",
    361001: "ACLNN_ERR_RUNTIME_ERROR",
    500000: "ACL_ERROR_INTERNAL_ERROR",
    500001: "ACL_ERROR_FAILURE",
    500002: "ACL_ERROR_GE_FAILURE",
    500003: "ACL_ERROR_RT_FAILURE",
    500004: "ACL_ERROR_DRV_FAILURE",
    507000: "ACL_ERROR_RT_INTERNAL_ERROR",
    507002: "ACL_ERROR_RT_STREAM_TASK_FULL",
    507014: "ACL_ERROR_RT_AICORE_TIMEOUT",
    507015: "ACL_ERROR_RT_AICORE_EXCEPTION",
    507016: "ACL_ERROR_RT_AICORE_TRAP_EXCEPTION",
    561000: "ACLNN_ERR_INNER",
    561001: "ACLNN_ERR_INNER_INFERSHAPE_ERROR",
    561002: "ACLNN_ERR_INNER_TILING_ERROR",
    561003: "ACLNN_ERR_INNER_FIND_KERNEL_ERROR",
    561101: "ACLNN_ERR_INNER_CREATE_EXECUTOR",
    561107: "ACLNN_ERR_INNER_OPP_PATH_NOT_FOUND",
}


def status_name(code):
    """Symbolic name of a CANN status code.

    Examples
    --------
    >>> from ascend._errors import status_name
    >>> status_name(161002)
    'ACLNN_ERR_PARAM_INVALID'
    >>> status_name(42)
    'unknown status'
    """
    return _STATUS_NAMES.get(code, "unknown status")


class AscendError(RuntimeError):
    """A CANN call returned a non-zero status.

    Parameters
    ----------
    code : int
        The ``aclError`` / ``aclnnStatus`` value.
    name : str
        The C function that failed, e.g. ``"aclrtMalloc"``.
    message : str
        The text of ``aclGetRecentErrMsg()`` (may be empty).

    Examples
    --------
    >>> from ascend import AscendError
    >>> err = AscendError(161002, "aclnnFlashAttentionScoreGetWorkspaceSize", "bad layout")
    >>> print(err)
    aclnnFlashAttentionScoreGetWorkspaceSize failed with 161002 (ACLNN_ERR_PARAM_INVALID): bad layout
    >>> err.code, err.status_name
    (161002, 'ACLNN_ERR_PARAM_INVALID')
    """

    def __init__(self, code, name, message=""):
        self.code = int(code)
        self.name = name
        self.message = message or ""
        text = f"{name} failed with {self.code} ({self.status_name})"
        super().__init__(f"{text}: {self.message}" if self.message else text)

    @property
    def status_name(self):
        return status_name(self.code)

    def __reduce__(self):
        return type(self), (self.code, self.name, self.message)


class AscendRuntimeNotFound(RuntimeError):
    """No usable CANN runtime (``libascendcl.so`` and friends) was found.

    The message lists the directories that were searched and how to install
    CANN and make it visible (``source .../set_env.sh``). :func:`ascend.is_available`
    returns False instead of raising it.

    Examples
    --------
    >>> import ascend
    >>> issubclass(ascend.AscendRuntimeNotFound, RuntimeError)
    True
    >>> print(ascend.AscendRuntimeNotFound("CANN runtime not usable: libascendcl.so"))
    CANN runtime not usable: libascendcl.so
    """
