"""DeepSeek chat encoding: exact strings, the Jinja template's parity with it, FIM, reasoning split, loss mask."""
import random

import pytest

from nanoseek import chat
from nanoseek.chat import (ASSISTANT, BOS, EOS, USER, ReasoningParser, chat_loss_mask, encode_messages, fim_prompt,
                           split_reasoning)

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "hello"}
A1 = {"role": "assistant", "content": "Hi!", "reasoning_content": "greet back"}
U2 = {"role": "user", "content": "1+1=?"}
A2 = {"role": "assistant", "content": "2", "reasoning_content": "add"}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Dakar", "days": 2}}},
    {"type": "function", "function": {"name": "now", "arguments": {}}}]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
R1 = {"role": "tool", "content": "sunny", "tool_call_id": "0"}
R2 = {"role": "tool", "content": "12:00", "tool_call_id": "1"}


def test_v32_non_thinking_and_thinking_prompts():
    msgs = [SYS, U1, A1, U2]
    assert encode_messages(msgs) == (f"{BOS}Be brief.{USER}hello{ASSISTANT}</think>Hi!{EOS}"
                                     f"{USER}1+1=?{ASSISTANT}</think>")
    # thinking: earlier turns drop their reasoning; the prompt ends with <think>
    assert encode_messages(msgs, thinking=True) == (f"{BOS}Be brief.{USER}hello{ASSISTANT}</think>Hi!{EOS}"
                                                    f"{USER}1+1=?{ASSISTANT}<think>")
    # a finished conversation in thinking mode keeps the last answer's reasoning
    assert encode_messages([U1, A1, U2, A2], add_generation_prompt=False, thinking=True) == (
        f"{BOS}{USER}hello{ASSISTANT}</think>Hi!{EOS}{USER}1+1=?{ASSISTANT}<think>add</think>2{EOS}")
    assert encode_messages([U1], add_generation_prompt=False) == f"{BOS}{USER}hello"


def test_v3_style():
    assert encode_messages([SYS, U1, A1, U2], style="v3") == (
        f"{BOS}Be brief.{USER}hello{ASSISTANT}Hi!{EOS}{USER}1+1=?{ASSISTANT}")
    assert encode_messages([U1], style="v3", add_generation_prompt=False) == f"{BOS}{USER}hello"
    with pytest.raises(ValueError, match="no thinking mode"):
        encode_messages([U1], style="v3", thinking=True)


def test_system_prompts_are_hoisted_and_joined():
    out = encode_messages([SYS, U1, {"role": "system", "content": "Use French."}])
    assert out.startswith(f"{BOS}Be brief.\n\nUse French.{USER}hello")


def test_prefix_completion_is_continued():
    pre = {"role": "assistant", "content": "The answer is", "prefix": True}
    assert encode_messages([U2, pre]) == f"{BOS}{USER}1+1=?{ASSISTANT}</think>The answer is"
    pre_r = {"role": "assistant", "content": "", "reasoning_content": "Let me", "prefix": True}
    assert encode_messages([U2, pre_r], thinking=True) == f"{BOS}{USER}1+1=?{ASSISTANT}<think>Let me"
    pre_rc = {"role": "assistant", "content": "It is", "reasoning_content": "easy", "prefix": True}
    assert encode_messages([U2, pre_rc], thinking=True) == f"{BOS}{USER}1+1=?{ASSISTANT}<think>easy</think>It is"
    assert encode_messages([U2, pre], style="v3") == f"{BOS}{USER}1+1=?{ASSISTANT}The answer is"
    with pytest.raises(ValueError, match="prefix"):
        encode_messages([U1, dict(A1, prefix=True), U2])


def test_v32_tool_calls_in_dsml():
    out = encode_messages([U1, CALL, R1, R2], tools=TOOLS)
    assert "## Tools" in out and '"name": "get_weather"' in out
    d = chat.DSML
    assert out.endswith(
        f"{USER}hello{ASSISTANT}</think>\n\n<{d}function_calls>\n"
        f'<{d}invoke name="get_weather">\n<{d}parameter name="city" string="true">Dakar</{d}parameter>\n'
        f'<{d}parameter name="days" string="false">2</{d}parameter>\n</{d}invoke>\n'
        f'<{d}invoke name="now">\n\n</{d}invoke>\n</{d}function_calls>{EOS}'
        "\n\n<function_results>\n<result>sunny</result>\n<result>12:00</result>\n</function_results>\n\n</think>")
    # arguments as the JSON string the OpenAI API sends render the same
    as_str = dict(CALL, tool_calls=[{"type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Dakar", "days": 2}'}},
                                    CALL["tool_calls"][1]])
    assert encode_messages([U1, as_str, R1, R2], tools=TOOLS) == out


def test_v3_tool_calls_with_special_tokens():
    out = encode_messages([U1, CALL, R1, R2, {"role": "assistant", "content": "Sunny."}], style="v3")
    assert out == (f"{BOS}{USER}hello{ASSISTANT}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                   'get_weather\n```json\n{"city": "Dakar", "days": 2}\n```<｜tool▁call▁end｜>\n'
                   "<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜>"
                   f"<｜tool▁calls▁end｜>{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
                   f"<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>Sunny.{EOS}")


@pytest.mark.parametrize("msgs, err", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": 3}], "content must be"),
    ([{"role": "user"}], "needs 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text"),
    ([SYS], "only system"),
    ([U1, R1], "tool message must follow"),
    ([U1, CALL, R1, U2], "missing"),
    ([U1, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "not valid JSON"),
])
def test_bad_messages_raise_clear_errors(msgs, err):
    with pytest.raises(ValueError, match=err):
        encode_messages(msgs)


def test_content_parts_and_reasoning_alias():
    parts = {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}
    assert encode_messages([parts]) == encode_messages([U1])
    alias = {"role": "assistant", "content": "2", "reasoning": "add"}
    assert encode_messages([U2, alias], False, True) == encode_messages([U2, A2], False, True)


def test_fim_prompt():
    assert fim_prompt("def f(x):\n    ", "\n    return y") == (
        "<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y<｜fim▁end｜>")


def test_split_reasoning():
    assert split_reasoning("let me think</think>The answer") == ("let me think", "The answer")
    assert split_reasoning("<think>hmm</think>ok") == ("hmm", "ok")
    assert split_reasoning("still thinking") == ("still thinking", "")
    assert split_reasoning("plain answer", thinking=False) == ("", "plain answer")


@pytest.mark.parametrize("text", ["abc</think>def", "<think>x < y </thi</think></think>z", "a</thin", "</think>",
                                  "no tag at all <", "<thi", "<think>"])
def test_reasoning_parser_any_delta_split(text):
    rng = random.Random(0)
    want = split_reasoning(text)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 5))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        parser, r, c = ReasoningParser(thinking=True), "", ""
        for p in pieces:
            dr, dc = parser.feed(p)
            assert "</think>" not in dr
            r, c = r + dr, c + dc
        dr, dc = parser.flush()
        assert (r + dr, c + dc) == want
    # one character at a time: nothing of the tag leaks, reasoning streams as soon as it is unambiguous
    parser = ReasoningParser(thinking=True)
    out = [parser.feed(ch) for ch in "ab</think>cd"]
    assert out[0] == ("a", "") and out[-1] == ("", "d")


# --- the tokenizer_config.json template renders byte-identical text (transformers' apply_chat_template) ---

CONVERSATIONS = [
    [U1],
    [SYS, U1, A1, U2],
    [SYS, U1, A1, U2, A2],
    [U1, A1, U2, {"role": "assistant", "content": "The", "reasoning_content": "hm", "prefix": True}],
    [U1, CALL, R1, R2],
    [U1, CALL, R1, R2, {"role": "assistant", "content": "Sunny, 12:00.", "reasoning_content": "done"}],
    [SYS, {"role": "system", "content": "Second."}, {"role": "user", "content": [{"type": "text", "text": "parts"}]}],
    [U1, {"role": "assistant", "content": "2", "reasoning": "alias"}, U2],
]


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from nanoseek.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("chat_tok")
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50 + "def f(x):\n    return x\n" * 30)
    tok = train_tokenizer([root / "a.txt"], 400)
    out = {}
    for style in chat.STYLES:
        tok.save(root / style, chat_style=style)
        out[style] = (tok, transformers.AutoTokenizer.from_pretrained(str(root / style)))
    return out


@pytest.mark.parametrize("style", chat.STYLES)
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_jinja_template_matches_encode_messages(hf_tokenizers, style, i):
    tok, hf = hf_tokenizers[style]
    msgs = CONVERSATIONS[i]
    for agp in (True, False):
        for thinking in ((False, True) if style == "v3.2" else (False,)):
            for tools in ((None, TOOLS) if style == "v3.2" else (None,)):
                want = encode_messages(msgs, add_generation_prompt=agp, thinking=thinking, style=style, tools=tools)
                got = hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=agp,
                                             thinking=thinking)
                assert got == want, (agp, thinking, tools)
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == tok.encode(encode_messages(msgs, style=style))


def test_chat_loss_mask_marks_assistant_tokens_only(hf_tokenizers):
    tok, _ = hf_tokenizers["v3.2"]
    msgs = [SYS, U1, A1, U2, A2]
    ids, mask = chat_loss_mask(msgs, tok, thinking=True)
    assert ids == tok.encode(encode_messages(msgs, add_generation_prompt=False, thinking=True))
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == f"Hi!{EOS}add</think>2{EOS}"
    final = {"role": "assistant", "content": "Sunny at noon."}
    for style in chat.STYLES:
        msgs = [SYS, U1, CALL, R1, R2, final]
        ids, mask = chat_loss_mask(msgs, tok, style=style)
        assert ids == tok.encode(encode_messages(msgs, add_generation_prompt=False, style=style))
        assert tok.decode([t for t, m in zip(ids, mask) if m]).endswith(f"{EOS}Sunny at noon.{EOS}")
        assert "sunny" not in tok.decode([t for t, m in zip(ids, mask) if m])  # tool results are not trained
