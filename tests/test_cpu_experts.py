"""The grouped expert GEMMs (`nanoseek/kernels/cpu_experts.c`), every variant this CPU runs, bf16 and float32:
against plain per-group matmuls, through autograd and torch.compile, and inside the experts' training path against
the `torch._grouped_mm` path they replace.

float32 outputs match the fp32 products to ~1e-5 of the largest value (the order of the sums differs); a bf16
output may differ from the fp32 product rounded to bf16 by one ulp. Variants this CPU cannot run skip with the
reason (`tests/test_cpu_experts_cross.py` compiles them).
"""
import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import get_preset
from nanoseek.kernels import build, cpu_experts, install, isa
from nanoseek.model.moe import Experts, Router

BF = torch.bfloat16
DTYPES = [torch.float32, BF]
TOL = {BF: dict(rtol=2 ** -7, atol=1e-3),  # one bf16 ulp of the values
       torch.float32: dict(rtol=1e-5, atol=1e-5)}  # of values scaled to at most 1 (`close`)


@pytest.fixture(params=isa.ORDER)
def variant(request):
    """The kernels built for one variant, made the ones the ops call, for one test."""
    v = request.param
    if not isa.runs(v):
        pytest.skip(f"this CPU ({isa.describe()}) does not run {v}")
    if build.compiler() is None or isa.best() is None:
        pytest.skip("no C compiler, or NANOSEEK_CPU_KERNELS=0")
    before = cpu_experts.variant()
    lib = cpu_experts.load(v)
    assert lib is not None and lib.ne_isa().decode() == v and cpu_experts.variant() == v
    yield v
    cpu_experts.load(before)


def close(out, ref, dtype):
    """out (dtype) against an fp32/fp64 reference: bf16 to one ulp of the reference rounded to bf16, float32 to
    1e-5 of the largest value."""
    assert out.dtype == dtype
    if dtype == BF:
        torch.testing.assert_close(out.float(), ref.to(BF).float(), **TOL[BF])
    else:
        scale = ref.abs().max().clamp(min=1)
        torch.testing.assert_close(out.double() / scale, ref.double() / scale, **TOL[torch.float32])


def groups(sizes, tail=5):
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return ends, int(ends[-1]) + tail  # rows past the last group: not any group's


def per_group(ends, fn):
    start = 0
    for g, end in enumerate(ends.tolist()):
        fn(g, slice(start, end))
        start = end


# an empty group, odd sizes (partial row tiles; a zero pad row in the bf16 dot product's pairs), a group longer
# than the float32 kernel's reduction block (256)
SIZES = [16, 0, 7, 1, 33, 270, 8, 13]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(64, 48), (48, 32), (80, 16), (288, 272)])
def test_three_gemms_equal_per_group_matmuls(variant, dtype, N, K):
    torch.manual_seed(0)
    ends, M = groups(SIZES)
    G = len(SIZES)
    x, w, dy = torch.randn(M, K, dtype=dtype), torch.randn(G, N, K, dtype=dtype), torch.randn(M, N, dtype=dtype)
    y_ref, dx_ref, dw_ref = (torch.zeros(M, N, dtype=torch.float64), torch.zeros(M, K, dtype=torch.float64),
                             torch.zeros(G, N, K, dtype=torch.float64))

    def ref(g, rows):
        y_ref[rows] = x[rows].double() @ w[g].double().T
        dx_ref[rows] = dy[rows].double() @ w[g].double()
        dw_ref[g] = dy[rows].double().T @ x[rows].double()

    per_group(ends, ref)
    y = cpu_experts.expert_linear(x, w, ends)
    dx = cpu_experts.expert_linear_dgrad(dy, w, ends)
    dw = cpu_experts.expert_linear_wgrad(dy, x, ends)
    for out, r in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        close(out, r, dtype)
    # rows past the last group and the empty group's weight gradient are exact zeros, not leftovers
    assert not y[int(ends[-1]):].any() and not dx[int(ends[-1]):].any() and not dw[1].any()


def test_bf16_rounds_ties_to_even(variant):
    """One rounding of the exact fp32 sum, ties to even: 1 + 2^-8 -> 1 and 1 + 3 * 2^-8 -> 1 + 2^-6."""
    x = torch.zeros(2, 16, dtype=BF)
    x[:, 0], x[0, 1], x[1, 1] = 1, 2 ** -8, 3 * 2 ** -8
    w = torch.zeros(1, 16, 16, dtype=BF)
    w[0, :, :2] = 1
    y = cpu_experts.expert_linear(x, w, torch.tensor([2], dtype=torch.int32))
    assert torch.equal(y.float(), torch.tensor([[1.0], [1 + 2 ** -6]]).expand(2, 16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_and_compile(variant, dtype):
    """Gradients through `expert_linear` are those of per-group F.linear, and torch.compile (fullgraph) calls the
    same ops with the same results."""
    torch.manual_seed(1)
    ends, M = groups([32, 0, 47, 17], tail=0)
    x = torch.randn(M, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 64, 32, dtype=dtype, requires_grad=True)
    # a fixed upstream gradient, not one computed from each path's own y: a bf16 y one ulp apart (allowed) would
    # move the weight gradient by more than an ulp
    dy = torch.randn(M, 64, dtype=dtype)

    def run(f):
        y = f(x, w)
        return (y, *torch.autograd.grad(y, (x, w), dy))

    def reference(x, w):
        y = torch.zeros(M, 64, dtype=dtype)

        def one(g, rows):
            y[rows] = F.linear(x[rows].double(), w[g].double()).to(dtype)

        per_group(ends, one)
        return y

    def kernel(x, w):
        return cpu_experts.expert_linear(x, w, ends)

    eager = run(kernel)
    for a, b in zip(eager, run(reference)):
        close(a, b.double(), dtype)
    torch._dynamo.reset()  # the variant is not a guard: trace afresh for this one
    for a, b in zip(eager, run(torch.compile(kernel, fullgraph=True))):  # fullgraph: no graph break
        assert torch.equal(a, b)


def test_bad_calls_raise_instead_of_reading_past_the_tensors(variant):
    x, w = torch.randn(10, 32, dtype=BF), torch.randn(2, 16, 32, dtype=BF)
    with pytest.raises(ValueError, match="ends"):
        cpu_experts.expert_linear(x, w, torch.tensor([4, 11], dtype=torch.int32))  # past the 10 rows
    with pytest.raises(ValueError, match="ends"):
        cpu_experts.expert_linear(x, w, torch.tensor([6, 4], dtype=torch.int32))  # falling
    with pytest.raises(ValueError, match="one row end per group"):
        cpu_experts.expert_linear(x, w, torch.tensor([2, 4, 10], dtype=torch.int32))  # 3 ends for 2 experts
    with pytest.raises(ValueError, match="expected"):
        cpu_experts.expert_linear_dgrad(x, w, torch.tensor([4, 10], dtype=torch.int32))  # dy must be [M, N]
    with pytest.raises(ValueError, match="both bf16 or both float32"):
        cpu_experts.expert_linear(x.float(), w, torch.tensor([4, 10], dtype=torch.int32))
    assert cpu_experts.usable(x, w) and cpu_experts.usable(x.float(), w.float())
    assert not cpu_experts.usable(x.float(), w) and not cpu_experts.usable(x.half(), w.half())
    assert not cpu_experts.usable(x, torch.randn(2, 24, 32, dtype=BF))  # N not a multiple of 16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_experts_training_path_equals_torch_grouped_mm(variant, dtype, monkeypatch):
    """`Experts._grouped` as `nanoseek train` runs it on a CPU (bf16: under autocast; float32: as is) with the
    kernels and with `torch._grouped_mm`: same outputs and gradients, to the dtype's rounding."""
    cfg = get_preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    experts, router = install(Experts(cfg)), Router(cfg)  # the fast experts, as `nanoseek train` installs them
    monkeypatch.setattr(cpu_experts, "F32_ROUTED", (variant,))  # (float32: routed where measured faster)
    for p in (experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(p, 0, 0.1)
    torch.nn.init.normal_(router.weight, 0, 0.1)
    x = torch.randn(100, cfg.hidden_size, requires_grad=True)
    w, idx, _ = router(x)
    w, idx = w.detach(), idx.detach()
    assert cpu_experts.usable(x.to(dtype), experts.gate_up_proj.to(dtype), experts.down_proj.to(dtype))
    calls = []
    real = cpu_experts.expert_linear
    monkeypatch.setattr(cpu_experts, "expert_linear", lambda *a: calls.append(1) or real(*a))

    def run():
        with torch.autocast("cpu", dtype=BF, enabled=dtype == BF):
            y = experts._grouped(x, w, idx)
        return (y, *torch.autograd.grad(y.float().square().sum(), (experts.gate_up_proj, experts.down_proj, x)))

    fast = run()
    assert len(calls) == 2  # gate+up and down
    monkeypatch.setattr(cpu_experts, "routed", lambda *a: False)
    for a, b in zip(fast, run()):
        assert (a.float() - b.float()).norm() <= (1e-2 if dtype == BF else 1e-5) * b.float().norm()
