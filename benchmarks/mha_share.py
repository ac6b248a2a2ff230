"""Where multi-head attention spends its time: `python benchmarks/mha_share.py`.

Issue 3's target: at a BERT-base layer (B=8, S=256, E=768, H=12, float32, biases) at
least 90% of the time in BLAS and the fused kernel. Runs the calls under `perf record`
(Linux perf, started disabled and switched on through a control FIFO only around the
timed calls, so imports and set-up are not counted) and prints each shared object's share
of all samples, user and kernel, all threads. Not an asv benchmark: nothing runs on import.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

CALLS = 60


def _calls():
    # the profiled child: warm up, then tell perf to sample the timed calls only
    import fastattn
    rng = np.random.default_rng(0)
    B, S, E, H = 8, 256, 768, 12
    x = rng.standard_normal((B, S, E), dtype=np.float32)
    w = {f"{n}_weight": (rng.standard_normal((E, E)) / np.sqrt(E)).astype(np.float32)
         for n in ("q", "k", "v", "out")}
    b = {f"{n}_bias": np.zeros(E, np.float32) for n in ("q", "k", "v", "out")}

    def call():
        fastattn.multi_head_attention(x, x, x, H, **w, **b)

    for _ in range(3):
        call()
    ctl, ack = os.environ["MHA_SHARE_CTL"], os.environ["MHA_SHARE_ACK"]

    def command(word):
        with open(ctl, "w") as f:
            f.write(word + "\n")
        with open(ack) as f:
            f.read(5)

    command("enable")
    for _ in range(CALLS):
        call()
    command("disable")


def main():
    if shutil.which("perf") is None:
        sys.exit("mha_share: needs Linux perf on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data = (os.path.join(tmp, n) for n in ("ctl", "ack", "perf.data"))
        os.mkfifo(ctl)
        os.mkfifo(ack)
        env = dict(os.environ, MHA_SHARE_CTL=ctl, MHA_SHARE_ACK=ack)
        subprocess.run(["perf", "record", "-q", "-D", "-1", f"--control=fifo:{ctl},{ack}",
                        "-o", data, sys.executable, __file__, "--child"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort",
                                 "dso,symbol", "--stdio", "-q"],
                                capture_output=True, text=True, check=True).stdout
    shares = {}
    for line in report.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith("%"):
            continue
        pct, dso, symbol = float(fields[0][:-1]), fields[1], fields[3]
        if "openblas" in dso and symbol.startswith("sgemm"):
            group = "BLAS sgemm"
        elif dso.startswith(("dense.", "linear.")):
            group = "fastattn kernels"
        else:
            group = dso
        shares[group] = shares.get(group, 0.0) + pct
    total = sum(shares.values())
    for group, pct in sorted(shares.items(), key=lambda kv: -kv[1])[:8]:
        print(f"{pct / total:7.1%}  {group}")
    inside = (shares.get("BLAS sgemm", 0.0) + shares.get("fastattn kernels", 0.0)) / total
    print(f"multi_head_attention B=8 S=256 E=768 H=12, {CALLS} calls: {inside:.1%} of the "
          f"samples in BLAS and the fused kernels (target >= 90%)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _calls()
    else:
        main()
