"""The OpenAI-compatible server against live uvicorn servers on 127.0.0.1, driven by the official `openai` client.

Two tiny models are built locally (a byte-level BPE trained on a slice of Tiny Shakespeare, weights random):
- `random`: a plain random model, served with an API key; context-sensitive, so greedy runs that interleave
  differently must still agree token for token (concurrency) and prompt logprobs can be checked against a
  direct forward pass;
- `scripted`: a random model rewired into a bigram machine (huge embeddings, an output head that maps each
  token to a chosen successor), so greedy output is known in advance: after `<think>` it writes
  " to be</think> or not" then EOS. That makes thinking mode, stop strings and prefix completion checkable.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import nanoseek
from nanoseek.chat import encode_messages, fim_prompt
from nanoseek.server.api import ServeConfig, ServerThread
from nanoseek.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
KEY = "test-key-123"
SCRIPT_WORDS = ([" to", " be"], [" or", " not"])  # reasoning, then answer


# ---- model folders ----------------------------------------------------------------------------------------------
def build_tokenizer(out: Path):
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    return train_tokenizer([corpus], vocab_size=1024, out_dir=out)


def tiny_model_dir(out: Path, scripted: bool = False) -> Path:
    """A tiny V3.2-shaped model folder (weights + tokenizer); `scripted` rewires it into a bigram machine."""
    tok = build_tokenizer(out)
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                              eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg)
    if scripted:
        succ = script_successors(tok, cfg.vocab_size)
        with torch.no_grad():
            # the residual stream is dominated by the current token's embedding (the blocks add ~1e-2), so the
            # logits are W @ norm(e_i): row succ(i) of W is e_i's direction, a margin of ~40 over any other row
            model.embed_tokens.weight.normal_(0, 1)
            e = torch.nn.functional.normalize(model.embed_tokens.weight, dim=-1)
            w = torch.zeros_like(model.lm_head.weight)
            w.index_add_(0, succ, e * 10)
            model.lm_head.weight.copy_(w)
    nanoseek.save_pretrained(model, out)
    return out


def script_successors(tok, vocab: int) -> torch.Tensor:
    succ = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    reasoning, answer = ([tok.encode(w)[0] for w in ws] for ws in SCRIPT_WORDS)
    chain = [tok.think_id, *reasoning, tok.end_think_id, *answer, tok.eos_id]
    for a, b in zip(chain, chain[1:]):
        succ[a] = b
    return succ


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("random") / "nanoseek-tiny")


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("scripted") / "scripted", scripted=True)


@pytest.fixture(scope="module")
def server(random_dir):
    # float32 whatever the CPU: the logprob tests compare with the plain model's forward to 1e-4 (the `scripted`
    # server keeps --dtype auto, bfloat16 on a CPU with native bf16)
    with ServerThread(ServeConfig(str(random_dir), api_key=KEY, max_model_len=256, dtype="float32")) as srv:
        # /health is 503 until the background load completes, then 200
        t_end = time.monotonic() + 120
        while (r := httpx.get(srv.url + "/health")).status_code != 200:
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            assert time.monotonic() < t_end
            time.sleep(0.05)
        assert r.json() == {"status": "ok"}
        yield srv


@pytest.fixture(scope="module")
def scripted(scripted_dir):
    with ServerThread(ServeConfig(str(scripted_dir), max_batch_size=2, max_waiting=1)) as srv:
        yield srv.wait_ready()


def client(srv, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def used_blocks(srv) -> int:
    return srv.state.engine.stats()["used_blocks"]


def metric(srv, sample: str) -> float:
    """The value of one /metrics sample line, e.g. 'nanoseek_request_success_total{finish_reason="abort"}'."""
    for ln in httpx.get(srv.url + "/metrics").text.splitlines():
        if ln.startswith(sample + " "):
            return float(ln.rsplit(" ", 1)[1])
    return 0.0


def wait_idle(srv, timeout: float = 20.0) -> None:
    """Until no request holds KV-cache blocks and nothing runs or waits."""
    t_end = time.monotonic() + timeout
    while True:
        s = srv.state.engine.stats()
        if s["used_blocks"] == 0 and s["running"] == 0 and s["waiting"] == 0:
            return
        assert time.monotonic() < t_end, f"engine not idle: {s}"
        time.sleep(0.02)


# ---- basics -------------------------------------------------------------------------------------------------------
def test_models_tokenize_detokenize_tokenizer_info(server):
    c = client(server)
    ids = [m.id for m in c.models.list().data]
    assert ids == ["nanoseek-tiny", "nanoseek-tiny-thinking"]
    h = {"Authorization": f"Bearer {KEY}"}
    tok = load_tokenizer(server.state.cfg.model_dir)
    r = httpx.post(server.url + "/tokenize", json={"prompt": "To be, or not", "add_special_tokens": True}, headers=h)
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == tok.encode("To be, or not", add_bos=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    r = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"][1:]}, headers=h)
    assert r.json() == {"prompt": "To be, or not"}
    info = httpx.get(server.url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert "<｜Assistant｜>" in info["chat_template"]
    # lm-eval's remote tokenizer finds the EOS id by tokenizing the EOS string without special tokens
    r = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False},
                   headers=h)
    assert r.json()["tokens"] == [tok.eos_id]
    # chat messages render with the DeepSeek encoding
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}, headers=h)
    assert r.json()["tokens"] == tok.encode(encode_messages(msgs))


def test_chat_nonstreamed_and_streamed_agree(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    r = c.chat.completions.create(model="nanoseek-tiny", messages=msgs, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    n_prompt = len(server.state.tokenizer.encode(encode_messages(msgs)))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 12 and choice.finish_reason == "length"
    assert r.usage.total_tokens == n_prompt + 12

    chunks = list(c.chat.completions.create(model="nanoseek-tiny", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_logprobs_and_n(server):
    c = client(server)
    r = c.chat.completions.create(model="nanoseek-tiny", messages=[{"role": "user", "content": "Speak"}],
                                  max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: n identical choices
    assert r.usage.completion_tokens == 10
    lps = r.choices[0].logprobs.content
    assert len(lps) == 5
    for lp in lps:
        assert len(lp.top_logprobs) == 3
        assert lp.logprob == lp.top_logprobs[0].logprob  # greedy picks the most likely token
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob


def test_sampling_seed_reproducible(server):
    c = client(server)
    kw = dict(model="nanoseek-tiny", prompt="Good morrow", max_tokens=10, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    assert a == b


# ---- completions: what lm-evaluation-harness sends ------------------------------------------------------------------
def test_completions_prompt_forms(server):
    c = client(server)
    tok = server.state.tokenizer
    r = c.completions.create(model="nanoseek-tiny", prompt=["O Romeo", "Friends, Romans"], max_tokens=4,
                             temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    n_prompt = len(tok.encode("O Romeo", add_bos=True)) + len(tok.encode("Friends, Romans", add_bos=True))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 16
    # a text prompt and the same prompt as token ids give the same completion
    ids = tok.encode("O Romeo", add_bos=True)
    r2 = c.completions.create(model="nanoseek-tiny", prompt=ids, max_tokens=4, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    r3 = c.completions.create(model="nanoseek-tiny", prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [ch.text for ch in r3.choices] == [r.choices[0].text] * 2


def test_echo_logprobs_with_token_ids_match_forward(server, random_dir):
    """The loglikelihood request of lm-eval's local-completions: token-id prompts, max_tokens 1, logprobs 1,
    echo; token_logprobs[ctxlen:-1] must be the model's log p(continuation | context)."""
    c = client(server)
    tok = server.state.tokenizer
    prompts = [tok.encode("Thou art a villain", add_bos=True), tok.encode("What light", add_bos=True)]
    r = c.completions.create(model="nanoseek-tiny", prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                             temperature=0, seed=1234)
    model = nanoseek.from_pretrained(random_dir)
    for choice, ids in zip(sorted(r.choices, key=lambda ch: ch.index), prompts):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert choice.text.startswith(tok.decode(ids))
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        want = [ref[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        # the generated token is the greedy one, so lm-eval's is_greedy check holds for it
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
        assert all(len(t) == 1 for t in lp.top_logprobs[1:])
        assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # max_tokens=0: the prompt's logprobs only
    r0 = c.completions.create(model="nanoseek-tiny", prompt=prompts[0], max_tokens=0, logprobs=1, echo=True)
    assert len(r0.choices[0].logprobs.tokens) == len(prompts[0]) and r0.usage.completion_tokens == 0
    assert r0.choices[0].logprobs.token_logprobs == r.choices[0].logprobs.token_logprobs[:-1]


def test_completion_stream_with_echo_and_logprobs(server):
    c = client(server)
    kw = dict(model="nanoseek-tiny", prompt="Now is the winter", max_tokens=6, temperature=0, logprobs=2, echo=True)
    full = c.completions.create(**kw).choices[0]
    chunks = [ch for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(ch.choices[0].text for ch in chunks) == full.text
    tokens = sum((ch.choices[0].logprobs.tokens for ch in chunks), [])
    offsets = sum((ch.choices[0].logprobs.text_offset for ch in chunks), [])
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert chunks[-1].choices[0].finish_reason == full.finish_reason


def test_fim_suffix(server):
    c = client(server)
    tok = server.state.tokenizer
    r = c.completions.create(model="nanoseek-tiny", prompt="def f(x):\n    return ", suffix="\n\nprint(f(2))",
                             max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(tok.encode(fim_prompt("def f(x):\n    return ", "\n\nprint(f(2))"),
                                                   add_bos=True))
    with pytest.raises(openai.BadRequestError, match="suffix"):
        c.completions.create(model="nanoseek-tiny", prompt=[1, 2, 3], suffix="x", max_tokens=3)


# ---- thinking mode, stop strings, prefix completion (scripted model) --------------------------------------------
def test_thinking_mode_returns_reasoning_content(scripted):
    c = client(scripted, key="unused")  # no key configured: any Authorization header is accepted
    msgs = [{"role": "user", "content": "Hamlet?"}]
    plain = c.chat.completions.create(model="scripted", messages=msgs, temperature=0)
    assert plain.choices[0].message.content == " or not" and plain.choices[0].finish_reason == "stop"
    for kw in ({"model": "scripted-thinking"}, {"model": "scripted", "extra_body": {"thinking": {"type": "enabled"}}}):
        r = c.chat.completions.create(messages=msgs, temperature=0, **kw)
        msg = r.model_dump()["choices"][0]["message"]
        assert msg["reasoning_content"] == " to be" and msg["content"] == " or not"
        assert r.choices[0].finish_reason == "stop" and r.model == kw["model"]
        chunks = list(c.chat.completions.create(messages=msgs, temperature=0, stream=True, **kw))
        deltas = [ch.model_dump()["choices"][0]["delta"] for ch in chunks if ch.choices]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == " to be"
        assert "".join(d.get("content") or "" for d in deltas) == " or not"
        # reasoning comes first, the answer after
        last_r = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
        first_c = min(i for i, d in enumerate(deltas) if d.get("content"))
        assert last_r < first_c


def test_reasoning_accepted_on_input_and_dropped_from_history(scripted):
    c = client(scripted)
    base = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}]
    usage = []
    for field in (None, "reasoning_content", "reasoning"):
        msgs = [dict(m) for m in base]
        if field:
            msgs[1][field] = "long earlier thoughts"
        r = c.chat.completions.create(model="scripted-thinking", messages=msgs, temperature=0)
        usage.append(r.usage.prompt_tokens)
        assert r.model_dump()["choices"][0]["message"]["reasoning_content"] == " to be"
    assert usage[0] == usage[1] == usage[2]  # earlier turns drop their reasoning


def test_chat_prefix_completion(scripted):
    c = client(scripted)
    msgs = [{"role": "user", "content": "Hamlet?"}, {"role": "assistant", "content": " to", "prefix": True}]
    r = c.chat.completions.create(model="scripted", messages=msgs, temperature=0)
    # continued from " to" (the script goes on " be</think> or not"), not answered afresh (" or not")
    assert r.choices[0].message.content == " be</think> or not"
    with pytest.raises(openai.BadRequestError, match="prefix"):
        c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x", "prefix": True}])


def test_stop_strings_and_stop_token_ids(scripted):
    c = client(scripted)
    tok = scripted.state.tokenizer
    think = [tok.bos_id, tok.think_id]
    r = c.completions.create(model="scripted", prompt=think, temperature=0, max_tokens=20)
    assert r.choices[0].text == " to be</think> or not" and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="scripted", prompt=think, temperature=0, max_tokens=20, stop=[" or", "zzz"])
    assert r.choices[0].text == " to be</think>" and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="scripted", prompt=think, temperature=0, max_tokens=20,
                             extra_body={"stop_token_ids": [tok.end_think_id]})
    assert r.choices[0].text == " to be" and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="scripted", prompt=think, temperature=0, max_tokens=2)
    assert r.choices[0].text == " to be" and r.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(model="scripted", prompt=think, temperature=0, max_tokens=20, stop=" or",
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == " to be</think>"


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_errors_have_openai_shape_and_status(server):
    good = client(server)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key="wrong").chat.completions.create(model="nanoseek-tiny", messages=msgs)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(server.url + "/tokenizer_info").status_code == 200  # open, as in vLLM (lm-eval probes it)
    assert httpx.get(server.url + "/openapi.json").status_code == 401  # the schema behind the key, no docs pages
    assert httpx.get(server.url + "/docs").status_code == httpx.get(server.url + "/redoc").status_code == 404
    with pytest.raises(openai.NotFoundError) as e:
        good.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["type"] == "not_found_error" and e.value.body["param"] == "model"
    bad = [dict(temperature=3), dict(n=0), dict(top_logprobs=2), dict(max_tokens=-1), dict(messages=[]),
           dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
           dict(messages=[{"role": "wizard", "content": "x"}]), dict(max_tokens=10_000),
           dict(messages=[{"role": "user", "content": "word " * 400}]),  # longer than the 256-token context
           dict(extra_body={"stop_token_ids": [10 ** 6]})]
    for kw in bad:
        kw = {"model": "nanoseek-tiny", "messages": msgs, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            good.chat.completions.create(**kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError, match="context length"):
        good.completions.create(model="nanoseek-tiny", prompt=[5] * 300, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        good.completions.create(model="nanoseek-tiny", prompt=[5, 99_999], max_tokens=1)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", ', headers=h)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/completions", content=b'[1, 2]', headers=h)
    assert r.status_code == 400
    r = httpx.get(server.url + "/v2/nothing", headers=h)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # JSON types as declared, never coerced: strings or booleans for numbers and flags, booleans for token ids
    lax = [("/v1/chat/completions", {"messages": msgs, "stream": "yes"}, "stream"),
           ("/v1/chat/completions", {"messages": msgs, "max_tokens": "5"}, "max_tokens"),
           ("/v1/chat/completions", {"messages": msgs, "max_tokens": True}, "max_tokens"),
           ("/v1/completions", {"prompt": [True, False], "max_tokens": 1}, "prompt"),
           ("/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": False}, "logprobs"),
           ("/detokenize", {"tokens": [False]}, "tokens")]
    for path, body, field in lax:
        r = httpx.post(server.url + path, json={"model": "nanoseek-tiny", **body}, headers=h)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (path, body, r.text)
    r = httpx.post(server.url + "/v1/chat/completions", headers=h,  # an int where a float is declared is fine
                   json={"model": "nanoseek-tiny", "messages": msgs, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    # the server is still healthy after all of that
    assert httpx.get(server.url + "/health").status_code == 200


def test_unimplemented_fields_are_refused_by_name_and_the_allow_list_is_ignored(server):
    """No silent drops: a field the server does not implement is OpenAI's 400 naming it, at the top level and in a
    message; protocol.IGNORED_FIELDS (and the output-only fields a client echoes back in messages) pass."""
    c = client(server)
    msgs = [{"role": "user", "content": "hi"}]
    for kw in (dict(functions=[{"name": "f", "parameters": {}}]), dict(best_of=2), dict(frobnicate=1),
               dict(messages=[{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}])):
        body = {"model": "nanoseek-tiny", "messages": msgs, "max_tokens": 1, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**{k: v for k, v in body.items() if k in ("model", "messages", "max_tokens")},
                                      extra_body={k: v for k, v in kw.items() if k != "messages"})
        if "messages" not in kw:
            name = next(iter(kw))
            assert e.value.body["code"] == "unknown_parameter" and e.value.body["param"] == name
            assert f"Unrecognized request argument supplied: {name}" in e.value.body["message"]
        h = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter", r.text
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "x", "max_tokens": 1, "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    ok = c.chat.completions.create(
        model="nanoseek-tiny", max_tokens=2, user="u-1", metadata={"team": "a"}, store=False,
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "yo", "refusal": None, "annotations": [], "audio": None},
                  {"role": "user", "content": "and?"}],
        extra_body={"service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s"})
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_logit_bias(server):
    c = client(server)
    tokenize = lambda text: httpx.post(server.url + "/tokenize",  # noqa: E731
                                       json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    a, b = tokenize("e")[0], tokenize("q")[0]
    kw = dict(model="nanoseek-tiny", prompt="Good morrow", max_tokens=4, temperature=0)
    assert c.completions.create(logit_bias={str(a): 100}, **kw).choices[0].text == "eeee"
    assert c.completions.create(logit_bias={str(a): -100, str(b): 100}, **kw).choices[0].text == "qqqq"
    kw["temperature"] = 1.0  # sampled: the boosted token dominates, the banned one never comes
    assert c.completions.create(logit_bias={str(b): 100}, seed=3, **kw).choices[0].text == "qqqq"
    for bad in ({"x": 1}, {"5": 101}, {str(10 ** 6): 1}):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(logit_bias=bad, **kw)
        assert e.value.body["param"] == "logit_bias"


def test_key_spaces_empty_key_host_header_and_model_path(random_dir):
    """A key's surrounding spaces are dropped; an empty key is refused (never a key a bare 'Bearer' passes); a
    keyless loopback server refuses a Host that is not the loopback (DNS rebinding); /v1/models does not show the
    model's path."""
    with ServerThread(ServeConfig(str(random_dir), api_key=f"  {KEY} ")) as srv:
        srv.wait_ready()
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer"}).status_code == 401
    with pytest.raises(ValueError, match="API key is empty"):
        ServerThread(ServeConfig(str(random_dir), api_key=" "))
    r = subprocess.run([sys.executable, "-m", "nanoseek", "serve", str(random_dir)], capture_output=True, text=True,
                       env={**os.environ, "NANOSEEK_API_KEY": ""}, timeout=120)
    assert r.returncode == 2 and "API key (--api-key or NANOSEEK_API_KEY) is empty" in r.stderr, r.stderr
    with ServerThread(ServeConfig(str(random_dir), trusted_hosts=["127.0.0.1", "localhost"])) as srv:
        srv.wait_ready()
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 200 and str(random_dir) not in r.text
        assert {m["root"] for m in r.json()["data"]} == {"nanoseek-tiny"}
        assert httpx.get(srv.url + "/v1/models", headers={"Host": "attacker.example"}).status_code == 400
        port = srv.url.rsplit(":", 1)[1]
        assert httpx.get(srv.url + "/health", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_queue_full_is_429_and_disconnects_free_blocks(scripted):
    """max_batch_size=2, max_waiting=1: two streams run, one waits, the next request is refused with 429.
    Dropping the connections aborts all three requests and frees every block."""
    wait_idle(scripted)
    body = {"model": "scripted", "prompt": [5, 6, 7], "max_tokens": scripted.state.max_model_len - 3,
            "ignore_eos": True, "stream": True, "temperature": 0}
    clients = [httpx.Client(base_url=scripted.url, timeout=60) for _ in range(3)]
    held = []  # the open stream contexts (dropping one would close its connection)

    def open_stream(cl):
        cm = cl.stream("POST", "/v1/completions", json=body)
        held.append(cm)
        try:
            cm.__enter__()
        except httpx.TransportError:  # the waiting one: its connection is dropped before it gets an answer
            pass

    def wait_for(running, waiting):
        t_end = time.monotonic() + 20
        while (s := scripted.state.engine.stats())["running"] != running or s["waiting"] != waiting:
            assert time.monotonic() < t_end, s
            time.sleep(0.005)

    try:
        for k, cl in enumerate(clients):  # one at a time: the waiting queue holds requests not yet admitted
            threading.Thread(target=open_stream, args=(cl,), daemon=True).start()
            wait_for(min(k + 1, 2), max(0, k - 1))
        r = httpx.post(scripted.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and "retry-after" in r.headers
        assert used_blocks(scripted) > 0
    finally:
        for cl in clients:
            cl.close()  # drops the connections: two streams and the waiting request's pending response
    wait_idle(scripted)


def test_client_disconnect_mid_stream_frees_blocks(server):
    wait_idle(server)
    before = server.state.engine.stats()["generation_tokens"]
    aborted = 'nanoseek_request_success_total{finish_reason="abort"}'
    aborts = metric(server, aborted)
    body = {"model": "nanoseek-tiny", "prompt": "A long tale", "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as cl:
        with cl.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
            assert got and used_blocks(server) > 0
    wait_idle(server)  # freed right after the disconnect
    assert server.state.engine.stats()["generation_tokens"] - before < 200  # aborted, not run to the end
    assert metric(server, aborted) == aborts + 1


def test_non_streaming_disconnect_aborts(server, monkeypatch):
    wait_idle(server)
    engine = server.state.engine
    step = engine.step

    def slow_step():  # 200 tokens take at least a second, whatever the speed of this machine's decode
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = engine.stats()["generation_tokens"]
    body = {"model": "nanoseek-tiny", "prompt": "Another long tale", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(60, read=0.3))
    wait_idle(server)
    assert engine.stats()["generation_tokens"] - before < 200


# ---- concurrency -----------------------------------------------------------------------------------------------------
def test_16_concurrent_greedy_streams_match_solo_runs(server):
    prompts = [f"Scene {i}: enter the {w}" for i, w in enumerate(
        "king queen ghost fool nurse friar duke page clown witch lord lady soldier sailor porter herald".split())]
    kw = dict(model="nanoseek-tiny", max_tokens=16, temperature=0)
    c = client(server)
    solo = [c.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], server.state.engine.stats()["running"])
            time.sleep(0.002)

    async def one(ac, p):
        stream = await ac.completions.create(prompt=p, stream=True, **kw)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def together():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        async with ac:
            return await asyncio.gather(*(one(ac, p) for p in prompts))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        concurrent = asyncio.run(together())
    finally:
        stop.set()
        watcher.join()
    assert concurrent == solo
    assert peak[0] > 1  # they really ran in one batch


def test_metrics_prometheus_text(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("nanoseek_http_requests_total", "nanoseek_prompt_tokens_total", "nanoseek_generation_tokens_total",
                 "nanoseek_time_to_first_token_seconds_bucket", "nanoseek_inter_token_latency_seconds_count",
                 "nanoseek_num_requests_running", "nanoseek_num_requests_waiting", "nanoseek_kv_cache_usage_ratio"):
        assert name in text, name
    gen = next(ln for ln in text.splitlines() if ln.startswith("nanoseek_generation_tokens_total"))
    assert float(gen.split()[1]) > 0
    for ln in text.splitlines():  # every sample line is `name{labels} value`
        if ln and not ln.startswith("#"):
            float(ln.rsplit(" ", 1)[1])


# ---- loading failures, CLI, Ctrl-C, speculative decoding ------------------------------------------------------------
def test_failed_load_keeps_serving_503(tmp_path, random_dir):
    bad = tmp_path / "broken"
    bad.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((random_dir / f).read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with ServerThread(ServeConfig(str(bad))) as srv:
        t_end = time.monotonic() + 30
        while srv.state.load_error is None:
            assert time.monotonic() < t_end
            time.sleep(0.02)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(model_dir, *args: str, stderr=subprocess.STDOUT):
    """`nanoseek serve model_dir *args` in a subprocess on a free loopback port, without a key, once /health
    answers: yields (process, base url); killed on the way out if it is still running."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1"}.items()
                                 if k != "NANOSEEK_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < t_end, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_speculative_greedy_identical_and_ctrl_c(server, random_dir):
    """`nanoseek serve --speculative mtp` in a subprocess: same greedy text as plain decoding, acceptance rate
    in /metrics, and SIGINT (Ctrl-C) ends it cleanly with status 0. Bound to the loopback without a key, it
    refuses a foreign Host header."""
    with serve_process(random_dir, "--speculative", "mtp", "--num-draft", "2", "--max-model-len", "256") as (proc, url):
        assert httpx.get(url + "/health", headers={"Host": "rebound.example"}).status_code == 400
        kw = dict(model="nanoseek-tiny", prompt="My kingdom for", max_tokens=20, temperature=0)
        spec = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(**kw)
        plain = client(server).completions.create(**kw)
        assert spec.choices[0].text == plain.choices[0].text
        metrics = httpx.get(url + "/metrics").text
        assert "nanoseek_spec_decode_acceptance_rate" in metrics
        # Ctrl-C while a long stream is open: the server still exits promptly and cleanly
        with httpx.stream("POST", url + "/v1/completions", json={**kw, "max_tokens": 200, "ignore_eos": True,
                                                                 "stream": True}) as r:
            next(r.iter_lines())
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
    out = proc.stdout.read()
    assert "Traceback" not in out, out


# fuzzing the whole OpenAPI schema (schemathesis, stateful, every check): tests/test_server_hardening.py
