"""The OpenAI request bodies the server takes (pydantic models: a bad field is named in the 400 answer),
with rdlm's extras, and the error body OpenAI clients read."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16  # stop strings per request


class Extras(BaseModel):
    """Recurrent-depth settings beyond OpenAI's, per request (defaults: the server's flags)."""
    model_config = ConfigDict(extra="forbid")
    num_steps: int | None = Field(None, ge=1, description="recurrences per token (the cap, with an exit criterion)")
    exit_criterion: str | None = Field(None, description="an official exit criterion, or 'none'")
    exit_threshold: float | None = Field(None, gt=0, allow_inf_nan=False)
    cache_strategy: str | None = Field(None, description="must be the server's --cache-strategy")
    continuous: bool | None = None
    init_scale: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False, description="seconds; at most the server's")
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)


class Common(Extras):
    """Fields both endpoints share."""
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: 0 only")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: 0 only")
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported")
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int = Field(1, ge=1, le=1, description="one candidate per prompt")
    suffix: None = Field(None, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        if isinstance(v, list) and any(isinstance(x, list) and not x for x in v):
            raise ValueError("a token-id prompt is empty")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def field_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the request field, `("body", "messages", 0, "content")` -> `messages[0].content`."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "int", "float") or "[" in str(part):
            continue  # which member of a union failed: not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def finite(x: float | None) -> float | None:
    """A logprob as JSON can carry it (-inf becomes a very low finite number, as OpenAI's API does)."""
    return None if x is None else (x if math.isfinite(x) else -9999.0)
