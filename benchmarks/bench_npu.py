"""The Ascend NPU path (issue 6): dense, causal and paged decode with device-resident
inputs, transfers timed separately. Skipped when the ``ascend`` package lacks the
feature or no device is present (``ascend.device_count() == 0``); pointing
``ASCEND_HOME_PATH`` at the AscendCL test double (``tests/ascend_sim``) runs it
against the simulator, which measures the Python/ctypes overhead per call (target
< 100 µs for a dense call with resident inputs).
"""
import functools
import inspect

import numpy as np

import fastattn

from . import common

DEVICE = "npu"


def require_device():
    """The ``ascend`` module when an NPU is usable, else ``NotImplementedError``."""
    try:
        import ascend
    except ImportError:
        raise NotImplementedError("no ascend package") from None
    device_count = common.require("device_count", ascend)
    common.require("to_device", ascend)
    if device_count() == 0:
        raise NotImplementedError("no Ascend device (ascend.device_count() == 0)")
    return ascend


class NpuSdpa:
    """B=1 H=8 E=64 float16, dense or causal, inputs already on the device."""
    params = [[128, 2048], ["dense", "causal"]]
    param_names = ["length", "kind"]

    def setup(self, length, kind):
        self.ascend = require_device()
        self.host = common.qkv(1, common.HEADS, length, length, dtype=np.float16)
        self.resident = [self.ascend.to_device(a) for a in self.host]
        self.is_causal = kind == "causal"
        self.flops = functools.partial(common.attention_flops, 1, common.HEADS, length, length, common.HEAD_DIM,
                                            common.HEAD_DIM, self.is_causal)

    def teardown(self, length, kind):
        # asv calls teardown even when setup raised NotImplementedError (skipped)
        for array in getattr(self, "resident", []):
            array.free()

    def _run(self):
        out = fastattn.scaled_dot_product_attention(*self.resident, is_causal=self.is_causal,
                                                    device=DEVICE)
        out.free()

    def time_resident(self, length, kind):
        self._run()

    def time_upload_qkv(self, length, kind):
        for array in [self.ascend.to_device(a) for a in self.host]:
            array.free()

    def time_host_round_trip(self, length, kind):
        # NumPy in, NumPy out: upload + compute + download, what a casual caller sees
        fastattn.scaled_dot_product_attention(*self.host, is_causal=self.is_causal,
                                              device=DEVICE)

    def track_gflops(self, length, kind):
        return common.gflops(self._run, self.flops)
    track_gflops.unit = "GFLOP/s"


class NpuPagedDecode:
    """Paged decode on the device: B=4 H=32 H_kv=8 head_dim 128 float16, T=1.

    The cache is a ``PagedKVCache(..., device="npu")``: its pools stay on the device.
    ``time_paged_decode`` is the step with a resident query (no transfer at all
    but the int32 block table), ``time_upload_query`` the query's transfer,
    ``time_append_one_token`` one token's keys and values written into the pools,
    and ``time_host_round_trip`` the step with a NumPy query and result.
    """
    params = [[512, 4096]]
    param_names = ["seq_len"]

    def setup(self, seq_len):
        self.ascend = require_device()
        paged_kv_cache = common.require("PagedKVCache")
        if "device" not in inspect.signature(paged_kv_cache).parameters:
            raise NotImplementedError("PagedKVCache has no device= yet (issue 6)")
        self.paged_attention = common.require("paged_attention")
        from .bench_paged import BLOCK_SIZE, HEAD_DIM, HEADS, KV_HEADS
        batch = 4
        blocks_per_seq = -(-seq_len // BLOCK_SIZE)
        # one spare block so time_append_one_token can start a new sequence
        self.cache = paged_kv_cache(batch * blocks_per_seq + 1, BLOCK_SIZE, KV_HEADS, HEAD_DIM,
                                    dtype=np.float16, device=DEVICE)
        seq_ids = [self.cache.add_sequence() for _ in range(batch)]
        for i, seq_id in enumerate(seq_ids):
            keys = common.random_array((KV_HEADS, seq_len, HEAD_DIM), 70 + i, np.float16)
            self.cache.append(seq_id, keys, keys)
        self.table, self.lengths = self.cache.block_table(seq_ids)
        self.host_query = common.random_array((batch, HEADS, 1, HEAD_DIM), 80, np.float16)
        self.query = self.ascend.to_device(self.host_query)
        self.token = self.host_query[0, :KV_HEADS]

    def teardown(self, seq_len):
        # asv calls teardown even when setup raised NotImplementedError (skipped)
        if getattr(self, "query", None) is not None:
            self.query.free()
        if getattr(self, "cache", None) is not None:
            self.cache.close()

    def time_paged_decode(self, seq_len):
        out = self.paged_attention(self.query, self.cache.key_blocks, self.cache.value_blocks,
                                   self.table, self.lengths, device=DEVICE)
        out.free()

    def time_upload_query(self, seq_len):
        self.ascend.to_device(self.host_query).free()

    def time_append_one_token(self, seq_len):
        # a new sequence's first token, then freed, so the cache is unchanged
        seq_id = self.cache.add_sequence()
        self.cache.append(seq_id, self.token, self.token)
        self.cache.free(seq_id)

    def time_host_round_trip(self, seq_len):
        # NumPy query in, NumPy result out: query upload + compute + download
        self.paged_attention(self.host_query, self.cache.key_blocks, self.cache.value_blocks,
                             self.table, self.lengths, device=DEVICE)
