"""Grammar-constrained decoding (structured output, forced tool calls) with llguidance, as a TokenConstraint.

A `Grammar` says what the answer must be: `json_object()` (any JSON object, OpenAI's JSON mode),
`json_schema(schema, strict)` (OpenAI's `response_format` json_schema) or `tool_calls(tools, choice)` (one or
more DeepSeek V3.2 DSML tool calls, byte for byte as nanoseek/chat.py renders them). `GrammarCompiler` (one per
served tokenizer, `compiler_for`) compiles it once per request into an llguidance matcher and hands the engine a
factory of per-sequence constraints (`SamplingParams.constraint`): before each token the matcher writes the
allowed-token bitmask on the CPU (1 bit a token), unpacked here to the bool mask the sampler applies.

Decisions:
  - the reasoning stays free: while a thinking response has not yet emitted </think> (the token), any token but
    EOS may come (EOS would end the answer before it starts); the grammar applies from the token after it. A
    prompt that already closed its reasoning is constrained from the first token (`reasoning_open`).
  - once the grammar is complete only EOS is allowed (llguidance's mask), so the request ends with "stop".
  - JSON is written as json.dumps writes it (", " and ": ", no other whitespace): what chat.py renders, and a
    sampler cannot wander into endless whitespace.
  - `strict=False` compiles the schema leniently (keywords llguidance does not implement are ignored); strict
    schemas with such keywords are refused.
  - the one output that may not parse: a response cut by max_tokens (finish_reason "length").
  - if the engine emits a token outside the mask (min_tokens banning the EOS the grammar requires), the matcher
    enters its error state and the sequence continues unconstrained.
  - tool calls: parameters in the order of the schema's `properties`, the required ones always present, the others
    optional. A parameter whose schema is `"type": "string"` (or a string enum/const) is raw text with
    string="true" and may not contain "</" (the parser ends a value at its closing tag); its enum / const /
    minLength / maxLength are enforced, pattern and format are not. Any other parameter is string="false" and JSON
    valid for its sub-schema (with the tool schema's $defs). Only V3.2's DSML format is implemented.
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from nanoseek import chat

# json.dumps' separators, fixed: see the module docstring
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The grammar (a schema, a tool list) cannot be compiled; the message says why."""


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its serialized form) and a name for messages."""
    text: str
    kind: str  # "json_object", "json_schema", "tool_calls"


def json_object() -> Grammar:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    return json_schema({"type": "object"}, strict=True, kind="json_object")


def json_schema(schema: Any, strict: Optional[bool] = True, kind: str = "json_schema") -> Grammar:
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    options = {**_JSON_OPTIONS, "lenient": not strict}
    try:
        return Grammar(LLMatcher.grammar_from_json_schema(schema, overrides=options), kind)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a Lark string literal (JSON's escapes are Lark's)


def _is_raw_string(sub: dict) -> bool:
    """What chat.py writes with string="true": a value that is always a str."""
    if sub.get("type") == "string":
        return True
    values = sub.get("enum", [sub["const"]] if "const" in sub else None)
    return "type" not in sub and bool(values) and all(isinstance(v, str) for v in values)


def _raw_string_terminal(sub: dict, close: str) -> str:
    values = sub.get("enum", [sub["const"]] if "const" in sub else None)
    if values is not None:
        if not all(isinstance(v, str) and "</" not in v for v in values):
            raise GrammarError("a string parameter's enum values must be strings without '</'")
        return "(" + " | ".join(_lit(v) for v in values) + ") " + _lit(close)
    lo, hi = sub.get("minLength", 0), sub.get("maxLength")
    if not (isinstance(lo, int) and lo >= 0 and (hi is None or (isinstance(hi, int) and hi >= lo))):
        raise GrammarError("minLength/maxLength must be integers with 0 <= minLength <= maxLength")
    count = f"{{{lo},{'' if hi is None else hi}}}"
    # value and closing tag are one lexeme: the value ends exactly where "</" starts the close
    return f"(/(?s:.{count})/ & ~/(?s:.*)<\\/(?s:.*)/) {_lit(close)}"


def tool_calls(tools: Sequence[dict], choice: str = "required", parallel: bool = True,
               style: str = "v3.2") -> Grammar:
    """One tool call, or one or more when `parallel`, in DeepSeek V3.2's DSML markup (chat._dsml_calls's
    bytes, with empty content before the block). choice: "required" (any of the tools) or a tool's name."""
    if style != "v3.2":
        raise GrammarError(f"forced tool calls are implemented for chat style 'v3.2' only, not {style!r}")
    fns = []
    for j, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarError(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}")
        fns.append(fn)
    if choice != "required":
        fns = [fn for fn in fns if fn["name"] == choice]
        if not fns:
            raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools")
    if not fns:
        raise GrammarError("tool calls were required but no tools were given")
    D = chat.DSML
    close = f"</{D}parameter>"
    rules, terminals, invokes = [], [], []
    for i, fn in enumerate(fns):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        props = params.get("properties", {}) if isinstance(params, dict) else None
        if not isinstance(props, dict) or not isinstance(params.get("required", []), list):
            raise GrammarError(f"tool {fn['name']!r}: parameters must be a JSON schema object with 'properties' "
                               f"(and 'required' a list)")
        required = set(params.get("required", []))
        if not required <= set(props):
            raise GrammarError(f"tool {fn['name']!r}: required parameters {sorted(required - set(props))} "
                               f"are not in its properties")
        defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
        body = []
        for j, (name, sub) in enumerate(props.items()):
            if not isinstance(sub, dict):
                raise GrammarError(f"tool {fn['name']!r}: the schema of parameter {name!r} must be an object")
            if _is_raw_string(sub):
                term = f"V_{i}_{j}"
                terminals.append(f"{term}: {_raw_string_terminal(sub, close)}")
                value = term
                flag = "true"
            else:
                value = "%json " + json.dumps({**defs, **sub, "x-guidance": _JSON_OPTIONS}) + " " + _lit(close)
                flag = "false"
            head = '<' + D + 'parameter name="' + name + '" string="' + flag + '">'
            rules.append(f"p_{i}_{j}: {_lit(head)} {value}")
            body.append((f'"\\n" p_{i}_{j}', name in required))
        # chat.py writes header "\n" + "\n".join(parameters) + "\n" footer: each parameter present is preceded
        # by "\n" and one more ends the list, so no parameter at all leaves an empty line
        if required or not body:
            seqs = [" ".join(item if req else f"({item})?" for item, req in body) or '"\\n"']
        else:  # all optional: the first present one opens the list, or none is and the line stays empty
            seqs = [" ".join([body[k][0]] + [f"({item})?" for item, _ in body[k + 1:]]) for k in range(len(body))]
            seqs.append('"\\n"')
        head, footer = '<' + D + 'invoke name="' + fn["name"] + '">', "</" + D + "invoke>"
        rules.append(f"inv_{i}: {_lit(head)} ({' | '.join(seqs)}) \"\\n\" {_lit(footer)}")
        invokes.append(f"inv_{i}")
    # every "\n" that may be followed by different tags is a lexeme of its own: llguidance's lexer is greedy, and a
    # literal "\n</...>" would claim a "\n<" that starts the next parameter or call
    more = ' ("\\n" invoke)*' if parallel else ""
    opening, closing = "\n\n<" + D + "function_calls>\n", "</" + D + "function_calls>"
    lark = "\n".join([f"start: {_lit(opening)} invoke{more} \"\\n\" {_lit(closing)}",
                      "invoke: " + " | ".join(invokes), *rules, *terminals])
    return Grammar(LLMatcher.grammar_from_lark(lark), "tool_calls")


class GrammarConstraint:
    """One sequence's state: free reasoning until </think>, then the matcher's mask (a TokenConstraint)."""

    def __init__(self, matcher: LLMatcher, compiler: "GrammarCompiler", reasoning: bool):
        self.matcher = matcher
        self.compiler = compiler
        self.reasoning = reasoning
        self._bits = np.zeros((compiler.vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> Optional[torch.Tensor]:
        if self.reasoning:
            return self.compiler.reasoning_mask
        if self.matcher.is_error():
            return None
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        # bit t of the little-endian words is token t: one unpack of the bytes in little bit order
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.compiler.vocab_size]
        return torch.from_numpy(bits).view(torch.bool)

    def accept(self, token: int) -> None:
        if self.reasoning:
            self.reasoning = token != self.compiler.end_think_id
        elif not self.matcher.is_error():
            self.matcher.consume_token(token)


class GrammarCompiler:
    """llguidance's view of one tokenizer (built once per served model: ~1 s for a large vocabulary) and the
    grammar compilation against it."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.think_id = tokenizer.token_to_id(chat.THINK)
        self.end_think_id = tokenizer.token_to_id(chat.END_THINK)
        self.ll = LLTokenizer(tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_id)
        self.reasoning_mask = torch.ones(self.vocab_size, dtype=torch.bool)
        self.reasoning_mask[self.eos_id] = False

    def compile(self, grammar: Grammar) -> LLMatcher:
        """A fresh matcher at the grammar's start; GrammarError with llguidance's message if it does not compile."""
        m = LLMatcher(self.ll, grammar.text, log_level=0)
        if m.is_error():
            raise GrammarError(f"{grammar.kind}: {m.get_error()}")
        return m

    def reasoning_open(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the prompt leaves the model inside its reasoning (a <think> after the last </think>)."""
        for t in reversed(prompt_ids):
            if t == self.end_think_id:
                return False
            if t == self.think_id:
                return True
        return False

    def constraint(self, grammar: Grammar, prompt_ids: Sequence[int]) -> Callable[[], GrammarConstraint]:
        """The SamplingParams.constraint factory for a request: the grammar compiled once here, each sequence
        (n choices) a copy of the compiled matcher."""
        template = self.compile(grammar)
        reasoning = self.reasoning_open(prompt_ids)
        return lambda: GrammarConstraint(template.deep_copy(), self, reasoning)


_COMPILERS: "weakref.WeakKeyDictionary[Any, GrammarCompiler]" = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()  # the server compiles requests' grammars in worker threads


def compiler_for(tokenizer) -> GrammarCompiler:
    """The GrammarCompiler of a tokenizer object, built on first use and kept as long as the tokenizer lives."""
    with _COMPILERS_LOCK:
        c = _COMPILERS.get(tokenizer)
        if c is None:
            c = _COMPILERS[tokenizer] = GrammarCompiler(tokenizer)
        return c
