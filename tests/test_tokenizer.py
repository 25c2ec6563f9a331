"""Byte-level BPE tokenizer: exact byte round-trips (invalid UTF-8 too), specials, HF layout, loading, CLI."""
import json
import random

import pytest

from nanoseek import chat
from nanoseek.tokenizer import (PAD, SPECIAL_TOKENS, byte_alphabet, cli, compression_report,
                                load_tokenizer, train_from_documents, train_tokenizer)

WORDS = "the of and to in is that it was for on are with as his they be at one have this from or had by".split()


def write_corpus(root, n_files=4, seed=0):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        syll = ["ka", "lo", "mi", "tre", "sun", "dor", "pa", "el", "qu", "ix", "bra", "no", "vel", "ti"]
        words = WORDS + ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(300)]
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,;!?")
                 for _ in range(300)]
        lines += [f"def f{j}(x, y={j}):\n    return x * {j} + y  # café, naïve, 日本" for j in range(40)]
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    return sorted(root.glob("*.txt"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_tokenizer(write_corpus(root / "corpus"), 600, out_dir=root / "out")


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("saved"))


def test_specials_take_deepseek_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 600
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i and tok.id_to_token(i) == t
        assert tok.encode(t) == [i] and tok.decode([i]) == t
    assert (tok.user_id, tok.assistant_id, tok.think_id, tok.end_think_id) == tuple(
        SPECIAL_TOKENS.index(t) for t in (chat.USER, chat.ASSISTANT, chat.THINK, chat.END_THINK))
    assert tok.fim_begin_id is not None and tok.fim_hole_id is not None and tok.fim_end_id is not None
    text = f"{chat.BOS}{chat.USER}hi{chat.ASSISTANT}<think>r</think>ok{chat.EOS}"
    assert tok.decode(tok.encode(text)) == text
    # only BOS/EOS/pad are skippable; the think tags stay for the reasoning parser
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == f"{chat.USER}hi{chat.ASSISTANT}<think>r</think>ok"


def test_random_bytes_round_trip_exactly(tok):
    rng = random.Random(1)
    crafted = [b"", b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x00\x01\n\r\t",
               "é日😀".encode()[:-1], b"ok \xe2\x82 then " + chat.EOS.encode() + b"\xfe<think>",
               bytes(range(256)), bytes(range(255, -1, -1))]
    randoms = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))) for _ in range(300)]
    # mostly-valid text with a few corrupted bytes: the realistic case
    mixed = []
    for _ in range(100):
        b = bytearray(" ".join(rng.choice(WORDS + ["日本", "é", "😀"]) for _ in range(20)).encode())
        for _ in range(3):
            b[rng.randrange(len(b))] = rng.randrange(128, 256)
        mixed.append(bytes(b))
    for b in crafted + randoms + mixed:
        ids = tok.encode_bytes(b)
        assert tok.decode_bytes(ids) == b
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_bytes(b"abc", add_bos=True)[0] == tok.bos_id


def test_random_text_round_trips(tok):
    rng = random.Random(2)
    alphabet = [chr(c) for c in [*range(32, 127), 9, 10, 13, 0, 0xe9, 0x65e5, 0x1f600, 0x200b, 0xfeff, 0x10ffff]]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.encode_bytes(s.encode()) == ids  # valid UTF-8 takes the ordinary path
    assert tok.encode("hello", add_bos=True) == [tok.bos_id] + tok.encode("hello")


def test_byte_alphabet_is_a_bijection():
    table = byte_alphabet()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_bad_input_raises_clear_errors(tok):
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="integers"):
        tok.decode(["a"])
    # ids past the tokenizer (padded embedding rows) have no text
    assert tok.decode(tok.encode("the") + [tok.vocab_size, tok.vocab_size + 7]) == "the"
    with pytest.raises(ValueError, match="encode_bytes"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="takes bytes"):
        tok.encode_bytes("text")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(ValueError, match="vocab_size"):
        train_from_documents(["some text"], 100)
    with pytest.raises(ValueError, match="no text files"):
        train_tokenizer([], 1000)


def test_autotokenizer_loads_saved_folder_and_encodes_identically(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    rng = random.Random(3)
    for _ in range(50):
        s = " ".join(rng.choice(WORDS + ["日本", "<think>", chat.USER, "\n", "  x=1"]) for _ in range(15))
        assert hf(s).input_ids == tok.encode(s, add_bos=True)
        assert hf(s, add_special_tokens=False).input_ids == tok.encode(s)
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    turn = chat.encode_messages([{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "ok", "reasoning_content": "r"}], False, True)
    assert hf.decode(tok.encode(turn), skip_special_tokens=True) == tok.decode(tok.encode(turn), True)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == chat.BOS and cfg["eos_token"] == chat.EOS and cfg["pad_token"] == PAD
    assert cfg["chat_template"] == chat.chat_template("v3.2") and cfg["model_max_length"] > 0
    # DeepSeek V3's layout, which llama.cpp's V3.2 converter (under transformers 4) reads add_bos_token from
    assert (cfg["tokenizer_class"], cfg["unk_token"], cfg["add_bos_token"]) == ("LlamaTokenizerFast", None, True)


def test_load_tokenizer_folder_file_and_foreign(tok, tok_dir, tmp_path):
    for path in (tok_dir, tok_dir / "tokenizer.json"):
        again = load_tokenizer(path)
        assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (0, 1, 2, tok.vocab_size)
        assert again.encode("the fox 日本") == tok.encode("the fox 日本")
    # a GPT-2 style vocabulary without any config: <|endoftext|> is both BOS and EOS
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers, decoders
    vocab = {c: i for i, c in enumerate(byte_alphabet().values())}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    foreign = load_tokenizer(tmp_path / "tokenizer.json")
    assert foreign.bos_id == foreign.eos_id == foreign.pad_id == 256 and foreign.byte_level
    assert foreign.decode_bytes(foreign.encode_bytes(b"\xff\xfeabc")) == b"\xff\xfeabc"
    # a tokenizer_config.json naming the tokens (AddedToken dict form) wins over the name heuristics
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "a"}, "eos_token": "b"}))
    named = load_tokenizer(tmp_path)
    assert (named.bos_id, named.eos_id) == (backend.token_to_id("a"), backend.token_to_id("b"))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


def test_compression_report(tok, tmp_path):
    files = write_corpus(tmp_path, n_files=1, seed=9)
    rep = compression_report(tok, files)
    text = files[0].read_text()
    assert rep["bytes"] == len(text.encode()) and rep["words"] == len(text.split())
    assert 0.1 < rep["tokens_per_byte"] < 0.6  # merges learnt: well under one token per byte
    assert rep["tokens_per_byte"] == pytest.approx(tok.tokens_per_byte(text))
    assert rep["tokens_per_word"] == pytest.approx(tok.tokens_per_word(text))


def test_cli_train_and_encode(tmp_path, capsys):
    write_corpus(tmp_path / "data", n_files=3)
    assert cli("tokenizer", ["train", "--data", str(tmp_path / "data"), "--vocab-size", "500",
                             "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "held-out (last 2% of the text)" not in out and "tokens per byte" in out and "tokens per word" in out
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and (tmp_path / "tok" / "tokenizer_config.json").is_file()
    assert cli("tokenizer", ["encode", "--tokenizer", str(tmp_path / "tok"), "the fox"]) == 0
    ids = json.loads(capsys.readouterr().out.splitlines()[0])
    assert load_tokenizer(tmp_path / "tok").decode(ids) == "the fox"
    assert cli("tokenizer", ["decode", "--tokenizer", str(tmp_path / "tok"), json.dumps(ids)]) == 0
    assert capsys.readouterr().out.strip() == "the fox"
    assert cli("tokenizer", ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    # one file: the report is on the end of its text, which training did not see
    assert cli("tokenizer", ["train", "--data", str(tmp_path / "data" / "doc0.txt"), "--vocab-size", "400",
                             "--out", str(tmp_path / "one")]) == 0
    assert "held-out (last 2% of the text)" in capsys.readouterr().out


def test_load_a_deepseek_shaped_tokenizer(tmp_path):
    """The layout of DeepSeek V3's files: a split-regex sequence before ByteLevel(use_regex=False), specials at
    0/1 plus chat tokens added after the merges, and a tokenizer_config.json naming them as AddedToken dicts."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
                                   r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[chat.BOS, chat.EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["DeepSeek 12345 日本語 hello world\n" * 20], trainer=trainer)
    backend.add_tokens([chat.USER, chat.ASSISTANT, chat.THINK, chat.END_THINK])
    backend.save(str(tmp_path / "tokenizer.json"))
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": dict(added, content=chat.BOS), "eos_token": dict(added, content=chat.EOS),
        "pad_token": dict(added, content=chat.EOS), "model_max_length": 131072, "chat_template": "{{ bos_token }}"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1) and tok.byte_level
    assert tok.user_id == backend.token_to_id(chat.USER) and tok.end_think_id == backend.token_to_id(chat.END_THINK)
    for b in [b"DeepSeek 2024 \xe6\x97\xa5\xff\xfe <think>", "日本語</think>".encode() + b"\x80"]:
        assert tok.decode_bytes(tok.encode_bytes(b)) == b
    tok.save(tmp_path / "resaved")  # keeps the model's own chat template and settings
    cfg = json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "{{ bos_token }}" and cfg["bos_token"] == chat.BOS and cfg["add_bos_token"]
