"""The training loop.

`Trainer(cfg, run_dir).fit()` trains a model and returns a `TrainResult`. The loop itself is in
`_loop` and `train_step`; everything else is delegated: batches to `data.loader`, the schedule and
optimizer to `optim`, checkpoints to `checkpoint`, resuming to `resume`, what is reported each
log interval to `monitor`, validation and samples to `validation`, signals to `signals`, devices
and precision to `runtime`, processes to `distributed`. The trainer keeps the policy: when to
evaluate and save, best-loss tracking, early stopping, and when to stop.

Two choices keep the step free of host synchronisation (the CPU can queue the next step while the
GPU works): losses are accumulated on the device and read only every `log.interval` steps, and a
non-finite loss or gradient norm skips the update inside fused AdamW through its `found_inf`
input (the mechanism the AMP grad scaler uses) instead of an `if loss.isnan():` on the host.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tinylm import interrupts, preflight
from tinylm.config import Config, ConfigError
from tinylm.eval.evaluate import OVERALL
from tinylm.locks import LOCK_FILE
from tinylm.train import (
    checkpoint,
    distributed,
    heap,
    optim,
    precision,
    runtime,
    sharded,
    signals,
    sinks,
    threads,
    time_budget,
    xla,
)
from tinylm.train.monitor import TrainMonitor
from tinylm.train.resume import (
    finished_message,
    open_for_resume,
    refuse_existing_run,
    run_lock,
    stop_message,
)
from tinylm.train.shared_files import check_visible
from tinylm.train.validation import Validator

if TYPE_CHECKING:  # the export package (transformers interop) loads only when a run uses it
    from tinylm.train.init_from import InitSource


@dataclass
class LoopState:
    """What the loop knows beyond weights and optimizer; saved in every checkpoint."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    elapsed_seconds: float = 0.0
    last_val_loss: float | None = None
    # The evaluation of this step was abandoned by a stop: the resumed run redoes it first, so
    # its metrics hold the same evaluations as an uninterrupted run's.
    eval_pending: bool = False
    threads: int = 0  # the run's CPU thread count (0: not recorded; train/threads.py)
    threads_settled: bool = False  # no longer re-checked: kept for the rest of the run


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


class Trainer:
    """Builds everything a run needs from a `Config`, then runs `fit()`."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        force: bool = False,
        init: InitSource | None = None,
        resume_reason: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.resume_reason = resume_reason if resume else None  # train.resume (auto_resume.py)
        self.run_dir = Path(run_dir)
        self.dist = distributed.setup()
        self.is_main = self.dist.is_main
        self.device, device_reason = runtime.select_device(cfg.train.device, self.dist.local_rank)
        # Before the probes below, which then time the run's steps as the run will take them.
        heap_note = heap.keep_freed_memory(self.device.type)
        # Before anything is timed or computed (a precision probe runs at the chosen count).
        self.threads = threads.decide(
            cfg.train.threads,
            self.device,
            run_dir=self.run_dir if resume else None,
            rows=min(cfg.train.batch_size * cfg.model.context_length, 2048),
            width=cfg.model.d_model,
        )
        threads.apply(self.threads)
        self.xla = self.device.type == "xla"  # PyTorch/XLA: the hooks in train/xla.py
        self.state = LoopState()
        # Tracked by step, not by returned path: only the main process gets a path, and every
        # process must agree on whether to enter the collective `_save`.
        self.saved_step = -1
        self.val_loss_step = -1  # the step whose weights `state.last_val_loss` measured
        self.diverged: str | None = None  # why, once the weights are no longer finite
        self.finite_step = -1  # the last step whose weights were checked and found finite
        # Under torchrun one Ctrl+C arrives twice (terminal + launcher): see signals.py.
        self.stop = signals.GracefulStop(repeat_grace_s=2.0 if self.dist.enabled else 0.0)
        self.messages = [f"device: {device_reason}"]
        if self.dist.group is not None:  # XLA replica threads: the main thread's handlers set it
            self.stop = self.dist.group.stop
            self.messages.append(self.dist.group.describe())
        self.messages.append(f"threads: {self.threads.reason}")
        if heap_note is not None:
            self.messages.append(f"heap: {heap_note}")

        # Multi-node: rank 0 holds the run's lock (resume.run_lock); a rank on another node must
        # see that file, or it could not read the checkpoints it resumes from (shared_files.py).
        check_visible([self.run_dir / LOCK_FILE], self.dist)
        resumed = None
        if resume:
            resumed, notes = open_for_resume(self.run_dir, cfg, force)
            self.messages += notes
        elif cfg.train.init_from and init is None:  # library use; the CLI passes its own `init`
            from tinylm.train.init_from import apply_init_from

            init = apply_init_from(cfg)
        if init is not None:  # weights and tokenizer of another run or an HF model
            self.messages.append(init.description)
        start = resumed or init
        runtime.seed_everything(cfg.train.seed)
        self._build_data(start.tokenizer if start else None)
        # After the data: a CPU probe times the run's own model, whose vocabulary comes from it.
        self.precision = runtime.select_precision(cfg.train.precision, self.device, cfg)
        self.autocast = runtime.autocast(self.device, self.precision)
        self.matmul_mode = precision.matmul_context(self.precision)  # bf32: backward passes too
        self.messages.append(f"precision: {self.precision.reason}")
        # A sharded checkpoint is read into the wrapped model in `_restore` (its own shards per rank).
        in_shards = resumed is not None and not resumed.consolidated
        self._build_model(start.model_state if start and not in_shards else None)
        self._build_optimizer()
        if resumed is not None:
            self._restore(resumed)
        # Dropout masks differ per rank but are reproducible; a resumed run restores these states.
        if resumed is None:
            self._seed_streams(cfg.train.seed + self.dist.rank)
        if self.threads.source != "checkpoint":  # a new choice, or one the user made
            self.state.threads_settled = self.threads.source != "auto"
        self.state.threads = self.threads.count
        if self.xla:  # XLA replicas of one process begin their loops together
            xla.set_up_done(self.dist)

    # ---------------------------------------------------------------- building

    def _build_data(self, tokenizer) -> None:
        from tinylm.data import resolve_data
        from tinylm.data.curriculum import curriculum_of
        from tinylm.data.loader import BatchLoader

        cfg = self.cfg
        # The main process prepares (and caches) the datasets first; the others then open them.
        # Its barrier is in `finally`: when preparation fails, the others go on to fail with the
        # same error rather than wait for the collective timeout.
        if self.is_main:
            try:
                self.data = resolve_data(cfg.data, tokenizer, cfg.model.context_length)
            finally:
                distributed.barrier(self.dist)
        else:
            distributed.barrier(self.dist)
        # Prepared once by rank 0: the others must find it, not prepare a node-local copy.
        prepared = (
            [d.directory / "meta.json" for d in self.data.datasets.values()] if self.is_main else []
        )
        check_visible(prepared, self.dist)
        if not self.is_main:
            self.data = resolve_data(
                cfg.data, tokenizer, cfg.model.context_length, log=lambda _: None
            )
        self.tokenizer = self.data.tokenizer
        self.data_check = None
        if self.is_main:  # leaks and mismatches between train and val (tinylm/data/check.py)
            from tinylm.data.check import start_check

            self.data_check, note = start_check(self.data.train, self.data.val, self.tokenizer)
            self.messages.append(note)
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
            device="cpu" if self.xla else self.device,  # XLA: xla.device_batches moves them
            prefetch=cfg.data.prefetch,
            curriculum=curriculum_of(cfg),
        )

    def _build_model(self, weights: dict[str, torch.Tensor] | None) -> None:
        """The model on its device, with `weights` when resuming, then compiled and wrapped."""
        from tinylm.model import GPT

        if self.dist.group is not None:  # XLA replica threads share the host RNG (xla_replicas.py)
            with runtime.seeded_build(self.cfg.train.seed):
                model = GPT(self.cfg.model)
        else:
            model = GPT(self.cfg.model)
        self.raw_model = xla.to_device(model, self.device) if self.xla else model.to(self.device)
        ckpt, reason = preflight.decide_activation_checkpointing(self.cfg, self.device)
        self.raw_model.activation_checkpointing = ckpt
        self.messages.append(f"activation checkpointing: {reason}")
        if weights is not None:  # into the plain module: FSDP then shards what was loaded
            self.raw_model.load_state_dict(weights)
        if self.cfg.train.trainable != "all":
            from tinylm.train.trainable import apply_trainable

            n_train, n_total = apply_trainable(self.raw_model, self.cfg.train.trainable)
            self.messages.append(
                f"trainable: {self.cfg.train.trainable}: {n_train:,} of {n_total:,} parameters"
            )
        if self.precision.name == "fp8":  # before compile and the optimizer (same parameters)
            from tinylm.train import fp8

            self.messages.append(fp8.convert_model(self.raw_model))
        n_all, n_body = self.raw_model.num_params(), self.raw_model.num_params(non_embedding=True)
        self.ckpt_format, reason = sharded.choose_format(
            self.cfg.checkpoint.format, self.dist, self.cfg.train.distributed, n_all, self.device
        )
        self.messages.append(f"checkpoints: {reason}")
        self.flops_per_token = self.raw_model.flops_per_token()
        self.messages.append(
            f"model: {n_all / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M without embeddings), "
            f"{self.flops_per_token / 1e6:.1f} MFLOPs/token"
        )
        compiled, reason = runtime.decide_run_compile(
            self.cfg, self.device, self.precision, self.flops_per_token
        )
        self.messages.append(f"compile: {reason}")
        model = runtime.compile_model(self.raw_model, self.device) if compiled else self.raw_model
        self.model = distributed.wrap_model(
            model, self.cfg.train.distributed, self.dist, self.device
        )
        # Validation runs through the plain module: through the compiled one, its no-grad
        # forward at the eval batch size is one more graph to compile, which costs about as much
        # as the training graph, while a run's evaluations are a few percent of its time.
        # FSDP needs its sharded forward.
        fsdp = self.dist.enabled and self.cfg.train.distributed == "fsdp"
        self.eval_model = self.model if fsdp else self.raw_model

    def _build_optimizer(self) -> None:
        # After wrapping: FSDP2 replaces the parameters with sharded ones, and an optimizer
        # built before would update the discarded originals.
        self.optimizer = optim.build_optimizer(
            self.raw_model, self.cfg.optim, self.device, self.precision.muon_ns_dtype
        )
        self.fused_optimizer = bool(self.optimizer.defaults.get("fused")) or getattr(
            self.optimizer, "takes_found_inf", False
        )
        self.scaler = precision.make_grad_scaler(self.device, self.precision)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]

    def _restore(self, loaded: checkpoint.LoadedCheckpoint) -> None:
        """Optimizer, grad scaler, loop state and RNG streams (the weights are already in)."""
        state = loaded.train_state(map_location="cpu", loop_fields=LoopState.__dataclass_fields__)
        flags = optim.implementation(self.optimizer)  # ours, not the saving device's
        if loaded.consolidated:
            distributed.load_optimizer_state(
                self.model, self.optimizer, state["optimizer"], self.dist
            )
        else:  # sharded: weights and optimizer state, each rank its part (resharded)
            sharded.load_into(loaded.path, self.model, self.optimizer, self.dist)
        optim.set_implementation(self.optimizer, flags)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.state = LoopState(**state["loop"])
        self.saved_step = self.state.step  # on disk already: a resume at max_steps re-saves nothing
        rng_states = state["rng"]
        if len(rng_states) == self.dist.world_size:
            rng = checkpoint.torch_rng_to_numpy(rng_states[self.dist.rank])
            # XLA: the device's dropout stream; a checkpoint written on CPU has none.
            fresh = self.cfg.train.seed + self.dist.rank + self.state.step
            self._seed_streams(rng.get("xla", fresh), rng)
        else:
            self._seed_streams(self.cfg.train.seed + self.dist.rank + self.state.step)
            self.messages.append(
                f"world size changed ({len(rng_states)} -> {self.dist.world_size}): dropout RNG reseeded"
            )

    def _seed_streams(self, seed: int, saved: dict | None = None) -> None:
        """Seed (or restore from `saved`) the RNG streams dropout draws from: the host RNGs, and
        on XLA the device's own. XLA replica threads share the host RNGs: the master sets them."""
        if self.dist.group is None or self.is_main:
            if saved is not None:
                runtime.restore_rng_state(saved)
            else:
                runtime.seed_everything(seed)
        if self.xla:
            xla.set_rng_state(self.device, seed)

    # ---------------------------------------------------------------- the step

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches.

        Returns (loss, grad_norm, nonfinite) as device tensors; a non-finite step updates nothing.
        """
        cfg = self.cfg
        optim.set_lr(self.optimizer, optim.lr_at(self.state.step, cfg.optim, cfg.train.max_steps))
        accum = cfg.train.grad_accum
        losses = []
        for micro in range(accum):
            x, y = next(batches)
            with self.matmul_mode:
                with distributed.grad_sync(self.model, sync=micro == accum - 1), self.autocast:
                    _, loss = self.model(x, y)
                scaled = loss / accum if accum > 1 else loss  # no extra op (its backward) at 1
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.detach())
        loss = losses[0] if accum == 1 else torch.stack(losses).mean()
        if self.xla:  # averaged over the XLA replicas of this process (none: a no-op)
            xla.reduce_gradients(self.params, self.dist)

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            )
        grad_norm = distributed.full_tensor(grad_norm)  # FSDP: a DTensor over the shards
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))

        if self.scaler is not None:  # fp16: the scaler skips steps with inf/nan grads itself
            nonfinite = precision.scaler_gave_up(self.scaler, loss, grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused_optimizer:
            self.optimizer.found_inf = nonfinite.float()
            self.optimizer.step()
        elif not nonfinite.item():  # unfused fallback: one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.xla:  # the step's graph ends here; nothing above read a value
            xla.sync(self.dist)
        return loss, grad_norm, nonfinite

    # ---------------------------------------------------------------- the loop

    def fit(self) -> TrainResult:
        """Run the loop to `train.max_steps` or a stop; a signal never escapes as an exception."""
        # From here on SIGINT/SIGTERM only set a flag (signals.py), so every exit path below
        # writes its checkpoint and closes the sinks; before this, `train()` handles them.
        with self.stop:
            if self.is_main:
                checkpoint.write_run_files(self.run_dir, self.cfg, self.tokenizer)
                if self.data_check is not None and self.data_check.flags:  # what the warning cites
                    self.data_check.write(self.run_dir / "data_check.json")
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
        cfg, state = self.cfg, self.state
        monitor = TrainMonitor(
            self.log,
            cfg,
            optimizer=self.optimizer,
            device=self.device,
            precision=self.precision,
            dist=self.dist,
            flops_per_token=self.flops_per_token,
            governor=threads.ThreadGovernor(
                state.threads,
                settled=state.threads_settled,
                adjustable=self.threads.source in ("auto", "checkpoint"),
                ceiling=self.threads.ceiling,
            ),
            curriculum=self.loader.curriculum,
        )
        monitor.scaler = self.scaler
        monitor.log_start(state.step, self.run_dir, self.messages)
        self.monitor = monitor
        if self.resume_reason:
            message = f"resumed ({self.resume_reason}) at step {state.step}"
            self.log.event(message, event="resumed", step=state.step)
        self.validator = Validator(
            cfg,
            self.data.val,
            self.tokenizer,
            self.log,
            device=self.device,
            precision=self.precision,
            stop=self.stop,
            dist=self.dist,
            # Sampling runs on the main process alone, which FSDP's sharded forward cannot do.
            sample=self.is_main and not (self.dist.enabled and cfg.train.distributed == "fsdp"),
            first_token=int(self.data.train[0][1][0]),
            single_document=all(getattr(t, "num_documents", 2) <= 1 for _, t, _ in self.data.train),
        )
        last_eval_step, nonfinite_stop, time_limit_reason = -1, False, ""
        run_start = time.perf_counter() - state.elapsed_seconds
        if state.eval_pending:  # abandoned by the stop that ended the last session: redo it
            self._validate(monitor.last_loss)
            last_eval_step = state.step
            self._save()  # with its val loss, and no longer pending
        step_timer = self._step_timer() if state.step < time_budget.CALIBRATE_AT else None
        self.model.train()

        with self.loader:
            batches = iter(self.loader.iterate(state.step))
            if self.xla:
                batches = xla.device_batches(batches, self.device, cfg.data.prefetch)
            while state.step < cfg.train.max_steps:
                loss, grad_norm, nonfinite = self.train_step(batches)
                state.step += 1
                state.tokens_seen += monitor.tokens_per_step
                monitor.record(loss, nonfinite)  # also the thread check's clock (threads.py)
                state.threads = monitor.governor.threads
                state.threads_settled = monitor.governor.settled
                if step_timer and (
                    fit := step_timer.observe(state.step, time.perf_counter() - run_start)
                ):
                    self._apply_step_fit(fit, monitor)
                self.log.advance(state.step)
                last_step = state.step == cfg.train.max_steps

                if state.step % cfg.log.interval == 0 or last_step:
                    monitor.flush(state.step, state.tokens_seen, grad_norm)
                    if reason := monitor.nonfinite_stop_reason(state.step):
                        nonfinite_stop = True
                        self.stop.request(reason)
                    elif not self._weights_finite():
                        nonfinite_stop = True
                limit = cfg.train.max_time_minutes
                time_up = bool(limit) and time.perf_counter() - run_start > 60 * limit
                if (cfg.eval.interval and state.step % cfg.eval.interval == 0) or last_step:
                    state.elapsed_seconds = time.perf_counter() - run_start
                    with monitor.pause("eval"):
                        improved = self._validate(monitor.last_loss)
                    last_eval_step = state.step
                    if step_timer and not last_step:  # on every rank: a collective
                        elapsed = time.perf_counter() - run_start
                        self._apply_step_fit(step_timer.refit(state.step, elapsed), monitor)
                    if improved and cfg.checkpoint.keep_best:
                        with monitor.pause("checkpoint"):
                            self._save()
                if (
                    cfg.checkpoint.interval
                    and state.step % cfg.checkpoint.interval == 0
                    and self.saved_step != state.step  # not twice when a new best was just saved
                ):
                    state.elapsed_seconds = time.perf_counter() - run_start
                    with monitor.pause("checkpoint"):
                        self._save()
                stop_requested, time_up = distributed.any_ranks(
                    [self.stop.requested, time_up], self.dist, self.device
                )
                if stop_requested:
                    self.stop.request("stop requested on another process")
                    break
                if time_up:  # an end like max_steps, not a stop: nothing polls it to abandon work
                    time_limit_reason = f"time limit of {limit:g} minutes"
                    break

            state.elapsed_seconds = time.perf_counter() - run_start
            stopped_early = state.step < cfg.train.max_steps or self.diverged is not None
            # The model a run ends with gets its evaluation, so that `best` can be it: a time
            # limit ends a run mid-interval (a fitted schedule just before its last step), and
            # without one its decayed final weights lost to the last interval's (0.09 bits/char
            # worse on Tiny Shakespeare, notes/issue-10-recipes.md). Signals and early stopping
            # end without one: the user wants out now; early stopping has just evaluated.
            if (not stopped_early or time_limit_reason) and last_eval_step != state.step:
                self._validate(monitor.last_loss)
            # After non-finite steps nothing new is written: the checkpoints already on disk are
            # the last good state, and a save now would rotate one of them away.
            if not nonfinite_stop and self.saved_step != state.step:
                self._save()
        reason = self.diverged or time_limit_reason or self.stop.reason
        return self._finish(stopped_early, reason, monitor)

    def _step_timer(self) -> time_budget.StepTimer | None:
        t, e = self.cfg.train, self.cfg.eval
        if not t.fit_steps_to_time:
            return None
        # Rows of context_length tokens: a training step's rows against an evaluation's.
        share = time_budget.eval_fraction(
            tokens_per_step=t.batch_size * t.grad_accum,
            eval_interval=e.interval,
            eval_tokens=e.max_batches * (e.batch_size or t.batch_size),
        )
        return time_budget.StepTimer(60 * t.max_time_minutes, eval_share=share)

    def _apply_step_fit(self, fit: time_budget.StepFit | None, monitor: TrainMonitor) -> None:
        """Set `train.max_steps` to the fitted count and write it into the run's config, where a
        resume reads it. A collective: the main process's timing (and its None: no refit now,
        which depends on its clock) rules on every rank."""
        fit = distributed.gather_objects(fit, self.dist)[0]
        previous = self.cfg.train.max_steps
        if fit is None or fit.max_steps == previous:
            return
        self.cfg.train.max_steps = monitor.max_steps = fit.max_steps
        if self.loader.curriculum is not None:  # phases are fractions of the fitted count
            self.loader.curriculum.total_steps = fit.max_steps
        self.log.set_total(fit.max_steps)
        if self.is_main:
            checkpoint.write_run_files(self.run_dir, self.cfg)
        self.log.event(
            fit.message(previous), event="time_fit", step=self.state.step, max_steps=fit.max_steps
        )

    def _finish(self, stopped_early: bool, stop_reason: str, monitor: TrainMonitor) -> TrainResult:
        """Log the `done` or `stopped` event and build the result."""
        state = self.state
        reason = stop_reason if stopped_early else "reached train.max_steps"
        if stopped_early:
            message = stop_message(self.run_dir, state.step, reason)
            self.log.event(message, event="stopped", reason=reason, step=state.step)
        else:
            message = f"done: {state.step} steps, best val loss {state.best_val_loss:.4f}"
            self.log.event(message, event="done", step=state.step)
        return TrainResult(
            self.run_dir,
            state.step,
            reason,
            state.best_val_loss,
            state.last_val_loss,
            monitor.last_loss,
            checkpoint.find_latest(self.run_dir / "checkpoints", verify_hashes=False),
            monitor.history,
        )

    # ---------------------------------------------------------------- validation, checkpoints

    def _validate(self, train_loss: float | None) -> bool:
        """Validate and sample; track the best loss, the train/val gap and early stopping.

        Returns True when the validation loss is a new best (the caller may save it).
        """
        cfg, state = self.cfg, self.state
        if not self._weights_finite():  # NaN weights: no evaluation, no sample from them
            return False
        results = self.validator.evaluate(self.eval_model, state.step)
        if self.xla:
            xla.sync(self.dist)
        state.eval_pending = results is None and bool(self.validator.val)  # interrupted
        if results is None:
            return False
        val_loss = results[OVERALL].loss
        state.last_val_loss, self.val_loss_step = val_loss, state.step
        improved = val_loss < state.best_val_loss - cfg.train.early_stop_min_delta
        if improved:
            state.best_val_loss, state.evals_since_best = val_loss, 0
        else:
            state.evals_since_best += 1
        self.validator.print_results(state.step, results, state.best_val_loss)
        if train_loss is not None and val_loss > cfg.train.gap_warn_factor * train_loss:
            self.log.event(
                f"warning: val loss {val_loss:.3f} is {val_loss / train_loss:.2f}x the train loss "
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
        sampler = xla.host_model(self.raw_model) if self.xla and self.validator.sample else None
        self.validator.print_samples(sampler or self.raw_model, state.step)
        return improved

    def _weights_finite(self) -> bool:
        """False, with the run stopped as diverged, once the weights are not finite. Checked at
        each log interval and before every evaluation, sample and checkpoint (a collective)."""
        if self.diverged is None and self.finite_step != self.state.step:  # once per step
            self.diverged = self.monitor.diverged_reason(self.state.step, self.params)
            self.finite_step = self.state.step
            if self.diverged is not None:
                self.stop.request(self.diverged)
        return self.diverged is None

    def _save(self) -> Path | None:
        """Checkpoint the current step (collective under FSDP; the main process writes)."""
        if not self._weights_finite():  # never a checkpoint (or a best) of NaN weights
            return None
        if self.ckpt_format == "sharded":
            return self._save_sharded()
        model_state = distributed.model_state_dict(self.model, self.dist)
        optim_state = distributed.optimizer_state_dict(self.model, self.optimizer, self.dist)
        if self.xla:  # files are written from host tensors
            model_state, optim_state = xla.host_state_dict(self.raw_model), xla.to_host(optim_state)
        rng = checkpoint.numpy_rng_to_torch(runtime.capture_rng_state())
        if self.xla:
            rng["xla"] = xla.rng_state(self.device)
        rng_states = distributed.gather_objects(rng, self.dist)  # each rank's dropout stream
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
                # of these weights only: a checkpoint between evaluations has none, so `best`
                # never takes a later model for the one that was measured
                val_loss=self.state.last_val_loss
                if self.val_loss_step == self.state.step
                else None,
            )
            checkpoint.rotate(self.run_dir / "checkpoints", self.cfg.checkpoint)
        distributed.barrier(self.dist)
        self.saved_step = self.state.step
        return path

    def _save_sharded(self) -> Path | None:
        """`_save` for checkpoint.format=sharded: every rank writes its shards (sharded.py)."""
        rng = checkpoint.numpy_rng_to_torch(runtime.capture_rng_state())
        rng_states = distributed.gather_objects(rng, self.dist)
        path = sharded.save(
            self.run_dir / "checkpoints",
            self.state.step,
            self.model,
            self.optimizer,
            self.dist,
            train_state={
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng_states,
                "loop": asdict(self.state),
            },
            config=self.cfg,
            tokenizer=self.tokenizer,
            val_loss=self.state.last_val_loss if self.val_loss_step == self.state.step else None,
        )
        if self.is_main:
            checkpoint.rotate(self.run_dir / "checkpoints", self.cfg.checkpoint)
        distributed.barrier(self.dist)
        self.saved_step = self.state.step
        return path


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    init: InitSource | None = None,
    resume_reason: str | None = None,
) -> TrainResult:
    """Train `cfg` in `run_dir` (continuing its latest checkpoint when `resume`; starting from
    `init`, an `export.init_from.InitSource`, or from `cfg.train.init_from` when given;
    `resume_reason`: why a resume happens without --resume, for its `resumed` event)."""
    run_dir = Path(run_dir)
    # A second `train` on this directory is refused with our PID; the caller's thread count is
    # restored afterwards.
    with run_lock(run_dir), threads.restored():
        if not resume:
            refuse_existing_run(run_dir)
        elif finished := finished_message(run_dir, cfg, force):
            print(finished)
            return TrainResult(
                run_dir, cfg.train.max_steps, "reached train.max_steps", math.inf, None, None, None
            )
        if cfg.train.device == "xla" and xla.device_count() > 1:  # a replica per device
            from tinylm.train import xla_replicas

            return xla_replicas.run(
                lambda: _set_up_and_fit(cfg, run_dir, resume, force, init, resume_reason)
            )
        return _set_up_and_fit(cfg, run_dir, resume, force, init, resume_reason)


def _set_up_and_fit(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    force: bool,
    init: InitSource | None,
    resume_reason: str | None,
) -> TrainResult:
    try:
        with interrupts.term_as_interrupt():  # SIGTERM unwinds set-up like Ctrl+C
            trainer = Trainer(
                cfg, run_dir, resume=resume, force=force, init=init, resume_reason=resume_reason
            )
    except KeyboardInterrupt as e:
        # Setting up (data preparation, model build) holds nothing worth saving, and
        # preparation keeps its finished chunks, so the same command continues from there.
        return TrainResult(
            run_dir,
            0,
            f"interrupted ({interrupts.signal_name(e)}) while setting up, before the first "
            "step (nothing to save); run the same command again",
            math.inf,
            None,
            None,
            checkpoint.find_latest(run_dir / "checkpoints", verify_hashes=False),
        )
    return trainer.fit()
