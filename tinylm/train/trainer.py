"""The training loop.

`Trainer(cfg, run_dir).fit()` trains a model and returns a `TrainResult`. The loop itself is in
`fit` and `train_step`; everything else is delegated: batches to `data.loader`, the schedule and
optimizer to `optim`, checkpoints to `checkpoint`, metrics to `sinks`, signals to `signals`,
devices and precision to `runtime`, processes to `distributed`, validation to `eval.evaluate`.

Two choices keep the step free of host synchronisation (the CPU can queue the next step while the
GPU works): losses are accumulated on the device and read only every `log.interval` steps, and a
non-finite loss or gradient norm skips the update inside fused AdamW through its `found_inf`
input (the mechanism the AMP grad scaler uses) instead of an `if loss.isnan():` on the host.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from tinylm.config import Config, ConfigError
from tinylm.train import checkpoint, distributed, optim, runtime, signals, sinks

# Keys that may differ when a run is resumed without --force: they change when or how the run
# is observed or how long it lasts, not what a given step computes.
RESUME_SAFE_PREFIXES = (
    "train.max_steps",
    "train.max_time_minutes",
    "train.compile",
    "train.device",
    "train.early_stop",
    "train.max_nonfinite_steps",
    "train.spike_factor",
    "train.gap_warn_factor",
    "eval.",
    "checkpoint.",
    "log.",
    "data.num_workers",
    "data.prefetch",
    "data.cache_dir",
    "out_dir",
    "run_name",
)


@dataclass
class LoopState:
    """What the loop knows beyond weights and optimizer; saved in every checkpoint."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    elapsed_seconds: float = 0.0
    last_val_loss: float | None = None


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stop_reason: str
    best_val_loss: float
    last_val_loss: float | None
    last_train_loss: float | None
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)  # train log records (main process)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unsafe_changes(saved: Config, current: Config) -> list[str]:
    """Config keys that differ between the checkpoint and now and would change the run."""
    old, new = flatten(saved.to_dict()), flatten(current.to_dict())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(RESUME_SAFE_PREFIXES):
            if key == "model.vocab_size" and new.get(key) == 0:
                continue  # 0 means "from the tokenizer", which the saved value already is
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


class Trainer:
    """Builds everything a run needs from a `Config`, then runs `fit()`."""

    def __init__(
        self, cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = distributed.setup()
        self.is_main = self.dist.is_main
        self.device, device_reason = runtime.select_device(cfg.train.device, self.dist.local_rank)
        self.precision = runtime.select_precision(cfg.train.precision, self.device)
        self.autocast = runtime.autocast(self.device, self.precision)
        self.state = LoopState()
        # Tracked by step, not by returned path: only the main process gets a path, and every
        # process must agree on whether to enter the collective `_save`.
        self.saved_step = -1
        self.stop = signals.GracefulStop()
        self.messages = [f"device: {device_reason}", f"precision: {self.precision.reason}"]

        resumed = self._find_resume_checkpoint(force) if resume else None
        runtime.seed_everything(cfg.train.seed)
        self._build_data(resumed.tokenizer if resumed else None)
        self._build_model()
        if resumed is not None:
            self._restore(resumed)
        self._wrap_model()
        # Dropout masks differ per rank but are reproducible; a resumed run restores these states.
        if resumed is None:
            runtime.seed_everything(cfg.train.seed + self.dist.rank)

    # ---------------------------------------------------------------- building

    def _find_resume_checkpoint(self, force: bool) -> checkpoint.LoadedCheckpoint:
        root = self.run_dir / "checkpoints"
        latest = checkpoint.find_latest(root)
        if latest is None:
            raise checkpoint.CheckpointError(
                f"--resume: no intact checkpoint in {root}; start a new run without --resume"
            )
        loaded = checkpoint.load_checkpoint(latest)
        changes = unsafe_changes(loaded.config, self.cfg)
        if changes and not force:
            raise ConfigError(
                "the config differs from the checkpoint's in ways that would change the run:\n  "
                + "\n  ".join(changes)
                + "\nResume with the original values, or pass --force to resume anyway."
            )
        if changes:
            self.messages.append("resuming with changed config (--force): " + "; ".join(changes))
        self._note_schedule_change(loaded.config)
        self.cfg.model.vocab_size = loaded.config.model.vocab_size
        self.messages.append(f"resuming from {latest}")
        return loaded

    def _note_schedule_change(self, saved: Config) -> None:
        """max_steps may change on resume, but by default the LR decay runs to max_steps: say so."""
        old, new, opt = saved.train.max_steps, self.cfg.train.max_steps, self.cfg.optim
        if old != new and opt.decay_steps is None and opt.schedule != "constant":
            self.messages.append(
                f"train.max_steps {old} -> {new}: the learning-rate decay runs to max_steps, so "
                "it is rescaled from this step on (the curve jumps); to keep the old schedule, "
                f"resume with optim.decay_steps={old - opt.warmup_steps} --force"
            )

    def _build_data(self, tokenizer) -> None:
        from tinylm.data import resolve_data
        from tinylm.data.loader import BatchLoader

        cfg = self.cfg
        # The main process prepares (and caches) the datasets first; the others then open them.
        if not self.is_main:
            distributed.barrier(self.dist)
        self.data = resolve_data(cfg.data, tokenizer, cfg.model.context_length)
        if self.is_main:
            distributed.barrier(self.dist)
        self.tokenizer = self.data.tokenizer
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        elif cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens; set model.vocab_size=0 to take it from the tokenizer"
            )
        self.loader = BatchLoader(
            self.data.train,
            batch_size=cfg.train.batch_size,
            seq_len=cfg.model.context_length,
            grad_accum=cfg.train.grad_accum,
            seed=cfg.train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            sampling=cfg.data.sampling,
            device=self.device,
            prefetch=cfg.data.prefetch,
        )
        self.token_bytes = self.tokenizer.token_bytes()

    def _build_model(self) -> None:
        from tinylm.model import GPT

        self.model = GPT(self.cfg.model).to(self.device)
        self.raw_model = self.model
        self.optimizer = optim.build_optimizer(self.model, self.cfg.optim, self.device)
        self.fused_optimizer = bool(self.optimizer.defaults.get("fused"))
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        n_all, n_body = self.raw_model.num_params(), self.raw_model.num_params(non_embedding=True)
        self.flops_per_token = self.raw_model.flops_per_token()
        self.messages.append(
            f"model: {n_all / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M without embeddings), "
            f"{self.flops_per_token / 1e6:.1f} MFLOPs/token"
        )

    def _restore(self, loaded: checkpoint.LoadedCheckpoint) -> None:
        state = loaded.train_state(map_location="cpu")
        self.raw_model.load_state_dict(loaded.model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = LoopState(**state["loop"])
        self.saved_step = self.state.step  # on disk already: a resume at max_steps re-saves nothing
        rng_states = state["rng"]
        if len(rng_states) == self.dist.world_size:
            runtime.restore_rng_state(checkpoint.torch_rng_to_numpy(rng_states[self.dist.rank]))
        else:
            runtime.seed_everything(self.cfg.train.seed + self.dist.rank + self.state.step)
            self.messages.append(
                f"world size changed ({len(rng_states)} -> {self.dist.world_size}): dropout RNG reseeded"
            )

    def _wrap_model(self) -> None:
        if self.cfg.train.compile:
            self.model = torch.compile(self.model)
        self.model = distributed.wrap_model(
            self.model, self.cfg.train.distributed, self.dist, self.device
        )

    # ---------------------------------------------------------------- the step

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches; returns (loss, grad_norm) on device."""
        cfg = self.cfg
        optim.set_lr(self.optimizer, optim.lr_at(self.state.step, cfg.optim, cfg.train.max_steps))
        accum = cfg.train.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = next(batches)
            with distributed.grad_sync(self.model, sync=micro == accum - 1), self.autocast:
                _, loss = self.model(x, y)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        loss = loss_sum / accum

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            )
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))

        if self.scaler is not None:  # fp16: the scaler skips steps with inf/nan grads itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused_optimizer:
            self.optimizer.found_inf = nonfinite.float()
            self.optimizer.step()
        elif not nonfinite.item():  # unfused fallback: one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_streak = (self.bad_streak + 1) * nonfinite
        self.bad_total += nonfinite
        return loss, grad_norm

    # ---------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        """Run the loop to `train.max_steps` or a stop; a signal never escapes as an exception."""
        # From here on SIGINT/SIGTERM only set a flag (signals.py), so every exit path below
        # writes its checkpoint and closes the sinks; before this, `train()` handles them.
        with self.stop:
            if self.is_main:
                self._write_run_files()
            self.log = sinks.RunLogger(
                self.run_dir,
                self.cfg.log,
                enabled=self.is_main,
                run_name=self.cfg.run_name,
                config_dict=self.cfg.to_dict(),
                max_steps=self.cfg.train.max_steps,
                start_step=self.state.step,
            )
            try:
                result = self._loop()
            except BaseException as e:
                # Recorded so that `tinylm runs` shows the run as failed rather than running.
                self.log.event(
                    f"failed at step {self.state.step}: {type(e).__name__}: {e}",
                    event="failed",
                    step=self.state.step,
                )
                raise
            finally:
                self.log.close()
        distributed.teardown(self.dist)
        return result

    def _loop(self) -> TrainResult:
        cfg, state, log = self.cfg, self.state, self.log
        for message in self.messages:
            log.print(message)
        tokens_per_step = (
            cfg.train.batch_size
            * cfg.model.context_length
            * cfg.train.grad_accum
            * self.dist.world_size
        )
        peak, peak_reason = runtime.peak_flops(self.device, self.precision)
        log.print(
            f"run: {self.run_dir} | {tokens_per_step:,} tokens/step | "
            f"steps {state.step}->{cfg.train.max_steps} | MFU peak: {peak_reason}"
        )
        # pid and host let `tinylm runs` tell a live run from one that was killed.
        log.event(
            f"start at step {state.step}",
            event="start",
            step=state.step,
            max_steps=cfg.train.max_steps,
            pid=os.getpid(),
            host=socket.gethostname(),
            device=str(self.device),
            precision=self.precision.name,
        )

        self.bad_streak = torch.zeros((), device=self.device)
        self.bad_total = torch.zeros((), device=self.device)
        self.skipped_reported = 0
        interval_loss = torch.zeros((), device=self.device)
        interval_max = torch.zeros((), device=self.device)
        loss_ema: float | None = None
        history: list[dict[str, Any]] = []
        last_train_loss: float | None = None
        last_eval_step = -1
        nonfinite_stop = False
        interval_steps, interval_start = 0, time.perf_counter()
        run_start = time.perf_counter() - state.elapsed_seconds
        self.model.train()

        with self.loader:
            batches = iter(self.loader.iterate(state.step))
            while state.step < cfg.train.max_steps:
                loss, grad_norm = self.train_step(batches)
                state.step += 1
                state.tokens_seen += tokens_per_step
                interval_loss += loss.detach()
                interval_max = torch.maximum(interval_max, loss.detach())
                interval_steps += 1
                log.advance(state.step)

                last_step = state.step == cfg.train.max_steps
                if state.step % cfg.log.interval == 0 or last_step:
                    elapsed = time.perf_counter() - interval_start
                    mean_loss = interval_loss.item() / interval_steps  # the one sync per interval
                    record = self._log_interval(
                        mean_loss,
                        interval_max.item(),
                        grad_norm,
                        elapsed,
                        interval_steps,
                        tokens_per_step,
                        peak,
                        loss_ema,
                    )
                    history.append(record)
                    last_train_loss = mean_loss
                    if math.isfinite(mean_loss):
                        loss_ema = (
                            mean_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * mean_loss
                        )
                    interval_loss.zero_()
                    interval_max.zero_()
                    interval_steps, interval_start = 0, time.perf_counter()
                    if int(self.bad_streak.item()) >= cfg.train.max_nonfinite_steps:
                        nonfinite_stop = True
                        self.stop.request(
                            f"{int(self.bad_streak.item())} consecutive non-finite steps up to step {state.step} "
                            "(updates were skipped; lower optim.lr or check the data)"
                        )

                if (
                    cfg.train.max_time_minutes
                    and time.perf_counter() - run_start > 60 * cfg.train.max_time_minutes
                ):
                    self.stop.request(f"time limit of {cfg.train.max_time_minutes:g} minutes")

                if (cfg.eval.interval and state.step % cfg.eval.interval == 0) or last_step:
                    state.elapsed_seconds = time.perf_counter() - run_start
                    improved = self._evaluate_and_sample(last_train_loss)
                    last_eval_step = state.step
                    if improved and cfg.checkpoint.keep_best:
                        self._save()
                if (
                    cfg.checkpoint.interval
                    and state.step % cfg.checkpoint.interval == 0
                    and self.saved_step != state.step  # not twice when a new best was just saved
                ):
                    state.elapsed_seconds = time.perf_counter() - run_start
                    self._save()
                if distributed.any_rank(self.stop.requested, self.dist, self.device):
                    self.stop.request("stop requested on another process")
                    break

            state.elapsed_seconds = time.perf_counter() - run_start
            stopped_early = state.step < cfg.train.max_steps
            if not stopped_early and last_eval_step != state.step:
                self._evaluate_and_sample(last_train_loss)
            # After non-finite steps nothing new is written: the checkpoints already on disk are
            # the last good state, and a save now would rotate one of them away.
            if not nonfinite_stop and self.saved_step != state.step:
                self._save()

        reason = self.stop.reason if stopped_early else "reached train.max_steps"
        if stopped_early:
            log.event(self._stop_message(reason), event="stopped", reason=reason, step=state.step)
        else:
            log.event(
                f"done: {state.step} steps, best val loss {state.best_val_loss:.4f}",
                event="done",
                step=state.step,
            )
        return TrainResult(
            self.run_dir,
            state.step,
            reason,
            state.best_val_loss,
            state.last_val_loss,
            last_train_loss,
            checkpoint.find_latest(self.run_dir / "checkpoints", verify_hashes=False),
            history,
        )

    def _stop_message(self, reason: str) -> str:
        """What stopped the run, the checkpoint it can continue from, and the command to do so."""
        latest = checkpoint.find_latest(self.run_dir / "checkpoints", verify_hashes=False)
        if latest is None:
            return (
                f"stopped at step {self.state.step}: {reason}. No checkpoint was written; "
                "start the run again without --resume"
            )
        return (
            f"stopped at step {self.state.step}: {reason}. "
            f"Last good checkpoint: {latest} (step {checkpoint.read_meta(latest)['step']})\n"
            f"Resume with: tinylm train --resume {self.run_dir}"
        )

    def _log_interval(
        self,
        mean_loss: float,
        max_loss: float,
        grad_norm: torch.Tensor,
        elapsed: float,
        steps: int,
        tokens_per_step: int,
        peak: float | None,
        loss_ema: float | None,
    ) -> dict[str, Any]:
        state, log = self.state, self.log
        tokens_per_second = steps * tokens_per_step / max(elapsed, 1e-9)
        record: dict[str, Any] = {
            "loss": mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm.item()),
            "ms_per_step": 1000 * elapsed / steps,
            "tokens_per_second": tokens_per_second,
            "tokens": state.tokens_seen,
        }
        if peak:
            record["mfu"] = self.flops_per_token * tokens_per_second / self.dist.world_size / peak
        if self.device.type == "cuda":
            record["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            record["memory_gb"] = psutil.Process().memory_info().rss / 2**30
        skipped = int(self.bad_total.item())
        if skipped:
            record["skipped_steps"] = skipped
        if skipped > self.skipped_reported:  # one event per interval that had new ones
            log.event(
                f"step {state.step}: {skipped - self.skipped_reported} non-finite step(s) since the "
                f"last log line ({skipped} this session), their updates skipped",
                event="nonfinite",
                step=state.step,
            )
            self.skipped_reported = skipped
        if loss_ema is not None and max_loss > self.cfg.train.spike_factor * loss_ema:
            log.event(
                f"loss spike at step ~{state.step}: {max_loss:.3f} vs recent average {loss_ema:.3f}",
                event="spike",
                step=state.step,
            )
        log.log(state.step, "train", record)
        mfu = f" | mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        log.print(
            f"step {state.step:>6} | loss {mean_loss:.4f} | lr {record['lr']:.2e} | norm {record['grad_norm']:.2f} | "
            f"{record['ms_per_step']:.0f} ms/step | {tokens_per_second:,.0f} tok/s{mfu}"
        )
        log.advance(state.step, f"loss {mean_loss:.3f}")
        return record

    # ---------------------------------------------------------------- eval, samples, checkpoints

    def _evaluate_and_sample(self, train_loss: float | None) -> bool:
        """Validate, track the best loss and early stopping, print samples; True if a new best."""
        from tinylm.eval.evaluate import evaluate_sets

        cfg, state, log = self.cfg, self.state, self.log
        if not self.data.val:
            return False
        results = evaluate_sets(
            self.model,
            self.data.val,
            batch_size=cfg.eval.batch_size or cfg.train.batch_size,
            seq_len=cfg.model.context_length,
            max_batches=cfg.eval.max_batches,
            device=self.device,
            autocast=lambda: runtime.autocast(self.device, self.precision),
            token_bytes=self.token_bytes,
            should_stop=lambda: self.stop.requested,
        )
        self.model.train()
        overall = results["overall"]
        if getattr(overall, "partial", False):
            log.print(
                f"step {state.step}: evaluation interrupted after {overall.batches} batches (not recorded)"
            )
            return False
        metrics: dict[str, Any] = {}
        for name, result in results.items():
            prefix = "val" if name == "overall" else f"val_{name}"
            metrics[f"{prefix}/loss"] = result.loss
            metrics[f"{prefix}/perplexity"] = result.perplexity
            if result.bits_per_byte is not None:
                metrics[f"{prefix}/bits_per_byte"] = result.bits_per_byte
        log.log(state.step, "eval", metrics)
        state.last_val_loss = overall.loss
        improved = overall.loss < state.best_val_loss - cfg.train.early_stop_min_delta
        if improved:
            state.best_val_loss, state.evals_since_best = overall.loss, 0
        else:
            state.evals_since_best += 1
        bpb = (
            f" | {overall.bits_per_byte:.3f} bits/byte" if overall.bits_per_byte is not None else ""
        )
        per_set = (
            "".join(f" | {n} {r.loss:.4f}" for n, r in results.items() if n != "overall")
            if len(results) > 2
            else ""
        )
        log.print(
            f"step {state.step:>6} | val loss {overall.loss:.4f} | ppl {overall.perplexity:.2f}{bpb}{per_set}"
            f" | best {state.best_val_loss:.4f}"
        )
        if train_loss is not None and overall.loss > cfg.train.gap_warn_factor * train_loss:
            log.event(
                f"warning: val loss {overall.loss:.3f} is {overall.loss / train_loss:.2f}x the train loss "
                f"{train_loss:.3f} (overfitting, or train and val data differ)",
                event="gap",
                step=state.step,
            )
        patience = cfg.train.early_stop_patience
        if patience and state.evals_since_best >= patience:
            self.stop.request(
                f"early stopping: val loss did not improve by more than {cfg.train.early_stop_min_delta} "
                f"for {patience} evaluations (best {state.best_val_loss:.4f})"
            )
        self._print_samples()
        return improved

    def _print_samples(self) -> None:
        cfg = self.cfg
        if (
            not self.is_main
            or cfg.eval.samples <= 0
            or (cfg.train.distributed == "fsdp" and self.dist.enabled)
        ):
            return
        from tinylm.generate import generate_stream

        prompt = self.tokenizer.encode(cfg.eval.sample_prompt) if cfg.eval.sample_prompt else []
        if not prompt:
            prompt = [self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0]
        for i in range(cfg.eval.samples):
            if self.stop.requested:
                return
            ids: list[int] = []
            stream = generate_stream(
                self.raw_model,
                prompt,
                max_new_tokens=cfg.eval.sample_tokens,
                temperature=cfg.eval.temperature,
                top_k=cfg.eval.top_k or None,
                eot_id=self.tokenizer.eot_id,
                seed=cfg.train.seed + self.state.step + i,
            )
            # Token by token, so that a stop abandons a long sample at once (it is not logged).
            with self.autocast, contextlib.closing(stream):
                for token in stream:
                    if self.stop.requested:
                        break
                    ids.append(token)
            if self.stop.requested:
                break
            text = self.tokenizer.decode([t for t in prompt + ids if t != self.tokenizer.eot_id])
            self.log.text(self.state.step, f"sample/{i}", text)
            self.log.print(f"--- sample {i} at step {self.state.step} ---\n{text}\n---")
        self.raw_model.train()

    def _save(self) -> Path | None:
        """Checkpoint the current step (collective under FSDP; the main process writes)."""
        model_state = distributed.model_state_dict(self.model, self.dist)
        optim_state = distributed.optimizer_state_dict(self.model, self.optimizer, self.dist)
        rng = checkpoint.numpy_rng_to_torch(runtime.capture_rng_state())
        rng_states = [rng]
        if self.dist.enabled:
            import torch.distributed as dist

            rng_states = [None] * self.dist.world_size
            dist.all_gather_object(rng_states, rng)
        path = None
        if self.is_main:
            train_state = {
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng_states,
                "loop": asdict(self.state),
            }
            path = checkpoint.save_checkpoint(
                self.run_dir / "checkpoints",
                self.state.step,
                model_state=model_state,
                train_state=train_state,
                config=self.cfg,
                tokenizer=self.tokenizer,
                val_loss=self.state.last_val_loss,
            )
            checkpoint.rotate(self.run_dir / "checkpoints", self.cfg.checkpoint)
        distributed.barrier(self.dist)
        self.saved_step = self.state.step
        return path

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "config.yaml.tmp"
        tmp.write_text(self.cfg.to_yaml())
        tmp.replace(self.run_dir / "config.yaml")
        self.tokenizer.save(self.run_dir / "tokenizer.json")


def default_run_dir(cfg: Config, preset: str | None) -> Path:
    """`out_dir/run_name`, or the first free `out_dir/<preset>[-N]` when no name was given."""
    out = Path(cfg.out_dir)
    if cfg.run_name:
        return out / cfg.run_name
    base = Path(preset).stem if preset else "run"
    candidate, n = out / base, 1
    while (candidate / "checkpoints").exists():
        n += 1
        candidate = out / f"{base}-{n}"
    cfg.run_name = candidate.name
    return candidate


def train(
    cfg: Config, run_dir: str | Path, *, resume: bool = False, force: bool = False
) -> TrainResult:
    """Train `cfg` in `run_dir` (continuing its latest checkpoint when `resume`)."""
    run_dir = Path(run_dir)
    if (
        not resume
        and (run_dir / "checkpoints").exists()
        and checkpoint.list_checkpoints(run_dir / "checkpoints")
    ):
        raise ConfigError(
            f"{run_dir} already has checkpoints: continue it with --resume, or choose another run_name=..."
        )
    try:
        trainer = Trainer(cfg, run_dir, resume=resume, force=force)
    except KeyboardInterrupt:
        # Setting up (data preparation, model build) holds nothing worth saving, and
        # preparation keeps its finished chunks, so the same command continues from there.
        return TrainResult(
            run_dir,
            0,
            "interrupted while setting up, before the first step (nothing to save); "
            "run the same command again",
            math.inf,
            None,
            None,
            checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False),
        )
    return trainer.fit()
