"""The peer suite of ``python -m fastattn.bench --suite peers``: fastattn against every
CPU peer installed (PyTorch, ONNX Runtime, OpenVINO, JAX) on the workloads of issue 20.

Each peer is a :class:`Peer`: ``available()`` says whether it can be imported,
``prepare(workload, arrays)`` builds what it needs (a session, a compiled model, a
jitted function, its inputs in its own layout) outside any timing and returns a
zero-argument callable that runs the computation once; ``result(out)`` turns that
callable's return value into a NumPy ``(B, Hq, L, Ev)`` array. Every peer's first
output is checked against the float64 reference before it is timed, so the table
never shows the time of a wrong answer: a peer that fails to build, fails to run or
disagrees with the reference is shown as such in its cell.

None of the peers is a dependency of fastattn or of its tests: each is imported only
inside its runner.
"""
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

import fastattn

# Max |peer - reference| / max |reference| accepted for float32 inputs against the
# float64 reference. fastattn and the peers at float32 precision are at ~1e-6; a peer
# silently computing in bfloat16 (OpenVINO's default precision hint on CPUs with bf16)
# is at ~1e-3, a wrong mask or head mapping at ~1e-1.
TOLERANCE = 1e-4
TARGET_RATIO = 1.15
PAGED_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Workload:
    """One row of the suite: shapes, what is masked, and which fastattn entry point runs.

    ``kv_heads < heads`` is grouped-query attention; ``padding`` gives batch entry ``b``
    the first ``key_lengths[b]`` keys (a ``(B, 1, 1, S)`` key padding mask);
    ``entry="paged"`` runs fastattn's :func:`fastattn.paged_attention` over the same
    keys and values stored in a block pool (the peers run their contiguous-cache
    decode: they have no paged kernel).
    """
    name: str
    label: str
    batch: int
    heads: int
    kv_heads: int
    L: int
    S: int
    E: int
    causal: bool = False
    padding: bool = False
    entry: str = "sdpa"

    @property
    def key_lengths(self):
        """Keys kept per batch entry: S, 7/8 S, 3/4 S, ... (at least 1) with padding."""
        if not self.padding:
            return [self.S] * self.batch
        return [max(1, self.S - (self.S * (b % 8)) // 8) for b in range(self.batch)]

    @property
    def decode(self):
        return self.L == 1 and self.S > 1

    def flops(self):
        """Flash-attention FLOPs: 4·H·L·E per attended key (the padded keys not
        counted), halved when causal."""
        keys = sum(self.key_lengths)
        flops = 4.0 * self.heads * self.L * keys * self.E
        return flops / 2 if self.causal else flops

    def kv_bytes(self):
        """Bytes of K and V (float32): what a decode step has to read."""
        return 2 * 4 * self.batch * self.kv_heads * self.S * self.E


SUITES = {
    "peers": (
        Workload("dense", "dense B=1 H=8 L=S=2048 E=64", 1, 8, 8, 2048, 2048, 64),
        Workload("causal", "causal, same", 1, 8, 8, 2048, 2048, 64, causal=True),
        Workload("padding", "key padding mask B=4 H=8 L=S=1024 E=64 (keys kept: "
                 "1024/896/768/640)", 4, 8, 8, 1024, 1024, 64, padding=True),
        Workload("bert", "BERT-like B=32 H=12 L=S=128 E=32", 32, 12, 12, 128, 128, 32),
        Workload("head_dim_128", "head_dim 128, B=1 H=8 L=S=2048", 1, 8, 8, 2048, 2048, 128),
        Workload("gqa", "GQA 32/8 heads, B=1 L=S=1024 E=128, causal", 1, 32, 8, 1024, 1024,
                 128, causal=True),
        Workload("decode", "decode B=8 Hq=32 Hkv=8 L=1 S=4096 E=128, through "
                 "`scaled_dot_product_attention(enable_gqa=True)`", 8, 32, 8, 1, 4096, 128),
        Workload("decode_paged", "same decode through `paged_attention` (block 16)",
                 8, 32, 8, 1, 4096, 128, entry="paged"),
    ),
    "wide": tuple(
        Workload(f"head_dim_{E}", f"head_dim {E}, B=1 H=8 L=S=2048", 1, 8, 8, 2048, 2048, E)
        for E in (80, 96, 256)),
}

# Every kind of workload at small shapes (lengths not multiples of the tiles): what the
# tests run each peer on, without timing anything (the suite "small").
SMALL = SUITES["small"] = (
    Workload("dense", "dense", 2, 3, 3, 37, 45, 16),
    Workload("causal", "causal", 1, 2, 2, 40, 40, 16, causal=True),
    Workload("padding", "padding", 3, 2, 2, 24, 40, 8, padding=True),
    Workload("gqa", "gqa causal", 1, 8, 2, 33, 33, 16, causal=True),
    Workload("decode", "decode", 2, 8, 2, 1, 70, 16),
    Workload("decode_paged", "decode paged", 2, 8, 2, 1, 64, 16, entry="paged"),
)


def workload_arrays(workload, seed=0):
    """``q (B, Hq, L, E)``, ``k, v (B, Hkv, S, E)`` float32 and the bool key padding
    mask ``(B, 1, 1, S)`` (True = the key takes part), or None."""
    w = workload
    rng = np.random.default_rng([seed, w.batch, w.heads, w.L, w.S, w.E])
    q = rng.standard_normal((w.batch, w.heads, w.L, w.E), dtype=np.float32)
    k, v = (rng.standard_normal((w.batch, w.kv_heads, w.S, w.E), dtype=np.float32)
            for _ in range(2))
    mask = None
    if w.padding:
        mask = np.arange(w.S)[None, :] < np.array(w.key_lengths)[:, None]
        mask = mask[:, None, None, :]
    return q, k, v, mask


def reference_output(workload, arrays):
    """The float64 result of :func:`fastattn.reference.scaled_dot_product_attention`,
    one batch entry and kv-head group at a time (bounded memory)."""
    from fastattn import reference
    q, k, v, mask = arrays
    w = workload
    group = w.heads // w.kv_heads
    out = np.empty(q.shape, dtype=np.float64)
    for b in range(w.batch):
        for h in range(w.kv_heads):
            heads = slice(h * group, (h + 1) * group)
            out[b, heads] = reference.scaled_dot_product_attention(
                q[b, heads].astype(np.float64), k[b, h:h + 1].astype(np.float64),
                v[b, h:h + 1].astype(np.float64),
                None if mask is None else mask[b], is_causal=w.causal)
    return out


def relative_error(result, reference):
    """``max |result - reference| / max |reference|`` (inf for a wrong shape or a NaN)."""
    result = np.asarray(result, dtype=np.float64)
    if result.shape != reference.shape:
        return float("inf")
    error = np.abs(result - reference).max() / max(np.abs(reference).max(), 1e-300)
    return float(error) if np.isfinite(error) else float("inf")


# --- the systems ---------------------------------------------------------------------

class Peer:
    """One system of the suite. Subclasses set ``name``, ``title`` and ``modules``."""
    name = title = ""
    modules = ()

    def __init__(self, threads):
        self.threads = threads

    def available(self):
        import importlib.util
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def version(self):
        from importlib import metadata
        versions = []
        for dist in self.modules:
            try:
                versions.append(f"{dist} {metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                pass
        return ", ".join(versions)

    def config(self):
        return ""

    def supports(self, workload):
        """None, or why this peer does not run the workload (shown as such)."""
        return None

    def prepare(self, workload, arrays):
        raise NotImplementedError

    def result(self, out):
        return np.asarray(out)

    def label(self, workload):
        """What runs for this workload, when it differs between rows (e.g. ORT's op)."""
        return ""

    def close(self):
        """Undo what the runner changed for its calls (e.g. PyTorch's thread count)."""


class FastattnRunner(Peer):
    name, title, modules = "fastattn", "fastattn", ("fastattn",)

    def version(self):
        return f"fastattn {fastattn.__version__}"

    def config(self):
        return (f"`scaled_dot_product_attention(..., enable_gqa=Hkv < Hq, "
                f"num_threads={self.threads})`; decode row 8: `paged_attention` over a "
                f"pool of {PAGED_BLOCK_SIZE}-token blocks in shuffled order")

    def prepare(self, workload, arrays):
        q, k, v, mask = arrays
        threads = self.threads
        if workload.entry == "paged":
            key_blocks, value_blocks, table = _paged_pool(k, v, PAGED_BLOCK_SIZE)
            lengths = np.array(workload.key_lengths, dtype=np.int32)
            return lambda: fastattn.paged_attention(q, key_blocks, value_blocks, table,
                                                    lengths, num_threads=threads)
        gqa = workload.kv_heads != workload.heads
        return lambda: fastattn.scaled_dot_product_attention(
            q, k, v, mask, is_causal=workload.causal, enable_gqa=gqa, num_threads=threads)


def _paged_pool(k, v, block_size):
    """K and V ``(B, Hkv, S, E)`` scattered over a shuffled block pool
    ``(num_blocks, Hkv, block_size, E)`` with its block table ``(B, S / block_size)``."""
    B, Hkv, S, E = k.shape
    per_seq = -(-S // block_size)
    padded = per_seq * block_size
    order = np.random.default_rng(block_size).permutation(B * per_seq).astype(np.int32)
    table = order.reshape(B, per_seq)
    pools = []
    for a in (k, v):
        blocks = np.zeros((B, Hkv, padded, a.shape[-1]), dtype=a.dtype)
        blocks[:, :, :S] = a
        blocks = blocks.reshape(B, Hkv, per_seq, block_size, -1).transpose(0, 2, 1, 3, 4)
        pool = np.empty((B * per_seq, Hkv, block_size, a.shape[-1]), dtype=a.dtype)
        pool[table.reshape(-1)] = blocks.reshape(B * per_seq, Hkv, block_size, -1)
        pools.append(pool)
    return pools[0], pools[1], table


class TorchRunner(Peer):
    name, title, modules = "torch", "PyTorch SDPA", ("torch",)

    def __init__(self, threads):
        super().__init__(threads)
        self._restore = None

    def config(self):
        import torch
        return (f"`torch.nn.functional.scaled_dot_product_attention` on `(B, H, L, E)` "
                f"tensors sharing the NumPy arrays, `enable_gqa` for GQA, a bool "
                f"`(B, 1, 1, S)` mask, `torch.inference_mode()`, "
                f"`torch.set_num_threads({self.threads})` (restored afterwards)"
                + "".join(f"; {line.strip()}" for line in
                          torch.__config__.parallel_info().splitlines()
                          if line.startswith("ATen parallel backend")))

    def prepare(self, workload, arrays):
        import torch
        if self._restore is None:
            self._restore = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q, k, v, mask = (None if a is None else torch.from_numpy(a) for a in arrays)
        gqa = workload.kv_heads != workload.heads

        def run():
            with torch.inference_mode():
                return sdpa(q, k, v, attn_mask=mask, is_causal=workload.causal,
                            enable_gqa=gqa)
        return run

    def result(self, out):
        return out.numpy()

    def close(self):
        if self._restore is not None:
            import torch
            torch.set_num_threads(self._restore)
            self._restore = None


def _to_3d(a):
    """``(B, H, L, E)`` -> ``(B, L, H*E)``, contiguous."""
    B, H, L, E = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(B, L, H * E)


class OnnxRuntimeRunner(Peer):
    name, title, modules = "onnxruntime", "ONNX Runtime", ("onnxruntime", "onnx")

    def config(self):
        return (f"one-node models, `com.microsoft` MultiHeadAttention on 3-D `(B, L, H*E)` "
                f"inputs (key padding: an additive `(B, 1, L, S)` attention_bias) and "
                f"GroupQueryAttention for GQA, decode and causal rows (faster than "
                f"MultiHeadAttention's `unidirectional=1` there) "
                f"(decode: the cache of S-1 keys and the new key, past and present key/value "
                f"in one buffer bound with IOBinding); `intra_op_num_threads={self.threads}`, "
                f"`inter_op_num_threads=1`, `ORT_ENABLE_ALL`, default spinning, CPU provider")

    def label(self, workload):
        return "GQA" if self._uses_gqa(workload) else "MHA"

    @staticmethod
    def _uses_gqa(workload):
        """GroupQueryAttention for GQA and decode, and for causal self-attention without
        padding: it was 1.8x faster there than MultiHeadAttention's ``unidirectional``
        (152 vs 272 ms on the causal row, interleaved, loaded machine)."""
        w = workload
        if w.kv_heads != w.heads or w.decode:
            return True
        return w.causal and not w.padding and w.L == w.S

    def supports(self, workload):
        if self._uses_gqa(workload):
            if workload.padding:
                return "GroupQueryAttention takes no padding mask"
            if not (workload.causal or workload.decode):
                return "GroupQueryAttention is always causal"
            if workload.L > 1 and workload.L != workload.S:
                return "GroupQueryAttention: L != S needs a past cache"
        return None

    def _session(self, graph_nodes, inputs, outputs):
        import onnxruntime as ort
        from onnx import helper
        graph = helper.make_graph(graph_nodes, "attention", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4       # a failure is reported in the table instead
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    def prepare(self, workload, arrays):
        if self._uses_gqa(workload):
            return self._prepare_gqa(workload, arrays)
        from onnx import TensorProto, helper
        q, k, v, mask = arrays
        w = workload
        F = TensorProto.FLOAT
        feed = {"query": _to_3d(q), "key": _to_3d(k), "value": _to_3d(v)}
        names = ["query", "key", "value"]
        if mask is not None:
            # an additive (B, 1, L, S) bias: ORT wants the full L axis, and it ran faster
            # than a key_padding_mask (B, S) or key lengths (B,) here (~205 ms vs 220-250
            # ms on the padding row, loaded machine)
            bias = np.where(mask, 0, -np.inf).astype(np.float32)
            feed["attention_bias"] = np.ascontiguousarray(
                np.broadcast_to(bias, (w.batch, 1, w.L, w.S)))
            names += ["", "", "attention_bias"]     # no bias, no key_padding_mask
        node = helper.make_node("MultiHeadAttention", names, ["output"], domain="com.microsoft",
                                num_heads=w.heads, unidirectional=int(w.causal))
        session = self._session(
            [node], [helper.make_tensor_value_info(n, F, a.shape) for n, a in feed.items()],
            [helper.make_tensor_value_info("output", F, [w.batch, w.L, w.heads * w.E])])
        return lambda: session.run(None, feed)[0]

    def _prepare_gqa(self, workload, arrays):
        import onnxruntime as ort
        from onnx import TensorProto, helper
        q, k, v, _ = arrays
        w = workload
        F, I32 = TensorProto.FLOAT, TensorProto.INT32
        step = w.L if w.decode else w.S             # keys given as this call's new ones
        inputs = {"query": _to_3d(q), "key": _to_3d(k[:, :, w.S - step:]),
                  "value": _to_3d(v[:, :, w.S - step:])}
        names = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                 "total_sequence_length"]
        info = [helper.make_tensor_value_info(n, F, a.shape) for n, a in inputs.items()]
        if not w.decode:
            names[3] = names[4] = ""
        else:
            info += [helper.make_tensor_value_info(n, F, [w.batch, w.kv_heads, w.S, w.E])
                     for n in ("past_key", "past_value")]
        info += [helper.make_tensor_value_info("seqlens_k", I32, [w.batch]),
                 helper.make_tensor_value_info("total_sequence_length", I32, [])]
        node = helper.make_node("GroupQueryAttention", names,
                                ["output", "present_key", "present_value"],
                                domain="com.microsoft", num_heads=w.heads,
                                kv_num_heads=w.kv_heads)
        session = self._session([node], info, [
            helper.make_tensor_value_info("output", F, [w.batch, w.L, w.heads * w.E]),
            helper.make_tensor_value_info("present_key", F, [w.batch, w.kv_heads, w.S, w.E]),
            helper.make_tensor_value_info("present_value", F,
                                          [w.batch, w.kv_heads, w.S, w.E])])
        seqlens = np.full(w.batch, w.S - 1, dtype=np.int32)      # total length - 1
        total = np.array(w.S, dtype=np.int32)
        binding = session.io_binding()
        for name, a in inputs.items():
            binding.bind_cpu_input(name, a)
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", total)
        binding.bind_output("output", "cpu")
        if w.decode:
            # the cache: past and present share one buffer of S positions, the first S-1
            # hold the cached keys, the call writes the new key into the last one
            caches = [ort.OrtValue.ortvalue_from_numpy(np.array(a, order="C"))   # a copy
                      for a in (k, v)]
            for name, cache in zip(("key", "value"), caches):
                binding.bind_ortvalue_input(f"past_{name}", cache)
                binding.bind_ortvalue_output(f"present_{name}", cache)
        else:
            binding.bind_output("present_key", "cpu")
            binding.bind_output("present_value", "cpu")

        def run():
            session.run_with_iobinding(binding)
            return binding
        # the bound buffers live as long as the call
        run.keep = (inputs, seqlens, total, caches if w.decode else None)
        return run

    def result(self, out):
        if not isinstance(out, np.ndarray):            # an IOBinding: its first output
            out = out.get_outputs()[0].numpy()
        return out        # (B, L, H*E): reshaped by output_array, which knows the heads


class OpenVinoRunner(Peer):
    name, title, modules = "openvino", "OpenVINO SDPA", ("openvino",)

    def available(self):
        if not super().available():
            return False
        # imported now, before JAX starts its threads: importing openvino sends a
        # telemetry event from a forked process (openvino.tools.ovc), and forking a
        # process that runs JAX's threads can deadlock the child
        import openvino  # noqa: F401
        return True

    def config(self):
        return (f"one opset-13 `scaled_dot_product_attention` node compiled for `CPU` on the "
                f"`(B, H, L, E)` arrays (shared, not copied), GQA by Unsqueeze/Broadcast/"
                f"Reshape of K and V, a bool `(B, 1, 1, S)` mask; `INFERENCE_NUM_THREADS="
                f"{self.threads}`, `PERFORMANCE_HINT=LATENCY`, "
                f"`INFERENCE_PRECISION_HINT=f32`")

    def prepare(self, workload, arrays):
        import openvino as ov
        import openvino.opset13 as ops
        q, k, v, mask = arrays
        w = workload
        params = [ops.parameter(list(a.shape), ov.Type.f32, name=n)
                  for n, a in zip("qkv", (q, k, v))]
        qn, kn, vn = params
        if w.kv_heads != w.heads:
            group = w.heads // w.kv_heads

            def expand(node):
                shape = [w.batch, w.kv_heads, group, w.S, w.E]
                node = ops.unsqueeze(node, ops.constant(np.array([2], np.int64)))
                node = ops.broadcast(node, ops.constant(np.array(shape, np.int64)))
                return ops.reshape(node, ops.constant(
                    np.array([w.batch, w.heads, w.S, w.E], np.int64)), special_zero=False)
            kn, vn = expand(kn), expand(vn)
        extra = []
        if mask is not None:
            params.append(ops.parameter(list(mask.shape), ov.Type.boolean, name="mask"))
            extra.append(params[-1])
        node = ops.scaled_dot_product_attention(qn, kn, vn, *extra, causal=w.causal)
        model = ov.Model([node.output(0)], params)
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        tensors = [ov.Tensor(np.ascontiguousarray(a), shared_memory=True)
                   for a in arrays if a is not None]

        def run():
            request.infer(tensors, share_inputs=True)
            return request.get_output_tensor(0).data       # OpenVINO's buffer, reused
        return run

    def result(self, out):
        return np.array(out)


class JaxRunner(Peer):
    """``jax.nn.dot_product_attention`` under ``jax.jit``.

    Threads: JAX's CPU client sizes its thread pools when it is created (on first use),
    from the ``NPROC`` environment variable when set, else the CPUs the process may run
    on; ``XLA_FLAGS`` has no thread-count flag that the CPU client reads. When the
    suite's thread count differs from the CPUs available and JAX's backend is not yet
    initialised, the runner sets ``NPROC`` only while it creates the client and restores
    the environment right after. An already initialised JAX is used as it is (its
    thread count is then reported as the caller's).
    """
    name, title, modules = "jax", "JAX", ("jax", "jaxlib")

    def __init__(self, threads):
        super().__init__(threads)
        self._initialised = False

    def _policy(self):
        """``(NPROC value to set while JAX creates its client or None, description)``,
        decided once, before this runner creates the client."""
        if getattr(self, "_decided", None) is None:
            self._decided = self._decide()
        return self._decided

    def _decide(self):
        from jax._src import xla_bridge
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count()
        if xla_bridge.backends_are_initialized():
            return None, "JAX was initialised before the suite: its own thread count"
        if self.threads == cpus and "NPROC" not in os.environ:
            return None, f"CPU client threads = the {cpus} CPUs available (JAX's default)"
        return str(self.threads), (f"CPU client threads = {self.threads}: `NPROC="
                                   f"{self.threads}` set only while JAX creates its client, "
                                   f"then restored")

    def _init(self):
        """Create JAX's CPU client (lazily: at the first workload, not at import)."""
        if self._initialised:
            return
        import jax
        nproc, _ = self._policy()
        saved = os.environ.get("NPROC")
        if nproc is not None:
            os.environ["NPROC"] = nproc
        try:
            jax.devices("cpu")
        finally:
            if nproc is not None:
                if saved is None:
                    del os.environ["NPROC"]
                else:
                    os.environ["NPROC"] = saved
        self._initialised = True

    def config(self):
        return ("`jax.nn.dot_product_attention` (implementation None: XLA) under `jax.jit` "
                "on `(B, L, H, E)` device arrays (transposed before timing), GQA by its "
                "head grouping, a bool `(B, 1, 1, S)` mask, `block_until_ready()`; "
                + self._policy()[1])

    def prepare(self, workload, arrays):
        self._init()
        import jax
        q, k, v, mask = arrays
        w = workload
        device = jax.devices("cpu")[0]
        put = [jax.device_put(np.ascontiguousarray(a.transpose(0, 2, 1, 3)), device)
               for a in (q, k, v)]
        if mask is not None:
            put.append(jax.device_put(mask, device))
        causal = w.causal

        @jax.jit
        def attention(q, k, v, mask=None):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

        return lambda: attention(*put).block_until_ready()

    def result(self, out):
        return np.asarray(out).transpose(0, 2, 1, 3)


PEERS = (TorchRunner, OnnxRuntimeRunner, OpenVinoRunner, JaxRunner)
SYSTEM_CLASSES = {cls.name: cls for cls in (FastattnRunner, *PEERS)}


def output_array(system, workload, out):
    """A system's output as a float NumPy ``(B, Hq, L, E)`` array."""
    out = system.result(out)
    if isinstance(system, OnnxRuntimeRunner):
        out = np.asarray(out).reshape(workload.batch, workload.L, workload.heads, workload.E)
        out = out.transpose(0, 2, 1, 3)
    return np.asarray(out)


def check(system, workload, arrays, reference):
    """Build and run ``system`` once on ``workload`` and compare with ``reference``.

    Returns ``(call, status)``: the zero-argument callable to time (None unless the
    output agreed) and a dict with ``status`` ("ok", "n/a", "build failed",
    "run failed", "wrong") plus ``detail`` and ``max_rel_diff``.
    """
    reason = system.supports(workload)
    if reason:
        return None, {"status": "n/a", "detail": reason}
    try:
        call = system.prepare(workload, arrays)
    except Exception as error:             # a peer that cannot build this model
        return None, {"status": "build failed", "detail": _describe(error)}
    try:
        out = output_array(system, workload, call())
    except Exception as error:
        return None, {"status": "run failed", "detail": _describe(error)}
    diff = relative_error(out, reference)
    if not diff <= TOLERANCE:
        return None, {"status": "wrong", "detail": f"relative error {diff:.1e}",
                      "max_rel_diff": diff}
    return call, {"status": "ok", "max_rel_diff": diff}


def _describe(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


def seconds(fn):
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_peer_suite(suites=("peers",), *, systems=None, repeat=9, threads=None,
                   warmup=2, rounds=3, progress=True, workloads=None):
    """Time fastattn and every installed peer on the workloads of ``suites``.

    See :func:`fastattn.bench.run_suite` (the public entry point) for the parameters
    and the result.
    """
    from fastattn.bench import _blas_threads, memory_bandwidth_gbs, progress_bar, \
        provenance, sgemm_gflops
    threads = fastattn.get_num_threads() if threads is None else int(threads)
    if workloads is None:
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise ValueError(f"unknown suites {unknown}; choose from {list(SUITES)}")
        workloads = [w for s in suites for w in SUITES[s]]
    names = ["fastattn", *(cls.name for cls in PEERS)] if systems is None else list(systems)
    unknown = [s for s in names if s not in SYSTEM_CLASSES]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(SYSTEM_CLASSES)}")
    if "fastattn" not in names:
        names.insert(0, "fastattn")
    runners = {name: SYSTEM_CLASSES[name](threads) for name in names}
    installed = {name: run for name, run in runners.items() if run.available()}
    load_before = _load()
    where = provenance()       # before any peer starts threads (it runs git in a subprocess)

    def baselines():
        with _blas_threads(threads):
            sgemm = sgemm_gflops()
        return sgemm, memory_bandwidth_gbs(threads=threads)

    bar = progress_bar(len(workloads) * (len(installed) + 1) + 2, enabled=progress)
    bar.set_description_str("measuring the SGEMM rate and memory bandwidth")
    measured = [baselines()]
    bar.update()
    info = {}
    for name, run in runners.items():
        entry = {"title": run.title, "installed": name in installed}
        if name in installed:
            entry["version"] = run.version()
            try:
                entry["config"] = run.config()
            except Exception as error:
                entry["config"] = f"(configuration unavailable: {_describe(error)})"
        info[name] = entry

    timed = []
    previous = None
    try:
        for index, workload in enumerate(workloads):
            bar.set_description_str(f"{workload.name}: reference")
            shape = (workload.batch, workload.heads, workload.kv_heads, workload.L,
                     workload.S, workload.E, workload.causal, workload.padding)
            if previous is None or previous[0] != shape:    # decode rows share their data
                previous = None
                arrays = workload_arrays(workload)
                previous = shape, arrays, reference_output(workload, arrays)
            _, arrays, reference = previous
            bar.update()
            calls, cells = {}, {}
            for name, run in runners.items():
                if name not in installed:
                    cells[name] = {"status": "not installed"}
                    continue
                bar.set_description_str(f"{workload.name}: {name} check")
                calls[name], cells[name] = check(run, workload, arrays, reference)
                if run.label(workload):
                    cells[name]["op"] = run.label(workload)
            ready = [n for n in names if calls.get(n) is not None]
            times = {name: [] for name in ready}
            # each system timed as one block (warm-up runs, then timed runs back to back),
            # in `rounds` rounds with the order rotating, so that a change of the machine's
            # load during the row falls on every system
            per_round = [len(r) for r in np.array_split(np.arange(repeat), rounds) if len(r)]
            for step, runs in enumerate(per_round):
                shift = (index + step) % len(ready) if ready else 0
                for name in ready[shift:] + ready[:shift]:
                    bar.set_description_str(f"{workload.name}: {name}")
                    call = calls[name]
                    for _ in range(warmup if step == 0 else max(1, warmup // 2)):
                        call()
                    times[name] += [seconds(call) for _ in range(runs)]
            for name in ready:
                cells[name].update(median_s=statistics.median(times[name]),
                                   min_s=min(times[name]), max_s=max(times[name]),
                                   times_s=times[name])
                bar.update()
            del calls
            timed.append((workload, cells))
        bar.set_description_str("measuring the SGEMM rate and memory bandwidth again")
        measured.append(baselines())
        bar.update()
    finally:
        for run in runners.values():
            run.close()
        bar.close()
    # the best of the two measurements, before and after (the machine may be loaded)
    sgemm = max(m[0] for m in measured)
    bandwidth = max(m[1] for m in measured)
    return {
        **where,
        "config": {"suites": list(suites), "threads": threads, "repeat": repeat,
                   "warmup": warmup, "rounds": rounds, "dtype": "float32", "tolerance": TOLERANCE,
                   "target_ratio": TARGET_RATIO, "systems": names},
        "load_average": {"before": load_before, "after": _load()},
        "sgemm_gflops": sgemm,
        "memory_bandwidth_gbs": bandwidth,
        "baselines_before_after": [{"sgemm_gflops": m[0], "memory_bandwidth_gbs": m[1]}
                                   for m in measured],
        "systems": info,
        "rows": [_row(workload, cells, sgemm, bandwidth) for workload, cells in timed],
    }


def _row(workload, cells, sgemm, bandwidth):
    w = workload
    row = {"workload": w.name, "label": w.label,
           "shape": {"batch": w.batch, "heads": w.heads, "kv_heads": w.kv_heads, "L": w.L,
                     "S": w.S, "E": w.E, "causal": w.causal, "padding": w.padding,
                     "entry": w.entry},
           "cells": cells}
    mine = cells.get("fastattn", {})
    base = mine.get("median_s")
    if base:
        if w.decode:
            row["gbs"] = w.kv_bytes() / base / 1e9
            row["bandwidth_fraction"] = row["gbs"] / bandwidth
        else:
            row["gflops"] = w.flops() / base / 1e9
            row["sgemm_fraction"] = row["gflops"] / sgemm
    best = None
    for name, cell in cells.items():
        if name == "fastattn" or not cell.get("median_s"):
            continue
        if base:
            cell["ratio"] = cell["median_s"] / base
        if best is None or cell["median_s"] < cells[best]["median_s"]:
            best = name
    row["fastest_peer"] = best
    if best is not None and base:
        row["fastest_peer_ratio"] = cells[best]["ratio"]
        row["target_met"] = cells[best]["ratio"] >= TARGET_RATIO
    return row


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- output ------------------------------------------------------------------------------

def _cell(cell):
    status = cell.get("status")
    if status == "ok":
        text = f"{cell['ratio']:.2f}" if "ratio" in cell else f"{cell['median_s'] * 1e3:.2f} ms"
        return text + (f" ({cell['op']})" if cell.get("op") else "")
    if status == "not installed":
        return "not installed"
    if status == "n/a":
        return "–"
    return f"**{status}**"


def format_markdown(result):
    """The suite's result as Markdown: configuration, the ratio table, times and notes."""
    config, machine = result["config"], result["machine"]
    systems = result["systems"]
    peers = [n for n in config["systems"] if n != "fastattn"]
    load = result.get("load_average") or {}
    lines = [
        f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{platform.system()}; load average (1, 5, 15 min) {load.get('before')} before, "
        f"{load.get('after')} after",
        f"- {config['threads']} threads for every system; float32; median of "
        f"{config['repeat']} timed runs per system and row, taken in "
        f"{config.get('rounds', 1)} rounds: in each round every system runs as one block "
        f"(untimed warm-up runs, then its timed runs back to back), the order rotating "
        f"from round to round and row to row",
        f"- measured in the same run, best of before and after the workloads: SGEMM "
        f"(NumPy, 2048²) {result['sgemm_gflops']:.0f} GFLOP/s, read bandwidth "
        f"{result['memory_bandwidth_gbs']:.1f} GB/s" + "".join(
            f" (before/after: {m[0]['sgemm_gflops']:.0f}/{m[1]['sgemm_gflops']:.0f} GFLOP/s, "
            f"{m[0]['memory_bandwidth_gbs']:.1f}/{m[1]['memory_bandwidth_gbs']:.1f} GB/s)"
            for m in [result.get("baselines_before_after")] if m and len(m) == 2),
        f"- every output checked against the float64 reference before timing (max relative "
        f"error ≤ {config['tolerance']:g}); date {result.get('date')}, commit "
        f"{result.get('commit') or 'not recorded'}",
    ]
    busy = [x for x in (load.get("before") or [])[:1] + (load.get("after") or [])[:1]
            if x > 0.5 * (machine.get("logical_cpus") or 1)]
    if busy:
        lines.append("- **the machine was loaded** (load average above half its CPUs): "
                     "times are slower and noisier than idle ones, and the fractions of "
                     "SGEMM and bandwidth compare rates taken at different moments; the "
                     "ratios, every system timed in turn under the same load, are the "
                     "better guide")
    for name in config["systems"]:
        entry = systems[name]
        if entry["installed"]:
            lines.append(f"- **{entry['title']}** ({entry.get('version')}): "
                         f"{entry.get('config', '')}")
        else:
            lines.append(f"- **{entry['title']}**: not installed, skipped")
    lines += ["", "| workload (float32) | fastattn ms | fastattn rate | "
              + " | ".join(systems[p]["title"] for p in peers)
              + " | fastest correct peer | ≥ 1.15× |",
              "|---" * (len(peers) + 5) + "|"]
    notes = []
    for row in result["rows"]:
        mine = row["cells"].get("fastattn", {})
        if mine.get("median_s"):
            ms = f"{mine['median_s'] * 1e3:.2f}"
            if "gflops" in row:
                rate = f"{row['gflops']:.0f} GFLOP/s, {row['sgemm_fraction']:.2f} of SGEMM"
            else:
                rate = f"{row['gbs']:.1f} GB/s, {row['bandwidth_fraction']:.2f} of bandwidth"
        else:
            ms, rate = f"**{mine.get('status')}**", ""
        cells = [_cell(row["cells"][p]) for p in peers]
        best = row.get("fastest_peer")
        if best is None:
            fastest, met = "none correct", "–"
        else:
            fastest = f"{systems[best]['title']} {row['fastest_peer_ratio']:.2f}"
            met = "yes" if row["target_met"] else "**no**"
        lines.append(f"| {row['label']} | {ms} | {rate} | " + " | ".join(cells)
                     + f" | {fastest} | {met} |")
        for name, cell in row["cells"].items():
            if cell.get("status") not in ("ok", "not installed", None):
                notes.append(f"- {row['workload']}, {systems[name]['title']}: "
                             f"{cell['status']}" + (f" ({cell['detail']})"
                                                     if cell.get("detail") else ""))
    lines += ["", "Ratio = the peer's median time / fastattn's (above 1: fastattn is "
              "faster). ONNX Runtime: (MHA) MultiHeadAttention, (GQA) GroupQueryAttention. "
              "Rows 7 and 8 give the peers the same decode on contiguous K/V; the padding "
              "row's GFLOP/s count only the keys kept."]
    if notes:
        lines += ["", *notes]
    lines += ["", "Milliseconds, median (min-max):", "",
              "| workload | " + " | ".join(systems[n]["title"] for n in config["systems"]) + " |",
              "|---" * (len(config["systems"]) + 1) + "|"]
    for row in result["rows"]:
        cells = []
        for name in config["systems"]:
            cell = row["cells"].get(name, {})
            cells.append(f"{cell['median_s'] * 1e3:.2f} ({cell['min_s'] * 1e3:.2f}-"
                         f"{cell['max_s'] * 1e3:.2f})" if cell.get("median_s") else "–")
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
