"""POST /v1/responses: the OpenAI Responses API, as a translation over /v1/chat/completions (one engine path).

A request becomes a chat request: `instructions` a system message, `input` (a string, or items: messages with
input_text/output_text parts, `reasoning`, `function_call` and `function_call_output` items) the messages,
flat function tools {"type": "function", "name", "parameters"} chat tools, `max_output_tokens`
max_completion_tokens, `reasoning.effort` the thinking switch ("none": off, any other effort: on; absent: the
model name decides, as on the chat route), `text.format` the chat `response_format`. The chat answer comes back
as output items: a `reasoning` item (its text in `content` as reasoning_text parts), a `message` with one
output_text part, and one `function_call` item per tool call; streamed, the chat chunks become the Responses
events (response.created, response.in_progress, response.output_item.added/done, response.content_part.added/
done, response.output_text.delta/done, response.reasoning_text.delta/done, response.function_call_arguments.
delta/done, then response.completed, or response.incomplete when max_output_tokens cut it).

Decisions:
- Non-stateful: nothing is stored, so `store: true` and `previous_response_id` are a 400 (the client resends
  the conversation as input items instead). `store` absent or false is the same thing and accepted.
- Body shapes live here rather than in protocol.py: they are this route's alone, and the translation reads them.
- The usage reports input/output/total tokens only; the chat path counts nothing finer (no cached or reasoning
  split), so those details are left out rather than reported as zero.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import Request
from pydantic import Field, ValidationError

from nanoseek.server import protocol as P
from nanoseek.server.api import APIError, _SSEResponse
from nanoseek.server.offloop import add_body_schemas, body_schema, json_response, parse_body


# ---- request ----------------------------------------------------------------------------------------------------
class FunctionTool(P._Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class NamedFunction(P._Body):
    type: Literal["function"]
    name: str


class TextFormat(P._Body):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class TextConfig(P._Body):
    format: Optional[TextFormat] = None


class Reasoning(P._Body):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[str] = None


class ResponsesRequest(P._Body):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedFunction]] = None
    parallel_tool_calls: bool = True
    text: Optional[TextConfig] = None
    reasoning: Optional[Reasoning] = None
    store: Optional[bool] = None
    previous_response_id: Optional[str] = None
    # accepted and ignored (see protocol.IGNORED_FIELDS; what OpenAI's Agents SDK sends): bookkeeping and hints,
    # `include` (extra output data such as encrypted reasoning, which this server does not produce) and
    # `truncation` (a prompt longer than the context is a 400 either way, never cut)
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    include: Optional[list[str]] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None


# ---- request -> chat request --------------------------------------------------------------------------------
def _bad(msg: str, param: str) -> APIError:
    return APIError(400, msg, param=param)


def _parts_text(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of {'/'.join(kinds)} parts", where)
    out = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") in kinds and isinstance(part.get("text"), str)):
            raise _bad(f"{where}.content[{j}]: only {'/'.join(kinds)} parts with a 'text' string are supported",
                       f"{where}.content")
        out.append(part["text"])
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[dict]:
    msgs: list[dict] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return msgs + [{"role": "user", "content": req.input}]
    if not req.input:
        raise _bad("input must not be empty", "input")
    reasoning: Optional[str] = None  # a reasoning item waits for the assistant output it led to
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be user, system, developer or assistant, got {role!r}", where)
            text = _parts_text(item.get("content"), where, ("input_text", "output_text", "text"))
            msg: dict[str, Any] = {"role": role, "content": text}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            msgs.append(msg)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = (reasoning or "") + _parts_text(parts, where, ("reasoning_text", "summary_text"))
        elif kind == "function_call":
            fields = [item.get(k) for k in ("call_id", "name", "arguments")]
            if not all(isinstance(v, str) and v for v in fields[:2]) or not isinstance(fields[2], str):
                raise _bad(f"{where}: a function_call item needs call_id, name and arguments strings", where)
            call = {"id": fields[0], "type": "function", "function": {"name": fields[1], "arguments": fields[2]}}
            last = msgs[-1] if msgs else None
            if last is None or last["role"] != "assistant" or reasoning is not None:  # a new assistant turn
                last = {"role": "assistant", "content": None}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                msgs.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad(f"{where}: a function_call_output item needs a call_id string", where)
            msgs.append({"role": "tool", "tool_call_id": call_id,
                         "content": _parts_text(output, where, ("input_text", "output_text", "text"))})
        else:
            raise _bad(f"{where}: input items of type {kind!r} are not supported (message, reasoning, "
                       f"function_call, function_call_output)", where)
    if reasoning is not None:
        raise _bad("a reasoning item must be followed by the assistant output it led to", "input")
    return msgs


def to_chat(req: ResponsesRequest) -> P.ChatCompletionRequest:
    if req.store:
        raise _bad("store=true is not supported: this server keeps no responses; resend the conversation as "
                   "input items", "store")
    if req.previous_response_id is not None:
        raise _bad("previous_response_id is not supported: this server keeps no responses; resend the "
                   "conversation as input items", "previous_response_id")
    body: dict[str, Any] = {"messages": _messages(req), "temperature": req.temperature, "top_p": req.top_p,
                            "stream": req.stream, "parallel_tool_calls": req.parallel_tool_calls}
    if req.model is not None:
        body["model"] = req.model
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.user is not None:
        body["user"] = req.user
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in req.tools]
    if req.tool_choice is not None:
        c = req.tool_choice
        body["tool_choice"] = c if isinstance(c, str) else {"type": "function", "function": {"name": c.name}}
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["thinking"] = {"type": "disabled" if req.reasoning.effort == "none" else "enabled"}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and (fmt.name is None or fmt.schema_ is None):
            raise _bad('text.format {"type": "json_schema"} needs "name" and "schema"', "text.format")
        body["response_format"] = {"type": "json_object"} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": fmt.model_dump(exclude_none=True, exclude={"type"},
                                                                 by_alias=True)}
    try:
        return P.ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        raise _bad(f"input: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}", "input") from None


# ---- chat answer -> response --------------------------------------------------------------------------------
def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _reasoning_item(iid: str, text: str, status: str) -> dict:
    return {"id": iid, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(iid: str, text: Optional[str], status: str) -> dict:
    return {"id": iid, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text)]}


def _call_item(iid: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": iid, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _response(rid: str, created: int, model: str, req: ResponsesRequest, status: str, output: list,
              usage: Optional[dict]) -> dict:
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    choice = req.tool_choice
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": None, "reasoning": req.reasoning.model_dump() if req.reasoning else None,
        "store": False, "temperature": req.temperature, "top_p": req.top_p,
        "text": {"format": fmt.model_dump(exclude_none=True, by_alias=True) if fmt else {"type": "text"}},
        "tool_choice": "auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump(),
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "usage": usage,
    }


def _usage(u: dict) -> dict:
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"]}


def _from_chat(req: ResponsesRequest, rid: str, created: int, chat: dict) -> dict:
    choice = chat["choices"][0]
    m = choice["message"]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    output = []
    if m.get("reasoning_content"):
        output.append(_reasoning_item(_item_id("rs"), m["reasoning_content"], status))
    if m.get("content"):
        output.append(_message_item(_item_id("msg"), m["content"], status))
    for tc in m.get("tool_calls") or []:
        output.append(_call_item(_item_id("fc"), tc["id"], tc["function"]["name"], tc["function"]["arguments"],
                                 status))
    return _response(rid, created, chat["model"], req, status, output, _usage(chat["usage"]))


class _Events:
    """Chat completion chunks in, Responses API events out (SSE text)."""

    def __init__(self, req: ResponsesRequest, rid: str, created: int, model: str):
        self.req, self.rid, self.created, self.model = req, rid, created, model
        self.seq = 0
        self.output: list[dict] = []
        self.current: Optional[dict] = None  # the open reasoning or message item
        self.calls: dict[int, dict] = {}  # chat tool-call index -> its function_call item

    def event(self, type_: str, **fields) -> str:
        data = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def response(self, status: str, usage: Optional[dict] = None) -> dict:
        return _response(self.rid, self.created, self.model, self.req, status, self.output, usage)

    def _add(self, item: dict) -> list[str]:
        out = self.close()
        self.output.append(item)
        out.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        return out

    def reasoning(self, text: str) -> list[str]:
        out = []
        if self.current is None or self.current["type"] != "reasoning":
            out += self._add(_reasoning_item(_item_id("rs"), "", "in_progress"))
            self.current = self.output[-1]
            self.current["content"] = [{"type": "reasoning_text", "text": ""}]
        self.current["content"][0]["text"] += text
        out.append(self.event("response.reasoning_text.delta", item_id=self.current["id"],
                              output_index=len(self.output) - 1, content_index=0, delta=text))
        return out

    def text(self, text: str) -> list[str]:
        out = []
        if self.current is None or self.current["type"] != "message":
            out += self._add(_message_item(_item_id("msg"), None, "in_progress"))
            self.current = self.output[-1]
            self.current["content"] = [_text_part("")]
            out.append(self.event("response.content_part.added", item_id=self.current["id"],
                                  output_index=len(self.output) - 1, content_index=0, part=_text_part("")))
        self.current["content"][0]["text"] += text
        out.append(self.event("response.output_text.delta", item_id=self.current["id"],
                              output_index=len(self.output) - 1, content_index=0, delta=text, logprobs=[]))
        return out

    def tool_call(self, tc: dict) -> list[str]:
        out = []
        fn = tc.get("function") or {}
        if tc.get("id"):  # the first delta of a call: a new function_call item
            out += self._add(_call_item(_item_id("fc"), tc["id"], fn.get("name", ""), "", "in_progress"))
            self.calls[tc["index"]] = self.output[-1]
        item = self.calls[tc["index"]]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=self.output.index(item), delta=fn["arguments"]))
        return out

    def close(self, status: str = "completed") -> list[str]:
        """Every item still open is done (the current text item and the function calls)."""
        out = []
        for i, item in enumerate(self.output):
            if item["status"] != "in_progress":
                continue
            item["status"] = status
            if item["type"] == "reasoning":
                out.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=i,
                                      content_index=0, text=item["content"][0]["text"]))
            elif item["type"] == "message":
                part = item["content"][0]
                out.append(self.event("response.output_text.done", item_id=item["id"], output_index=i,
                                      content_index=0, text=part["text"], logprobs=[]))
                out.append(self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                      content_index=0, part=part))
            else:
                out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=i, name=item["name"], arguments=item["arguments"]))
            out.append(self.event("response.output_item.done", output_index=i, item=item))
        self.current = None
        return out


async def _stream(req: ResponsesRequest, rid: str, created: int, model: str, chunks):
    ev = _Events(req, rid, created, model)
    yield ev.event("response.created", response=ev.response("in_progress"))
    yield ev.event("response.in_progress", response=ev.response("in_progress"))
    finish, usage = None, None
    try:
        async for sse in chunks:
            payload = sse[len("data: "):].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:  # an engine failure mid-stream, reported in-band by the chat stream
                err = chunk["error"]
                yield ev.event("error", code=err.get("code") or err.get("type"), message=err["message"],
                               param=err.get("param"))
                return
            if chunk.get("usage"):
                usage = _usage(chunk["usage"])
            for ch in chunk["choices"]:
                d = ch["delta"]
                for s in (ev.reasoning(d["reasoning_content"]) if d.get("reasoning_content") else []):
                    yield s
                for s in (ev.text(d["content"]) if d.get("content") else []):
                    yield s
                for tc in d.get("tool_calls") or []:
                    for s in ev.tool_call(tc):
                        yield s
                finish = ch.get("finish_reason") or finish
    finally:
        await chunks.aclose()
    status = "incomplete" if finish == "length" else "completed"
    for s in ev.close(status):
        yield s
    yield ev.event(f"response.{status}", response=ev.response(status, usage))


def add_routes(app, chat_completions, protected: list, errors: dict) -> None:
    """Register POST /v1/responses over the app's chat completions handler (which takes a parsed request). The
    body is read like every other route's (`offloop.parse_body`: size-limited, validated off the event loop)."""
    add_body_schemas(app, [ResponsesRequest])

    @app.post("/v1/responses", dependencies=protected, responses=errors, operation_id="responses",
              openapi_extra=body_schema(ResponsesRequest))
    async def responses(request: Request):
        req = await parse_body(request, ResponsesRequest, sliced=None)
        chat_req = await asyncio.to_thread(to_chat, req)
        rid, created = _item_id("resp"), int(time.time())
        result = await chat_completions(chat_req, request)
        if not req.stream:  # the chat answer is a JSON Response built off the loop; so is this one
            return await json_response(lambda: json.dumps(_from_chat(req, rid, created, json.loads(result.body))))
        model = chat_req.model or request.app.state.nanoseek.name
        return _SSEResponse(_stream(req, rid, created, model, result.body_iterator), result._fan)
