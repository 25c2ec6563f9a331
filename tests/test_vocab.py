"""Vocabulary extension (nanoseek.vocab): new merges keep every old id and string, are learnt from pieces that
exist and are used when encoding; the saved tokenizer loads in transformers with the same ids; the model
surgery keeps old rows bit for bit, initialises new rows as the mean of their base pieces' rows, and saves a
model transformers loads."""
import json
import random

import pytest
import torch

import nanoseek
from nanoseek import vocab as V
from nanoseek.config import get_preset
from nanoseek.tokenizer import cli, load_tokenizer, train_from_documents
from nanoseek.model.transformer import Transformer

BASE_WORDS = ("the of and to in is that it was for on are with as his they be at one have this from or had by "
              "def return import class self value data print list").split()
# a made-up language with Welsh-like letter runs the base text never has (ŵ, ŷ, dd, ll, wch, ...)
NEW_SYLL = ["dd", "ll", "wch", "ŵ", "ŷ", "rh", "yn", "edd", "ydd", "aeth", "gw", "cy", "mr", "ff", "oedd", "â"]


def base_docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(BASE_WORDS) for _ in range(200)) + "\n" for _ in range(n)]


def new_docs(n: int = 40, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(NEW_SYLL) for _ in range(rng.randint(2, 4))) for _ in range(150)]
    return [" ".join(rng.choice(words) for _ in range(200)) + ".\n" for _ in range(n)]


@pytest.fixture(scope="module")
def toks():
    base = train_from_documents(base_docs(), 400)
    return base, V.extend_tokenizer(base, new_docs(), 60)


def _spec(tok):
    return json.loads(tok.to_str())


def test_extension_keeps_every_old_id_and_string(toks):
    base, ext = toks
    assert ext.vocab_size == base.vocab_size + 60
    for i in range(base.vocab_size):
        assert ext.id_to_token(i) == base.id_to_token(i), i
    assert _spec(ext)["added_tokens"] == _spec(base)["added_tokens"]  # specials: same ids, same flags
    assert (ext.bos_id, ext.eos_id, ext.pad_id) == (base.bos_id, base.eos_id, base.pad_id)
    # merges: the base's first, in order, then the new ones, each joining tokens that exist before it
    old, new = _spec(base)["model"]["merges"], _spec(ext)["model"]["merges"]
    assert new[:len(old)] == old and len(new) == len(old) + 60
    vocab = _spec(ext)["model"]["vocab"]
    for k, (a, b) in enumerate(new[len(old):]):
        assert vocab[a + b] == base.vocab_size + k
        assert vocab[a] < vocab[a + b] and vocab[b] < vocab[a + b]


def test_extended_tokenizer_is_used_and_compresses_the_new_text(toks):
    base, ext = toks
    held = new_docs(5, seed=2)[0]
    ids = ext.encode(held)
    assert any(i >= base.vocab_size for i in ids)
    assert ext.tokens_per_word(held) < 0.8 * base.tokens_per_word(held)
    assert ext.decode(ids) == held
    text = base_docs(1, seed=3)[0] + "<think>x</think> café 日本 \xff"
    assert ext.decode(ext.encode(text)) == text
    assert ext.encode(text) == base.encode(text)  # the base domain shares no new token here


def test_learning_is_deterministic_and_stops_when_no_pair_repeats(toks):
    base, ext = toks
    assert V.learn_merges(base, new_docs(), 60) == V.learn_merges(base, new_docs(), 60)
    merges = V.learn_merges(base, ["ŵŷ\nŵŷ"], 10)  # one word seen twice, cut into its 4 bytes by the base
    assert len(merges) == 3 and V.append_merges(base, merges).encode("ŵŷ") == [base.vocab_size + 2]
    assert V.learn_merges(base, ["ŵŷ"], 10) == []  # nothing occurs twice


def test_extended_tokenizer_loads_in_transformers_with_the_same_ids(toks, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, ext = toks
    ext.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    mixed = new_docs(1, seed=4)[0][:300] + " the value of data\n\tdef f(x): return x  # café ŵ 😀"
    ours = load_tokenizer(tmp_path).encode(mixed)
    assert hf(mixed, add_special_tokens=False)["input_ids"] == ours
    assert max(ours) >= ext.vocab_size - 60
    assert hf.decode(ours) == mixed


def test_extend_cli_reports_before_and_after(toks, tmp_path, capsys):
    base, _ = toks
    base.save(tmp_path / "base")
    (tmp_path / "new.txt").write_text("".join(new_docs()))
    (tmp_path / "en.txt").write_text("".join(base_docs(5, seed=5)))
    assert cli("tokenizer", ["extend", str(tmp_path / "base"), "--data", str(tmp_path / "new.txt"), "--add", "30",
                             "--out", str(tmp_path / "ext"), "--base-data", str(tmp_path / "en.txt")]) == 0
    out = capsys.readouterr().out
    assert "added 30 tokens" in out and "new language, held out" in out and "base domain" in out
    assert load_tokenizer(tmp_path / "ext").vocab_size == base.vocab_size + 30


@pytest.mark.parametrize("pad", [0, 7, 100], ids=["exact", "padded-below", "padded-past"])
def test_surgery_keeps_old_rows_and_initialises_new_ones_as_the_mean(toks, pad):
    """pad: rows the model has beyond its tokenizer (a rounded-up vocab_size). 7 < 60 new tokens: the new ones
    take the padded rows and more are appended; 100: they fit in the padding, the rest stays as it was."""
    base, ext = toks
    model = Transformer(get_preset("tiny", vocab_size=base.vocab_size + pad))
    emb, head = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    new = V.extend_model(model, base, ext)
    assert new == range(base.vocab_size, ext.vocab_size)
    rows = max(base.vocab_size + pad, ext.vocab_size)
    assert model.config.vocab_size == rows
    assert model.embed_tokens.weight.shape == model.lm_head.weight.shape == (rows, 64)
    assert torch.equal(model.embed_tokens.weight[:base.vocab_size], emb[:base.vocab_size])
    assert torch.equal(model.lm_head.weight[:base.vocab_size], head[:base.vocab_size])
    if rows > ext.vocab_size:  # padding past the new tokens is untouched
        assert torch.equal(model.embed_tokens.weight[ext.vocab_size:], emb[ext.vocab_size:])
    for i in new:
        pieces = base.encode_bytes(ext.decode_bytes([i]))
        assert len(pieces) >= 2 and max(pieces) < base.vocab_size
        torch.testing.assert_close(model.embed_tokens.weight[i], emb[pieces].mean(0))
        torch.testing.assert_close(model.lm_head.weight[i], head[pieces].mean(0))
    ids = torch.tensor([ext.encode(new_docs(1, seed=6)[0][:200])])
    assert model(ids).logits.shape[-1] == rows


def test_surgery_refuses_a_tokenizer_that_does_not_extend_the_base(toks):
    base, _ = toks
    other = train_from_documents(new_docs(), 420)
    with pytest.raises(ValueError, match="does not extend"):
        V.extend_model(Transformer(get_preset("tiny", vocab_size=base.vocab_size)), base, other)


def test_extended_model_saves_and_loads_in_nanoseek_and_transformers(toks, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, ext = toks
    model = Transformer(get_preset("tiny", vocab_size=base.vocab_size)).eval()
    V.extend_model(model, base, ext)
    nanoseek.save_pretrained(model, tmp_path)
    ext.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == ext.vocab_size
    ids = torch.tensor([ext.encode(new_docs(1, seed=7)[0][:300])[:40]])
    assert int(ids.max()) >= base.vocab_size
    ours = nanoseek.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.get_input_embeddings().weight.shape[0] == ext.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
