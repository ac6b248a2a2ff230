"""ascend runtime binding against the C test double: discovery, init/finalize,
errors, devices, DeviceArray lifecycle and device-memory accounting."""

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import load_ascend_harness
from hypothesis import HealthCheck, given, settings, strategies as st

import ascend
from ascend import _library




harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime
FIXTURES = [HealthCheck.function_scoped_fixture]


def run_python(code, env_updates=(), clear_ascend_env=True):
    """Run ``code`` in a fresh interpreter (process-wide library state); return its JSON output."""
    env = {k: v for k, v in os.environ.items()
           if not (clear_ascend_env and k.startswith("ASCEND_"))}
    env["LD_LIBRARY_PATH"] = ""
    env["PYTHONPATH"] = str(harness.REPO_ROOT)
    env.update(env_updates)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------

def _fake_install(directory, *names):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def test_candidate_dirs_follow_documented_order(tmp_path):
    environ = {"ASCEND_LIB_DIR": "/override", "ASCEND_HOME_PATH": "/home",
               "ASCEND_TOOLKIT_HOME": "/toolkit"}
    assert [str(p) for p in _library.candidate_dirs(environ)] == [
        "/override", "/home/lib64", "/toolkit/lib64",
        "/usr/local/Ascend/ascend-toolkit/latest/lib64", "/usr/local/Ascend/cann/lib64"]


def test_locate_takes_first_directory_with_the_runtime(tmp_path):
    override = _fake_install(tmp_path / "override")  # no libascendcl.so: skipped
    home = _fake_install(tmp_path / "home" / "lib64", "libascendcl.so", "libnnopbase.so",
                         "libopapi.so")
    toolkit = _fake_install(tmp_path / "toolkit" / "lib64", "libascendcl.so")
    environ = {"ASCEND_LIB_DIR": str(override), "ASCEND_HOME_PATH": str(tmp_path / "home"),
               "ASCEND_TOOLKIT_HOME": str(tmp_path / "toolkit")}
    paths = _library.locate(environ)
    assert paths.runtime == str(home / "libascendcl.so")
    assert paths.meta == str(home / "libnnopbase.so")
    _fake_install(override, "libascendcl.so")
    assert _library.locate(environ).runtime == str(override / "libascendcl.so")
    del environ["ASCEND_LIB_DIR"], environ["ASCEND_HOME_PATH"]
    assert _library.locate(environ).runtime == str(toolkit / "libascendcl.so")


def test_split_operator_libraries_come_before_libopapi(tmp_path):
    lib = _fake_install(tmp_path / "lib64", "libascendcl.so", "libnnopbase.so", "libopapi.so",
                        "libopapi_transformer.so", "libopapi_math.so")
    paths = _library.locate({"ASCEND_LIB_DIR": str(lib)})
    assert [Path(p).name for p in paths.operators] == [
        "libopapi_math.so", "libopapi_transformer.so", "libopapi.so"]


def test_locate_falls_back_to_the_loader_path(tmp_path):
    lib = _fake_install(tmp_path / "ld", "libopapi_transformer.so")
    paths = _library.locate({"LD_LIBRARY_PATH": str(lib)})
    assert paths.runtime == "libascendcl.so"
    assert paths.operators == (str(lib / "libopapi_transformer.so"), "libopapi.so")
    assert paths.searched[-1] == "<dynamic loader path>"


def test_not_found_is_explained_and_nothing_loads_at_import():
    out = run_python("""
        import json, ascend
        maps = open('/proc/self/maps').read()
        result = dict(loaded_at_import='libascendcl' in maps,
                      available=ascend.is_available(), count=ascend.device_count(),
                      devices=ascend.devices())
        for call in (lambda: ascend.parse_device('npu'),
                     lambda: ascend.flash_attention([[[[1.0]]]], [[[[1.0]]]], [[[[1.0]]]])):
            try:
                call()
            except ascend.AscendRuntimeNotFound as exc:
                result.setdefault('errors', []).append(str(exc))
        print(json.dumps(result))
    """)
    assert out["loaded_at_import"] is False
    assert (out["available"], out["count"], out["devices"]) == (False, 0, [])
    assert len(out["errors"]) == 2
    for message in out["errors"]:
        assert "set_env.sh" in message and "ASCEND_LIB_DIR" in message
        assert "/usr/local/Ascend/ascend-toolkit/latest/lib64" in message


def test_loader_path_finds_the_runtime(sim_root):
    out = run_python("""
        import json, ascend
        from ascend._runtime import get_runtime
        print(json.dumps([ascend.devices(), get_runtime().lib.paths.runtime]))
    """, {"LD_LIBRARY_PATH": str(sim_root / "lib64")})
    assert out == [["npu:0", "npu:1"], "libascendcl.so"]


def test_split_operator_library_and_override_precedence(sim_root, tmp_path):
    split = tmp_path / "split"
    harness.build_sim(split, opapi_name="libopapi_transformer.so")
    out = run_python("""
        import json, numpy as np, ascend
        from ascend._runtime import get_runtime
        q = np.ones((1, 1, 2, 4), np.float32)
        out = ascend.flash_attention(q, q, q)
        print(json.dumps([get_runtime().lib.paths.runtime,
                          list(get_runtime().lib.paths.operators), out.tolist()]))
    """, {"ASCEND_LIB_DIR": str(split / "lib64"), "ASCEND_HOME_PATH": str(sim_root)})
    assert out[0] == str(split / "lib64" / "libascendcl.so")
    assert out[1] == [str(split / "lib64" / "libopapi_transformer.so")]
    assert np.allclose(out[2], 1.0)


def test_repeated_init_counts_as_success_and_finalize_order(sim_root):
    out = run_python("""
        import ctypes, json, numpy as np, ascend
        acl = ctypes.CDLL(%r, mode=ctypes.RTLD_GLOBAL)
        first = acl.aclInit(None)                     # someone else initialised ACL
        from ascend._runtime import get_runtime
        rt = get_runtime()
        kept = ascend.to_device(np.ones(3, np.float32), device=1)
        ascend.flash_attention(np.ones((1, 1, 2, 4), np.float32), np.ones((1, 1, 2, 4), np.float32),
                               np.ones((1, 1, 2, 4), np.float32))
        rt.finalize()
        stats = (ctypes.c_int64 * 5)()
        acl.ascendsim_mem_stats(stats)
        try:
            kept.to_numpy()
            freed_error = None
        except ValueError as exc:
            freed_error = str(exc)
        # not owned: ascend must not have called aclFinalize, so ours succeeds
        print(json.dumps([first, rt._owns_init, list(stats), acl.aclFinalize(), freed_error]))
    """ % str(sim_root / "lib64" / "libascendcl.so"), {"ASCEND_HOME_PATH": str(sim_root)})
    first, owns_init, stats, finalize_status, freed_error = out
    assert first == 0 and owns_init is False
    allocs, frees, live, live_bytes, streams = stats
    assert allocs == frees and live == 0 and streams == 0
    assert finalize_status == 0
    assert "freed" in freed_error


def test_owned_runtime_finalizes_at_exit(sim_root):
    out = run_python("""
        import ctypes, json, atexit, numpy as np, ascend
        from ascend._runtime import get_runtime
        rt = get_runtime()
        x = ascend.to_device(np.ones(3, np.float32))
        rt.finalize()
        # aclFinalize already ran: a second one reports REPEAT_FINALIZE
        print(json.dumps([rt._owns_init, rt.lib.acl.aclFinalize()]))
    """, {"ASCEND_HOME_PATH": str(sim_root)})
    assert out == [True, 100037]


# ---------------------------------------------------------------------------
# devices and errors
# ---------------------------------------------------------------------------

def test_devices(runtime):
    assert ascend.is_available()
    assert ascend.device_count() == harness.SIM_DEVICE_COUNT
    assert ascend.devices() == ["npu:0", "npu:1"]
    assert ascend.parse_device("npu") == 0
    assert ascend.parse_device("npu:1") == 1


@pytest.mark.parametrize("bad", ["npu:2", "npu:99"])
def test_parse_device_out_of_range(runtime, bad):
    with pytest.raises(ValueError, match="does not exist"):
        ascend.parse_device(bad)


@pytest.mark.parametrize("bad", ["cpu", "cuda:0", "npu:", "npu:-1", "npu:a", "NPU", 0, None])
def test_parse_device_rejects_other_strings(runtime, bad):
    with pytest.raises(ValueError, match="'npu' or 'npu:N'"):
        ascend.parse_device(bad)


def test_ascend_error_names_call_code_and_message(runtime):
    harness.fail_next(runtime, "aclrtMalloc", 207001)
    with pytest.raises(ascend.AscendError) as info:
        ascend.to_device(np.ones(1000, np.float32))
    error = info.value
    assert (error.code, error.name) == (207001, "aclrtMalloc")
    assert error.status_name == "ACL_ERROR_RT_MEMORY_ALLOCATION"
    assert "injected failure of aclrtMalloc" in error.message
    assert str(error).startswith("aclrtMalloc failed with 207001 (ACL_ERROR_RT_MEMORY_ALLOCATION)")
    harness.assert_no_leak(runtime)


def test_out_of_memory_returns_idle_pool_memory_and_retries(runtime):
    ascend.to_device(np.ones(1000, np.float32)).free()  # an idle buffer in the pool
    before = harness.mem_stats(runtime)
    harness.fail_next(runtime, "aclrtMalloc", 207001)
    with ascend.to_device(np.ones(5000, np.float32)) as x:  # other size: pool miss
        assert x.to_numpy().sum() == 5000
    after = harness.mem_stats(runtime)
    assert after["frees"] == before["frees"] + 1  # the idle buffer went back
    harness.assert_no_leak(runtime)


def test_real_sim_limit_gives_ascend_error(runtime):
    with pytest.raises(ascend.AscendError) as info:
        ascend.to_device(np.zeros(2 ** 31, np.uint8))  # beyond the sim's 1 GiB per device
    assert info.value.code == 207001 and "out of memory" in info.value.message
    harness.assert_no_leak(runtime)


# ---------------------------------------------------------------------------
# DeviceArray
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64, np.uint8,
                                   np.int8, np.bool_])
def test_round_trip(runtime, dtype):
    host = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    with ascend.to_device(host) as x:
        assert (x.shape, x.dtype, x.device, x.ndim, x.size) == ((2, 3, 4), np.dtype(dtype), 0,
                                                                 3, 24)
        assert x.nbytes == host.nbytes
        back = x.to_numpy()
    assert back.dtype == host.dtype and np.array_equal(back, host)
    harness.assert_no_leak(runtime)


def test_bfloat16_rounds_to_nearest_even(runtime):
    host = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf, -np.inf], np.float32)
    with ascend.to_device(host, dtype="bfloat16") as x:
        assert x.dtype == "bfloat16" or str(x.dtype) == "bfloat16"
        back = np.asarray(x.to_numpy(), dtype=np.float32)
    assert np.array_equal(back, harness.bf16_round(host))
    assert back[1] == 1.0 and back[2] == 1.015625  # ties to even, above tie rounds up
    nan = ascend.to_device(np.array([np.nan], np.float32), dtype="bfloat16")
    assert np.isnan(np.asarray(nan.to_numpy(), np.float32)).all()
    nan.free()


def test_free_is_idempotent_and_use_after_free_raises(runtime):
    x = ascend.to_device(np.ones((2, 2), np.float32))
    x.free()
    x.free()
    assert x.closed and x.freed and "closed" in repr(x)
    with pytest.raises(ValueError, match="freed"):
        x.to_numpy()
    with pytest.raises(ValueError, match="freed"):
        x[0] = 1.0
    with pytest.raises(ValueError, match="freed"):
        ascend.flash_attention(x, x, x)
    with pytest.raises(ValueError, match="freed"):
        ascend.to_device(x)
    harness.assert_no_leak(runtime)


def test_context_manager_and_garbage_collection_free(runtime):
    with ascend.to_device(np.ones(4, np.float32)) as x:
        pass
    assert x.freed
    y = ascend.to_device(np.ones(4, np.float32))
    del y
    gc.collect()
    assert gc.garbage == []
    harness.assert_no_leak(runtime)


def test_setitem_writes_regions(runtime):
    host = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    expected = host.copy()
    with ascend.to_device(host) as x:
        x[1, :, 2] = -1.0
        expected[1, :, 2] = -1.0
        x[0, 1:3, :, 1:4] = np.full((2, 4, 3), 7.0)
        expected[0, 1:3, :, 1:4] = 7.0
        x[..., 0] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        expected[..., 0] = np.arange(24).reshape(2, 3, 4)
        x[1, 2, 3, 4] = 99.0
        expected[1, 2, 3, 4] = 99.0
        x[0, 0, 0:0] = 5.0  # empty region: nothing to do
        assert np.array_equal(x.to_numpy(), expected)
        for fancy in (np.array([0, 1]), True, [0, 1]):
            with pytest.raises(TypeError, match="basic indexing"):
                x[fancy] = 0.0
        with pytest.raises(IndexError):
            x[5] = 0.0
        with pytest.raises(ValueError):
            x[0] = np.ones(7)
    harness.assert_no_leak(runtime)


def _basic_key(data, shape):
    """A random basic index for ``shape``: ints, slices (negative steps too), maybe ``...``."""
    key = []
    for n in shape:
        if data.draw(st.booleans()):
            key.append(data.draw(st.integers(-n, n - 1)))
        else:
            start = data.draw(st.none() | st.integers(-n, n))
            stop = data.draw(st.none() | st.integers(-n, n))
            key.append(slice(start, stop, data.draw(st.sampled_from([None, 1, 2, -1, -2]))))
    if key and data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(key) - 1))
        key = key[:cut] + [Ellipsis]      # the remaining axes: whole
    return tuple(key)


SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(shape=SHAPES, data=st.data())
def test_setitem_and_copy_region_match_numpy(runtime, shape, data):
    rng = np.random.default_rng(0)
    host = rng.standard_normal(shape).astype(np.float32)
    key = _basic_key(data, shape)
    region = host[key].shape
    values = rng.standard_normal(region).astype(np.float32)
    expected = host.copy()
    expected[key] = values
    with ascend.to_device(host) as x, ascend.to_device(values) as v, \
            ascend.zeros(region, np.float32) as w:
        x[key] = values                      # host to device
        np.testing.assert_array_equal(x.to_numpy(), expected)
        w.copy_region(Ellipsis, x, key)      # device to device, strided source
        np.testing.assert_array_equal(w.to_numpy(), expected[key])
        x[key] = 0.0
        x[key] = v                           # device to device, strided destination
        np.testing.assert_array_equal(x.to_numpy(), expected)


def test_strided_writes_are_one_2d_copy_per_slab(runtime):
    host = np.zeros((3, 4, 16, 8), np.float16)      # a cache: (blocks, heads, slots, dim)
    with ascend.to_device(host) as x:
        before = harness.copy_stats(runtime)
        x[1, :, 5:7] = np.ones((4, 2, 8))           # 4 heads x 2 slots: one 2-D copy
        x[:, :, 3] = 2.0                            # 3 x 4 rows of one slot: one per block
        copied = harness.copies_since(runtime, before)
        assert copied["h2d"] == (1 + 3, (4 * 2 * 8 + 3 * 4 * 8) * 2)
        host[1, :, 5:7], host[:, :, 3] = 1.0, 2.0
        np.testing.assert_array_equal(x.to_numpy(), host)
        harness.fail_next(runtime, "aclrtMemcpy2d", 107000)
        with pytest.raises(ascend.AscendError, match="aclrtMemcpy2d"):
            x[0, :, 0:2] = 5.0
    harness.assert_no_leak(runtime)


def test_copy_region_refuses_what_it_cannot_copy(runtime):
    x = ascend.to_device(np.arange(12, dtype=np.float32).reshape(3, 4))
    other_device = ascend.to_device(np.zeros(4, np.float32), device=1)
    half = ascend.to_device(np.zeros(4, np.float16))
    for source, source_key, error, match in (
            (np.zeros(4, np.float32), Ellipsis, TypeError, "must be a DeviceArray"),
            (other_device, Ellipsis, ValueError, "npu:1"),
            (half, Ellipsis, TypeError, "float16 into float32"),
            (x, (slice(0, 2), 0), ValueError, "differ in shape"),
            (x, 0, ValueError, "overlap"),
            (x.view(), 0, ValueError, "overlap")):   # a view shares the memory
        with pytest.raises(error, match=match):
            x.copy_region(0, source, source_key)
    x.copy_region(0, x, 2)                            # disjoint rows of one array
    np.testing.assert_array_equal(x.to_numpy()[0], [8, 9, 10, 11])
    half.free()
    with pytest.raises(ValueError, match="freed"):
        x.copy_region(0, half, Ellipsis)
    for array in (x, other_device):
        array.free()
    harness.assert_no_leak(runtime)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int32", "bool"])
def test_zeros(runtime, dtype):
    with ascend.to_device(np.ones(40, np.float32)):  # leaves a used buffer in the pool
        pass
    with ascend.zeros((2, 5), dtype) as x:           # ... which zeros may get: still zeros
        assert x.shape == (2, 5) and x.to_numpy().astype(np.float32).sum() == 0
    with ascend.zeros(3, dtype, device="npu:1") as x, ascend.zeros((0, 4), dtype) as empty:
        assert x.shape == (3,) and x.device == 1 and empty.to_numpy().shape == (0, 4)
    harness.assert_no_leak(runtime)


def test_zeros_bad_arguments_and_failure(runtime):
    for shape, dtype, error, match in (((2, -1), "float32", ValueError, "negative"),
                                       ((2.5,), "float32", TypeError, "shape"),
                                       ((2,), np.complex64, TypeError, "cannot be stored")):
        with pytest.raises(error, match=match):
            ascend.zeros(shape, dtype)
    harness.fail_next(runtime, "aclrtMemset", 107000)
    with pytest.raises(ascend.AscendError, match="aclrtMemset"):
        ascend.zeros((4,), np.float32)
    harness.assert_no_leak(runtime)


def test_views_share_memory_without_owning_it(runtime):
    x = ascend.to_device(np.zeros((2, 3), np.float32))
    writable, readonly = x.view(), x.view(readonly=True)
    assert not writable.readonly and readonly.readonly and readonly.view().readonly
    assert "read-only view" in repr(readonly)
    writable[0] = 1.0
    np.testing.assert_array_equal(readonly.to_numpy()[0], 1.0)
    with pytest.raises(ValueError, match="read-only"):
        readonly[0] = 2.0
    with pytest.raises(ValueError, match="read-only"):
        readonly.copy_region(0, x, 1)
    with pytest.raises(AttributeError):
        readonly.readonly = False
    writable.free()                                  # lets go, frees nothing
    assert writable.freed and not x.freed
    np.testing.assert_array_equal(x.to_numpy()[0], 1.0)
    kept = x.view()
    del x
    gc.collect()                                     # the view keeps its owner alive
    np.testing.assert_array_equal(kept.to_numpy()[0], 1.0)
    owner = kept._base
    owner.free()                                     # freeing the owner ends every view
    for view in (kept, readonly):
        assert view.freed
        with pytest.raises(ValueError, match="freed"):
            view.to_numpy()
    del kept, readonly, owner
    gc.collect()
    harness.assert_no_leak(runtime)


def test_no_implicit_conversion_to_numpy(runtime):
    with ascend.to_device(np.ones(3, np.float32)) as x:
        with pytest.raises(TypeError, match="to_numpy"):
            np.asarray(x)


def test_devices_are_kept_apart(runtime):
    on_one = ascend.to_device(np.ones((1, 1, 2, 4), np.float32), device="npu:1")
    on_zero = ascend.to_device(np.ones((1, 1, 2, 4), np.float32), device=0)
    assert on_one.device == 1 and "npu:1" in repr(on_one)
    assert ascend.to_device(on_one, device=1) is on_one
    with pytest.raises(ValueError, match="npu:1"):
        ascend.to_device(on_one, device=0)
    with pytest.raises(ValueError, match="npu:1"):
        ascend.flash_attention(on_zero, on_one, on_zero)
    out = ascend.flash_attention(on_one, on_one, on_one, device=1)
    assert out.device == 1 and np.allclose(out.to_numpy(), 1.0)
    for array in (out, on_one, on_zero):
        array.free()
    with pytest.raises(ValueError, match="does not exist"):
        ascend.to_device(np.ones(2), device=2)
    harness.assert_no_leak(runtime)


def test_unsupported_dtype_for_device_storage(runtime):
    with pytest.raises(TypeError, match="cannot be stored"):
        ascend.to_device(np.ones(2, np.complex64))
    harness.assert_no_leak(runtime)


def test_failed_init_means_unavailable_with_a_named_error(sim_root):
    out = run_python("""
        import ctypes, json, ascend
        acl = ctypes.CDLL(%r, mode=ctypes.RTLD_GLOBAL)
        acl.ascendsim_fail_next(b"aclInit", 500004)   # e.g. the driver is missing
        result = [ascend.is_available()]
        acl.ascendsim_fail_next(b"aclInit", 500004)
        result.append(ascend.device_count())
        acl.ascendsim_fail_next(b"aclInit", 500004)
        try:
            ascend.parse_device("npu")
        except ascend.AscendError as exc:
            result += [exc.name, exc.code, exc.status_name]
        result.append(ascend.devices())              # the next attempt succeeds
        print(json.dumps(result))
    """ % str(sim_root / "lib64" / "libascendcl.so"), {"ASCEND_HOME_PATH": str(sim_root)})
    assert out == [False, 0, "aclInit", 500004, "ACL_ERROR_DRV_FAILURE", ["npu:0", "npu:1"]]
