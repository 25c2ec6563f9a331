"""Muon (nanoseek.muon) and the optimizers that use it (nanoseek.optim): Newton-Schulz orthogonalisation, which parameters take which update, the batched
step against a per-matrix reference written from the paper's formulas, and the AdamW half against torch's."""
import math

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.muon import NS_COEFFS, orthogonalize
from nanoseek.optim import MasterWeightAdamW, MuonAdamW


@pytest.mark.parametrize("shape", [(3, 32, 48), (2, 48, 32), (1, 16, 16)], ids=["wide", "tall", "square"])
def test_orthogonalize_pushes_singular_values_to_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-0.5, 0.5, shape[-1])  # unequal columns
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.25, (s.min(), s.max())  # the quintic's band, not exactly 1
    # the same singular vectors: o ~ U V^T of g
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(1), o.flatten(1)).min() > 0.95


def _model(**kw):
    cfg = get_preset("tiny", num_hidden_layers=2, **kw)
    torch.manual_seed(0)
    return Transformer(cfg)


def _kinds(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["kind"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("experts", [False, True])
def test_parameters_split_between_muon_and_adamw(experts):
    model = _model()
    kinds = _kinds(MuonAdamW(model, 1e-3, 0.1, experts=experts), model)
    assert kinds["embed_tokens.weight"] == kinds["lm_head.weight"] == "adamw"
    assert all(k == "adamw" for n, k in kinds.items() if n.endswith("mlp.gate.weight") or "norm" in n)
    assert kinds["layers.0.self_attn.kv_b_proj.weight"] == kinds["layers.0.self_attn.o_proj.weight"] == "muon"
    assert kinds["layers.1.mlp.shared_experts.down_proj.weight"] == "muon"
    assert kinds["layers.1.mlp.experts.gate_up_proj"] == ("muon" if experts else "adamw")
    assert all(k == "muon" for n, k in kinds.items() if n.endswith("eh_proj.weight"))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for g in MuonAdamW(model, 1e-3, 0.1).param_groups for p in g["params"])


def _reference_muon(w, g, buf, lr, wd, mu, rows):
    """One Muon step on one matrix, written from the papers: Nesterov momentum, 5 quintic Newton-Schulz steps
    on the normalised update, Moonlight's 0.2 sqrt(max(A, B)) scale, decoupled weight decay."""
    buf.mul_(mu).add_(g, alpha=1 - mu)
    u = (g * (1 - mu) + buf * mu).double()
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (x.norm() + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    o = x.T if u.shape[0] > u.shape[1] else x
    return w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(u.shape)) * o


def test_step_matches_per_matrix_reference():
    model = _model()
    opt = MuonAdamW(model, 2e-3, 0.1, experts=True)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    bufs = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(2):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        name = "layers.1.mlp.experts.gate_up_proj"  # 3-D: expert by expert, gate and up apart
        w, g = before[name], grads[name]
        I = w.shape[1] // 2
        want = torch.cat([torch.stack([_reference_muon(w[e, r:r + I], g[e, r:r + I], bufs[name][e, r:r + I],
                                                       2e-3, 0.1, 0.95, I)
                                       for r in (0, I)]).flatten(0, 1)[None] for e in range(w.shape[0])])
        assert torch.allclose(params[name].detach().double(), want, atol=2e-6), step
        for name in ("layers.0.self_attn.q_b_proj.weight", "layers.0.self_attn.kv_a_proj_with_mqa.weight"):
            if name not in params:
                continue
            want = _reference_muon(before[name], grads[name], bufs[name], 2e-3, 0.1, 0.95, None)
            assert torch.allclose(params[name].detach().double(), want, atol=2e-6), (step, name)
        before = {n: p.detach().clone() for n, p in params.items()}


def test_adamw_half_matches_torch_adamw():
    model, twin = _model(), _model()
    opt = MuonAdamW(model, 2e-3, 0.1)
    adam_names = [n for n, k in _kinds(opt, model).items() if k == "adamw"]
    tp = dict(twin.named_parameters())
    ref = torch.optim.AdamW([{"params": [tp[n] for n in adam_names if tp[n].dim() >= 2 and "embed" not in n],
                              "weight_decay": 0.1},
                             {"params": [tp[n] for n in adam_names if tp[n].dim() < 2 or "embed" in n],
                              "weight_decay": 0.0}], lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for n in adam_names:
        assert torch.allclose(dict(model.named_parameters())[n], tp[n], atol=1e-6), n


def test_master_weights_take_the_same_muon_step():
    """bf16 working weights with fp32 masters (`MasterWeightAdamW(muon=True)`): Muon updates the masters exactly
    as `MuonAdamW` updates fp32 weights given the same gradients, and the working copies follow."""
    model, twin = _model(), _model()
    ref = MuonAdamW(model, 2e-3, 0.1, experts=True)
    opt = MasterWeightAdamW(twin, 2e-3, 0.1, muon=True, muon_experts=True)
    assert {id(p) for p in opt.master} and [g["kind"] for g in opt.param_groups] == ["muon", "adamw", "adamw"]
    for _ in range(2):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p).to(torch.bfloat16).float()  # what a bf16 backward can produce
            q.grad = p.grad.to(q.dtype)
            if q in opt.master:
                opt._take_grad(q)
        ref.step()
        opt.step()
        ref.zero_grad()
        opt.zero_grad()
    full = opt.full_precision_state(twin)
    for name, p in model.named_parameters():
        assert torch.allclose(full[name], p.detach(), atol=1e-6), name
        q = dict(twin.named_parameters())[name]
        if q.dtype == torch.bfloat16:
            assert torch.equal(q.detach(), full[name].to(torch.bfloat16)), name
