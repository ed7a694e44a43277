"""`POST /v1/completions` and `GET /v1/models`: OpenAI's completion API over the batching engine.

Prompt length. A prompt must leave room for at least one new token (fewer than
`context_length` ids) or the request is refused (400, code `context_length_exceeded`). With
`tinylm serve --truncate` a prompt too long is cut from the left instead, keeping its last
`context_length - 1` ids (the completion then slides, below). A prompt that fits is never cut.

Past the context. A completion that fills the context does not stop there: like `tinylm
generate`, it slides (each further token sees the last `context_length` ids), so both give the
same text. A choice that slid says so: `"context_slid": true` in the choice (in a stream, on its
last chunk) and a `warnings` entry in the response; `finish_reason` is `"length"` only when
`max_tokens` is reached.

Stop sequences are matched on the decoded text (`tinylm.stops.TextStream`): the text is cut
before the match, the request's row stops decoding, and a stream never sends the part of the
text that could still turn into a stop sequence until it is certain.

Cancellation. A client that disconnects cancels its rows at the next decode step: a stream when
its response is closed, a plain request through a task that waits for the connection's
`http.disconnect` while the request decodes.

`POST /v1/chat/completions`: tinylm models are base models without a chat template, so it is a
404 in OpenAI's error shape saying that this server offers completions only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tinylm.serve.engine import GenerationRequest
from tinylm.serve.protocol import ApiError, CompletionRequest, error_body
from tinylm.serve.registry import ServedModel, UnknownModel, canonical_id
from tinylm.stops import TextStream
from tinylm.train.checkpoint import CheckpointError

router = APIRouter()

# A reload can close the engine a request just looked up; the registry serves the newer model by
# then, so submitting again succeeds (a 503 only if reloads kept racing this request).
SUBMIT_TRIES = 3
MAX_CHOICES = 128  # prompts x n per request: each is a queued row; more is a batch job, not a call


@dataclass
class Choice:
    """One (prompt, sample) pair of a request: its engine request and text."""

    index: int
    job: GenerationRequest
    text: TextStream
    tokens: int = 0
    finish_reason: str | None = None
    out: list[str] = field(default_factory=list)


def encode_prompts(req: CompletionRequest, served: ServedModel, truncate: bool) -> list[list[int]]:
    """The request's prompts as id lists, checked and fitted to the context (module docstring)."""
    tok, ctx = served.tokenizer, served.context_length
    p = req.prompt
    if isinstance(p, str):
        rows = [tok.encode(p)]
    elif all(isinstance(x, str) for x in p):
        rows = [tok.encode(x) for x in p]
    elif all(isinstance(x, int) for x in p):
        rows = [list(p)]
    else:
        rows = [list(x) for x in p]
    start = tok.eot_id if tok.eot_id is not None else 0
    if len(rows) * req.n > MAX_CHOICES:
        raise ApiError(
            400,
            f"{len(rows)} prompts x n={req.n} is more than {MAX_CHOICES} completions in one "
            "request: split it",
            param="prompt",
        )
    out = []
    for i, ids in enumerate(rows):
        ids = ids or [start]  # an empty prompt starts a new document
        bad = [t for t in ids if not 0 <= t < tok.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {tok.vocab_size})",
                param="prompt",
            )
        if len(ids) >= ctx and truncate:  # the completion slides on from a full context
            ids = ids[-(ctx - 1) :]
        if len(ids) >= ctx:
            raise ApiError(
                400,
                f"This model's maximum context length is {ctx} tokens, and prompt {i} has "
                f"{len(ids)}: shorten it (or start the server with --truncate to keep its end)",
                param="prompt",
                code="context_length_exceeded",
            )
        out.append(ids)
    return out


async def _served(request: Request, model_id: str) -> ServedModel:
    try:
        return await run_in_threadpool(request.app.state.registry.get, model_id)
    except UnknownModel as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from e
    except CheckpointError as e:  # damaged on disk: the server's side, said in one line
        raise ApiError(503, f"the model cannot be loaded: {e}", type="server_error") from e


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    ids = await run_in_threadpool(request.app.state.registry.model_ids)
    return {"object": "list", "data": [_model_card(i, p) for i, p in ids]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict:
    ids = dict(await run_in_threadpool(request.app.state.registry.model_ids))
    with contextlib.suppress(UnknownModel):  # not an id at all: the 404 below
        model_id = canonical_id(model_id)
    if model_id not in ids:
        raise ApiError(404, f"The model '{model_id[:200]}' does not exist", code="model_not_found")
    return _model_card(model_id, ids[model_id])


def _model_card(model_id: str, path) -> dict:
    try:
        created = int(path.stat().st_mtime)
    except OSError:  # rotated away since the listing
        created = 0
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "tinylm",
        "checkpoint": path.name,
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> JSONResponse:
    """No tinylm model has a chat template (they are base models): say so in OpenAI's shape."""
    return JSONResponse(
        status_code=404,
        content=error_body(
            "tinylm serves base models without a chat template: this server offers "
            "completions only (POST /v1/completions with a 'prompt')",
            code="chat_not_supported",
        ),
    )


@router.post("/v1/completions")
async def create_completion(request: Request, req: CompletionRequest):
    for attempt in range(SUBMIT_TRIES):
        served = await _served(request, req.model)
        prompts = encode_prompts(req, served, request.app.state.settings.truncate)
        choices, events = _choices(req, served, prompts)
        try:
            for c in choices:
                served.engine.submit(c.job)
            break
        except RuntimeError as e:  # a reload closed this engine between lookup and submit
            for c in choices:
                c.job.cancel()
            if attempt == SUBMIT_TRIES - 1:  # the registry has the newer model by now
                raise ApiError(
                    503, "the model is being reloaded: retry", type="server_error"
                ) from e
    usage_prompt = sum(len(ids) for ids in prompts)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
    }
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _sse(head, choices, events, usage_prompt, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    left = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(request, choices, left))
    try:
        async for _ in _drive(choices, events):
            pass
    finally:
        watcher.cancel()
        for c in choices:
            c.job.cancel()
    if left.is_set():  # the client left: nobody reads this
        return JSONResponse(status_code=499, content={})
    body = {**head, "choices": [_choice(c, c.finish_reason, "".join(c.out)) for c in choices]}
    body["usage"] = _usage(usage_prompt, choices)
    if warning := _slid_warning(choices, served.context_length):
        body["warnings"] = [warning]
    return body


async def _watch_disconnect(request: Request, choices: list[Choice], left: asyncio.Event) -> None:
    """Cancel the choices' rows as soon as the client disconnects. The body has been read, so
    the next ASGI message is `http.disconnect` (uvicorn sends it when the connection closes;
    this task is cancelled when the answer is ready first)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            left.set()
            for c in choices:
                c.job.cancel()
            return


def _choice(c: Choice, finish_reason: str | None, text: str) -> dict:
    out = {"text": text, "index": c.index, "logprobs": None, "finish_reason": finish_reason}
    if finish_reason is not None and c.job.slid:
        out["context_slid"] = True
    return out


def _slid_warning(choices: list[Choice], context: int) -> str | None:
    slid = [c.index for c in choices if c.job.slid]
    if not slid:
        return None
    return (
        f"choice(s) {slid} went past the model's context of {context} tokens: it slid, each "
        f"further token seeing only the last {context} (as tinylm generate does)"
    )


def _choices(
    req: CompletionRequest, served: ServedModel, prompts: list[list[int]]
) -> tuple[list[Choice], asyncio.Queue]:
    """One engine request per (prompt, sample), reporting into a new event queue."""
    tok = served.tokenizer
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def post(*item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    choices: list[Choice] = []
    for ids in prompts:
        for j in range(req.n):
            index = len(choices)
            job = GenerationRequest(
                prompt=ids,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_k=req.top_k or None,
                top_p=req.top_p if req.top_p < 1.0 else None,
                seed=None if req.seed is None else req.seed + j,
                eot_id=tok.eot_id,
                on_token=lambda t, i=index: post(i, "token", t),
                on_done=lambda reason, err, i=index: post(i, "done", (reason, err)),
            )
            prefix = tok.decode(ids) if req.echo else ""
            choices.append(Choice(index, job, TextStream(tok, req.stop or [], prefix)))
    return choices, events


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


async def _drive(choices: list[Choice], events: asyncio.Queue) -> AsyncIterator[tuple[Choice, str]]:
    """Apply engine events to the choices; yield (choice, new text) as text becomes final
    (with the finish reason set on a choice's last yield). Ends when every choice finished
    (a cancelled row finishes too)."""
    remaining = len(choices)
    while remaining:
        index, kind, value = await events.get()
        c = choices[index]
        if c.finish_reason is not None:
            continue  # an event that raced with a stop sequence
        if kind == "token":
            c.tokens += 1
            delta = c.text.push(value)
            if c.text.stopped:
                c.job.cancel()
                c.finish_reason = "stop"
        else:
            reason, error = value
            if reason == "error":
                raise ApiError(500, f"generation failed: {error}", type="server_error")
            delta = c.text.flush()
            c.finish_reason = "stop" if reason in ("stop", "cancelled") else reason
        c.out.append(delta)
        if c.finish_reason is not None:
            remaining -= 1
        if delta or c.finish_reason is not None:
            yield c, delta


async def _sse(
    head: dict,
    choices: list[Choice],
    events: asyncio.Queue,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's stream format, ending with `data: [DONE]`.

    Closing the stream (the client went away) cancels every row still decoding."""
    try:
        async for c, delta in _drive(choices, events):
            chunk = {**head, "choices": [_choice(c, c.finish_reason, delta)]}
            yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            usage = {**head, "choices": [], "usage": _usage(prompt_tokens, choices)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        for c in choices:
            c.job.cancel()
