"""The server's boundaries (issue 21): model ids confined to the served root and canonical, one
loaded copy per checkpoint and an LRU bound with memory in /health, plain requests cancelled
when their client leaves, the API key's edge cases, a checkpoint rotated away while it loads,
and what happens at the context length (issue 24). Real uvicorn on 127.0.0.1, bounded loops."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import API_KEY, ThreadServer
from helpers import forge_nan

from tinylm.generate import generate
from tinylm.serve.engine import SLOW_ENV
from tinylm.serve.registry import ModelRegistry, UnknownModel, canonical_id
from tinylm.train import checkpoint

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def roots(serve_root, tmp_path_factory):
    """`served/` holds copies of alpha and beta, a link to a run outside it, and a checkpoint
    linked from outside; `elsewhere/` holds a run that must never be served."""
    base = tmp_path_factory.mktemp("bounds")
    served, elsewhere = base / "served", base / "elsewhere"
    for name in ("alpha", "beta"):
        shutil.copytree(serve_root / name, served / name)
    shutil.copytree(serve_root / "beta", elsewhere / "secret")
    shutil.copytree(serve_root / "beta", served / "poisoned")
    forge_nan(checkpoint.find_latest(served / "poisoned" / "checkpoints"))
    (served / "linked").symlink_to(elsewhere / "secret", target_is_directory=True)
    outside_ckpt = elsewhere / "secret" / "checkpoints" / "step_00000010"
    own = served / "alpha" / "checkpoints" / "step_00000010"
    shutil.rmtree(own, ignore_errors=True)  # replaced by a link to the outside run's
    own.symlink_to(outside_ckpt)
    return served, elsewhere


@pytest.fixture(scope="module")
def server(roots):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SLOW_ENV, "0.02")  # 20 ms per decode step: long enough to leave mid-request
        s = ThreadServer(roots[0], api_key=API_KEY, max_models=2)
        yield s
        s.stop()


def _health(client) -> dict:
    return client.get("/health").json()


def test_ids_outside_the_served_root_are_refused(client, roots):
    elsewhere = roots[1]
    escapes = [
        "alpha/../../elsewhere/secret/checkpoints/step_00000010",
        "alpha/../beta",
        "../elsewhere/secret",
        "linked",  # a symlinked run whose real directory is outside
        "linked/step_00000010",
        "alpha/step_00000010",  # a symlinked checkpoint whose real directory is outside
        "alpha/checkpoints/step_00000015",
        str(elsewhere / "secret"),
    ]
    for model in escapes:
        r = client.post("/v1/completions", json={"model": model, "prompt": "A", "max_tokens": 1})
        assert r.status_code == 404, (model, r.text)
        assert r.json()["error"]["code"] == "model_not_found"
        r = client.post("/api/reload", json={"model": model})
        assert r.status_code == 404, (model, r.text)
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert "alpha/step_00000015" in ids and not any(i.startswith("linked") for i in ids)
    assert "alpha/step_00000010" not in ids
    assert "linked" not in {r["name"] for r in client.get("/api/runs").json()["runs"]}
    assert client.get("/api/runs/linked/metrics").status_code == 404
    assert _health(client)["memory"]["models_loaded"] <= 1  # nothing from outside was loaded


def test_every_spelling_shares_one_model_and_threads_do_not_grow(client):
    spellings = [
        "alpha",
        "alpha/step_00000030",
        "alpha/./step_00000030",
        "alpha//step_30/",
        "./alpha/step_030",
        "alpha/",
    ]
    body = {"prompt": "ANNA:", "max_tokens": 2, "temperature": 0}
    texts = set()
    for model in spellings * 3:
        r = client.post("/v1/completions", json={**body, "model": model})
        assert r.status_code == 200, (model, r.text)
        texts.add(r.json()["choices"][0]["text"])
    health = _health(client)
    assert len(texts) == 1
    assert health["memory"]["models_loaded"] == 1 and len(health["models"]) == 1
    threads = health["memory"]["threads"]
    for model in spellings * 4:
        assert client.post("/v1/completions", json={**body, "model": model}).status_code == 200
    assert _health(client)["memory"]["threads"] <= threads
    assert canonical_id("alpha//step_30/") == "alpha/step_00000030"


def test_lru_bounds_loaded_models_with_memory_in_health(client):
    body = {"prompt": "A", "max_tokens": 1}
    before = set(threading.enumerate())
    models = ["alpha/step_00000015", "alpha/step_00000030", "beta"]
    for model in models * 3:  # three checkpoints through max_models=2
        assert client.post("/v1/completions", json={**body, "model": model}).status_code == 200
    memory = _health(client)["memory"]
    assert memory["models_loaded"] == 2 and memory["max_models"] == 2
    assert memory["models_evicted"] >= 6
    assert memory["rss_bytes"] > 10 << 20 and memory["parameter_bytes"] > 0
    deadline = time.monotonic() + 10  # evicted engines' threads end once idle
    engines = None
    while time.monotonic() < deadline:
        engines = [
            t.name
            for t in threading.enumerate()
            if t.name.startswith("engine-") and t not in before
        ]
        if len(engines) <= 2:
            break
        time.sleep(0.1)
    assert len(engines) <= 2, engines


def test_plain_completions_are_cancelled_when_the_client_leaves(server, client):
    body = {"model": "beta", "prompt": "ANNA:", "max_tokens": 400, "temperature": 0}
    assert client.post("/v1/completions", json={**body, "max_tokens": 1}).status_code == 200
    before = _health(client)["models"]["beta"]

    def leave(_):
        try:  # the client gives up after 0.5 s: its connection closes
            httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
        except httpx.TimeoutException:
            return True
        return False

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(leave, range(8)))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = _health(client)["models"]["beta"]
        if stats["cancelled"] - before["cancelled"] == 8 and stats["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["cancelled"] - before["cancelled"] == 8
    assert stats["tokens"] - before["tokens"] < 8 * 200  # stopped far before 8 x 400 tokens


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(client):
    """Issue 21 item 1: serve refuses NaN weights through the shared loader check, in one
    line naming the checkpoint (503: the model cannot be loaded), and keeps serving the others."""
    body = {"model": "poisoned", "prompt": "ab", "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "NaN or infinite" in message and "step_00000010" in message
    assert len(message.splitlines()) == 1
    assert client.post("/v1/completions", json={**body, "model": "beta"}).status_code == 200


def test_api_key_edge_cases(client, server):
    url = f"{server.url}/v1/models"
    for value in ("Bearer clé".encode(), b"Bearer \xff\xfe", "Bearer ключ".encode()):
        r = httpx.get(url, headers={"Authorization": value}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers=AUTH, timeout=10).status_code == 200


def test_chat_completions_is_an_openai_shaped_404(client):
    r = client.post(
        "/v1/chat/completions",
        json={"model": "beta", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 404
    error = r.json()["error"]
    assert "completions only" in error["message"] and error["type"] == "invalid_request_error"


def test_past_the_context_serve_slides_as_generate_does(client, roots):
    """Context 64: a 60-token prompt and 20 new tokens go 16 past it. The completion slides
    like `tinylm generate` (same greedy text) and says so, streamed or not."""
    served, _ = roots
    model, _, tok, _ = checkpoint.load_model(served / "beta")
    prompt = ("ANNA: Good morrow, sir; " * 5)[:60]
    ids = tok.encode(prompt)
    assert len(ids) == 60
    expected = tok.decode(generate(model, ids, max_new_tokens=20, temperature=0.0))
    body = {"model": "beta", "prompt": prompt, "max_tokens": 20, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == expected and choice["context_slid"] is True
    assert choice["finish_reason"] in ("length", "stop") and "64 tokens" in out["warnings"][0]
    short = client.post("/v1/completions", json={**body, "max_tokens": 3}).json()
    assert "context_slid" not in short["choices"][0] and "warnings" not in short
    chunks = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(httpx.Response(200, content=line[6:]).json())
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0].get("context_slid") is True


def test_a_checkpoint_rotated_away_while_loading_is_not_an_error(roots, tmp_path, monkeypatch):
    """The race behind ~1 in 1,400 requests failing during rotation: the server found the
    newest checkpoint, then the trainer saved a newer one and rotated the found one away before
    it was read. The run id loads the newer one; a pinned id of the deleted one is a 404."""
    run = tmp_path / "runs" / "alpha"
    shutil.copytree(roots[0] / "alpha", run, symlinks=True)
    (run / "checkpoints" / "step_00000010").unlink()
    registry = ModelRegistry(run.parent)
    real_find = checkpoint.find_latest
    rotated = []

    def stale_then_rotated(root, verify_hashes=True):
        if rotated:
            return real_find(root, verify_hashes)
        rotated.append(True)  # as seen just before step_30 existed; then rotation ran
        old = root / "step_00000015"
        shutil.rmtree(old)
        return old

    monkeypatch.setattr(checkpoint, "find_latest", stale_then_rotated)
    try:
        assert registry.get("alpha").checkpoint.name == "step_00000030"
        with pytest.raises(UnknownModel):
            registry.get("alpha/step_00000015")
    finally:
        registry.close()


def test_registry_refuses_a_file_as_root(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ModelRegistry(f)


def test_serve_command_refusals_key_from_environment_and_warning(
    roots, tmp_path, capsys, monkeypatch
):
    import uvicorn
    from helpers import run_cli

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app, kw)))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    monkeypatch.delenv("TINYLM_API_KEY", raising=False)
    assert run_cli("serve", f) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    for bad in ("", "  ", "ключ", "a b"):
        assert run_cli("serve", roots[0], "--api-key", bad) == 2
        err = capsys.readouterr().err
        assert "--api-key" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("TINYLM_API_KEY", "")  # `export TINYLM_API_KEY=$UNSET`
    assert run_cli("serve", roots[0]) == 2 and "is empty" in capsys.readouterr().err
    assert not started
    monkeypatch.setenv("TINYLM_API_KEY", "from-env")
    assert run_cli("serve", roots[0], "--host", "0.0.0.0", "--max-models", "3") == 0
    settings = started[-1][0].state.settings
    assert settings.api_key == "from-env" and settings.max_models == 3
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("TINYLM_API_KEY")
    assert run_cli("serve", roots[0], "--host", "0.0.0.0") == 0
    assert "without an API key" in capsys.readouterr().err
    assert run_cli("serve", roots[0]) == 0  # loopback: no warning
    assert "warning" not in capsys.readouterr().err


def test_generate_stop_strings(serve_root, capsys):
    from helpers import run_cli

    base = ["generate", serve_root / "beta", "--prompt", "ANNA:", "--temperature", "0"]
    assert run_cli(*base, "--max-new-tokens", "40") == 0
    full = capsys.readouterr().out.rstrip("\n")
    generated = full[len("ANNA:") :]
    stop = generated[6:9]
    cut = generated.find(stop)
    assert stop and cut >= 0
    assert run_cli(*base, "--max-new-tokens", "40", "--stop", "never-there", "--stop", stop) == 0
    assert capsys.readouterr().out.rstrip("\n") == "ANNA:" + generated[:cut]


def test_truncate_cuts_only_prompts_that_do_not_fit(roots):
    """--truncate keeps a fitting prompt whole (it used to cut it to context - max_tokens ids,
    down to one id) and cuts a too long one to its last context - 1 ids."""
    from tinylm.serve.completions import encode_prompts
    from tinylm.serve.protocol import CompletionRequest

    registry = ModelRegistry(roots[0])
    try:
        served = registry.get("beta")
        fits = CompletionRequest(model="beta", prompt=list(range(1, 11)), max_tokens=100)
        assert encode_prompts(fits, served, truncate=True) == [list(range(1, 11))]
        long = CompletionRequest(model="beta", prompt=[1, 2] * 50, max_tokens=5)
        assert encode_prompts(long, served, truncate=True) == [([1, 2] * 50)[-63:]]
    finally:
        registry.close()
