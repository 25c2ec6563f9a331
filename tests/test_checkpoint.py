"""HF checkpoint import/export: MTP round trip, sharding, fused experts, FP8 releases, clear errors, memory."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import CheckpointError, dequantize_fp8
from nanoseek.config import get_preset

B, T = 2, 40


def random_model(**kw):
    m = nanoseek.Transformer(get_preset("tiny", **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        for mod in m.modules():
            if getattr(mod, "e_score_correction_bias", None) is not None:
                mod.e_score_correction_bias.normal_(0, 0.1)
    return m


def same_logits(a, b, tol=1e-6):
    ids = torch.randint(0, a.config.vocab_size, (B, T))
    with torch.no_grad():
        x, y = a(ids), b(ids)
        assert (x.logits - y.logits).abs().max() <= tol
        if len(a.mtp) and len(b.mtp):
            la, _ = a.mtp_forward(0, x.hidden[:, :-1], ids[:, 1:])
            lb, _ = b.mtp_forward(0, y.hidden[:, :-1], ids[:, 1:])
            assert (la - lb).abs().max() <= tol


def test_tied_head_loads_as_the_embedding(tmp_path):
    """to_empty gives each module a new Parameter; the loaded head must still be the embedding (it was left
    uninitialised memory)."""
    m = random_model(tie_word_embeddings=True)
    nanoseek.save_pretrained(m, tmp_path)
    got = nanoseek.from_pretrained(tmp_path)
    assert got.lm_head.weight is got.embed_tokens.weight
    same_logits(m, got, tol=0)


def test_round_trip_with_mtp(tmp_path):
    m = random_model()
    nanoseek.save_pretrained(m, tmp_path)
    names = load_file(tmp_path / "model.safetensors").keys()
    L = m.config.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in names and f"model.layers.{L}.shared_head.head.weight" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    back = nanoseek.from_pretrained(tmp_path)
    assert len(back.mtp) == 1
    same_logits(m, back, tol=0)


def test_methods_as_transformers_users_type_them(tmp_path):
    m = random_model()
    m.save_pretrained(tmp_path, dtype=torch.bfloat16, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = nanoseek.Transformer.from_pretrained(tmp_path, dtype="float32")
    assert isinstance(back, nanoseek.Transformer) and back.lm_head.weight.dtype == torch.float32
    same_logits(back, nanoseek.from_pretrained(tmp_path, dtype=torch.float32), tol=0)


def test_sharded_round_trip_and_bf16(tmp_path):
    m = random_model()
    nanoseek.save_pretrained(m, tmp_path, dtype=torch.bfloat16, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = nanoseek.from_pretrained(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16
    ref = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    same_logits(m.to(torch.bfloat16).float(), ref, tol=1e-5)


def test_fused_expert_layout(tmp_path):
    """transformers keeps experts fused in memory; a checkpoint written that way loads too."""
    m = random_model()
    nanoseek.save_pretrained(m, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    fused = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(1, m.config.num_hidden_layers + 1):
        E = m.config.n_routed_experts
        p = f"model.layers.{i}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{j}.gate_proj.weight"], sd[f"{p}.{j}.up_proj.weight"]]) for j in range(E)])
        fused[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{j}.down_proj.weight"] for j in range(E)])
    save_file(fused, tmp_path / "model.safetensors")
    same_logits(m, nanoseek.from_pretrained(tmp_path), tol=0)


def quantize_fp8(w: torch.Tensor, block=128):
    """Blockwise e4m3 quantisation as in DeepSeek's FP8 releases: returns (fp8 weight, scale_inv)."""
    out_f, in_f = w.shape
    rows, cols = math.ceil(out_f / block), math.ceil(in_f / block)
    scale = torch.zeros(rows, cols)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp_min(1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_with_partial_blocks(tmp_path):
    # hidden 160 and dense width 300: matrices whose sides are not multiples of 128
    m = random_model(hidden_size=160, intermediate_size=300, q_lora_rank=136)
    nanoseek.save_pretrained(m, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    out, ref_sd = {}, {}
    partial = False
    for k, v in sd.items():
        is_linear = v.dim() == 2 and k.endswith("proj.weight") and "gate.weight" not in k
        if is_linear:
            q, s = quantize_fp8(v)
            out[k], out[k + "_scale_inv"] = q, s
            ref_sd[k] = dequantize_fp8(q, s)
            partial |= v.shape[0] % 128 != 0 and v.shape[0] > 128 and v.shape[1] % 128 != 0 and v.shape[1] > 128
        else:
            out[k] = ref_sd[k] = v
    assert partial, "the test must include a matrix with partial edge blocks on both sides"
    save_file(out, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = nanoseek.from_pretrained(tmp_path, dtype=torch.float32)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file(ref_sd, ref_dir / "model.safetensors")
    (ref_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    same_logits(loaded, nanoseek.from_pretrained(ref_dir, dtype=torch.float32), tol=0)
    # and the dequantised weights really are close to the originals (e4m3 has a 3-bit mantissa)
    w0 = m.layers[0].mlp.down_proj.weight
    w1 = loaded.layers[0].mlp.down_proj.weight
    assert (w0 - w1).abs().max() < 0.07 * w0.abs().max()
    assert nanoseek.from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16  # FP8 default


def test_dequantize_partial_block_values():
    w = torch.randn(130, 260).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    d = dequantize_fp8(w, s)
    assert torch.equal(d[129, 259], w[129, 259].float() * 6.0)
    assert torch.equal(d[127, 255], w[127, 255].float() * 2.0)
    with pytest.raises(CheckpointError, match="scale shape"):
        dequantize_fp8(w, torch.ones(1, 3))


@pytest.fixture
def saved(tmp_path):
    nanoseek.save_pretrained(random_model(), tmp_path)
    return tmp_path


def test_error_missing_tensor(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*layers\.0\.self_attn\.kv_b_proj"):
        nanoseek.from_pretrained(saved)


def test_error_wrong_shape(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(7,\), the config expects \(64,\)"):
        nanoseek.from_pretrained(saved)


def test_error_unexpected_tensor(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.layers.0.self_attn.surprise.weight"] = torch.ones(2)
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor.*surprise"):
        nanoseek.from_pretrained(saved)


def test_error_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        nanoseek.from_pretrained(saved)


def test_error_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        nanoseek.from_pretrained(saved)


def test_error_pickle_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny").to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never loaded"):
        nanoseek.from_pretrained(tmp_path)


def test_transformers_checkpoint_without_mtp_drops_mtp(saved):
    sd = load_file(saved / "model.safetensors")
    L = get_preset("tiny").num_hidden_layers
    save_file({k: v for k, v in sd.items() if not k.startswith(f"model.layers.{L}.")}, saved / "model.safetensors")
    assert len(nanoseek.from_pretrained(saved).mtp) == 0


@pytest.mark.slow
def test_peak_memory_near_weight_size(tmp_path):
    """Load ~380 MB of fp32 weights in a fresh process: its peak resident memory may exceed what it had before
    loading by at most 1.3x the weights plus a constant (the loader copies tensor by tensor from the mapping)."""
    cfg = get_preset("small", num_hidden_layers=4)
    m = nanoseek.Transformer(cfg)
    n_bytes = m.num_parameters() * 4
    nanoseek.save_pretrained(m, tmp_path)
    del m
    script = f"""
import torch, nanoseek
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
base = status("VmRSS:")
m = nanoseek.from_pretrained({str(tmp_path)!r})
print(base, status("VmHWM:"), status("VmRSS:"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base, peak, after = map(int, out)
    assert after - base > 0.9 * n_bytes  # the weights really are resident
    assert peak - base < 1.3 * n_bytes + 100e6, f"peak {peak - base:,} bytes for {n_bytes:,} bytes of weights"
