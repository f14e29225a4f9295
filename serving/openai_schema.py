"""The request and response shapes of the OpenAI-compatible API, with the service's limits.

Close enough to OpenAI's that the official ``openai`` client works unchanged: unknown fields
are accepted and ignored (clients send ``user``, ``n``, ``logprobs`` …), ``n`` other than 1 and
tools are refused with a 400 that says so. Errors use OpenAI's body:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# The bounds on what one request may ask for are declared with their REFINERY_* variables in
# refinery.core.settings (the service passes ServingSettings.limits).
from refinery.core.settings import RequestLimits as Limits

# Control characters other than tab and newlines carry no meaning in a prompt, and Postgres
# refuses NUL in text; a lone UTF-16 surrogate (JSON allows "\ud800") cannot be encoded at all.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """A client's text as every part of the service can take it: control characters (but tab
    and newlines) dropped, a lone surrogate replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", _CONTROL.sub("", text))


Text = Annotated[str, AfterValidator(clean_text)]


class ApiError(Exception):
    """An error the client caused (4xx) or should retry (503); becomes OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    # OpenAI also allows a list of content parts: text, and image_url parts with data: URLs,
    # which serving.images replaces by the text read from the image before this is read.
    content: Text | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400,
                    "only text and image_url content parts are supported",
                    param="messages",
                    code="unsupported_content",
                )
            parts.append(clean_text(part["text"]))
        return "\n".join(parts)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return {"temperature": 0.0, "top_p": 1.0}[info.field_name] if value is None else value

    def token_limit(self, limits: Limits, default: int = 128) -> int:
        wanted = self.max_completion_tokens or self.max_tokens or min(default, limits.max_tokens)
        if wanted > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {wanted}; this service allows at most {limits.max_tokens}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return wanted

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 100 for s in stops):
            raise ApiError(
                400,
                "stop: at most 4 sequences of 1 to 100 characters",
                param="stop",
                code="invalid_value",
            )
        return stops

    def engine_item(self, limits: Limits) -> dict[str, Any]:
        """What the generation engine is asked: checked against the limits (400 otherwise)."""
        item: dict[str, Any] = {
            "messages": self.plain_messages(limits),
            "max_tokens": self.token_limit(limits),
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.stop is not None:
            item["stop"] = self.stop_strings()
        if self.seed is not None:
            item["seed"] = self.seed
        return item

    def plain_messages(self, limits: Limits) -> list[dict[str, str]]:
        if self.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_n")
        if self.tools:
            raise ApiError(400, "tools are not supported", param="tools", code="unsupported")
        if len(self.messages) > limits.max_messages:
            raise ApiError(
                400,
                f"{len(self.messages)} messages; at most {limits.max_messages} are allowed",
                param="messages",
                code="too_many_messages",
            )
        out = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
        size = sum(len(m["content"]) for m in out)
        if size > limits.max_prompt_chars:
            raise ApiError(
                400,
                f"the prompt has {size} characters; at most {limits.max_prompt_chars} are allowed",
                param="messages",
                code="prompt_too_long",
            )
        if not any(m["content"].strip() for m in out):
            raise ApiError(400, "every message is empty", param="messages", code="empty_prompt")
        return out


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Text | list[Text] = Field(description="a text or a list of texts")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _null_is_float(cls, value: Any) -> Any:
        return "float" if value is None else value

    def texts(self, limits: Limits) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise ApiError(400, "input is an empty list", param="input", code="empty_input")
        if len(texts) > limits.max_embedding_inputs:
            raise ApiError(
                400,
                f"{len(texts)} inputs; at most {limits.max_embedding_inputs} per request",
                param="input",
                code="too_many_inputs",
            )
        for i, text in enumerate(texts):
            if len(text) > limits.max_prompt_chars:
                raise ApiError(
                    400,
                    f"input[{i}] has {len(text)} characters; at most {limits.max_prompt_chars}",
                    param="input",
                    code="input_too_long",
                )
        return texts


def chat_response(
    model: str,
    text: str,
    finish: str,
    prompt_tokens: int,
    completion_tokens: int,
    answer_id: str | None = None,
):
    """OpenAI's chat completion body; its id is ``chatcmpl-<answer_id>`` (the id the traffic
    log and ``refinery explain`` know the answer by)."""
    return {
        "id": f"chatcmpl-{answer_id or uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_chunk(
    chunk_id: str,
    model: str,
    delta: dict[str, str],
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def embedding_response(model: str, vectors: list[list[float]], prompt_tokens: int):
    return {
        "object": "list",
        "model": model,
        "data": [
            {"object": "embedding", "index": i, "embedding": vec} for i, vec in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
