"""fastattn against the CPU peers on the workloads of issue 20 (``--suite peers``).

``PeerRatio.track_ratio`` is a peer's median time over fastattn's (above 1: fastattn is
faster) on one row of ``python -m fastattn.bench --suite peers``: PyTorch SDPA, ONNX
Runtime (MultiHeadAttention / GroupQueryAttention), OpenVINO SDPA and JAX, each with
fastattn's thread count. A peer that is not installed, or whose op cannot express the
workload, is skipped; one that fails to build or to run, or whose output disagrees with
the float64 reference, fails in ``setup`` (asv shows it failed, with the reason), so no
wrong answer is ever timed. The runners are those of ``fastattn._bench_peers``.
"""
import fastattn

from . import common

PEER_NAMES = ["torch", "onnxruntime", "openvino", "jax"]
ISSUE_WORKLOADS = ["dense", "causal", "padding", "bert", "head_dim_128", "gqa", "decode",
                   "decode_paged"]


def _peer_module():
    try:
        from fastattn import _bench_peers
    except ImportError:    # commits before the peer suite
        raise common.SkipNotImplemented("this fastattn has no peer suite") from None
    return _bench_peers


class PeerRatio:
    """One peer on one row of the issue's table: its time over fastattn's."""
    params = [ISSUE_WORKLOADS, PEER_NAMES]
    param_names = ["workload", "peer"]
    # what tests/test_bench.py runs instead of ``params``: the same kinds at small shapes
    test_params = [["small_" + name for name in ("dense", "causal", "padding", "gqa",
                                                 "decode", "decode_paged")], PEER_NAMES]
    timeout = 300

    def setup(self, workload, peer):
        peers = _peer_module()
        suite = {w.name: w for w in peers.SUITES["peers"]}
        suite.update({"small_" + w.name: w for w in peers.SMALL})
        self.workload = suite[workload]
        threads = fastattn.get_num_threads()
        self.runners = [peers.FastattnRunner(threads), peers.SYSTEM_CLASSES[peer](threads)]
        if not self.runners[1].available():
            raise common.SkipNotImplemented(f"{peer} is not installed")
        arrays = peers.workload_arrays(self.workload)
        reference = peers.reference_output(self.workload, arrays)
        self.calls = []
        for runner in self.runners:
            call, cell = peers.check(runner, self.workload, arrays, reference)
            if cell["status"] == "n/a":
                raise common.SkipNotImplemented(f"{runner.name}: {cell['detail']}")
            if call is None:
                raise RuntimeError(f"{runner.name} on {workload}: {cell['status']}"
                                   + (f" ({cell['detail']})" if cell.get("detail") else ""))
            self.calls.append(call)

    def teardown(self, workload, peer):
        for runner in getattr(self, "runners", []):
            runner.close()

    def track_ratio(self, workload, peer):
        mine, theirs = self.calls
        fastattn_time = common.median_seconds(mine)
        return common.median_seconds(theirs) / fastattn_time
    track_ratio.unit = "x fastattn's time"
