"""Weight-only quantization (nanoseek.quant): round-trip error bounds, quantized modules equal to
dequantize-then-matmul (and the fused int8 path to that reference), a quantized tiny model close to the float one,
`nanoseek quantize` folders loading bit-identically and without float weights, the engine and CLIs on quantized
models, and the memory saved (from tensor sizes)."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nanoseek
from nanoseek import quant
from nanoseek.config import get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.moe import Experts
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_from_documents
from test_vocab import base_docs

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(N=24, K=128):
    """A weight with the awkward cases: an outlier, an all-zero row, a constant group, large and tiny rows."""
    w = torch.randn(N, K) * 0.05
    w[1, 5] = 3.0
    w[2] = 0
    w[3, :32] = -0.75  # (a bf16 value)
    w[4] *= 1e-4
    return w


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny", **kw)).eval()


# ---- tensors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,G", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_round_trip_error_is_at_most_half_a_scale(fmt, G):
    w = torch.stack([weights(), weights() * 3])  # leading dims ride along (experts [E, N, K])
    codes, scale, mn = quant.quantize(w, fmt, G)
    back = quant.dequantize(codes, scale, mn)
    assert back.shape == w.shape and scale.dtype == torch.bfloat16
    if fmt == "int8":
        assert codes.dtype == torch.int8 and codes.shape == w.shape and mn is None
        assert int(codes.abs().max()) <= 127
        bound = scale.float()[..., None].expand_as(w) / 2
    else:
        assert codes.dtype == torch.uint8 and codes.shape == (2, 24, 64)
        assert mn.shape == scale.shape == (2, 24, 128 // G)
        bound = (scale.float()[..., None] / 2).expand(2, 24, 128 // G, G).flatten(-2)
    err = (w - back).abs()
    assert (err <= bound * (1 + 1e-6) + 1e-12).all(), float((err - bound).max())
    assert (back[:, 2] == 0).all()  # an all-zero row comes back exactly
    if fmt == "int4":
        assert (back[:, 3, :32] == w[:, 3, :32]).all()  # so does a constant group
    # the error is the rounding's, not more: the mean is near a uniform rounding error's (scale / 4)
    assert err.mean() < bound.mean() * 0.7


def test_int4_codes_pack_two_per_byte_low_nibble_first():
    w = torch.arange(32.0).view(1, 32)  # one group: min 0, scale (31 - 0) / 15 rounded up
    codes, scale, mn = quant.quantize(w, "int4", 32)
    s = float(scale)
    q = (w / s).round()
    assert float(mn) == 0
    assert codes[0, 0] == int(q[0, 0]) | (int(q[0, 1]) << 4) and codes[0, 5] == int(q[0, 10]) | (int(q[0, 11]) << 4)


# ---- modules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quant_linear_is_dequantize_then_matmul_and_fast_path_matches(fmt, monkeypatch):
    lin = nn.Linear(128, 48, bias=False)
    q = quant.QuantLinear.from_linear(lin, fmt, 32)
    x = torch.randn(3, 5, 128)
    want = F.linear(x, quant.dequantize(q.weight, q.weight_scale, getattr(q, "weight_min", None)))
    assert torch.equal(q(x), want)  # float32: the reference path
    assert (q(x) - lin(x)).abs().max() < (0.02 if fmt == "int8" else 0.2) * lin(x).abs().max()
    calls, real = [], quant._int8_mm
    monkeypatch.setattr(quant, "_int8_mm", lambda *a: calls.append(1) or real(*a))
    xb = x.bfloat16()
    with torch.no_grad():
        fast = q(xb)
        q.fast = False
        ref = q(xb)
    assert len(calls) == (1 if fmt == "int8" else 0)  # the fused op serves int8 with bf16 activations only
    assert torch.equal(ref, F.linear(xb, q.dequantized(torch.bfloat16)))
    torch.testing.assert_close(fast, ref, atol=2e-2 * float(ref.abs().max()), rtol=2e-2)


def test_int8_fast_path_only_for_widths_its_kernel_takes(monkeypatch):
    """torch._weight_int8pack_mm crashes the process when K is not a multiple of 16 (q_lora_rank 136, say): such a
    linear runs the reference; 144 takes the fused op."""
    calls, real = [], quant._int8_mm
    monkeypatch.setattr(quant, "_int8_mm", lambda *a: calls.append(a[1].shape[-1]) or real(*a))
    for K in (136, 144):
        q = quant.QuantLinear.from_linear(nn.Linear(K, 40, bias=False), "int8")
        with torch.no_grad():
            y = q(torch.randn(2, K).bfloat16())
        assert y.shape == (2, 40)
    assert calls == [144]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quant_experts_equal_dequantized_experts_and_dequantize_only_the_routed_ones(fmt, monkeypatch):
    cfg = get_preset("tiny")
    experts = Experts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    q = quant.QuantExperts.from_experts(experts, fmt, 32)
    ref = Experts(cfg)  # the plain per-expert loop over the dequantized weights
    gu, dn = q.dequantized()
    with torch.no_grad():
        ref.gate_up_proj.copy_(gu)
        ref.down_proj.copy_(dn)
    ref.impl = "loop"
    N, K = 6, cfg.num_experts_per_tok
    x = torch.randn(N, cfg.hidden_size)
    idx = torch.tensor([[1, 4]] * N)[:, :K]  # two experts of 8 get every token
    w = torch.rand(N, K)
    seen = []
    real = quant.dequantize
    monkeypatch.setattr(quant, "dequantize", lambda codes, *a, **k: seen.append(codes.shape) or real(codes, *a, **k))
    with torch.no_grad():
        out = q(x, w, idx)
    assert len(seen) == 4 and all(len(s) == 2 for s in seen)  # 2 experts x 2 projections, one expert each
    torch.testing.assert_close(out, ref(x, w, idx), atol=1e-5, rtol=1e-5)
    calls, real_mm = [], quant._int8_mm
    monkeypatch.setattr(quant, "_int8_mm", lambda *a: calls.append(1) or real_mm(*a))
    xb = x.bfloat16()
    with torch.no_grad():
        fast = q(xb, w, idx)
        q.fast = False
        slow = q(xb, w, idx)
    assert len(calls) == (4 if fmt == "int8" else 0)
    torch.testing.assert_close(fast, slow, atol=2e-2 * float(slow.abs().max()), rtol=2e-2)


@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_tiny_model_logits_are_close_to_float(fmt, tol):
    m = tiny()
    x = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        ref = m(x).logits
        q = quant.quantize_model(copy.deepcopy(m), fmt)
        out = q(x).logits
    rel = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert 0 < rel < tol
    kinds = {n: type(c) for n, c in q.named_modules()}
    assert kinds["layers.0.self_attn.kv_b_proj"] is nn.Linear and kinds["layers.1.mlp.experts"] is quant.QuantExperts
    assert not any(isinstance(c, quant.QUANTIZED) for n, c in q.named_modules() if ".indexer" in n)
    assert q.lm_head.format == "int8"  # the head stays int8 in int4 mode
    if fmt == "int4":  # q_lora_rank 48 is no multiple of 32: that row width falls back to int8
        assert q.layers[0].self_attn.q_b_proj.format == "int8" and q.layers[0].self_attn.o_proj.format == "int4"


def test_memory_from_tensor_sizes():
    m = tiny()
    quantized = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.experts", "mlp.shared_experts", "lm_head")

    def part(model):  # bytes of the modules that get quantized
        return sum(quant.bytes_of(c) for n, c in model.named_modules() if n.endswith(quantized))

    f32 = part(m)
    q8, q4 = quant.quantize_model(copy.deepcopy(m), "int8"), quant.quantize_model(copy.deepcopy(m), "int4")
    assert 0.25 < part(q8) / f32 < 0.27  # 1 byte per weight + a bf16 scale per row (rows of >= 32 values)
    assert part(q4) / part(q8) < 0.8  # half a byte + 4 bytes of scale and min per 32 values; head and q_b int8
    assert quant.bytes_of(q8) / quant.bytes_of(m) < 0.5  # all in: embedding, norms, router, kv_b stay fp32


# ---- folders, engine, command line -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    tok = train_from_documents(base_docs(), 400)
    nanoseek.save_pretrained(tiny(vocab_size=tok.vocab_size), root / "float")
    tok.save(root / "float")
    (root / "text.txt").write_text(base_docs(1, seed=9)[0][:600])
    return root


def test_quantized_folder_with_tied_head_loads_bit_identically(tmp_path):
    """The head tied to the embedding is the embedding again after loading (to_empty had left it uninitialised)."""
    q = quant.quantize_model(tiny(tie_word_embeddings=True), "int8")
    quant.save_quantized(q, tmp_path)
    got = nanoseek.from_pretrained(tmp_path)
    assert got.lm_head.weight is got.embed_tokens.weight
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(q(x).logits, got(x).logits)


@pytest.mark.parametrize("fmt,G", [("int8", 32), ("int4", 64)])
def test_quantize_command_writes_a_folder_that_loads_bit_identically(model_dir, tmp_path, fmt, G, monkeypatch):
    out = tmp_path / fmt
    assert quant.cli("quantize", [str(model_dir / "float"), str(out), "--format", fmt, "--group-size", str(G),
                                  "--dtype", "float32"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"] == {"quant_method": "nanoseek", "format": fmt, "group_size": G}
    assert (out / "tokenizer.json").is_file()
    want = nanoseek.from_pretrained(model_dir / "float", dtype="float32", quantize=fmt, group_size=G)
    real = quant.quantize

    def shapes_only(w, *a, **k):  # the structure is quantized on the meta device; real weights never are
        assert w.device.type == "meta", "a quantized folder went through float weights"
        return real(w, *a, **k)

    monkeypatch.setattr(quant, "quantize", shapes_only)
    got = nanoseek.from_pretrained(out)
    sd_want, sd_got = want.state_dict(), got.state_dict()
    assert sd_want.keys() == sd_got.keys()
    for k, v in sd_want.items():
        assert v.dtype == sd_got[k].dtype and torch.equal(v, sd_got[k]), k
    assert sd_got["layers.0.self_attn.o_proj.weight"].dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(want(x).logits, got(x).logits)
    nanoseek.save_pretrained(got, tmp_path / "again")  # a quantized model saves in the same format
    again = nanoseek.from_pretrained(tmp_path / "again")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd_got.items())
    with pytest.raises(nanoseek.CheckpointError, match="cannot be re-quantized"):
        nanoseek.from_pretrained(out, quantize="int8" if fmt == "int4" else "int4")


def test_engine_generates_with_a_quantized_model():
    m = quant.quantize_model(tiny(), "int8")
    p = [5, 17, 99, 3, 250, 41]
    out = Engine(m, None, cache_bytes=4 << 20).generate([p], SamplingParams(max_tokens=8, temperature=0))[0]
    # the engine left the modules that hold quantized weights on their reference classes (plain PyTorch paths),
    # attention with its absorbed weights cached
    assert type(m.layers[1].self_attn).__name__ == "CachedAbsorbMLA"
    assert type(m.layers[1].mlp).__name__ == "MoE" and type(m.layers[1].input_layernorm).__name__ == "FastRMSNorm"
    ids = list(p)
    with torch.no_grad():  # greedy by full forwards, no cache
        for _ in range(8):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.new_token_ids == ids[len(p):]


def test_cli_flags(model_dir, capsys):
    from nanoseek import evaluate, generate
    data = str(model_dir / "text.txt")
    bpb = {}
    for q in (None, "int8", "int4"):
        args = [str(model_dir / "float"), "--data", data, "--json", "--dtype", "float32", "--max-tokens", "64"]
        assert evaluate.cli("eval", args + (["--quantize", q, "--quant-group-size", "64"] if q else [])) == 0
        bpb[q] = json.loads(capsys.readouterr().out)["bits_per_byte"]
    assert bpb[None] != bpb["int8"] and abs(bpb["int8"] / bpb[None] - 1) < 0.01
    assert abs(bpb["int4"] / bpb[None] - 1) < 0.05
    assert generate.cli("generate", [str(model_dir / "float"), "hello", "--max-tokens", "4", "--dtype", "bfloat16",
                                     "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    with pytest.raises(SystemExit):
        generate.cli("generate", [str(model_dir / "float"), "hello", "--quantize", "int3"])
    chat = generate._parser("chat").parse_args([str(model_dir / "float"), "--quantize", "int4",
                                                "--quant-group-size", "128"])
    assert (chat.quantize, chat.quant_group_size) == ("int4", 128)


def test_serve_quantized_flag_and_folder_give_the_same_completion(model_dir, tmp_path):
    import httpx
    from nanoseek.server.api import ServeConfig, ServerThread
    folder = tmp_path / "int8"
    assert quant.cli("quantize", [str(model_dir / "float"), str(folder), "--format", "int8", "--dtype", "float32"]) == 0
    texts = []
    for cfg in (ServeConfig(str(model_dir / "float"), dtype="float32", quantize="int8", max_model_len=64),
                ServeConfig(str(folder), dtype="float32", max_model_len=64)):
        with ServerThread(cfg) as srv:
            srv.wait_ready()
            assert srv.app.state.nanoseek.engine.model.quantization == quant.QuantConfig("int8")
            r = httpx.post(srv.url + "/v1/completions", json={"model": Path(cfg.model_dir).name, "prompt": "the cat",
                                                             "max_tokens": 6, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 6
            texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1]
