"""Streaming quantized load (issue 15 item 3): `from_pretrained(..., quantize=)` quantizes each weight as it is
read, shard by shard, FP8 releases included; the result is bitwise what quantizing the loaded float model gives,
the experts are quantized one at a time, and the process peaks well under the float model's size (peak RSS
measured in subprocesses, as a ratio to the float bytes and to load-then-quantize in the same run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import quant
from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer
from test_checkpoint import quantize_fp8

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def random_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", **kw)).eval()


def load_then_quantize(path, fmt, G, dtype=None):
    """The reference: the whole float model loaded, then quantized in place."""
    return quant.quantize_model(nanoseek.from_pretrained(path, dtype=dtype), fmt, G)


def assert_same(want, got):
    sd_want, sd_got = want.state_dict(), got.state_dict()
    assert sd_want.keys() == sd_got.keys()
    for k, v in sd_want.items():
        assert v.dtype == sd_got[k].dtype and torch.equal(v, sd_got[k]), k
    x = torch.randint(0, want.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(want(x).logits, got(x).logits)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny model in bf16 over several shards (experts of one layer spread over more than one)."""
    root = tmp_path_factory.mktemp("sharded")
    nanoseek.save_pretrained(random_model(), root, dtype=torch.bfloat16, max_shard_bytes=200_000)
    assert len(list(root.glob("model-*.safetensors"))) > 3
    return root


@pytest.mark.parametrize("fmt,G,dtype", [("int8", 32, None), ("int4", 32, None), ("int4", 64, "float32")])
def test_streamed_load_is_bitwise_load_then_quantize(sharded, fmt, G, dtype, monkeypatch):
    want = load_then_quantize(sharded, fmt, G, dtype)
    real, seen = quant.quantize, []

    def per_tensor(w, *a, **k):  # real weights arrive one checkpoint tensor (one expert's matrix) at a time
        if w.device.type != "meta":
            seen.append(tuple(w.shape))
            assert w.dim() == 2, f"quantized a stacked tensor {tuple(w.shape)}"
        return real(w, *a, **k)

    monkeypatch.setattr(quant, "quantize", per_tensor)
    got = nanoseek.from_pretrained(sharded, dtype=dtype, quantize=fmt, group_size=G)
    cfg = got.config
    assert (cfg.moe_intermediate_size, cfg.hidden_size) in seen  # an expert's gate_proj, on its own
    assert got.quantization == quant.QuantConfig(fmt, G)
    assert_same(want, got)


def test_large_tensors_are_quantized_in_row_blocks_bitwise(monkeypatch):
    w = torch.randn(100, 64)
    for fmt in ("int8", "int4"):
        codes, scale, mn = quant.quantize(w, fmt, 32)
        into = [torch.empty_like(codes), torch.empty_like(scale), None if mn is None else torch.empty_like(mn)]
        monkeypatch.setattr(quant, "_BLOCK_VALUES", 64 * 7)  # 7 rows a block: the last block is partial
        quant.quantize_into(w, *into, 32)
        assert torch.equal(into[0], codes) and torch.equal(into[1], scale)
        assert mn is None or torch.equal(into[2], mn)


def test_fp8_release_streams(tmp_path):
    """A DeepSeek-style FP8 folder (every projection e4m3 with 128x128 scale_inv, partial edge blocks): dequantized
    and quantized tensor by tensor, bitwise what dequantize-load-then-quantize gives."""
    nanoseek.save_pretrained(random_model(hidden_size=160, q_lora_rank=136), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    out = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith("proj.weight"):
            out[k], out[k + "_scale_inv"] = quantize_fp8(v)
        else:
            out[k] = v
    assert any(k.endswith("experts.3.up_proj.weight_scale_inv") for k in out)
    save_file(out, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for fmt in ("int8", "int4"):
        got = nanoseek.from_pretrained(tmp_path, quantize=fmt)
        assert got.embed_tokens.weight.dtype == torch.bfloat16  # an FP8 release's float dtype
        assert_same(load_then_quantize(tmp_path, fmt, 32), got)


def test_bad_format_fails_before_loading(sharded):
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        nanoseek.from_pretrained(sharded, quantize="int3")


# One load per process, after the same load of a tiny folder (the libraries' code paged in, allocator arenas set
# up): the peak RSS (VmHWM: ru_maxrss would carry the forking test process's peak over exec) above the peak before
# it, and the quantized bytes
PEAK = """
import json, sys, torch
import nanoseek
from nanoseek import quant
torch.set_num_threads(1)
def peak_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
def load(path):
    if how == "stream":
        return nanoseek.from_pretrained(path, quantize=fmt)
    return quant.quantize_model(nanoseek.from_pretrained(path), fmt)
warm, path, fmt, how = sys.argv[1:]
load(warm)
base = peak_mb()
m = load(path)
print(json.dumps({"load_mb": peak_mb() - base, "quantized_mb": quant.bytes_of(m) / 2 ** 20}))
"""


def load_peak(warm: Path, path: Path, fmt: str, how: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PEAK, str(warm), str(path), fmt, how], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A model of ~260 MB in bf16, nearly all of it routed experts, in 64 MB shards."""
    root = tmp_path_factory.mktemp("mid")
    m = random_model(hidden_size=512, moe_intermediate_size=512, n_routed_experts=48, num_hidden_layers=4,
                     num_nextn_predict_layers=0, vocab_size=4096)
    nanoseek.save_pretrained(m, root, dtype=torch.bfloat16, max_shard_bytes=64 << 20)
    float_mb = sum(p.numel() for p in m.parameters()) * 2 / 2 ** 20
    assert float_mb > 200
    return root, float_mb


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from Linux's /proc")
def test_peak_memory_is_the_quantized_model_not_the_float_one(sharded, mid_model, fmt):
    path, float_mb = mid_model
    stream, whole = load_peak(sharded, path, fmt, "stream"), load_peak(sharded, path, fmt, "whole")
    print(fmt, f"float {float_mb:.0f} MB", "streamed", stream, "load-then-quantize", whole)
    assert stream["quantized_mb"] == pytest.approx(whole["quantized_mb"])
    # the float model is never held: the load costs the quantized model and about one tensor more
    assert stream["load_mb"] < 0.8 * float_mb, (stream, float_mb)
    assert stream["load_mb"] < stream["quantized_mb"] + 0.3 * float_mb, (stream, float_mb)
    assert whole["load_mb"] > float_mb  # what it replaces held all of it (the test can tell the two apart)
