"""GGUF files (nanoseek.gguf): write -> read round trips of tiny V3.2 and V2 models (logits equal in F32, close in
BF16 / Q8_0), llama.cpp's own converter against our writer (same keys, values, tensors, types and data) and our
reader (same logits as the HF folder), every read tensor type against gguf.quants' reference dequantization, the
one-line error for a type nanoseek does not read, the tokenizer a file carries encoding like the original, and the
.gguf path through from_pretrained, load_tokenizer, `nanoseek export-gguf`, `generate` and `serve`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import nanoseek
from nanoseek import chat
from nanoseek.cli import main as nanoseek_main
from nanoseek.checkpoint import CheckpointError
from nanoseek.config import get_preset
from nanoseek.gguf import load_gguf, read_config, write_gguf
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import load_tokenizer, train_from_documents
from test_vocab import base_docs

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
T = gguf.GGMLQuantizationType
TEXTS = ["def f(x):\n    return x ** 2  # 12345 squared\n\n", "  leading spaces,\ttabs\r\nand CRLF",
         "héllo wörld, 日本語のテキスト and emoji 🙂🙂", f"{chat.USER}hi{chat.ASSISTANT}{chat.THINK}hmm{chat.END_THINK}ok",
         "don't I'll we've THEY'RE 3.14159 1,000,000"]


def tiny(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(get_preset("tiny", **kw)).eval()
    with torch.no_grad():  # a non-zero router bias, so that a lost exp_probs_b shows in the logits
        for name, p in m.named_parameters():
            if name.endswith("e_score_correction_bias") or "k_norm.bias" in name:
                p.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def tok():
    return train_from_documents(base_docs(), 400)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rewrite(src: Path, dst: Path, replace: dict, fields: dict = {}) -> None:
    """A copy of a GGUF file with tensors replaced, dropped (None) or added by {name: (raw numpy data, GGML type)}
    and metadata keys replaced or dropped (None) by {key: (value, GGUFValueType)}."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in fields:
            if fields[key] is not None:
                w.add_key_value(key, *fields[key])
            continue
        w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        data, qtype = replace.get(t.name, (np.array(t.data), t.tensor_type)) or (None, None)
        if data is not None:
            w.add_tensor(t.name, data, raw_dtype=qtype)
    for name, (data, qtype) in ((n, v) for n, v in replace.items() if v and n not in {t.name for t in r.tensors}):
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- round trips ------------------------------------------------------------------------------------------
def test_f32_round_trip_is_exact_with_mtp_and_indexer(tok, tmp_path):
    m = tiny(vocab_size=tok.vocab_size + 20)  # rows past the tokenizer: UNUSED entries, as the converter writes
    path = write_gguf(m, tok, tmp_path / "m.gguf", "f32")
    got, got_tok = load_gguf(path)
    assert got.config == m.config
    sd = got.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, m.config.vocab_size, (2, 24))
    assert torch.equal(logits(m, ids), logits(got, ids))
    assert got_tok.vocab_size == tok.vocab_size


@pytest.mark.parametrize("out_type,tol", [("bf16", 0.02), ("q8_0", 0.02)])
def test_bf16_and_q8_0_round_trips_are_close(tok, tmp_path, out_type, tol):
    m = tiny(vocab_size=tok.vocab_size)
    got, _ = load_gguf(write_gguf(m, tok, tmp_path / "m.gguf", out_type), dtype="float32")
    ids = torch.randint(0, m.config.vocab_size, (2, 24))
    want, have = logits(m, ids), logits(got, ids)
    rel = (want - have).norm() / want.norm()
    assert 0 < rel < tol, rel  # not exact (the weights were rounded), but close
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_norm.weight"] == T.F32 and types["blk.1.ffn_gate_inp.weight"] == T.F32
    assert types["blk.1.ffn_gate_exps.weight"] == (T.BF16 if out_type == "bf16" else T.Q8_0)
    if out_type == "q8_0":  # q_b's rows are 48 values, not a multiple of Q8_0's 32-value blocks: F16 instead
        assert types["blk.0.attn_q_b.weight"] == T.F16
    default = nanoseek.from_pretrained(tmp_path / "m.gguf")  # dtype: bfloat16 when every matrix is BF16
    assert default.embed_tokens.weight.dtype == (torch.bfloat16 if out_type == "bf16" else torch.float32)


def test_quantize_at_load_makes_nanoseek_int8(tok, tmp_path):
    m = tiny(vocab_size=tok.vocab_size)
    path = write_gguf(m, tok, tmp_path / "m.gguf", "f32")
    q, _ = load_gguf(path, quantize="int8")
    assert q.layers[0].self_attn.o_proj.weight.dtype == torch.int8
    ids = torch.randint(0, m.config.vocab_size, (2, 24))
    want = logits(m, ids)
    assert 0 < (logits(q, ids) - want).norm() / want.norm() < 0.02


def test_v2_layout_round_trips_without_q_lora_yarn_or_mtp(tok, tmp_path):
    """deepseek2 with softmax gating: plain q projection (attn_q), greedy routing, tied head, default RoPE."""
    m = tiny(vocab_size=tok.vocab_size, model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax",
             topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
             rope_type="default", index_topk=0, index_n_heads=0, num_nextn_predict_layers=0,
             tie_word_embeddings=True, rope_factor=40.0, original_max_position_embeddings=4096, index_head_dim=128)
    # (the fields not stored without YaRN and DSA are at their ModelConfig defaults, which the reader gives)
    path = write_gguf(m, tok, tmp_path / "v2.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "blk.0.attn_q.weight" in names and "output.weight" not in names
    got, _ = load_gguf(path)
    assert got.config == m.config
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    assert torch.equal(logits(m, ids), logits(got, ids))


def test_v3_file_drops_the_mtp_block_as_the_converter_does(tok, tmp_path):
    m = tiny(vocab_size=tok.vocab_size, model_type="deepseek_v3", index_topk=0, index_n_heads=0, index_head_dim=128)
    r = gguf.GGUFReader(write_gguf(m, tok, tmp_path / "v3.gguf", "f32"))
    assert r.fields["general.architecture"].contents() == "deepseek2"
    assert not any(t.name.startswith(f"blk.{m.config.num_hidden_layers}.") for t in r.tensors)
    cfg = read_config(r)
    assert cfg == m.config.replace(num_nextn_predict_layers=0)


def test_older_converters_whole_kv_b_and_mha_lengths_load(tok, tmp_path):
    """Files of converters before the k_b / v_b split: one attn_kv_b per layer, and key/value_length per MHA head
    (no *_mla keys, head_count_kv = head_count), as many published DeepSeek GGUFs still are."""
    m = tiny(vocab_size=tok.vocab_size)
    cfg = m.config
    src = write_gguf(m, tok, tmp_path / "new.gguf", "f32")
    blocks = [(f"blk.{i}.", b) for i, b in enumerate([*m.layers, *(k.block for k in m.mtp)])]
    replace = {p + n: None for p, _ in blocks for n in ("attn_k_b.weight", "attn_v_b.weight")}
    replace.update({p + "attn_kv_b.weight": (b.self_attn.kv_b_proj.weight.detach().numpy(), T.F32) for p, b in blocks})
    u32 = gguf.GGUFValueType.UINT32
    fields = {"deepseek32.attention.key_length_mla": None, "deepseek32.attention.value_length_mla": None,
              "deepseek32.attention.key_length": (cfg.qk_head_dim, u32),
              "deepseek32.attention.value_length": (cfg.v_head_dim, u32),
              "deepseek32.attention.head_count_kv": (cfg.num_attention_heads, u32)}
    rewrite(src, tmp_path / "old.gguf", replace, fields)
    assert "blk.0.attn_kv_b.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "old.gguf").tensors}
    got, _ = load_gguf(tmp_path / "old.gguf")
    assert got.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(logits(m, ids), logits(got, ids))


# ---- tensor types -----------------------------------------------------------------------------------------
def _random_blocks(qtype, rows: int, cols: int) -> np.ndarray:
    """Random K-quant blocks (gguf.quants cannot quantize these) with finite, moderate f16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)
    if qtype == T.Q6_K:  # ..., d at the end of the block
        raw[..., -2:] = scales[:2]
    else:  # d, dmin first
        raw[..., :4] = scales
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_each_read_type_dequantizes_like_gguf_quants_in_a_model(tok, tmp_path, qtype):
    """One weight of a model file stored in `qtype`: the loaded parameter is gguf.quants' dequantization of
    those bytes, in torch's dimension order (ffn_down [64, 256]: not square, so a transpose would show)."""
    m = tiny(vocab_size=tok.vocab_size, intermediate_size=256)
    src = write_gguf(m, tok, tmp_path / "f32.gguf", "f32")
    w = m.layers[0].mlp.down_proj.weight.detach().numpy()
    raw = _random_blocks(qtype, *w.shape) if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else gguf.quants.quantize(w, qtype)
    rewrite(src, tmp_path / "q.gguf", {"blk.0.ffn_down.weight": (raw, qtype)})
    got, _ = load_gguf(tmp_path / "q.gguf")
    have = got.layers[0].mlp.down_proj.weight
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert have.shape == want.shape == (64, 256)
    assert torch.equal(have, want) and torch.isfinite(have).all()
    if qtype not in (T.Q4_K, T.Q5_K, T.Q6_K):  # quantized from the weight: close to it, within the type's step
        bound = {T.F32: 0, T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 1e-2, T.Q4_0: 0.2, T.Q4_1: 0.1}[qtype]
        assert (have - m.layers[0].mlp.down_proj.weight).abs().max() <= bound * np.abs(w).max()


def test_unsupported_type_is_one_line_naming_the_type_and_tensor(tok, tmp_path):
    m = tiny(vocab_size=tok.vocab_size, intermediate_size=256)
    src = write_gguf(m, tok, tmp_path / "f32.gguf", "f32")
    block, size = gguf.GGML_QUANT_SIZES[T.IQ2_XXS]
    raw = np.zeros((64, 256 // block * size), dtype=np.uint8)
    rewrite(src, tmp_path / "iq.gguf", {"blk.0.ffn_down.weight": (raw, T.IQ2_XXS)})
    with pytest.raises(CheckpointError) as e:
        load_gguf(tmp_path / "iq.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "'blk.0.ffn_down.weight'" in msg and "IQ2_XXS" in msg, msg


def test_missing_or_misshapen_tensors_are_named(tok, tmp_path):
    m = tiny(vocab_size=tok.vocab_size)
    src = write_gguf(m, tok, tmp_path / "m.gguf", "f32")
    bad = np.zeros((7, 64), dtype=np.float32)
    rewrite(src, tmp_path / "bad.gguf", {"blk.0.attn_q_a.weight": (bad, T.F32)})
    with pytest.raises(CheckpointError, match=r"attn_q_a\.weight.*\(7, 64\).*q_a_proj"):
        load_gguf(tmp_path / "bad.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a GGUF file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        nanoseek.from_pretrained(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama' is not a DeepSeek one"):
        load_gguf(tmp_path / "llama.gguf")


# ---- tokenizer --------------------------------------------------------------------------------------------
def test_tokenizer_from_gguf_encodes_and_decodes_like_the_original(tok, tmp_path):
    tok = load_tokenizer(tok.save(tmp_path / "tok"))  # as saved: with its chat template
    path = write_gguf(tiny(vocab_size=tok.vocab_size + 8), tok, tmp_path / "m.gguf", "f32")
    got = load_tokenizer(path)  # the .gguf path dispatches to nanoseek.gguf
    assert (got.bos_id, got.eos_id, got.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert got.vocab_size == tok.vocab_size and got.special_ids == tok.special_ids
    for text in TEXTS + base_docs(3, seed=5):
        ids = tok.encode(text)
        assert got.encode(text) == ids, text
        assert got.decode(ids) == tok.decode(ids)
    assert got.decode([tok.eos_id, tok.think_id]) == tok.decode([tok.eos_id, tok.think_id])  # EOS special, <think> text
    assert got.encode_bytes(b"\xff\xfeok") == tok.encode_bytes(b"\xff\xfeok")
    assert got.config["chat_template"] == tok.config["chat_template"]


# DeepSeek V3's tokenizer.json pre-tokenizer, as published (JSON text): llama.cpp calls it "deepseek-v3"
DEEPSEEK_V3_PRE = r"""{"type": "Sequence", "pretokenizers": [
  {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
  {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated", "invert": false},
  {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
  {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"""


def test_deepseek_v3_pre_tokenizer_round_trips(tok, tmp_path):
    """A vocabulary split the way DeepSeek's own tokenizer.json splits is written as llama.cpp's "deepseek-v3" and
    read back splitting the same (digits in threes, CJK runs apart, punctuation glued to the word after it)."""
    from tokenizers import Tokenizer as Backend
    from nanoseek.tokenizer import PAD, Tokenizer
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = json.loads(DEEPSEEK_V3_PRE)
    ds = Tokenizer(Backend.from_str(json.dumps(spec)), chat.BOS, chat.EOS, PAD)
    path = write_gguf(tiny(vocab_size=tok.vocab_size), ds, tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "deepseek-v3"
    got = load_tokenizer(path)
    def pieces(t, text):
        return [p for p, _ in t.backend.pre_tokenizer.pre_tokenize_str(text)]

    for text in TEXTS + ["#include <stdio.h> 1234567 日本語abcカタカナ e\u0301t\u00e9"]:
        assert pieces(got, text) == pieces(ds, text), text
        assert got.encode(text) == ds.encode(text), text
    assert pieces(ds, "日本語abc") != pieces(tok, "日本語abc")  # CJK runs apart: not GPT-4's split


# ---- llama.cpp's converter --------------------------------------------------------------------------------
def llama_cpp_file(sub: str, what: str) -> Path:
    """A file of what bench/llamacpp.py fetches and builds (under $NANOSEEK_CACHE or ~/.cache/nanoseek); skip
    without it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import llamacpp
    for root in (llamacpp.cache_root(), Path.home() / ".cache" / "nanoseek" / "llamacpp" / llamacpp.VERSION):
        if (root / sub.format(version=llamacpp.VERSION)).is_file():
            return root / sub.format(version=llamacpp.VERSION)
    pytest.skip(f"llama.cpp's {what} is not there (python bench/decode.py --peer llamacpp fetches and builds it)")


def llama_cpp_tree() -> Path:
    return llama_cpp_file("llama_cpp_python-{version}/vendor/llama.cpp/convert_hf_to_gguf.py", "source").parent


# The converter's V3.2 class asserts `tokenizer.add_bos_token`, which transformers 5's tokenizers no longer carry as an
# attribute; the folder's tokenizer_config.json says add_bos_token: true, so the attribute is set from it, in the
# converter's process only. Then bench/llamacpp_convert.py runs as it does for the bench.
_RUN_CONVERTER = """
import json, runpy, sys
from pathlib import Path
from transformers import AutoTokenizer
load = AutoTokenizer.from_pretrained
def with_add_bos(path, *a, **k):
    tok = load(path, *a, **k)
    tok.add_bos_token = json.loads((Path(path) / "tokenizer_config.json").read_text())["add_bos_token"]
    return tok
AutoTokenizer.from_pretrained = with_add_bos
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    got = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(ROOT / "bench" / "llamacpp_convert.py"),
                          str(src), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                         capture_output=True, text=True, env=env)
    assert got.returncode == 0 and out.is_file(), got.stderr[-2000:]
    return out


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v32"])
def converted(request, tok, tmp_path_factory):
    """A tiny V3 (deepseek2) or V3.2 (deepseek32: indexer and MTP block) HF folder and llama.cpp's f32, bf16 and
    q8_0 conversions of it."""
    src = llama_cpp_tree()
    root = tmp_path_factory.mktemp("llamacpp")
    hf = root / f"tiny-{request.param}"
    kw = dict(model_type="deepseek_v3", index_topk=0, index_n_heads=0) if request.param == "deepseek_v3" else {}
    nanoseek.save_pretrained(tiny(vocab_size=tok.vocab_size + 10, **kw), hf)
    tok.save(hf)
    return hf, {t: convert(src, hf, root / f"conv-{t}.gguf", t) for t in ("f32", "bf16", "q8_0")}


@pytest.mark.slow  # llama.cpp's converter runs six times (two models, three types): about a minute
def test_converter_output_loads_with_the_logits_and_tokens_of_its_folder(converted):
    hf, files = converted
    want = nanoseek.from_pretrained(hf, dtype="float32")
    got, got_tok = load_gguf(files["f32"])
    v3 = want.config.model_type == "deepseek_v3"  # deepseek2: the converter drops the MTP block
    assert got.config == want.config.replace(num_nextn_predict_layers=0 if v3 else 1)
    assert set(got.state_dict()) == {k for k in want.state_dict() if not (v3 and k.startswith("mtp."))}
    ids = torch.randint(0, want.config.vocab_size, (2, 24))
    assert torch.equal(logits(want, ids), logits(got, ids))
    if not v3:  # the MTP block read from blk.L (nextn.*) predicts as the folder's does
        with torch.no_grad():
            h = want(ids).hidden[:, :-1]
            assert torch.equal(want.mtp_forward(0, h, ids[:, 1:])[0], got.mtp_forward(0, h, ids[:, 1:])[0])
    orig = load_tokenizer(hf)
    for text in TEXTS:
        assert got_tok.encode(text) == orig.encode(text), text
    q8 = nanoseek.from_pretrained(files["q8_0"], dtype="float32")  # from_pretrained takes a .gguf path too
    rel = (logits(q8, ids) - logits(want, ids)).norm() / logits(want, ids).norm()
    assert 0 < rel < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f32", "bf16", "q8_0"])
def test_export_gguf_writes_what_the_converter_writes(converted, tmp_path, out_type):
    hf, files = converted
    ours = tmp_path / "ours.gguf"
    assert nanoseek_main(["export-gguf", str(hf), str(ours), "--type", out_type]) == 0
    a, b = gguf.GGUFReader(files[out_type]), gguf.GGUFReader(ours)
    fields = [(k, f.types, f.contents()) for k, f in a.fields.items()]
    assert fields == [(k, f.types, f.contents()) for k, f in b.fields.items()]  # keys, types, values and order
    tensors = {t.name: (t.tensor_type, [int(d) for d in t.shape], np.array(t.data).tobytes()) for t in a.tensors}
    assert tensors == {t.name: (t.tensor_type, [int(d) for d in t.shape], np.array(t.data).tobytes())
                       for t in b.tensors}
    assert ours.read_bytes() == files[out_type].read_bytes()  # the tensor order too: the very same file


@pytest.mark.parametrize("arch,out_type", [("deepseek2", "f32"), ("deepseek2", "q8_0"), ("deepseek32", "bf16")])
def test_llama_bench_runs_our_files(tok, tmp_path, arch, out_type):
    """llama.cpp loads and decodes what export writes (V3.2 with 64-wide indexer heads: llama.cpp's Hadamard
    rotation of the indexer does not take the tiny preset's 16, in the converter's file as in ours)."""
    binary = llama_cpp_file("build/bin/llama-bench", "llama-bench binary")
    kw = dict(index_head_dim=64) if arch == "deepseek32" else dict(model_type="deepseek_v3", index_topk=0,
                                                                   index_n_heads=0)
    path = write_gguf(tiny(vocab_size=tok.vocab_size, **kw), tok, tmp_path / "m.gguf", out_type)
    got = subprocess.run([str(binary), "-m", str(path), "-p", "0", "-n", "4", "-t", "1", "-r", "1", "-o", "json"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    result = json.loads(got.stdout)[0]
    assert result["n_gen"] == 4 and result["model_type"].startswith(arch), result["model_type"]


# ---- commands ---------------------------------------------------------------------------------------------
def test_info_reads_a_gguf_config(tok, tmp_path, capsys):
    m = tiny(vocab_size=tok.vocab_size)
    path = write_gguf(m, tok, tmp_path / "m.gguf", "q8_0")
    assert nanoseek_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    n = m.config.num_params()
    assert json.loads(out[:out.rindex("}") + 1]) == m.config.to_hf() and f"{n['total']:,} total" in out


def test_export_gguf_error_is_one_line(tmp_path, capsys):
    assert nanoseek_main(["export-gguf", str(tmp_path / "nothing"), str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek export-gguf: error: ") and "\n" not in err


def test_generate_and_serve_take_a_gguf_file(tok, tmp_path, capsys):
    import openai
    from nanoseek.server.api import ServeConfig, ServerThread
    m = tiny(vocab_size=tok.vocab_size)
    path = write_gguf(m, tok, tmp_path / "tiny-model.gguf", "f32")
    prompt = "def f(x):"
    ids = torch.tensor([tok.encode(prompt, add_bos=True)])
    greedy = [int(logits(m, ids)[0, -1].argmax())]
    assert nanoseek_main(["generate", str(path), prompt, "--max-tokens", "1", "--dtype", "float32"]) == 0
    assert tok.decode(greedy) in capsys.readouterr().out
    with ServerThread(ServeConfig(str(path), dtype="float32", max_model_len=64)) as srv:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-")
        assert [x.id for x in client.models.list().data][0] == "tiny-model"
        out = client.completions.create(model="tiny-model", prompt=prompt, max_tokens=1, temperature=0)
        assert out.choices[0].text == tok.decode(greedy)
