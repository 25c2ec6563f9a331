"""Optimizer (nanoseek.optim): MasterWeightAdamW, bf16 training with bf16 working weights and fp32 masters.

It must compute what bf16 autocast over fp32 weights computes (same loss, same gradients), update like
torch.optim.AdamW, sum micro-batch gradients in fp32, and its C kernel must give the PyTorch reference's bits.
"""
import copy

import pytest
import torch

import nanoseek
from nanoseek import optim as O
from nanoseek.kernels import cpu_adamw
from nanoseek.train import TrainConfig, loss_function

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**over):
    """The tiny preset as V3.2 (DSA indexer) with an MTP module: every kind of weight."""
    return nanoseek.Transformer(nanoseek.get_preset("tiny", **over)).train()


def batch(cfg, B=2, T=32):
    return torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))


def grads(model, opt=None):
    """name -> fp32 gradient, the bf16 working weights' ones taken from the optimizer."""
    held = dict(opt._grads) if opt is not None else {}
    out = {}
    for n, p in model.named_parameters():
        g = held.get(p, p.grad)
        if g is not None:
            out[n] = g.float()
    return out


@pytest.mark.parametrize("stage", ["none", "sparse"])
def test_bf16_working_weights_compute_what_autocast_computes(stage):
    """Same loss and same gradients, bit for bit, as bf16 autocast over the fp32 weights: so the weights made
    bf16 (`low_precision_params`) are exactly those autocast only uses in bf16, in every module (MLA, MoE and
    its fp32 router, DSA's indexer with its fp32 scoring, MTP, the head)."""
    ref = tiny()
    if stage == "sparse":
        from nanoseek.train import set_dsa_stage
        set_dsa_stage(ref, stage)
    model = copy.deepcopy(ref)
    tc = TrainConfig(out="", mtp_weight=0.3, seq_aux_alpha=1e-3, compile=False, dsa_stage=stage)
    opt = O.MasterWeightAdamW(model, 1e-3, 0.1)
    low = dict(O.low_precision_params(ref))
    assert {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16} == set(low)
    assert any("experts" in n for n in low) and "lm_head.weight" in low
    assert not any(k in n for n in low for k in ("embed_tokens", "mlp.gate.weight", "weights_proj", "wq_b", "norm"))
    x, y = batch(ref.config)
    losses = []
    for m in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = loss_function(m, tc, mtp_depth=1)(x, y)
        parts["loss"].backward()
        losses.append({k: v.tolist() for k, v in parts.items()})  # ("expert_load": a tensor [L, E])
    assert losses[0] == losses[1]
    g_ref, g_low = grads(ref), grads(model, opt)
    assert g_ref.keys() == g_low.keys()
    for n in g_ref:
        assert torch.equal(g_ref[n], g_low[n]), n


@pytest.mark.skipif(cpu_adamw.library() is None, reason="the CPU optimizer kernel cannot be built here")
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_cpu_kernel_matches_reference_bitwise(grad_dtype):
    n = 100_003  # a tail shorter than a vector
    w = torch.randn(n)
    m, v = torch.randn(n) * 1e-2, torch.rand(n) * 1e-4
    g = torch.randn(n).to(grad_dtype)
    # denormal weights (kept by torch's bf16 conversion) and a NaN, in the vector part and in the tail
    for i in (0, 1, 2, n - 1):
        w[i], m[i], g[i] = (3e-39, -2e-39, 1e-45, 5e-39)[i % 4 if i < 3 else 3], 0.0, 0.0
    w[5] = w[n - 2] = float("nan")
    p = w.to(torch.bfloat16)
    k = dict(scale=O._f32(0.7), c1=O._f32(0.1), b2=O._f32(0.95), c2=O._f32(0.05), eps=O._f32(1e-8),
             decay=O._f32(1 - 1e-3 * 0.1), step=O._f32(1e-3 / (1 - 0.9 ** 3)), bc2_sqrt=O._f32((1 - 0.95 ** 3) ** 0.5))
    want = [t.clone() for t in (p, w, m, v)]
    O.adamw_master_reference(*want, g, **k)
    lib = cpu_adamw.library()
    lib.ns_adamw_master(p.data_ptr(), w.data_ptr(), m.data_ptr(), v.data_ptr(),
                        g.data_ptr() if grad_dtype == torch.bfloat16 else None,
                        g.data_ptr() if grad_dtype == torch.float32 else None, n, *k.values(), 2)
    for got, ref in zip((p, w, m, v), want):
        bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(bits), ref.view(bits))
    assert p[0] != 0 and p[n - 1] != 0  # the denormals survived the kernel's rounding
    g16 = g.to(torch.bfloat16)
    assert lib.ns_sumsq_bf16(g16.data_ptr(), n, 2) == pytest.approx(float(g16.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("kernels", [True, False])
def test_updates_like_torch_adamw_with_clipping(kernels, monkeypatch):
    """Fed the same gradients, the fp32 masters follow torch.optim.AdamW (fused) on fp32 weights, clipping
    included; the bf16 working weights are the masters rounded."""
    if not kernels:
        monkeypatch.setattr(cpu_adamw, "_lib", [None])
    model = tiny(num_nextn_predict_layers=0)
    ref = copy.deepcopy(model)
    opt = O.MasterWeightAdamW(model, 1e-2, 0.1)
    ref_opt = O.build_adamw(ref, 1e-2, 0.1)
    names = dict(ref.named_parameters())
    for step in range(3):
        for n, p in model.named_parameters():
            g = torch.randn(p.shape) * (10.0 if step == 1 else 1e-3)  # step 1 clips
            if p in opt.master:
                g = g.to(torch.bfloat16)
                p.grad = g
                opt._take_grad(p)
            else:
                p.grad = g
            names[n].grad = g.float()
        norm = opt.clip_grad_norm_(1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        assert norm == pytest.approx(float(ref_norm), rel=1e-5)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    sd = opt.full_precision_state(model)
    mine = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        assert sd[n].dtype == torch.float32
        torch.testing.assert_close(sd[n], p.detach(), rtol=1e-5, atol=1e-7)
        if mine[n] in opt.master:
            assert torch.equal(mine[n].detach(), sd[n].to(torch.bfloat16))
    opt.release()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_micro_batch_gradients_sum_in_fp32():
    """Two backward passes: the held gradient is the fp32 sum of the two bf16 gradients (autograd would have
    summed them in bf16)."""
    model = tiny(num_nextn_predict_layers=0)
    p = model.lm_head.weight
    each = []
    p.register_post_accumulate_grad_hook(lambda t: each.append(t.grad.clone()))  # runs before the optimizer's
    opt = O.MasterWeightAdamW(model, 1e-3, 0.0)
    tc = TrainConfig(out="", mtp_weight=0.0, seq_aux_alpha=0.0, compile=False)
    f = loss_function(model, tc, mtp_depth=0)
    for _ in range(2):
        x, y = batch(model.config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = f(x, y)["loss"]
        loss.backward()
    assert [g.dtype for g in each] == [torch.bfloat16] * 2 and not torch.equal(each[0], each[1])
    assert p.grad is None and opt._grads[p].dtype == torch.float32
    assert torch.equal(opt._grads[p], each[0].float() + each[1].float())
    opt.zero_grad()
    assert not opt._grads


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_inference_after_a_step_uses_the_new_weights(bf16_weights):
    """Evaluation caches derived weights (concatenated projections, packed weights) keyed on the parameters'
    version counters; torch's fused AdamW does not bump them, so before this was fixed the held-out evaluations
    of a training run kept measuring the weights of its first evaluation."""
    model = tiny(num_nextn_predict_layers=0)
    opt = O.build_adamw(model, 1e-2, 0.1, bf16_weights=bf16_weights)
    x, _ = batch(model.config, B=2, T=24)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_weights else torch.autocast("cpu", enabled=False)

    def logits(m):
        m.eval()
        with torch.no_grad(), ctx:
            return m(x).logits.float()

    before = logits(model)  # builds the caches
    model.train()
    with ctx:
        model(x).logits.float().square().mean().backward()
    opt.step()
    after = logits(model)
    fresh = tiny(num_nextn_predict_layers=0)
    fresh.load_state_dict(opt.full_precision_state(model) if bf16_weights else model.state_dict())
    if bf16_weights:
        O.MasterWeightAdamW(fresh, 1e-2, 0.1)  # the same bf16 working weights
    assert not torch.equal(before, after)
    assert torch.equal(after, logits(fresh))


def test_state_dict_round_trip_keeps_the_masters():
    """torch's optimizer API: state_dict() then load_state_dict() into a fresh optimizer gives the same masters,
    moments and bf16 copies, and the same next step (torch would otherwise cast the state to the bf16 dtype)."""
    model = tiny(num_nextn_predict_layers=0)
    twin = copy.deepcopy(model)
    opt = O.MasterWeightAdamW(model, 1e-2, 0.1)
    x, y = batch(model.config)
    tc = TrainConfig(out="", mtp_weight=0.0, seq_aux_alpha=0.0, compile=False)

    def step(m, o):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_function(m, tc, mtp_depth=0)(x, y)["loss"].backward()
        o.clip_grad_norm_(1.0)
        o.step()
        o.zero_grad()

    step(model, opt)
    step(model, opt)
    # as with any torch optimizer, the fp32 parameters come from the model's state dict; the bf16 weights' masters
    # come from the optimizer's (the twin still has its initial values for them)
    low = {n for n, p in model.named_parameters() if p in opt.master}
    twin.load_state_dict({k: v for k, v in opt.full_precision_state(model).items() if k not in low}, strict=False)
    other = O.MasterWeightAdamW(twin, 1e-2, 0.1)
    assert not all(torch.equal(a, b) for a, b in zip(opt.master.values(), other.master.values()))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load would give it
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(opt.master.values(), other.master.values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), twin.parameters()):
        if not opt.state.get(p):  # never had a gradient (the DSA indexer outside its stages)
            assert not other.state.get(q)
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][k].dtype == other.state[q][k].dtype == torch.float32
            assert torch.equal(opt.state[p][k], other.state[q][k])
    step(model, opt)
    step(twin, other)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# ---- learning-rate schedule --------------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_min_lr():
    s = O.Schedule(1.0, 0.1, warmup=4, total=20)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(19) > 0.1 and abs(s(20) - 0.1) < 1e-12
    lrs = [s(i) for i in range(4, 21)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    w = O.Schedule(1.0, 0.1, warmup=2, total=10, kind="wsd", decay_fraction=0.2)
    assert [w(i) for i in range(8)] == [0.5] + [1.0] * 7 and w(9) == pytest.approx(0.55) and w(10) == pytest.approx(0.1)


def test_schedule_stage_warms_up_again_when_the_rest_joins():
    """adapt's new-rows stage: its own warm-up then the peak; from the stage's end the plain schedule over the
    remaining steps, warm-up included, so weights that join then never start at the peak rate."""
    s = O.Schedule(1.0, 0.1, warmup=4, total=20, stage=6)
    assert [s(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    rest = O.Schedule(1.0, 0.1, warmup=4, total=14)
    assert [s(i) for i in range(6, 21)] == [rest(i) for i in range(15)]
    short = O.Schedule(1.0, 0.1, warmup=4, total=20, stage=2)  # a stage shorter than the warm-up ramps over itself
    assert [short(0), short(1), short(2)] == [0.5, 1.0, 0.25]
    assert O.Schedule(1.0, 0.1, 4, 20, stage=0)(3) == O.Schedule(1.0, 0.1, 4, 20)(3)
    with pytest.raises(ValueError, match="stage"):
        O.Schedule(1.0, 0.1, 4, 20, stage=21)


@pytest.mark.parametrize("kind", ["adamw", "bf16_weights", "muon"])
def test_embed_lr_scale_multiplies_the_embedding_and_head_updates(kind):
    """--embed-lr-scale k: the token embedding and output head step k times as far as at scale 1 (Adam's update
    and decoupled decay are both proportional to lr), every other weight exactly as far; each trainable parameter
    is in one group."""
    def stepped(scale):
        torch.manual_seed(0)
        model = tiny(num_nextn_predict_layers=0)
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        if kind == "muon":
            opt = O.MuonAdamW(model, 1e-3, 0.1, embed_lr_scale=scale)
        else:
            opt = O.build_adamw(model, 1e-3, 0.1, bf16_weights=kind == "bf16_weights", embed_lr_scale=scale)
        owned = [p for g in opt.param_groups for p in g["params"]]
        assert len(owned) == len({id(p) for p in owned}) == sum(p.requires_grad for p in model.parameters())
        O.set_lr(opt, 1e-3)
        x, y = batch(model.config, B=2, T=16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "bf16_weights"):
            torch.nn.functional.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten()).backward()
        opt.step()
        after = opt.full_precision_state(model) if kind == "bf16_weights" else model.state_dict()
        return {n: after[n].float() - before[n] for n in before}

    one, three = stepped(1.0), stepped(3.0)
    rows = [n for n in one if "embed_tokens" in n or "lm_head" in n]
    assert sorted(rows) == ["embed_tokens.weight", "lm_head.weight"]
    for n in one:
        if n in rows:
            torch.testing.assert_close(three[n], 3 * one[n], rtol=1e-3, atol=1e-9)
        else:
            torch.testing.assert_close(three[n], one[n], rtol=0, atol=0)
