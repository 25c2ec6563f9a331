"""Incremental parser of DeepSeek tool calls in generated text: V3.2's DSML markup and V3's special tokens.

The inverse of what nanoseek/chat.py renders for an assistant turn with tool calls:

  V3.2  <｜DSML｜function_calls>
        <｜DSML｜invoke name="NAME">
        <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
        </｜DSML｜invoke>
        </｜DSML｜function_calls>
        string="true": VALUE is raw text (a JSON string); string="false": VALUE is JSON (number, bool, list, ...)
  V3    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
        ...<｜tool▁calls▁end｜>   (V3.1 writes <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>: read too)

`ToolCallParser.feed(delta)` takes text deltas as the model writes them and returns events: `Content` (text
outside the markup), `CallStart` (index, name), `CallArgs` (index, a fragment of the call's JSON `arguments`),
`CallEnd`. The argument fragments come as the value is generated, not when the call closes: a DSML string value
is JSON-escaped character by character, so the fragments of a call concatenate to exactly its final
`arguments`. Only text that may be the start of a tag is held back until the next delta settles it.

Decisions:
- The events depend only on the text, never on how it was cut into deltas (the fuzz test holds streamed and
  one-shot parses equal).
- A string="false" value is held until its closing tag and checked: valid JSON is sent (re-serialised compactly),
  anything else is sent as a JSON string (what the model most likely meant), so `arguments` always parse.
  These values are scalars or small objects in practice, so holding them costs little streaming.
- Malformed markup (unexpected text between tags, a bad header, V3 arguments that are not a JSON object, a block
  still open at the end) makes the parser give up: the raw text of the block and everything after it become
  `Content`, `malformed` is set, and no more calls are parsed. Events sent before the fault stay sent (a stream
  cannot take them back); the server's non-streamed answer returns the whole text instead (api.py).
- Whitespace before a block (the "\\n\\n" the format puts there) and right after it is layout, not content.
- A DSML call is announced (`CallStart`) with its first parameter's header or its close, not with the bare
  invoke tag, so that the most common fault (stray text after the invoke tag) sends no call at all.
- `max_calls` (parallel_tool_calls=false: 1): invokes past it are parsed but produce no events.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from nanoseek.chat import DSML, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

DSML_OPEN = f"<{DSML}function_calls>"
DSML_CLOSE = f"</{DSML}function_calls>"
INVOKE_OPEN = f'<{DSML}invoke name="'
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f'<{DSML}parameter name="'
PARAM_CLOSE = f"</{DSML}parameter>"
V3_HEADER = re.compile(rf"function{re.escape(TOOL_SEP)}([^\n]+)\n```json\n", re.S)
MAX_HEADER = 256  # characters of a name or an attribute before the markup counts as malformed


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    name: str


@dataclass
class CallArgs:
    index: int
    text: str


@dataclass
class CallEnd:
    index: int


Event = Union[Content, CallStart, CallArgs, CallEnd]


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object


@dataclass
class Parsed:
    """What a whole text parses to (the events folded)."""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    malformed: bool = False


class _Need(Exception):
    """The buffer ends before the current piece of markup can be decided: wait for more text."""


class _Bad(Exception):
    """The markup is malformed."""


def _escape(text: str) -> str:
    """Text as the inside of a JSON string (per character, so escaping pieces = escaping the whole)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_value(raw: str) -> str:
    """A string="false" value as JSON text: itself if valid JSON (compact), else the raw text as a JSON string."""
    try:
        return json.dumps(json.loads(raw, parse_constant=_reject_constant), ensure_ascii=False)
    except ValueError:
        return json.dumps(raw, ensure_ascii=False)


def _partial_tail(buf: str, literals: tuple[str, ...]) -> int:
    """Length of the longest tail of buf that is a proper prefix of one of the literals."""
    for k in range(min(len(buf), max(len(x) for x in literals) - 1), 0, -1):
        tail = buf[-k:]
        if any(len(x) > k and x.startswith(tail) for x in literals):
            return k
    return 0


class ToolCallParser:
    def __init__(self, max_calls: Optional[int] = None):
        self.max_calls = max_calls
        self.malformed = False
        self.num_calls = 0  # invokes seen (muted ones included)
        self._buf = ""  # text not consumed yet
        self._raw = ""  # the current block's text consumed so far (returned as content if it turns out malformed)
        self._state = "text"
        self._after_block = False  # skipping layout whitespace after a block
        self._events: list[Event] = []
        self._param_string = False
        self._first_param = True
        self._invoke_name: Optional[str] = None  # a DSML invoke read but not yet announced
        self._value = ""  # a string="false" value being collected / V3 arguments sent so far
        self._muted = False

    # ---- public ---------------------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        self._run(final=False)
        return self._take()

    def flush(self) -> list[Event]:
        """End of the text: held-back text is settled; a block still open is malformed."""
        self._run(final=True)
        if self._state == "plain" or self._state == "text":
            if self._buf and not self._after_block:
                self._emit(Content(self._buf))
            self._buf = ""
        else:
            self._fail()
        return self._take()

    # ---- machinery ------------------------------------------------------------------------------------------
    def _take(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _emit(self, ev: Event) -> None:
        if isinstance(ev, Content):
            if not ev.text:
                return
            if self._events and isinstance(self._events[-1], Content):
                self._events[-1] = Content(self._events[-1].text + ev.text)
                return
        elif self._muted:
            return
        elif isinstance(ev, CallArgs):
            if not ev.text:
                return
            if self._events and isinstance(self._events[-1], CallArgs) and self._events[-1].index == ev.index:
                self._events[-1] = CallArgs(ev.index, self._events[-1].text + ev.text)
                return
        self._events.append(ev)

    def _consume(self, n: int) -> str:
        s, self._buf = self._buf[:n], self._buf[n:]
        self._raw += s
        return s

    def _fail(self) -> None:
        self.malformed = True
        self._muted = False
        self._emit(Content(self._raw + self._buf))
        self._raw = self._buf = ""
        self._state = "plain"

    def _run(self, final: bool) -> None:
        while True:
            before = (self._state, len(self._buf))
            try:
                getattr(self, "_s_" + self._state)()
            except _Need:
                return
            except _Bad:
                self._fail()
            if (self._state, len(self._buf)) == before:
                return

    def _skip_ws(self) -> None:
        n = len(self._buf) - len(self._buf.lstrip())
        self._consume(n)

    def _expect(self, *literals: str) -> str:
        """Consume one of the literals at the start of the buffer (after whitespace) and return it."""
        self._skip_ws()
        for lit in literals:
            if self._buf.startswith(lit):
                self._consume(len(lit))
                return lit
        if any(lit.startswith(self._buf) for lit in literals):
            raise _Need
        raise _Bad

    def _until(self, delim: str) -> str:
        """Consume text up to and including delim (within MAX_HEADER characters) and return the text before it."""
        p = self._buf.find(delim, 0, MAX_HEADER + len(delim))
        if p < 0:
            if len(self._buf) >= MAX_HEADER + len(delim):
                raise _Bad
            raise _Need
        s = self._consume(p)
        self._consume(len(delim))
        return s

    # ---- states ---------------------------------------------------------------------------------------------
    def _s_plain(self) -> None:
        self._emit(Content(self._buf))
        self._buf = ""

    def _s_text(self) -> None:
        if self._after_block:
            stripped = self._buf.lstrip()
            self._buf = stripped
            if not stripped:
                return
            self._after_block = False
        hits = [(p, lit) for lit in (DSML_OPEN, TOOL_CALLS_BEGIN) if (p := self._buf.find(lit)) >= 0]
        if hits:
            p, lit = min(hits)
            self._emit(Content(self._buf[:p].rstrip()))
            self._buf, self._raw = self._buf[p + len(lit):], lit
            self._state = "dsml" if lit == DSML_OPEN else "v3"
            return
        hold = _partial_tail(self._buf, (DSML_OPEN, TOOL_CALLS_BEGIN))
        ready = self._buf[:len(self._buf) - hold]
        text = ready.rstrip()  # trailing whitespace waits: it is layout if a block follows
        self._emit(Content(text))
        self._buf = self._buf[len(text):]

    def _end_block(self) -> None:
        self._state, self._raw, self._after_block = "text", "", True

    def _start_call(self, name: str) -> None:
        if not name or "\n" in name:
            raise _Bad
        self._muted = self.max_calls is not None and self.num_calls >= self.max_calls
        self._emit(CallStart(self.num_calls, name))
        self.num_calls += 1

    def _end_call(self) -> None:
        self._emit(CallEnd(self.num_calls - 1))
        self._muted = False

    # V3.2 DSML
    def _s_dsml(self) -> None:
        if self._expect(INVOKE_OPEN, DSML_CLOSE) == DSML_CLOSE:
            self._end_block()
            return
        self._state = "invoke_name"

    def _s_invoke_name(self) -> None:
        name = self._until('">')
        if not name or "\n" in name:
            raise _Bad
        self._invoke_name = name  # announced with its first parameter (or its close), once the invoke is sound
        self._first_param = True
        self._state = "invoke"

    def _announce(self) -> None:
        if self._invoke_name is not None:
            self._start_call(self._invoke_name)
            self._emit(CallArgs(self.num_calls - 1, "{"))
            self._invoke_name = None

    def _s_invoke(self) -> None:
        if self._expect(PARAM_OPEN, INVOKE_CLOSE) == INVOKE_CLOSE:
            self._announce()
            self._emit(CallArgs(self.num_calls - 1, "}"))
            self._end_call()
            self._state = "dsml"
            return
        self._state = "param_name"

    def _s_param_name(self) -> None:
        p = self._buf.find('">', 0, MAX_HEADER + 2)
        if p < 0:
            if len(self._buf) >= MAX_HEADER + 2:
                raise _Bad
            raise _Need
        m = re.fullmatch(r'([^"\n]+)" string="(true|false)', self._buf[:p])
        if m is None:
            raise _Bad
        self._consume(p + 2)
        self._announce()
        self._param_string = m.group(2) == "true"
        lead = "" if self._first_param else ", "
        self._first_param = False
        self._emit(CallArgs(self.num_calls - 1, lead + json.dumps(m.group(1), ensure_ascii=False) + ": "
                            + ('"' if self._param_string else "")))
        self._value = ""
        self._state = "value"

    def _s_value(self) -> None:
        i = self.num_calls - 1
        p = self._buf.find(PARAM_CLOSE)
        if p >= 0:
            value = self._consume(p)
            self._consume(len(PARAM_CLOSE))
            if self._param_string:
                self._emit(CallArgs(i, _escape(value) + '"'))
            else:
                self._emit(CallArgs(i, _json_value((self._value + value).strip())))
            self._state = "invoke"
            return
        hold = _partial_tail(self._buf, (PARAM_CLOSE,))
        chunk = self._consume(len(self._buf) - hold)
        if self._param_string:
            self._emit(CallArgs(i, _escape(chunk)))
        else:
            self._value += chunk
        raise _Need

    # V3 special tokens
    def _s_v3(self) -> None:
        if self._expect(TOOL_CALL_BEGIN, TOOL_CALLS_END) == TOOL_CALLS_END:
            self._end_block()
            return
        self._state = "v3_header"

    def _s_v3_header(self) -> None:
        p = self._buf.find(TOOL_SEP, 0, MAX_HEADER)
        if p < 0:
            if len(self._buf) >= MAX_HEADER:
                raise _Bad
            raise _Need
        if self._buf[:p] != "function":  # V3.1: NAME<｜tool▁sep｜>ARGS, no type and no fence
            name = self._buf[:p]
            self._consume(p + len(TOOL_SEP))
        else:
            f = self._buf.find("```json\n", 0, MAX_HEADER)
            if f < 0:
                if len(self._buf) >= MAX_HEADER:
                    raise _Bad
                raise _Need
            m = V3_HEADER.fullmatch(self._buf[:f + len("```json\n")])
            if m is None:
                raise _Bad
            self._consume(m.end())
            name = m.group(1)
        self._start_call(name.strip())
        self._value = ""  # the arguments text sent so far
        self._state = "v3_args"

    def _s_v3_args(self) -> None:
        i = self.num_calls - 1
        p = self._buf.find(TOOL_CALL_END)
        if p >= 0:
            args = (self._value + self._buf[:p]).rstrip(" \t\r\n`")  # the closing fence is layout
            # sent before the check, as a stream cut anywhere before the end tag would have sent it
            self._emit(CallArgs(i, args[len(self._value):]))
            self._value = args
            try:
                ok = isinstance(json.loads(args, parse_constant=_reject_constant), dict)
            except ValueError:
                ok = False
            if not ok:
                raise _Bad
            self._consume(p + len(TOOL_CALL_END))
            self._end_call()
            self._state = "v3"
            return
        # hold back a possible partial end tag and trailing fence/whitespace (which may be layout)
        hold = _partial_tail(self._buf, (TOOL_CALL_END,))
        ready = self._buf[:len(self._buf) - hold]
        keep = len(ready) - len(ready.rstrip(" \t\r\n`"))
        n = len(ready) - keep
        chunk = self._buf[:n]
        self._consume(n)
        self._value += chunk
        self._emit(CallArgs(i, chunk))
        raise _Need


def fold(events: list[Event], into: Optional[Parsed] = None) -> Parsed:
    """The events of a text folded into its content and calls."""
    out = into or Parsed()
    for ev in events:
        if isinstance(ev, Content):
            out.content += ev.text
        elif isinstance(ev, CallStart):
            out.calls.append(ParsedCall(ev.name, ""))
        elif isinstance(ev, CallArgs):
            out.calls[ev.index].arguments += ev.text
    return out


def parse(text: str, max_calls: Optional[int] = None) -> Parsed:
    """The whole text at once."""
    p = ToolCallParser(max_calls)
    out = fold(p.feed(text) + p.flush())
    out.malformed = p.malformed
    return out
