"""Load and faults: a client leaving mid-stream, malformed and huge bodies, a 100-request burst.
After each, the server is still up and answers the next request. Loopback only, bounded loops."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import ThreadServer

from tinylm.serve.engine import SLOW_ENV


@pytest.fixture(scope="module")
def slow_server(serve_root):
    # 20 ms per decode step: a 50-token stream lasts ~1 s, long enough to leave in the middle.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SLOW_ENV, "0.02")  # read when an engine starts (first request of a model)
        s = ThreadServer(serve_root, max_body_bytes=64 * 1024)
        yield s
        s.stop()


def _answers_next(server: ThreadServer) -> None:
    assert server.alive()
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "beta", "prompt": "ANNA:", "max_tokens": 3},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def _stats(server: ThreadServer, model: str) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()["models"].get(model, {})


def test_client_disconnect_stops_decoding(slow_server):
    _answers_next(slow_server)  # loads beta
    before = _stats(slow_server, "beta")
    body = {"model": "beta", "prompt": "ANNA:", "max_tokens": 50, "stream": True, "temperature": 0}
    received = 0
    with httpx.stream("POST", f"{slow_server.url}/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leave: the connection closes with the block
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = _stats(slow_server, "beta")
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["tokens"] - before["tokens"] < 25  # stopped well before its 50 tokens
    _answers_next(slow_server)


def test_malformed_and_huge_bodies(slow_server):
    url = f"{slow_server.url}/v1/completions"
    cases = [
        b'{"model": "beta", "prompt": ',
        b"[1, 2, 3]",
        b"\xff\xfe not json",
        b"",
    ]
    for raw in cases:
        r = httpx.post(url, content=raw, headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["message"]
    big = b'{"model": "beta", "prompt": "' + b"A" * (10 << 20) + b'"}'
    r = httpx.post(url, content=big, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"model": "beta", "prompt": "'
        for _ in range(160):
            yield b"A" * 65536
        yield b'"}'

    try:
        r = httpx.post(
            url, content=chunks(), headers={"Content-Type": "application/json"}, timeout=30
        )
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server may answer and close before the client finished sending
    _answers_next(slow_server)


def test_burst_of_100_requests(slow_server):
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=120, limits=limits) as c:
            bodies = [
                {"model": "beta", "prompt": f"CLARA {i}:", "max_tokens": 2, "seed": i}
                for i in range(100)
            ]
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 100
    for r in responses:  # (a sample may end at once with end-of-text: 0 tokens)
        assert r.json()["usage"]["completion_tokens"] <= 2
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    _answers_next(slow_server)
