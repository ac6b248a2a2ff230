"""fastattn.show_config(): the build and run-time report."""
import os
import subprocess
import sys

import pytest

import fastattn
from fastattn._kernels import buildinfo


def test_show_config_prints_every_section(capsys):
    assert fastattn.show_config() is None
    out = capsys.readouterr().out
    for heading in ("Build:", "Threading:", "SIMD on this CPU:", "BLAS:", "Dependencies:",
                    "Devices: cpu"):
        assert heading in out
    assert "compiler: " in out and "not OpenMP" in out


def test_show_config_dicts_agree_with_the_kernels():
    config = fastattn.show_config(mode="dicts")
    build = buildinfo.build_info()
    assert config["build"]["compiler"] == build["compiler"]
    assert config["threading"]["default threads"] == fastattn.get_num_threads()
    simd = config["SIMD on this CPU"]
    assert simd["bfloat16 products"].startswith("AVX512_BF16") == build["bf16_dot"]
    assert simd["float32 tile products"].startswith("AVX-512") == build["tile_kernels"]
    assert config["BLAS"]["kernels (SciPy's; 1 thread while they run)"], "SciPy's BLAS"
    assert config["dependencies"]["numpy"]


def test_show_config_names_the_half_fallback_switch():
    if not buildinfo.build_info()["bf16_dot"]:
        pytest.skip("this CPU has no AVX512_BF16: nothing to switch off")
    env = dict(os.environ, FASTATTN_HALF_FALLBACK="1")
    code = ("import fastattn; print(fastattn.show_config(mode='dicts')"
            "['SIMD on this CPU']['bfloat16 products'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "FASTATTN_HALF_FALLBACK" in out


def test_show_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        fastattn.show_config(mode="yaml")
