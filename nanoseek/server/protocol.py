"""Request and response bodies of the OpenAI-compatible API (pydantic models).

The shapes follow the de-facto API that OpenAI clients, vLLM, SGLang and DeepSeek's own API agree on
(see shared/reference/serving-api.md): /v1/chat/completions, /v1/completions (legacy, with echo and integer
logprobs for lm-evaluation-harness), /v1/models, /tokenize, /detokenize, errors as {"error": {...}}.
Widely supported sampling extras (top_k, min_p, repetition_penalty, stop_token_ids, min_tokens, ignore_eos) are
accepted, and `response_format` (structured output, enforced by nanoseek/engine/grammar.py). A field the server
does not implement is a 400 that names it (OpenAI's "Unrecognized request argument supplied"), never silently
dropped: a client that sends `functions` or `best_of` must learn that they were not honoured. The exception is
IGNORED_FIELDS below, declared on the bodies and documented in the README. Bounds are enforced here so that bad
values become a 400 before anything reaches the engine.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16  # choices per prompt: each is a separate sequence in the engine
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16


# Accepted and ignored, because ignoring them changes no output: end-user ids and tags for the caller's own
# bookkeeping (user, metadata, safety_identifier), OpenAI's storage / routing / prompt-cache hints (store,
# service_tier, prompt_cache_key: this server keeps nothing and caches prefixes by itself).
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
# In messages: output-only fields a client sends back when it appends the previous response message as is.
IGNORED_MESSAGE_FIELDS = ("refusal", "annotations", "audio", "function_call")


class _Body(BaseModel):
    # strict: JSON types as the OpenAI API declares them ("stream": "yes", "max_tokens": "5" or true, a prompt of
    # booleans are 400s, not coerced); ints still pass where a float is declared. extra="forbid": see above.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# ---- requests -------------------------------------------------------------------------------------------------
class StreamOptions(_Body):
    include_usage: bool = False


class Thinking(_Body):
    """DeepSeek's switch: {"type": "enabled"} makes the prompt end with <think> and returns reasoning_content."""
    type: Literal["enabled", "disabled"] = "enabled"


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    # earlier assistant reasoning: DeepSeek / SGLang call it reasoning_content, vLLM reasoning; both accepted
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    # DeepSeek chat prefix completion: a last assistant message with prefix=true is continued, not answered
    prefix: bool = False
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    # IGNORED_MESSAGE_FIELDS
    refusal: Optional[str] = None
    annotations: Optional[list[Any]] = None
    audio: Optional[dict[str, Any]] = None
    function_call: Optional[dict[str, Any]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JSONSchemaFormat(_Body):
    """OpenAI's {"name", "description", "schema", "strict"}; the schema is compiled by llguidance (grammar.py)."""
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema")  # `schema` would shadow a BaseModel attribute
    strict: Optional[bool] = None  # false/null: keywords the grammar engine lacks are ignored, not refused


class ResponseFormat(_Body):
    """Structured output: "text" (free), "json_object" (any JSON object), "json_schema" (that schema), each
    enforced by grammar-constrained decoding; a thinking response's reasoning stays free."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a "json_schema": {"name": ..., "schema": {...}} object')
        return self


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    # OpenAI's rule for names (plus "."), which also keeps them safe inside the markup's name="..." attribute
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ToolChoiceFunction


class SamplingRequest(_Body):
    """Fields shared by chat and text completions."""
    model: Optional[str] = None  # None: the served model
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # token id (as a JSON object key) -> added to that token's logit; -100 bans it, 100 all but forces it
    logit_bias: Optional[dict[str, float]] = None
    # IGNORED_FIELDS
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    # extras of vLLM / SGLang / llama.cpp
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)  # tiny values would overflow the logits
    stop_token_ids: Optional[list[int]] = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    response_format: Optional[ResponseFormat] = None  # vLLM also takes it on /v1/completions

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would end every request at once


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    thinking: Optional[Thinking] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's way: {"thinking": true}
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: Optional[str] = None  # fill-in-the-middle
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: Optional[int] = Field(16, ge=0)  # the legacy API's default


class TokenizeRequest(_Body):
    """vLLM's /tokenize: either a prompt or chat messages (rendered with the chat encoding)."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]


# ---- responses ------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    """The legacy format: one entry per token; the first prompt token (echo) has no logprob."""
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    vocab_size: int
    bos_token: Optional[str]
    eos_token: Optional[str]
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token: Optional[str]
    chat_template: Optional[str]
    model_max_length: int
