"""The whole-stack decode call (`decode_plan.py`, cpu_decode.c `ns_decode_stack`) on int8 and int4 models
(`nanoseek.quant`) against the per-op quantized path it replaces (the blocks one by one: QuantLinear / QuantExperts
on cpu_quant.c, everything between them in PyTorch), on tiny random models with a dense block, MoE blocks and DSA,
float32 and bf16, on every kernel variant this CPU runs (test_cpu_decode.py's `variant` fixture). int4 runs both
of cpu_quant's arithmetics: on int8 activations (where the variant has them: AVX512-VNNI, AVX2; elsewhere the
float path) and on the float path (`cpu_quant.set_int8_activations(False)`); `tiny`'s q_b_proj (input 48, no
multiple of 32) stays int8 in an int4 model, so its stack reads both formats.

Tolerance: the quantized matvecs are cpu_quant.c's own dot products (quant_dot.h, quant4.h; int4's activations
prepared by the same code), and the routed experts keep nq_experts' fp32 intermediates, so the two paths differ
only where the float kernels do (the order of fp32 sums: attention, router, norms): float32 logits within 1e-5
of the largest |logit| (`close`; measured: under 1e-6), bf16 within 2^-6 of it, a bf16 ulp or two (measured: most
bf16 runs bit-identical, the others an ulp apart); greedy tokens and expert ids equal at every step.
int4 on int8 activations is the exception: rounding x to int8 is a step function, so an ulp of difference
upstream can move one of its codes by a whole step, and the router can then pick another expert on a near tie,
which the next layers carry on. Measured over these models, 3 seeds each (avx512 and avx2, float32 and bf16):
up to 1.6% of the largest |logit| between the two paths, against 1.5-1.7% between int8 activations and the float
path. Its arm checks the logits within 4% (a wrong scale, group or row moves them by far more) and that the plan
runs the int8-activation arithmetic; the kernel itself is checked exactly against W' x^ in test_cpu_quant.py and
the C self-test, and the stack's plumbing by the float-path arm.
"""
import pytest
import torch

from nanoseek import quant
from nanoseek.kernels import cpu_quant, decode_plan
from nanoseek.kernels.modules import PlannedTransformer
from nanoseek.model.moe import MoE
from test_cpu_decode import DTYPES, counting, decode, earliest_on_ties, kernel_model, variant  # noqa: F401


def close(a, b, dt, q8=False):
    """Logits a within the tolerance of the module docstring of the reference b (one step or several)."""
    tol = 0.04 if q8 else 1e-5 if dt is torch.float32 else 2 ** -6
    assert (a - b).abs().max() <= tol * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.fixture(params=["int8", "int4", "int4-float"])
def fmt(request):
    """The format, and for int4 its arithmetic (int4: int8 activations where this variant has them)"""
    prev = cpu_quant.set_int8_activations(request.param != "int4-float")
    yield request.param.split("-")[0]
    cpu_quant.set_int8_activations(prev)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "index_topk": 0, "index_n_heads": 0},
                                {"n_shared_experts": 0, "scoring_func": "softmax", "topk_method": "greedy"},
                                {"tie_word_embeddings": True}])
def test_quantized_stack_equals_the_per_op_quantized_path(fmt, kw, dt, monkeypatch):
    """One ns_decode_stack call per step (no per-block kernel), logits close to the per-op path and the same
    greedy tokens and expert ids: one request, a ragged batch (1 and 3 tokens), and past DSA's top-k (32), where
    the kernel selects the rows (the reference with the kernel's tie rule)."""
    earliest_on_ties(monkeypatch)
    m = quant.quantize_model(kernel_model(dt, **kw), fmt)
    assert type(m) is PlannedTransformer
    q8 = fmt == "int4" and cpu_quant.int8_activations()  # (the docstring's exception)
    ids = torch.randint(0, m.config.vocab_size, (2, 52))
    n_moe = sum(isinstance(b.mlp, MoE) for b in m.layers)
    real_run = decode_plan.run
    for n0, feeds in ((20, [[1]] * 4), (20, [[1, 3]] * 3), (40, [[1, 3]] * 3)):
        B = len(feeds[0])
        planned_ids, reference_ids = [], []
        monkeypatch.setattr(decode_plan, "run", real_run)
        with counting("ns_decode_stack", dt) as stacks, counting("ns_mla_absorbed", dt) as blocks:
            planned = decode(m, ids[:B], n0, feeds, True, planned_ids)
        assert stacks["n"] == len(feeds) and blocks["n"] == 0
        assert all(b.q8 == q8 and b.qg == (32 if fmt == "int4" else 0) for b in decode_plan._PLANS[m].structs)
        monkeypatch.setattr(decode_plan, "run", lambda *a: None)
        reference = decode(m, ids[:B], n0, feeds, True, reference_ids)
        for a, b in zip(planned, reference):
            close(a, b, dt, q8)
            assert q8 or torch.equal(a.argmax(-1), b.argmax(-1))
        assert len(planned_ids) == n_moe
        assert q8 or all(torch.equal(a, b) for a, b in zip(planned_ids, reference_ids))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_changed_weights_or_arithmetic_rebuild_the_plan(fmt, dt, monkeypatch):
    """A quantized weight changed in place (its codes) makes the plan rebuild: the logits follow. Switching int4's
    arithmetic (`set_int8_activations`) rebuilds the plan with it."""
    ids = torch.randint(0, 64, (1, 30))
    m = quant.quantize_model(kernel_model(dt), fmt)
    before = decode(m, ids, 20, [[1]] * 2, True)[0]
    with torch.no_grad():
        w = m.layers[1].self_attn.kv_a_proj_with_mqa.weight
        w.copy_(w.flip(-1))  # (int4: each code byte's two codes swap places; int8: the row reversed)
    with counting("ns_decode_stack", dt) as stacks:
        after = decode(m, ids, 20, [[1]] * 2, True)[0]
    assert stacks["n"] == 2
    monkeypatch.setattr(decode_plan, "run", lambda *a: None)
    reference = decode(m, ids, 20, [[1]] * 2, True)[0]
    assert not torch.equal(before, after)
    close(after, reference, dt)
    monkeypatch.undo()
    if fmt == "int4":
        prev = cpu_quant.set_int8_activations(not cpu_quant._int8_activations)
        try:
            switched = decode(m, ids, 20, [[1]] * 2, True)[0]
            assert decode_plan._PLANS[m].q8 == cpu_quant.int8_activations()
            monkeypatch.setattr(decode_plan, "run", lambda *a: None)
            close(switched, decode(m, ids, 20, [[1]] * 2, True)[0], dt, cpu_quant.int8_activations())
        finally:
            cpu_quant.set_int8_activations(prev)
