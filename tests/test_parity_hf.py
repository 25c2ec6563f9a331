"""Numerical parity with the reference implementation (transformers 5.x), both directions.

transformers builds a random tiny model and saves it with `save_pretrained`; nanoseek loads it with
`from_pretrained`; float32 logits must agree to 1e-4. The reverse: nanoseek saves, transformers loads.
"""
import pytest
import torch

import nanoseek
from nanoseek.config import get_preset

transformers = pytest.importorskip("transformers")

B, T = 2, 72


def tiny(model_type: str, **kw):
    base = dict(model_type=model_type, index_topk=0, index_n_heads=0)
    if model_type == "deepseek_v2":
        base.update(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                    routed_scaling_factor=1.0, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                    mscale=0.707, mscale_all_dim=0.707, rope_factor=4.0)
    base.update(kw)
    return get_preset("tiny", **base)


def hf_model(cfg, bias_scale=0.1):
    hcfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    m = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in m.parameters():  # HF's init is near-zero for some tensors: make every tensor matter
            if p.dim() > 1:
                p.normal_(0, 0.08)
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * bias_scale)
    return m


def compare(hf, ours, vocab):
    ids = torch.randint(0, vocab, (B, T))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape == (B, T, vocab)
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4, f"max |diff| {diff}"
    return diff


CASES = {
    "v2-greedy": lambda: tiny("deepseek_v2"),
    "v2-group-limited": lambda: tiny("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "v3-noaux-yarn": lambda: tiny("deepseek_v3", n_group=4, topk_group=2),
    "v32-sparse": lambda: tiny("deepseek_v32", index_topk=24, index_n_heads=8),
    "v32-dense": lambda: tiny("deepseek_v32", index_topk=128, index_n_heads=8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_nanoseek(case, tmp_path):
    cfg = CASES[case]()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.from_pretrained(tmp_path)
    assert ours.config.model_type == cfg.model_type
    compare(hf, ours, cfg.vocab_size)


@pytest.mark.parametrize("case", ["v2-group-limited", "v3-noaux-yarn", "v32-sparse"])
def test_nanoseek_to_hf(case, tmp_path):
    cfg = CASES[case]()
    ours = nanoseek.Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        for m in ours.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    nanoseek.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    compare(hf, ours, cfg.vocab_size)


def test_sparsity_is_active(tmp_path):
    """With index_topk < T the sparse model must differ from the same weights run densely."""
    cfg = CASES["v32-sparse"]()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = nanoseek.from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        sparse = ours(ids).logits
        for m in ours.modules():
            if hasattr(m, "dsa_mode"):
                m.dsa_mode = "dense"
        dense = ours(ids).logits
    assert (sparse - dense).abs().max() > 1e-3
    assert (sparse[:, :24] - dense[:, :24]).abs().max() < 1e-5  # first k positions see everything anyway
