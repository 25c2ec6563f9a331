"""Corpora, the deterministic split, the token cache and the packed, sharded, resumable loader."""
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

from nanoseek import chat
from nanoseek.data import (PackedLoader, TokenFile, cache_tokens, collect_files, default_corpus, heldout_batches,
                           prepare, read_documents, split_corpus, split_files, text_problem)
from nanoseek.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "é", "日本"]
    for i in range(6):
        docs = "\n".join(" ".join(rng.choice(words, size=rng.integers(3, 15))) for _ in range(rng.integers(20, 60)))
        (root / f"t{i}.txt").write_text(docs)
    (root / "code.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 5}) for i in range(30)) + "\n")
    return root


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer([corpus], 400)


@pytest.fixture(scope="module")
def stream(corpus, tok, tmp_path_factory):
    return cache_tokens(collect_files(corpus), tok, tmp_path_factory.mktemp("cache"))


def test_collect_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.md").write_text("x")
    (tmp_path / "a.py").write_text("a")
    (tmp_path / "z.jsonl").write_text('{"text": "z"}')
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    for skipped in (".git", "__pycache__"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "y.txt").write_text("y")
    (tmp_path / "notes.weird").write_text("explicit files are always taken")
    assert collect_files(tmp_path) == [tmp_path / "a.py", tmp_path / "b" / "x.md", tmp_path / "z.jsonl"]
    assert collect_files([tmp_path / "notes.weird", tmp_path, tmp_path / "a.py"])[0] == tmp_path / "notes.weird"
    assert len(collect_files([tmp_path, tmp_path])) == 3  # duplicates dropped
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        collect_files(tmp_path / "empty")


def test_read_documents(tmp_path):
    f = tmp_path / "d.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    f.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"messages": msgs}) + "\n")
    assert list(read_documents(f)) == ["one", chat.encode_messages(msgs, add_generation_prompt=False)[len(chat.BOS):]]
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*'text'"):
        list(read_documents(f))
    f.write_text("{broken\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid JSON"):
        list(read_documents(f))
    t = tmp_path / "bad.txt"
    t.write_bytes(b"caf\xe9 ok")  # Latin-1 byte: replaced, the corpus still loads
    assert list(read_documents(t)) == ["caf\ufffd ok"]


def test_default_corpus_and_split_are_deterministic_across_processes():
    files = default_corpus()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-4:-1])
    root = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(f, root) for f in files]
    assert rel == sorted(rel, key=lambda r: r.replace(os.sep, "/")) and default_corpus() == files
    train, held = split_files(files)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(files)
    assert 0.005 < len(held) / len(files) < 0.05
    # a fresh interpreter with a different hash salt gets exactly the same split
    code = ("import json; from nanoseek.data import default_corpus, split_files;"
            "t, h = split_files(default_corpus()); print(json.dumps([str(p) for p in h]))")
    for salt in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=salt)
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        assert json.loads(out) == [str(p) for p in held]


def test_split_files_edge_cases(tmp_path):
    f = tmp_path / "only.txt"
    f.write_text("x")
    assert split_files([f]) == ([f], [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_files([f], 1.0)


def test_token_cache(corpus, tok, stream, tmp_path):
    files = collect_files(corpus)
    docs = [d for f in files for d in read_documents(f)]
    want = [t for d in docs for t in [tok.bos_id] + tok.encode(d)]
    assert stream.tokens.dtype == np.uint16 and stream.tokens.tolist() == want
    assert stream.n_tokens == len(want) and stream.n_docs == len(docs)
    assert stream.n_bytes == sum(len(d.encode()) for d in docs)
    assert stream.bits_per_byte(2.0) == pytest.approx(2.0 * len(want) / (np.log(2) * stream.n_bytes))
    assert stream.bytes_of(stream.tokens) == stream.n_bytes  # per-token byte lengths add up exactly
    # small batches write the same stream; a second call is a cache hit
    again = cache_tokens(files, tok, tmp_path, batch_chars=100)
    assert again.tokens.tolist() == want
    mtime = again.path.stat().st_mtime_ns
    assert cache_tokens(files, tok, tmp_path).path == again.path and again.path.stat().st_mtime_ns == mtime
    # changing a file changes the key
    extra = tmp_path / "extra.txt"
    extra.write_text("alpha beta")
    first = cache_tokens([extra], tok, tmp_path)
    extra.write_text("alpha beta gamma")
    assert cache_tokens([extra], tok, tmp_path).path != first.path
    assert TokenFile.open(first.path).tokens.tolist() == [tok.bos_id] + tok.encode("alpha beta")


def test_files_that_are_not_text_warn_or_are_refused(tok, tmp_path, capsys):
    good, latin1, binary = tmp_path / "good.txt", tmp_path / "latin1.txt", tmp_path / "blob.txt"
    good.write_text("plain text, été\n" * 50)
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    binary.write_bytes(b"ok\x00\x01\x02" * 50)
    assert text_problem(good) is None
    assert "byte 3" in text_problem(latin1) and "NUL byte at 2" in text_problem(binary)
    prepare([good, latin1, binary], tok, tmp_path / "cache", heldout_fraction=0.0)
    err = capsys.readouterr().err
    assert f"{latin1}: not valid UTF-8" in err and f"{binary}: binary data" in err and str(good) not in err
    with pytest.raises(ValueError, match="strict-data.*latin1.txt.*blob.txt"):
        prepare([good, latin1, binary], tok, tmp_path / "cache", heldout_fraction=0.0, strict=True)
    prepare([good], tok, tmp_path / "cache", heldout_fraction=0.0, strict=True)


def test_prepare_splits_one_file_inside_its_text(tok, tmp_path):
    f = tmp_path / "one.txt"
    text = "".join(f"line {i} alpha beta gamma\n" for i in range(500))
    f.write_text(text)
    calls = []
    ds = prepare([f], tok, tmp_path / "cache", heldout_fraction=0.1, barrier=lambda: calls.append(1))
    assert calls == [1]
    assert ds.train.n_bytes + ds.heldout.n_bytes == len(text.encode())
    assert 0.08 < ds.heldout.n_bytes / len(text) < 0.12
    held_text = tok.decode(ds.heldout.tokens.tolist())
    assert held_text.startswith(chat.BOS + "line ") and text.endswith(held_text[len(chat.BOS):])
    train_docs, held_docs = split_corpus([f], 0.1)  # the same split as documents, e.g. to train a tokenizer
    assert "".join(held_docs) == held_text[len(chat.BOS):] and "".join(train_docs) + held_text[len(chat.BOS):] == text
    # a non-main rank waits, then finds rank 0's cache
    again = prepare([f], tok, tmp_path / "cache", heldout_fraction=0.1, is_main=False, barrier=lambda: None)
    assert again.train.path == ds.train.path and again.heldout.path == ds.heldout.path
    assert prepare([f], tok, tmp_path / "cache", heldout_fraction=0.0).heldout is None


def _all_batches(loader, n):
    return [loader.next() for _ in range(n)]


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """A synthetic stream whose token at position i is i + 1, except BOS (0) at document starts."""
    path = tmp_path_factory.mktemp("numbered") / "stream.bin"
    toks = np.arange(1, 3001, dtype=np.uint16)
    toks[[0, 37, 500, 501, 1999]] = 0
    path.write_bytes(toks.tobytes())
    np.save(path.with_suffix(".lens.npy"), np.ones(3002, dtype=np.int64))
    path.with_suffix(".json").write_text(json.dumps({"dtype": "uint16", "n_tokens": len(toks), "n_bytes": 9000,
                                                     "n_docs": 5, "bos_id": 0, "vocab_size": 3002}))
    return TokenFile.open(path)


def test_packed_rows_tile_the_stream(numbered):
    T, B = 16, 4
    loader = PackedLoader(numbered, T, B, seed=3)
    toks = torch.from_numpy(numbered.tokens.astype(np.int64))
    assert loader.n_rows == (len(toks) - 1) // T
    seen = torch.zeros(len(toks), dtype=torch.long)
    for x, y in _all_batches(loader, loader.steps_per_epoch):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == 0).all()  # every row opens with BOS
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        for row in y:
            j = int((row != 0).nonzero()[0])
            r = (int(row[j]) - 2 - j) // T  # row r's targets are stream[r*T+1 : r*T+T+1]
            assert torch.equal(row, toks[r * T + 1:r * T + T + 1])
            seen[r * T + 1:r * T + T + 1] += 1
    assert seen.sum() == loader.steps_per_epoch * B * T and seen.max() == 1  # each target at most once per epoch
    # the rows left out of this epoch are fewer than one batch
    assert loader.n_rows * T - seen.sum() < B * T


def test_loader_is_deterministic_and_shards_like_one_big_batch(stream):
    T, B, W = 8, 2, 3
    single = PackedLoader(stream, T, B * W, seed=7)
    ranks = [PackedLoader(stream, T, B, rank=r, world_size=W, seed=7) for r in range(W)]
    steps = single.steps_per_epoch + 3  # across an epoch boundary
    for _ in range(steps):
        x, y = single.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert single.epoch == 1
    a, b = PackedLoader(stream, T, B, seed=1), PackedLoader(stream, T, B, seed=1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(_all_batches(a, 5), _all_batches(b, 5)))
    c = PackedLoader(stream, T, B, seed=2)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(_all_batches(PackedLoader(stream, T, B, seed=1), 5),
                                                             _all_batches(c, 5)))


def test_loader_resume_continues_with_the_same_batches(stream):
    T, B = 8, 4
    ref = PackedLoader(stream, T, B, seed=5)
    k = ref.steps_per_epoch - 2  # stop just before an epoch boundary
    _all_batches(ref, k)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON/torch.save round trip
    expected = _all_batches(ref, 6)
    resumed = PackedLoader(stream, T, B, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(expected, _all_batches(resumed, 6)))
    # the position is global: two ranks of half the batch resume at the same place
    halves = [PackedLoader(stream, T, B // 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    x = torch.cat([h.next()[0] for h in halves])
    assert torch.equal(x, expected[0][0])
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(stream, T * 2, B, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(stream, T, B, seed=6).load_state_dict(state)


def test_loader_rejects_bad_arguments(stream):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(stream, stream.n_tokens, 1)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(stream, 8, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(stream, 0, 2)
    with pytest.raises(FileNotFoundError):
        PackedLoader(stream.path.with_name("nope.bin"), 8, 2)


def test_heldout_batches_cover_every_row_once_in_fixed_order(stream):
    T = 8
    n_rows = (stream.n_tokens - 1) // T
    one = list(heldout_batches(stream, T, 5))
    assert sum(x.shape[0] for x, _, _ in one) == n_rows
    assert all((x[:, 0] == stream.bos_id).all() and x.shape[0] <= 5 for x, _, _ in one)
    ys = torch.cat([y for _, y, _ in one])
    assert sum(b for _, _, b in one) == stream.bytes_of(stream.tokens[1:1 + n_rows * T])
    shards = [torch.cat([y for _, y, _ in heldout_batches(stream.path, T, 5, None, r, 3)]) for r in range(3)]
    for r in range(3):
        assert torch.equal(shards[r], ys[r::3])
    assert torch.equal(torch.cat([y for _, y, _ in heldout_batches(stream, T, 5)]), ys)  # same order every time
    # a token budget takes the first rows; a device moves them
    some = list(heldout_batches(stream, T, 4, 10 * T, device="cpu"))
    assert torch.equal(torch.cat([y for _, y, _ in some]), ys[:10])
    # a held-out set shorter than one row is read as one shorter row; none gives nothing
    (x, y, _), = heldout_batches(stream, stream.n_tokens + 100, 1)
    assert x.shape == (1, stream.n_tokens - 1)
    assert list(heldout_batches(None, T, 5)) == []
