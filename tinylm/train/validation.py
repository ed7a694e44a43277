"""Validation during training: score the validation sets, log `val/...` metrics, print samples.

`Validator` only observes; the policy that acts on the result (best loss, early stopping, the
train/val gap warning, saving the best checkpoint) stays in the trainer. Both an evaluation and a
sample poll the stop flag between units of work (an eval batch, a sampled token), so a signal
abandons them at once; an abandoned evaluation or sample is not recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from tinylm.config import Config
from tinylm.data.loader import TokenSource
from tinylm.eval.evaluate import OVERALL, EvalResult, evaluate_sets
from tinylm.tokenizer import Tokenizer
from tinylm.train import distributed, runtime, signals
from tinylm.train.sinks import RunLogger


class Validator:
    """Evaluates the model on the run's validation sets and samples from it."""

    def __init__(
        self,
        cfg: Config,
        val: Mapping[str, TokenSource],
        tokenizer: Tokenizer,
        log: RunLogger,
        *,
        device: torch.device,
        precision: runtime.Precision,
        stop: signals.GracefulStop,
        dist: distributed.DistInfo,
        sample: bool,
        first_token: int = 0,
        single_document: bool = False,
    ) -> None:
        self.cfg, self.val, self.tokenizer, self.log = cfg, val, tokenizer, log
        # Samples without a prompt start a new document (<|endoftext|>), except when the corpus is
        # one document (Tiny Shakespeare): the model never saw that token, so start as it starts.
        eot = tokenizer.eot_id
        self.default_prompt = [first_token] if single_document or eot is None else [eot]
        self.device, self.precision, self.stop, self.dist = device, precision, stop, dist
        self.token_bytes = tokenizer.token_bytes()
        self.sample = sample and cfg.eval.samples > 0

    def _eval_should_stop(self) -> bool:
        # Agreed across ranks: an FSDP forward is a collective, and every rank must score the
        # same batches and reach the same verdict (best loss, early stop, which checkpoints).
        return distributed.any_rank(self.stop.requested, self.dist, self.device)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, EvalResult] | None:
        """Score every validation set and log the metrics; None if none or interrupted."""
        cfg = self.cfg
        if not self.val:
            return None
        results = evaluate_sets(
            model,
            self.val,
            batch_size=cfg.eval.batch_size or cfg.train.batch_size,
            seq_len=cfg.model.context_length,
            max_batches=cfg.eval.max_batches,
            device=self.device,
            autocast=lambda: runtime.autocast(self.device, self.precision),
            token_bytes=self.token_bytes,
            should_stop=self._eval_should_stop,
        )
        model.train()
        overall = results[OVERALL]
        if overall.partial:
            self.log.print(
                f"step {step}: evaluation interrupted after {overall.batches} batches (not recorded)"
            )
            return None
        metrics: dict[str, float] = {}
        for name, result in results.items():
            prefix = "val" if name == OVERALL else f"val_{name}"
            metrics[f"{prefix}/loss"] = result.loss
            metrics[f"{prefix}/perplexity"] = result.perplexity
            if result.bits_per_byte is not None:
                metrics[f"{prefix}/bits_per_byte"] = result.bits_per_byte
        self.log.log(step, "eval", metrics)
        return results

    def print_results(self, step: int, results: dict[str, EvalResult], best: float) -> None:
        """The console line: overall loss, perplexity, bits per byte, each set's loss, the best."""
        overall = results[OVERALL]
        bpb = (
            f" | {overall.bits_per_byte:.3f} bits/byte" if overall.bits_per_byte is not None else ""
        )
        per_set = (
            "".join(f" | {n} {r.loss:.4f}" for n, r in results.items() if n != OVERALL)
            if len(results) > 2
            else ""
        )
        self.log.print(
            f"step {step:>6} | val loss {overall.loss:.4f} | ppl {overall.perplexity:.2f}{bpb}{per_set}"
            f" | best {best:.4f}"
        )

    def print_samples(self, model: nn.Module, step: int) -> None:
        """Generate `eval.samples` texts from the prompt, log and print them (main process only).

        `model` is the unwrapped module: sampling on one process must not enter DDP collectives.
        """
        if not self.sample:
            return
        from tinylm.generate import generate_stream

        cfg, tok = self.cfg, self.tokenizer
        prompt = tok.encode(cfg.eval.sample_prompt) if cfg.eval.sample_prompt else []
        prompt = prompt or self.default_prompt
        for i in range(cfg.eval.samples):
            if self.stop.requested:
                return
            ids: list[int] = []
            stream = generate_stream(
                model,
                prompt,
                max_new_tokens=cfg.eval.sample_tokens,
                temperature=cfg.eval.temperature,
                top_k=cfg.eval.top_k or None,
                eot_id=tok.eot_id,
                seed=cfg.train.seed + step + i,
            )
            # Token by token, so that a stop abandons a long sample at once (it is not logged).
            with runtime.autocast(self.device, self.precision), contextlib.closing(stream):
                for token in stream:
                    if self.stop.requested:
                        break
                    ids.append(token)
            if self.stop.requested:
                break
            text = tok.decode([t for t in prompt + ids if t != tok.eot_id])
            self.log.text(step, f"sample/{i}", text)
            self.log.print(f"--- sample {i} at step {step} ---\n{text}\n---")
        model.train()
