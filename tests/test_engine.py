"""Engine tests on tiny random models: paged cache vs full forward, prefix cache, continuous batching, MTP
speculation, sparse vs dense decode, preemption, sampling features, async engine."""
import asyncio

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.engine import AsyncEngine, BlockPool, CacheView, Engine, EngineFull, SamplingParams
from nanoseek.tokenizer import train_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dsa=True, seed=0, **kw):
    cfg = get_preset("tiny", **kw) if dsa else get_preset("tiny", model_type="deepseek_v3", index_topk=0,
                                                           index_n_heads=0, **kw)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def damped_model(seed=0):
    """Residual branches scaled down: the next token depends mostly on the current one, so the (random) MTP
    module agrees with the main model often and speculation gets both accepted and rejected drafts."""
    m = tiny_model(seed=seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.mul_(0.05)
        for mtp in m.mtp:  # MTP input: mostly the next token's embedding
            d = m.config.hidden_size
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :d] = torch.eye(d)
    return m


def prompts(n, lo=5, hi=40, vocab=1024, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def alone(model, prompt, params, **engine_kw):
    return Engine(model, None, cache_bytes=4 << 20, **engine_kw).generate([prompt], params)[0]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = d / "corpus.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. Héllo wörld, 日本語のテキスト! " * 3 + "\n") * 40)
    return train_tokenizer([text], vocab_size=400)


# ---- the paged cache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dsa,kw", [(True, {}), (False, {}), (False, {"q_lora_rank": None})])
def test_paged_decode_matches_full_forward(dsa, kw):
    m = tiny_model(dsa, **kw)
    ids = prompts(1, 60, 61)[0]  # longer than index_topk = 32: DSA decode really selects
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0]
    pool = BlockPool(m.config, m.config.num_hidden_layers, 4, 1 << 20, torch.float32, "cpu")
    table = []
    assert pool.grow(table, len(ids))
    n0 = 20
    with torch.no_grad():  # prefill 20 tokens (naive path), then decode one by one (absorbed path)
        out = m(torch.tensor([ids[:n0]]), cache=CacheView(pool, [table], [0], [n0])).logits[0]
        torch.testing.assert_close(out, ref[:n0], atol=1e-5, rtol=1e-5)
        for i in range(n0, len(ids)):
            out = m(torch.tensor([[ids[i]]]), cache=CacheView(pool, [table], [i], [1])).logits[0, 0]
            torch.testing.assert_close(out, ref[i], atol=1e-5, rtol=1e-5)


def test_ragged_batch_view_matches_each_alone():
    m = tiny_model()
    a, b = prompts(2, 30, 50)
    pool = BlockPool(m.config, m.config.num_hidden_layers, 4, 1 << 20, torch.float32, "cpu")
    ta, tb = [], []
    assert pool.grow(ta, len(a)) and pool.grow(tb, len(b))
    with torch.no_grad():
        m(torch.tensor([a[:-3]]), cache=CacheView(pool, [ta], [0], [len(a) - 3]))
        m(torch.tensor([b[:-1]]), cache=CacheView(pool, [tb], [0], [len(b) - 1]))
        # a feeds 3 tokens, b 1 (padded): one call
        ids = torch.tensor([a[-3:], [b[-1], 0, 0]])
        out = m(ids, cache=CacheView(pool, [ta, tb], [len(a) - 3, len(b) - 1], [3, 1])).logits
        ref_a, ref_b = m(torch.tensor([a])).logits[0], m(torch.tensor([b])).logits[0]
    torch.testing.assert_close(out[0], ref_a[-3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 0], ref_b[-1], atol=1e-5, rtol=1e-5)


def test_sparse_decode_reads_only_topk_rows_and_equals_dense_when_k_covers_context():
    m = tiny_model()
    ids = prompts(1, 50, 51)[0]
    K, L = m.config.index_topk, m.config.num_hidden_layers
    pool = BlockPool(m.config, L, 8, 1 << 20, torch.float32, "cpu")
    table = []
    pool.grow(table, len(ids))
    with torch.no_grad():
        m(torch.tensor([ids[:-1]]), cache=CacheView(pool, [table], [0], [len(ids) - 1]))
        view = CacheView(pool, [table], [len(ids) - 1], [1])
        m(torch.tensor([ids[-1:]]), cache=view)
    assert len(ids) > K and view.rows_read == L * K  # gathered K rows per layer, never the whole context

    big = tiny_model(index_topk=1024)  # same weights (same seed), top-k >= context: sparse must equal dense
    outs = {}
    for mode in ("sparse", "dense"):
        for mod in big.modules():
            if hasattr(mod, "dsa_mode"):
                mod.dsa_mode = mode
        outs[mode] = alone(big, ids, greedy(8, logprobs=3))
    assert outs["sparse"].new_token_ids == outs["dense"].new_token_ids
    for x, y in zip(outs["sparse"].new_logprobs, outs["dense"].new_logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)


def test_pool_accounting_and_prefix_blocks():
    cfg = get_preset("tiny")
    pool = BlockPool(cfg, 3, 4, BlockPool.bytes_per_block(cfg, 3, 4, torch.float32) * 6, torch.float32, "cpu")
    assert pool.num_blocks == 6 and pool.num_free() == 5
    toks = list(range(10))
    t = []
    assert pool.grow(t, 10) and len(t) == 3 and not pool.grow([], 9)  # 2 left, 3 needed: all or nothing
    hashes = []
    pool.register(t, hashes, toks, 10)
    assert len(hashes) == 2  # two full blocks
    pool.release(t)
    assert pool.num_free() == 5
    t2 = []
    cached, h2 = pool.match_prefix(toks + [99], t2)
    assert cached == 8 and h2 == hashes
    t3 = []
    assert pool.match_prefix(toks[:8], t3)[0] == 4  # keeps >= 1 token to compute
    pool.release(t3)
    pool.release(t2)
    big = []
    assert pool.grow(big, 20)  # needs every block: the cached ones are evicted
    assert pool.match_prefix(toks + [99], [])[0] == 0


# ---- engine behaviour --------------------------------------------------------------------------------------
def test_prefix_cache_hit_equals_miss():
    m = tiny_model()
    base = prompts(1, 40, 41)[0]
    p2 = base + [5, 6, 7]
    params = greedy(6, logprobs=2)
    e = Engine(m, None, block_size=4, cache_bytes=4 << 20)
    e.generate([base], params)
    hit = e.generate([p2], params)[0]
    assert e.stats()["prefix_cache_hits"] >= 36
    miss = alone(m, p2, params, block_size=4)
    assert hit.new_token_ids == miss.new_token_ids
    for x, y in zip(hit.new_logprobs, miss.new_logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)


def test_continuous_batching_equals_each_alone():
    m = tiny_model()
    ps = prompts(5)
    maxes = [3, 12, 7, 1, 9]
    e = Engine(m, None, max_batch_size=3, cache_bytes=4 << 20)
    got = {}
    for i in range(2):
        e.add_request(str(i), ps[i], greedy(maxes[i]))
    for _ in range(2):
        for o in e.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    for i in range(2, 5):  # join while others decode; max_batch_size 3 makes some wait
        e.add_request(str(i), ps[i], greedy(maxes[i]))
    while e.has_unfinished():
        for o in e.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    for i in range(5):
        assert got[str(i)] == alone(m, ps[i], greedy(maxes[i])).new_token_ids
        assert len(got[str(i)]) == maxes[i]


@pytest.mark.parametrize("num_draft", [1, 3])
def test_mtp_speculative_equals_plain_greedy(num_draft):
    m = damped_model()
    ps = prompts(3)
    plain = Engine(m, None, cache_bytes=4 << 20).generate(ps, greedy(20))
    e = Engine(m, None, cache_bytes=4 << 20, speculative="mtp", num_draft=num_draft, block_size=4)
    spec = e.generate(ps, greedy(20))
    assert [o.new_token_ids for o in spec] == [o.new_token_ids for o in plain]
    s = e.stats()
    assert 0 < s["spec_accepted"] < s["spec_drafted"]  # both paths exercised
    assert s["forward_calls"] < 3 * 21  # fewer main-model calls than plain decoding


def test_mtp_speculative_sampling_matches_plain_with_seed():
    m = damped_model()
    p = prompts(1)[0]
    params = SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=7, frequency_penalty=0.5)
    plain = alone(m, p, params)
    spec = alone(m, p, params, speculative="mtp", num_draft=2)
    assert spec.new_token_ids == plain.new_token_ids  # one draw per emitted token in both


def test_preemption_under_tiny_cache_completes_correctly():
    m = tiny_model()
    ps = prompts(4, 20, 30)
    per_block = BlockPool.bytes_per_block(m.config, m.config.num_hidden_layers, 4, torch.float32)
    e = Engine(m, None, block_size=4, cache_bytes=per_block * 25, max_batch_size=4)  # 24 blocks = 96 rows
    outs = e.generate(ps, greedy(30))
    assert e.stats()["preemptions"] > 0
    for p, o in zip(ps, outs):
        assert o.finished and o.new_token_ids == alone(m, p, greedy(30)).new_token_ids
    assert e.stats()["free_blocks"] == e.stats()["total_blocks"]


def test_preemption_with_speculation():
    m = damped_model()
    ps = prompts(3, 20, 30)
    per_block = BlockPool.bytes_per_block(m.config, m.config.num_hidden_layers + 1, 4, torch.float32)
    e = Engine(m, None, block_size=4, cache_bytes=per_block * 20, speculative="mtp", num_draft=2)
    outs = e.generate(ps, greedy(24))
    assert e.stats()["preemptions"] > 0
    for p, o in zip(ps, outs):
        assert o.new_token_ids == alone(m, p, greedy(24)).new_token_ids


class _Script:
    """A TokenConstraint that allows one token at each step: the scripted sequence, then anything."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.i, self.seen = list(script), vocab, 0, []

    def allowed(self):
        if self.i >= len(self.script):
            return None
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.script[self.i]] = True
        return mask

    def accept(self, token):
        self.seen.append(token)
        self.i += 1


@pytest.mark.parametrize("spec", [False, True])
def test_constraint_forces_tokens_then_frees_them(spec):
    """Each sequence gets its own constraint state (n choices, speculative drafts, sampling or greedy); after the
    script the request continues as it would unconstrained from there."""
    m = damped_model()
    V = m.config.vocab_size
    p = prompts(1)[0]
    script = [7, 500, 7, 9, 1000]
    states = []

    def make():
        states.append(_Script(script, V))
        return states[-1]

    kw = dict(speculative="mtp", num_draft=2) if spec else {}
    for params in (greedy(12, constraint=make), SamplingParams(max_tokens=12, temperature=1.0, seed=3,
                                                               constraint=make)):
        out = alone(m, p, params, **kw)
        assert out.new_token_ids[:5] == script
        assert states[-1].seen == out.new_token_ids  # told of every emitted token, drafts included once
        free = alone(m, p + script, SamplingParams(**{**vars(params), "constraint": None, "max_tokens": 7}))
        if params.greedy:
            assert out.new_token_ids[5:] == free.new_token_ids
    e = Engine(m, None, cache_bytes=4 << 20, **kw)
    outs = e.generate([p, p], greedy(8, constraint=make))
    assert all(o.new_token_ids[:5] == script for o in outs) and states[-1] is not states[-2]


def test_queue_bound_counts_only_requests_beyond_the_free_batch_slots():
    """Requests submitted between two steps wait in the queue until the step admits them: the bound applies to
    the ones the batch will not take."""
    e = Engine(tiny_model(), None, max_batch_size=4, max_waiting=1, max_model_len=64)
    for i in range(5):  # 4 free slots + 1 queue place
        e.add_request(f"r{i}", [5, 6, i + 7], greedy(3))
    with pytest.raises(EngineFull):
        e.add_request("r5", [5], greedy(2))
    e.step()  # admits 4; one still waits
    with pytest.raises(EngineFull):
        e.add_request("r5", [5], greedy(2))
    while e.has_unfinished():
        e.step()
    e.add_request("r5", [5], greedy(2))  # room again


def test_errors_queue_bound_abort():
    m = tiny_model()
    e = Engine(m, None, cache_bytes=1 << 20, max_batch_size=1, max_waiting=1, max_model_len=64)
    with pytest.raises(ValueError, match="context length"):
        e.add_request("long", list(range(3, 60)), greedy(10))
    with pytest.raises(ValueError, match="empty"):
        e.add_request("empty", [], greedy(10))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="token ids"):
        e.add_request("bad", [5, 99999], greedy(2))
    e.add_request("a", [5, 6, 7], greedy(20))  # takes the batch's free slot at the next step
    e.add_request("b", [5, 6, 8], greedy(20))  # will wait: the queue's one place
    with pytest.raises(EngineFull):
        e.add_request("c", [5], greedy(2))
    e.step()
    assert e.stats()["used_blocks"] > 0
    e.abort("a")
    e.abort("b")
    assert e.stats()["used_blocks"] == 0
    outs = e.step()
    assert {(o.request_id, o.finish_reason) for o in outs} == {("a", "abort"), ("b", "abort")}
    assert not e.has_unfinished()
    o = e.generate([list(range(3, 43))], SamplingParams(max_tokens=None, temperature=0))[0]  # fill the context
    assert len(o.new_token_ids) == 24 and o.finish_reason == "length"


def test_bfloat16_runs():
    m = tiny_model().to(torch.bfloat16)
    outs = Engine(m, None, cache_bytes=1 << 20, speculative="mtp").generate(prompts(2), greedy(5))
    assert [len(o.new_token_ids) for o in outs] == [5, 5]


# ---- sampling ----------------------------------------------------------------------------------------------
def test_seed_reproducible_and_independent_of_batch():
    m = tiny_model()
    p, *others = prompts(3)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=123)
    a = alone(m, p, params).new_token_ids
    batch = Engine(m, None, cache_bytes=4 << 20).generate([others[0], p, others[1]], [
        SamplingParams(max_tokens=5, temperature=1.0), params, SamplingParams(max_tokens=9, temperature=0.7)])
    assert batch[1].new_token_ids == a
    assert alone(m, p, SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=124)).new_token_ids != a


def test_draws_follow_the_distribution_and_never_pick_excluded_tokens():
    from nanoseek.engine.sampling import sample
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0, float("-inf"), 0.0, 2.0, float("-inf"), -1.0])  # tokens 1 and 4 excluded
    p = SamplingParams(temperature=1.0)
    n = 20000
    counts = torch.bincount(torch.tensor([sample(x, p, g) for _ in range(n)]), minlength=6).double()
    want = x.softmax(-1).double()
    assert counts[1] == counts[4] == 0
    # each frequency within 5 standard deviations of its probability
    assert ((counts / n - want).abs() <= 5 * (want * (1 - want) / n).sqrt()).all(), (counts / n, want)
    # all excluded: the most likely token (here the first) instead of an error
    assert sample(torch.full((4,), float("-inf")), p, g) == 0


def test_penalties_and_truncation_on_logits():
    from nanoseek.engine.sampling import TokenHistory, process_logits
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.0])
    h = TokenHistory([0, 2], 5, "cpu")
    h.add(3)
    h.add(3)
    x = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), h, [])
    torch.testing.assert_close(x, torch.tensor([1.0, 1.0, -2.0, 0.25, 0.0]))
    x = process_logits(logits, SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5), h, [4])
    torch.testing.assert_close(x, torch.tensor([2.0, 1.0, -1.0, -1.5, float("-inf")]))
    x = process_logits(logits, SamplingParams(top_k=2), None, [])
    assert torch.isfinite(x).tolist() == [True, True, False, False, False]
    x = process_logits(logits, SamplingParams(top_p=0.6), None, [])  # p(0) = 0.60.. < 0.6? keeps 0 (and 1)
    p0 = logits.softmax(-1)[0].item()
    assert torch.isfinite(x).sum().item() == (1 if p0 >= 0.6 else 2)
    x = process_logits(logits, SamplingParams(min_p=0.3), None, [])
    probs = logits.softmax(-1)
    assert torch.isfinite(x).tolist() == (probs >= 0.3 * probs.max()).tolist()


def test_repetition_penalty_changes_greedy_output():
    m = tiny_model()
    p = prompts(1)[0]
    plain = alone(m, p, greedy(30)).new_token_ids
    pen = alone(m, p, greedy(30, presence_penalty=2.0, repetition_penalty=5.0)).new_token_ids
    assert len(set(pen)) >= len(set(plain)) and pen != plain


def test_stop_token_ids_min_tokens_ignore_eos():
    m = tiny_model()
    p = prompts(1)[0]
    ref = alone(m, p, greedy(10)).new_token_ids
    stop = alone(m, p, greedy(10, stop_token_ids=[ref[2]]))
    assert stop.new_token_ids == ref[:3] and stop.finish_reason == "stop"
    held = alone(m, p, greedy(10, stop_token_ids=[ref[0]], min_tokens=4))
    assert len(held.new_token_ids) >= 4 and ref[0] not in held.new_token_ids[:4]
    e = Engine(m, None, cache_bytes=4 << 20)
    e.eos_id = ref[1]  # pretend the model's second greedy token is EOS
    assert e.generate([p], greedy(10))[0].new_token_ids == ref[:2]
    assert e.generate([p], greedy(10, ignore_eos=True))[0].new_token_ids == ref


def test_logprobs_and_prompt_logprobs_match_full_forward():
    m = tiny_model()
    p = prompts(1)[0]
    o = alone(m, p, greedy(4, logprobs=5, prompt_logprobs=2))
    full = p + o.new_token_ids
    with torch.no_grad():
        lp = m(torch.tensor([full])).logits[0].log_softmax(-1)
    assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
    for t in range(1, len(p)):
        e = o.prompt_logprobs[t]
        assert e.token_id == p[t] and e.logprob == pytest.approx(lp[t - 1, p[t]].item(), abs=1e-5)
        assert len(e.top) == 2
    for i, e in enumerate(o.new_logprobs):
        pos = len(p) - 1 + i
        assert e.logprob == pytest.approx(lp[pos, e.token_id].item(), abs=1e-5)
        assert e.top[0] == (e.token_id, pytest.approx(e.logprob))  # greedy picked the best
        vals = [v for _, v in e.top]
        assert vals == sorted(vals, reverse=True) and sum(torch.tensor(vals).exp()) <= 1 + 1e-6


def test_stop_strings_with_tokenizer(tok):
    m = tiny_model(vocab_size=tok.vocab_size)
    p = tok.encode("The quick brown", add_bos=True)
    e = Engine(m, tok, cache_bytes=4 << 20)
    ref = e.generate([p], greedy(40, skip_special_tokens=False))[0]
    assert ref.new_text == tok.decode(ref.new_token_ids, skip_special_tokens=False)
    text = ref.new_text
    cut = next(i for i in range(3, len(text) - 2) if text[i:i + 2].strip())  # a 2-char stop past the start
    stop = text[cut:cut + 2]
    first = text.find(stop)
    got = e.generate([p], greedy(40, stop=[stop], skip_special_tokens=False))[0]
    assert got.finish_reason == "stop" and got.new_text == text[:first]
    # streaming: concatenated deltas equal the final text, and the stop string never leaks
    e.add_request("s", p, greedy(40, stop=[stop], skip_special_tokens=False))
    pieces = []
    while e.has_unfinished():
        pieces += [o.new_text for o in e.step()]
    assert "".join(pieces) == text[:first]


def test_async_engine_streams_and_cancel_frees_blocks():
    m = tiny_model()
    ps = prompts(2)
    eng = Engine(m, None, cache_bytes=4 << 20)
    a = AsyncEngine(eng)

    async def run():
        toks = []
        async for o in a.generate("x", ps[0], greedy(6)):
            toks += o.new_token_ids
        gen = a.generate("y", ps[1], greedy(500))
        await gen.__anext__()
        await gen.aclose()  # like a client disconnect
        await asyncio.wrap_future(a.abort("nothing"))  # barrier: the abort of y ran before this
        return toks

    try:
        toks = asyncio.run(run())
        assert toks == alone(m, ps[0], greedy(6)).new_token_ids
        assert a.stats()["used_blocks"] == 0
    finally:
        a.shutdown()


def test_cli_generate_and_chat(tok, tmp_path, capsys, monkeypatch):
    from nanoseek import save_pretrained
    from nanoseek.generate import cli
    m = tiny_model(vocab_size=tok.vocab_size)
    save_pretrained(m, tmp_path)
    tok.save(tmp_path)
    assert cli("generate", [str(tmp_path), "The quick", "--max-tokens", "5", "--speculative", "mtp"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The quick") and "5 tokens" in out.err
    lines = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert cli("chat", [str(tmp_path), "--max-tokens", "4", "--thinking", "--seed", "1"]) == 0
    assert capsys.readouterr().err.count("tokens,") == 2
    assert cli("generate", [str(tmp_path / "missing"), "x"]) == 2


def test_async_engine_concurrent_streams_equal_alone():
    m = tiny_model()
    ps = prompts(4)
    a = AsyncEngine(Engine(m, None, cache_bytes=4 << 20))

    async def one(i):
        toks = []
        async for o in a.generate(f"r{i}", ps[i], greedy(5 + i)):
            toks += o.new_token_ids
        return toks

    async def run():
        return await asyncio.gather(*(one(i) for i in range(4)))

    try:
        got = asyncio.run(run())
    finally:
        a.shutdown()
    assert got == [alone(m, ps[i], greedy(5 + i)).new_token_ids for i in range(4)]
