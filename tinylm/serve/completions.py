"""`POST /v1/completions` and `GET /v1/models`: OpenAI's completion API over the batching engine.

Prompt length. A prompt must leave room for at least one new token (fewer than
`context_length` ids) or the request is refused (400, code `context_length_exceeded`). With
`tinylm serve --truncate` a prompt that leaves less room than `max_tokens` is cut from the left
instead, keeping its last `context_length - max_tokens` ids (at least one). Either way, a
completion that reaches the end of the context stops there with `finish_reason: "length"`.

Stop sequences are matched on the decoded text (so they may span tokens): the text is cut before
the match, the request's row stops decoding, and a stream never sends the part of the text that
could still turn into a stop sequence (nor a half-decoded UTF-8 character) until it is certain.
A client that disconnects (or whose stream is closed) cancels its rows at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tinylm.serve.engine import GenerationRequest
from tinylm.serve.protocol import ApiError, CompletionRequest
from tinylm.serve.registry import ServedModel, UnknownModel
from tinylm.tokenizer.base import Tokenizer

router = APIRouter()

DISCONNECT_POLL_SECONDS = 0.25  # how soon a non-streaming request notices its client left
MAX_CHOICES = 128  # prompts x n per request: each is a queued row; more is a batch job, not a call


class TextStream:
    """Decoded text of one choice, released as it becomes final (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], prefix: str = "") -> None:
        self.tokenizer, self.stops, self.prefix = tokenizer, stops, prefix
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add an id; return the newly final text (sets `stopped` on a stop sequence)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._release(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))  # a multi-byte character still incomplete
        for stop in self.stops:  # hold back a tail that may become a stop sequence
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == stop[:k]:
                    safe -= k
                    break
        return self._release(max(safe, self.sent))

    def flush(self) -> str:
        """The rest of the text (the request ended, so nothing more can complete a stop)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        if self.sent == 0 and self.prefix:
            out, self.prefix = self.prefix + out, ""
        self.sent = max(self.sent, upto)
        return out


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
        if len(ids) + req.max_tokens > ctx and truncate:
            ids = ids[-max(1, ctx - req.max_tokens) :]
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


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    ids = await run_in_threadpool(request.app.state.registry.model_ids)
    return {"object": "list", "data": [_model_card(i, p) for i, p in ids]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict:
    ids = dict(await run_in_threadpool(request.app.state.registry.model_ids))
    if model_id not in ids:
        raise ApiError(404, f"The model '{model_id}' does not exist", code="model_not_found")
    return _model_card(model_id, ids[model_id])


def _model_card(model_id: str, path) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": int(path.stat().st_mtime),
        "owned_by": "tinylm",
        "checkpoint": path.name,
    }


@router.post("/v1/completions")
async def create_completion(request: Request, req: CompletionRequest):
    served = await _served(request, req.model)
    prompts = encode_prompts(req, served, request.app.state.settings.truncate)
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
    try:
        for c in choices:
            served.engine.submit(c.job)
    except RuntimeError as e:  # a reload closed this engine between lookup and submit
        for c in choices:
            c.job.cancel()
        raise ApiError(503, "the model is being reloaded: retry", type="server_error") from e
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
    try:
        async for _ in _drive(choices, events, request):
            pass
    finally:
        for c in choices:
            c.job.cancel()
    if any(c.finish_reason is None for c in choices):  # the client left: nobody reads this
        return JSONResponse(status_code=499, content={})
    return {
        **head,
        "choices": [
            {
                "text": "".join(c.out),
                "index": c.index,
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": _usage(usage_prompt, choices),
    }


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


async def _drive(
    choices: list[Choice], events: asyncio.Queue, request: Request | None = None
) -> AsyncIterator[tuple[Choice, str]]:
    """Apply engine events to the choices; yield (choice, new text) as text becomes final
    (with the finish reason set on a choice's last yield). Ends when every choice finished,
    or (non-streaming, `request` given) when the client disconnects."""
    remaining = len(choices)
    while remaining:
        try:
            index, kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                return
            continue
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
            chunk = {
                **head,
                "choices": [
                    {
                        "text": delta,
                        "index": c.index,
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                ],
            }
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
