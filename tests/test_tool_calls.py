"""The tool-call parser (nanoseek/tool_calls.py): what the chat encoding renders parses back exactly, and any text
cut into any deltas (valid markup, truncated markup, garbage) parses the same as in one piece, without raising."""
from __future__ import annotations

import json
import random

import pytest

from nanoseek.chat import DSML, TOOL_CALL_END, TOOL_CALLS_BEGIN, _dsml_calls, _v3_calls
from nanoseek.tool_calls import CallArgs, CallEnd, CallStart, Content, ToolCallParser, fold, parse

ALPHABET = list("abc xyz \"'\\{}[]<>/=:,\n\t`") + ["東", "京", "é", "🌧", "\u2028", "｜", "▁"]
TAG_BITS = [f"<{DSML}function_calls>", f"</{DSML}function_calls>", f'<{DSML}invoke name="', f"</{DSML}invoke>",
            f'<{DSML}parameter name="', '" string="true">', '" string="false">', f"</{DSML}parameter>", '">',
            "<｜DSML｜", "</｜DSML｜param", TOOL_CALLS_BEGIN, "<｜tool▁call▁begin｜>function<｜tool▁sep｜>",
            "\n```json\n", "\n```", TOOL_CALL_END,
            "<｜tool▁call▁begin｜>f<｜tool▁sep｜>", "<｜tool▁calls▁end｜>", "<think>", "</think>"]


def rand_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def rand_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 2 else 5)
    if kind == 0:
        return rand_text(rng, rng.randrange(0, 12)) + rng.choice(["", f"</{DSML}param", "<｜DSML｜", '"}'])
    if kind == 1:
        return rng.randrange(-10**6, 10**6)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return round(rng.uniform(-100, 100), 3)
    if kind == 4:
        return rng.choice(["42", "true", "null", "[1]", " padded "])  # strings that look like JSON stay strings
    if kind == 5:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rand_text(rng, 3): rand_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def rand_calls(rng: random.Random) -> list[tuple[str, dict]]:
    # parameter names without '"' or a newline: the markup writes them unescaped in name="..."
    def key(j: int) -> str:
        return f"k{j}_" + rand_text(rng, 2).replace('"', "").replace("\n", "") if rng.random() < 0.3 else f"k{j}"

    return [(rng.choice(["get_weather", "f", "ns.search-2", "東京"]),
             {key(j): rand_value(rng) for j in range(rng.randrange(4))}) for _ in range(rng.randrange(1, 4))]


def v31_calls(calls: list) -> str:
    """V3.1's form of tool calls (nanoseek renders V3's; the parser reads both)."""
    return TOOL_CALLS_BEGIN + "".join(f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{json.dumps(a, ensure_ascii=False)}"
                                      f"{TOOL_CALL_END}" for n, a in calls) + "<｜tool▁calls▁end｜>"


def cut(rng: random.Random, text: str) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 40)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


def streamed(pieces: list[str], max_calls=None):
    p = ToolCallParser(max_calls)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.flush()
    out = fold(events)
    out.malformed = p.malformed
    return out, events


def test_parses_what_the_chat_encoding_renders():
    calls = [("get_weather", {"city": "Paris \"16e\"", "days": 3, "units": ["C", "F"], "exact": False}),
             ("get_time", {})]
    out = parse("Let me look." + _dsml_calls(calls))
    assert out.content == "Let me look." and not out.malformed
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls
    out = parse("Checking" + _v3_calls(calls))
    assert out.content == "Checking" and [(c.name, json.loads(c.arguments)) for c in out.calls] == calls
    v31 = (f"Sure{TOOL_CALLS_BEGIN}<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{{\"city\": \"Oslo\"}}"
           f"{TOOL_CALL_END}<｜tool▁call▁begin｜>f<｜tool▁sep｜>{{}}{TOOL_CALL_END}<｜tool▁calls▁end｜>")
    out = parse(v31)  # V3.1's shorter form
    assert out.content == "Sure" and [(c.name, c.arguments) for c in out.calls] == [("get_weather", '{"city": "Oslo"}'),
                                                                                   ("f", "{}")]
    assert streamed(list(v31))[0] == out
    plain = "no calls, <b>bold</b>, a < sign, <｜DSML｜ alone"
    assert parse(plain).content == plain and parse(plain).calls == []
    assert parse("plain\n\n").content == "plain\n\n"  # trailing whitespace is content unless a block follows


def test_arguments_stream_before_the_call_closes():
    text = _dsml_calls([("f", {"note": "a long string value " * 3, "n": 7})])
    p = ToolCallParser()
    events = []
    for ch in text:
        events += p.feed(ch)
    events += p.flush()
    kinds = [type(e) for e in events]
    assert kinds[0] is CallStart and kinds[-1] is CallEnd and kinds.count(CallStart) == 1
    frags = [e.text for e in events if isinstance(e, CallArgs)]
    assert len(frags) > 40  # the string value char by char, not at the end
    assert frags[:3] == ['{"note": "', "a", " "]
    assert json.loads("".join(frags)) == {"note": "a long string value " * 3, "n": 7}


def test_string_false_values_that_are_not_json_become_strings():
    t = (f'<{DSML}function_calls>\n<{DSML}invoke name="f">\n'
         f'<{DSML}parameter name="a" string="false">not json</{DSML}parameter>\n'
         f'<{DSML}parameter name="b" string="false"> NaN </{DSML}parameter>\n'
         f'<{DSML}parameter name="c" string="false"> [1, 2] </{DSML}parameter>\n</{DSML}invoke>\n'
         f'</{DSML}function_calls>')
    out = parse(t)
    assert json.loads(out.calls[0].arguments) == {"a": "not json", "b": "NaN", "c": [1, 2]}


def test_max_calls_keeps_the_first():
    out = parse(_dsml_calls([("a", {"x": 1}), ("b", {"y": 2}), ("c", {})]), max_calls=1)
    assert [(c.name, c.arguments) for c in out.calls] == [("a", '{"x": 1}')] and out.content == ""


@pytest.mark.parametrize("bad", [
    f'<{DSML}function_calls>\n<{DSML}invoke name="f">\nstray text</{DSML}invoke></{DSML}function_calls>',
    f'<{DSML}function_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="x" string="maybe">1'
    f'</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}function_calls>',
    f'<{DSML}function_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="x" string="true">1',  # unclosed
    f'<{DSML}function_calls>\n<{DSML}invoke name="line\nbreak">\n</{DSML}invoke>\n</{DSML}function_calls>',
    f"{TOOL_CALLS_BEGIN}<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n[1, 2]\n```{TOOL_CALL_END}",
    f"{TOOL_CALLS_BEGIN}<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{{\"a\": 1",
    f"{TOOL_CALLS_BEGIN}garbage",
])
def test_malformed_markup_becomes_text(bad):
    out = parse("Before. " + bad + " after")
    assert out.malformed and out.content.startswith("Before.") and out.content.endswith(bad + " after")


def test_fuzz_valid_markup_any_cut():
    rng = random.Random(0)
    for trial in range(600):
        calls = rand_calls(rng)
        render = rng.choice([_dsml_calls, _dsml_calls, _v3_calls, v31_calls])
        pre = rand_text(rng, rng.randrange(0, 15)).replace("<", "(")
        text = pre + render(calls) + rng.choice(["", "\n", " trailing"])
        whole = parse(text)
        assert not whole.malformed, text
        assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == calls, text
        for _ in range(4):
            got, events = streamed(cut(rng, text))
            assert got == whole
            assert not any(DSML in e.text for e in events if isinstance(e, Content))


def test_fuzz_truncated_and_garbage_never_raise_and_cuts_do_not_matter():
    rng = random.Random(1)
    for trial in range(3000):
        if trial % 2:
            text = rng.choice([_dsml_calls, _dsml_calls, _v3_calls, v31_calls])(rand_calls(rng))
            text = rand_text(rng, 5) + text[:rng.randrange(len(text) + 1)]  # unclosed tags, cut anywhere
        else:  # garbage: tag pieces and text in any order
            text = "".join(rng.choice(TAG_BITS) if rng.random() < 0.4 else rand_text(rng, rng.randrange(1, 6))
                           for _ in range(rng.randrange(1, 25)))
        whole = parse(text)
        for _ in range(3):
            got, _ = streamed(cut(rng, text))
            assert got == whole, text
        for c in whole.calls:  # whatever was parsed as a completed call has JSON-object arguments
            if not whole.malformed:
                assert isinstance(json.loads(c.arguments), dict)
