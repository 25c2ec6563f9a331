"""Tool calling on /v1/chat/completions against a live server on 127.0.0.1, driven by the official `openai` client.

A tiny random model never writes tool calls by itself, so each test forces the model's text: the server's
SamplingParams get a TokenConstraint that allows only the tokens of a given string, then EOS. The engine really
generates those tokens and the server parses the engine's output (nothing canned reaches the parser).
"""
from __future__ import annotations

import contextlib
import json

import httpx
import openai
import pytest
import torch
from test_server import build_tokenizer

import nanoseek
from nanoseek.chat import DSML, _dsml_calls, encode_messages
from nanoseek.server.api import ServeConfig, ServerThread

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools") / "tools-tiny"
    tok = build_tokenizer(out)
    # the V3.2 tool prompt alone is ~1k tokens of this small vocabulary: room for it and a conversation
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                              eos_token_id=tok.eos_id, max_position_embeddings=4096)
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.Transformer(cfg), out)
    with ServerThread(ServeConfig(str(out), dtype="float32", max_model_len=4096)) as s:
        yield s.wait_ready()


def client(s) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=120)


class _Force:
    """A TokenConstraint that allows exactly the given tokens, one per step, then only EOS."""

    def __init__(self, ids: list[int], eos: int, vocab: int):
        self.ids, self.eos, self.vocab, self.i = ids, eos, vocab, 0

    def allowed(self):
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.ids[self.i] if self.i < len(self.ids) else self.eos] = True
        return mask

    def accept(self, token: int) -> None:
        self.i += 1


@contextlib.contextmanager
def forcing(s, *texts: str):
    """The next chat requests' choices write these texts (one per choice, in order), then stop."""
    tok, state = s.state.tokenizer, s.state
    queue = list(texts)
    original = state.sampling

    def sampling(*args, **kw):
        params = original(*args, **kw)
        ids = tok.encode(queue.pop(0))
        params.constraint = lambda: _Force(ids, tok.eos_id, state.model_cfg.vocab_size)
        return params

    state.sampling = sampling
    try:
        yield
    finally:
        state.sampling = original
    assert not queue, "not every forced text was used"


def calls_text(*calls) -> str:
    return _dsml_calls(list(calls))  # the markup exactly as the chat encoding renders an assistant's calls


def stream(c, **kw):
    """Streamed chat completion folded: (reasoning, content, {index: [id, name, [argument fragments]]}, finish,
    the order in which the fields first appeared)."""
    reasoning, content, calls, finish = [], [], {}, None
    for ch in c.chat.completions.create(stream=True, **kw):
        d = ch.choices[0].delta
        reasoning.append(getattr(d, "reasoning_content", None) or "")
        content.append(d.content or "")
        for tc in d.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call carries its id, type and name
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.id, tc.function.name, []]
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index][2].append(tc.function.arguments or "")
        finish = ch.choices[0].finish_reason or finish
    return "".join(reasoning), "".join(content), calls, finish


def n_prompt(s, msgs, **kw) -> int:
    return len(s.state.tokenizer.encode(encode_messages(msgs, **kw)))


# ---- round trips ---------------------------------------------------------------------------------------------
def test_tool_call_round_trip(srv):
    c = client(srv)
    with forcing(srv, "Let me check." + calls_text(("get_weather", {"city": "Paris", "days": 3}))):
        r = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    (tc,) = ch.message.tool_calls
    assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"city": "Paris", "days": 3}  # days typed: a number
    assert r.usage.prompt_tokens == n_prompt(srv, USER, tools=[t["function"] for t in TOOLS])

    # the call and its result go back; the prompt is the chat encoding of exactly that conversation
    msgs = USER + [{"role": "assistant", "content": ch.message.content,
                    "tool_calls": [tc.model_dump()]},
                   {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "clear", "temp": 21}'}]
    with forcing(srv, "Clear sky, 21 degrees."):
        r2 = c.chat.completions.create(model="tools-tiny", messages=msgs, tools=TOOLS, max_tokens=50)
    assert r2.choices[0].message.content == "Clear sky, 21 degrees." and r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.tool_calls is None
    rendered = encode_messages(msgs, tools=[t["function"] for t in TOOLS])
    assert '<result>{"sky": "clear", "temp": 21}</result>' in rendered
    assert f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>' in rendered
    assert r2.usage.prompt_tokens == len(srv.state.tokenizer.encode(rendered))


def test_tool_call_round_trip_streamed(srv):
    c = client(srv)
    text = "On it." + calls_text(("get_weather", {"city": "Saint-Étienne \"le\" <vert>", "days": 12}))
    with forcing(srv, text, text):
        whole = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=300)
        _, content, calls, finish = stream(c, model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=300)
    assert finish == "tool_calls" and content == "On it." and list(calls) == [0]
    cid, name, frags = calls[0]
    assert name == "get_weather"
    args = "".join(frags)
    assert args == whole.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(args) == {"city": "Saint-Étienne \"le\" <vert>", "days": 12}
    # the arguments arrive as they are generated: the string value comes in many pieces, before the call closes
    assert len([f for f in frags if f]) > 5
    assert "DSML" not in content

    msgs = USER + [{"role": "assistant", "content": content, "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": cid, "content": "rain"}]
    with forcing(srv, "It rains."):
        _, content, calls, finish = stream(c, model="tools-tiny", messages=msgs, tools=TOOLS, max_tokens=50)
    assert (content, calls, finish) == ("It rains.", {}, "stop")


def test_parallel_calls_and_parallel_tool_calls_false(srv):
    c = client(srv)
    text = calls_text(("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "Europe/Oslo"}))
    with forcing(srv, text, text, text):
        r = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=300)
        _, content, calls, finish = stream(c, model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=300)
        one = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=300,
                                        parallel_tool_calls=False)
    tcs = r.choices[0].message.tool_calls
    assert [t.function.name for t in tcs] == ["get_weather", "get_time"] and r.choices[0].message.content is None
    assert [json.loads(t.function.arguments) for t in tcs] == [{"city": "Oslo"}, {"tz": "Europe/Oslo"}]
    assert len({t.id for t in tcs}) == 2
    assert content == "" and finish == "tool_calls" and [calls[i][1] for i in (0, 1)] == ["get_weather", "get_time"]
    assert ["".join(calls[i][2]) for i in (0, 1)] == [t.function.arguments for t in tcs]
    assert [t.function.name for t in one.choices[0].message.tool_calls] == ["get_weather"]


def test_each_choice_parses_on_its_own(srv):
    c = client(srv)
    texts = (calls_text(("get_time", {"tz": "UTC"})), "No tool needed.")
    with forcing(srv, *texts, *texts):
        r = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=200, n=2)
        chunks = list(c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=200,
                                                n=2, stream=True))
    a, b = r.choices
    assert (a.finish_reason, a.message.tool_calls[0].function.name) == ("tool_calls", "get_time")
    assert (b.finish_reason, b.message.content, b.message.tool_calls) == ("stop", "No tool needed.", None)
    finish = {ch.choices[0].index: ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason}
    assert finish == {0: "tool_calls", 1: "stop"}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == 1) == b.message.content
    assert not any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices[0].index == 1)


def test_typed_arguments(srv):
    c = client(srv)
    args = {"city": "a\nb \\ \"c\" 東京 🌧", "days": -2.5, "ok": True, "none": None, "list": [1, "x", {"k": [2]}],
            "obj": {"nested": {"q": "\"}"}}, "numstr": "42"}
    bad = f'<{DSML}function_calls>\n<{DSML}invoke name="get_time">\n' \
          f'<{DSML}parameter name="tz" string="false">not json</{DSML}parameter>\n</{DSML}invoke>\n' \
          f'</{DSML}function_calls>'
    with forcing(srv, calls_text(("get_weather", args)), bad):
        r = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=1000)
        r2 = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=200)
    assert r.choices[0].message.tool_calls, r.choices[0]
    got = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
    assert got == args and isinstance(got["numstr"], str) and isinstance(got["days"], float)
    # a string="false" value that is not JSON is passed on as the string the model wrote
    assert json.loads(r2.choices[0].message.tool_calls[0].function.arguments) == {"tz": "not json"}


def test_thinking_then_tools(srv):
    c = client(srv)
    text = "The user wants weather; call the tool.</think>" + calls_text(("get_weather", {"city": "Rome"}))
    with forcing(srv, text, text):
        r = c.chat.completions.create(model="tools-tiny-thinking", messages=USER, tools=TOOLS, max_tokens=300)
        reasoning, content, calls, finish = stream(c, model="tools-tiny-thinking", messages=USER, tools=TOOLS,
                                                   max_tokens=300)
    m = r.choices[0].message
    assert m.reasoning_content == "The user wants weather; call the tool." and m.content is None
    assert m.tool_calls[0].function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    assert r.usage.prompt_tokens == n_prompt(srv, USER, thinking=True, tools=[t["function"] for t in TOOLS])
    assert reasoning == m.reasoning_content and content == "" and finish == "tool_calls"
    assert "".join(calls[0][2]) == m.tool_calls[0].function.arguments

    # the reasoning of the calling turn goes back with the tool result (V3.2 keeps it after the last user turn)
    msgs = USER + [{"role": "assistant", "content": None, "reasoning_content": m.reasoning_content,
                    "tool_calls": [m.tool_calls[0].model_dump()]},
                   {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny"}]
    with forcing(srv, "Sunny, then.</think>Sunny in Rome."):
        r2 = c.chat.completions.create(model="tools-tiny-thinking", messages=msgs, tools=TOOLS, max_tokens=60)
    assert r2.choices[0].message.reasoning_content == "Sunny, then."
    assert r2.choices[0].message.content == "Sunny in Rome."
    assert r2.usage.prompt_tokens == n_prompt(srv, msgs, thinking=True, tools=[t["function"] for t in TOOLS])


# ---- malformed output, choices, validation ------------------------------------------------------------------------
def test_malformed_call_comes_back_as_text(srv):
    c = client(srv)
    broken = f'Trying.\n\n<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\noops, no parameter tag'
    with forcing(srv, broken, broken):
        r = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=200)
        _, content, calls, finish = stream(c, model="tools-tiny", messages=USER, tools=TOOLS, max_tokens=200)
    assert r.choices[0].message.content == broken and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    # streamed, the invoke was not announced yet when the fault showed: all of it comes as text, finish "stop"
    assert (finish, calls) == ("stop", {}) and content == "Trying." + broken[len("Trying.\n\n"):]


def test_tool_choice_none_renders_tools_but_parses_nothing(srv):
    c = client(srv)
    text = calls_text(("get_weather", {"city": "Lima"}))
    with forcing(srv, text):
        r = c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, tool_choice="none",
                                      max_tokens=200)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == n_prompt(srv, USER, tools=[t["function"] for t in TOOLS])


def test_tool_request_validation(srv):
    def post(**body):
        return httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **body},
                          timeout=60)

    r = post(tool_choice="auto")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = post(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = post(tools=[WEATHER, WEATHER])
    assert r.status_code == 400 and "twice" in r.json()["error"]["message"]
    r = post(tools=[{"type": "function", "function": {"name": 'bad"name'}}])
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools")
    r = post(tools=[{"type": "retrieval"}])
    assert r.status_code == 400
    r = post(tools=TOOLS, tool_choice="sometimes")
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tool_choice")
    # a tool message must answer a call
    r = post(messages=USER + [{"role": "tool", "tool_call_id": "x", "content": "1"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_required_and_named_choices_are_enforced_by_the_grammar(srv, choice):
    """No forcing here: tool_choice "required" / a named function constrains the random model's own sampling to
    V3.2 DSML calls (nanoseek/engine/grammar.py), which the server then parses like any output."""
    jsonschema = pytest.importorskip("jsonschema")
    c = client(srv)
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    # bounded values: a random model inside an unbounded string would write until max_tokens
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
                 "city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                 "required": ["city", "days"]}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
                 "tz": {"enum": ["UTC", "CET"]}}}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed in range(4):
        kw = dict(model="tools-tiny", messages=USER, tools=tools, tool_choice=tool_choice, temperature=1.0,
                  seed=seed, max_tokens=400, parallel_tool_calls=seed % 2 == 0)
        r = c.chat.completions.create(**kw)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and m.tool_calls and not m.content, r
        for tc in m.tool_calls:
            assert tc.function.name in schemas and (choice == "required" or tc.function.name == choice)
            jsonschema.validate(json.loads(tc.function.arguments), schemas[tc.function.name])
        _, content, calls, finish = stream(c, **kw)  # the same seed streams the same calls
        assert finish == "tool_calls" and not content.strip()
        assert [(name, "".join(frags)) for _, name, frags in calls.values()] == \
            [(tc.function.name, tc.function.arguments) for tc in m.tool_calls]
    with pytest.raises(openai.BadRequestError) as e:  # a forced call and a JSON answer cannot both hold
        c.chat.completions.create(model="tools-tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                  response_format={"type": "json_object"}, max_tokens=4)
    assert e.value.body["param"] == "response_format"
