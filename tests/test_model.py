"""Reference paths vs fast paths inside the model, each to float32 rounding:
naive == absorbed MLA; grouped experts == per-expert loop; DSA with k >= T == dense; cached decode == full forward.
"""
import copy

import pytest
import torch

import nanoseek
from nanoseek.config import get_preset
from nanoseek.model import moe
from nanoseek.model.moe import Experts, Router

B, T = 2, 48


def model(**kw):
    m = nanoseek.Transformer(get_preset("tiny", **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return m


def ids(cfg, t=T):
    return torch.randint(0, cfg.vocab_size, (B, t))


@pytest.mark.parametrize("dsa", [False, True])
def test_naive_equals_absorbed(dsa):
    m = model() if dsa else model(index_topk=0, index_n_heads=0)
    x = ids(m.config)
    with torch.no_grad():
        a = m(x, cache=nanoseek.DenseCache(m.config, B, T).step(T), path="naive").logits
        b = m(x, cache=nanoseek.DenseCache(m.config, B, T).step(T), path="absorbed").logits
        c = m(x).logits
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() < 1e-5


def test_explicit_training_attention_equals_flash(monkeypatch):
    """Compiled CPU training writes short causal attention out (`mla._explicit_is_faster`): same loss and
    gradients as SDPA's flash kernel. (Forced here in eager mode; test_compiled_training_matches_eager in
    test_train.py runs it compiled.)"""
    m = model(index_topk=0, index_n_heads=0).train()
    x = ids(m.config)

    def loss_and_grads():
        m.zero_grad()
        loss = m(x).logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, {"n": 0}

    def counted(*a, **k):
        calls["n"] += 1
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    flash = loss_and_grads()
    assert calls["n"] == m.config.num_hidden_layers
    from nanoseek.model import mla  # (patching torch.compiler.is_compiling would confuse torch.compile later)
    monkeypatch.setattr(mla, "_explicit_is_faster", lambda q, S: True)
    explicit = loss_and_grads()
    assert calls["n"] == m.config.num_hidden_layers  # not called again
    assert torch.allclose(flash[0], explicit[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(flash[1], explicit[1]))


def random_experts():
    cfg = get_preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    experts, router = Experts(cfg), Router(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, 0, 0.1)
    torch.nn.init.normal_(experts.down_proj, 0, 0.1)
    torch.nn.init.normal_(router.weight, 0, 0.1)
    return cfg, experts, router


def test_grouped_experts_equal_loop():
    cfg, experts, router = random_experts()
    x = torch.randn(100, cfg.hidden_size, requires_grad=True)
    w, idx, _ = router(x)
    experts.impl = "grouped"
    a = experts(x, w, idx)
    ga = torch.autograd.grad(a.square().sum(), (experts.gate_up_proj, experts.down_proj, x, w), retain_graph=True)
    experts.impl = "loop"
    b = experts(x, w, idx)
    gb = torch.autograd.grad(b.square().sum(), (experts.gate_up_proj, experts.down_proj, x, w))
    assert (a - b).abs().max() < 1e-5
    for u, v in zip(ga, gb):  # weights, the tokens (gathered back through the dispatch) and the gate weights
        assert (u - v).abs().max() < 1e-4
    # the decode-time path (visits only the experts that got tokens) agrees too
    c = experts._active(x[:3], w[:3], idx[:3])
    assert (c - experts._loop(x[:3], w[:3], idx[:3])).abs().max() < 1e-5


def test_compiled_float32_grouped_experts_equal_eager():
    """torch.compile'd float32 grouped experts (their GEMMs go through `nanoseek::grouped_mm`: torch's shape
    function for the grouped GEMM takes bf16 only) compile as one graph and give eager's output and gradients."""
    cfg, experts, router = random_experts()
    x = torch.randn(64, cfg.hidden_size, requires_grad=True)
    w, idx, _ = router(x)
    w, idx = w.detach(), idx.detach()

    def loss_and_grads(f):
        y = f(x, w, idx)
        return (y, *torch.autograd.grad(y.square().sum(), (experts.gate_up_proj, experts.down_proj, x)))

    eager = loss_and_grads(experts._grouped)
    compiled = loss_and_grads(torch.compile(experts._grouped, fullgraph=True))  # fullgraph: no graph break
    for u, v in zip(eager, compiled):
        assert (u - v).abs().max() < 1e-5


def test_bf16_grouped_experts_pad_rows_exactly(monkeypatch):
    """bf16 grouped GEMMs pad each expert's rows to GROUP_ALIGN with zero rows (few distinct GEMM shapes for
    oneDNN): output and gradients are bit-identical to the unpadded layout, and the compiled step (fullgraph)
    agrees with eager to bf16 rounding."""
    cfg, experts, router = random_experts()
    x = torch.randn(100, cfg.hidden_size, requires_grad=True)
    w, idx, _ = router(x)
    w, idx = w.detach(), idx.detach()
    assert (idx.flatten().bincount() % moe.GROUP_ALIGN).any()  # some expert's rows do get padded

    def run(f):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(x, w, idx)
        return (y, *torch.autograd.grad(y.float().square().sum(), (experts.gate_up_proj, experts.down_proj, x)))

    padded = run(experts._grouped)
    monkeypatch.setattr(moe, "GROUP_ALIGN", 1)
    assert all(torch.equal(a, b) for a, b in zip(padded, run(experts._grouped)))
    monkeypatch.undo()
    compiled = run(torch.compile(experts._grouped, fullgraph=True))
    for a, b in zip(padded, compiled):
        assert (a.float() - b.float()).norm() <= 1e-2 * a.float().norm()


def test_whole_model_grouped_equals_loop():
    m = model()
    x = ids(m.config)
    with torch.no_grad():
        a = m(x).logits
        m.set_expert_impl("loop")
        b = m(x).logits
    assert (a - b).abs().max() < 1e-5


def test_dsa_with_k_at_least_T_equals_dense():
    m = model(index_topk=T)
    x = ids(m.config)
    with torch.no_grad():
        sparse = m(x).logits
        for mod in m.modules():
            if hasattr(mod, "dsa_mode"):
                mod.dsa_mode = "dense"
        dense = m(x).logits
    assert (sparse - dense).abs().max() < 1e-6


def test_indexer_scores_in_query_blocks_equal_one_block_per_row(monkeypatch):
    """`Indexer.scores` computes many queries' logits in blocks (dsa.BLOCK_LOGITS): blocks of 3 queries, the last
    one short, give one row's single GEMM's scores and gradients (every input and indexer weight)."""
    from nanoseek.model import dsa
    m = model()
    mla = m.layers[0].self_attn
    cfg = m.config
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    cq = torch.randn(B, T, cfg.q_lora_rank, requires_grad=True)
    rope = m.rotary(torch.arange(T)[None].expand(B, -1))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, -1, -1)
    g = torch.randn(B, T, T)

    def run(block):
        monkeypatch.setattr(dsa, "BLOCK_LOGITS", block)
        m.zero_grad()
        x.grad = cq.grad = None
        keys = mla.indexer.key(x, rope)
        s = mla.indexer.scores(x, cq, keys, rope, mask)
        s.masked_fill(~mask, 0).mul(g).sum().backward()
        return s.detach(), [t.grad.clone() for t in [x, cq, *mla.indexer.parameters()]]

    one_block, grads1 = run(1 << 30)
    blocks, grads3 = run(3 * cfg.index_n_heads * T)  # 48 queries: 16 blocks of 3
    assert torch.equal(one_block.isinf(), ~mask)
    assert (blocks - one_block)[mask].abs().max() < 1e-6
    for a, b in zip(grads3, grads1):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max())


def test_explicit_attention_equals_sdpa():
    """MLA.naive with need_probs (the DSA stages' explicit softmax(q k^T) v, the mask as an additive bias) gives
    SDPA's output and gradients, and probabilities that sum to 1 over the visible keys and are 0 elsewhere."""
    m = model()
    mla = m.layers[0].self_attn
    H, qk = mla.n_heads, m.config.qk_head_dim
    q = torch.randn(B, T, H, qk, requires_grad=True)
    rows = torch.randn(B, T, mla.R + mla.P, requires_grad=True)
    mask = (torch.rand(B, T, T) < 0.4) | torch.eye(T, dtype=torch.bool)
    g = torch.randn(B, T, H, mla.V)
    out = {}
    for explicit in (False, True):
        q.grad = rows.grad = None
        o, probs = mla.naive(q, rows, mask, need_probs=explicit)
        (o * g).sum().backward()
        out[explicit] = o.detach(), q.grad.clone(), rows.grad.clone(), probs
    for a, b in zip(out[True][:3], out[False][:3]):
        assert (a - b).abs().max() < 1e-5
    probs = out[True][3]
    assert torch.allclose(probs.sum(-1), torch.ones(())) and not probs.masked_select(~mask[:, None]).any()


@pytest.mark.parametrize("dsa", [False, True])
def test_decode_step_by_step_equals_full_forward(dsa):
    m = model() if dsa else model(index_topk=0, index_n_heads=0)
    x = ids(m.config)
    with torch.no_grad():
        full = m(x).logits
        cache = nanoseek.DenseCache(m.config, B, T)
        parts = [m(x[:, :20], cache=cache.step(20)).logits]
        for t in range(20, T):
            parts.append(m(x[:, t:t + 1], cache=cache.step(1)).logits)
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_sparse_decode_reads_only_k_rows():
    """At decode with S > k the absorbed path must read K rows through cache.gather, never all S. (The PyTorch
    path of the plain model: the C kernels select inside their call, tests/test_engine.py counts their reads.)"""
    m = model(index_topk=8)
    x = ids(m.config)
    cache = nanoseek.DenseCache(m.config, B, T)
    seen = []
    orig_gather = cache.gather
    cache.gather = lambda layer, idx: (seen.append(("gather", idx.shape[-1])), orig_gather(layer, idx))[1]
    with torch.no_grad():
        m(x[:, :T - 1], cache=cache.step(T - 1))
        seen.clear()
        m(x[:, T - 1:], cache=cache.step(1))
    assert seen and all(k == 8 for _, k in seen)


def test_mtp_forward_shapes():
    m = model()
    x = ids(m.config)
    out = m(x)
    logits, h = m.mtp_forward(0, out.hidden[:, :-1], x[:, 1:])
    assert logits.shape == (B, T - 1, m.config.vocab_size) and h.shape == out.hidden[:, :-1].shape


def test_bfloat16_close_to_float32():
    m = model()
    x = ids(m.config)
    with torch.no_grad():
        ref = m(x).logits
        m16 = m.to(torch.bfloat16)
        out = m16(x).logits.float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3
    for mod in m16.modules():  # the balancing bias survives the cast in fp32
        if getattr(mod, "e_score_correction_bias", None) is not None:
            assert mod.e_score_correction_bias.dtype == torch.float32


def test_backward_reaches_every_trained_parameter():
    m = model(index_topk=0, index_n_heads=0).train()
    x = ids(m.config)
    out = m(x)
    loss = out.logits.float().logsumexp(-1).mean()
    logits, _ = m.mtp_forward(0, out.hidden[:, :-1], x[:, 1:])
    loss = loss + logits.float().logsumexp(-1).mean()
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []


def test_rejects_float_input_ids():
    m = model()
    with pytest.raises(TypeError, match="integer"):
        m(torch.zeros(1, 4))


def test_inference_fast_paths_match_plain_paths():
    """The fast paths `kernels.install` puts on (weight packing, fused projections, cached fp32 weights, the
    decode-sized expert path, the CPU decode kernels where this machine has them) against the plain model: bf16
    packing is bit-identical, fp32 agrees to rounding, and a weight update invalidates the caches."""
    from nanoseek import kernels
    from nanoseek.kernels import fused, modules

    m = model(index_topk=0, index_n_heads=0)
    x = ids(m.config)
    fast = kernels.install(copy.deepcopy(m))
    assert kernels.installed(fast) and not kernels.installed(m)
    assert all(type(f) is modules.FAST.get(type(r), type(r)) for f, r in zip(fast.modules(), m.modules()))
    assert fast.state_dict().keys() == m.state_dict().keys()
    with torch.no_grad():
        plain = m(x).logits
        assert (fast(x).logits - plain).abs().max() < 1e-5
        with torch.enable_grad():  # grad mode: every cache is bypassed (training path)
            assert (fast(x).logits.detach() - plain).abs().max() < 1e-5
        if fused.packing_supported():
            assert kernels.pack_weights_(fast, True)
            assert (fast(x).logits - plain).abs().max() < 1e-5
            m16, f16 = copy.deepcopy(m).to(torch.bfloat16), copy.deepcopy(fast).to(torch.bfloat16)
            head, h = f16.lm_head, torch.randn(3, m.config.hidden_size, dtype=torch.bfloat16)
            assert torch.equal(fused.linear(f16, "_test", h, head.weight), head(h))  # same kernel, same bits
            a = m16(x).logits.float()
            # (the expert sums then accumulate in fp32: rounding-level differences)
            assert (f16(x).logits.float() - a).abs().mean() < 0.02 * a.abs().mean()
            kernels.pack_weights_(fast, False)
        fast(x)  # caches built ...
        for p, q in zip(fast.parameters(), m.parameters()):  # ... then an in-place update (as an optimizer step)
            p.mul_(1.5)
            q.mul_(1.5)
        assert (fast(x).logits - m(x).logits).abs().max() < 1e-5
    experts = fast.layers[1].mlp.experts
    xs = torch.randn(2, m.config.hidden_size)
    w, idx, _ = fast.layers[1].mlp.gate(xs)
    with torch.no_grad():
        assert (experts._pairs(xs, w, idx) - experts._loop(xs, w, idx)).abs().max() < 1e-5
    assert type(kernels.uninstall(fast)) is type(m) and not any(type(f) in modules.REFERENCE for f in fast.modules())


def test_model_package_is_plain_pytorch():
    """nanoseek/model/ is the reference a reader learns from: no ctypes, no C library, no kernel package. Checked
    on the source (every import statement) and in a fresh interpreter (what importing the model loads; torch
    itself loads ctypes, so there only the kernel package is looked for)."""
    import ast
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(nanoseek.__file__).parent / "model"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] == "ctypes" or n.startswith("nanoseek.kernels")
                   or n.startswith("nanoseek.optim")]
            assert not bad, f"{path.name} imports {bad}"
        text = path.read_text()
        assert "CDLL" not in text and not re.search(r"""["'][^"'\n]*\.(so|dll|dylib)["']""", text), path.name
    code = ("import sys, nanoseek.model; "
            "print(sorted(m for m in sys.modules if m.startswith(('nanoseek.kernels', 'nanoseek.optim'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
