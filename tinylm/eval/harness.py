"""EleutherAI's lm-evaluation-harness model interface, implemented on a tinylm model and tokenizer.

`TinyLMHarness(model, tokenizer, ...)` is an `lm_eval.api.model.LM` (through the harness's
`TemplateLM`, which turns `(context, continuation)` text pairs into token ids the way its own
Hugging Face model does: trailing context spaces move into the continuation, the pair is encoded
whole and split, an empty context becomes the end-of-text id). The three request kinds:

- `loglikelihood`: log P(continuation | context) and whether greedy decoding would produce it.
- `loglikelihood_rolling`: log P(text) for perplexity tasks, `<|endoftext|>` + text scored in
  chunks of `context_length` targets, each chunk with the longest history that fits: the same
  windows as `tinylm.eval.evaluate_full` with the default stride (a test checks the equality).
- `generate_until`: greedy (or sampled, with `do_sample`) continuation with the KV cache, cut at
  the first stop string.

Every sequence longer than the context keeps its end: context is dropped on the left. Scoring is
batched: all windows of all requests are sorted by length (longest first, so the first batch
shows the peak memory at once) and padded on the right with the end-of-text id; with causal
attention padding after a sequence never changes its logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from tinylm.eval.evaluate import AutocastFactory
from tinylm.generate import generate_steps
from tinylm.model import GPT
from tinylm.tokenizer.base import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default for generate_until tasks


def target_windows(
    num_tokens: int, first_target: int, context: int
) -> Iterator[tuple[int, int, int]]:
    """Windows that score target positions `first_target..num_tokens-1` of a sequence once each.

    Yields `(start, end, skip)`: the model reads `tokens[start:end-1]`, predicts
    `tokens[start+1:end]`, and the first `skip` of those predictions are context only. Targets go
    in consecutive chunks of at most `context`, each read with the longest history that fits
    (so a context longer than the model's loses its beginning, never its end).
    """
    if not 1 <= first_target <= num_tokens - 1:
        raise ValueError(f"no target to score: first_target={first_target}, tokens={num_tokens}")
    first = first_target
    while first < num_tokens:
        last = min(first + context, num_tokens) - 1  # last target position of this chunk
        start = max(0, last - context)
        yield start, last + 1, first - start - 1
        first = last + 1


class TinyLMHarness(TemplateLM):
    """A tinylm `GPT` + `Tokenizer` as an lm-evaluation-harness language model."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 8,
        autocast: AutocastFactory = contextlib.nullcontext,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if tokenizer.eot_id is None:
            raise ValueError("the harness needs a tokenizer with an end-of-text token")
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.autocast = autocast
        self.seed = seed  # generate_until with do_sample: reproducible samples
        self._device = model.tok_emb.weight.device

    # -- TemplateLM's tokenization hooks -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eot_id)  # type: ignore[arg-type]

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.context_length)

    @property
    def tokenizer_name(self) -> str:
        return f"tinylm-{self.tok.fingerprint()}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    # -- scoring ----------------------------------------------------------------------------------
    def _score(
        self, sequences: list[tuple[list[int], int]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """`(log P(targets), greedy?)` for each `(tokens, first_target)`: every target position
        from `first_target` on, predicted from the tokens before it (windowed, batched)."""
        windows = []  # (sequence index, window tokens, skip)
        for i, (tokens, first) in enumerate(sequences):
            for start, end, skip in target_windows(len(tokens), first, self.max_length):
                windows.append((i, tokens[start:end], skip))
        windows.sort(key=lambda w: -len(w[1]))
        logprob = [0.0] * len(sequences)
        greedy = [True] * len(sequences)
        pad = self.eot_token_id
        with torch.no_grad():
            for lo in tqdm(
                range(0, len(windows), self.batch_size),
                desc="scoring",
                disable=disable_tqdm or len(windows) <= self.batch_size,
            ):
                batch = windows[lo : lo + self.batch_size]
                width = len(batch[0][1]) - 1
                rows = [w[1][:-1] + [pad] * (width - len(w[1]) + 1) for w in batch]
                x = torch.tensor(rows, dtype=torch.long, device=self._device)
                with self.autocast():
                    logits, _ = self.model(x)
                for row, (i, tokens, skip) in enumerate(batch):
                    n = len(tokens) - 1
                    # fp32 log-softmax: the small probabilities are what a continuation's score sums.
                    logp = F.log_softmax(logits[row, skip:n].float(), dim=-1)
                    target = torch.tensor(tokens[skip + 1 :], device=logp.device)
                    logprob[i] += float(logp.gather(-1, target[:, None]).sum())
                    greedy[i] = greedy[i] and bool((logp.argmax(dim=-1) == target).all())
        return list(zip(logprob, greedy, strict=True))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        sequences = []
        for _, context, continuation in requests:
            if not continuation:  # an empty continuation has probability 1
                sequences.append(None)
                continue
            # A context of spaces only is moved whole into the continuation: condition on
            # end-of-text, as the harness does for an empty context.
            context = context or [self.eot_token_id]
            sequences.append((context + continuation, len(context)))
        scored = iter(self._score([s for s in sequences if s is not None], disable_tqdm))
        results = [(0.0, True) if s is None else next(scored) for s in sequences]
        for (pair, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        sequences = [([self.eot_token_id, *self.tok_encode(t)], 1) for t in texts]
        kept = [s for s in sequences if len(s[0]) > 1]
        scored = iter(self._score(kept, disable_tqdm))
        results = [next(scored)[0] if len(s[0]) > 1 else 0.0 for s in sequences]
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        prepared = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            if do_sample and temperature == 0.0:
                temperature = 1.0
            # Keep room for the answer: the prompt keeps its end and leaves up to max_new
            # positions free (but at least half the context for the prompt), so the KV cache
            # rarely fills and falls back to recomputing the window each token.
            keep = self.max_length - min(max_new, self.max_length // 2)
            ids = (self.tok_encode(context) or [self.eot_token_id])[-keep:]
            prepared.append((ids, until, max_new, temperature))
        # Same-length prompts with the same settings decode together (no padding: positions
        # would shift); the longest first.
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        groups: dict[tuple, list[int]] = {}
        for i in order:
            ids, until, max_new, temperature = prepared[i]
            groups.setdefault((len(ids), tuple(until), max_new, temperature), []).append(i)
        out: list[str] = [""] * len(prepared)
        batches = [
            (key, members[lo : lo + self.batch_size])
            for key, members in groups.items()
            for lo in range(0, len(members), self.batch_size)
        ]
        for (_, until, max_new, temperature), members in tqdm(
            batches, desc="generating", disable=disable_tqdm or len(batches) <= 1
        ):
            texts = self._generate(
                [prepared[i][0] for i in members], list(until), max_new, temperature
            )
            for i, text in zip(members, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(
        self, rows: list[list[int]], until: list[str], max_new: int, temperature: float
    ) -> list[str]:
        """Continuations of equal-length prompts, each cut before its first stop string."""
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        texts = [""] * len(rows)
        steps = generate_steps(
            self.model, rows, max_new_tokens=max_new, temperature=temperature, seed=self.seed
        )
        with closing(steps), self.autocast():
            for ids in steps:
                for r, token in enumerate(ids):
                    if done[r]:
                        continue
                    if token == self.eot_token_id:
                        done[r] = True
                        continue
                    generated[r].append(token)
                    texts[r] = self.tok_decode(generated[r])
                    if any(s in texts[r] for s in until):
                        done[r] = True
                if all(done):
                    break
        return [_cut(text, until) for text in texts]


def _cut(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
