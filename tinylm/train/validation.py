"""Validation during training: score the validation sets, log `val/...` metrics, print samples.

`Validator` only observes; the policy that acts on the result (best loss, early stopping, the
train/val gap warning, saving the best checkpoint) stays in the trainer. Both an evaluation and a
sample poll the stop flag between units of work (an eval batch, a sampled token), so a signal
abandons them at once; an abandoned evaluation or sample is not recorded.

Samples without `eval.sample_prompt` start a new document (<|endoftext|>) when documents are short
(stories). When they are long (a single-document corpus, whole plays), every sample would start
the same way, so each sample is prompted instead with one line of the validation text, taken at
a seeded position that changes with the step and the sample: the samples show the model's range.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping

import torch
from torch import nn

from tinylm.config import Config
from tinylm.data.loader import TokenSource
from tinylm.eval.evaluate import OVERALL, EvalResult, evaluate_sets
from tinylm.tokenizer import Tokenizer
from tinylm.train import distributed, runtime, signals
from tinylm.train.sinks import RunLogger

# Prompts come from documents longer than this many samples (eval.sample_tokens each).
LONG_DOCUMENT_SAMPLES = 10
PROMPT_WINDOW = 256  # tokens read around a seeded position to find one whole line


def prompt_line(text: str, max_chars: int = 80) -> str:
    """The first whole line of `text` that has content (with its newline), at most `max_chars`.

    Without a line break after the first one, the text from the first word boundary.
    """
    lines = text.split("\n")[1:-1]  # the first and last are cut by the window
    for line in lines:
        if line.strip():
            return line[:max_chars] + ("\n" if len(line) <= max_chars else "")
    space = text.find(" ")
    return text[space + 1 : space + 1 + max_chars // 2] if space >= 0 else text[: max_chars // 2]


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
        self.prompt_source = self._long_document_text(val, single_document)
        self.device, self.precision, self.stop, self.dist = device, precision, stop, dist
        self.token_bytes = tokenizer.token_bytes()
        self.sample = sample and cfg.eval.samples > 0

    def _long_document_text(
        self, val: Mapping[str, TokenSource], single_document: bool
    ) -> TokenSource | None:
        """The validation tokens to take prompts from, when its documents are long; else None."""
        if not val:
            return None
        tokens = max(val.values(), key=len)
        docs = getattr(tokens, "num_documents", 0) or 1
        # Documents this long hold many samples' worth of text; their first lines (a title, a
        # cast list) would be every sample's start.
        long_docs = len(tokens) / docs > LONG_DOCUMENT_SAMPLES * max(self.cfg.eval.sample_tokens, 1)
        usable = len(tokens) > 2 * PROMPT_WINDOW
        return tokens if (single_document or long_docs) and usable else None

    def sample_prompt(self, step: int, index: int) -> tuple[list[int], str]:
        """The prompt ids of sample `index` at `step`, and a note saying where it came from."""
        tok = self.tokenizer
        if self.cfg.eval.sample_prompt:
            ids = tok.encode(self.cfg.eval.sample_prompt)
            if ids:
                return ids, "eval.sample_prompt"
        if self.prompt_source is None:
            return self.default_prompt, "start of a document"
        tokens = self.prompt_source
        rng = random.Random(self.cfg.train.seed * 1_000_003 + step * 101 + index)
        start = rng.randrange(0, len(tokens) - PROMPT_WINDOW)
        window = tok.decode(
            [t for t in tokens[start : start + PROMPT_WINDOW].tolist() if t != tok.eot_id]
        )
        line = prompt_line(window)
        return tok.encode(line), f"a line of the validation text at token {start:,}"

    def _eval_should_stop(self) -> bool:
        # Agreed across ranks: an FSDP forward is a collective, and every rank must score the
        # same number of batches and reach the same verdict (best loss, early stop, checkpoints).
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
            # Each rank scores its share of the batches; the sums are added up once.
            shard=(self.dist.rank, self.dist.world_size),
            reduce=lambda sums: distributed.all_reduce_sum(sums, self.dist),
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
        for i in range(cfg.eval.samples):
            if self.stop.requested:
                return
            prompt, origin = self.sample_prompt(step, i)
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
            self.log.print(f"--- sample {i} at step {step} --- prompt: {origin}\n{text}\n---")
        model.train()
