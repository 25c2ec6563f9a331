"""The grouped bf16 expert GEMMs (`nanoseek/model/cpu_experts.c`) against plain per-group fp32 matmuls, and the
experts' training path with them against the `torch._grouped_mm` path they replace.

A bf16 output may differ from the fp32 reference rounded to bf16 by one ulp (the order of fp32 sums): the
tolerances allow that and nothing more. Skipped where the kernels are unavailable (no AVX-512 BF16, no compiler).
"""
import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.kernels import cpu_experts
from nanoseek.model.moe import Experts, Router

pytestmark = pytest.mark.skipif(cpu_experts.library() is None, reason="CPU expert kernels unavailable here")
BF = torch.bfloat16
ULP = dict(rtol=2 ** -7, atol=1e-3)  # one bf16 ulp of the values


def groups(sizes, tail=5):
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return ends, int(ends[-1]) + tail  # rows past the last group: not any group's


def per_group(ends, fn):
    start = 0
    for g, end in enumerate(ends.tolist()):
        fn(g, slice(start, end))
        start = end


# an empty group, odd sizes (a zero pad row in the weight gradient's pairs, single-row tiles), a large group
SIZES = [16, 0, 7, 1, 33, 160, 8]


@pytest.mark.parametrize("N,K", [(64, 48), (48, 32), (80, 16)])
def test_three_gemms_equal_fp32_reference(N, K):
    torch.manual_seed(0)
    ends, M = groups(SIZES)
    G = len(SIZES)
    x, w, dy = torch.randn(M, K, dtype=BF), torch.randn(G, N, K, dtype=BF), torch.randn(M, N, dtype=BF)
    y_ref, dx_ref, dw_ref = torch.zeros(M, N), torch.zeros(M, K), torch.zeros(G, N, K)

    def ref(g, rows):
        y_ref[rows] = x[rows].float() @ w[g].float().T
        dx_ref[rows] = dy[rows].float() @ w[g].float()
        dw_ref[g] = dy[rows].float().T @ x[rows].float()

    per_group(ends, ref)
    y = cpu_experts.expert_linear(x, w, ends)
    dx = cpu_experts.expert_linear_dgrad(dy, w, ends)
    dw = cpu_experts.expert_linear_wgrad(dy, x, ends)
    for out, r in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert out.dtype == BF
        torch.testing.assert_close(out.float(), r.to(BF).float(), **ULP)
    # rows past the last group and the empty group's weight gradient are exact zeros, not leftovers
    assert not y[int(ends[-1]):].any() and not dx[int(ends[-1]):].any() and not dw[1].any()


def test_autograd_and_compile():
    """Gradients through `expert_linear` are those of per-group F.linear, and torch.compile (fullgraph) calls the
    same ops with the same results."""
    torch.manual_seed(1)
    ends, M = groups([32, 0, 48, 16], tail=0)
    x = torch.randn(M, 32, dtype=BF, requires_grad=True)
    w = torch.randn(4, 64, 32, dtype=BF, requires_grad=True)

    def run(f):
        y = f(x, w)
        return (y, *torch.autograd.grad(y.float().square().sum(), (x, w)))

    def reference(x, w):
        y = torch.zeros(M, 64, dtype=BF)

        def one(g, rows):
            y[rows] = torch.nn.functional.linear(x[rows], w[g])

        per_group(ends, one)
        return y

    def kernel(x, w):
        return cpu_experts.expert_linear(x, w, ends)

    eager = run(kernel)
    for a, b in zip(eager, run(reference)):
        torch.testing.assert_close(a.float(), b.float(), **ULP)
    for a, b in zip(eager, run(torch.compile(kernel, fullgraph=True))):  # fullgraph: no graph break
        assert torch.equal(a, b)


def test_bad_calls_raise_instead_of_reading_past_the_tensors():
    x, w = torch.randn(10, 32, dtype=BF), torch.randn(2, 16, 32, dtype=BF)
    with pytest.raises(ValueError, match="ends"):
        cpu_experts.expert_linear(x, w, torch.tensor([4, 11], dtype=torch.int32))  # past the 10 rows
    with pytest.raises(ValueError, match="ends"):
        cpu_experts.expert_linear(x, w, torch.tensor([6, 4], dtype=torch.int32))  # falling
    with pytest.raises(ValueError, match="one row end per group"):
        cpu_experts.expert_linear(x, w, torch.tensor([2, 4, 10], dtype=torch.int32))  # 3 ends for 2 experts
    with pytest.raises(ValueError, match="expected"):
        cpu_experts.expert_linear_dgrad(x, w, torch.tensor([4, 10], dtype=torch.int32))  # dy must be [M, N]
    assert not cpu_experts.usable(x.float(), w) and not cpu_experts.usable(x, torch.randn(2, 24, 32, dtype=BF))


def test_experts_training_path_equals_torch_grouped_mm(monkeypatch):
    """`Experts._grouped` under bf16 autocast (what `nanoseek train` runs on a CPU) with the kernels and with
    `torch._grouped_mm`: same outputs and gradients, to bf16 rounding."""
    cfg = get_preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    experts, router = Experts(cfg), Router(cfg)
    for p in (experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(p, 0, 0.1)
    torch.nn.init.normal_(router.weight, 0, 0.1)
    x = torch.randn(100, cfg.hidden_size, requires_grad=True)
    w, idx, _ = router(x)
    w, idx = w.detach(), idx.detach()
    assert cpu_experts.usable(x.to(BF), experts.gate_up_proj.to(BF), experts.down_proj.to(BF))
    calls = []
    real = cpu_experts.expert_linear
    monkeypatch.setattr(cpu_experts, "expert_linear", lambda *a: calls.append(1) or real(*a))

    def run():
        with torch.autocast("cpu", dtype=BF):
            y = experts._grouped(x, w, idx)
        return (y, *torch.autograd.grad(y.float().square().sum(), (experts.gate_up_proj, experts.down_proj, x)))

    fast = run()
    assert len(calls) == 2  # gate+up and down
    monkeypatch.setattr(cpu_experts, "usable", lambda *a: False)
    for a, b in zip(fast, run()):
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()
