"""`tinylm estimate --device tpu-...`: TPU slices from the peak table (tinylm/tpu.py)."""

from __future__ import annotations

import pytest
from helpers import run_cli

from tinylm.tpu import parse_slice


@pytest.mark.parametrize(
    "name, chips, devices, tflops, hbm_gib",
    [
        ("tpu-v3-8", 4, 8, 61.5, 16),  # 2 TensorCores per chip, one XLA device each
        ("tpu-v4-8", 4, 4, 275, 32),  # megacore: one device per chip
        ("tpu-v5e-8", 8, 8, 197, 16),  # v5e counts chips
        ("v5e-4", 4, 4, 197, 16),
        ("tpu-v2-32", 16, 32, 22.5, 8),
    ],
)
def test_slices(name, chips, devices, tflops, hbm_gib):
    s = parse_slice(name)
    assert (s.chips, s.devices, s.tflops_per_device) == (chips, devices, tflops)
    assert s.hbm_bytes_per_device == hbm_gib * 1024**3


@pytest.mark.parametrize("name", ["tpu-v3-7", "tpu-v9-8", "tpu-v3", "gpu-v3-8", "tpu-v4-0"])
def test_bad_slice_names(name):
    with pytest.raises(ValueError, match=r"tpu-v3-8|multiple of"):
        parse_slice(name)


def test_estimate_on_a_tpu_slice(capsys):
    assert run_cli("estimate", "gpt2-124m", "--device", "tpu-v3-8") == 0
    v3 = capsys.readouterr().out
    assert "4 chips, 8 XLA devices x 61.5 TFLOP/s bf16 peak, 16 GiB HBM each" in v3
    assert "on 8 devices" in v3 and "at 61.5 TFLOP/s peak per device x MFU 0.4" in v3
    assert "of 16.00 GiB HBM (fits)" in v3
    assert run_cli("estimate", "gpt2-124m", "--device", "tpu-v4-8") == 0
    v4 = capsys.readouterr().out
    assert "on 4 devices" in v4 and "at 275 TFLOP/s peak per device" in v4
    assert run_cli("estimate", "gpt2-124m", "train.batch_size=512", "--device", "tpu-v5e-8") == 0
    assert "HBM (does not fit" in capsys.readouterr().out
