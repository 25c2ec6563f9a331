"""Grammar-constrained decoding (nanoseek/engine/grammar.py): a tiny random model with a real trained tokenizer,
sampled at temperature 1, writes JSON that validates against the schema and DSML tool calls that parse back into
valid arguments; the reasoning of a thinking response stays free."""
import json
import re

import jsonschema
import pytest
import torch

import nanoseek
from nanoseek import chat
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine import grammar as G
from test_server import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                   "vip": {"type": "boolean"}},
                  "required": ["id", "vip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 4},
    },
    "required": ["name", "kind", "age", "score", "owner", "tags"],
    "additionalProperties": False,
}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 5}, "unit": {"enum": ["c", "f"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7},
                       "hourly": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                       "at": {"type": "object", "properties": {"h": {"type": "integer", "minimum": 0, "maximum": 23}},
                              "required": ["h"], "additionalProperties": False}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def model(tok):
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                              eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    return nanoseek.Transformer(cfg).eval()


def run(model, tok, grammar, prompt_text, seeds, max_tokens=400, **engine_kw):
    ids = tok.encode(prompt_text)
    make = G.compiler_for(tok).constraint(grammar, ids)
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, constraint=make) for s in seeds]
    engine = Engine(model, tok, max_batch_size=len(seeds), max_model_len=1024, **engine_kw)
    return engine.generate([ids] * len(seeds), params)


def answer_prompt(thinking=False):
    return chat.encode_messages([{"role": "user", "content": "Describe a pet as JSON."}], thinking=thinking)


def test_json_schema_outputs_validate_for_20_seeds(model, tok):
    outs = run(model, tok, G.json_schema(SCHEMA), answer_prompt(), range(20))
    for o in outs:
        assert o.finish_reason == "stop", o.new_text
        jsonschema.validate(json.loads(o.new_text), SCHEMA)
    assert len({o.new_text for o in outs}) > 10  # sampled, not one forced string
    assert any("note" in json.loads(o.new_text) for o in outs) and not all("note" in json.loads(o.new_text)
                                                                            for o in outs)


def test_json_schema_with_speculative_drafts(model, tok):
    """MTP drafts are checked against the grammar position by position (the first rejected draft ends the step)."""
    outs = run(model, tok, G.json_schema(SCHEMA), answer_prompt(), range(6), speculative="mtp", num_draft=2)
    for o in outs:
        assert o.finish_reason == "stop", o.new_text
        jsonschema.validate(json.loads(o.new_text), SCHEMA)


def test_json_object_mode(model, tok):
    outs = run(model, tok, G.json_object(), answer_prompt(), range(6), max_tokens=200)
    done = [o for o in outs if o.finish_reason == "stop"]
    assert done
    for o in done:
        assert isinstance(json.loads(o.new_text), dict)


def test_length_cut_is_the_one_output_that_may_not_parse(model, tok):
    """max_tokens ends the answer mid-object: finish_reason "length", and that text is not JSON."""
    (o,) = run(model, tok, G.json_schema(SCHEMA), answer_prompt(), [0], max_tokens=4)
    assert o.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(o.new_text)


def test_thinking_stays_free_then_json(model, tok):
    """The prompt ends inside <think>: the reasoning is unconstrained until the model writes </think>, then the
    answer follows the schema. The random model is nudged to close its reasoning after a few tokens by a large
    logit for </think> on part of the hidden states (a positive component along a random direction)."""
    nudged = nanoseek.Transformer(model.config).eval()
    nudged.load_state_dict(model.state_dict())
    with torch.no_grad():
        row = nudged.lm_head.weight[tok.end_think_id]
        row.copy_(torch.randn(row.shape, generator=torch.Generator().manual_seed(3)) * 2)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    prompt = answer_prompt(thinking=True)
    assert G.compiler_for(tok).reasoning_open(tok.encode(prompt))
    outs = run(nudged, tok, G.json_schema(schema), prompt, range(20))
    reasonings = []
    for o in outs:
        assert o.finish_reason == "stop", o.new_text
        reasoning, content = chat.split_reasoning(o.new_text)
        jsonschema.validate(json.loads(content), schema)
        reasonings.append(reasoning)
    # free text before </think>: what the grammar would never allow at the start of an answer
    assert any(r and not r.startswith("{") for r in reasonings)
    # thinking, then a forced tool call
    for o in run(nudged, tok, G.tool_calls(TOOLS, "ping", parallel=False), prompt, range(4)):
        reasoning, content = chat.split_reasoning(o.new_text)
        assert o.finish_reason == "stop" and read_dsml(content) == [("ping", {})], o.new_text
    # the same prompt closed (non-thinking): constrained from the first token
    closed = answer_prompt(thinking=False)
    assert not G.compiler_for(tok).reasoning_open(tok.encode(closed))
    for o in run(nudged, tok, G.json_schema(schema), closed, range(3)):
        jsonschema.validate(json.loads(o.new_text), schema)


# ---- tool calls ------------------------------------------------------------------------------------------------
def read_dsml(text: str) -> list[tuple[str, dict]]:
    """A minimal reader of chat.py's DSML block: [(name, arguments)]; raises if the text is anything else."""
    D = re.escape(chat.DSML)
    block = re.fullmatch(rf"\n\n<{D}function_calls>\n(.*)\n</{D}function_calls>", text, re.S)
    assert block, text
    calls = []
    for inv in re.finditer(rf'<{D}invoke name="([^"]*)">\n(.*?)\n</{D}invoke>', block.group(1), re.S):
        args = {}
        for p in re.finditer(rf'<{D}parameter name="([^"]*)" string="(true|false)">(.*?)</{D}parameter>',
                             inv.group(2), re.S):
            args[p.group(1)] = p.group(3) if p.group(2) == "true" else json.loads(p.group(3))
        calls.append((inv.group(1), args))
    return calls


def schema_of(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


@pytest.mark.parametrize("choice,parallel", [("required", True), ("get_weather", False)])
def test_tool_calls_parse_back_into_valid_arguments(model, tok, choice, parallel):
    # the tools' schema prompt would not fit the tiny model's context; the grammar does not depend on it
    prompt = chat.encode_messages([{"role": "user", "content": "Weather in Paris?"}])
    outs = run(model, tok, G.tool_calls(TOOLS, choice, parallel=parallel), prompt, range(8), max_tokens=900)
    names = set()
    for o in outs:
        assert o.finish_reason == "stop", o.new_text
        calls = read_dsml(o.new_text)
        assert calls and (parallel or len(calls) == 1)
        for name, args in calls:
            assert choice == "required" or name == choice
            jsonschema.validate(args, schema_of(name))
            names.add(name)
        # byte for byte what chat.py renders for these calls
        assert chat._dsml_calls(calls) == o.new_text
    assert names == ({"get_weather", "ping"} if choice == "required" else {"get_weather"})


def accepts(tok, grammar, text) -> bool:
    m = G.compiler_for(tok).compile(grammar)
    return m.consume_tokens(tok.encode(text)) and m.is_accepting()


def test_tool_call_grammar_accepts_exactly_what_chat_renders(tok):
    """chat.py's rendering of calls (parallel ones, optional parameters left out, none at all) is in the
    grammar; other spellings, unknown tools and a second call without parallel_tool_calls are not."""
    weather = ("get_weather", {"city": "Paris", "days": 3, "at": {"h": 7}})
    full = ("get_weather", {"city": "Oslo", "unit": "c", "days": 1, "hourly": [True, False], "at": {"h": 0}})
    two = chat._dsml_calls([weather, ("ping", {})])
    assert accepts(tok, G.tool_calls(TOOLS), two)
    assert accepts(tok, G.tool_calls(TOOLS), chat._dsml_calls([full]))
    assert not accepts(tok, G.tool_calls(TOOLS, parallel=False), two)
    assert not accepts(tok, G.tool_calls(TOOLS, "ping"), chat._dsml_calls([weather]))
    assert not accepts(tok, G.tool_calls(TOOLS), chat._dsml_calls([("get_weather", {"days": 3})]))  # city missing
    assert not accepts(tok, G.tool_calls(TOOLS), chat._dsml_calls([("get_weather", {"city": "a</b", "days": 3})]))
    assert not accepts(tok, G.tool_calls(TOOLS), chat._dsml_calls([("get_weather", {"city": "Rome", "days": 9})]))
    assert not accepts(tok, G.tool_calls(TOOLS), chat._dsml_calls([weather]).replace("\n<", "\n <", 1))


def test_grammar_errors_name_the_problem(tok):
    c = G.compiler_for(tok)
    with pytest.raises(G.GrammarError, match="foo"):
        c.compile(G.json_schema({"type": "foo"}))
    with pytest.raises(G.GrammarError, match="not among the tools"):
        G.tool_calls(TOOLS, "nope")
    with pytest.raises(G.GrammarError, match="required parameters"):
        G.tool_calls([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {}, "required": ["x"]}}}])
    with pytest.raises(G.GrammarError, match="parameters must be"):
        G.tool_calls([{"type": "function", "function": {"name": "f", "parameters": "x"}}])
    # strict refuses keywords llguidance does not implement; strict=False ignores them
    odd = {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}
    with pytest.raises(G.GrammarError):
        c.compile(G.json_schema(odd, strict=True))
    c.compile(G.json_schema(odd, strict=False))
    assert c is G.compiler_for(tok)  # one llguidance tokenizer per tokenizer object


def test_bench_runs_and_prints_both_ways(tmp_path):
    """bench/grammar.py end to end on a tiny model folder: one table row per batch size, every sequence cut at
    --tokens, and a positive cost for the constraint's calls."""
    import subprocess
    import sys
    from pathlib import Path

    from test_server import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "tiny")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "grammar.py"), "--model", str(model_dir),
                          "--tokens", "6", "--batch", "1,2", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    rows = [ln.split("|")[1:-1] for ln in out.stdout.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert [int(r[0]) for r in rows] == [1, 2] and all(int(r[1]) == 6 for r in rows)
    assert all(float(r[5]) > 0 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
