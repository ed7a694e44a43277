"""`train.compile=auto`: compile only runs long enough to repay the compile time."""

from __future__ import annotations

import os

import pytest
import torch

from tinylm.config import load_config
from tinylm.train import runtime

CPU = torch.device("cpu")
FP32 = runtime.Precision("fp32", "test")


def run_flops(preset: str, *overrides: str) -> float:
    """Training FLOPs of a preset's run, as the trainer computes them."""
    from tinylm.model import GPT

    cfg = load_config(preset, ["model.vocab_size=65", *overrides])
    t = cfg.train
    per_token = GPT(cfg.model).flops_per_token()
    return per_token * t.batch_size * cfg.model.context_length * t.grad_accum * t.max_steps


@pytest.fixture
def with_compiler(monkeypatch):
    monkeypatch.setattr(runtime, "_have_cpp_compiler", lambda: True)


def test_explicit_settings_are_obeyed(monkeypatch):
    monkeypatch.setattr(runtime, "_have_cpp_compiler", lambda: False)
    assert runtime.decide_compile(True, CPU, FP32, run_flops=1.0) == (True, "train.compile=true")
    assert runtime.decide_compile(False, CPU, FP32, run_flops=1e30)[0] is False


def test_auto_is_off_for_short_runs_and_on_for_long_ones(with_compiler):
    cost, gain = runtime.COMPILE_COST_S["cpu"], runtime.COMPILE_GAIN["cpu"]
    # The break-even point: the eager run time at which compiling saves twice its cost.
    breakeven = 2 * cost / gain * runtime.EAGER_FLOPS_CPU
    off, reason = runtime.decide_compile("auto", CPU, FP32, run_flops=0.9 * breakeven)
    assert off is False and "not worth it" in reason
    on, reason = runtime.decide_compile("auto", CPU, FP32, run_flops=1.1 * breakeven)
    assert on is True and reason.startswith("auto: on")


def test_auto_on_real_presets(with_compiler):
    # A test-sized run never compiles (compile would cost more than the whole run) ...
    short = run_flops("tiny", "train.max_steps=12", "train.batch_size=4")
    assert runtime.decide_compile("auto", CPU, FP32, run_flops=short)[0] is False
    # ... a 10x longer tiny run, an hour of CPU, does.
    long = run_flops("tiny", "train.max_steps=20000")
    assert runtime.decide_compile("auto", CPU, FP32, run_flops=long)[0] is True


def test_time_limit_caps_what_compile_can_save(with_compiler):
    huge = 1e18  # would take years eagerly
    assert runtime.decide_compile("auto", CPU, FP32, run_flops=huge)[0] is True
    capped, reason = runtime.decide_compile("auto", CPU, FP32, run_flops=huge, max_seconds=60)
    assert capped is False and "1.0 min" in reason


def test_auto_is_off_without_a_compiler_or_on_mps(monkeypatch):
    monkeypatch.setattr(runtime, "_have_cpp_compiler", lambda: False)
    off, reason = runtime.decide_compile("auto", CPU, FP32, run_flops=1e18)
    assert off is False and "no C++ compiler" in reason
    monkeypatch.setattr(runtime, "_have_cpp_compiler", lambda: True)
    off, reason = runtime.decide_compile("auto", torch.device("mps"), FP32, run_flops=1e18)
    assert off is False and "mps" in reason


def test_a_capped_cpu_capability_compiles_into_a_cache_of_its_own(monkeypatch, tmp_path):
    """inductor's cache ignores ATEN_CPU_CAPABILITY (kernels of another width, loaded back,
    computed wrong values): with it set, the default cache directory gets a suffix; a directory
    the user chose is left alone."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    options = []
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: options.append(kw) or ("compiled", model)
    )
    model = torch.nn.Linear(2, 2)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert runtime.compile_model(model, CPU) == ("compiled", model)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(default_cache_dir()) + "-avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes
    runtime.compile_model(model, CPU)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("-avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    runtime.compile_model(model, CPU)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    runtime.compile_model(model, CPU)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    # a CPU graph's host code in C++ (inductor's cpp_wrapper): ~3% of a nano6 step
    assert options == [{"options": {"cpp_wrapper": True}}] * 4


@pytest.mark.parametrize("prec, rel", [("fp32", 1e-4), ("bf16", 2e-2), ("bf32", 1e-4)])
def test_a_compiled_run_trains_like_the_eager_one(tmp_path, corpus, monkeypatch, prec, rel):
    """train.compile=true end to end on CPU, in the GPT-2 form (LayerNorm, GELU-tanh: its
    sigmoid form under compile, model.gelu_tanh; in bf16 also the attention backward of
    tinylm/cpu_attention.py; in bf32 its fp32 attention operator): the losses of the eager run,
    to fp32 rounding (observed: the 7th digit) or bf16's (observed: the 3rd)."""
    from helpers import SMALL, read_metrics, run_cli

    from tinylm import cpu_attention

    traced = []  # calls while dynamo traces the model: the path its graph takes
    path = {"bf16": "causal_attention", "bf32": "fp32_causal_attention"}.get(prec)
    if path:
        real = getattr(cpu_attention, path)
        monkeypatch.setattr(cpu_attention, path, lambda *a: traced.append(1) or real(*a))
    common = [
        f"data.train={corpus}", f"out_dir={tmp_path}", *SMALL, "train.max_steps=4",
        "log.interval=1", "eval.interval=0", "model.mlp=gelu", "model.norm=layernorm",
        "model.pos_emb=learned", "model.n_kv_head=null", "data.prefetch=0",
        f"train.precision={prec}",
    ]  # fmt: skip
    for name, setting in (("eager", "false"), ("compiled", "true")):
        assert (
            run_cli("train", "tiny", *common, f"run_name={name}", f"train.compile={setting}") == 0
        )
    eager, compiled = (
        [r["loss"] for r in read_metrics(tmp_path / name, "train")]
        for name in ("eager", "compiled")
    )
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=rel)
    assert bool(traced) == (path is not None)
