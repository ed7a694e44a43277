"""The HTTP API of `tinylm serve` against a real uvicorn server on 127.0.0.1 (a subprocess),
with httpx and the official `openai` client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import API_KEY, Server

from tinylm.generate import generate
from tinylm.serve.dashboard import read_new_records
from tinylm.train.checkpoint import load_model

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(serve_root):
    s = Server(serve_root, "--api-key", API_KEY)
    yield s
    s.stop()


def _complete(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_health_and_api_key(server, client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert {"alpha", "alpha/step_00000015", "alpha/step_00000030", "beta"} <= set(ids)
    assert client.get("/v1/models/alpha/step_00000015").json()["checkpoint"] == "step_00000015"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
            ("GET", "/api/runs"),
        ):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"


def test_completion_matches_generate_with_usage(serve_root, client):
    model, _, tok, _ = load_model(serve_root / "alpha", "latest")
    prompt = "ANNA: the red"
    ids = tok.encode(prompt)
    expected = generate(model, ids, max_new_tokens=20, temperature=0.0, eot_id=tok.eot_id)
    body = _complete(client, model="alpha", prompt=prompt, max_tokens=20, temperature=0)
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == "alpha"
    assert choice["text"] == tok.decode(expected)
    assert choice["finish_reason"] == ("length" if len(expected) == 20 else "stop")
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }
    echoed = _complete(
        client, model="alpha", prompt=prompt, max_tokens=20, temperature=0, echo=True
    )
    assert echoed["choices"][0]["text"] == prompt + choice["text"]


def test_seed_n_stop_and_pinned_checkpoint(client):
    common = dict(model="alpha", prompt="BORIS:", max_tokens=24, temperature=1.0, top_k=20)
    a = _complete(client, **common, seed=11, n=3)
    b = _complete(client, **common, seed=11, n=3)
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]]  # seeds reproduce
    assert len(set(texts)) > 1  # n samples use seed, seed+1, ...
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    greedy = _complete(client, model="alpha", prompt="BORIS:", max_tokens=24, temperature=0)
    text = greedy["choices"][0]["text"]
    stop = text[6:9]
    cut = _complete(
        client, model="alpha", prompt="BORIS:", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut["choices"][0] == {
        **cut["choices"][0],
        "text": text[: text.find(stop)],
        "finish_reason": "stop",
    }
    early = _complete(
        client, model="alpha/step_00000015", prompt="BORIS:", max_tokens=24, temperature=0
    )
    assert early["choices"][0]["text"] != text  # 15 steps fewer training


def test_streaming_sse_matches_non_streaming(client):
    body = dict(model="beta", prompt="CLARA: the", max_tokens=30, temperature=0.9, seed=4)
    whole = _complete(client, **body)["choices"][0]["text"]
    chunks = []
    with client.stream(
        "POST",
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    text_events = [e for e in events if e["choices"]]
    assert len(text_events) > 3  # it streamed, not one lump
    assert "".join(e["choices"][0]["text"] for e in text_events) == whole
    assert text_events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert events[-1]["usage"]["completion_tokens"] >= len(text_events) - 1


def test_openai_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert "alpha" in [m.id for m in client.models.list()]
    r = client.completions.create(
        model="alpha", prompt=["ANNA:", "DMITRI: the"], max_tokens=12, n=2, seed=1, temperature=0.7
    )
    assert len(r.choices) == 4 and sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len("ANNA:") + len("DMITRI: the")
    stream = client.completions.create(
        model="alpha", prompt="ANNA:", max_tokens=12, seed=1, temperature=0.7, stream=True
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == r.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="x", temperature=7)
    assert e.value.body["param"] == "temperature"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x"}, 400, "model"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "alpha", "prompt": "x", "n": 99}, 400, "n"),
        ({"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "alpha", "prompt": "x", "logprobs": 2}, 400, None),
        ({"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "alpha", "prompt": "x", "seed": 2**64}, 400, "seed"),  # an overflow once
        ({"model": "alpha", "prompt": [[1, 2], [99999]]}, 400, "prompt"),
        ({"model": "alpha", "prompt": []}, 400, None),
        ({"model": "alpha", "prompt": "A" * 64}, 400, "prompt"),
        ({"model": "alpha", "prompt": ["a"] * 65, "n": 2}, 400, "prompt"),
        ({"model": "gamma", "prompt": "x"}, 404, "model"),
        ({"model": "alpha/step_00000099", "prompt": "x"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if "A" * 64 in str(body):
        assert error["code"] == "context_length_exceeded"
        assert "--truncate" in error["message"]


def test_eight_concurrent_requests_correct_and_faster(client):
    prompts = [f"{name}: the" for name in ("ANNA", "BORIS", "CLARA", "DMITRI")] * 2
    prompts = [p + " " * i for i, p in enumerate(prompts)]  # eight different lengths

    def one(p: str) -> dict:
        return _complete(client, model="beta", prompt=p, max_tokens=40, temperature=0)

    one(prompts[0])  # load the model before timing
    t0 = time.perf_counter()
    sequential = [one(p) for p in prompts]
    t_seq = time.perf_counter() - t0
    with ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        concurrent = list(pool.map(one, prompts))
        t_con = time.perf_counter() - t0
    for s, c in zip(sequential, concurrent, strict=True):
        assert c["choices"][0]["text"] == s["choices"][0]["text"]
    tokens = sum(r["usage"]["completion_tokens"] for r in concurrent)
    print(
        f"8 requests: sequential {tokens / t_seq:.0f} tok/s, concurrent {tokens / t_con:.0f} tok/s"
    )
    assert t_con < t_seq


def test_dashboard_routes_and_reload(serve_root, client):
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    alpha = runs["alpha"]
    assert alpha["status"] == "finished" and alpha["step"] == 30
    assert alpha["best_val_loss"] > 0 and alpha["best_bits_per_byte"] > 0
    assert alpha["last_checkpoint"] == "step_00000030"
    first = client.get("/api/runs/alpha/metrics").json()
    train = [r for r in first["records"] if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    again = client.get(
        "/api/runs/alpha/metrics", params={"offset": first["offset"], "file": first["file"]}
    ).json()
    assert again["records"] == [] and again["offset"] == first["offset"]
    samples = client.get("/api/runs/alpha/samples").json()["samples"]
    assert samples and all(s["text"] for s in samples)
    assert client.get("/api/runs/nope/metrics").status_code == 404
    reloaded = client.post("/api/reload", json={"model": "alpha"}).json()
    assert reloaded == {"model": "alpha", "checkpoint": "step_00000030", "step": 30}


def test_metrics_are_read_incrementally(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        json.dumps({"kind": "train", "step": s, "tokens": 64 * s, "loss": 3.0 / s}) for s in (1, 2)
    ]
    path.write_text(lines[0] + "\n" + lines[1][:10])  # the second line is still being written
    a = read_new_records(path, 0, "")
    assert [r["step"] for r in a["records"]] == [1] and a["offset"] == len(lines[0]) + 1
    with path.open("a") as f:
        f.write(
            lines[1][10:] + "\n" + json.dumps({"kind": "eval", "step": 2, "val/loss": 1.5}) + "\n"
        )
    b = read_new_records(path, a["offset"], a["file"])
    assert [(r["kind"], r["step"]) for r in b["records"]] == [("train", 2), ("eval", 2)]
    assert not b["reset"]
    path.write_text(lines[0] + "\n")  # a resumed run rewrote its history: shorter
    c = read_new_records(path, b["offset"], b["file"])
    assert c["reset"] and [r["step"] for r in c["records"]] == [1]


def test_serve_command_defaults_and_bad_arguments(tmp_path, capsys, monkeypatch):
    from helpers import run_cli

    monkeypatch.delenv("TINYLM_API_KEY", raising=False)
    from tinylm.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.path, args.api_key) == ("127.0.0.1", 8000, "runs", None)
    assert run_cli("serve", tmp_path / "missing") == 2
    assert "no such run or runs directory" in capsys.readouterr().err
    assert run_cli("serve", tmp_path, "--threads", "-1") == 2  # the rest: tests/test_bad_inputs.py
    assert "argument --threads" in capsys.readouterr().err
