"""fastattn.dask on Dask's local schedulers: graph sizes, and small computations.

The cluster targets of the Dask issue (overhead against the NumPy function on 2
worker processes, sequence parallelism at L=S=131072 within 1 GiB per worker,
scaling from 1 to 2 workers) need a ``distributed`` cluster and minutes: they are in
``benchmarks/dask_cluster.py``. Everything here is skipped when Dask is not
installed (the parameter lists do not depend on it).
"""
import numpy as np

from . import common
from .dask_cluster import critical_path


def _dask():
    """``(dask.array, fastattn.dask)``, or asv's skip when either is missing."""
    try:
        import dask.array as da
        import fastattn.dask as fd
    except ImportError as exc:
        raise common.SkipNotImplemented(f"needs fastattn.dask and Dask: {exc}") from None
    return da, fd


class DaskSequenceParallelGraph:
    """The issue's causal case, B=1 H=4 L=S=131072 E=64 float32 chunked along both
    lengths: building the graph, its task count and critical path (nothing computed)."""
    params = [[4096, 16384, 32768]]
    param_names = ["chunk"]

    def setup(self, chunk):
        da, self.fd = _dask()
        shape, chunks = (1, 4, 131072, 64), (1, 1, chunk, 64)
        self.qkv = [da.zeros(shape, chunks=chunks, dtype=np.float32, name=f"bench-{n}")
                    for n in "qkv"]

    def _build(self):
        return self.fd.scaled_dot_product_attention(*self.qkv, is_causal=True)

    def time_build_graph(self, chunk):
        self._build()

    def track_tasks(self, chunk):
        return len(self._build().__dask_graph__())
    track_tasks.unit = "tasks"

    def track_critical_path(self, chunk):
        return critical_path(dict(self._build().__dask_graph__()))
    track_critical_path.unit = "tasks"


class DaskLocalScheduler:
    """Self-attention B=1 H=8 L=S=2048 E=64 float32 through fastattn.dask on a local
    scheduler, by chunking (heads: 8 blocks; keys: 4 key chunks merged by lse; both)."""
    params = [["heads", "keys", "both"], ["sync", "threads"]]
    param_names = ["chunking", "scheduler"]

    def setup(self, chunking, scheduler):
        da, fd = _dask()
        self.q, self.k, self.v = common.qkv(1, common.HEADS, 2048, 2048)
        heads = 1 if chunking in ("heads", "both") else common.HEADS
        keys = 512 if chunking in ("keys", "both") else 2048
        q, k, v = (da.from_array(x, chunks=(1, heads, n, common.HEAD_DIM))
                   for x, n in ((self.q, 2048), (self.k, keys), (self.v, keys)))
        self.out = fd.scaled_dot_product_attention(q, k, v)
        self.scheduler = scheduler

    def time_compute(self, chunking, scheduler):
        self.out.compute(scheduler=self.scheduler)


class DaskVariants:
    """Local (window 256, causal) and causal linear attention, B=1 H=4 L=S=16384 E=64
    float32 in 4096-row chunks, on the synchronous scheduler."""
    params = [["local", "linear_causal"]]
    param_names = ["form"]

    def setup(self, form):
        da, fd = _dask()
        q, k, v = (da.from_array(x, chunks=(1, 4, 4096, common.HEAD_DIM))
                   for x in common.qkv(1, 4, 16384, 16384))
        self.out = (fd.local_attention(q, k, v, window=(256, 0)) if form == "local"
                    else fd.linear_attention(q, k, v, causal=True))

    def time_compute(self, form):
        self.out.compute(scheduler="sync")
