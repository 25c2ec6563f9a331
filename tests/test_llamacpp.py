"""llama.cpp interop on a tiny V3.2 model (indexer heads widened to 64, as llama.cpp's deepseek32 needs): llama.cpp's
own converter without the wrapper stops at the pre-tokenizer and nowhere else; with it, the GGUF names the
pre-tokenizer and BOS, nanoseek reads it back to the same logits, and llama.cpp decodes the same greedy tokens as
nanoseek's engine (bench/llamacpp_greedy.py's pieces); llama-quantize's Q4_1 of that file reads back within Q4_1's
rounding. These need the pinned llama.cpp tree, its converter's transformers and its build under the bench's cache
(`bench/llamacpp.py`; made by running bench/decode.py --peer llamacpp once); they skip where those are missing, and
never download or build anything but the small greedy tool."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llamacpp  # noqa: E402
import llamacpp_greedy  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek import data, tokenizer  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402

pytestmark = pytest.mark.slow


def llamacpp_parts():
    """(source tree, converter's transformers folder) already in the bench's cache, or a skip."""
    root = llamacpp.cache_root()
    src = root / f"llama_cpp_python-{llamacpp.VERSION}" / "vendor" / "llama.cpp"
    deps = sorted((root / "convert-deps").glob("*/transformers"))
    if not (src / "convert_hf_to_gguf.py").is_file() or not deps:
        pytest.skip(f"no llama.cpp tree with its converter's transformers under {root} (run bench/decode.py "
                    f"--peer llamacpp once)")
    return src, deps[-1].parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = get_preset("tiny", index_head_dim=64)
    d = tmp_path_factory.mktemp("tiny-v32")
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
    docs = (doc for f in data.default_corpus() for doc in data.read_documents(f))
    tokenizer.train_from_documents(docs, cfg.vocab_size, max_chars=300_000).save(d)
    return d


def test_unwrapped_converter_stops_only_at_the_pre_tokenizer(hf_dir, tmp_path):
    """llama.cpp's converter as shipped, under its pinned transformers: it gets past the V3.2 add_bos_token assert
    (the tokenizer_config nanoseek saves) and stops where the wrapper steps in, the unknown pre-tokenizer hash."""
    src, deps = llamacpp_parts()
    got = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile",
                          str(tmp_path / "m.gguf"), "--outtype", "f32"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(deps)))
    assert got.returncode != 0
    assert "BPE pre-tokenizer was not recognized" in got.stderr
    assert "add_bos_token" not in got.stderr


@pytest.fixture(scope="module")
def gguf_file(hf_dir, tmp_path_factory):
    src, _ = llamacpp_parts()
    return llamacpp.convert(src, hf_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32")


def test_converted_gguf_names_pre_tokenizer_and_bos_and_loads_to_same_logits(hf_dir, gguf_file):
    import gguf
    fields = gguf.GGUFReader(gguf_file).fields

    def field(name):
        return fields[name].contents()

    assert field("general.architecture") == "deepseek32"
    assert field("tokenizer.ggml.pre") == "llama-bpe" and field("tokenizer.ggml.add_bos_token") is True
    assert field("deepseek32.attention.indexer.key_length") == 64
    ids = torch.tensor([[0, 5, 17, 300, 42, 7]])
    with torch.no_grad():
        want = nanoseek.from_pretrained(hf_dir, dtype=torch.float32)(ids).logits
        got = nanoseek.from_pretrained(gguf_file, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_llamacpp_greedy_tokens_equal_nanoseek_engine(hf_dir, gguf_file):
    src, _ = llamacpp_parts()
    root = llamacpp.cache_root()
    if not (root / "build" / "src" / "libllama.a").is_file():
        pytest.skip(f"no llama.cpp build under {root}")
    binary = llamacpp.build_greedy(src, root)
    prompts = ("The history of the city", "def f(x):\n    return")
    ll = llamacpp_greedy.llamacpp_greedy(binary, gguf_file, prompts, 12, 1)
    tok = tokenizer.load_tokenizer(hf_dir)
    assert [r["prompt"] for r in ll] == [tok.encode(p, add_bos=True) for p in prompts]
    model = nanoseek.from_pretrained(hf_dir, dtype=torch.float32)
    ns = llamacpp_greedy.nanoseek_greedy(model, [r["prompt"] for r in ll], 12)
    for r, toks in zip(ll, ns):
        c = llamacpp_greedy.compare(model, r["prompt"], toks, r["tokens"], r["margins"])
        # a random model's near-ties may part ways only where llama.cpp's own margin is tiny
        assert c.same or c.ll_margin < 1e-3, c


def test_model_without_indexer_computes_the_same_within_top_k(hf_dir, tmp_path):
    """What llamacpp_greedy.py hands llama.cpp for indexer heads under 64: the same logits up to index_topk tokens."""
    model = nanoseek.from_pretrained(hf_dir, dtype=torch.float32)
    v3_dir = llamacpp_greedy.without_indexer(model, str(hf_dir), str(tmp_path / "v3"))
    dense = nanoseek.from_pretrained(v3_dir, dtype=torch.float32)
    assert dense.config.model_type == "deepseek_v3" and not dense.config.use_dsa
    ids = torch.randint(3, model.config.vocab_size, (1, model.config.index_topk))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert tokenizer.load_tokenizer(v3_dir).encode("the fox") == tokenizer.load_tokenizer(hf_dir).encode("the fox")


def test_llama_quantize_q4_1_file_reads_back_close_to_its_f32_source(gguf_file, tmp_path):
    """The int4 arm's file of bench/decode.py --peer llamacpp: llama-quantize's Q4_1 of the f32 file (head Q8_0) reads
    into nanoseek with every weight within Q4_1's rounding of the f32 one (half a step of a 32-value block: at most
    1/15 of the largest magnitude) and loads as nanoseek int4 at group 32."""
    import gguf
    binary = llamacpp.cache_root() / "build" / "bin" / "llama-quantize"
    if not binary.is_file():
        pytest.skip(f"no {binary} (run bench/decode.py --peer llamacpp once)")
    q4 = llamacpp.quantize(binary, gguf_file, tmp_path / "q4_1.gguf", "Q4_1", 1)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4).tensors}
    assert types["output.weight"] == "Q8_0" and types["blk.1.ffn_gate_exps.weight"] == "Q4_1", types
    want = dict(nanoseek.from_pretrained(gguf_file, dtype=torch.float32).named_parameters())
    for name, p in nanoseek.from_pretrained(q4, dtype=torch.float32).named_parameters():
        assert (p - want[name]).abs().max() <= want[name].abs().max() / 15 + 1e-6, name
    model = nanoseek.from_pretrained(q4, dtype=torch.float32, quantize="int4", group_size=llamacpp.INT4_GROUP)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 5, 17, 300]])).logits).all()
