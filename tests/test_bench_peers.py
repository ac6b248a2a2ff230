"""The peer runners of ``python -m fastattn.bench --suite``: each installed peer agrees
with the float64 reference on every kind of workload it runs (so the comparison never
times a wrong answer), and a peer that fails or is wrong shows up as such.

Each peer's tests run only where it is installed (fastattn never needs one). Nothing
here is timed: the suite's runs are at tiny sizes, with the machine baselines stubbed.
"""
import json
import os

import numpy as np
import pytest

from fastattn import _bench_peers as peers
from fastattn import bench

PEER_MODULES = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx"),
                "openvino": ("openvino",), "jax": ("jax",)}


def _require(name):
    for module in PEER_MODULES[name]:
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def small_cases():
    """(workload, arrays, float64 reference) of every kind at small shapes."""
    cases = []
    for workload in peers.SMALL:
        arrays = peers.workload_arrays(workload)
        cases.append((workload, arrays, peers.reference_output(workload, arrays)))
    return cases


def test_small_suite_covers_every_kind():
    kinds = {(w.causal, w.padding, w.kv_heads < w.heads, w.decode, w.entry) for w in peers.SMALL}
    assert (False, False, False, False, "sdpa") in kinds           # dense
    assert (True, False, False, False, "sdpa") in kinds            # causal
    assert (False, True, False, False, "sdpa") in kinds            # key padding mask
    assert (True, False, True, False, "sdpa") in kinds             # GQA, causal
    assert (False, False, True, True, "sdpa") in kinds             # decode
    assert (False, False, True, True, "paged") in kinds            # decode, paged
    # the suite: the eight rows, in order
    assert [w.name for w in peers.SUITES["peers"]] == [
        "dense", "causal", "padding", "bert", "head_dim_128", "gqa", "decode", "decode_paged"]
    assert [w.E for w in peers.SUITES["wide"]] == [80, 96, 256]


@pytest.mark.parametrize("name", ["fastattn", *PEER_MODULES])
def test_runner_agrees_with_the_reference_on_every_kind(name, small_cases):
    if name != "fastattn":
        _require(name)
    runner = peers.SYSTEM_CLASSES[name](2)
    assert runner.available()
    try:
        for workload, arrays, reference in small_cases:
            call, cell = peers.check(runner, workload, arrays, reference)
            assert cell["status"] == "ok", (workload.name, cell)
            assert cell["max_rel_diff"] <= peers.TOLERANCE
            # the callable that would be timed gives the checked answer again
            again = peers.output_array(runner, workload, call())
            assert peers.relative_error(again, reference) <= peers.TOLERANCE
        assert runner.version() and runner.config()
    finally:
        runner.close()


def test_reference_is_what_the_masks_mean(small_cases):
    # the suite's reference against the unfused formula, per kind
    for workload, (q, k, v, mask), reference in small_cases:
        group = workload.heads // workload.kv_heads
        k64, v64 = (np.repeat(a.astype(np.float64), group, axis=1) for a in (k, v))
        want = bench.numpy_attention(q.astype(np.float64), k64, v64, workload.causal, mask)
        np.testing.assert_allclose(reference, want, rtol=1e-10, atol=1e-12)
        if workload.padding:
            assert mask.shape == (workload.batch, 1, 1, workload.S)
            assert mask.sum(axis=-1).ravel().tolist() == workload.key_lengths
            assert len(set(workload.key_lengths)) > 1


def test_paged_pool_holds_the_same_keys():
    workload = peers.SMALL[-1]
    _, k, v, _ = peers.workload_arrays(workload)
    key_blocks, value_blocks, table = peers._paged_pool(k, v, 16)
    import fastattn.reference
    for b in range(workload.batch):
        gathered = fastattn.reference.gather_blocks(key_blocks, table[b], workload.S)
        np.testing.assert_array_equal(gathered, k[b])
    assert not np.array_equal(table.ravel(), np.arange(table.size))     # shuffled


def test_torch_runner_restores_its_thread_count(small_cases):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    runner = peers.TorchRunner(1 if before != 1 else 2)
    workload, arrays, reference = small_cases[0]
    runner.prepare(workload, arrays)
    assert torch.get_num_threads() == runner.threads
    runner.close()
    assert torch.get_num_threads() == before


def test_jax_runner_leaves_the_environment_as_it_was(small_cases):
    _require("jax")
    before = dict(os.environ)
    runner = peers.JaxRunner(1)
    workload, arrays, reference = small_cases[0]
    call, cell = peers.check(runner, workload, arrays, reference)
    assert cell["status"] == "ok"
    assert dict(os.environ) == before
    assert "thread" in runner.config()


def test_onnxruntime_declines_what_its_ops_cannot_express():
    runner = peers.OnnxRuntimeRunner(1)
    padded_gqa = peers.Workload("x", "x", 2, 4, 2, 8, 8, 8, causal=True, padding=True)
    non_causal_gqa = peers.Workload("x", "x", 2, 4, 2, 8, 8, 8)
    assert "padding" in runner.supports(padded_gqa)
    assert "causal" in runner.supports(non_causal_gqa)
    assert runner.supports(peers.SMALL[0]) is None
    assert runner.label(peers.SMALL[0]) == "MHA" and runner.label(peers.SMALL[3]) == "GQA"


# --- failures are shown, never dropped -----------------------------------------------

class _Wrong(peers.Peer):
    name, title, modules = "wrong", "Wrong", ()

    def available(self):
        return True

    def prepare(self, workload, arrays):
        q = arrays[0]
        return lambda: np.zeros(q.shape, dtype=q.dtype) + 1


class _Unbuildable(_Wrong):
    name, title = "unbuildable", "Unbuildable"

    def prepare(self, workload, arrays):
        raise RuntimeError("no kernel for this")


class _Crashing(_Wrong):
    name, title = "crashing", "Crashing"

    def prepare(self, workload, arrays):
        def run():
            raise ValueError("bad shape")
        return run


class _Partial(_Wrong):
    name, title = "partial", "Partial"

    def supports(self, workload):
        return "no decode" if workload.decode else None

    def prepare(self, workload, arrays):
        return peers.FastattnRunner(1).prepare(workload, arrays)


class _Missing(_Wrong):
    name, title, modules = "missing", "Missing", ("surely_not_a_module_xyz",)

    def available(self):
        return peers.Peer.available(self)


def test_check_reports_each_failure(small_cases):
    workload, arrays, reference = small_cases[0]
    expected = {_Wrong: "wrong", _Unbuildable: "build failed", _Crashing: "run failed"}
    for cls, status in expected.items():
        call, cell = peers.check(cls(1), workload, arrays, reference)
        assert call is None and cell["status"] == status, cell
    decode = next(case for case in small_cases if case[0].decode)
    call, cell = peers.check(_Partial(1), *decode)
    assert call is None and cell == {"status": "n/a", "detail": "no decode"}


@pytest.fixture
def stub_baselines(monkeypatch):
    # the suite measures SGEMM and bandwidth; not what these tests are about
    monkeypatch.setattr(bench, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(bench, "memory_bandwidth_gbs", lambda *a, **k: 10.0)


def test_suite_table_shows_failed_wrong_and_missing_peers(monkeypatch, stub_baselines):
    fakes = (_Wrong, _Unbuildable, _Crashing, _Partial, _Missing)
    monkeypatch.setitem(peers.__dict__, "SYSTEM_CLASSES",
                        {"fastattn": peers.FastattnRunner, **{c.name: c for c in fakes}})
    workloads = [peers.SMALL[0], peers.SMALL[4]]                      # dense, decode
    result = peers.run_peer_suite(["small"], systems=[c.name for c in fakes], repeat=4,
                                  warmup=0, rounds=3, threads=1, progress=False,
                                  workloads=workloads)
    dense, decode = result["rows"]
    assert {name: cell["status"] for name, cell in dense["cells"].items()} == {
        "fastattn": "ok", "wrong": "wrong", "unbuildable": "build failed",
        "crashing": "run failed", "partial": "ok", "missing": "not installed"}
    assert decode["cells"]["partial"]["status"] == "n/a"
    assert dense["fastest_peer"] == "partial" and "ratio" in dense["cells"]["partial"]
    assert decode["fastest_peer"] is None and "target_met" not in decode
    assert "median_s" not in dense["cells"]["wrong"]                  # never timed
    assert len(dense["cells"]["partial"]["times_s"]) == 4                # over 3 rounds
    table = peers.format_markdown(result)
    for text in ("**wrong**", "**build failed**", "**run failed**", "not installed",
                 "RuntimeError: no kernel for this", "ValueError: bad shape", "none correct",
                 "Missing**: not installed, skipped"):
        assert text in table, text
    rows = [line for line in table.splitlines() if line.startswith("| dense")]
    assert rows and rows[0].count("|") == 6 + 5            # 5 peers + 5 fixed columns


def test_suite_command_writes_markdown_and_json(tmp_path, capsys, stub_baselines):
    status = bench.main(["--suite", "small", "--systems", "fastattn", "--repeat", "1",
                         "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert status == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "suite.json").read_text())
    assert [row["workload"] for row in result["rows"]] == [w.name for w in peers.SMALL]
    assert result["config"]["threads"] == 1 and result["config"]["repeat"] == 1
    assert result["load_average"]["before"] is not None
    for row in result["rows"]:
        assert row["cells"]["fastattn"]["status"] == "ok"
        assert len(row["cells"]["fastattn"]["times_s"]) == 1
        assert ("gbs" in row) == (row["shape"]["L"] == 1)
    table = (tmp_path / "suite.md").read_text()
    assert table.startswith("`python -m fastattn.bench --suite small")
    assert "| workload (float32) | fastattn ms | fastattn rate |" in table
    assert table.strip() in printed
    with pytest.raises(ValueError, match="unknown suites"):
        bench.run_suite(["nope"], progress=False)
    with pytest.raises(ValueError, match="unknown systems"):
        bench.run_suite(["small"], systems=["tensorflow"], progress=False)
