"""Tool calling on /v1/chat/completions: the request's `tools` / `tool_choice` / `parallel_tool_calls` checked,
and the model's tool-call markup (parsed by nanoseek/tool_calls.py) turned into OpenAI `tool_calls`, whole or as
streamed `delta.tool_calls` (index, id, type and name first, then `arguments` fragments as they are generated).

Decisions:
- tool_choice "none" still renders the tools into the prompt, as OpenAI and vLLM (its default since 0.10) do: the
  model knows what exists and can talk about it, and the prompt keeps the prefix that the other turns of the
  conversation share. Its output is not parsed for calls: a call it writes anyway is plain text.
- tool_choice "required" or a named function is enforced by grammar-constrained decoding (the constraint set
  where api.py builds the chat request's SamplingParams); the parsing here is the same for every choice.
- parallel_tool_calls=false keeps the first call of the model's output; later ones are dropped.
- A malformed call (see tool_calls.py) ends as text with the engine's finish reason ("stop"), never an error;
  a non-streamed answer then returns the whole generated text as content.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Optional, Union

from nanoseek.tool_calls import CallArgs, CallStart, Content, Parsed, ToolCallParser, fold


class ToolRequestError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    functions: list[dict[str, Any]]  # what the prompt describes: {name, description, parameters}
    choice: Union[str, dict]  # "auto" | "none" | "required" | {"name": ...}
    parallel: bool

    @property
    def parse(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> Optional[str]:
        """None when the model may answer without a call; "required", or the function name it must call."""
        if isinstance(self.choice, dict):
            return self.choice["name"]
        return "required" if self.choice == "required" else None


def tool_plan(req) -> Optional[ToolPlan]:
    """The tool part of a ChatCompletionRequest, checked; None without tools."""
    if not req.tools:
        if req.tool_choice is not None:
            raise ToolRequestError("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    names = [t.function.name for t in req.tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ToolRequestError(f"tools: the function name {dup!r} is given twice", "tools")
    choice: Union[str, dict] = "auto" if req.tool_choice is None else req.tool_choice
    if not isinstance(choice, str):
        name = choice.function.name
        if name not in names:
            raise ToolRequestError(f"tool_choice names the function {name!r}, which is not among the tools "
                                   f"({', '.join(names)})", "tool_choice")
        choice = {"name": name}
    functions = [t.function.model_dump(exclude_none=True, exclude={"strict"}) for t in req.tools]
    return ToolPlan(functions, choice, req.parallel_tool_calls)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolStream:
    """One choice's content stream parsed for tool calls: OpenAI deltas as it goes, the message at the end."""

    def __init__(self, plan: ToolPlan):
        self.parser = ToolCallParser(max_calls=None if plan.parallel else 1)
        self.parsed = Parsed()
        self.ids: list[str] = []
        self._raw: list[str] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """A content delta -> (content outside the markup, `delta.tool_calls` entries)."""
        self._raw.append(text)
        events = self.parser.feed(text) + (self.parser.flush() if final else [])
        fold(events, self.parsed)
        self.parsed.malformed = self.parser.malformed
        content, deltas = [], []
        for ev in events:
            if isinstance(ev, Content):
                content.append(ev.text)
            elif isinstance(ev, CallStart):
                self.ids.append(new_call_id())
                deltas.append({"index": ev.index, "id": self.ids[ev.index], "type": "function",
                               "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, CallArgs):
                if deltas and deltas[-1]["index"] == ev.index:
                    deltas[-1]["function"]["arguments"] += ev.text
                else:
                    deltas.append({"index": ev.index, "function": {"arguments": ev.text}})
        return "".join(content), deltas

    def finish_reason(self, engine_reason: str) -> str:
        if self.parsed.calls and not self.parsed.malformed and engine_reason == "stop":
            return "tool_calls"
        return engine_reason

    def message(self) -> dict:
        """content and tool_calls of the non-streamed answer."""
        if self.parsed.malformed or not self.parsed.calls:
            return {"content": "".join(self._raw) if self.parsed.malformed else self.parsed.content,
                    "tool_calls": None}
        return {"content": self.parsed.content or None,
                "tool_calls": [{"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for i, c in zip(self.ids, self.parsed.calls)]}
