"""docs/examples/train_tiny_transformer.py trains: its loss falls, briefly and small.

(The full run, loss below the stated threshold within a minute, is what the docs build
runs and what the training guide reports; here a few dozen steps of a small model.)
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastattn

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "train_tiny_transformer.py"
SMALL = ["--digits", "4", "--dim", "32", "--heads", "2", "--batch", "32", "--log-every", "1000",
         "--time-limit", "300"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_tiny_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_decreases_and_the_curve_is_saved(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    model, history, fig = example.main(SMALL + ["--steps", "60", "--threshold", "0",
                                                "--out", str(out)])
    import matplotlib.pyplot as plt
    plt.close(fig)
    losses = np.array([loss for _, _, loss in history])
    assert len(history) == 60 and np.isfinite(losses).all()
    assert losses[:5].mean() > 1.5                     # near guessing, ln 10 = 2.3
    assert losses[-10:].mean() < 0.7 * losses[:5].mean()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "greedy generation sorts" in printed and str(out) in printed


def test_stops_at_the_threshold(example, tmp_path):
    model, history = example.train(example.parse_args(
        SMALL + ["--steps", "500", "--threshold", "1.5", "--window", "5",
                 "--out", str(tmp_path / "unused.png")]))
    losses = [loss for _, _, loss in history]
    assert len(history) < 500 and np.mean(losses[-5:]) < 1.5


def test_gradients_match_finite_differences(example):
    # the hand-written backward of the whole model, in float64, along random directions
    model = example.TinyTransformer(8, dim=16, heads=2, layers=2, seed=0)
    for i, mha in enumerate(model.attn):
        for name in mha.state_dict():
            a = getattr(mha, name).astype(np.float64)
            setattr(mha, name, a)
            model.params[f"{i}.attn.{name}"] = a
    for name in model.params:
        model.params[name] = model.params[name].astype(np.float64, copy=False)
    rng = np.random.default_rng(0)
    tokens, targets, weight = example.sorting_batch(rng, 3, 4)

    def loss():
        return example.cross_entropy(model.forward(tokens)[0], targets, weight)[0]

    logits, cache = model.forward(tokens)
    grads = model.backward(example.cross_entropy(logits, targets, weight)[1], cache)
    assert grads.keys() == model.params.keys()
    for name, p in model.params.items():
        d = rng.standard_normal(p.shape)
        p += 1e-6 * d
        up = loss()
        p -= 2e-6 * d
        down = loss()
        p += 1e-6 * d
        numeric = (up - down) / 2e-6
        assert abs(numeric - float((grads[name] * d).sum())) <= 1e-6 * max(1.0, abs(numeric)), name


def test_runs_as_a_script_outside_the_repository(tmp_path):
    # a copy of the script in an empty directory, fastattn found as an installed package
    pytest.importorskip("matplotlib")
    script = tmp_path / "train_tiny_transformer.py"
    shutil.copy(EXAMPLE, script)
    env = dict(os.environ, PYTHONPATH=str(Path(fastattn.__file__).resolve().parent.parent),
               MPLBACKEND="Agg")
    out = tmp_path / "curve.png"
    done = subprocess.run([sys.executable, str(script), *SMALL, "--steps", "3", "--threshold",
                           "0", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loss curve saved" in done.stdout and out.exists()
