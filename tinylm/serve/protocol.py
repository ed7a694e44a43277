"""The OpenAI-compatible wire format: the completion request, its validation, and error bodies.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status
for anything the client can fix. Fields the server does not implement (logprobs, penalties,
best_of, logit_bias, suffix) are accepted at their neutral values and refused otherwise, so a
client never silently gets something other than it asked for.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tinylm.config import MAX_NEW_TOKENS

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_N = 16  # completions per prompt: each is a row of the batch


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """`POST /v1/completions`. `top_k` is an extension (0 or absent = off)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    # Bounded like `generate --max-new-tokens`: past the context a completion slides, so the
    # context no longer bounds how long one request decodes.
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    # torch generators take seeds below 2^64; `n` choices use seed, seed + 1, ...
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    # Not implemented: allowed only at their neutral values.
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        neutral = {
            "logprobs": self.logprobs is None,
            "best_of": self.best_of in (None, 1, self.n),
            "presence_penalty": self.presence_penalty == 0,
            "frequency_penalty": self.frequency_penalty == 0,
            "logit_bias": not self.logit_bias,
            "suffix": not self.suffix,
        }
        bad = [name for name, ok in neutral.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]} is not supported by this server; leave it unset")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list: give a string or a list of token ids")
        return self


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the offending field) from pydantic's error list."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc)
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"'{where}' is a required property", param
    if where:
        return f"invalid value for '{where}': {msg}", param
    return msg, param
