"""`nanoseek eval` (nanoseek.evaluate): bits per byte equal to a direct cross-entropy, the compression figures, and
the --json contract (one object per line per file with the documented keys)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek import evaluate as E
from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import load_tokenizer, train_from_documents
from test_vocab import base_docs, new_docs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = train_from_documents(base_docs(), 400)
    torch.manual_seed(0)
    nanoseek.save_pretrained(Transformer(get_preset("tiny", vocab_size=tok.vocab_size)), root / "model")
    tok.save(root / "model")
    (root / "en.txt").write_text(base_docs(1, seed=9)[0][:600])
    (root / "new.txt").write_text(new_docs(1, seed=9)[0][:600])
    return root


def test_bits_per_byte_is_the_cross_entropy_over_the_text_bytes(model_dir):
    model = nanoseek.from_pretrained(model_dir / "model")
    tok = load_tokenizer(model_dir / "model")
    text = (model_dir / "en.txt").read_text()
    ids = [tok.bos_id, *tok.encode(text)]
    with torch.no_grad():
        nats = F.cross_entropy(model(torch.tensor([ids[:-1]])).logits[0], torch.tensor(ids[1:]), reduction="sum")
    want = float(nats) / math.log(2) / len(text.encode())
    one_row = E.evaluate_file(model, tok, model_dir / "en.txt", seq_len=1024)
    assert one_row["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    assert one_row["evaluated_tokens"] == len(ids) - 1
    assert one_row["tokens_per_word"] == pytest.approx(tok.tokens_per_word(text))
    assert one_row["tokens_per_byte"] == pytest.approx(tok.tokens_per_byte(text))
    rows = E.evaluate_file(model, tok, model_dir / "en.txt", seq_len=16, batch_size=3)  # short rows, a ragged end
    assert rows["evaluated_tokens"] == len(ids) - 1
    assert abs(rows["bits_per_byte"] - want) < 0.5  # same text, less context per prediction
    capped = E.evaluate_file(model, tok, model_dir / "en.txt", seq_len=16, max_tokens=40)
    assert capped["evaluated_tokens"] == 40 and capped["tokens"] == one_row["tokens"]


def test_json_output_is_one_object_per_file_with_the_contract_keys(model_dir, capsys):
    files = [model_dir / "en.txt", model_dir / "new.txt"]
    assert E.cli("eval", [str(model_dir / "model"), "--data", *map(str, files), "--json", "--dtype", "float32",
                          "--max-tokens", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    recs = [json.loads(line) for line in lines]
    assert [r["file"] for r in recs] == [str(f) for f in files]
    for r in recs:
        for k in ("file", "bits_per_byte", "tokens_per_word", "tokens_per_byte"):
            assert k in r, k
        assert 0 < r["bits_per_byte"] < 30 and r["evaluated_tokens"] == 64
    assert recs[1]["tokens_per_word"] > recs[0]["tokens_per_word"]  # the tokenizer never saw the second language
    assert E.cli("eval", [str(model_dir / "model"), "--data", str(files[0]), "--dtype", "float32"]) == 0
    assert "bits/byte" in capsys.readouterr().out
