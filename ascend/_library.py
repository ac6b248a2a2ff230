"""Finding and loading the CANN libraries; their ctypes signatures.

Search order for the directory holding ``libascendcl.so`` (first hit wins):

1. ``$ASCEND_LIB_DIR`` (an explicit override: the ``lib64`` directory itself),
2. ``$ASCEND_HOME_PATH/lib64`` and ``$ASCEND_TOOLKIT_HOME/lib64`` (set by ``set_env.sh``),
3. ``/usr/local/Ascend/ascend-toolkit/latest/lib64`` and ``/usr/local/Ascend/cann/lib64``,
4. the dynamic loader's path (``LD_LIBRARY_PATH``, ``ldconfig``).

``libnnopbase.so`` is taken from the same directory. Operators are looked up
in every ``libopapi_*.so`` of that directory (newer CANN splits the operator
library by domain, attention lives in ``libopapi_transformer.so``) and then in
``libopapi.so``, as torch_npu's op-plugin does. All are opened with
``RTLD_GLOBAL`` because the operator libraries resolve runtime symbols from
the libraries loaded before them.
"""

import ctypes
import os
from ctypes import POINTER, c_char_p, c_double, c_int, c_int32, c_int64, c_size_t, c_uint32, \
    c_uint64, c_void_p
from dataclasses import dataclass
from pathlib import Path

from ._errors import AscendError, AscendRuntimeNotFound

__all__ = ["LibraryPaths", "Libraries", "candidate_dirs", "locate", "load"]

RUNTIME_LIBRARY = "libascendcl.so"
META_LIBRARY = "libnnopbase.so"
OPERATOR_LIBRARY = "libopapi.so"
OPERATOR_LIBRARY_GLOB = "libopapi_*.so"
DEFAULT_INSTALL_DIRS = (
    "/usr/local/Ascend/ascend-toolkit/latest/lib64",
    "/usr/local/Ascend/cann/lib64",
)

INSTALL_HELP = """\
ascend needs Huawei CANN (the Ascend toolkit) and the NPU driver:
  1. install the driver and firmware for your Atlas card, then the CANN toolkit
     ("Ascend-cann-toolkit_<version>_linux-<arch>.run --install"; CANN is not on PyPI),
  2. make it visible to this process before starting Python:
       source /usr/local/Ascend/ascend-toolkit/set_env.sh      (root install)
       source $HOME/Ascend/ascend-toolkit/set_env.sh           (user install)
     or point ASCEND_LIB_DIR at the directory containing libascendcl.so."""


# Opaque handle types: passing one kind of handle where another is expected
# is a ctypes.ArgumentError instead of undefined behaviour in C.
class _OpaqueTensor(ctypes.Structure):
    pass


class _OpaqueIntArray(ctypes.Structure):
    pass


class _OpaqueTensorList(ctypes.Structure):
    pass


class _OpaqueExecutor(ctypes.Structure):
    pass


TensorRef = POINTER(_OpaqueTensor)
IntArrayRef = POINTER(_OpaqueIntArray)
TensorListRef = POINTER(_OpaqueTensorList)
ExecutorRef = POINTER(_OpaqueExecutor)
_Int64Array = POINTER(c_int64)

# name: (restype, argtypes)
_RUNTIME_FUNCTIONS = {
    "aclInit": (c_int, [c_char_p]),
    "aclFinalize": (c_int, []),
    "aclGetRecentErrMsg": (c_char_p, []),
    "aclrtSetDevice": (c_int, [c_int32]),
    "aclrtResetDevice": (c_int, [c_int32]),
    "aclrtGetDeviceCount": (c_int, [POINTER(c_uint32)]),
    "aclrtCreateStream": (c_int, [POINTER(c_void_p)]),
    "aclrtDestroyStream": (c_int, [c_void_p]),
    "aclrtSynchronizeStream": (c_int, [c_void_p]),
    "aclrtMalloc": (c_int, [POINTER(c_void_p), c_size_t, c_int]),
    "aclrtFree": (c_int, [c_void_p]),
    "aclrtMemcpy": (c_int, [c_void_p, c_size_t, c_void_p, c_size_t, c_int]),
    # (dst, dpitch, src, spitch, width, height, kind): host<->device only
    "aclrtMemcpy2d": (c_int, [c_void_p, c_size_t, c_void_p, c_size_t, c_size_t, c_size_t,
                              c_int]),
    "aclrtMemset": (c_int, [c_void_p, c_size_t, c_int32, c_size_t]),
}

_META_FUNCTIONS = {
    "aclCreateTensor": (TensorRef, [_Int64Array, c_uint64, c_int, _Int64Array, c_int64, c_int,
                                    _Int64Array, c_uint64, c_void_p]),
    "aclCreateIntArray": (IntArrayRef, [_Int64Array, c_uint64]),
    "aclCreateTensorList": (TensorListRef, [POINTER(TensorRef), c_uint64]),
    "aclDestroyTensor": (c_int32, [TensorRef]),
    "aclDestroyIntArray": (c_int32, [IntArrayRef]),
    "aclDestroyTensorList": (c_int32, [TensorListRef]),
    "aclSetAclOpExecutorRepeatable": (c_int32, [ExecutorRef]),
    "aclDestroyAclOpExecutor": (c_int32, [ExecutorRef]),
}

_T = TensorRef
# Operators: phase 1 (GetWorkspaceSize) signatures; phase 2 is always
# (void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream).
_OPERATOR_PHASE1 = {
    "aclnnFlashAttentionScore": [
        _T, _T, _T,                  # query, key, value
        _T, _T, _T, _T,              # realShift, dropMask, paddingMask, attenMask
        IntArrayRef,                 # prefix
        c_double, c_double,          # scaleValue, keepProb (C doubles: c_float zeroes them)
        c_int64, c_int64, c_int64,   # preTokens, nextTokens, headNum
        c_char_p,                    # inputLayout
        c_int64, c_int64,            # innerPrecise, sparseMode
        _T, _T, _T, _T,              # softmaxMax, softmaxSum, softmaxOut, attentionOut
        POINTER(c_uint64), POINTER(ExecutorRef)],
    "aclnnFlashAttentionScoreGrad": [  # ops-transformer aclnn_flash_attention_score_grad.h
        _T, _T, _T, _T,              # query, keyIn, value, dy
        _T, _T, _T, _T,              # pseShift, dropMask, paddingMask, attenMask
        _T, _T, _T, _T,              # softmaxMax, softmaxSum, softmaxIn, attentionIn
        IntArrayRef,                 # prefix
        c_double, c_double,          # scaleValue, keepProb
        c_int64, c_int64, c_int64,   # preTokens, nextTokens, headNum
        c_char_p,                    # inputLayout
        c_int64, c_int64,            # innerPrecise, sparseMode
        _T, _T, _T, _T,              # dqOut, dkOut, dvOut, dpseOut
        POINTER(c_uint64), POINTER(ExecutorRef)],
    "aclnnFlashAttentionVarLenScore": [  # aclnn_flash_attention_var_len_score.h (TND)
        _T, _T, _T,                  # query, key, value
        _T, _T, _T, _T,              # realShift, dropMask, paddingMask, attenMask
        IntArrayRef, IntArrayRef, IntArrayRef,  # prefix, actualSeqQLen, actualSeqKvLen
        c_double, c_double,          # scaleValue, keepProb
        c_int64, c_int64, c_int64,   # preTokens, nextTokens, headNum
        c_char_p,                    # inputLayout
        c_int64, c_int64,            # innerPrecise, sparseMode
        _T, _T, _T, _T,              # softmaxMax, softmaxSum, softmaxOut, attentionOut
        POINTER(c_uint64), POINTER(ExecutorRef)],
    "aclnnIncreFlashAttentionV4": [
        _T, TensorListRef, TensorListRef,  # query, key, value
        _T, _T,                            # pseShift, attenMask
        IntArrayRef,                       # actualSeqLengths
        _T, _T, _T, _T, _T,                # dequantScale1, quantScale1, dequantScale2,
                                           # quantScale2, quantOffset2
        _T, _T,                            # antiquantScale, antiquantOffset
        _T, _T,                            # blocktable, kvPaddingSize
        c_int64, c_double, c_char_p,       # numHeads, scaleValue, inputLayout
        c_int64, c_int64, c_int64,         # numKeyValueHeads, blockSize, innerPrecise
        _T,                                # attentionOut
        POINTER(c_uint64), POINTER(ExecutorRef)],
}
_PHASE2_ARGTYPES = [c_void_p, c_uint64, ExecutorRef, c_void_p]


@dataclass(frozen=True)
class LibraryPaths:
    """Where the runtime, meta API and operator libraries were found.

    Bare file names (no directory) mean "ask the dynamic loader".
    """

    runtime: str
    meta: str
    operators: tuple
    searched: tuple


def candidate_dirs(environ=None):
    """Directories searched for ``libascendcl.so``, in order.

    Examples
    --------
    >>> from ascend._library import candidate_dirs
    >>> [str(p) for p in candidate_dirs({"ASCEND_HOME_PATH": "/opt/cann"})]
    ['/opt/cann/lib64', '/usr/local/Ascend/ascend-toolkit/latest/lib64', '/usr/local/Ascend/cann/lib64']
    """
    environ = os.environ if environ is None else environ
    dirs = []
    if environ.get("ASCEND_LIB_DIR"):
        dirs.append(Path(environ["ASCEND_LIB_DIR"]))
    for variable in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        if environ.get(variable):
            dirs.append(Path(environ[variable]) / "lib64")
    dirs.extend(Path(d) for d in DEFAULT_INSTALL_DIRS)
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _operator_libraries(directory):
    split = sorted(str(p) for p in directory.glob(OPERATOR_LIBRARY_GLOB))
    whole = directory / OPERATOR_LIBRARY
    return tuple(split + ([str(whole)] if whole.is_file() else []))


def locate(environ=None):
    """Find the CANN libraries without loading them.

    Returns
    -------
    LibraryPaths
        Full paths when a candidate directory holds ``libascendcl.so``;
        otherwise bare names for the dynamic loader, with operator libraries
        taken from ``LD_LIBRARY_PATH`` directories.
    """
    environ = os.environ if environ is None else environ
    searched = tuple(str(d) for d in candidate_dirs(environ))
    for directory in candidate_dirs(environ):
        if (directory / RUNTIME_LIBRARY).is_file():
            meta = directory / META_LIBRARY
            return LibraryPaths(str(directory / RUNTIME_LIBRARY),
                                str(meta) if meta.is_file() else META_LIBRARY,
                                _operator_libraries(directory), searched)
    operators = []
    for entry in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if entry:
            operators.extend(p for p in _operator_libraries(Path(entry)) if p not in operators)
    if not any(Path(p).name == OPERATOR_LIBRARY for p in operators):
        operators.append(OPERATOR_LIBRARY)
    return LibraryPaths(RUNTIME_LIBRARY, META_LIBRARY, tuple(operators),
                        searched + ("<dynamic loader path>",))


def _declare(library, functions):
    for name, (restype, argtypes) in functions.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes


class Operator:
    """A two-phase aclnn operator: ``get_workspace_size`` then ``launch``."""

    def __init__(self, name, get_workspace_size, launch):
        self.name = name
        self.phase1_name = name + "GetWorkspaceSize"
        self.get_workspace_size = get_workspace_size
        self.launch = launch


class Libraries:
    """The loaded CDLLs with declared signatures.

    Attributes
    ----------
    acl, meta : ctypes.CDLL
        ``libascendcl.so`` and ``libnnopbase.so``.
    operator_libraries : list of ctypes.CDLL
        In lookup order.
    paths : LibraryPaths
    """

    def __init__(self, paths):
        self.paths = paths
        mode = ctypes.RTLD_GLOBAL
        try:
            self.acl = ctypes.CDLL(paths.runtime, mode=mode)
            self.meta = ctypes.CDLL(paths.meta, mode=mode)
            _declare(self.acl, _RUNTIME_FUNCTIONS)
            _declare(self.meta, _META_FUNCTIONS)
        except (OSError, AttributeError) as exc:
            raise AscendRuntimeNotFound(
                f"CANN runtime not usable: {exc}\nsearched: {', '.join(paths.searched)}\n"
                f"{INSTALL_HELP}") from exc
        self.operator_libraries = []
        self.operator_load_errors = []
        for path in paths.operators:
            try:
                self.operator_libraries.append(ctypes.CDLL(path, mode=mode))
            except OSError as exc:  # a missing domain library only hides its operators
                self.operator_load_errors.append(str(exc))
        self._operators = {}

    def operator(self, name):
        """The operator ``name``; it exists iff both phases resolve in one library."""
        operator = self._operators.get(name)
        if operator is not None:
            return operator
        for library in self.operator_libraries:
            try:
                phase1 = getattr(library, name + "GetWorkspaceSize")
                phase2 = getattr(library, name)
            except AttributeError:
                continue
            phase1.restype, phase1.argtypes = c_int32, _OPERATOR_PHASE1[name]
            phase2.restype, phase2.argtypes = c_int32, _PHASE2_ARGTYPES
            operator = self._operators[name] = Operator(name, phase1, phase2)
            return operator
        raise AscendRuntimeNotFound(
            f"operator {name} not found in {list(self.paths.operators)} "
            f"({'; '.join(self.operator_load_errors) or 'no load errors'}); it needs the CANN "
            f"ops package for Atlas A2 (ops-transformer)")

    def check(self, status, name):
        """Raise :class:`AscendError` naming ``name`` if ``status`` is non-zero."""
        if status:
            raw = self.acl.aclGetRecentErrMsg()
            raise AscendError(status, name, raw.decode("utf-8", "replace").strip() if raw else "")


def load(environ=None):
    """Locate and load the CANN libraries.

    Raises
    ------
    AscendRuntimeNotFound
        With the searched directories and installation instructions.
    """
    paths = locate(environ)
    return Libraries(paths)

