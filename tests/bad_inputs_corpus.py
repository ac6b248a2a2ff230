"""The bad-input corpus (issue 14): a table of wrong calls of every public function.

``cases()`` returns ``(case_id, call, exception type, word)`` rows: ``call()`` must
raise that exception type at once, with ``word`` in its message (the argument it is
about). tests/test_bad_inputs.py runs the table in child processes, so that an
interpreter crash fails a test instead of ending the run.

Rows are generated: every array argument of every function gets the same set of bad
values (complex, bool, strings, objects, None, ragged lists, long double, wrong rank,
mismatched sizes or batches), every common keyword its bad values (``num_threads``,
``scale``, ``device``, ...), and each function its own (windows, strides, block
sizes, layouts, tables).
"""
import numpy as np

import fastattn

# the exceptions a bad call may raise: named, documented types, never the internal
# AttributeError / IndexError / KeyError of a missed check (numpy's AxisError, a
# ValueError and IndexError, is accepted as the documented error of a bad axis)
ALLOWED = (TypeError, ValueError, MemoryError)
AxisError = getattr(np, "exceptions", np).AxisError


def _rng():
    return np.random.default_rng(14)


class Case:
    __slots__ = ("id", "call", "exc", "word")

    def __init__(self, id_, call, exc, word):
        self.id, self.call, self.exc, self.word = id_, call, exc, word


def _bad_arrays(good):
    """(label, value, exception, needs-the-name) for one array argument whose good
    value is ``good``."""
    g = np.asarray(good)
    out = [
        ("complex", g.astype(np.complex128), TypeError),
        ("bool", np.ones(g.shape, bool), TypeError),
        ("str", np.full(g.shape, "x"), TypeError),
        ("object", np.full(g.shape, None, dtype=object), TypeError),
        ("None", None, TypeError),
        ("longdouble", g.astype(np.longdouble), TypeError),
        ("ragged", [[1.0, 2.0], [3.0]], ValueError),
        ("datetime", np.zeros(g.shape, "datetime64[s]"), TypeError),
    ]
    if g.ndim >= 2:
        out.append(("0-d", np.float64(1.0), ValueError))
    return out


def _variants(name, fn, base, arrays, extra=(), skip=()):
    """Cases of ``fn(**base)`` with one argument replaced at a time."""
    rows = []
    for arg in arrays:
        for label, value, exc in _bad_arrays(base[arg]):
            if (arg, label) in skip:
                continue
            rows.append((f"{name}-{arg}-{label}", fn, {**base, arg: value}, exc, arg))
    for arg, label, value, exc, word in extra:
        rows.append((f"{name}-{arg}-{label}", fn, {**base, arg: value}, exc, word))
    return rows


def _threads(name):
    return [("num_threads", "zero", 0, ValueError, "num_threads"),
            ("num_threads", "negative", -2, ValueError, "num_threads"),
            ("num_threads", "float", 1.5, TypeError, "num_threads"),
            ("num_threads", "str", "2", TypeError, "num_threads")]


def _scale():
    return [("scale", "nan", np.nan, ValueError, "scale"),
            ("scale", "inf", np.inf, ValueError, "scale"),
            ("scale", "str", "a", TypeError, "scale"),
            ("scale", "complex", 1j, TypeError, "scale"),
            ("scale", "array", np.ones(3), TypeError, "scale")]


def _device():
    return [("device", "gpu", "gpu", ValueError, "device"),
            ("device", "int", 0, ValueError, "device")]


def cases():
    rng = _rng()
    r = lambda *s: rng.standard_normal(s)        # noqa: E731
    rows = []
    F = fastattn

    # ---- dense attention ----------------------------------------------------------
    q, k, v = r(2, 3, 8, 4), r(2, 3, 10, 4), r(2, 3, 10, 5)
    base = dict(query=q, key=k, value=v)
    sdpa = F.scaled_dot_product_attention
    rows += _variants("sdpa", sdpa, base, ["query", "key", "value"], extra=[
        ("key", "feature-mismatch", r(2, 3, 10, 3), ValueError, "key"),
        ("value", "length-mismatch", r(2, 3, 9, 5), ValueError, "value"),
        ("key", "batch-mismatch", r(4, 3, 10, 4), ValueError, "batch"),
        ("query", "no-features", r(2, 3, 8, 0), ValueError, "feature"),
        ("attn_mask", "int", np.ones((8, 10), int), TypeError, "attn_mask"),
        ("attn_mask", "complex", np.ones((8, 10), complex), TypeError, "attn_mask"),
        ("attn_mask", "str", np.full((8, 10), "a"), TypeError, "attn_mask"),
        ("attn_mask", "shape", np.ones((8, 9), bool), ValueError, "attn_mask"),
        ("attn_mask", "batch", np.ones((5, 8, 10), bool), ValueError, "attn_mask"),
        ("attn_mask", "ragged", [[True], [True, False]], ValueError, "attn_mask"),
        ("causal_alignment", "bad", "center", ValueError, "causal_alignment"),
        ("causal_alignment", "none", None, ValueError, "causal_alignment"),
        ("out", "shape", np.zeros((2, 3, 8, 4)), ValueError, "out"),
        ("out", "dtype", np.zeros((2, 3, 8, 5), np.float32), TypeError, "out"),
        ("out", "list", [[0.0]], TypeError, "out"),
        ("out", "readonly", np.broadcast_to(np.zeros(5), (2, 3, 8, 5)), ValueError, "out"),
        *_threads("sdpa"), *_scale(), *_device(),
    ])
    rows.append(("sdpa-gqa-heads", sdpa, dict(query=r(2, 4, 8, 4), key=r(2, 3, 10, 4),
                                               value=r(2, 3, 10, 5), enable_gqa=True),
                 ValueError, "heads"))

    # ---- softmax and weights -------------------------------------------------------
    x = r(3, 4, 5)
    for name, fn in (("masked_softmax", F.masked_softmax), ("log_softmax", F.log_softmax)):
        rows += _variants(name, fn, dict(x=x), ["x"], skip={("x", "0-d")}, extra=[
            ("x", "0-d", np.float64(1.0), ValueError, "x"),
            ("mask", "int", np.ones(5, int), TypeError, "mask"),
            ("mask", "complex", np.ones(5, complex), TypeError, "mask"),
            ("mask", "enlarging", np.ones((2, 3, 4, 5), bool), ValueError, "mask"),
            ("mask", "shape", np.ones(4, bool), ValueError, "mask"),
            ("mask", "ragged", [[True], [False, True]], ValueError, "mask"),
            ("axis", "range", 3, AxisError, "axis"),
            ("axis", "negative-range", -4, AxisError, "axis"),
            ("axis", "float", 1.0, TypeError, "axis"),
            ("axis", "str", "last", TypeError, "axis"),
            ("axis", "tuple", (0, 1), TypeError, "axis"),
            ("out", "shape", np.zeros((3, 4)), ValueError, "out"),
            ("out", "dtype", np.zeros((3, 4, 5), np.float32), TypeError, "out"),
            ("out", "strided", np.zeros((3, 4, 10))[..., ::2], ValueError, "out"),
            ("out", "list", [0.0], TypeError, "out"),
            *_threads(name), *_scale()[:4],
        ])
    aw = F.attention_weights
    rows += _variants("attention_weights", aw, dict(query=q, key=k), ["query", "key"], extra=[
        ("key", "feature-mismatch", r(2, 3, 10, 3), ValueError, "key"),
        ("key", "batch-mismatch", r(4, 3, 10, 4), ValueError, "batch"),
        ("attn_mask", "int", np.ones((8, 10), int), TypeError, "attn_mask"),
        ("attn_mask", "shape", np.ones((7, 10), bool), ValueError, "attn_mask"),
        ("causal_alignment", "bad", "middle", ValueError, "causal_alignment"),
        *_threads("aw"), *_scale(),
    ])

    # ---- block-sparse ---------------------------------------------------------------
    layout = F.BlockLayout.from_rule((8, 10), 4, window=(2, 2))
    bsa = F.block_sparse_attention
    rows += _variants("block_sparse", bsa, dict(query=q, key=k, value=v, layout=layout),
                      ["query", "key", "value"], extra=[
        ("layout", "none", None, TypeError, "layout"),
        ("layout", "mask", np.ones((8, 10), bool), TypeError, "layout"),
        ("layout", "other-shape", F.BlockLayout.from_rule((9, 10), 4), ValueError, "layout"),
        ("layout", "heads", F.BlockLayout.from_mask(np.ones((5, 8, 10), bool), 4),
         ValueError, "batch"),
        *_threads("bsa"), *_scale(),
    ])
    BL = F.BlockLayout
    bl_base = dict(shape=(8, 10), block_size=4, indptr=[0, 1, 2], indices=[0, 1])
    rows += [(f"BlockLayout-{lab}", BL, {**bl_base, **kw}, exc, word) for lab, kw, exc, word in [
        ("shape-negative", dict(shape=(-1, 10)), ValueError, "shape"),
        ("shape-float", dict(shape=(8.0, 10)), TypeError, "shape"),
        ("shape-three", dict(shape=(8, 10, 2)), ValueError, "shape"),
        ("shape-none", dict(shape=None), TypeError, "shape"),
        ("block-zero", dict(block_size=0), ValueError, "block_size"),
        ("block-float", dict(block_size=2.5), TypeError, "block_size"),
        ("block-triple", dict(block_size=(2, 2, 2)), ValueError, "block_size"),
        ("indptr-float", dict(indptr=[0.0, 1.0, 2.0]), TypeError, "indptr"),
        ("indptr-length", dict(indptr=[0, 1]), ValueError, "indptr"),
        ("indptr-decreasing", dict(indptr=[0, 2, 1]), ValueError, "indptr"),
        ("indptr-beyond", dict(indptr=[0, 1, 5]), ValueError, "indptr"),
        ("indptr-3d", dict(indptr=np.zeros((1, 1, 3), int)), ValueError, "indptr"),
        ("indices-range", dict(indices=[0, 7]), ValueError, "indices"),
        ("indices-negative", dict(indices=[-1, 0]), ValueError, "indices"),
        ("indices-2d", dict(indices=[[0, 1]]), ValueError, "indices"),
        ("indices-str", dict(indices=["a", "b"]), TypeError, "indices"),
        ("indices-unsorted", dict(indptr=[0, 2, 2], indices=[1, 0]), ValueError, "increasing"),
        ("window-negative", dict(window=(-1, 2)), ValueError, "window"),
        ("window-float", dict(window=1.5), TypeError, "window"),
        ("window-triple", dict(window=(1, 2, 3)), ValueError, "window"),
        ("dilation-zero", dict(dilation=0), ValueError, "dilation"),
        ("dilation-str", dict(dilation="2"), TypeError, "dilation"),
        ("segment-zero", dict(segment=0), ValueError, "segment"),
        ("global-query-shape", dict(global_query=np.ones(5, bool)), ValueError, "global_query"),
        ("global-query-range", dict(global_query=[20]), ValueError, "global_query"),
        ("global-key-float", dict(global_key=[0.5]), TypeError, "global_key"),
        ("mask-int", dict(mask=np.ones((8, 10), int)), TypeError, "mask"),
        ("mask-shape", dict(mask=np.ones((8, 9), bool)), ValueError, "mask"),
        ("mask-4d", dict(mask=np.ones((1, 1, 8, 10), bool)), ValueError, "mask"),
    ]]
    rows += [
        ("BlockLayout.from_mask-int", BL.from_mask, dict(mask=np.ones((8, 10), int)),
         ValueError, "mask"),
        ("BlockLayout.from_mask-1d", BL.from_mask, dict(mask=np.ones(8, bool)), ValueError,
         "mask"),
        ("BlockLayout.from_mask-block", BL.from_mask, dict(mask=np.ones((8, 10), bool),
                                                           block_size=0), ValueError,
         "block_size"),
        ("BlockLayout.from_blocks-1d", BL.from_blocks, dict(block_mask=np.ones(3, bool),
                                                            shape=(8, 10), block_size=4),
         ValueError, "block_mask"),
        ("BlockLayout.from_blocks-fit", BL.from_blocks, dict(block_mask=np.ones((3, 3), bool),
                                                             shape=(8, 10), block_size=4),
         ValueError, "block_mask"),
        ("BlockLayout.from_blocks-str", BL.from_blocks, dict(block_mask=np.full((2, 3), "a"),
                                                             shape=(8, 10), block_size=4),
         TypeError, "block_mask"),
        ("BlockLayout.from_rule-shape", BL.from_rule, dict(shape=(8,), block_size=4),
         ValueError, "shape"),
        ("BlockLayout.from_rule-block", BL.from_rule, dict(shape=(8, 10), block_size=-4),
         ValueError, "block_size"),
        ("BlockLayout.from_rule-window", BL.from_rule, dict(shape=(8, 10), window=(1, -1)),
         ValueError, "window"),
        ("BlockLayout.from_rule-unknown", BL.from_rule, dict(shape=(8, 10), windows=2),
         TypeError, "windows"),
    ]

    # ---- sparse patterns --------------------------------------------------------------
    q1, k1, v1 = r(8, 4), r(10, 4), r(10, 5)
    pbase = dict(query=q1, key=k1, value=v1)
    rows += _variants("local", F.local_attention, {**pbase, "window": 2}, ["query", "key", "value"],
                      extra=[("window", "negative", -1, ValueError, "window"),
                             ("window", "float", 2.5, TypeError, "window"),
                             ("window", "str", "2", TypeError, "window"),
                             ("window", "none", None, TypeError, "window"),
                             ("dilation", "zero", 0, ValueError, "dilation"),
                             ("dilation", "float", 1.5, TypeError, "dilation"),
                             ("global_tokens", "range", [10], ValueError, "global_tokens"),
                             ("global_tokens", "float", [0.5], TypeError, "global_tokens"),
                             ("global_tokens", "mask-shape", np.ones(3, bool), ValueError,
                              "global_tokens"),
                             *_threads("local"), *_scale()[:3]])
    rows += _variants("strided", F.strided_attention, {**pbase, "stride": 2},
                      ["query", "key", "value"],
                      extra=[("stride", "zero", 0, ValueError, "stride"),
                             ("stride", "float", 2.0, TypeError, "stride"),
                             ("mode", "bad", "dense", ValueError, "mode"),
                             ("summary", "zero", 0, ValueError, "summary"),
                             *_threads("strided")])
    rows.append(("strided-summary-float", F.strided_attention,
                 {**pbase, "stride": 4, "mode": "fixed", "summary": 1.5}, TypeError, "summary"))
    rows += _variants("global", F.global_attention, {**pbase, "global_tokens": [0]},
                      ["query", "key", "value"],
                      extra=[("global_tokens", "range", [-11], ValueError, "global_tokens"),
                             ("global_tokens", "str", ["a"], TypeError, "global_tokens"),
                             ("window", "negative", (0, -3), ValueError, "window"),
                             *_threads("global")])
    rows += _variants("longformer", F.longformer_attention,
                      {**pbase, "window": 2, "global_tokens": [0]}, ["query", "key", "value"],
                      extra=[("window", "negative", -2, ValueError, "window"),
                             ("global_tokens", "range", [99], ValueError, "global_tokens"),
                             ("dilation", "negative", -1, ValueError, "dilation"),
                             *_threads("longformer")])
    sq = r(2, 16, 4)
    bbase = dict(query=sq, key=sq, value=sq)
    rows += _variants("bigbird", F.bigbird_attention, bbase, ["query", "key", "value"], extra=[
        ("key", "not-self", r(2, 12, 4), ValueError, "value"),
        ("block_size", "zero", 0, ValueError, "block_size"),
        ("block_size", "float", 4.0, TypeError, "block_size"),
        ("num_random_blocks", "negative", -1, ValueError, "num_random_blocks"),
        ("num_random_blocks", "float", 1.5, TypeError, "num_random_blocks"),
        ("num_window_blocks", "str", "3", TypeError, "num_window_blocks"),
        ("num_global_blocks", "negative", -1, ValueError, "num_global_blocks"),
        ("rng", "str", "seed", TypeError, "rng"),
        *_threads("bigbird"), *_scale()[:2]])
    rows += [(f"bigbird_layout-{lab}", F.bigbird_layout, {"length": 16, **kw}, exc, word)
             for lab, kw, exc, word in [
                 ("length-negative", dict(length=-1), ValueError, "length"),
                 ("length-float", dict(length=16.5), TypeError, "length"),
                 ("length-str", dict(length="16"), TypeError, "length"),
                 ("heads-zero", dict(num_heads=0), ValueError, "num_heads"),
                 ("block-zero", dict(block_size=0), ValueError, "block_size"),
                 ("random-float", dict(num_random_blocks=0.5), TypeError, "num_random_blocks")]]

    # ---- content-based ------------------------------------------------------------------
    lq, lv = r(2, 12, 4), r(2, 12, 3)
    lbase = dict(query=lq, value=lv, bucket_size=4)
    rows += _variants("lsh", F.lsh_attention, lbase, ["query", "value"], extra=[
        ("value", "length", r(2, 11, 3), ValueError, "value"),
        ("n_hashes", "zero", 0, ValueError, "n_hashes"),
        ("n_hashes", "float", 1.5, TypeError, "n_hashes"),
        ("bucket_size", "zero", 0, ValueError, "bucket_size"),
        ("chunks_before", "negative", -1, ValueError, "chunks_before"),
        ("n_buckets", "zero", 0, ValueError, "n_buckets"),
        ("buckets", "float", np.zeros((2, 1, 12)), TypeError, "buckets"),
        ("buckets", "shape", np.zeros((2, 1, 11), int), ValueError, "buckets"),
        ("buckets", "negative", -np.ones((2, 1, 12), int), ValueError, "buckets"),
        ("rng", "str", "x", TypeError, "rng"),
        *_threads("lsh")])
    cbase = dict(query=q, key=k, value=v, clusters=3)
    rows += _variants("clustered", F.clustered_attention, cbase, ["query", "key", "value"], extra=[
        ("clusters", "zero", 0, ValueError, "clusters"),
        ("clusters", "too-many", 9, ValueError, "clusters"),
        ("clusters", "float", 2.0, TypeError, "clusters"),
        ("clusters", "none", None, TypeError, "clusters"),
        ("iterations", "zero", 0, ValueError, "iterations"),
        ("topk", "zero", 0, ValueError, "topk"),
        ("topk", "too-many", 11, ValueError, "topk"),
        ("assignments", "range", np.full((2, 3, 8), 3), ValueError, "assignments"),
        ("assignments", "float", np.zeros((2, 3, 8)), TypeError, "assignments"),
        ("assignments", "shape", np.zeros((2, 3, 7), int), ValueError, "assignments"),
        ("rng", "str", "x", TypeError, "rng"),
        *_threads("clustered"), *_scale()[:3]])
    sbase = dict(query=sq, key=sq, value=sq, block_size=4)
    rows += _variants("sinkhorn_attention", F.sinkhorn_attention, sbase, ["query", "key", "value"],
                      extra=[("block_size", "zero", 0, ValueError, "block_size"),
                             ("block_size", "none", None, TypeError, "block_size"),
                             ("n_iters", "negative", -1, ValueError, "n_iters"),
                             ("temperature", "zero", 0.0, ValueError, "temperature"),
                             ("temperature", "nan", np.nan, ValueError, "temperature"),
                             ("temperature", "str", "hot", TypeError, "temperature"),
                             ("key", "length", r(2, 15, 4), ValueError, "key"),
                             *_threads("sinkhorn"), *_scale()[:2]])
    rows += _variants("sinkhorn", F.sinkhorn, dict(log_alpha=r(3, 3)), ["log_alpha"], extra=[
        ("log_alpha", "1-d", np.ones(3), ValueError, "log_alpha"),
        ("log_alpha", "non-square", np.ones((3, 4)), ValueError, "log_alpha"),
        ("log_alpha", "nan", np.full((2, 2), np.nan), ValueError, "log_alpha"),
        ("n_iters", "negative", -1, ValueError, "n_iters"),
        ("n_iters", "float", 2.5, TypeError, "n_iters")])

    # ---- low-rank --------------------------------------------------------------------------
    rows += _variants("linear", F.linear_attention, dict(query=q, key=k, value=v),
                      ["query", "key", "value"], extra=[
        ("feature_map", "name", "relu", ValueError, "feature_map"),
        ("feature_map", "number", 3, TypeError, "feature_map"),
        ("feature_map", "bad-shape", lambda a: a[..., :1, :], ValueError, "feature_map"),
        ("causal", "lengths", True, ValueError, "L == S"),
        ("eps", "nan", np.nan, ValueError, "eps"),
        ("eps", "negative", -1e-3, ValueError, "eps"),
        ("eps", "str", "tiny", TypeError, "eps"),
        *_threads("linear")])
    rows += _variants("performer", F.performer_attention, dict(query=q, key=k, value=v),
                      ["query", "key", "value"], extra=[
        ("num_features", "zero", 0, ValueError, "num_features"),
        ("num_features", "float", 8.5, TypeError, "num_features"),
        ("features", "shape", np.ones((5, 3)), ValueError, "features"),
        ("features", "complex", np.ones((5, 4), complex), TypeError, "features"),
        ("features", "empty", np.ones((0, 4)), ValueError, "features"),
        ("rng", "str", "x", TypeError, "rng"),
        *_threads("performer"), *_scale()[:3]])
    rows += [(f"performer_features-{lab}", F.performer_features, {"dim": 4, **kw}, exc, word)
             for lab, kw, exc, word in [
                 ("dim-zero", dict(dim=0), ValueError, "dim"),
                 ("dim-float", dict(dim=4.0), TypeError, "dim"),
                 ("num-negative", dict(num_features=-3), ValueError, "num_features"),
                 ("num-str", dict(num_features="8"), TypeError, "num_features"),
                 ("rng-str", dict(rng="x"), TypeError, "rng")]]
    e_proj = r(4, 10)
    rows += _variants("linformer", F.linformer_attention,
                      dict(query=q, key=k, value=v, e_proj=e_proj),
                      ["query", "key", "value", "e_proj"], extra=[
        ("e_proj", "length", r(4, 9), ValueError, "e_proj"),
        ("e_proj", "1-d", r(10), ValueError, "e_proj"),
        ("f_proj", "rows", r(3, 10), ValueError, "f_proj"),
        ("f_proj", "complex", np.ones((4, 10), complex), TypeError, "f_proj"),
        ("e_proj", "batch", r(5, 4, 10), ValueError, "e_proj"),
        *_threads("linformer"), *_scale()[:3]])
    sv = r(2, 10, 5)
    rows += _variants("synthesizer", F.synthesizer_attention,
                      dict(value=sv, weights=r(10, 10)), ["value", "weights"], extra=[
        ("weights", "small", r(5, 5), ValueError, "weights"),
        ("mode", "bad", "learned", ValueError, "mode"),
        *_threads("synthesizer")], skip={("weights", "None")})
    rows.append(("synthesizer-factorized-single", F.synthesizer_attention,
                 dict(value=sv, weights=r(10, 10), mode="factorized"), ValueError, "weights"))
    rows.append(("synthesizer-dense-no-query", F.synthesizer_attention,
                 dict(value=sv, weights=(r(4, 3), r(3), r(3, 10), r(10)), mode="dense"),
                 ValueError, "query"))
    rows.append(("synthesizer-weights-none", F.synthesizer_attention,
                 dict(value=sv, weights=None), TypeError, "weights"))

    # ---- masks, positions, heads -----------------------------------------------------------
    rows += [(f"causal_mask-{lab}", F.causal_mask, kw, exc, word) for lab, kw, exc, word in [
        ("L-negative", dict(L=-1), ValueError, "L"),
        ("L-float", dict(L=2.5), TypeError, "L"),
        ("S-str", dict(L=3, S="4"), TypeError, "S"),
        ("S-negative", dict(L=3, S=-4), ValueError, "S"),
        ("alignment", dict(L=3, alignment="left"), ValueError, "alignment")]]
    rows += [(f"padding_mask-{lab}", F.padding_mask, kw, exc, word) for lab, kw, exc, word in [
        ("float", dict(lengths=[1.5, 2.0], S=4), TypeError, "lengths"),
        ("2d", dict(lengths=[[1, 2]], S=4), ValueError, "lengths"),
        ("range", dict(lengths=[5], S=4), ValueError, "lengths"),
        ("negative", dict(lengths=[-1], S=4), ValueError, "lengths"),
        ("S-negative", dict(lengths=[1], S=-1), ValueError, "S"),
        ("S-float", dict(lengths=[1], S=4.0), TypeError, "S"),
        ("none", dict(lengths=None, S=4), TypeError, "lengths")]]
    rows += [(f"combine_masks-{lab}", lambda *m: F.combine_masks(*m), kw, exc, word)
             for lab, kw, exc, word in []]
    for lab, masks, exc, word in [
            ("int", (np.ones(3, int), np.ones(3, bool)), TypeError, "masks"),
            ("shapes", (np.ones((2, 3), bool), np.ones((4, 3), bool)), ValueError, "broadcast"),
            ("complex", (np.ones(3, complex),), TypeError, "masks"),
            ("str", (np.full(3, "a"),), TypeError, "masks"),
            ("ragged", ([[True], [True, False]],), ValueError, "masks")]:
        rows.append((f"combine_masks-{lab}", (lambda ms: lambda: F.combine_masks(*ms))(masks),
                     {}, exc, word))
    spe = F.sinusoidal_positional_encoding
    rows += [(f"sinusoidal-{lab}", spe, {"length": 4, "dim": 8, **kw}, exc, word)
             for lab, kw, exc, word in [
                 ("length-negative", dict(length=-1), ValueError, "length"),
                 ("length-float", dict(length=4.5), TypeError, "length"),
                 ("dim-negative", dict(dim=-2), ValueError, "dim"),
                 ("dim-float", dict(dim=8.0), TypeError, "dim"),
                 ("base-zero", dict(base=0.0), ValueError, "base"),
                 ("base-nan", dict(base=np.nan), ValueError, "base"),
                 ("base-str", dict(base="x"), TypeError, "base"),
                 ("dtype-int", dict(dtype=np.int32), TypeError, "dtype"),
                 ("dtype-bad", dict(dtype="nonsense"), TypeError, "dtype")]]
    rx = r(2, 5, 8)
    rows += _variants("apply_rotary", F.apply_rotary, dict(x=rx, positions=np.arange(5)), ["x"],
                      extra=[("x", "odd", r(2, 5, 7), ValueError, "x"),
                             ("positions", "shape", np.arange(4), ValueError, "positions"),
                             ("positions", "complex", np.ones(5, complex), TypeError,
                              "positions"),
                             ("positions", "str", np.full(5, "a"), TypeError, "positions"),
                             ("base", "negative", -1.0, ValueError, "base"),
                             ("base", "str", "x", TypeError, "base"),
                             ("layout", "bad", "split", ValueError, "layout")],
                      skip={("x", "0-d")})
    rows += _variants("split_heads", F.split_heads, dict(x=r(2, 5, 8), num_heads=2), ["x"],
                      extra=[("num_heads", "divide", 3, ValueError, "num_heads"),
                             ("num_heads", "zero", 0, ValueError, "num_heads"),
                             ("num_heads", "float", 2.0, TypeError, "num_heads"),
                             ("x", "1-d", r(8), ValueError, "x")],
                      skip={("x", "0-d"), ("x", "None")} | {("x", lab) for lab in
                                             ("complex", "bool", "str", "object", "longdouble",
                                              "datetime")})
    rows.append(("split_heads-x-None", F.split_heads, dict(x=None, num_heads=2), ValueError, "x"))
    rows += [("merge_heads-2d", F.merge_heads, dict(x=r(5, 8)), ValueError, "x"),
             ("merge_heads-none", F.merge_heads, dict(x=None), ValueError, "x"),
             ("merge_heads-ragged", F.merge_heads, dict(x=[[[1.0]], [[1.0, 2.0]]]), ValueError, "x")]

    # ---- multi-head --------------------------------------------------------------------------
    mx = r(2, 5, 8)
    mw = {n: r(8, 8) / 4 for n in ("q_weight", "k_weight", "v_weight", "out_weight")}
    mbase = dict(query=mx, key=mx, value=mx, num_heads=2, **mw)
    mha = F.multi_head_attention
    rows += _variants("mha", mha, mbase, ["query", "key", "value", "q_weight", "k_weight",
                                          "v_weight", "out_weight"], extra=[
        ("num_heads", "divide", 3, ValueError, "num_heads"),
        ("num_heads", "zero", 0, ValueError, "num_heads"),
        ("num_heads", "float", 2.0, TypeError, "num_heads"),
        ("num_kv_heads", "divide", 3, ValueError, "num_kv_heads"),
        ("q_weight", "in-features", r(8, 7), ValueError, "q_weight"),
        ("out_weight", "in-features", r(8, 6), ValueError, "out_weight"),
        ("q_bias", "shape", r(7), ValueError, "q_bias"),
        ("out_bias", "complex", np.ones(8, complex), TypeError, "out_bias"),
        ("value", "length", r(2, 4, 8), ValueError, "value"),
        ("key", "batch", r(3, 5, 8), ValueError, "batch"),
        ("attn_mask", "int", np.ones((5, 5), int), TypeError, "attn_mask"),
        ("attn_mask", "shape", np.ones((5, 4), bool), ValueError, "attn_mask"),
        ("key_padding_mask", "float", np.ones((2, 5)), TypeError, "key_padding_mask"),
        ("key_padding_mask", "shape", np.ones((2, 4), bool), ValueError, "key_padding_mask"),
        *_threads("mha"), *_scale()[:3], *_device()])
    MHA = F.MultiHeadAttention
    rows += [(f"MultiHeadAttention-{lab}", MHA, {"embed_dim": 8, "num_heads": 2, **kw}, exc, word)
             for lab, kw, exc, word in [
                 ("embed-zero", dict(embed_dim=0), ValueError, "embed_dim"),
                 ("embed-float", dict(embed_dim=8.0), TypeError, "embed_dim"),
                 ("heads-divide", dict(num_heads=3), ValueError, "num_heads"),
                 ("kv-divide", dict(num_kv_heads=3), ValueError, "num_kv_heads"),
                 ("kdim-zero", dict(kdim=0), ValueError, "kdim"),
                 ("vdim-str", dict(vdim="8"), TypeError, "vdim"),
                 ("dtype-int", dict(dtype=np.int32), TypeError, "dtype"),
                 ("dtype-complex", dict(dtype=complex), TypeError, "dtype"),
                 ("dtype-bool", dict(dtype=bool), TypeError, "dtype"),
                 ("dtype-str", dict(dtype="float17"), TypeError, "dtype"),
                 ("rng-str", dict(rng="x"), TypeError, "rng")]]
    layer = MHA(8, 2, rng=0)
    rows += [("MultiHeadAttention.call-complex", layer, dict(query=np.ones((5, 8), complex)),
              TypeError, "query"),
             ("MultiHeadAttention.call-features", layer, dict(query=r(5, 7)), ValueError,
              "q_weight"),
             ("MultiHeadAttention.call-kwarg", layer, dict(query=r(5, 8), num_heads=2),
              TypeError, "num_heads")]
    sd = {"in_proj_weight": r(24, 8), "out_proj.weight": r(8, 8)}
    rows += [("from_torch_state_dict-missing", MHA.from_torch_state_dict,
              dict(state_dict={"out_proj.weight": r(8, 8)}, num_heads=2), KeyError,
              "state_dict has no"),                     # documented: KeyError
             ("from_torch_state_dict-heads", MHA.from_torch_state_dict,
              dict(state_dict=sd, num_heads=3), ValueError, "num_heads")]

    # ---- classic scoring -----------------------------------------------------------------------
    hq, hk, hv = r(2, 5, 4), r(2, 6, 4), r(2, 6, 3)
    for name, fn, weights, warrays in [
            ("additive", F.additive_attention, dict(w_q=r(7, 4), w_k=r(7, 4), v=r(7)),
             ["w_q", "w_k", "v"]),
            ("concat", F.concat_attention, dict(w=r(7, 8), v=r(7)), ["w", "v"]),
            ("general", F.general_attention, dict(w=r(4, 4)), ["w"]),
            ("dot", F.dot_attention, {}, [])]:
        extra = [("mask", "int", np.ones((5, 6), int), TypeError, "mask"),
                 ("mask", "shape", np.ones((5, 5), bool), ValueError, "mask"),
                 ("key", "features", r(2, 6, 3), ValueError, "key"),
                 ("value", "length", r(2, 5, 3), ValueError, "value"),
                 *_threads(name)]
        if weights:
            w0 = warrays[0]
            extra.append((w0, "shape", r(7, 9), ValueError, w0))
        rows += _variants(name, fn, dict(query=hq, key=hk, value=hv, **weights),
                          ["query", "key", "value"] + warrays, extra=extra,
                          skip={(w, "0-d") for w in warrays} | {(w, "ragged") for w in warrays})

    # ---- paged ---------------------------------------------------------------------------------
    pq = r(2, 4, 1, 8)
    kb, vb = r(6, 2, 4, 8), r(6, 2, 4, 5)
    table, lens = np.array([[0, 1], [2, 3]]), np.array([5, 8])
    pbase = dict(query=pq, key_blocks=kb, value_blocks=vb, block_table=table, seq_lens=lens)
    pa = F.paged_attention
    rows += _variants("paged", pa, pbase, ["query", "key_blocks", "value_blocks"], extra=[
        ("block_table", "float", table.astype(float), TypeError, "block_table"),
        ("block_table", "range", np.array([[0, 1], [2, 9]]), ValueError, "block_table"),
        ("block_table", "negative", np.array([[0, -1], [2, 3]]), ValueError, "block_table"),
        ("block_table", "1d", np.array([0, 1]), ValueError, "block_table"),
        ("block_table", "none", None, TypeError, "block_table"),
        ("seq_lens", "float", lens.astype(float), TypeError, "seq_lens"),
        ("seq_lens", "too-long", np.array([5, 9]), ValueError, "seq_lens"),
        ("seq_lens", "negative", np.array([-1, 8]), ValueError, "seq_lens"),
        ("seq_lens", "shape", np.array([5]), ValueError, "seq_lens"),
        ("query", "heads", r(2, 3, 1, 8), ValueError, "head"),
        ("query", "features", r(2, 4, 1, 7), ValueError, "query"),
        ("key_blocks", "3d", r(6, 2, 4), ValueError, "key_blocks"),
        ("value_blocks", "blocks", r(5, 2, 4, 5), ValueError, "value_blocks"),
        *_threads("paged"), *_scale()[:3], *_device()])
    KV = F.PagedKVCache
    rows += [(f"PagedKVCache-{lab}", KV, {"num_blocks": 4, "block_size": 2, "num_kv_heads": 1,
                                          "head_dim": 3, **kw}, exc, word)
             for lab, kw, exc, word in [
                 ("blocks-negative", dict(num_blocks=-1), ValueError, "num_blocks"),
                 ("blocks-float", dict(num_blocks=4.0), TypeError, "num_blocks"),
                 ("block-size-zero", dict(block_size=0), ValueError, "block_size"),
                 ("heads-str", dict(num_kv_heads="1"), TypeError, "num_kv_heads"),
                 ("dim-negative", dict(head_dim=-3), ValueError, "head_dim"),
                 ("value-dim-zero", dict(value_dim=0), ValueError, "value_dim"),
                 ("dtype-int", dict(dtype=np.int64), TypeError, "dtype"),
                 ("dtype-complex", dict(dtype=complex), TypeError, "dtype"),
                 ("device-gpu", dict(device="gpu"), ValueError, "device")]]

    def cache_call(method, *args, **kw):
        def call():
            c = KV(4, 2, 1, 3)
            s = c.add_sequence()
            c.append(s, np.ones((1, 2, 3)), np.ones((1, 2, 3)))
            sub = lambda a: s if a is SEQ else [sub(b) for b in a] if isinstance(a, list) else a
            return getattr(c, method)(*(sub(a) for a in args), **kw)
        return call
    SEQ = object()
    for lab, call, exc, word in [
            ("append-shape", cache_call("append", SEQ, np.ones((1, 2, 4)), np.ones((1, 2, 3))),
             ValueError, "key"),
            ("append-complex", cache_call("append", SEQ, np.ones((1, 1, 3), complex),
                                          np.ones((1, 1, 3))), TypeError, "key"),
            ("append-empty", cache_call("append", SEQ, np.ones((1, 0, 3)), np.ones((1, 0, 3))),
             ValueError, "T >= 1"),
            ("append-full", cache_call("append", SEQ, np.ones((1, 9, 3)), np.ones((1, 9, 3))),
             MemoryError, "free blocks"),
            ("append-unknown", cache_call("append", 99, np.ones((1, 1, 3)), np.ones((1, 1, 3))),
             ValueError, "seq"),
            ("append-seq-str", cache_call("append", "a", np.ones((1, 1, 3)), np.ones((1, 1, 3))),
             ValueError, "sequence id"),
            ("length-unknown", cache_call("length", 7), ValueError, "seq"),
            ("fork-unknown", cache_call("fork", -1), ValueError, "seq"),
            ("free-unknown", cache_call("free", 5), ValueError, "seq"),
            ("block_table-unknown", cache_call("block_table", [SEQ, 3]), ValueError, "seq"),
            ("attention-features", cache_call("attention", np.ones((1, 1, 1, 4)), [SEQ]),
             ValueError, "query"),
            ("attention-seqs", cache_call("attention", np.ones((1, 2, 1, 3)), [SEQ, SEQ]),
             ValueError, "seq"),
            ("attention-complex", cache_call("attention", np.ones((1, 1, 1, 3), complex), [SEQ]),
             TypeError, "query"),
            ("attention-threads", cache_call("attention", np.ones((1, 1, 1, 3)), [SEQ],
                                             num_threads=0), ValueError, "num_threads")]:
        rows.append((f"PagedKVCache.{lab}", call, {}, exc, word))

    # ---- backward passes ------------------------------------------------------------
    q, k, v = r(2, 3, 8, 4), r(2, 3, 10, 4), r(2, 3, 10, 5)
    o, lse = F.scaled_dot_product_attention(q, k, v, return_lse=True)
    g = r(2, 3, 8, 5)
    bwd = F.scaled_dot_product_attention_backward
    rows += _variants("sdpa_backward", bwd, dict(grad_out=g, query=q, key=k, value=v, out=o,
                                                 lse=lse),
                      ["grad_out", "query", "key", "value", "out", "lse"],
                      skip={("lse", "bool"), ("lse", "0-d")}, extra=[
        ("grad_out", "shape", r(2, 3, 8, 4), ValueError, "grad_out"),
        ("out", "shape", r(2, 3, 7, 5), ValueError, "out"),
        ("lse", "shape", r(2, 3, 7), ValueError, "lse"),
        ("attn_mask", "int", np.ones((8, 10), int), TypeError, "attn_mask"),
        ("attn_mask", "shape", np.ones((8, 9), bool), ValueError, "attn_mask"),
        ("mask_grad", "bool-mask", True, ValueError, "mask"),
        ("causal_alignment", "bad", "center", ValueError, "causal_alignment"),
        *_threads("sdpa_backward"), *_scale(), *_device(),
    ])
    rows.append(("sdpa_backward-rng-missing", bwd, dict(grad_out=g, query=q, key=k, value=v,
                                                         out=o, lse=lse, dropout_p=0.5),
                 ValueError, "rng"))
    rows.append(("sdpa_backward-dropout_p-one", bwd, dict(grad_out=g, query=q, key=k, value=v,
                                                           out=o, lse=lse, dropout_p=1.0, rng=7),
                 ValueError, "dropout_p"))
    # rows of the reliability audit's gradient section that the rows above do not cover
    rows.append(("sdpa_backward-key-features", bwd, dict(grad_out=g, query=q, key=r(2, 3, 10, 3),
                                                          value=v, out=o, lse=lse),
                 ValueError, "key"))
    rows.append(("sdpa_backward-dropout_p-str", bwd, dict(grad_out=g, query=q, key=k, value=v,
                                                           out=o, lse=lse, dropout_p="0.1",
                                                           rng=0), TypeError, "dropout_p"))
    rows += [("sdpa-dropout_p-negative", sdpa, dict(base, dropout_p=-0.1), ValueError,
              "dropout_p"),
             ("sdpa-dropout_p-str", sdpa, dict(base, dropout_p="a"), TypeError, "dropout_p"),
             ("sdpa-rng-str", sdpa, dict(base, dropout_p=0.5, rng="x"), TypeError, "rng")]
    y = F.masked_softmax(r(3, 4, 5))
    rows += _variants("masked_softmax_backward", F.masked_softmax_backward,
                      dict(grad=r(3, 4, 5), y=y), ["grad", "y"], extra=[
        ("y", "shape", y[..., :4], ValueError, "y"),
        ("axis", "range", 3, AxisError, "axis"),
        ("axis", "float", 1.0, TypeError, "axis"),
        *_threads("msb"),
    ])
    blayout = F.BlockLayout.from_rule((8, 10), 4, window=(2, 2))
    bo, blse = F.block_sparse_attention(q, k, v, blayout, return_lse=True) \
        if "return_lse" in F.block_sparse_attention.__code__.co_varnames else (o, lse)
    rows += _variants("block_sparse_backward", F.block_sparse_attention_backward,
                      dict(grad_out=g, query=q, key=k, value=v, out=bo, lse=blse,
                           layout=blayout),
                      ["grad_out", "query", "key", "value", "out", "lse"],
                      skip={("lse", "bool"), ("lse", "0-d")}, extra=[
        ("layout", "none", None, TypeError, "layout"),
        ("layout", "other-shape", F.BlockLayout.from_rule((9, 10), 4), ValueError, "layout"),
        *_threads("bsab"), *_scale(),
    ])
    mha = F.MultiHeadAttention(8, 2)
    x = r(2, 5, 8)
    _, mcache = mha(x, x, x, return_cache=True)
    for lab, kw, exc, word in [
            ("grad_out-shape", dict(grad_out=r(2, 4, 8), cache=mcache), ValueError, "grad_out"),
            ("grad_out-complex", dict(grad_out=r(2, 5, 8) + 0j, cache=mcache), TypeError,
             "grad_out"),
            ("grad_out-none", dict(grad_out=None, cache=mcache), TypeError, "grad_out"),
            ("cache-none", dict(grad_out=r(2, 5, 8), cache=None), TypeError, "cache"),
            ("cache-dict", dict(grad_out=r(2, 5, 8), cache={}), TypeError, "cache"),
            ("threads", dict(grad_out=r(2, 5, 8), cache=mcache, num_threads=0), ValueError,
             "num_threads")]:
        rows.append((f"multi_head_attention_backward-{lab}", F.multi_head_attention_backward,
                     kw, exc, word))
    rows += [(f"show_config-{lab}", F.show_config, dict(mode=m), exc, "mode")
             for lab, m, exc in [("bad", "html", ValueError), ("int", 3, ValueError)]]

    # ---- packed variable-length batches ------------------------------------------------
    if hasattr(F, "varlen_attention"):
        vq, vk, vv = r(7, 2, 4), r(9, 2, 4), r(9, 2, 5)
        cq, ck = np.array([0, 3, 7], np.int32), np.array([0, 4, 9], np.int32)
        rows += _variants("varlen_attention", F.varlen_attention,
                          dict(query=vq, key=vk, value=vv, cu_seqlens_q=cq, cu_seqlens_k=ck),
                          ["query", "key", "value"], extra=[
            ("cu_seqlens_q", "start", np.array([1, 3, 7], np.int32), ValueError,
             "cu_seqlens_q"),
            ("cu_seqlens_q", "decreasing", np.array([0, 5, 3, 7], np.int32), ValueError,
             "cu_seqlens_q"),
            ("cu_seqlens_q", "end", np.array([0, 3, 6], np.int32), ValueError, "cu_seqlens_q"),
            ("cu_seqlens_q", "float", np.array([0.0, 3.0, 7.0]), ValueError, "cu_seqlens_q"),
            ("cu_seqlens_k", "batch", np.array([0, 9], np.int32), ValueError, "cu_seqlens"),
            ("window", "negative", (-2, 0), ValueError, "window"),
            ("softcap", "zero", 0.0, ValueError, "softcap"),
            ("alibi_slopes", "shape", np.ones(3), ValueError, "alibi_slopes"),
            *_threads("varlen"), *_scale(),
        ])

    # ---- threads -------------------------------------------------------------------------------
    rows += [(f"set_num_threads-{lab}", F.set_num_threads, dict(n=n), exc, "n")
             for lab, n, exc in [("zero", 0, ValueError), ("negative", -1, ValueError),
                                 ("float", 2.0, TypeError), ("str", "2", TypeError)]]

    out = []
    for id_, fn, kw, exc, word in rows:
        out.append(Case(id_, (lambda f, a: lambda: f(**a))(fn, kw), exc, word))
    return out


def run_case(case):
    """Run one case; returns None when it behaved, else a description of what went wrong."""
    try:
        result = case.call()
    except case.exc as e:
        internal = (AttributeError, IndexError, KeyError)
        if isinstance(e, internal) and not issubclass(case.exc, internal) \
                and not isinstance(e, AxisError):
            return f"internal {type(e).__name__}: {e}"
        if case.word.lower() not in str(e).lower():
            return f"{type(e).__name__} without {case.word!r}: {e}"
        return None
    except BaseException as e:           # noqa: BLE001 - the point is to see everything
        return f"expected {case.exc.__name__}, got {type(e).__name__}: {e}"
    return f"no exception: returned {type(result).__name__}"
