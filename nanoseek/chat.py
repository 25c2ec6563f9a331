"""DeepSeek chat encoding (V3 and V3.1/V3.2), fill-in-the-middle prompts, reasoning split and SFT loss masks.

The model only ever sees one string; this file turns OpenAI-style `messages` into it, exactly as DeepSeek's
models were trained to read it (shared reference, "Tokenizer and chat encoding"):

  style "v3"   {bos}{system}<｜User｜>{u}<｜Assistant｜>{a}<｜end▁of▁sentence｜>...   (tool calls with the
               <｜tool▁calls▁begin｜>... special tokens, tool results in <｜tool▁outputs▁begin｜>...)
  style "v3.2" {bos}{system}<｜User｜>{u}<｜Assistant｜></think>{a}<｜end▁of▁sentence｜>...  non-thinking, and
               the last user turn ends <｜Assistant｜><think> in thinking mode, where the answer after it is
               {reasoning}</think>{content}<｜end▁of▁sentence｜>; earlier assistant turns drop their reasoning;
               tool calls in DeepSeek V3.2's DSML markup, tool results in <function_results>.

`chat_template(style)` is the same encoding as a Jinja template (for tokenizer_config.json, so that
transformers' `apply_chat_template` renders byte-identical text); tests/test_chat.py holds them equal. Its
`{% generation %}` blocks enclose exactly what `render_segments` marks as the assistant's, so transformers'
`return_assistant_tokens_mask=True` (TRL's `assistant_only_loss`) gives `chat_loss_mask`'s mask (tests/test_sft.py).

Decisions beyond DeepSeek's own encoders, shared by both renderings:
  - every system message is hoisted right after BOS, joined by a blank line (V3/V3.1 templates);
  - the cue that opens the assistant's reply (`<｜Assistant｜></think>` etc.) after the last message is only
    written when `add_generation_prompt` is true, so a finished conversation renders for training as is;
  - chat prefix completion: a last message {"role": "assistant", "content": ..., "prefix": true} is continued,
    not closed (no end-of-sentence); in thinking mode its `reasoning_content` is continued, and a non-empty
    `content` closes the reasoning first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
# V3 tool-call special tokens (also present in the V3.1/V3.2 vocabularies)
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
DSML = "｜DSML｜"  # V3.2 writes tool calls as plain-text markup with this tag, not as special tokens

ROLES = ("system", "user", "assistant", "tool")
STYLES = ("v3", "v3.2")

# V3.2's tool prompt, appended to the system prompt when `tools` are given (format text the model was
# trained on, so it is kept word for word).
_TOOLS_PROMPT = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

<think>...thinking about results</think>

Here are the functions available in JSONSchema format:
<functions>
"""


@dataclass
class _Msg:
    role: str
    content: str
    reasoning: str
    tool_calls: list  # [(name, arguments as dict or JSON str)]
    prefix: bool


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # what transformers' `tojson` filter writes


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # OpenAI content parts: only text parts make sense here
        out = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}.content[{j}]: only {{'type': 'text', 'text': str}} parts are supported")
            out.append(part["text"])
        return "".join(out)
    raise ValueError(f"{where}.content must be a string, a list of text parts or null, got {type(content).__name__}")


def _tool_calls(raw: Any, where: str) -> list:
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where}.tool_calls must be a list")
    calls = []
    for j, tc in enumerate(raw):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}.tool_calls[{j}] must be {{'type': 'function', 'function': {{'name': str, "
                             f"'arguments': JSON object string or dict}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                parsed = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.tool_calls[{j}].function.arguments is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{where}.tool_calls[{j}].function.arguments must encode a JSON object")
        elif not isinstance(args, dict):
            raise ValueError(f"{where}.tool_calls[{j}].function.arguments must be a JSON string or a dict")
        calls.append((fn["name"], args))
    return calls


def _normalize(messages: Any, style: str, thinking: bool, tools: Any) -> tuple[str, list[_Msg], list]:
    """Validate and return (system prompt, non-system messages, tool schemas)."""
    if style not in STYLES:
        raise ValueError(f"unknown chat style {style!r}; expected one of {STYLES}")
    if thinking and style == "v3":
        raise ValueError("style 'v3' has no thinking mode; use style 'v3.2'")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    tools = list(tools or [])
    for j, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ValueError(f"tools[{j}] must be an object")
    if tools and style == "v3":
        raise ValueError("style 'v3' has no tool-schema prompt; describe the tools in the system prompt")
    systems, rest = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        if role != "assistant" and m.get("content") is None:
            raise ValueError(f"{where}: a {role} message needs 'content'")
        content = _text(m.get("content"), where)
        if role == "system":
            systems.append(content)
            continue
        reasoning = m.get("reasoning_content")
        if reasoning is None:
            reasoning = m.get("reasoning")  # vLLM's name for the same field
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"{where}.reasoning_content must be a string")
        calls = _tool_calls(m.get("tool_calls"), where) if role == "assistant" else []
        prefix = bool(m.get("prefix", False))
        if prefix:
            if role != "assistant" or i != len(messages) - 1:
                raise ValueError(f"{where}: 'prefix' is only allowed on the last message, an assistant one")
            if calls:
                raise ValueError(f"{where}: a prefix (continued) assistant message cannot carry tool_calls")
        rest.append(_Msg(role, content, reasoning or "", calls, prefix))
    if not rest:
        raise ValueError("messages hold only system prompts; add a user message")
    # every tool result must answer a call of the assistant message right before its group
    pending = 0
    for i, m in enumerate(rest):
        if m.role == "tool":
            if pending == 0:
                raise ValueError("a tool message must follow an assistant message with tool_calls, one per call")
            pending -= 1
        else:
            if pending:
                raise ValueError(f"an assistant message made tool calls but {pending} of their results are missing")
            pending = len(m.tool_calls)
    return "\n\n".join(systems), rest, tools


def _dsml_calls(calls: list) -> str:
    invokes = []
    for name, args in calls:
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else _to_json(v)}</{DSML}parameter>' for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>')
    return f"\n\n<{DSML}function_calls>\n" + "\n".join(invokes) + f"\n</{DSML}function_calls>"


def _v3_calls(calls: list) -> str:
    parts = [f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n"
             f"{args if isinstance(args, str) else _to_json(args)}\n```{TOOL_CALL_END}" for name, args in calls]
    return TOOL_CALLS_BEGIN + "\n".join(parts) + TOOL_CALLS_END


def render_segments(messages: list[dict], add_generation_prompt: bool = True, thinking: bool = False,
                    style: str = "v3.2", tools: Optional[list] = None) -> list[tuple[str, bool]]:
    """The encoded conversation as alternating (text, written_by_assistant) pieces; "".join of them is the prompt.

    written_by_assistant marks what the model itself produced (reasoning, answer, tool calls and the closing
    end-of-sentence): the tokens a supervised chat loss trains on.
    """
    return _merged([(t, kind != "prompt") for t, kind in _pieces(messages, add_generation_prompt, thinking, style,
                                                                tools)])


def _merged(pieces: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Adjacent pieces of the same kind joined into one; empty ones dropped. Each run is joined once: adding piece
    by piece re-copied the run each time (100k one-word user messages took two minutes to render)."""
    runs: list[tuple[list[str], Any]] = []
    for t, a in pieces:
        if runs and runs[-1][1] == a:
            runs[-1][0].append(t)
        elif t:
            runs.append(([t], a))
    return [("".join(ts), a) for ts, a in runs]


def _pieces(messages: list[dict], add_generation_prompt: bool, thinking: bool, style: str,
            tools: Optional[list]) -> list[tuple[str, str]]:
    """The encoded conversation as (text, kind) pieces, kind "prompt", "reasoning" (the assistant's thinking) or
    "answer" (the rest of what the assistant wrote, from the </think> that closes its reasoning on)."""
    system, rest, tools = _normalize(messages, style, thinking, tools)
    head = BOS + system
    if tools:
        head += "\n\n" + _TOOLS_PROMPT.format(dsml=DSML) + "\n".join(
            _to_json(t["function"] if "function" in t else t) for t in tools) + "\n</functions>\n"
    segs: list[tuple[str, str]] = [(head, "prompt")]
    last_user = max((i for i, m in enumerate(rest) if m.role == "user"), default=-1)
    n = len(rest)
    if style == "v3.2":
        calls_made, order = 0, 0
        for i, m in enumerate(rest):
            cue = i < n - 1 or add_generation_prompt  # open the assistant's reply after this message?
            open_tag = THINK if thinking and i >= last_user else END_THINK
            if m.role == "user":
                segs.append((USER + m.content + (ASSISTANT + open_tag if cue else ""), "prompt"))
            elif m.role == "tool":
                order += 1
                text = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{m.content}</result>"
                if order == calls_made:
                    text += "\n</function_results>" + ("\n\n" + open_tag if cue else "")
                segs.append((text, "prompt"))
            else:
                calls_made, order = len(m.tool_calls), 0
                keep_reasoning = thinking and i > last_user  # earlier turns drop their reasoning
                if keep_reasoning:
                    segs.append((m.reasoning, "reasoning"))
                if m.prefix:
                    text = (END_THINK + m.content if m.content else "") if keep_reasoning else m.content
                    segs.append((text, "answer"))
                else:
                    text = (END_THINK if keep_reasoning else "") + m.content
                    segs.append((text + (_dsml_calls(m.tool_calls) if m.tool_calls else "") + EOS, "answer"))
    else:
        in_tools = False  # inside a <｜tool▁outputs▁begin｜> group
        for m in rest:
            if m.role == "tool":
                segs.append(((TOOL_OUTPUTS_BEGIN if not in_tools else "") + TOOL_OUTPUT_BEGIN + m.content
                             + TOOL_OUTPUT_END, "prompt"))
                in_tools = True
                continue
            if m.role == "user":
                segs.append(((TOOL_OUTPUTS_END if in_tools else "") + USER + m.content, "prompt"))
            else:  # after tool outputs the reply continues without a new <｜Assistant｜> (V3 template)
                segs.append((TOOL_OUTPUTS_END if in_tools else ASSISTANT, "prompt"))
                closing = "" if m.prefix else (_v3_calls(m.tool_calls) if m.tool_calls else "") + EOS
                segs.append((m.content + closing, "answer"))
            in_tools = False
        if in_tools:
            segs.append((TOOL_OUTPUTS_END, "prompt"))
        elif add_generation_prompt and rest[-1].role == "user":
            segs.append((ASSISTANT, "prompt"))
    return segs


def encode_messages(messages: list[dict], add_generation_prompt: bool = True, thinking: bool = False,
                    style: str = "v3.2", tools: Optional[list] = None) -> str:
    """Render OpenAI-style messages as DeepSeek chat text (special tokens as strings, BOS first)."""
    return "".join(t for t, _ in render_segments(messages, add_generation_prompt, thinking, style, tools))


def chat_loss_mask(messages: list[dict], tokenizer, thinking: bool = False, style: str = "v3.2",
                   tools: Optional[list] = None, train_reasoning: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a finished conversation and a 0/1 mask that is 1 on the assistant's own tokens (without its
    reasoning when not train_reasoning: the answer is then learnt given the reasoning, from </think> on).

    Pieces are tokenised one by one; each prompt/reasoning/answer boundary falls on an added token
    (<｜Assistant｜>, </think>, <think>, end-of-sentence, <｜tool▁outputs▁end｜>), which tokenisation never merges
    across, so the ids equal those of the whole text.
    """
    trained = ("reasoning", "answer") if train_reasoning else ("answer",)
    ids, mask = [], []
    for text, kind in _merged(_pieces(messages, False, thinking, style, tools)):
        piece = tokenizer.encode(text)
        ids += piece
        mask += [int(kind in trained)] * len(piece)
    return ids, mask


def fim_prompt(prefix: str, suffix: str) -> str:
    """Fill-in-the-middle prompt (prefix-suffix-middle order); the model writes the middle, then EOS.

    No BOS here: encode it with `add_bos=True`, as for any completion prompt.
    """
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError("fim_prompt needs prefix and suffix strings")
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"


def split_reasoning(text: str, thinking: bool = True) -> tuple[str, str]:
    """Split a finished completion into (reasoning, content).

    With `thinking` (the prompt ended with <think>), text before the first </think> is reasoning; if </think>
    never came, all of it is reasoning. Without it, the completion is all content.
    """
    parser = ReasoningParser(thinking)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    return r1 + r2, c1 + c2


class ReasoningParser:
    """Streaming split of generated text into reasoning and content deltas.

    Text that could be the start of a `</think>` split across deltas is held back until the next delta (or
    `flush()`) settles it, so the tag never leaks into either stream. A stray `<think>` at the very start of
    the reasoning (models sometimes repeat the prompt's tag) is dropped.
    """

    def __init__(self, thinking: bool = True):
        self.in_reasoning = thinking
        self._held = ""
        self._at_start = thinking

    def feed(self, delta: str) -> tuple[str, str]:
        if not isinstance(delta, str):
            raise ValueError("ReasoningParser.feed takes text")
        if not self.in_reasoning:
            return "", delta
        buf = self._held + delta
        if self._at_start:
            if THINK.startswith(buf) and len(buf) < len(THINK):
                self._held = buf  # might still become a leading <think>
                return "", ""
            if buf.startswith(THINK):
                buf = buf[len(THINK):]
            self._at_start = False
        end = buf.find(END_THINK)
        if end >= 0:
            self.in_reasoning, self._held = False, ""
            return buf[:end], buf[end + len(END_THINK):]
        keep = 0  # longest tail of buf that is a proper prefix of </think>
        for k in range(min(len(END_THINK) - 1, len(buf)), 0, -1):
            if END_THINK.startswith(buf[-k:]):
                keep = k
                break
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], ""

    def flush(self) -> tuple[str, str]:
        """End of generation: whatever was held back is reasoning (the </think> never completed)."""
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", held)


# ----------------------------------------------------------------------------------------------------------
# The same encoding as Jinja, for tokenizer_config.json. transformers renders it with trim_blocks and
# lstrip_blocks; every tag here strips whitespace itself and every literal is a Jinja string, so layout
# newlines never reach the output. Limitation: DSML tool calls need `arguments` as a mapping (transformers'
# convention); the Python encoder also accepts the JSON string the OpenAI API sends.

_JINJA_COMMON = r"""
{%- macro text(c) -%}
  {%- if c is none -%}{%- elif c is string -%}{{ c }}
  {%- else -%}{%- for p in c -%}{{ p['text'] }}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system='', first=true, last_user=-1, calls=0, order=0, in_tools=false) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}
    {%- if not ns.first -%}{%- set ns.system = ns.system + '\n\n' -%}{%- endif -%}
    {%- set ns.system = ns.system + text(m['content']) -%}
    {%- set ns.first = false -%}
  {%- endif -%}
{%- endfor -%}
{%- set rest = messages | rejectattr('role', 'equalto', 'system') | list -%}
{%- for m in rest -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- set agp = add_generation_prompt is defined and add_generation_prompt -%}
{{- bos_token + ns.system -}}
"""

_JINJA_V32 = _JINJA_COMMON + r"""
{%- set think = thinking is defined and thinking -%}
{%- if tools is defined and tools -%}
  {{- '\n\n' + tools_prompt -}}
  {%- for t in tools -%}
    {{- (t['function'] if t['function'] is defined else t) | tojson -}}{{- '\n' if not loop.last else '' -}}
  {%- endfor -%}
  {{- '\n</functions>\n' -}}
{%- endif -%}
{%- for m in rest -%}
  {%- set i = loop.index0 -%}
  {%- set cue = (not loop.last) or agp -%}
  {%- set open_tag = '<think>' if think and i >= ns.last_user else '</think>' -%}
  {%- if m['role'] == 'user' -%}
    {{- '<｜User｜>' + text(m['content']) -}}{%- if cue -%}{{- '<｜Assistant｜>' + open_tag -}}{%- endif -%}
  {%- elif m['role'] == 'tool' -%}
    {%- set ns.order = ns.order + 1 -%}
    {%- if ns.order == 1 -%}{{- '\n\n<function_results>' -}}{%- endif -%}
    {{- '\n<result>' + text(m['content']) + '</result>' -}}
    {%- if ns.order == ns.calls -%}
      {{- '\n</function_results>' -}}{%- if cue -%}{{- '\n\n' + open_tag -}}{%- endif -%}
    {%- endif -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- set calls = m['tool_calls'] if m['tool_calls'] is defined and m['tool_calls'] else [] -%}
    {%- set ns.calls = calls | length -%}{%- set ns.order = 0 -%}
    {%- if m['reasoning_content'] is defined and m['reasoning_content'] is not none -%}
      {%- set r = m['reasoning_content'] -%}
    {%- elif m['reasoning'] is defined and m['reasoning'] is not none -%}{%- set r = m['reasoning'] -%}
    {%- else -%}{%- set r = '' -%}{%- endif -%}
    {%- set keep = think and i > ns.last_user -%}
    {%- set c = text(m['content']) -%}
    {%- generation -%}
    {%- if m['prefix'] is defined and m['prefix'] -%}
      {%- if keep -%}{{- r -}}{%- if c -%}{{- '</think>' + c -}}{%- endif -%}{%- else -%}{{- c -}}{%- endif -%}
    {%- else -%}
      {%- if keep -%}{{- r + '</think>' -}}{%- endif -%}
      {{- c -}}
      {%- if calls -%}
        {{- '\n\n<｜DSML｜function_calls>\n' -}}
        {%- for tc in calls -%}
          {%- if tc['function']['arguments'] is string -%}
            {{- raise_exception('tool call arguments must be a mapping in this template') -}}
          {%- endif -%}
          {{- '<｜DSML｜invoke name="' + tc['function']['name'] + '">\n' -}}
          {%- for k, v in tc['function']['arguments'].items() -%}
            {{- '<｜DSML｜parameter name="' + k + '" string="' + ('true' if v is string else 'false') + '">' -}}
            {{- v if v is string else v | tojson -}}{{- '</｜DSML｜parameter>' -}}
            {{- '\n' if not loop.last else '' -}}
          {%- endfor -%}
          {{- '\n</｜DSML｜invoke>' -}}{{- '\n' if not loop.last else '' -}}
        {%- endfor -%}
        {{- '\n</｜DSML｜function_calls>' -}}
      {%- endif -%}
      {{- '<｜end▁of▁sentence｜>' -}}
    {%- endif -%}
    {%- endgeneration -%}
  {%- else -%}
    {{- raise_exception('unknown role ' + m['role']) -}}
  {%- endif -%}
{%- endfor -%}
"""

_JINJA_V3 = _JINJA_COMMON + r"""
{%- for m in rest -%}
  {%- if m['role'] == 'tool' -%}
    {%- if not ns.in_tools -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- endif -%}
    {{- '<｜tool▁output▁begin｜>' + text(m['content']) + '<｜tool▁output▁end｜>' -}}
    {%- set ns.in_tools = true -%}
  {%- else -%}
    {%- if m['role'] == 'user' -%}
      {{- ('<｜tool▁outputs▁end｜>' if ns.in_tools else '') + '<｜User｜>' + text(m['content']) -}}
    {%- elif m['role'] == 'assistant' -%}
      {{- '<｜tool▁outputs▁end｜>' if ns.in_tools else '<｜Assistant｜>' -}}
      {%- generation -%}
      {{- text(m['content']) -}}
      {%- if not (m['prefix'] is defined and m['prefix']) -%}
        {%- if m['tool_calls'] is defined and m['tool_calls'] -%}
          {{- '<｜tool▁calls▁begin｜>' -}}
          {%- for tc in m['tool_calls'] -%}
            {%- set a = tc['function']['arguments'] -%}
            {{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + tc['function']['name'] + '\n```json\n' -}}
            {{- a if a is string else a | tojson -}}{{- '\n```<｜tool▁call▁end｜>' -}}
            {{- '\n' if not loop.last else '' -}}
          {%- endfor -%}
          {{- '<｜tool▁calls▁end｜>' -}}
        {%- endif -%}
        {{- '<｜end▁of▁sentence｜>' -}}
      {%- endif -%}
      {%- endgeneration -%}
    {%- else -%}
      {{- raise_exception('unknown role ' + m['role']) -}}
    {%- endif -%}
    {%- set ns.in_tools = false -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_tools -%}{{- '<｜tool▁outputs▁end｜>' -}}
{%- elif agp and rest and rest[-1]['role'] == 'user' -%}{{- '<｜Assistant｜>' -}}{%- endif -%}
"""


def chat_template(style: str = "v3.2") -> str:
    """The Jinja chat template (for tokenizer_config.json) that renders exactly what encode_messages does.

    Thinking mode is the `thinking` template variable: `apply_chat_template(msgs, thinking=True)`.
    """
    if style == "v3.2":
        tools_prompt = _TOOLS_PROMPT.format(dsml=DSML)
        # the tool prompt is long fixed text: bind it as a Jinja variable rather than inline it in a tag
        return "{%- set tools_prompt = " + _to_json(tools_prompt) + " -%}" + _JINJA_V32.strip()
    if style == "v3":
        return _JINJA_V3.strip()
    raise ValueError(f"unknown chat style {style!r}; expected one of {STYLES}")
