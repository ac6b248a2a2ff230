"""asv benchmark suite of fastattn (see the Benchmarks section of README.md).

One module per area: ``bench_sdpa`` (dense, causal, masked, long sequences),
``bench_gqa``, ``bench_masked_softmax``, ``bench_multi_head_attention``,
``bench_scoring`` (additive / Luong rules), ``bench_sparse`` (each sparse and
linear variant), ``bench_paged`` (paged decode), ``bench_npu`` (the Ascend path),
``bench_peers`` (each CPU peer's time over fastattn's on the workloads of issue 20).
Shared data, sizes and machine baselines live in ``common``; ``compare.py`` is the
peer comparison (``python benchmarks/compare.py``), not an asv module.
"""
