"""Shared pieces of the ascend tests: the simulator fixture, sim-only queries and
float64 NumPy references.

Test modules load this file by path (``--import-mode=importlib`` gives them no
package to import from) and re-export the fixtures they use.
"""

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

SIM_DIR = Path(__file__).resolve().parent
REPO_ROOT = SIM_DIR.parents[1]
SIM_DEVICE_COUNT = 2


def _load_build_module():
    spec = importlib.util.spec_from_file_location("ascend_sim_build", SIM_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_sim = _load_build_module().build


def sim_build_dir(tmp_path_factory):
    """Where this session builds the test double (``sim_root`` points ascend at it)."""
    return tmp_path_factory.getbasetemp() / "ascend_sim"


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory):
    """Build the test double once and point this process's ascend at it.

    Skips if a runtime that is not the simulator (real CANN) is already loaded
    in this process: the real hardware is then exercised by the npu tests.
    """
    import ascend._runtime as runtime_module

    root = sim_build_dir(tmp_path_factory)
    build_sim(root)
    loaded = runtime_module._runtime
    if loaded is not None and not is_simulator(loaded):
        pytest.skip("a real CANN runtime is loaded in this process")
    for variable in ("ASCEND_LIB_DIR", "ASCEND_TOOLKIT_HOME"):
        os.environ.pop(variable, None)
    os.environ["ASCEND_HOME_PATH"] = str(root)
    os.environ["ASCEND_SIM_DEVICE_COUNT"] = str(SIM_DEVICE_COUNT)
    return root


@pytest.fixture
def runtime(sim_root):
    """The ascend Runtime, loaded from the simulator; checks no leak at teardown."""
    import ascend
    from ascend._runtime import get_runtime

    rt = get_runtime()
    assert is_simulator(rt), "another runtime was loaded before the simulator fixture"
    yield rt
    ascend.empty_cache()


def is_simulator(runtime):
    return hasattr(runtime.lib.acl, "ascendsim_mem_stats")


def mem_stats(runtime):
    """dict(allocs, frees, live, live_bytes, streams) from the simulator."""
    out = (ctypes.c_int64 * 5)()
    runtime.lib.acl.ascendsim_mem_stats(out)
    return dict(zip(("allocs", "frees", "live", "live_bytes", "streams"), out))


def object_stats(runtime):
    """dict(tensors, int_arrays, tensor_lists, executors) alive in the simulator."""
    out = (ctypes.c_int64 * 4)()
    runtime.lib.meta.ascendsim_object_stats(out)
    return dict(zip(("tensors", "int_arrays", "tensor_lists", "executors"), out))


def copy_stats(runtime):
    """dict: kind -> (calls, bytes) of the simulator's copies, for kinds h2h, h2d, d2h, d2d.

    A 2-D copy (``aclrtMemcpy2d``) counts as one call.
    """
    out = (ctypes.c_int64 * 8)()
    runtime.lib.acl.ascendsim_copy_stats(out)
    return {kind: (out[2 * i], out[2 * i + 1]) for i, kind in enumerate(("h2h", "h2d", "d2h",
                                                                          "d2d"))}


def copies_since(runtime, before):
    """``copy_stats`` minus an earlier snapshot: what was copied in between."""
    now = copy_stats(runtime)
    return {kind: (now[kind][0] - before[kind][0], now[kind][1] - before[kind][1])
            for kind in now}


def launch_count(runtime):
    """Operator launches so far (``ascendsim_launch_stats``)."""
    out = (ctypes.c_int64 * 2)()
    runtime.lib.operator_libraries[0].ascendsim_launch_stats(out)
    return out[0]


ACL_DTYPE_NAMES = {0: "float32", 1: "float16", 2: "int8", 3: "int32", 4: "uint8", 9: "int64",
                   12: "bool", 27: "bfloat16"}
LAUNCH_KINDS = {1: "aclnnFlashAttentionScore", 2: "aclnnIncreFlashAttentionV4",
                3: "aclnnFlashAttentionScoreGrad"}


def last_launch(runtime):
    """What the last successful operator launch saw (``ascendsim_last_launch``), or None.

    dict(operator, dtypes, out): ``dtypes`` maps query/key/value/out/pse/mask to the
    aclDataType code the operator received (absent when not passed); ``out`` is the
    output exactly as the operator stored it: a uint16 array for float16/bfloat16 (the
    bits), float32 for float32, of the output tensor's shape.
    """
    info = (ctypes.c_int64 * 11)()
    function = runtime.lib.operator_libraries[0].ascendsim_last_launch
    function.restype = ctypes.c_int64
    function.argtypes = (ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_int64)
    nbytes = function(info, None, 0)
    if info[0] == 0:
        return None
    assert nbytes >= 0, "the simulator could not record the output"
    buffer = (ctypes.c_ubyte * nbytes)()
    function(info, buffer, nbytes)
    names = ("query", "key", "value", "out", "pse", "mask")
    dtypes = {name: code for name, code in zip(names, info[1:7]) if code >= 0}
    storage = np.float32 if dtypes["out"] == 0 else np.uint16
    out = np.frombuffer(bytes(buffer), dtype=storage).reshape(tuple(info[7:11]))
    return dict(operator=LAUNCH_KINDS[info[0]], dtypes=dtypes, out=out)


def phase1(runtime, name, arguments):
    """``<name>GetWorkspaceSize(*arguments, &size, &executor)``: (status, size, executor)."""
    from ascend import _ops

    operator = runtime.lib.operator(name)
    size, executor = ctypes.c_uint64(), _ops.ExecutorRef()
    status = operator.get_workspace_size(*arguments, ctypes.byref(size), ctypes.byref(executor))
    return status, size.value, executor


def launch(runtime, name, size, executor):
    """Phase 2 of ``name`` on device 0 with a workspace of ``size`` bytes: its status."""
    operator = runtime.lib.operator(name)
    workspace = runtime.allocate(0, size)
    try:
        return operator.launch(workspace.ptr, size, executor, runtime.activate(0))
    finally:
        runtime._free(workspace)


def error_message(runtime):
    """``aclGetRecentErrMsg()`` as text ("" if there is none)."""
    raw = runtime.lib.acl.aclGetRecentErrMsg()
    return raw.decode() if raw else ""


def fail_next(runtime, function_name, code):
    """Make the next call of ``function_name`` in the simulator return ``code``."""
    runtime.lib.acl.ascendsim_fail_next(function_name.encode(), code)


def clear_injection(runtime):
    runtime.lib.acl.ascendsim_fail_next(None, 0)


def start_trace(runtime):
    """Number the simulator's acl/aclnn calls from 0 and record their names."""
    runtime.lib.acl.ascendsim_calls_reset(1)


def stop_trace(runtime):
    """The names of the calls since :func:`start_trace`, in order; stops recording."""
    function = runtime.lib.acl.ascendsim_trace
    function.restype = ctypes.c_int64
    function.argtypes = (ctypes.c_char_p, ctypes.c_int64)
    length = function(None, 0)
    buffer = ctypes.create_string_buffer(length + 1)
    function(buffer, length + 1)
    runtime.lib.acl.ascendsim_calls_reset(0)
    return buffer.value.decode().split()


def fail_at(runtime, index, code):
    """Number calls from 0 again; the call numbered ``index`` returns ``code``."""
    runtime.lib.acl.ascendsim_calls_reset(0)
    runtime.lib.acl.ascendsim_fail_at(ctypes.c_int64(index), code)


def fail_at_hit(runtime):
    """Whether the failure set by :func:`fail_at` was returned."""
    return bool(runtime.lib.acl.ascendsim_fail_at_hit())


REFUSED_DESTROY = {1: "aclDestroyTensor", 2: "aclDestroyIntArray", 3: "aclDestroyTensorList",
                   4: "aclDestroyAclOpExecutor"}


def destroy_refused_object(runtime):
    """Destroy the object whose destroy an injected failure refused; its destroy's name
    (None if there is none)."""
    function = runtime.lib.meta.ascendsim_refused_object
    function.restype = ctypes.c_void_p
    function.argtypes = (ctypes.POINTER(ctypes.c_int),)
    kind = ctypes.c_int()
    handle = function(ctypes.byref(kind))
    if not handle:
        return None
    name = REFUSED_DESTROY[kind.value]
    destroy = getattr(runtime.lib.meta, name)  # executors: repeatable ones only reach here
    assert destroy(ctypes.cast(handle, destroy.argtypes[0])) == 0
    return name


def assert_no_leak(runtime):
    """After empty_cache: every aclrtMalloc freed, no descriptor or executor alive."""
    import ascend

    ascend.empty_cache()
    stats = mem_stats(runtime)
    assert stats["allocs"] == stats["frees"] and stats["live"] == 0, stats
    assert object_stats(runtime) == dict(tensors=0, int_arrays=0, tensor_lists=0,
                                         executors=0)


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------

def _softmax_parts(query, key, value, keep, bias, scale):
    """What the references share, in float64: q, k and v with key/value heads repeated
    for grouped query heads, the scale, and the masked softmax's pieces: row max (0 in rows
    without any key), those rows, exp(scores - row max) and its row sums."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (query, key, value))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q @ k.swapaxes(-1, -2)
    if bias is not None:
        scores = scores + bias
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(row_max)
    row_max = np.where(empty, 0.0, row_max)
    weights = np.exp(scores - row_max)
    return q, k, v, scale, row_max, empty, weights, weights.sum(axis=-1, keepdims=True)


def reference_attention(query, key, value, keep=None, bias=None, scale=None):
    """softmax(scale * q k^T + bias, masked where not keep) v in float64, with lse.

    Grouped heads share key/value head ``h // (Hq // Hkv)``; rows without any
    key give zeros and lse = -inf.
    """
    _, _, v, _, row_max, empty, weights, total = _softmax_parts(query, key, value, keep,
                                                                 bias, scale)
    out = np.where(empty, 0.0, (weights @ v) / np.where(empty, 1.0, total))
    with np.errstate(divide="ignore"):
        lse = np.where(empty[..., 0], -np.inf, row_max[..., 0] + np.log(total[..., 0]))
    return out, lse


def reference_attention_backward(grad_out, query, key, value, keep=None, bias=None,
                                 scale=None):
    """(dq, dk, dv) of :func:`reference_attention` in float64, BNSD.

    ``P = softmax(scale * q k^T + bias)`` (masked where not keep; rows with no key are
    0), ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = scale * dS K``,
    ``dK = scale * dS^T Q``; key/value gradients summed over each group of query heads.
    """
    q, k, v, scale, _, empty, weights, total = _softmax_parts(query, key, value, keep, bias,
                                                              scale)
    g = np.asarray(grad_out, dtype=np.float64)
    batch, kv_heads = np.shape(key)[:2]
    group = q.shape[1] // kv_heads
    p = np.where(empty, 0.0, weights / np.where(empty, 1.0, total))
    out = p @ v
    dv = p.swapaxes(-1, -2) @ g
    ds = p * (g @ v.swapaxes(-1, -2) - (g * out).sum(axis=-1, keepdims=True))
    dq = scale * ds @ k
    dk = scale * ds.swapaxes(-1, -2) @ q
    fold = (batch, kv_heads, group)
    return (dq, dk.reshape(fold + dk.shape[2:]).sum(axis=2),
            dv.reshape(fold + dv.shape[2:]).sum(axis=2))


def causal_keep(query_length, key_length, bottom_right):
    """True = attend; query i sees keys j <= i (+ S - L if bottom-right)."""
    offset = key_length - query_length if bottom_right else 0
    return np.arange(key_length)[None, :] <= np.arange(query_length)[:, None] + offset


def reference_paged(query, key_blocks, value_blocks, block_table, seq_lens, causal=True,
                    scale=None):
    """Gather each sequence's cache through the block table, then attend."""
    batch, heads, tokens, head_dim = query.shape
    block_size = key_blocks.shape[2]
    out = np.zeros(query.shape, dtype=np.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        positions = np.arange(length)
        blocks = block_table[b, positions // block_size]
        k = key_blocks[blocks, :, positions % block_size].transpose(1, 0, 2)[None]
        v = value_blocks[blocks, :, positions % block_size].transpose(1, 0, 2)[None]
        keep = (causal_keep(tokens, length, bottom_right=True) if causal
                else np.ones((tokens, length), bool))
        if length == 0:
            continue
        out[b] = reference_attention(query[b:b + 1], k, v, keep=keep, scale=scale)[0][0]
    return out


def bf16_round(x):
    """float32 values rounded to bfloat16 (nearest even), as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


TOLERANCE = {  # dtype -> (rtol, atol) against the float64 reference
    "float32": (1e-5, 1e-5),
    "float16": (5e-3, 5e-3),
    "bfloat16": (3e-2, 3e-2),
}

