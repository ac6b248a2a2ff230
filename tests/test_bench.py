"""The benchmark code runs: the peer comparison and every asv benchmark, at tiny sizes.

No timings are asserted; these tests only catch benchmarks broken by API changes.
"""
import importlib
import importlib.util
import inspect
import itertools
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastattn import bench

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARK_PREFIXES = ("time_", "timeraw_", "mem_", "peakmem_", "track_")


def test_compare_tool_writes_json_and_plot(tmp_path):
    status = bench.main(["--lengths", "16,32", "--heads", "2", "--dim", "8", "--repeat", "1",
                         "--no-progress", "--out", str(tmp_path)])
    assert status == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    systems = result["config"]["systems"]
    assert systems[:2] == ["fastattn", "numpy"]
    assert len(result["rows"]) == 2 * len(bench.KINDS) * len(systems)
    for row in result["rows"]:
        assert row["median_s"] > 0 and row["gflops"] > 0
        assert row["max_rel_diff"] < 1e-3, row      # every system computes the same thing
    assert result["sgemm_gflops"] > 0 and result["memory_bandwidth_gbs"] > 0
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "bench.png").exists() == has_matplotlib


def test_compare_tool_skips_unfused_systems_past_the_memory_budget():
    result = bench.run_comparison([32], ["dense"], systems=["fastattn", "numpy"], heads=1,
                                  repeat=1, max_unfused_bytes=0, progress=False)
    fused, unfused = result["rows"]
    assert fused["median_s"] > 0
    assert unfused["median_s"] is None and "GiB" in unfused["skipped"]


def test_compare_tool_rejects_unknown_systems():
    with pytest.raises(ValueError, match="unknown systems"):
        bench.run_comparison([16], ["dense"], systems=["tensorflow"], progress=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compare_tool_half_dtypes(tmp_path, dtype):
    status = bench.main(["--lengths", "16,40", "--heads", "2", "--dim", "8", "--repeat", "1",
                         "--dtype", dtype, "--no-plot", "--no-progress", "--out", str(tmp_path)])
    assert status == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["config"]["dtype"] == dtype
    systems = result["config"]["systems"]
    # the default systems are the importable ones that compute in the dtype: not NumPy
    assert systems[0] == "fastattn" and "numpy" not in systems
    assert all(dtype in bench.SYSTEM_DTYPES[s] for s in systems)
    for row in result["rows"]:
        assert row["median_s"] > 0
        assert row["max_rel_diff"] < 2e-2, row     # two half roundings apart at most
    with pytest.raises(ValueError, match="do not compute in"):
        bench.run_comparison([16], ["dense"], systems=["fastattn", "numpy"], dtype=dtype,
                             progress=False)


@pytest.mark.parametrize("peer", ["onnxruntime", "openvino", "jax"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_optional_peers_compute_the_same_thing(peer, dtype, monkeypatch):
    # only where the peer is installed: fastattn never needs it
    pytest.importorskip(peer)
    # the machine baselines are not what this checks
    monkeypatch.setattr(bench, "sgemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(bench, "memory_bandwidth_gbs", lambda *a, **k: 10.0)
    if peer == "onnxruntime":
        pytest.importorskip("onnx")
    if dtype not in bench.SYSTEM_DTYPES[peer]:
        pytest.skip(f"{peer} has no {dtype} kernel")
    result = bench.run_comparison([16, 33], list(bench.KINDS), systems=["fastattn", peer],
                                  heads=2, dim=8, dtype=dtype, repeat=1, progress=False)
    tolerance = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for row in result["rows"]:
        assert row["median_s"] > 0 and row["max_rel_diff"] < tolerance, row


def test_python_dash_m_entry_point_and_compare_script_share_main():
    source = (BENCHMARKS / "compare.py").read_text()
    assert "from fastattn.bench import main" in source


def _benchmark_package():
    """Import benchmarks/ as the package ``benchmarks``, as asv does, without putting
    the repository root on sys.path (that would shadow the installed fastattn)."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", BENCHMARKS / "__init__.py", submodule_search_locations=[str(BENCHMARKS)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return sys.modules["benchmarks"]


def _benchmark_modules():
    package = _benchmark_package()
    return [importlib.import_module(f"benchmarks.{info.name}")
            for info in pkgutil.iter_modules(package.__path__) if info.name.startswith("bench_")]


def _benchmarks():
    """(id, owner class, function name, params) for every asv benchmark: the smallest
    value of each numeric parameter (sizes) with every value of each string one (kinds,
    variants), so every code path of the suite runs once, at a small size."""
    found = []
    for module in _benchmark_modules():
        for owner_name, owner in inspect.getmembers(module, inspect.isclass):
            if owner.__module__ != module.__name__:
                continue
            # test_params: what a benchmark whose string parameters are all full-size
            # workloads runs here instead (the same code paths at small shapes)
            params = getattr(owner, "test_params", None) or getattr(owner, "params", [])
            if params and not isinstance(params[0], (list, tuple)):
                params = [params]           # asv's single-parameter shorthand
            choices = [values if all(isinstance(v, str) for v in values) else values[:1]
                       for values in params]
            for name, _ in inspect.getmembers(owner, inspect.isfunction):
                if not name.startswith(BENCHMARK_PREFIXES):
                    continue
                for combination in itertools.product(*choices):
                    label = "-".join(map(str, combination))
                    found.append((f"{module.__name__}.{owner_name}.{name}[{label}]", owner, name,
                                  list(combination)))
        assert not [name for name, function in inspect.getmembers(module, inspect.isfunction)
                    if name.startswith(BENCHMARK_PREFIXES)], "keep benchmarks in classes"
    return found


BENCHMARK_CASES = _benchmarks()


def test_every_area_has_benchmarks():
    modules = {case[0].split(".")[1] for case in BENCHMARK_CASES}
    assert all(case[1] is not None for case in BENCHMARK_CASES)
    assert {"bench_sdpa", "bench_gqa", "bench_masked_softmax", "bench_multi_head_attention",
            "bench_sparse", "bench_paged", "bench_npu", "bench_peers"} <= modules
    kinds = {case[2].split("_")[0] for case in BENCHMARK_CASES}
    assert {"time", "peakmem", "track"} <= kinds
    for _, owner, name, _ in BENCHMARK_CASES:
        if name.startswith("track_"):
            assert getattr(getattr(owner, name), "unit", None), f"{name} has no unit"


@pytest.mark.parametrize("case", BENCHMARK_CASES, ids=lambda case: case[0])
def test_benchmark_runs_at_smallest_params(case):
    _, owner, name, params = case
    instance = owner()
    try:
        try:
            if hasattr(instance, "setup"):
                instance.setup(*params)
        except NotImplementedError as skip:      # asv's skip: feature or device missing
            pytest.skip(str(skip))
        try:
            getattr(instance, name)(*params)
        except NotImplementedError as skip:      # asv_runner's SkipNotImplemented
            pytest.skip(str(skip))
    finally:
        if hasattr(instance, "teardown"):        # asv calls it after a skip, too
            instance.teardown(*params)



def test_busy_machine_script_runs_and_stops_its_load(tmp_path):
    # benchmarks/busy_machine.py at a tiny setting: the table and JSON are complete and
    # no load process outlives it. Timings are not checked.
    script = _benchmark_package().__path__[0] + "/busy_machine.py"
    out = tmp_path / "busy.json"
    done = subprocess.run([sys.executable, script, "--quick", "--seconds", "0.05",
                           "--slice", "0.005", "--max-load-seconds", "30", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2t/1t attn" in done.stdout
    result = json.loads(out.read_text())
    assert [level["busy_processes"] for level in result["results"]] == [0, 1, 2]
    for level in result["results"]:
        assert set(level["cases"]) == {"attn t1", "attn t2", "matmul", "loop t1", "loop t2"}
        assert all(case["calls"] >= 2 for case in level["cases"].values())
        assert level["thread_ratio"]["ratio"] > 0


def test_busy_load_stops_its_processes():
    busy_machine = importlib.import_module("benchmarks.busy_machine")
    load = busy_machine.BusyLoad(2, seconds=30).start()
    processes = list(load.processes)
    assert all(p.poll() is None for p in processes)
    load.stop()
    assert all(p.poll() is not None for p in processes) and not load.processes
