"""Cloud TPU slices for `tinylm estimate --device tpu-v3-8`: chips, XLA devices, peak, memory.

A slice is named by generation and a count: TensorCores for v2, v3, v4 and v5p (two per chip;
`v3-8` is 4 chips), chips for v5e and v6e (one core each; `v5e-8` is 8 chips). PyTorch/XLA runs
one replica per XLA device: each TensorCore on v2/v3, each chip on v4/v5p (their two cores act
as one "megacore" device), each chip on v5e/v6e. Peaks are dense bf16 TFLOP/s per chip and HBM
per chip, from Google Cloud's TPU system architecture pages; nothing here was measured (no TPU
was available to this project): MFU on a TPU is the user's to measure.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Generation:
    tflops_per_chip: float  # dense bf16 peak
    hbm_gib_per_chip: float
    cores_per_chip: int
    devices_per_chip: int  # XLA devices (replicas) PyTorch/XLA sees per chip
    counts: str  # what the number in the slice name counts: "cores" or "chips"


GENERATIONS = {
    "v2": Generation(45.0, 16.0, 2, 2, "cores"),
    "v3": Generation(123.0, 32.0, 2, 2, "cores"),
    "v4": Generation(275.0, 32.0, 2, 1, "cores"),
    "v5e": Generation(197.0, 16.0, 1, 1, "chips"),
    "v5p": Generation(459.0, 95.0, 2, 1, "cores"),
    "v6e": Generation(918.0, 32.0, 1, 1, "chips"),
}
MAX_COUNT = 2**14  # larger than any slice sold (v4 pods: 4,096 chips)


@dataclass(frozen=True)
class Slice:
    """A TPU slice: how many chips and XLA devices, and the per-device peak and memory."""

    name: str
    generation: str
    chips: int
    devices: int
    tflops_per_device: float
    hbm_bytes_per_device: int

    def describe(self) -> str:
        gib = self.hbm_bytes_per_device / 1024**3
        return (
            f"TPU {self.generation} slice {self.name}: {self.chips} chips, {self.devices} XLA "
            f"devices x {self.tflops_per_device:g} TFLOP/s bf16 peak, {gib:g} GiB HBM each"
        )


def parse_slice(text: str) -> Slice:
    """`tpu-v3-8` -> its Slice; ValueError naming the accepted forms otherwise."""
    known = ", ".join(f"tpu-{g}-N" for g in GENERATIONS)
    m = re.fullmatch(r"(?:tpu-)?(v\d[a-z]?)-(\d{1,6})", text.strip().lower())
    if not m or m.group(1) not in GENERATIONS:
        raise ValueError(f"'{text}' is not a TPU slice; use one of {known} (e.g. tpu-v3-8)")
    gen, count = GENERATIONS[m.group(1)], int(m.group(2))
    per = gen.cores_per_chip if gen.counts == "cores" else 1
    if not 1 <= count <= MAX_COUNT or count % per:
        raise ValueError(
            f"'{text}': a {m.group(1)} slice counts {gen.counts}, a multiple of {per} "
            f"between {per} and {MAX_COUNT}"
        )
    chips = count // per
    devices = chips * gen.devices_per_chip
    return Slice(
        name=text,
        generation=m.group(1),
        chips=chips,
        devices=devices,
        tflops_per_device=gen.tflops_per_chip / gen.devices_per_chip,
        hbm_bytes_per_device=int(gen.hbm_gib_per_chip * 1024**3) // gen.devices_per_chip,
    )


def slice_arg(text: str) -> Slice:
    """argparse type for `--device`: a bad name is a usage error (exit 2)."""
    try:
        return parse_slice(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
