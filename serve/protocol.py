"""The OpenAI API's request bodies (pydantic, so FastAPI publishes them in its OpenAPI schema)
and its error body.

Types are strict: a string where a number belongs is a 400, not a silent cast. Unknown fields
are ignored, as most OpenAI-compatible servers do (clients send newer parameters); parameters
gptcpu knows but cannot honour (tools, suffix, best_of > n, ...) are a 400 that says so.
`top_k` and `repetition_penalty` are extensions (the openai client sends them in `extra_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

INT64 = dict(ge=-(2**63), le=2**63 - 1)


class OpenAIError(Exception):
    """An error as OpenAI reports it: status, message, type, param, code."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_exceeded", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: Optional[bool] = False


class _Sampling(_Request):
    model: str
    max_tokens: Optional[int] = Field(None, **INT64)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, le=2**31)
    n: Optional[int] = Field(None, ge=1, le=128)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=16)]]] = None
    seed: Optional[int] = Field(None, **INT64)
    user: Optional[str] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1, le=128)
    suffix: Optional[str] = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[int] = Field(None, **INT64)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


def unsupported(req: _Sampling) -> None:
    """Parameters that gptcpu accepts in the schema but cannot honour: a 400 naming them."""
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise OpenAIError(400, "suffix (insertion) is not supported by GPT-2/GPT-J models", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise OpenAIError(400, "best_of other than n is not supported", "best_of")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise OpenAIError(400, "tools (function calling) are not supported", "tools")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise OpenAIError(400, f"response_format {fmt!r} is not supported (only 'text')", "response_format")
