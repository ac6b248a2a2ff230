"""The decode step of a small batch while other processes keep the cores busy.

3 sequences of 44, 58 and 72 cached tokens, H=8 over H_kv=2, head_dim 32, float32,
T=1 (the case of benchmarks/busy_machine.py, which prints the whole picture). ``setup``
starts 0, 1 or 2 processes spinning a pure Python loop, ``teardown`` stops them (they
also stop by themselves if the benchmark process dies, and after a few minutes).

Targets (2 cores): with one busy process 2 threads take <= 1.1x the time of one
thread, with two busy processes <= 1.5x (``BusyThreadRatio``). Before the threading
was reworked the mean step took ~11x and ~450x longer at 2 threads than at 1: OpenMP
threads waiting for a core held by another process. Most calls stay fast and a few
take tens of milliseconds, so the ratio of medians (``track_thread_ratio``) can look
fine while the ratio of means (``track_thread_ratio_of_means``: total time per call,
what a serving loop pays) does not; both are tracked.
"""
from . import busy_machine, common

LOAD_SECONDS = 300          # the load's own deadline; asv's benchmark timeout is 120 s


class _Busy:
    def _start(self, busy_processes):
        common.require("PagedKVCache")
        common.require("paged_attention")
        self.decode, self.cache = busy_machine.decode_case()
        self.load = busy_machine.BusyLoad(busy_processes, seconds=LOAD_SECONDS)
        self.load.start()

    def teardown(self, *params):
        # asv calls teardown after a failed or skipped setup too
        if getattr(self, "load", None) is not None:
            self.load.stop()
            self.load = None


class BusyDecode(_Busy):
    """One decode step at ``num_threads`` with ``busy_processes`` spinning processes."""
    params = [[0, 1, 2], [1, 2]]
    param_names = ["busy_processes", "num_threads"]
    timeout = 120

    def setup(self, busy_processes, num_threads):
        self._start(busy_processes)

    def time_decode_step(self, busy_processes, num_threads):
        self.decode(num_threads)


class BusyThreadRatio(_Busy):
    """Decode step at 2 threads over 1 thread, measured interleaved (~1 s each)."""
    params = [[0, 1, 2]]
    param_names = ["busy_processes"]
    timeout = 120
    seconds = 1.0

    def setup(self, busy_processes):
        self._start(busy_processes)

    def _ratios(self):
        rounds = busy_machine.interleaved({"t1": lambda: self.decode(1),
                                           "t2": lambda: self.decode(2)},
                                          seconds=self.seconds, slice_seconds=0.02)
        return busy_machine.ratio_summary(rounds, "t2", "t1")

    def track_thread_ratio(self, busy_processes):
        return self._ratios()["ratio"]
    track_thread_ratio.unit = "x"

    def track_thread_ratio_of_means(self, busy_processes):
        return self._ratios()["mean_ratio"]
    track_thread_ratio_of_means.unit = "x"
