"""Sampling from a GPT: temperature, top-k, top-p, stop at end-of-text, with a KV cache.

`generate(model, prompt_ids, max_new_tokens=...)` returns the new ids (not the prompt, not the
end-of-text id); `generate_stream` yields them one at a time for printing as they come.

The context limit. The model sees at most `context_length` positions. Without the cache each
step recomputes the last `context_length` tokens (a longer prompt is cropped to its end). With
the cache, the (cropped) prompt is processed once and each new token costs one position; when
prompt + generated tokens fill the context, generation does not stop: it falls back to the same
sliding recompute as without the cache. So the cache changes the speed, never the tokens.

Randomness comes from a private `torch.Generator` (seeded by `seed`), so a seed reproduces a
sample and sampling never moves the global RNG (a training run's data order does not depend on
how many samples it printed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing

import torch
import torch.nn.functional as F

from tinylm.model import GPT


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one id per row from logits [B, V]; returns int64 [B].

    temperature 0 is greedy (argmax; top-k/top-p do not matter). top_k keeps the k largest
    logits; top_p keeps the smallest set of most likely ids whose probability reaches top_p
    (always at least the most likely one). Both may be combined (top-k first).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an id when the ids more likely than it already reach top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _activation_dtype(model: GPT, device: torch.device) -> torch.dtype:
    """The dtype attention sees: the autocast dtype when autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.tok_emb.weight.dtype


@torch.inference_mode()
def _steps(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    sample_kwargs: dict,
    use_cache: bool,
) -> Iterator[torch.Tensor]:
    """Yield the next id of every row [B], max_new_tokens times (see the module docstring)."""
    ctx = model.cfg.context_length
    idx = idx[:, -ctx:]
    was_training = model.training
    model.eval()  # dropout off
    try:
        cache = None
        if use_cache:
            dtype = _activation_dtype(model, idx.device)
            cache = model.make_kv_cache(idx.shape[0], ctx, idx.device, dtype)
            logits, _ = model(idx, kv_cache=cache, last_only=True)
        for step in range(max_new_tokens):
            if step > 0 or cache is None:
                if cache is not None and cache.pos < ctx:
                    logits, _ = model(idx[:, -1:], kv_cache=cache)
                else:
                    cache = None  # full: slide the window and recompute from now on
                    logits, _ = model(idx[:, -ctx:], last_only=True)
            nxt = sample_next(logits[:, -1], **sample_kwargs)
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            yield nxt
    finally:
        model.train(was_training)


def _prepare(
    model: GPT, prompt_ids: Sequence[int] | Sequence[Sequence[int]], seed: int | None
) -> tuple[list[list[int]], torch.device, torch.Generator]:
    """Prompts as a list of rows (validated), the model's device, and a private generator."""
    rows = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else prompt_ids
    rows = [list(r) for r in rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("a prompt needs at least one token (e.g. the end-of-text id)")
    vocab = model.vocab_size
    for r in rows:
        bad = [t for t in r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # fresh randomness, still without touching the global RNG
    else:
        generator.manual_seed(seed)
    return rows, device, generator


def generate_stream(
    model: GPT,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new ids for one prompt as they are sampled; stops before `eot_id`."""
    rows, device, generator = _prepare(model, prompt_ids, seed)
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    sample_kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    # closing(): stopping early restores the model's train/eval mode at once, not at GC time.
    with closing(_steps(model, idx, max_new_tokens, sample_kwargs, use_cache)) as steps:
        for nxt in steps:
            token = int(nxt[0])
            if token == eot_id:
                return
            yield token


def generate_steps(
    model: GPT,
    rows: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[list[int]]:
    """The next id of every row, step by step, for callers that decide themselves when to stop
    (e.g. on a stop string). Rows must have equal lengths; end-of-text is not special here.
    Close the iterator (`contextlib.closing`) when stopping early."""
    rows, device, generator = _prepare(model, rows, seed)
    if len({len(r) for r in rows}) > 1:
        raise ValueError("generate_steps needs prompts of equal length (padding shifts positions)")
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    sample_kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    with closing(_steps(model, idx, max_new_tokens, sample_kwargs, use_cache)) as steps:
        for nxt in steps:
            yield nxt.tolist()


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int] | list[list[int]]:
    """New ids for a prompt (list[int]) or for each of a batch of prompts (list[list[int]]).

    Each sequence stops before `eot_id` or after `max_new_tokens`. Prompts of equal length are
    sampled together as one batch; prompts of different lengths one after another (padding
    would shift positions), each with its own generator seeded `seed + i`.
    """
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eot_id=eot_id,
        use_cache=use_cache,
    )
    if prompt_ids and isinstance(prompt_ids[0], int):
        return list(generate_stream(model, prompt_ids, seed=seed, **kwargs))
    rows, device, generator = _prepare(model, prompt_ids, seed)
    if len({len(r) for r in rows}) > 1:
        return [
            list(generate_stream(model, r, seed=None if seed is None else seed + i, **kwargs))
            for i, r in enumerate(rows)
        ]
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    sample_kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    with closing(_steps(model, idx, max_new_tokens, sample_kwargs, use_cache)) as steps:
        for nxt in steps:
            for i, token in enumerate(nxt.tolist()):
                if done[i] or token == eot_id:
                    done[i] = True
                else:
                    out[i].append(token)
            if all(done):
                break
    return out
