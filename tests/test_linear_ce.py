"""The head's cross-entropy without logits (`nanoseek/kernels/linear_ce.py`) against the reference
(`Transformer.head_loss`: the head's logits, then F.cross_entropy): loss and gradients of hidden and weight, in
float32 and under bf16 autocast, 'mean' and 'sum', ignored targets, rows split over several chunks, no-grad and
partly frozen inputs; and the training step's losses with it against the reference model's."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import get_preset
from nanoseek.kernels import install, linear_ce
from nanoseek.model.transformer import Transformer, cross_entropy
from nanoseek.train import TrainConfig, micro_step_losses


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(linear_ce, "CHUNK_BYTES", 4 * 64 * 7)  # 7 rows a chunk at V=64: a ragged last chunk


def inputs(dtype=torch.float32, n=(3, 17), d=32, v=64, ignored=5):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()
    t = torch.randint(0, v, n, generator=g)
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:ignored]] = -100
    return h, w, t


def reference(h, w, t, reduction):
    return cross_entropy(F.linear(h, w), t, reduction=reduction)


def grads(fn, h, w, t, reduction, scale=1.0):
    h.grad = w.grad = None
    loss = fn(h, w, t, reduction)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float32_matches_reference(small_chunks, reduction):
    h, w, t = inputs()
    ref = grads(reference, h, w, t, reduction, scale=0.7)
    out = grads(linear_ce.linear_cross_entropy, h, w, t, reduction, scale=0.7)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out[1][(t == -100)].abs().max() == 0  # an ignored row gets no gradient


def test_bf16_autocast_matches_reference(small_chunks):
    """Under autocast the head's matmuls run in bf16 as F.linear's would; the weight's gradient comes back fp32."""
    h, w, t = inputs(ignored=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(reference, h, w, t, "mean")
        out = grads(linear_ce.linear_cross_entropy, h, w, t, "mean")
    assert out[2].dtype == torch.float32 and out[1].dtype == torch.float32
    torch.testing.assert_close(out[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(out[1:], ref[1:]):  # bf16 products: a few bf16 ulps of the largest value
        assert (a - b).abs().max() <= 2 ** -6 * b.abs().max()


def test_no_grad_and_frozen_inputs(small_chunks, monkeypatch):
    h, w, t = inputs()
    asked = []
    chunks = linear_ce._chunks
    monkeypatch.setattr(linear_ce, "_chunks", lambda *a: asked.append(a[-2:]) or chunks(*a))
    with torch.no_grad():  # evaluation: the loss only, no gradient work
        torch.testing.assert_close(linear_ce.linear_cross_entropy(h, w, t), reference(h, w, t, "mean"))
    assert asked == [(False, False)]
    w.requires_grad_(False)  # a frozen head (DSA warm-up): only hidden's gradient
    h.grad = None
    linear_ce.linear_cross_entropy(h, w, t).backward()
    assert asked[-1] == (True, False)
    hg = h.grad
    h.grad = None
    reference(h, w, t, "mean").backward()
    torch.testing.assert_close(hg, h.grad, rtol=1e-5, atol=1e-6)


def test_all_ignored_is_nan_as_reference():
    h, w, t = inputs(n=(2, 3), ignored=6)
    assert torch.isnan(linear_ce.linear_cross_entropy(h, w, t)) and torch.isnan(reference(h, w, t, "mean"))
    assert linear_ce.linear_cross_entropy(h, w, t, "sum") == 0
    with pytest.raises(ValueError, match="reduction"):
        linear_ce.linear_cross_entropy(h, w, t, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_losses_match_reference_model(small_chunks, dtype):
    """micro_step_losses (LM + MTP through head_loss) on the fast model against the reference model."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", index_topk=0)
    ref = Transformer(cfg)
    fast = install(Transformer(cfg))
    fast.load_state_dict(ref.state_dict())
    assert type(fast).head_loss is not Transformer.head_loss
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    y = torch.randint(0, cfg.vocab_size, (2, 24))
    y[0, :3] = -100
    tc = TrainConfig(out="-")
    res = []
    for m in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            parts = micro_step_losses(m, x, y, tc, mtp_depth=1)
        parts["loss"].backward()
        res.append((parts, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (pr, gr), (pf, gf) = res
    rel = 1e-5 if dtype == torch.float32 else 2 ** -5  # bf16: both round the head's products to bf16
    for k in ("lm_loss", "mtp_loss", "loss"):
        torch.testing.assert_close(pf[k], pr[k], rtol=rel, atol=0)
    assert gr.keys() == gf.keys()
    for n in gr:  # of each gradient's largest value
        assert (gf[n] - gr[n]).abs().max() <= rel * gr[n].abs().max(), n
