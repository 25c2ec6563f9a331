"""The int8 / int4 CPU kernels (`nanoseek/kernels/cpu_quant.py`) against dequantize-then-matmul: each variant this
CPU runs, both activation dtypes, M = 1..8 rows, odd shapes, all three int4 group sizes; the fast quantized
modules that `kernels.install` puts on (linears and routed experts) against their reference paths; a whole tiny
model's greedy decode on the kernels equal to the reference path's. The variants this CPU cannot run are tested
by tests/test_cpu_quant_cross.py.

Tolerances, from the kernels' arithmetic (fp32 products and sums of K terms, each rounded once): against the
exact product of x and the dequantized weight, |y - exact| <= (K + 2) * 2^-24 * sum_k |x_k w_k| (Higham's
gamma_K, plus the scale's rounding) in float32; a bf16 output adds its own rounding, 2^-8 of the value. The
int4 path on int8 activations (VNNI, or AVX2's VPMADDUBSW) is held to the same bound against the quantized x it
computes with, the magnitude taken over the codes' and the mins' parts, which it sums separately."""
import pytest
import torch
import torch.nn.functional as F

from nanoseek import kernels, quant
from nanoseek.config import get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.kernels import cpu_quant, decode_plan, isa
from nanoseek.kernels.modules import CachedAbsorbMLA, FastQuantExperts, FastQuantLinear
from nanoseek.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = [v for v in cpu_quant.VARIANTS if isa.runs(v)]  # the variants this CPU runs (tests that name one build it)
# the library calls take by default: none without a C compiler, with NANOSEEK_CPU_KERNELS=0 or with
# NANOSEEK_KERNEL_ISA below every variant (the reference path then serves; tests of the kernels skip)
USED = cpu_quant.library() is not None
NO_LIB = "no cpu_quant library here (no variant this CPU runs, no C compiler, or turned off or capped by the env)"
NO_Q8 = "no int8-activation path here (AVX512-VNNI, AVX2): int4 runs the float path"


@pytest.fixture
def float_path():
    """int4 on the float path (the arithmetic the bounds below are written for), whatever the CPU."""
    prev = cpu_quant.set_int8_activations(False)
    yield
    cpu_quant.set_int8_activations(prev)


def lib_of(variant):
    lib = cpu_quant.library(variant)
    if lib is None:
        pytest.skip(f"cpu_quant cannot be built for {variant} here")
    return lib


def assert_within_bound(y, x, w, dtype):
    """y (dtype) against x @ w.T in float64 (x as given, w the dequantized weight), within the module
    docstring's bound."""
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    bound = (x.shape[-1] + 2) * 2.0 ** -24 * mag
    if dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * exact.abs() * 1.0001
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound.clamp_min(1e-30)).max())


def random_weight(N, K):
    w = torch.randn(N, K) * 0.05
    w[0, 3] = 2.0  # an outlier
    w[1] = 0  # an all-zero row
    return w


@pytest.mark.parametrize("variant", RUN or ["none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,G,K", [("int8", 32, 203), ("int8", 32, 1024), ("int4", 32, 96), ("int4", 64, 192),
                                     ("int4", 128, 384)])
def test_kernel_is_dequantize_then_matmul(variant, dtype, fmt, G, K, float_path):
    if variant == "none":
        pytest.skip("this CPU runs no variant of cpu_quant")
    lib = lib_of(variant)
    N = 37  # not a multiple of any vector width
    codes, scale, mn = quant.quantize(random_weight(N, K), fmt, G)
    w = quant.dequantize(codes, scale, mn)
    for M in range(1, 9):
        x = torch.randn(M, K).to(dtype)
        y = cpu_quant.linear(x, codes, scale, mn, lib=lib)
        assert y.dtype == dtype and y.shape == (M, N)
        assert_within_bound(y, x, w, dtype)


@pytest.mark.skipif(not USED, reason=NO_LIB)
def test_rows_and_threads_do_not_change_a_result():
    """Each output is one thread's sum in a fixed order: the same bits whatever the thread count, and a row's
    result the same alone or among eight (the rows share only the weight loads)."""
    K, N = 256, 45
    for fmt in ("int8", "int4"):
        codes, scale, mn = quant.quantize(random_weight(N, K), fmt, 32)
        x = torch.randn(8, K)
        one = cpu_quant.linear(x, codes, scale, mn)
        torch.set_num_threads(2)
        try:
            two = cpu_quant.linear(x, codes, scale, mn)
        finally:
            torch.set_num_threads(1)
        assert torch.equal(one, two)
        assert torch.equal(one[5:6], cpu_quant.linear(x[5:6], codes, scale, mn))
        # leading dims ride along
        assert torch.equal(cpu_quant.linear(x.view(2, 4, K), codes, scale, mn), one.view(2, 4, N))


@pytest.mark.skipif(not USED, reason=NO_LIB)
def test_bad_operands_raise_before_the_c_code():
    codes, scale, mn = quant.quantize(random_weight(8, 64), "int4", 32)
    with pytest.raises(ValueError, match="codes"):
        cpu_quant.linear(torch.randn(1, 32), codes, scale, mn)  # x narrower than the codes
    with pytest.raises(ValueError, match="bf16"):
        cpu_quant.linear(torch.randn(1, 64), codes, scale.float(), mn)
    with pytest.raises(ValueError, match="multiple of the group size"):  # 3 groups over K = 64
        cpu_quant.linear(torch.randn(1, 64), codes, scale[:, :1].repeat(1, 3), mn[:, :1].repeat(1, 3))


def quantized_x(x):
    """x [M, K] as the int8-activation path quantizes it (cpu_quant.c q8_quantize): per block of 32 values,
    dx = max|x| / 127 and codes rint(x * (127 / max|x|)) in fp32; returned dequantized (dx * codes, float64)."""
    b = x.float().unflatten(-1, (-1, 32))
    amax = b.abs().amax(-1, keepdim=True)
    # (a tensor divided by a tensor: `127 / amax` runs as reciprocal-then-multiply in PyTorch, rounding twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return ((amax / 127).double() * (b * inv).round().double()).flatten(-2)


@pytest.mark.skipif(not (USED and cpu_quant.int8_activations()), reason=NO_Q8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,K", [(32, 96), (32, 160), (64, 192), (128, 384), (32, 1024)])
def test_int4_on_int8_activations_is_the_weight_times_the_quantized_x(G, K, dtype):
    """Exactly W' x^ (x^ the quantized x) up to fp32 sums, K not always a multiple of the 128 values a q8 step
    takes (a short last step); and its error against W' x the small one the module docstring states."""
    N = 37
    codes, scale, mn = quant.quantize(random_weight(N, K), "int4", G)
    w = quant.dequantize(codes, scale, mn).double()
    mins = mn.double().repeat_interleave(G, -1)
    parts = (w - mins).abs() + mins.abs()  # the codes' part and the mins' part, summed apart by the kernel
    for M in (1, 3, 8):
        x = torch.randn(M, K).to(dtype)
        y = cpu_quant.linear(x, codes, scale, mn)
        xh = quantized_x(x)
        exact = xh @ w.T
        bound = (K + 2) * 2.0 ** -24 * (xh.abs() @ parts.T)
        if dtype == torch.bfloat16:
            bound = bound + 2.0 ** -8 * exact.abs() * 1.0001
        assert ((y.double() - exact).abs() <= bound).all()
        if dtype == torch.float32 and K >= 160:  # (K = 96: three blocks, too few for a stable ratio)
            ref = x.double() @ w.T
            assert float((y.double() - ref).norm() / ref.norm()) < 0.01


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", **kw)).eval()


@pytest.mark.skipif(not USED, reason=NO_LIB)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_install_puts_fast_classes_on_quantized_modules_only(fmt):
    m = kernels.install(quant.quantize_model(tiny(), fmt))
    assert type(m.layers[1].self_attn.o_proj) is FastQuantLinear and type(m.lm_head) is FastQuantLinear
    assert type(m.layers[1].mlp.experts) is FastQuantExperts
    # holders keep their reference class, but attention caches its absorbed weights (kv_b_proj stays float) and
    # the model runs its decode steps through the whole-stack plan (decode_plan.py: int8)
    assert type(m.layers[1].mlp).__name__ == "MoE" and type(m).__name__ == "PlannedTransformer"
    assert type(m.layers[1].self_attn) is CachedAbsorbMLA
    kernels.uninstall(m)
    assert type(m.lm_head) is quant.QuantLinear and type(m.layers[1].self_attn).__name__ == "MLA"
    assert type(m).__name__ == "Transformer"
    # quantizing an installed model: its quantized modules come fast, its holders go back to reference
    m2 = quant.quantize_model(kernels.install(tiny()), fmt)
    assert type(m2.lm_head) is FastQuantLinear and type(m2.layers[1].mlp.experts) is FastQuantExperts
    assert type(m2).__name__ == "PlannedTransformer" and type(m2.layers[1].self_attn) is CachedAbsorbMLA


@pytest.mark.skipif(not USED, reason=NO_LIB)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,G", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_fast_linear_runs_the_kernel_and_matches_the_reference(fmt, G, dtype, monkeypatch, float_path):
    lin = torch.nn.Linear(256, 70, bias=False)
    q = quant.QuantLinear.from_linear(lin, fmt, G).to(dtype)
    q.__class__ = FastQuantLinear
    calls = []
    real = cpu_quant.linear
    monkeypatch.setattr(cpu_quant, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = cpu_quant.LINEAR_ROWS[q.weight.dtype, dtype]
    x = torch.randn(1, min(rows, 15), 256).to(dtype)
    with torch.no_grad():
        fast = q(x)
        assert calls == [1]
        q.fast = False
        ref = q(x)
    assert fast.shape == ref.shape == (*x.shape[:2], 70) and fast.dtype == dtype
    w = q.dequantized()
    assert_within_bound(fast.view(-1, 70), x.view(-1, 256), w, dtype)
    # against the reference path: float32, both within the bound of the exact value; bf16, the reference also
    # rounds each weight to bf16 (2^-8 of it) and both round their output (2^-8 of |y| <= the magnitude each)
    mag = x.view(-1, 256).double().abs() @ w.double().abs().T
    tol = 3.03 * 2.0 ** -8 * mag if dtype == torch.bfloat16 else 2 * 258 * 2.0 ** -24 * mag
    assert ((fast.view(-1, 70).double() - ref.view(-1, 70).double()).abs() <= tol).all()
    # more rows than the kernels win at (LINEAR_ROWS), or autograd: the reference class's path
    calls.clear()
    q.fast = True
    with torch.no_grad():
        q(torch.randn(rows + 1, 256).to(dtype))
    q(torch.randn(1, 256, requires_grad=True).to(dtype))
    assert calls == []


@pytest.mark.skipif(not USED, reason=NO_LIB)
@pytest.mark.parametrize("fmt,G", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_fast_experts_match_the_reference(fmt, G, monkeypatch, float_path):
    """Decode batches (up to MAX_ROWS tokens) take the one-call experts kernel, larger ones the per-expert loop on
    the linear kernel; both against the reference (QuantExperts with fast off) in float32. In bf16 the one-call
    kernel keeps every intermediate in fp32 and rounds once, so it stays within 2^-8 of the float32 reference on
    the same inputs (plus float32 sums' error), where the bf16 reference rounds at each of its steps."""
    from nanoseek.model.moe import Experts
    cfg = get_preset("tiny", moe_intermediate_size=64)  # I = 64: int4 groups of 32 and 64 over both projections
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    q = quant.QuantExperts.from_experts(ex, fmt, G)
    assert hasattr(q, "down_proj_min") == (fmt == "int4")
    q.__class__ = FastQuantExperts
    calls = []
    real = cpu_quant.experts
    monkeypatch.setattr(cpu_quant, "experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    E, K = q.E, cfg.num_experts_per_tok
    for N in (1, 3, 8, 2 * cpu_quant.MAX_ROWS):
        x = torch.randn(N, q.D)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
        w = torch.rand(N, K)
        with torch.no_grad():
            calls.clear()
            fast = q(x, w, idx)
            assert calls == ([1] if N <= cpu_quant.MAX_ROWS else [])
            fast_bf16 = q(x.bfloat16(), w, idx)
            q.fast = False
            ref = q(x, w, idx)
            ref_bf16_inputs = q(x.bfloat16().float(), w, idx)
            q.fast = True
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert fast_bf16.dtype == torch.bfloat16
        if N <= cpu_quant.MAX_ROWS:  # (the per-expert loop rounds to bf16 between its ops, as the reference)
            err = (fast_bf16.float() - ref_bf16_inputs).abs()
            assert (err <= 2.0 ** -8 * ref_bf16_inputs.abs() + 1e-5 * float(ref.abs().max())).all()
    with pytest.raises(ValueError, match="expert id"):
        real(x[:1], w[:1], torch.full((1, K), E), q._weights("gate_up_proj"), q._weights("down_proj"))


@pytest.mark.skipif(not (USED and cpu_quant.int8_activations()), reason=NO_Q8)
@pytest.mark.parametrize("G", [32, 64])
def test_int4_experts_on_int8_activations_stay_close_to_the_float_path(G):
    """The one-call experts kernel on int8 activations (x, then the hidden rows, each quantized per block of 32)
    against its float path: measured 1.0-1.4% relative RMS over seeds 0-2 and G = 32, 64 (more than one matmul's
    ~0.55%: two of them, and the hidden rows, SiLU(gate) * up, are heavier-tailed than x, so their blocks' max
    sets a coarser step); held under 2%, and not equal (it did run the other arithmetic)."""
    from nanoseek.model.moe import Experts
    cfg = get_preset("tiny", moe_intermediate_size=64)
    ex = Experts(cfg)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    q = quant.QuantExperts.from_experts(ex, "int4", G)
    q.__class__ = FastQuantExperts
    N, K = 8, cfg.num_experts_per_tok
    x = torch.randn(N, q.D)
    idx = torch.stack([torch.randperm(q.E)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    with torch.no_grad():
        q8 = q(x, w, idx)
        prev = cpu_quant.set_int8_activations(False)
        try:
            f = q(x, w, idx)
        finally:
            cpu_quant.set_int8_activations(prev)
    err = float((q8 - f).norm() / f.norm())
    assert 0 < err < 0.02, err


@pytest.mark.skipif(not USED, reason=NO_LIB)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_greedy_decode_on_the_kernels_equals_the_reference_path(fmt, monkeypatch, float_path):
    """The engine (which installs the fast classes) decodes what full forwards on the reference classes pick,
    with the kernels seen running (the whole-stack call, decode_plan.py)."""
    m = quant.quantize_model(tiny(), fmt)
    ref = quant.quantize_model(tiny(), fmt)
    p = [5, 17, 99, 3, 250, 41]
    calls = []
    real_run = decode_plan.run

    def plan_run(*a):
        y = real_run(*a)
        if y is not None:
            calls.append("stack")
        return y

    monkeypatch.setattr(decode_plan, "run", plan_run)
    out = Engine(m, None, cache_bytes=4 << 20).generate([p], SamplingParams(max_tokens=10, temperature=0))[0]
    assert "stack" in calls and type(m.lm_head) is FastQuantLinear
    ids = list(p)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert type(ref.lm_head) is quant.QuantLinear
    assert out.new_token_ids == ids[len(p):]
    # and the kernels' logits at one decode-sized call are those of the reference within float32 sums' error
    x = torch.tensor([ids[:8]])
    with torch.no_grad():
        a = m(x).logits
        b = ref(x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
