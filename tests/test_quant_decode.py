"""The whole-stack decode call (`decode_plan.py`, cpu_decode.c `ns_decode_stack`) on int8 models (`nanoseek.quant`)
against the per-op quantized path it replaces (the blocks one by one: QuantLinear / QuantExperts on cpu_quant.c,
everything between them in PyTorch), on tiny random models with a dense block, MoE blocks and DSA, float32 and
bf16, on every kernel variant this CPU runs (test_cpu_decode.py's `variant` fixture).

Tolerance: the int8 matvecs are cpu_quant.c's own dot products (quant_dot.h), and the routed experts keep
nq_experts' fp32 intermediates, so the two paths differ only where the float kernels do (the order of fp32 sums:
attention, router, norms): float32 logits within 1e-5 of the largest |logit| (`close`; measured: under 1e-6),
bf16 within 2^-6 of it, a bf16 ulp or two (measured: most bf16 runs bit-identical, the others an ulp apart);
greedy tokens equal at every step.
"""
import pytest
import torch

from nanoseek import quant
from nanoseek.kernels import decode_plan
from nanoseek.kernels.modules import PlannedTransformer
from nanoseek.model.moe import MoE
from test_cpu_decode import DTYPES, counting, decode, earliest_on_ties, kernel_model, variant  # noqa: F401


def close(a, b, dt):
    """Logits a within the tolerance of the module docstring of the reference b (one step or several)."""
    tol = 1e-5 if dt is torch.float32 else 2 ** -6
    assert (a - b).abs().max() <= tol * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "index_topk": 0, "index_n_heads": 0},
                                {"n_shared_experts": 0, "scoring_func": "softmax", "topk_method": "greedy"},
                                {"tie_word_embeddings": True}])
def test_int8_stack_equals_the_per_op_quantized_path(kw, dt, monkeypatch):
    """One ns_decode_stack call per step (no per-block kernel), logits close to the per-op path and the same
    greedy tokens and expert ids: one request, a ragged batch (1 and 3 tokens), and past DSA's top-k (32), where
    the kernel selects the rows (the reference with the kernel's tie rule)."""
    earliest_on_ties(monkeypatch)
    m = quant.quantize_model(kernel_model(dt, **kw), "int8")
    assert type(m) is PlannedTransformer
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
        monkeypatch.setattr(decode_plan, "run", lambda *a: None)
        reference = decode(m, ids[:B], n0, feeds, True, reference_ids)
        for a, b in zip(planned, reference):
            close(a, b, dt)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert len(planned_ids) == n_moe and all(torch.equal(a, b) for a, b in zip(planned_ids, reference_ids))


@pytest.mark.parametrize("dt", DTYPES)
def test_int4_and_changed_weights_fall_back_or_rebuild(dt, monkeypatch):
    """int4 weights are not read by the stack: its decode runs block by block (no ns_decode_stack call). An int8
    weight changed in place (its codes) makes the plan rebuild its concatenated projection: the logits follow."""
    m4 = quant.quantize_model(kernel_model(dt), "int4")
    ids = torch.randint(0, m4.config.vocab_size, (1, 30))
    with counting("ns_decode_stack", dt) as stacks:
        decode(m4, ids, 20, [[1]] * 2, True)
    assert stacks["n"] == 0
    m = quant.quantize_model(kernel_model(dt), "int8")
    before = decode(m, ids, 20, [[1]] * 2, True)[0]
    with torch.no_grad():
        m.layers[1].self_attn.kv_a_proj_with_mqa.weight.mul_(-1)
    with counting("ns_decode_stack", dt) as stacks:
        after = decode(m, ids, 20, [[1]] * 2, True)[0]
    assert stacks["n"] == 2
    monkeypatch.setattr(decode_plan, "run", lambda *a: None)
    reference = decode(m, ids, 20, [[1]] * 2, True)[0]
    assert not torch.equal(before, after)
    close(after, reference, dt)
