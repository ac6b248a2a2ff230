"""The bad-input corpus (tests/bad_inputs_corpus.py), run so a crash cannot end the run.

Every row is a wrong call of a public function that must raise its named exception
type (TypeError, ValueError, MemoryError, AxisError; KeyError only where documented)
with the argument it is about in the message: no crash, no silent result, no
internal AttributeError / IndexError / KeyError. The rows run in batches, each in a
fresh interpreter; a batch whose interpreter dies fails its test, naming the row it
was running.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastattn
from bad_inputs_corpus import cases

HERE = Path(__file__).resolve().parent
BATCH = 150
N = len(cases())

CHILD = """
import json, sys
import bad_inputs_corpus as corpus
rows = corpus.cases()[int(sys.argv[1]):int(sys.argv[2])]
for case in rows:
    print("RUN " + case.id, flush=True)
    print("RESULT " + json.dumps([case.id, corpus.run_case(case)]), flush=True)
"""


def test_corpus_size():
    assert N >= 300
    ids = [c.id for c in cases()]
    assert len(set(ids)) == len(ids)
    # every public function (and class) of fastattn has rows
    public = {n for n in fastattn.__all__ if callable(getattr(fastattn, n))} - {
        "get_num_threads", "devices", "bfloat16"}
    covered = {n for n in public if any(i.split("-")[0].split(".")[0] in
                                        (n, _short.get(n, n)) for i in ids)}
    assert covered == public, public - covered


_short = {"scaled_dot_product_attention": "sdpa", "block_sparse_attention": "block_sparse",
          "scaled_dot_product_attention_backward": "sdpa_backward",
          "local_attention": "local", "strided_attention": "strided",
          "global_attention": "global", "longformer_attention": "longformer",
          "bigbird_attention": "bigbird", "lsh_attention": "lsh",
          "clustered_attention": "clustered", "linear_attention": "linear",
          "performer_attention": "performer", "linformer_attention": "linformer",
          "synthesizer_attention": "synthesizer", "multi_head_attention": "mha",
          "sinusoidal_positional_encoding": "sinusoidal", "additive_attention": "additive",
          "concat_attention": "concat", "general_attention": "general",
          "dot_attention": "dot", "paged_attention": "paged"}


@pytest.mark.parametrize("lo", range(0, N, BATCH))
def test_bad_inputs_raise_named_errors(lo):
    hi = min(lo + BATCH, N)
    pkg_root = str(Path(fastattn.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                 if p]))
    res = subprocess.run([sys.executable, "-c", CHILD, str(lo), str(hi)], capture_output=True,
                         text=True, env=env, cwd=str(HERE), timeout=600)
    lines = res.stdout.splitlines()
    running = [line[4:] for line in lines if line.startswith("RUN ")]
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    assert res.returncode == 0, (f"the interpreter died (exit {res.returncode}) running "
                                 f"{running[-1] if running else '?'}:\n{res.stderr[-3000:]}")
    assert len(results) == hi - lo, res.stderr[-3000:]
    failures = [f"{case_id}: {problem}" for case_id, problem in results if problem]
    assert not failures, "\n".join(failures)
