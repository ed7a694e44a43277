"""Per-row positions in the model, and the batching engine against `tinylm.generate`."""

from __future__ import annotations

import threading

import pytest
import torch

from tinylm.config import ModelConfig
from tinylm.generate import generate
from tinylm.model import GPT
from tinylm.serve.engine import BatchEngine, GenerationRequest


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, context_length=48, n_layer=2, n_head=4, d_model=32, **overrides
    )
    return GPT(cfg).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {"pos_emb": "rope"},
        {"pos_emb": "learned"},
        {"pos_emb": "rope", "sliding_window": 5, "n_kv_head": 2},
    ],
    ids=["rope", "learned", "window-gqa"],
)
def test_per_row_positions_match_single_sequences(overrides):
    """Rows of different lengths decoded together from one cache give each row's own logits."""
    model = _model(**overrides)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (3, 11, 7)]
    steps = 4
    cache = model.make_kv_cache(len(seqs))
    with torch.no_grad():
        for i, s in enumerate(seqs):  # prefill each row alone (as the engine does)
            view = model.make_kv_cache(1)
            model(s[None, :-1], kv_cache=view)
            for layer in range(model.cfg.n_layer):
                cache.k[layer][i, :, : len(s) - 1] = view.k[layer][0, :, : len(s) - 1]
                cache.v[layer][i, :, : len(s) - 1] = view.v[layer][0, :, : len(s) - 1]
        extra = torch.randint(0, 50, (len(seqs), steps), generator=g)
        for t in range(steps):
            idx = torch.stack([s[-1] if t == 0 else extra[i, t - 1] for i, s in enumerate(seqs)])
            positions = torch.tensor([len(s) - 1 + t for s in seqs])
            batched, _ = model(idx[:, None], kv_cache=cache, positions=positions)
            for i, s in enumerate(seqs):
                full = torch.cat([s, extra[i, :t]])
                ref, _ = model(full[None])
                torch.testing.assert_close(batched[i, -1], ref[0, -1], atol=1e-5, rtol=1e-4)


def _run(engine: BatchEngine, prompt: list[int], **kw) -> tuple[list[int], str, threading.Event]:
    out: list[int] = []
    result = {}
    done = threading.Event()

    def on_done(reason, error):
        result["reason"] = reason
        done.set()

    req = GenerationRequest(prompt=prompt, on_token=out.append, on_done=on_done, **kw)
    engine.submit(req)
    return out, result, done, req


def test_engine_batches_ragged_prompts_like_generate():
    """Greedy requests of different lengths, submitted together and joining mid-decode, give
    the ids `generate` gives each alone; seeds reproduce sampled requests."""
    model = _model(pos_emb="rope")
    engine = BatchEngine(model, max_batch=4)
    prompts = [[1, 2, 3], [5] * 12, [7, 8, 9, 10, 11, 12, 13], [4], [9, 9], [3, 1, 4, 1, 5]]
    # six requests, four rows: the last two wait and join when rows free up
    runs = [_run(engine, p, max_tokens=10 + 3 * i, temperature=0.0) for i, p in enumerate(prompts)]
    for i, (out, result, done, _) in enumerate(runs):
        assert done.wait(30)
        expected = generate(model, prompts[i], max_new_tokens=10 + 3 * i, temperature=0.0)
        assert out == expected, i
        assert result["reason"] == "length"
    assert engine.stats.steps < sum(10 + 3 * i for i in range(6))  # they shared steps

    sampled = [_run(engine, [1, 2], max_tokens=20, seed=s, temperature=1.0) for s in (7, 7, 8)]
    for _, _, done, _ in sampled:
        assert done.wait(30)
    assert sampled[0][0] == sampled[1][0] != sampled[2][0]
    engine.close(wait=True)


def test_engine_slides_past_the_context_like_generate_and_stops_on_cancel():
    """Past the context (48) the engine slides as `generate` does: the same greedy ids, the
    request marked `slid`, and a row beside it in the cache undisturbed."""
    model = _model(pos_emb="learned")
    engine = BatchEngine(model, max_batch=2)
    out, result, done, req = _run(engine, list(range(40)), max_tokens=30, temperature=0.0)
    short, short_result, short_done, short_req = _run(
        engine, [3, 4], max_tokens=20, temperature=0.0
    )
    assert done.wait(30) and short_done.wait(30)
    assert result["reason"] == "length" and req.slid and len(out) == 30  # 22 past the context
    assert out == generate(model, list(range(40)), max_new_tokens=30, temperature=0.0)
    assert short == generate(model, [3, 4], max_new_tokens=20, temperature=0.0)
    assert short_result["reason"] == "length" and not short_req.slid

    got_three = threading.Event()
    tokens: list[int] = []

    def on_token(t):
        tokens.append(t)
        if len(tokens) == 3:
            req.cancel()
            got_three.set()

    finished = {}
    req = GenerationRequest(
        prompt=[1], max_tokens=40, on_token=on_token, on_done=lambda r, e: finished.update(r=r)
    )
    engine.submit(req)
    engine.close(wait=True)
    assert finished["r"] == "cancelled" and len(tokens) == 3
    assert engine.stats.cancelled == 1
