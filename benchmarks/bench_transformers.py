"""Per-token decode latency of a small Hugging Face model: the fastattn backend against
transformers' own "sdpa" (PyTorch's CPU kernels), same weights, same threads.

asv: ``TransformersDecode.time_decode_token`` (skipped without torch and transformers).
As a script, the A/B comparison the issue's target asks for, interleaved by rounds:

    python -m benchmarks.bench_transformers [--threads 2] [--steps 32] [--rounds 7]

One decode step is the model's forward pass for one new token per sequence over a
DynamicCache holding the prompt (what ``generate`` does per token); the cache is cropped
back after each step, so every step sees the same prompt length. The model: a
Llama-style decoder with random weights (4 layers, hidden 512, 8 query heads over 2
key/value heads of 64), prompts of 512 tokens; batch 1 (no mask: transformers passes
``is_causal``) and batch 4 left-padded (a boolean mask every step).
"""
import argparse
import statistics
import time

PROMPT = 512
SEED = 20240601
CASES = {"batch1": (1, ()), "batch4-left-padded": (4, (0, 37, 101, 250))}


def _imports():
    try:
        import torch
        import transformers
    except ImportError as error:
        raise NotImplementedError(f"needs torch and transformers ({error})") from None
    import fastattn.integrations.transformers as fastattn_hf
    fastattn_hf.register()
    return torch, transformers


def build_model():
    torch, transformers = _imports()
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=4096)
    torch.manual_seed(SEED)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


class DecodeStep:
    """One model, one prompt batch, prefilled once; ``step()`` decodes one token."""

    def __init__(self, model, batch, left_pad):
        torch, transformers = _imports()
        self.torch, self.model = torch, model
        gen = torch.Generator().manual_seed(SEED)
        ids = torch.randint(3, 1024, (batch, PROMPT), generator=gen)
        mask = torch.ones(batch, PROMPT, dtype=torch.long)
        for row, pad in enumerate(left_pad):
            mask[row, :pad] = 0
        self.mask = mask if left_pad else None
        self.cache = transformers.DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(ids, attention_mask=self.mask, cache=self.cache, use_cache=True)
        self.token = out.logits[:, -1:].argmax(-1)
        self.step_mask = (None if self.mask is None else
                          torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1))
        self.position = (torch.full((batch, 1), PROMPT) if self.mask is None else
                         (mask.sum(-1, keepdim=True)))

    def step(self):
        with self.torch.inference_mode():
            out = self.model(self.token, attention_mask=self.step_mask,
                             cache=self.cache, position_ids=self.position,
                             use_cache=True)
        self.cache.crop(-1)                 # back to the prompt
        return out.logits


class TransformersDecode:
    """Per-token decode latency, fastattn backend vs sdpa, 2 threads."""
    params = [["fastattn", "sdpa"], list(CASES)]
    param_names = ["implementation", "case"]
    threads = 2

    def setup(self, implementation, case):
        torch, _ = _imports()
        import fastattn
        torch.set_num_threads(self.threads)
        fastattn.set_num_threads(self.threads)
        model = build_model()
        model.set_attn_implementation(implementation)
        self.decode = DecodeStep(model, *CASES[case])
        self.decode.step()

    def time_decode_token(self, implementation, case):
        self.decode.step()


def _timed_backends():
    # Both backends wrapped alike, summing the seconds spent inside the attention
    # function: the attention share of a decode step, apart from the rest of the model.
    torch, transformers = _imports()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import fastattn.integrations.transformers as fastattn_hf
    spent = {}
    for impl, forward in (("fastattn", fastattn_hf.attention_forward),
                          ("torch", sdpa_attention_forward)):
        def timed(*args, _forward=forward, _impl=impl, **kwargs):
            t0 = time.perf_counter()
            result = _forward(*args, **kwargs)
            spent[_impl] += time.perf_counter() - t0
            return result
        spent[impl] = 0.0
        transformers.AttentionInterface.register(f"timed-{impl}", timed)
        AttentionMaskInterface.register(f"timed-{impl}", sdpa_mask)
    return spent


def compare(threads, steps, rounds):
    """Per-token latency of each backend per case, interleaved rounds: rows of
    (case, backend, median ms/token, min, max, attention ms/token (median), logit diff)."""
    torch, _ = _imports()
    import fastattn
    torch.set_num_threads(threads)
    fastattn.set_num_threads(threads)
    model = build_model()
    spent = _timed_backends()
    impls = {"fastattn": "timed-fastattn", "sdpa": "timed-torch"}
    rows = []
    for case, (batch, pad) in CASES.items():
        decoders, logits = {}, {}
        for impl, name in impls.items():
            model.set_attn_implementation(name)
            decoders[impl] = DecodeStep(model, batch, pad)
            logits[impl] = decoders[impl].step()            # warm-up, and a check
        diff = (logits["fastattn"] - logits["sdpa"]).abs().max().item()
        times = {impl: [] for impl in impls}
        attention = {impl: [] for impl in impls}
        for r in range(rounds):
            order = list(impls) if r % 2 == 0 else list(impls)[::-1]
            for impl in order:
                model.set_attn_implementation(impls[impl])
                key = impls[impl].split("-")[1]
                spent[key] = 0.0
                t0 = time.perf_counter()
                for _ in range(steps):
                    decoders[impl].step()
                times[impl].append((time.perf_counter() - t0) / steps * 1e3)
                attention[impl].append(spent[key] / steps * 1e3)
        for impl, ts in times.items():
            rows.append((case, impl, statistics.median(ts), min(ts), max(ts),
                         statistics.median(attention[impl]), diff))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    rows = compare(args.threads, args.steps, args.rounds)
    print(f"per-token decode, {args.threads} threads, prompt {PROMPT}, "
          f"{args.rounds} rounds x {args.steps} steps (ms per token)")
    print(f"{'case':<20} {'backend':<9} {'median':>8} {'min':>8} {'max':>8} {'attention':>10}"
          f"  logits diff")
    for case, impl, med, lo, hi, att, diff in rows:
        print(f"{case:<20} {impl:<9} {med:8.3f} {lo:8.3f} {hi:8.3f} {att:10.3f}  {diff:.2g}")
    by = {(c, i): (m, a) for c, i, m, _, _, a, _ in rows}
    for case in CASES:
        (mf, af), (ms, as_) = by[case, "fastattn"], by[case, "sdpa"]
        print(f"{case}: fastattn / sdpa = {mf / ms:.3f} per token, {af / as_:.3f} in attention")


if __name__ == "__main__":
    main()
