"""lm-evaluation-harness on tinylm: the model interface checked against direct forward passes,
and a local multiple-choice task run end to end through `tinylm eval --tasks` (offline)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics, run_cli
from lm_eval.api.instance import Instance

from tinylm.config import ConfigError, load_config
from tinylm.data.errors import DataError
from tinylm.eval.evaluate import evaluate_full
from tinylm.eval.harness import TinyLMHarness, target_windows
from tinylm.eval.harness_run import load_tasks
from tinylm.generate import generate
from tinylm.model import GPT
from tinylm.tokenizer import EOT, CharTokenizer
from tinylm.train import checkpoint as ck

CONTEXT = 32  # short, so that long questions and texts exercise left truncation and windows

# A multiple-choice task: answer indices vary so that no fixed position scores 1.
QUESTIONS = [
    ("The cat sat on the", ["mat", "moon", "sea"], 0),
    (
        "A long question whose context is longer than the model's thirty-two positions: red or",
        ["blue", "green"],
        1,
    ),
    ("Two plus two is", ["four", "five", "six", "ten"], 0),
    ("The sky at night is", ["bright", "dark"], 1),
    ("Bread is made from", ["flour", "stone", "glass"], 0),
    ("Ice is frozen", ["fire", "water", "sand"], 1),
    ("An owl hoots in the", ["day", "night"], 1),
    ("Snow is", ["white", "black", "green"], 0),
    ("Fish swim in", ["trees", "water"], 1),
    (
        "Yet another question, also longer than the context of this tiny model, ends with",
        ["a dot", "no dot at all", "x"],
        2,
    ),
]


def _text(q: str) -> str:
    return f"Q: {q}\nA:"


def _toy_overrides(tok: CharTokenizer) -> list[str]:
    """The small model every test here scores with (in memory and as a saved run)."""
    return [
        f"model.vocab_size={tok.vocab_size}",
        f"model.context_length={CONTEXT}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.d_model=32",
    ]


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    texts = [_text(q) + " " + " ".join(c) for q, c, _ in QUESTIONS]
    return CharTokenizer.fit([*texts, "abcdefghijklmnopqrstuvwxyz .,:?!\n"])


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    cfg = load_config("tiny", _toy_overrides(tok))
    torch.manual_seed(0)
    m = GPT(cfg.model)
    m.init_weights()
    return m.eval()


@pytest.fixture(scope="module")
def lm(model, tok) -> TinyLMHarness:
    return TinyLMHarness(model, tok, batch_size=3)


@pytest.fixture(scope="module")
def varied(model) -> GPT:
    """The same architecture with large random weights: init_weights' small ones make a random
    model repeat its last character, whatever the prompt, which would hide prompt handling."""
    m = GPT(model.cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return m.eval()


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """The recipe of the harness's Hugging Face model, by hand: the last context_length + 1
    tokens of context + continuation, one forward pass, the continuation's log-probabilities."""
    ctx = tok.encode(context) if context else [tok.eot_id]
    cont = tok.encode(continuation)
    whole = (ctx + cont)[-(CONTEXT + 1) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logp = F.log_softmax(logits[0, -len(cont) :].float(), dim=-1)
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


@pytest.mark.parametrize(
    "n,first", [(5, 1), (33, 1), (34, 1), (100, 1), (100, 90), (100, 40), (3, 2)]
)
def test_target_windows_score_every_target_once_with_the_longest_history(n, first):
    seen = []
    for start, end, skip in target_windows(n, first, CONTEXT):
        assert end - 1 - start <= CONTEXT  # the model reads at most its context
        targets = list(range(start + 1 + skip, end))
        assert start == max(0, targets[-1] - CONTEXT)  # the last target sees a full context
        seen += targets
    assert seen == list(range(first, n))


def test_loglikelihood_equals_a_direct_forward_pass(lm, model, tok):
    pairs = [
        ("Q: Snow is", " white"),
        ("", "Fish swim in water"),  # empty context: conditioned on end-of-text
        (_text(QUESTIONS[1][0]), " green"),  # context longer than the model's: cut on the left
        ("Q: Ice is frozen ", "water"),  # a trailing space moves into the continuation
        ("  ", "Snow"),  # all of it: conditioned on end-of-text
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        if context.endswith(" "):
            stripped = context.rstrip(" ")
            context, continuation = stripped, context[len(stripped) :] + continuation
        expected = _direct_loglikelihood(model, tok, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert logprob < 0


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(lm, model, tok):
    prompt = "Q: The cat sat on the"
    greedy = tok.decode(generate(model, tok.encode(prompt), max_new_tokens=6, temperature=0))
    other = "".join("a" if ch != "a" else "b" for ch in greedy)  # differs at every position
    (_, is_greedy), (_, not_greedy) = lm.loglikelihood(
        [_req("loglikelihood", prompt, greedy), _req("loglikelihood", prompt, other)]
    )
    assert is_greedy and not not_greedy


def test_a_continuation_longer_than_the_context_is_scored_in_windows(lm, model, tok):
    context, continuation = "Q:", " " + " ".join(c for _, cs, _ in QUESTIONS for c in cs)
    assert len(tok.encode(continuation)) > 2 * CONTEXT
    ((logprob, _),) = lm.loglikelihood([_req("loglikelihood", context, continuation)])
    ids = np.array(tok.encode(context + continuation))
    # Chunks of context_length targets, each read with the longest history that fits.
    chunked = 0.0
    with torch.no_grad():
        for start, end, skip in target_windows(len(ids), len(tok.encode(context)), CONTEXT):
            logits, _ = model(torch.tensor(ids[start : end - 1])[None])
            logp = F.log_softmax(logits[0].float(), dim=-1)
            chunked += sum(float(logp[j, ids[start + 1 + j]]) for j in range(skip, end - 1 - start))
    assert logprob == pytest.approx(chunked, abs=1e-3)


def test_rolling_loglikelihood_equals_evaluate_full(lm, model, tok):
    text = " ".join(_text(q) + " " + c[a] for q, c, a in QUESTIONS)  # ~400 chars, many windows
    short = "Snow is white."
    long_ll, short_ll = lm.loglikelihood_rolling(
        [_req("loglikelihood_rolling", text), _req("loglikelihood_rolling", short)]
    )
    ids = np.array([tok.eot_id, *tok.encode(text)], dtype=np.int64)
    full = evaluate_full(model, ids, batch_size=4, seq_len=CONTEXT, device="cpu")
    assert full.tokens == len(ids) - 1
    assert long_ll == pytest.approx(-full.nats, rel=1e-5)
    assert short_ll == pytest.approx(_direct_loglikelihood(model, tok, "", short), abs=1e-4)


def test_generate_until_cuts_at_the_first_stop_string_and_batches_exactly(varied, tok):
    lm, model = TinyLMHarness(varied, tok, batch_size=3), varied
    prompts = ["Q: Snow is", "Q: Fish in", "Q: An owl hoots", _text(QUESTIONS[1][0])]
    # The harness keeps the prompt's last context - max_gen_toks tokens (room for the answer).
    greedy = [
        tok.decode(
            generate(model, tok.encode(p)[-(CONTEXT - 12) :], max_new_tokens=12, temperature=0)
        )
        for p in prompts
    ]
    stop = greedy[0][3:5]  # a string the first continuation is known to contain
    out = lm.generate_until(
        [
            _req("generate_until", p, {"until": [stop, "\u2603"], "max_gen_toks": 12})
            for p in prompts
        ]
    )
    assert len(set(greedy)) == len(greedy)  # the prompts matter
    # A shorter cut of the long prompt gives another continuation: truncation is checked too.
    cut16 = generate(varied, tok.encode(prompts[3])[-16:], max_new_tokens=12, temperature=0)
    assert tok.decode(cut16) != greedy[3]
    for text, greedy_text in zip(out, greedy, strict=True):
        full = greedy_text.split(EOT)[0]  # generation also ends at the end-of-text token
        cut = full.find(stop)
        assert text == (full if cut < 0 else full[:cut])
    assert out[0] == greedy[0][: greedy[0].find(stop)] and len(out[0]) <= 3


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "toy.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    (root / "toy.yaml").write_text(
        f"""task: tinylm_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, tok):
    run = tmp_path_factory.mktemp("run") / "toy"
    cfg = load_config(
        "tiny",
        [*_toy_overrides(tok), "log.tensorboard=true"],
    )
    ck.write_run_files(run, cfg, tok)
    ck.save_checkpoint(
        run / "checkpoints",
        7,
        model_state=model.state_dict(),
        train_state={"loop": {"step": 7}},
        config=cfg,
        tokenizer=tok,
    )
    return run


def test_local_multiple_choice_task_end_to_end(run_dir, task_dir, model, tok, capsys, monkeypatch):
    # Offline already: the command skips its network probe and sets nothing in this process.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Expected accuracy by hand: the argmax of the per-choice log-likelihoods (acc) and of the
    # log-likelihood per character of the choice (acc_norm), from tinylm's own forward pass.
    hits, hits_norm = [], []
    for q, choices, answer in QUESTIONS:
        ll = [_direct_loglikelihood(model, tok, _text(q), " " + c) for c in choices]
        norm = [v / len(c) for v, c in zip(ll, choices, strict=True)]
        hits.append(int(np.argmax(ll)) == answer)
        hits_norm.append(int(np.argmax(norm)) == answer)
    acc, acc_norm = float(np.mean(hits)), float(np.mean(hits_norm))
    assert 0 < acc < 1  # the check could fail in either direction

    assert run_cli("eval", run_dir, "--tasks", "tinylm_toy", "--include-path", task_dir) == 0
    out = capsys.readouterr().out
    assert "tinylm_toy" in out and "acc" in out  # the table
    (path,) = (run_dir / "eval").glob("harness-*.json")
    results = json.loads(path.read_text())
    assert results["results"]["tinylm_toy"]["acc,none"] == pytest.approx(acc)
    assert results["results"]["tinylm_toy"]["acc_norm,none"] == pytest.approx(acc_norm)
    assert results["tinylm"]["step"] == 7
    (line,) = read_metrics(run_dir, "eval")
    assert line["step"] == 7
    assert line["harness/tinylm_toy/acc"] == pytest.approx(acc)
    assert math.isfinite(line["harness/tinylm_toy/acc_stderr"])
    assert "harness/tinylm_toy/sample_len" not in line  # a count, not a metric
    assert list((run_dir / "tb").iterdir())  # TensorBoard events written

    # --limit: the first N documents only.
    assert (
        run_cli(
            "eval", run_dir, "--tasks", "tinylm_toy", "--include-path", task_dir, "--limit", "4"
        )
        == 0
    )
    newest = max((run_dir / "eval").glob("harness-*.json"), key=lambda p: p.stat().st_mtime_ns)
    limited = json.loads(newest.read_text())["results"]["tinylm_toy"]["acc,none"]
    assert limited == pytest.approx(float(np.mean(hits[:4])))


def test_unknown_task_names_the_fix(task_dir):
    with pytest.raises(
        ConfigError, match=r"unknown harness task 'tinylm_toi'.*tinylm_toy.*lm-eval ls tasks"
    ):
        load_tasks(["tinylm_toi"], [str(task_dir)], include_defaults=False)


def test_a_missing_hub_dataset_is_one_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline, whatever this machine's network: the data set is looked up in the cache only.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "t.yaml").write_text(
        "task: hub_only\ndataset_path: tinylm-test/absent\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: ['a']\ndoc_to_target: 0\n"
    )
    with pytest.raises(DataError, match=r"task 'hub_only'.*cache \(.*hf-cache\)") as err:
        load_tasks(["hub_only"], [str(tmp_path)], include_defaults=False)
    assert "\n" not in str(err.value)


def test_bad_options_are_clear_errors(run_dir, capsys):
    assert run_cli("eval", run_dir, "--tasks", "x", "--limit", "2.5") == 2
    assert "--limit 2.5: give a whole number" in capsys.readouterr().err
    assert run_cli("eval", run_dir, "--tasks", "x", "--full") == 2
    assert "--tasks runs harness benchmarks" in capsys.readouterr().err


def test_more_few_shot_examples_than_a_task_has_is_a_clear_error(
    run_dir, task_dir, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["eval", run_dir, "--tasks", "tinylm_toy", "--include-path", task_dir]
    assert run_cli(*argv, "--num-fewshot", "1000") == 2
    err = capsys.readouterr().err
    assert f"--num-fewshot 1000: task 'tinylm_toy' has only {len(QUESTIONS)} example(s)" in err
    assert "internal error" not in err


def test_a_malformed_task_yaml_is_named_not_called_unknown(tmp_path):
    (tmp_path / "ok.yaml").write_text("task: other\nprocess_docs: !function utils.process\n")
    (tmp_path / "broken.yaml").write_text("task: tinylm_broken\ndataset_path: json\n  oops: [x\n")
    with pytest.raises(
        ConfigError,
        match=r"tinylm_broken' not found: .*broken.yaml .*defines it but is not valid YAML \(.*line 3",
    ) as e:
        load_tasks(["tinylm_broken"], [str(tmp_path)], include_defaults=False)
    assert "ok.yaml" not in str(e.value)  # application tags (!function) are valid YAML
