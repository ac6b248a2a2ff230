"""The Owner protocol (ascend/_owner.py) of every ascend object that owns a resource:
closed objects raise, close is idempotent, ``with`` closes, nothing leaks (checked with
the simulator's counts of live allocations, descriptors and executors) after
close, exceptions, garbage collection and interpreter shutdown."""

import ctypes
import gc
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import load_ascend_harness

import ascend
from ascend import _ops
from ascend._meta import DescriptorScope
from ascend._owner import Owner

harness = load_ascend_harness()
sim_root, runtime = harness.sim_root, harness.runtime

UNLIMITED = _ops.UNLIMITED_TOKENS


def counts(rt):
    """Device allocations, live descriptors/executors, and buffers out of the pool."""
    ascend.empty_cache()  # idle pooled buffers and cached descriptors go back first
    memory = harness.mem_stats(rt)
    return dict(live=memory["live"], live_bytes=memory["live_bytes"],
                buffers=len(rt._live), **harness.object_stats(rt))


class Support:
    """Device memory and descriptors the factories below build on."""

    def __init__(self, rt):
        self.runtime = rt
        self.resources = _ops._CallResources(rt, 0)
        self.scope = DescriptorScope(rt.lib)
        self.pointer = self.resources.upload(np.ones(64, np.float32)).ptr
        self.arguments = self.phase1_arguments()

    def phase1_arguments(self):
        """aclnnFlashAttentionScore phase-1 arguments for a tiny float32 problem."""
        shapes = [(1, 1, 3, 8), (1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 3, 8), (1, 1, 3, 8),
                  (1, 1, 3, 8)]
        q, k, v, row_max, row_sum, out = (
            self.scope.tensor(self.resources.upload(np.ones(s, np.float32)).ptr, s, 0,
                              cacheable=False) for s in shapes)
        return [q, k, v, None, None, None, None, None, 1.0, 1.0, UNLIMITED, UNLIMITED, 1,
                _ops._LAYOUT_BNSD, 0, 0, row_max, row_sum,
                self.scope.tensor(None, (0,), 0, cacheable=False), out]

    def close(self):
        self.scope.close()
        self.resources.close()


@pytest.fixture
def support(runtime):
    s = Support(runtime)
    yield s
    s.close()
    harness.assert_no_leak(runtime)


def make_array(support):
    return ascend.to_device(np.ones((2, 3), np.float32))


def use_array(array, support):
    return array.to_numpy()


def make_scope(support):
    scope = DescriptorScope(support.runtime.lib)
    scope.tensor(support.pointer, (2, 3), 0, cacheable=False)
    scope.int_array([1, 2])
    scope.tensor_list([scope.tensor(support.pointer, (4,), 0, cacheable=False)])
    return scope


def use_scope(scope, support):
    return scope.int_array([1])


def make_resources(support):
    resources = _ops._CallResources(support.runtime, 0)
    resources.scratch(4096)
    resources.upload(np.ones(8, np.float32))
    return resources


def use_resources(resources, support):
    return resources.scratch(8)


def make_executor(support):
    rt = support.runtime
    operator = rt.lib.operator("aclnnFlashAttentionScore")
    executor = _ops._Executor(rt.lib.meta)
    size = ctypes.c_uint64()
    rt.lib.check(operator.get_workspace_size(*support.arguments, ctypes.byref(size),
                                             ctypes.byref(executor.handle)), "phase 1")
    executor.adopt()        # repeatable, as the binding makes it right after phase 1
    assert executor.handle and executor.repeatable  # a live executor belongs to the object
    return executor


def use_executor(executor, support):
    operator = support.runtime.lib.operator("aclnnFlashAttentionScore")
    return executor.launch(operator, None, 0, support.runtime.activate(0))


KINDS = {
    "DeviceArray": (make_array, use_array),
    "DescriptorScope": (make_scope, use_scope),
    "CallResources": (make_resources, use_resources),
    "Executor": (make_executor, use_executor),
}


@pytest.fixture(params=list(KINDS))
def kind(request):
    return KINDS[request.param]


def test_every_resource_owner_is_an_owner():
    from ascend._runtime import Runtime
    for cls in (ascend.DeviceArray, DescriptorScope, _ops._CallResources, _ops._Executor,
                Runtime):
        assert issubclass(cls, Owner)
        for name in ("close", "__enter__", "__exit__", "__del__"):
            assert getattr(cls, name) is getattr(Owner, name), (cls, name)


def test_closed_objects_raise(support, kind):
    make, use = kind
    before = counts(support.runtime)
    obj = make(support)
    assert not obj.closed
    obj.close()
    assert obj.closed
    with pytest.raises(ValueError, match="is closed"):
        use(obj, support)
    with pytest.raises(ValueError, match="is closed"):
        with obj:
            pass
    assert counts(support.runtime) == before


def test_close_twice_is_fine(support, kind):
    make, _ = kind
    before = counts(support.runtime)
    obj = make(support)
    obj.close()
    obj.close()
    assert obj.closed and counts(support.runtime) == before


def test_with_closes(support, kind):
    make, use = kind
    before = counts(support.runtime)
    with make(support) as obj:
        assert not obj.closed
        if make is not make_executor:  # using an executor launches (and spends) it
            use(obj, support)
    assert obj.closed and counts(support.runtime) == before


def test_exception_inside_with_closes(support, kind):
    make, _ = kind
    before = counts(support.runtime)
    with pytest.raises(KeyError):
        with make(support) as obj:
            raise KeyError("boom")
    assert obj.closed and counts(support.runtime) == before


def test_garbage_collection_closes_unclosed_objects(support, kind):
    make, _ = kind
    before = counts(support.runtime)
    for _ in range(3):
        make(support)                      # dropped at once: refcounting closes it
    obj = make(support)
    del obj
    gc.collect()
    assert gc.garbage == []
    assert counts(support.runtime) == before


def test_garbage_collection_of_a_reference_cycle(support):
    before = counts(support.runtime)
    scope = make_scope(support)
    resources = make_resources(support)
    scope.partner, resources.partner = resources, scope
    del scope, resources
    assert counts(support.runtime) != before  # only the cycle collector reaches them
    gc.collect()
    assert counts(support.runtime) == before


def test_create_close_cycles_return_to_the_starting_counts(support):
    before = counts(support.runtime)
    for _ in range(20):
        for make, use in KINDS.values():
            with make(support) as obj:
                if make is not make_executor:
                    use(obj, support)
        with ascend.to_device(np.ones((1, 1, 4, 8), np.float16)) as x:
            ascend.flash_attention(x, x, x).close()       # a whole call, device in and out
            ascend.flash_attention(x.to_numpy(), x.to_numpy(), x.to_numpy())  # host in and out
            x.view(readonly=True).close()
    assert counts(support.runtime) == before


def test_executor_is_consumed_by_its_launch(support):
    before = counts(support.runtime)
    executor = make_executor(support)
    assert harness.object_stats(support.runtime)["executors"] == before["executors"] + 1
    status = use_executor(executor, support)       # no workspace: phase 2 fails; closed, destroyed
    assert status == 161002 and executor.closed and executor.handle is None
    assert counts(support.runtime) == before


def test_failing_operator_call_closes_its_resources(support):
    before = counts(support.runtime)
    harness.fail_next(support.runtime, "aclnnFlashAttentionScore", 507015)
    with pytest.raises(ascend.AscendError):
        ascend.flash_attention(*(np.ones((1, 1, 4, 8), np.float32),) * 3, return_lse=True)
    assert counts(support.runtime) == before


def test_views_close_without_freeing_and_end_with_their_owner(support):
    before = counts(support.runtime)
    owner = ascend.zeros((2, 2), np.float32)
    view = owner.view()
    with view:
        pass
    assert view.closed and not owner.closed
    with pytest.raises(ValueError, match="is closed"):
        view.to_numpy()
    second = owner.view(readonly=True)
    owner.close()
    assert second.closed and second.freed
    with pytest.raises(ValueError, match="is closed"):
        second.to_numpy()
    orphan = ascend.zeros(3).view()                 # the view alone keeps its owner alive
    np.testing.assert_array_equal(orphan.to_numpy(), 0.0)
    del orphan
    gc.collect()
    assert counts(support.runtime) == before


def test_free_and_freed_are_aliases(support):
    x = make_array(support)
    x.free()
    assert x.closed and x.freed
    with pytest.raises(ValueError, match="closed .freed."):
        x.to_numpy()


# ---------------------------------------------------------------------------
# the base class alone
# ---------------------------------------------------------------------------

class Counting(Owner):
    def __init__(self, fail=False):
        self.released, self.fail = 0, fail
        Owner.__init__(self)

    def _release(self):
        self.released += 1
        if self.fail:
            raise OSError("release failed")


class BrokenInit(Owner):
    def __init__(self):
        raise RuntimeError("before the resource was held")

    def _release(self):  # pragma: no cover - must never run
        raise AssertionError("released an object that never opened")


@pytest.fixture
def unraisable(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def test_close_releases_exactly_once_across_threads():
    for _ in range(50):
        owner = Counting()
        barrier = threading.Barrier(4)

        def close():
            barrier.wait()
            owner.close()
        threads = [threading.Thread(target=close) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert owner.released == 1


def test_a_failing_release_propagates_from_close_but_not_from_del(unraisable):
    owner = Counting(fail=True)
    with pytest.raises(OSError):
        owner.close()
    assert owner.closed and owner.released == 1
    owner.close()                                  # not retried
    assert owner.released == 1
    unclosed = Counting(fail=True)
    del unclosed
    gc.collect()
    assert unraisable == []


def test_del_of_a_half_constructed_object_is_silent(unraisable):
    with pytest.raises(RuntimeError):
        BrokenInit()
    gc.collect()
    assert unraisable == []


def test_del_does_nothing_when_already_closed():
    owner = Counting()
    owner.close()
    owner.__del__()
    assert owner.released == 1


def test_runtime_keeps_its_error_type_after_close(sim_root):
    script = """
        import numpy as np, ascend
        from ascend._runtime import get_runtime
        rt = get_runtime()
        x = ascend.to_device(np.ones(3, np.float32))
        rt.close()
        assert rt.closed and x.closed
        for call in (lambda: rt.activate(0), get_runtime, x.to_numpy):
            try:
                call()
            except Exception as exc:
                print(type(exc).__name__, exc)
    """
    result = _run(script, sim_root)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == lines[1] == ("RuntimeError the ascend runtime has been finalised "
                                    "(interpreter exit)")
    assert lines[2].startswith("ValueError DeviceArray(") and lines[2].endswith("is closed (freed)")


# ---------------------------------------------------------------------------
# interpreter shutdown
# ---------------------------------------------------------------------------

def _run(script, root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_")}
    env.update(ASCEND_HOME_PATH=str(root), ASCEND_SIM_DEVICE_COUNT="2",
               PYTHONPATH=str(harness.REPO_ROOT), LD_LIBRARY_PATH="")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=60)


SHUTDOWN_SCRIPT = """
    import ctypes, numpy as np, ascend
    from ascend import _ops
    from ascend._meta import DescriptorScope
    from ascend._owner import Owner
    from ascend._runtime import get_runtime

    rt = get_runtime()
    array = ascend.to_device(np.ones((2, 3), np.float32), device=1)
    view = array.view(readonly=True)
    orphan_view = ascend.zeros(4).view()          # its owner lives only through the view
    resources = _ops._CallResources(rt, 0)
    buffer = resources.scratch(4096)
    scope = DescriptorScope(rt.lib)
    scope.tensor(buffer.ptr, (2,), 0, cacheable=False)
    scope.int_array([1, 2])
    scope.cycle = scope                           # left to the final collection
    shapes = [(1, 1, 3, 8), (1, 1, 4, 8), (1, 1, 4, 8)] + [(1, 1, 3, 8)] * 3
    q, k, v, row_max, row_sum, out = (
        scope.tensor(resources.upload(np.ones(s, np.float32)).ptr, s, 0, cacheable=False)
        for s in shapes)
    executor = _ops._Executor(rt.lib.meta)
    size = ctypes.c_uint64()
    rt.lib.check(rt.lib.operator("aclnnFlashAttentionScore").get_workspace_size(
        q, k, v, None, None, None, None, None, 1.0, 1.0, 2147483647, 2147483647, 1,
        _ops._LAYOUT_BNSD, 0, 0, row_max, row_sum, scope.tensor(None, (0,), 0), out,
        ctypes.byref(size), ctypes.byref(executor.handle)), "phase 1")

    class UsesGlobals(Owner):                     # its release would fail at shutdown
        def __init__(self):
            Owner.__init__(self)
        def _release(self):
            np.zeros(1)
            print("released")
    kept = UsesGlobals()
    kept.self = kept
    print("created")
"""


def test_del_at_interpreter_shutdown_is_quiet(sim_root):
    result = _run(SHUTDOWN_SCRIPT, sim_root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""                    # no traceback, no "Exception ignored"
    assert result.stdout.splitlines() == ["created"]  # nothing released after finalisation


def test_del_at_interpreter_shutdown_without_a_runtime_teardown(sim_root):
    # the runtime's atexit teardown unregistered: every object is still open at shutdown
    script = SHUTDOWN_SCRIPT + """
    import atexit
    atexit.unregister(rt.finalize)
    """
    result = _run(script, sim_root)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
