"""bench/big_model.py on the tiny preset instead of V2-Lite's shapes: the fast random checkpoint is a valid sharded
HF folder that `from_pretrained` reads (norms 1, their biases 0, weights in [1/64, 1/32) in magnitude), `complete` tells a whole
folder from a broken one, and one quantized load reports its numbers, the activated bytes at the stored size."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import big_model  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek import quant  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "ckpt"
    cfg = get_preset("tiny")
    mp = pytest.MonkeyPatch()
    mp.setattr(big_model, "SHARD_BYTES", 300_000)
    mp.setattr(big_model, "POOL_VALUES", 1 << 16)  # smaller than some tensors: the pool wraps around
    mp.setattr(big_model, "CHUNK_VALUES", 1 << 12)
    big_model.write_checkpoint(cfg, path)
    mp.undo()
    return cfg, path


def test_random_checkpoint_loads_with_sane_values(folder):
    cfg, path = folder
    assert len(list(path.glob("model-*.safetensors"))) > 2
    assert big_model.complete(cfg, path)
    m = nanoseek.from_pretrained(path)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("norm.bias"):
            assert torch.all(p == 0), name
        else:
            a = p.float().abs()
            assert a.min() >= 1 / 64 and a.max() < 1 / 32, name
            if p.numel() >= 1000:
                assert (p > 0).float().mean().item() == pytest.approx(0.5, abs=0.1), name


def test_incomplete_folder_is_not_reused(folder, tmp_path):
    cfg, path = folder
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])  # a write cut short
    assert not big_model.complete(cfg, broken)
    (broken / "model.safetensors.index.json").unlink()
    assert not big_model.complete(cfg, broken)
    assert not big_model.complete(get_preset("tiny", num_hidden_layers=4), path)  # another config's tensors


def test_one_load_reports_its_numbers(folder):
    cfg, path = folder
    r = big_model.one_load(path, "int8", tokens=3, prompt_len=4)
    assert json.loads(json.dumps(r)) == r
    assert r["tok_s"] > 0 and r["load_s"] > 0 and r["bw_copy"] > 0 and r["bw_read"] > 0
    assert r["peak_rss_decode"] >= r["peak_rss_load"] > r["model_bytes"]
    m = nanoseek.from_pretrained(path, quantize="int8")
    assert r["model_bytes"] == quant.bytes_of(m)
    # by hand: the routed experts' codes and scales count 2 of 8 experts (num_experts_per_tok of tiny), the
    # embedding one row, the MTP layer nothing, everything else whole
    routed = sum(t.numel() * t.element_size() for n, t in m.named_buffers() if ".experts." in n
                 and not n.startswith("mtp."))
    rest = sum(t.numel() * t.element_size() for n, t in list(m.named_parameters()) + list(m.named_buffers())
               if ".experts." not in n and not n.startswith(("mtp.", "rotary.", "embed_tokens.")))
    assert r["activated_bytes"] == rest + routed * cfg.num_experts_per_tok // cfg.n_routed_experts \
        + cfg.hidden_size * 2
