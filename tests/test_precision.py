"""`train.precision=auto` on CPU (the probe, injected timings, its cache and header line), and
bf16 on CPU: loss close to fp32 over 200 steps, exact resume."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL, full_and_split_losses, read_metrics, run_cli

from tinylm.config import ConfigError, load_config
from tinylm.train import precision
from tinylm.train.precision import BF16_MARGIN, ProbeResult, choose_cpu_precision

MICRO = ["model.context_length=16", "model.n_layer=1", "model.n_head=2", "model.d_model=16"]


@pytest.fixture
def probing(monkeypatch):
    """Unpin the suite's TINYLM_PRECISION_AUTO=fp32 and count the probe's measurements."""
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    calls = []

    def inject(fp32_s, bf16_s, ns=(None, None), bf32_s=None):
        def fake(model_cfg, rows, seq_len, *, muon):
            calls.append((rows, seq_len, muon))
            return ProbeResult(fp32_s, bf16_s, rows, ns[0], ns[1], bf32_s=bf32_s)

        monkeypatch.setattr(precision, "measure", fake)
        return calls

    return inject


def cfg_for(*overrides):
    cfg = load_config("tiny", [*MICRO, "model.vocab_size=64", *overrides])
    return cfg


def test_a_host_without_native_bf16_keeps_fp32(probing):
    """Timings of an AVX2 host (bf16 emulated, ~15x slower): the choice is never slower."""
    probing(fp32_s=0.010, bf16_s=0.150, ns=(0.05, 1.0))
    p = choose_cpu_precision(cfg_for("optim.name=muon"))
    assert p.name == "fp32" and p.muon_ns_dtype == "float32"
    assert p.reason.startswith("auto -> fp32 (probe: bf16 autocast 0.07x fp32 on this CPU")


def test_bf16_within_the_margin_is_not_worth_its_precision_loss(probing):
    probing(fp32_s=0.0100, bf16_s=0.0100 / (BF16_MARGIN - 0.02))
    assert choose_cpu_precision(cfg_for()).name == "fp32"


def test_an_amx_host_picks_bf16_and_says_by_how_much(probing):
    calls = probing(fp32_s=0.022, bf16_s=0.010, ns=(0.30, 0.10))
    p = choose_cpu_precision(cfg_for("optim.name=muon", "train.batch_size=6"))
    assert p.name == "bf16" and p.muon_ns_dtype == "bfloat16"
    assert p.reason == "auto -> bf16 (probe: 2.2x fp32 on this CPU; Muon Newton-Schulz in bfloat16)"
    assert calls == [(6, 16, True)]  # the run's own micro-batch and context


def test_a_compiled_run_past_the_gate_takes_bf16_whatever_the_eager_ratio(probing):
    """Eager timings of the `tiny` shape on the AMX host (bf16 0.86x, bf32 1.18x fp32), where
    compiled bf16 ran 1.42x and compiled bf32 1.21x: compiled, the run takes bf16; eager, bf32."""
    probing(fp32_s=0.0100, bf16_s=0.0100 / 0.86, bf32_s=0.0100 / 1.18)
    eager = choose_cpu_precision(cfg_for(), compiled=False)
    assert eager.name == "bf32"
    compiled = choose_cpu_precision(cfg_for(), compiled=True)  # the same cached measurement
    assert compiled.name == "bf16"
    assert compiled.reason.startswith("auto -> bf16 (cached probe: a compiled run, ")
    assert "eager, bf16 0.86x and bf32 1.18x fp32" in compiled.reason


def test_a_compiled_run_without_native_bf16_stays_fp32(probing, monkeypatch):
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)

    def emulated(model_cfg, rows, seq_len, *, muon):
        return ProbeResult(0.01, None, rows=1, matmul_speedup=0.07)

    monkeypatch.setattr(precision, "measure", emulated)
    assert choose_cpu_precision(cfg_for(), compiled=True).name == "fp32"


def test_the_run_tells_the_probe_whether_it_will_compile(probing, monkeypatch):
    """select_precision passes the run's own compile decision (train.compile, and for `auto`
    the run's length) to the choice."""
    from tinylm.train import runtime

    seen = []
    real = runtime.choose_cpu_precision
    monkeypatch.setattr(
        runtime,
        "choose_cpu_precision",
        lambda cfg, compiled: seen.append(compiled) or real(cfg, compiled=compiled),
    )
    probing(fp32_s=0.02, bf16_s=0.01)
    cpu = torch.device("cpu")
    for setting, steps, want in [("true", 10, True), ("false", 10**9, False),
                                 ("auto", 10, False), ("auto", 10**9, True)]:  # fmt: skip
        cfg = cfg_for(f"train.compile={setting}", f"train.max_steps={steps}")
        runtime.select_precision("auto", cpu, cfg)
        assert seen[-1] is want, (setting, steps)


def test_a_probe_on_fewer_rows_says_so(probing, monkeypatch):
    def fewer(model_cfg, rows, seq_len, *, muon):
        return ProbeResult(0.02, 0.01, rows=2)

    monkeypatch.setattr(precision, "measure", fewer)
    p = choose_cpu_precision(cfg_for("train.batch_size=16"))
    assert p.reason == "auto -> bf16 (probe: 2.0x fp32 on this CPU, timed at 2 of 16 rows)"


def test_the_probe_is_cached_per_host_and_shape(probing):
    calls = probing(fp32_s=0.02, bf16_s=0.01)
    assert choose_cpu_precision(cfg_for()).name == "bf16"
    again = choose_cpu_precision(cfg_for())  # same shape: from the cache, no measurement
    assert again.name == "bf16" and again.reason.startswith("auto -> bf16 (cached probe: 2.0x")
    assert len(calls) == 1
    choose_cpu_precision(cfg_for("train.batch_size=3"))  # another micro-batch: measured
    choose_cpu_precision(cfg_for("model.d_model=32"))  # another model: measured
    assert len(calls) == 3


def test_an_instruction_set_cap_is_another_host_to_the_cache(probing, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 takes AMX away without changing /proc/cpuinfo: the AMX host's
    cached bf16 must not be reused for it."""
    for name in precision.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    calls = probing(fp32_s=0.02, bf16_s=0.01)
    assert choose_cpu_precision(cfg_for()).name == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.cpu_signature().endswith("(ONEDNN_MAX_CPU_ISA=AVX2)")
    probing(fp32_s=0.01, bf16_s=0.15)
    assert choose_cpu_precision(cfg_for()).name == "fp32" and len(calls) == 2  # measured anew


def test_the_env_pin_skips_the_probe_and_a_bad_pin_is_refused(probing, monkeypatch):
    calls = probing(fp32_s=0.02, bf16_s=0.01)
    monkeypatch.setenv(precision.AUTO_ENV, "fp32")
    assert (
        choose_cpu_precision(cfg_for()).reason
        == "auto -> fp32 (TINYLM_PRECISION_AUTO=fp32, no probe)"
    )
    monkeypatch.setenv(precision.AUTO_ENV, "fp64")
    with pytest.raises(ConfigError, match="TINYLM_PRECISION_AUTO='fp64': use fp32, bf16 or bf32"):
        choose_cpu_precision(cfg_for())
    assert calls == []


def test_the_real_probe_times_both_precisions_within_its_budget(monkeypatch):
    monkeypatch.setattr(precision, "matmul_speedup", lambda: 2.0)  # the gate open on any host
    cfg = cfg_for("optim.name=muon")
    r = precision.measure(cfg.model, 4, 16, muon=True, budget_s=0.3)
    assert r.fp32_s > 0 and r.bf16_s > 0 and 1 <= r.rows <= 4 and r.matmul_speedup == 2.0
    assert r.ns_fp32_s > 0 and r.ns_bf16_s > 0
    assert torch.get_num_threads() == 1  # it ran at the run's thread count (conftest's 1)


def test_a_slow_bf16_matmul_keeps_the_model_out_of_bf16(monkeypatch):
    """The gate shut (an AVX2 host's emulated bf16): fp32 for the model and Muon, and not one
    step of the model under bf16 autocast."""
    monkeypatch.setattr(precision, "matmul_speedup", lambda: 0.07)
    autocasts = []
    real_autocast = torch.autocast

    def counting_autocast(*args, enabled=True, **kwargs):
        autocasts.append(enabled)
        return real_autocast(*args, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", counting_autocast)
    cfg = cfg_for("optim.name=muon")
    r = precision.measure(cfg.model, 4, 16, muon=True, budget_s=0.3)
    assert r.gated and r.bf16_s is None and r.choice == "fp32" and r.ns_choice == "float32"
    assert autocasts and not any(autocasts)  # fp32 steps only
    r.extra["rows_of"] = 4
    assert precision.describe(r, from_cache=False) == (
        "auto -> fp32 (probe: a bf16 matmul is 0.07x fp32 on this CPU, no bf16 matrix units, "
        "so the model was not timed in bf16; Muon Newton-Schulz in float32)"
    )


def test_the_matmul_gate_measures_this_host():
    assert precision.matmul_speedup(budget_s=0.02) > 0


def test_the_run_header_and_dry_run_show_the_probe(probing, tmp_path, corpus, capsys):
    probing(fp32_s=0.022, bf16_s=0.010)
    common = [f"data.train={corpus}", f"out_dir={tmp_path}", *SMALL]
    assert run_cli("train", "tiny", *common, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "precision: auto -> bf16 (probe: 2.2x fp32 on this CPU)" in out
    assert "bf16 activations at batch 8 x 32" in out  # the memory estimate of the chosen one
    assert run_cli("train", "tiny", *common, "run_name=r", "train.max_steps=2") == 0
    out = capsys.readouterr().out
    assert "precision: auto -> bf16 (cached probe: 2.2x fp32 on this CPU)" in out
    start = [e for e in read_metrics(tmp_path / "r", "event") if e["event"] == "start"]
    assert start[0]["precision"] == "bf16"


def test_bf16_loss_tracks_fp32_over_200_steps(tmp_path, corpus):
    """Same seed, 200 steps: the bf16 run's mean loss over the last 50 steps is within 2% of
    fp32's (measured: 0.2343 vs 0.2330, 0.6%; fp16 0.2329), and both learned (from ~2.95)."""
    common = [
        f"data.train={corpus}", f"out_dir={tmp_path}", "train.max_steps=200", "eval.interval=0",
        "log.interval=50", "checkpoint.interval=0", "eval.samples=0", "optim.lr=3e-3",
        "model.context_length=32", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
        "train.batch_size=4", "eval.max_batches=1", "log.tensorboard=false", "log.progress=false",
        "data.num_workers=1",
    ]  # fmt: skip
    for p in ("fp32", "bf16"):
        assert run_cli("train", "tiny", f"run_name={p}", f"train.precision={p}", *common) == 0
    fp32, bf16 = (read_metrics(tmp_path / p, "train")[-1]["loss"] for p in ("fp32", "bf16"))
    assert fp32 < 0.5 and bf16 < 0.5
    assert abs(bf16 - fp32) / fp32 < 0.02, (fp32, bf16)


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_resume_is_bit_identical_in_half_precision(tmp_path, corpus, prec):
    """2N steps in one go == N steps, stop, resume, N more: weights, losses and (fp16) the
    grad scaler's state, which the checkpoint carries."""
    common = [
        f"data.train={corpus}", f"out_dir={tmp_path}", "log.interval=1", "eval.interval=0",
        "eval.samples=0", "model.dropout=0.1", "optim.warmup_steps=2", f"train.precision={prec}",
        *SMALL,
    ]  # fmt: skip
    full, split = full_and_split_losses(tmp_path, common, 6)
    assert len(full) == 6 and split == full
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / r / "checkpoints" / "step_00000006" / "model.safetensors")
        for r in ("full", "split")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    if prec == "fp16":
        scales = [read_metrics(tmp_path / r, "train")[-1]["grad_scale"] for r in ("full", "split")]
        assert scales[0] == scales[1] == 65536.0


def test_bf32_is_chosen_where_it_is_the_fastest(probing):
    """nanoGPT's CPU-recipe shape on an AMX host (d_model 128): bf16 autocast 0.77x fp32, bf32
    (fp32 tensors, bf16-input matmuls) faster; where bf16 is the faster one, bf16; where neither
    clears the margin, fp32."""
    probing(fp32_s=0.020, bf16_s=0.026, bf32_s=0.012)
    p = choose_cpu_precision(cfg_for())
    assert p.name == "bf32" and "auto -> bf32" in p.reason and "1.7x fp32" in p.reason, p.reason
    assert "bf16 0.77x" in p.reason, p.reason
    probing(fp32_s=0.020, bf16_s=0.010, bf32_s=0.014)
    assert choose_cpu_precision(cfg_for("train.batch_size=3")).name == "bf16"
    probing(fp32_s=0.020, bf16_s=0.030, bf32_s=0.020 / (BF16_MARGIN - 0.02))
    p = choose_cpu_precision(cfg_for("train.batch_size=5"))
    assert p.name == "fp32" and "bf32 1.08x" in p.reason, p.reason


def test_bf32_runs_matmuls_on_bf16_inputs_in_forward_and_backward_only(tmp_path, corpus):
    """train.precision=bf32: oneDNN's fp32 matmul mode is bf16 inside the step's forward and
    backward passes (and evaluation's forward), torch's own setting everywhere else (the
    optimizer; the process after the run); the losses stay within bf16-input rounding of fp32's."""
    from tinylm.train.trainer import Trainer

    before = torch.backends.mkldnn.matmul.fp32_precision
    seen: dict[str, set[str]] = {"forward": set(), "backward": set(), "optimizer": set()}

    def note(when: str):
        return lambda *_: seen[when].add(torch.backends.mkldnn.matmul.fp32_precision)

    common = [
        f"data.train={corpus}",
        *SMALL,
        "train.max_steps=6",
        "eval.interval=0",
        "log.interval=1",
    ]
    losses = {}
    for prec in ("fp32", "bf32"):
        cfg = load_config("tiny", [*common, f"train.precision={prec}", "train.compile=false"])
        trainer = Trainer(cfg, tmp_path / prec)
        if prec == "bf32":
            mlp = trainer.raw_model.blocks[0].mlp
            mlp.register_forward_hook(note("forward"))
            mlp.register_full_backward_hook(note("backward"))
            for part in trainer.optimizer.optimizers:  # Muon (its Newton-Schulz matmuls), AdamW
                part.register_step_pre_hook(note("optimizer"))
        trainer.fit()
        losses[prec] = [r["loss"] for r in read_metrics(tmp_path / prec, "train")]
    assert seen == {"forward": {"bf16"}, "backward": {"bf16"}, "optimizer": {before}}, seen
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert len(losses["bf32"]) == 6 and losses["bf32"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_bf32_is_a_cpu_mode():
    from tinylm.train import runtime

    with pytest.raises(ConfigError, match="bf32 is a CPU mode"):
        runtime.select_precision("bf32", torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"not supported on train\.device=xla"):
        load_config("tiny", ["train.device=xla", "train.precision=bf32"])
