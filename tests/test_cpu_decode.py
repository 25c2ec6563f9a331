"""The fused CPU decode kernels (`nanoseek/kernels/cpu_decode.c`, bf16 and float32 builds) against the PyTorch
reference paths they replace: each kernel alone, then whole decode steps of a model (dense and DSA-sparse
attention, MoE blocks with and without a shared expert and the dense block, one and several requests, several
tokens per request as in MTP verification) with the kernels on and off, on modules that `kernels.install` made
fast (with the kernels off they run the reference paths).

bf16 results can differ from the reference by the order of fp32 sums, i.e. by an ulp of a bf16 output, and such
differences grow through layers; the tolerances say so (float32 ones are 1e-5). Every test runs once per kernel
variant of this architecture (`variant` below), skipped for those this CPU does not run, and all are skipped where
the kernels are unavailable (no vector ISA of isa.py, or no C compiler). The C structs' layouts against their
ctypes mirrors: `test_abi_*`.
"""
import contextlib
import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.config import get_preset
from nanoseek.engine.cache import BlockPool, CacheView
from nanoseek.kernels import abi, build, cpu_decode, cpu_quant, install, isa
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.stats import LayerStats

pytestmark = pytest.mark.skipif(cpu_decode.library() is None, reason="CPU decode kernels unavailable here")
BF = torch.bfloat16
DTYPES = [BF, pytest.param(torch.float32, marks=pytest.mark.skipif(
    cpu_decode.library(torch.float32) is None, reason="float32 kernels unavailable here"))]

VARIANTS = [v for v in cpu_decode.VARIANTS[BF] if isa.VARIANTS[v][0] == isa.arch()]


@pytest.fixture(autouse=True, params=VARIANTS)
def variant(request, monkeypatch):
    """Each test on the kernels of one variant: NANOSEEK_KERNEL_ISA caps the choice at it, and the libraries are
    chosen again (the float32 build's variant where that build has no `variant` of its own)."""
    v = request.param
    if not isa.runs(v):
        pytest.skip(f"this CPU does not run {v} code")
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0" or build.compiler() is None:
        pytest.skip("no kernels are built here (NANOSEEK_CPU_KERNELS=0, or no C compiler)")
    dt = getattr(request.node, "callspec", None) and request.node.callspec.params.get("dt")
    if dt is torch.float32 and v not in cpu_decode.VARIANTS[dt]:
        pytest.skip(f"the float32 build has no {v} variant: its test with the next variant down covers it")
    monkeypatch.setenv("NANOSEEK_KERNEL_ISA", v)
    cpu_decode.reset()
    cpu_quant.reset()  # (a quantized model's per-op path: its variant follows the cap too)
    assert cpu_decode.variant(BF) == v, f"the {v} kernels were not built"
    cpu_decode.library(torch.float32)  # (loaded, as at import: the kernel wrappers read the loaded libraries)
    yield v
    cpu_decode.reset()
    cpu_quant.reset()


@contextlib.contextmanager
def kernels(on: bool):
    prev = cpu_decode.set_enabled(on)
    try:
        yield
    finally:
        cpu_decode.set_enabled(prev)


def both(fn):
    """fn() with the kernels on, then off (the PyTorch reference)."""
    with torch.no_grad():
        with kernels(True):
            a = fn()
        with kernels(False):
            b = fn()
    return a, b


def close(a, b, rel=2 ** -7):
    """Within a bf16 ulp or two of the reference's scale (float32: 1e-5 of it)."""
    if a.dtype == torch.float32:
        rel = 1e-5 / 2
    a, b = a.float(), b.float()
    assert (a - b).abs().max() <= rel * 2 * b.abs().max() + 1e-6, (a - b).abs().max()


def test_usable_only_for_few_rows_without_grad():
    w = torch.randn(8, 64, dtype=BF)
    assert cpu_decode.usable(torch.randn(1, 64, dtype=BF), w)
    assert cpu_decode.usable(torch.randn(1, 64), w.float()) == (cpu_decode.library(torch.float32) is not None)
    assert not cpu_decode.usable(torch.randn(1, 64), w)  # a weight of another dtype
    assert not cpu_decode.usable(torch.randn(1, 64, dtype=torch.float16), w.half())  # no build for it
    assert not cpu_decode.usable(torch.randn(cpu_decode.MAX_ROWS + 1, 64, dtype=BF), w)  # prefill-sized
    assert not cpu_decode.usable(torch.randn(1, 64, dtype=BF), w.t())  # strided weight
    assert not cpu_decode.usable(torch.randn(1, 64, dtype=BF), w.requires_grad_())  # autograd needs the graph
    with kernels(False):
        assert not cpu_decode.usable(torch.randn(1, 64, dtype=BF), torch.randn(8, 64, dtype=BF))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("M,D,O", [(1, 384, 512), (3, 100, 77), (16, 64, 1024), (2, 33, 5)])
def test_linear(M, D, O, dt):
    x, w = torch.randn(M, D, dtype=dt), torch.randn(O, D, dtype=dt)
    y = cpu_decode.linear(x, w)
    assert y.shape == (M, O) and y.dtype == dt
    close(y, F.linear(x.float(), w.float()).to(dt))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("D", [1012, 100, 7])  # whole vector steps, a half step and a scalar tail; scalar only
def test_rows_are_computed_alone(D, dt):
    """Rows share each weight load four at a time (then three, two, one): every row still gets the bits it
    gets alone, so a request's logits do not depend on the size of its batch."""
    x, w = torch.randn(11, D, dtype=dt), torch.randn(37, D, dtype=dt)
    batched = cpu_decode.linear(x, w)
    alone = torch.cat([cpu_decode.linear(x[m:m + 1], w) for m in range(11)])
    assert torch.equal(batched, alone)
    for n in (2, 3, 5):
        assert torch.equal(cpu_decode.linear(x[:n], w), batched[:n])


@pytest.mark.parametrize("dt", DTYPES)
def test_rms_norm(dt):
    norm = install(RMSNorm(40)).to(dt)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    x = torch.randn(2, 3, 40, dtype=dt) * 3
    a, b = both(lambda: norm(x))
    close(a, b)


def randomize(module, std=0.2, dt=BF):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(1 if "norm" in name else 0, std)
    return install(module.to(dt).eval())  # the fast modules, whose paths the kernels take


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "index_topk": 0, "index_n_heads": 0}])
def test_mla_projections(kw, dt):
    cfg = get_preset("tiny", **kw)
    attn = randomize(MLA(cfg, 0), dt=dt)
    rope = RotaryEmbedding(cfg)(torch.tensor([[5, 6, 7], [100, 200, 300]]))
    x = torch.randn(2, 3, cfg.hidden_size, dtype=dt)
    norm = randomize(RMSNorm(cfg.hidden_size), dt=dt)
    a, b = both(lambda: attn._project_rotated(x, rope, norm))
    for u, v in zip(a, b):  # the normed x, q (rotated), c_q, the cache rows, the indexer's key
        assert (u is None) == (v is None)
        if u is not None:
            assert u.shape == v.shape
            close(u, v)


@pytest.mark.parametrize("kw", [
    {},  # sigmoid + noaux_tc with groups and a balancing bias (V3), one shared expert
    {"scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False,
     "n_shared_experts": 0},
])
@pytest.mark.parametrize("shape", [(2, 3), (1, 1)])  # (1, 1): 4 + 1 experts, the last one split over 2 threads
@pytest.mark.parametrize("dt", DTYPES)
def test_moe_block(kw, shape, dt):
    """A block's feed-forward half (norm, router, routed and shared experts, residual) in one call."""
    cfg = get_preset("tiny", **{"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
                                **kw})
    moe = install(MoE(cfg))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    moe, norm = moe.to(dt).eval(), randomize(RMSNorm(cfg.hidden_size), dt=dt)
    h = torch.randn(*shape, cfg.hidden_size, dtype=dt)
    sa, sb = LayerStats(), LayerStats()
    with torch.no_grad(), kernels(True):
        a = moe.fused_block(h, norm, sa)
        ids_a = sa.expert_ids[0].sort(-1).values
    with torch.no_grad(), kernels(False):
        assert moe.fused_block(h, norm) is None
        b = h + moe(norm(h), sb)  # the per-op PyTorch path
        ids_b = sb.expert_ids[0].sort(-1).values
    assert torch.equal(ids_a, ids_b)  # the same experts
    close(a, b, rel=2 ** -6)
    moe.experts.impl = "loop"
    with torch.no_grad(), kernels(False):
        close(a, h + moe(norm(h)), rel=2 ** -6)  # the per-expert reference


@pytest.mark.parametrize("dt", DTYPES)
def test_dense_block(dt):
    mlp, norm = randomize(MLP(64, 96), dt=dt), randomize(RMSNorm(64), dt=dt)
    h = torch.randn(5, 1, 64, dtype=dt)
    with torch.no_grad(), kernels(True):
        a = mlp.fused_block(h, norm)
    with torch.no_grad(), kernels(False):
        b = h + mlp(norm(h))
    assert a.shape == h.shape
    close(a, b)


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("S", [21, 4000])  # 4000 rows are past NS_ROWS_SPLIT: the scores split by rows
@pytest.mark.parametrize("dt", DTYPES)
def test_absorbed_attention(per_query, S, dt):
    cfg = get_preset("tiny")
    attn = install(MLA(cfg, 0))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    attn = attn.to(dt).eval()
    B, T, C = 2, 3, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert S * C * 2 > 256 << 10 or S < 100
    q = torch.randn(B, T, cfg.num_attention_heads, cfg.qk_head_dim, dtype=dt)
    rows = torch.randn(B, T, S, C, dtype=dt) if per_query else torch.randn(B, S, C, dtype=dt)
    mask = torch.rand(B, T, S) < 0.7
    mask[..., 0] = True
    a, b = both(lambda: attn._absorbed_out(q, rows, mask))  # attention and o_proj
    assert a.shape == (B, T, cfg.hidden_size)
    close(a, b, rel=2 ** -6)


def test_dsa_selection_matches_the_indexer():
    """DSA's selection in the kernel (decode, bf16) against `Indexer.scores` + `select`: the scores agree to a
    bf16 ulp or two (fp32 sums in another order), -inf exactly where masked; each query's K positions are
    distinct, increasing, and a top-K of the reference scores up to those ulps (a near-tie may pick either row);
    a query that sees fewer than K rows gets all of them plus masked ones; the rows are those positions' rows;
    rows tied at the K-th score go to the earliest positions."""
    from nanoseek.model.dsa import Indexer
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    idx = Indexer(cfg)
    with torch.no_grad():
        for p in idx.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    idx = idx.to(BF)
    B, T, S, K = 2, 3, 70, idx.topk
    C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cq, xn = torch.randn(B, T, cfg.q_lora_rank, dtype=BF), torch.randn(B, T, cfg.hidden_size, dtype=BF)
    keys, rows = torch.randn(B, S, idx.head_dim, dtype=BF), torch.randn(B, S, C, dtype=BF)
    pos = torch.tensor([[S - 3, S - 2, S - 1], [17, 18, 19]])  # request 1 sees 18-20 rows (< K)
    mask = torch.arange(S)[None, None] <= pos[..., None]
    rope = RotaryEmbedding(cfg)(pos)
    with torch.no_grad():
        ref = idx.scores(xn, cq, keys, rope, mask)
    got, chosen, sel_mask, sel = cpu_decode.dsa_select(idx, cq, xn, keys, rows, mask, rope.cos, rope.sin)
    assert torch.equal(torch.isinf(got), ~mask) and torch.equal(torch.isinf(ref), ~mask)
    assert ((got - ref).abs()[mask] <= 2 ** -6 * ref.abs()[mask] + 1e-3).all()
    assert chosen.shape == (B, T, K) and (chosen.diff(dim=-1) > 0).all()
    kth = ref.topk(K, dim=-1).values[..., -1:]
    picked = torch.gather(ref, -1, chosen)
    assert (picked >= kth - (2 ** -6 * kth.abs() + 1e-3)).all()
    assert torch.equal(sel_mask, torch.gather(mask, -1, chosen))
    assert torch.equal(sel_mask[1].sum(-1), mask[1].sum(-1))  # all of its visible rows
    assert torch.equal(sel, torch.stack([rows[b][chosen[b]] for b in range(B)]))
    same = keys[:, :1].expand(B, S, -1).contiguous()  # every row scores alike: ties go to the earliest positions
    first = cpu_decode.dsa_select(idx, cq, xn, same, rows, mask, rope.cos, rope.sin)[1]
    assert torch.equal(first[0], torch.arange(K).expand(T, K))


@contextlib.contextmanager
def counting(kernel: str, dt=BF):
    """Counts the calls of one C kernel, whichever path makes them."""
    lib = cpu_decode.library(dt)
    real, calls = getattr(lib, kernel), {"n": 0}

    def count(*a):
        calls["n"] += 1
        return real(*a)

    setattr(lib, kernel, count)
    try:
        yield calls
    finally:
        setattr(lib, kernel, real)


def kernel_model(dt=BF, **kw):
    torch.manual_seed(0)
    m = nanoseek.Transformer(get_preset("tiny", **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return install(m.to(dt))


def decode(m, ids, n0, feeds, on, expert_ids=None):
    """Prefill ids[:, :n0] (PyTorch path), then decode calls where request b feeds feeds[c][b] tokens at call c
    (fewer than the longest are padded). Returns the logits of the real tokens, per request; the last call's
    expert ids (per MoE layer) go to the list `expert_ids` when given."""
    cfg = m.config
    B, L = ids.shape
    pool = BlockPool(cfg, cfg.num_hidden_layers, 8, 1 << 22, m.embed_tokens.weight.dtype, "cpu")
    tables = [[] for _ in range(B)]
    for t in tables:
        assert pool.grow(t, L)
    outs = [[] for _ in range(B)]
    with torch.no_grad(), kernels(on):
        m(ids[:, :n0], cache=CacheView(pool, tables, [0] * B, [n0] * B))
        n = [n0] * B
        for k in feeds:
            T = max(k)
            feed = torch.stack([F.pad(ids[b, n[b]:n[b] + k[b]], (0, T - k[b])) for b in range(B)])
            res = m(feed, cache=CacheView(pool, tables, n, k))
            out = res.logits.float()
            if expert_ids is not None:
                expert_ids[:] = res.stats.expert_ids
            for b in range(B):
                outs[b].append(out[b, :k[b]])
                n[b] += k[b]
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "index_topk": 0, "index_n_heads": 0},
                                {"n_shared_experts": 0, "scoring_func": "softmax", "topk_method": "greedy"}])
def test_decode_steps_match_reference(kw, dt, monkeypatch):
    """Decode one request token by token past DSA's top-k (32), so the sparse path gathers: kernels on vs off."""
    earliest_on_ties(monkeypatch)
    m = kernel_model(dt, **kw)
    ids = torch.randint(0, m.config.vocab_size, (1, 52))
    L = m.config.num_hidden_layers
    with counting("ns_mla_absorbed", dt) as calls, counting("ns_decode_stack", dt) as stacks:
        (a,) = decode(m, ids, 40, [[1]] * 12, True)
    assert calls["n"] + L * stacks["n"] == 12 * L  # the kernels really ran, block by block or all in one call
    (b,) = decode(m, ids, 40, [[1]] * 12, False)
    assert_steps_close(a, b)


def earliest_on_ties(monkeypatch):
    """The reference's DSA selection with the kernel's tie rule: rows tied at the K-th score go to the earliest
    positions (torch.topk leaves ties unspecified, and bf16 scores tie often)."""
    from nanoseek.model.dsa import Indexer

    def select(self, scores):
        return scores.sort(dim=-1, descending=True, stable=True).indices[..., :min(self.topk, scores.shape[-1])]

    monkeypatch.setattr(Indexer, "select", select)


def assert_steps_close(a, b):
    """Decode logits [steps, V] of the kernels (a) and the reference (b): within bf16 roundings at every step, and
    the same greedy tokens."""
    assert ((a - b).abs().amax(-1) <= 0.02 * b.abs().amax(-1)).all()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_ragged_multi_token_calls_equal_each_request_alone():
    """Two requests in one call, one feeding 1 token (padded) and the other 3 (MTP verification): the kernels
    compute every row on its own, so the batch gives each request's results alone, token by token. (DSA top-k
    covers the context here: the PyTorch indexer scores 1 and 3 queries with different GEMMs, whose bf16
    roundings can flip a near-tie in the selection.)"""
    m = kernel_model(index_topk=64)
    ids = torch.randint(0, m.config.vocab_size, (2, 52))
    ragged = decode(m, ids, 40, [[1, 3]] * 4, True)
    alone0 = decode(m, ids[:1], 40, [[1]] * 4, True)[0]
    alone1 = decode(m, ids[1:], 40, [[1]] * 12, True)[0]
    torch.testing.assert_close(ragged[0], alone0, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ragged[1], alone1, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", [{"index_topk": 0, "index_n_heads": 0}, {"index_topk": 16}])
def test_engine_batch_and_speculation_invariant(kw, dt):
    """With the kernels every row of a decode call is computed on its own, DSA's selection past top-k (16)
    included, so a request's greedy tokens do not depend on what it is batched with, nor on MTP verification
    feeding several tokens at once."""
    from nanoseek.engine import Engine, SamplingParams
    m = kernel_model(dt, **kw)
    prompts = [torch.randint(3, m.config.vocab_size, (n,)).tolist() for n in (5, 40, 70)]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    batched = [o.new_token_ids for o in Engine(m, None).generate(prompts, sp)]
    alone = [Engine(m, None, max_batch_size=1).generate([p], sp)[0].new_token_ids for p in prompts]
    spec = [o.new_token_ids for o in Engine(m, None, speculative="mtp", num_draft=2).generate(prompts, sp)]
    assert batched == alone == spec


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "index_topk": 0, "index_n_heads": 0},
                                {"n_shared_experts": 0, "scoring_func": "softmax", "topk_method": "greedy"}])
def test_decode_plan_equals_block_by_block(kw, dt, monkeypatch):
    """The whole-stack plan (`decode_plan.py`) runs the kernels the blocks run one by one, and the cache's writes
    and reads itself: identical logits and expert ids, for one request (contiguous rows), a ragged batch (1 and 3
    tokens, rows gathered by slot) and the DenseCache. After a weight changes in place, or a block goes, it
    rebuilds, matching the reference again. Past DSA's top-k (32) it selects the rows in the kernel: close to the
    blocks, which select in PyTorch (with the kernel's tie rule)."""
    from nanoseek.kernels import decode_plan
    m = kernel_model(dt, **kw)
    L = m.config.num_hidden_layers
    ids = torch.randint(0, m.config.vocab_size, (2, 52))
    real_run, runs = decode_plan.run, {"n": 0}

    def plan_run(*a):
        y = real_run(*a)
        runs["n"] += y is not None
        return y

    def both_paths(ids, feeds):
        n_moe = sum(isinstance(b.mlp, MoE) for b in m.layers)
        monkeypatch.setattr(decode_plan, "run", plan_run)
        planned_ids, reference_ids = [], []
        with counting("ns_mla_absorbed", dt) as calls, counting("ns_decode_stack", dt) as stacks:
            planned = decode(m, ids, 20, feeds, True, planned_ids)
        assert calls["n"] == 0 and stacks["n"] == len(feeds)  # one call per step runs all the blocks
        monkeypatch.setattr(decode_plan, "run", lambda *a: None)
        reference = decode(m, ids, 20, feeds, True, reference_ids)
        assert all(torch.equal(a, b) for a, b in zip(planned, reference))
        assert len(planned_ids) == len(reference_ids) == n_moe
        assert all(torch.equal(a, b) for a, b in zip(planned_ids, reference_ids))

    both_paths(ids[:1], [[1]] * 6)
    assert runs["n"] == 6
    both_paths(ids, [[1, 3]] * 3)
    assert runs["n"] == 9
    with torch.no_grad():  # in place, as training or a weight load would: the plan reads the new values (a
        m.layers[1].self_attn.kv_a_proj_with_mqa.weight.mul_(-1)  # bf16 router's fp32 copy is rebuilt)
        m.layers[1].mlp.gate.weight.mul_(-1)
    both_paths(ids[:1], [[1]] * 4)
    assert runs["n"] == 13
    def dense_cache_steps():  # the model-level DenseCache (generate, benches): batch rows at slot b * max_len + p
        cache = nanoseek.DenseCache(m.config, 2, 32, dt)
        with torch.no_grad(), kernels(True):
            m(ids[:, :20], cache=cache.step(20))
            return [m(ids[:, 20 + i:21 + i], cache=cache.step(1)).logits for i in range(4)]

    monkeypatch.setattr(decode_plan, "run", plan_run)
    planned = dense_cache_steps()
    assert runs["n"] == 17
    monkeypatch.setattr(decode_plan, "run", lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(planned, dense_cache_steps()))
    del m.layers[-1]  # a model that drops (or swaps) a block gets a new plan
    both_paths(ids[:1], [[1]] * 2)
    assert runs["n"] == 19
    builds = {"n": 0}
    real_build = decode_plan.DecodePlan.build

    def counted_build(model, dtype):
        builds["n"] += 1
        return real_build(model, dtype)

    monkeypatch.setattr(decode_plan.DecodePlan, "build", staticmethod(counted_build))
    with torch.no_grad():  # new tensors in the model (load_state_dict(assign=True) does this): a new plan
        w = m.layers[-1].post_attention_layernorm.weight
        m.layers[-1].post_attention_layernorm.weight = torch.nn.Parameter(w * 2, requires_grad=False)
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.flip(0), requires_grad=False)
    both_paths(ids[:1], [[1]] * 3)
    assert runs["n"] == 22 and builds["n"] == 1  # built once, then reused step after step
    if m.config.use_dsa:  # past top-k the plan's kernel selects DSA's rows (the blocks select in PyTorch)
        earliest_on_ties(monkeypatch)
        monkeypatch.setattr(decode_plan, "run", plan_run)
        planned = decode(m, ids, 40, [[1, 3]] * 3, True)
        assert runs["n"] == 25
        monkeypatch.setattr(decode_plan, "run", lambda *a: None)
        for a, b in zip(planned, decode(m, ids, 40, [[1, 3]] * 3, True)):
            assert_steps_close(a, b)


@pytest.mark.parametrize("dt", DTYPES)
def test_short_prompts_prefill_in_one_call_as_alone(dt):
    """Prompts of at most ABSORB_MAX_QUERIES new tokens admitted together are prefilled by one call (one pass over
    the weights), the shorter ones padded with their last token; each request still gets exactly the tokens it gets
    alone, greedy and seeded, with MTP drafts from the grouped prefill too."""
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.model.mla import ABSORB_MAX_QUERIES
    m = kernel_model(dt)
    prompts = [torch.randint(3, m.config.vocab_size, (n,)).tolist() for n in (3, ABSORB_MAX_QUERIES, 9, 1, 12)]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)] * 3
    eng = Engine(m, None)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    first = {o.request_id: o.new_token_ids for o in eng.step()}
    assert eng.counters["forward_calls"] == 1 and len(first) == len(prompts)
    together = [o.new_token_ids for o in Engine(m, None).generate(prompts, params[:len(prompts)])]
    alone = [Engine(m, None).generate([p], sp)[0].new_token_ids for p, sp in zip(prompts, params)]
    spec = [o.new_token_ids for o in Engine(m, None, speculative="mtp", num_draft=2).generate(prompts,
                                                                                             params[:len(prompts)])]
    assert together == alone == spec
    assert [first[str(i)] for i in range(len(prompts))] == [a[:1] for a in alone]


@pytest.mark.parametrize("dt", DTYPES)
def test_abi_matches_the_ctypes_mirrors(dt):
    """Each library reports the layout of the structs it takes by pointer (ns_abi), field by field, and the ctypes
    mirrors have it (the load checks it too)."""
    lib = cpu_decode.library(dt)
    c, mirrors = abi.layouts(lib), cpu_decode.mirrors()
    assert set(c) == set(mirrors) == {"ns_block"}
    size, fields = c["ns_block"]
    assert [f for f, *_ in fields] == [f for f, *_ in mirrors["ns_block"]._fields_]
    assert all(o + n <= p for (_, o, n), (_, p, _) in zip(fields, fields[1:])) and fields[-1][1] + fields[-1][2] <= size
    assert c["ns_block"] == abi.mirror_layout(mirrors["ns_block"])
    abi.check(lib, mirrors, "test")


def test_abi_mismatch_is_refused(monkeypatch):
    """A mirror that differs from the C struct is refused with an error naming the difference: a field retyped
    (same offsets, another size), two fields swapped (same layout, other names), one missing; and a library is not
    loaded with such a mirror."""
    lib = cpu_decode.library(BF)
    fields = list(cpu_decode.mirrors()["ns_block"]._fields_)
    names = [f for f, _ in fields]
    i, j = names.index("R"), names.index("P")
    swapped = list(fields)
    swapped[i], swapped[j] = fields[j], fields[i]
    retyped = [(f, ctypes.c_double if f == "qa_eps" else t) for f, t in fields]
    for fs, match in [(retyped, "field qa_eps at offset 56 [(]8 bytes[)], in C at 56 [(]4 bytes[)]"),
                      (swapped, "fields"), (fields[:-1], "fields")]:
        bad = type("BadBlock", (ctypes.Structure,), {"_fields_": fs})
        with pytest.raises(abi.AbiMismatch, match=match):
            abi.check(lib, {"ns_block": bad}, "test")
    with pytest.raises(abi.AbiMismatch, match="no ctypes mirror"):
        abi.check(lib, {}, "test")
    monkeypatch.setattr(cpu_decode, "mirrors", lambda: {"ns_block": bad})  # (the one missing a field)
    monkeypatch.setattr(cpu_decode, "_built", {})  # load it anew (the real dict comes back after the test)
    cpu_decode.reset()
    with pytest.raises(abi.AbiMismatch, match=r"cpu_decode\.c .*BadBlock"):
        cpu_decode.library(BF)
