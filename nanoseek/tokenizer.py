"""Byte-level BPE tokenizer: training with the `tokenizers` library, DeepSeek's special tokens, HF layout.

DeepSeek V3 uses byte-level BPE (shared reference, "Tokenizer and chat encoding"): text is split by a regex,
each UTF-8 byte is mapped to one printable character (GPT-2's byte alphabet), and merges are learnt on those
characters. Because every byte has its own token, any byte string has an encoding; `encode_bytes` /
`decode_bytes` make that exact even for invalid UTF-8, which a str API cannot carry.

Our tokenizers put DeepSeek's specials first: <｜begin▁of▁sentence｜> = 0, <｜end▁of▁sentence｜> = 1 and
<｜▁pad▁｜> = 2 (as in V3), then the chat, thinking, FIM and tool-call tokens. Only BOS/EOS/pad are "special"
in the HF sense (dropped by skip_special_tokens); the others are added tokens that decode to their text, so
a streaming reasoning parser still sees </think>, as with DeepSeek's own tokenizer.json.

`Tokenizer.save(dir)` writes tokenizer.json + tokenizer_config.json (with the chat template from
nanoseek.chat), which transformers' AutoTokenizer loads; `load_tokenizer` reads any HF tokenizer.json.

    nanoseek tokenizer train [--data PATH ...] --vocab-size N --out DIR
    nanoseek tokenizer extend BASE_DIR --data TEXT --add N --out DIR [--base-data PATH]   (nanoseek.vocab)
    nanoseek tokenizer encode --tokenizer DIR "text"
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

from nanoseek import chat, data

PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = [  # id = position; BOS 0 and EOS 1 as in DeepSeek V3
    chat.BOS, chat.EOS, PAD, chat.USER, chat.ASSISTANT, chat.THINK, chat.END_THINK,
    chat.FIM_HOLE, chat.FIM_BEGIN, chat.FIM_END,
    chat.TOOL_CALLS_BEGIN, chat.TOOL_CALLS_END, chat.TOOL_CALL_BEGIN, chat.TOOL_CALL_END, chat.TOOL_SEP,
    chat.TOOL_OUTPUTS_BEGIN, chat.TOOL_OUTPUTS_END, chat.TOOL_OUTPUT_BEGIN, chat.TOOL_OUTPUT_END,
]
_CONTROL = {chat.BOS, chat.EOS, PAD}  # HF "special" (skippable); the rest decode to their text
# GPT-4's (cl100k) split: words with their leading space, numbers in groups of up to 3 digits, punctuation runs,
# newlines, and whitespace runs that leave their last space to the next word (indentation stays compact).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# names tried, in order, when a foreign tokenizer has no tokenizer_config.json saying which is which
_BOS_NAMES = [chat.BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"]
_EOS_NAMES = [chat.EOS, "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"]
_LONG_TEXT = 1 << 16  # characters from which `encode` releases the interpreter lock while it works
_PAD_NAMES = [PAD, "<pad>", "<|pad|>", "<|finetune_right_pad_id|>"]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the 68 others (controls, space, ...) to U+0100 onwards in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` with DeepSeek-style ids and exact byte round-trips.

    bos_id/eos_id/pad_id are always set (pad falls back to EOS); the other special ids are None when the
    vocabulary lacks them. `config` is the tokenizer_config.json content written by `save`.
    """

    def __init__(self, backend: _Backend, bos_token: str, eos_token: str, pad_token: Optional[str] = None,
                 config: Optional[dict] = None):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        ids = {}
        for role, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token or eos_token)):
            ids[role] = backend.token_to_id(tok)
            if ids[role] is None:
                raise ValueError(f"{role} token {tok!r} is not in the vocabulary")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token or eos_token
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        find = backend.token_to_id
        self.user_id, self.assistant_id = find(chat.USER), find(chat.ASSISTANT)
        self.think_id, self.end_think_id = find(chat.THINK), find(chat.END_THINK)
        self.fim_begin_id, self.fim_hole_id = find(chat.FIM_BEGIN), find(chat.FIM_HOLE)
        self.fim_end_id = find(chat.FIM_END)
        self.special_ids = {t: find(t) for t in SPECIAL_TOKENS if find(t) is not None}
        self.config = dict(config or {})
        spec = json.loads(backend.to_str())
        self.byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        self._added = {a["id"]: a for a in spec.get("added_tokens", [])}
        self._bytes_table: Optional[list[bytes]] = None

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__} (use encode_bytes for bytes)")
        try:
            if len(text) < _LONG_TEXT:
                ids = self.backend.encode(text, add_special_tokens=False).ids
            else:  # the batch call lets other threads run meanwhile (a server's event loop): a plain encode holds
                # the interpreter lock throughout, ~1 s per MB here
                fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
                ids = fast([text], add_special_tokens=False)[0].ids
        except (UnicodeEncodeError, TypeError):  # lone surrogates have no UTF-8 form, hence no bytes to encode
            raise ValueError("text is not valid Unicode (it has no UTF-8 form, e.g. a lone surrogate)") from None
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Many texts at once, in parallel threads inside `tokenizers` (the fast path for corpora)."""
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, which we never read: ~1.5x faster
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        out = fast(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in out]

    def encode_bytes(self, data: bytes, add_bos: bool = False) -> list[int]:
        """Exact encoding of any byte string: valid UTF-8 runs go through BPE, other bytes map to byte tokens."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"encode_bytes takes bytes, got {type(data).__name__}")
        data = bytes(data)
        ids = [self.bos_id] if add_bos else []
        pos = 0
        while pos < len(data):
            try:
                ids += self.encode(data[pos:].decode("utf-8"))
                break
            except UnicodeDecodeError as e:
                if not self.byte_level:
                    raise ValueError("this tokenizer is not byte-level: it cannot encode invalid UTF-8") from None
                ids += self.encode(data[pos:pos + e.start].decode("utf-8"))
                ids += [self._byte_token(b) for b in data[pos + e.start:pos + e.end]]
                pos += e.end
        return ids

    def _byte_token(self, b: int) -> int:
        tid = self.backend.token_to_id(_ALPHABET[b])
        if tid is None:
            raise ValueError(f"byte 0x{b:02x} has no token in this vocabulary; it cannot be encoded exactly")
        return tid

    # -- decoding -------------------------------------------------------------------------------------
    def _table(self) -> list[bytes]:
        """Bytes of every id: added tokens are their UTF-8 text, BPE tokens map back through the alphabet."""
        if self._bytes_table is None:
            inverse = {c: b for b, c in _ALPHABET.items()}
            table = []
            for i in range(self.vocab_size):
                tok = self.backend.id_to_token(i)
                if tok is None:
                    table.append(b"")
                elif i in self._added or any(c not in inverse for c in tok):
                    table.append(tok.encode("utf-8"))
                else:
                    table.append(bytes(inverse[c] for c in tok))
            self._bytes_table = table
        return self._bytes_table

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """Ids to decode. A model's embedding often has more rows than the tokenizer has tokens (DeepSeek V3:
        129280 vs ~128.8K; ours pad to a round size): such ids are text-less and decode to nothing."""
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise ValueError("token ids must be integers") from None
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token id {min(ids)}")
        return [i for i in ids if i < self.vocab_size]

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not (i in self._added and self._added[i].get("special"))]
        if not self.byte_level:
            return self.backend.decode(ids, skip_special_tokens=False).encode("utf-8")
        table = self._table()
        return b"".join(table[i] for i in ids)

    def token_byte_lengths(self) -> np.ndarray:
        """[V] int64: UTF-8 bytes of each token's text (for bits per byte)."""
        if self.byte_level:
            return np.array([len(b) for b in self._table()], dtype=np.int64)
        return np.array([len(self.backend.decode([i], skip_special_tokens=False).encode("utf-8"))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if not self.byte_level:
            return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(int(i))

    # -- reports --------------------------------------------------------------------------------------
    def tokens_per_byte(self, text: str) -> float:
        n = len(text.encode("utf-8"))
        return len(self.encode(text)) / n if n else float("nan")

    def tokens_per_word(self, text: str) -> float:
        n = len(text.split())
        return len(self.encode(text)) / n if n else float("nan")

    def to_str(self) -> str:
        """The tokenizer.json content (also what token caches key on)."""
        return self.backend.to_str()

    # -- HF layout ------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, chat_style: Optional[str] = None,
             model_max_length: Optional[int] = None) -> Path:
        """Write tokenizer.json and tokenizer_config.json (chat template included) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.update({"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token})
        # DeepSeek V3's own tokenizer_config: LlamaTokenizerFast, add_bos_token true, no unk token. transformers 4
        # then loads tokenizer.json as it is and reports add_bos_token (the generic PreTrainedTokenizerFast has no
        # such attribute, and llama.cpp's V3.2 converter, pinned to transformers 4, asserts it); without the null
        # unk_token that class would add an "<unk>" past the vocabulary. transformers 5 loads tokenizer.json as it
        # is under either name.
        cfg.setdefault("tokenizer_class", "LlamaTokenizerFast")
        cfg.setdefault("unk_token", None)
        cfg.setdefault("add_bos_token", True)
        cfg.setdefault("add_eos_token", False)
        cfg.setdefault("clean_up_tokenization_spaces", False)
        cfg.setdefault("model_max_length", 131072)
        if model_max_length is not None:
            cfg["model_max_length"] = int(model_max_length)
        if chat_style is not None or "chat_template" not in cfg:
            cfg["chat_template"] = chat.chat_template(chat_style or "v3.2")
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        self.config = cfg
        return out


_ALPHABET = byte_alphabet()


def _token_name(value) -> Optional[str]:
    """tokenizer_config.json stores a token as a string or as an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load any HF tokenizer: a folder with tokenizer.json (and tokenizer_config.json), or the file itself; or the
    tokenizer a `.gguf` model file carries (`nanoseek.gguf`)."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        from nanoseek import gguf
        return gguf.load_tokenizer(p)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    try:
        backend = _Backend.from_file(str(file))
    except Exception as e:  # the Rust side reports malformed JSON as a generic Exception
        raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
    cfg_file = file.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    vocab = backend.get_vocab(with_added_tokens=True)

    def pick(key: str, names: list[str]) -> Optional[str]:
        name = _token_name(cfg.get(key))
        if name is not None and name in vocab:
            return name
        return next((n for n in names if n in vocab), None)

    eos = pick("eos_token", _EOS_NAMES)
    bos = pick("bos_token", _BOS_NAMES) or eos  # GPT-2 style vocabularies delimit documents with EOS alone
    if bos is None or eos is None:
        raise ValueError(f"{file}: cannot tell the begin/end-of-sequence tokens; set bos_token and eos_token "
                         f"in {cfg_file.name}")
    cfg = {k: v for k, v in cfg.items() if k not in ("bos_token", "eos_token", "pad_token")}
    return Tokenizer(backend, bos, eos, pick("pad_token", _PAD_NAMES), config=cfg)


def new_backend() -> _Backend:
    """An untrained byte-level BPE pipeline: regex split -> byte alphabet -> BPE; BOS added by the post-processor."""
    tok = _Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # what AutoTokenizer(text) adds by default, as DeepSeek's add_bos_token=True does
    tok.post_processor = processors.TemplateProcessing(single=f"{chat.BOS} $A", pair=f"{chat.BOS} $A {chat.BOS} $B",
                                                       special_tokens=[(chat.BOS, 0)])
    return tok


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_dir: Optional[str | Path] = None,
                    max_chars: Optional[int] = None) -> Tokenizer:
    """Train byte-level BPE on files/folders (read with nanoseek.data); save to out_dir when given.

    vocab_size counts everything (specials, the 256 byte tokens, merges); a small corpus may stop short of it.
    max_chars caps the training text (documents are taken in order until the cap).
    """
    paths = data.collect_files(files)
    tok = train_from_documents((d for f in paths for d in data.read_documents(f)), vocab_size, max_chars)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def train_from_documents(documents: Iterable[str], vocab_size: int, max_chars: Optional[int] = None) -> Tokenizer:
    """Train byte-level BPE with DeepSeek's specials on an iterable of documents."""
    floor = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size <= floor:
        raise ValueError(f"vocab_size must be an integer above {floor} (specials + 256 byte tokens)")

    def capped():
        seen = 0
        for doc in documents:
            if max_chars is not None and seen >= max_chars:
                return
            seen += len(doc)
            yield doc

    backend = new_backend()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(capped(), trainer=trainer)
    # the trainer marks every special as HF-special; keep only BOS/EOS/pad so, e.g., </think> survives decoding
    spec = json.loads(backend.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in _CONTROL
    backend = _Backend.from_str(json.dumps(spec, ensure_ascii=False))
    if [backend.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("tokenizers did not give the special tokens the first ids")
    return Tokenizer(backend, chat.BOS, chat.EOS, PAD)


def compression_report(tok: Tokenizer, files: Sequence[str | Path] = (), documents: Iterable[str] = ()) -> dict:
    """Tokens per UTF-8 byte and per whitespace-separated word over the documents of `files` and `documents`."""
    docs = [d for f in (data.collect_files(files) if files else []) for d in data.read_documents(f)] + list(documents)
    n_tok = sum(len(ids) for ids in tok.encode_batch(docs))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    return {"tokens": n_tok, "bytes": n_bytes, "words": n_words,
            "tokens_per_byte": n_tok / n_bytes if n_bytes else float("nan"),
            "tokens_per_word": n_tok / n_words if n_words else float("nan")}


def cli(cmd: str, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nanoseek tokenizer", description="train or inspect a byte-level BPE tokenizer")
    sub = ap.add_subparsers(dest="action", required=True)
    tr = sub.add_parser("train", help="train on files/folders (default: this Python's standard library source)")
    tr.add_argument("--data", nargs="+", help="files or folders (.txt .md .py ... and .jsonl with a text field)")
    tr.add_argument("--vocab-size", type=int, default=8192)
    tr.add_argument("--out", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    tr.add_argument("--heldout-fraction", type=float, default=0.02, help="share of files kept for the report")
    tr.add_argument("--max-chars", type=int, default=None, help="cap on training characters")
    tr.add_argument("--chat-style", choices=chat.STYLES, default="v3.2")
    ex = sub.add_parser("extend", help="append N tokens learnt on a new language's text; existing ids unchanged")
    ex.add_argument("base", help="folder of the tokenizer to extend (tokenizer.json)")
    ex.add_argument("--data", nargs="+", required=True, help="files or folders of the new language's text")
    ex.add_argument("--add", type=int, required=True, help="number of tokens (BPE merges) to learn")
    ex.add_argument("--out", required=True, help="folder for the extended tokenizer.json + tokenizer_config.json")
    ex.add_argument("--base-data", nargs="+", help="text of the base domain, for the before/after report")
    ex.add_argument("--heldout-fraction", type=float, default=0.05,
                    help="share of the new text kept out of learning, for the report")
    for name, help_ in (("encode", "print the ids and tokens of a text"), ("decode", "print the text of ids")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json or the file itself")
        p.add_argument("inputs", nargs="+", help="text (encode) or token ids (decode)")
        p.add_argument("--bos", action="store_true", help="prepend BOS (encode)")
    args = ap.parse_args(argv)
    try:
        if args.action == "train":
            files = data.collect_files(args.data) if args.data else data.default_corpus()
            train_files, held_files = data.split_files(files, args.heldout_fraction)
            train_docs, held_docs = data.split_corpus(files, args.heldout_fraction)
            where = (f"{len(held_files)} held-out files" if held_files
                     else f"last {args.heldout_fraction:.0%} of the text")
            t0 = time.time()
            tok = train_from_documents(train_docs, args.vocab_size, args.max_chars)
            tok.save(args.out, chat_style=args.chat_style)
            print(f"trained on {len(train_files)} files in {time.time() - t0:.1f}s: vocab {tok.vocab_size}, "
                  f"saved to {args.out}")
            held_docs = list(held_docs)
            if held_docs:
                rep = compression_report(tok, documents=held_docs)
                print(f"held-out ({where}): {rep['bytes']:,} bytes, {rep['tokens']:,} tokens; "
                      f"tokens per byte {rep['tokens_per_byte']:.4f}, tokens per word {rep['tokens_per_word']:.4f}")
        elif args.action == "extend":
            _extend(args)
        elif args.action == "encode":
            tok = load_tokenizer(args.tokenizer)
            ids = tok.encode(" ".join(args.inputs), add_bos=args.bos)
            print(json.dumps(ids))
            print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
        else:
            tok = load_tokenizer(args.tokenizer)
            try:
                ids = [int(x) for x in " ".join(args.inputs).replace(",", " ").strip("[] ").split()]
            except ValueError:
                raise ValueError("decode takes integer token ids") from None
            print(tok.decode(ids))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    return 0


def _extend(args: argparse.Namespace) -> None:
    """`nanoseek tokenizer extend`: learn, save, and print tokens per word / byte before and after."""
    from nanoseek import vocab
    base = load_tokenizer(args.base)
    files = data.collect_files(args.data)
    train_docs, held_docs = data.split_corpus(files, args.heldout_fraction)
    t0 = time.time()
    ext = vocab.extend_tokenizer(base, train_docs, args.add)
    ext.save(args.out)
    added = ext.vocab_size - base.vocab_size
    note = "" if added == args.add else f" (asked {args.add}: no other pair occurs twice)"
    print(f"added {added} tokens{note} in {time.time() - t0:.1f}s: ids {base.vocab_size}..{ext.vocab_size - 1}, "
          f"vocab {ext.vocab_size}, saved to {args.out}")
    sets = [("new language, held out", list(held_docs))]
    if args.base_data:
        sets.append(("base domain", [d for f in data.collect_files(args.base_data) for d in data.read_documents(f)]))
    print(f"{'text':24s} {'bytes':>10s} {'tokens/word':>22s} {'tokens/byte':>22s}")
    for name, docs in sets:
        if not docs:
            print(f"{name:24s} (no text: raise --heldout-fraction or give more files)")
            continue
        a, b = compression_report(base, documents=docs), compression_report(ext, documents=docs)
        print(f"{name:24s} {a['bytes']:>10,d} {a['tokens_per_word']:>9.4f} -> {b['tokens_per_word']:<9.4f} "
              f"{a['tokens_per_byte']:>9.4f} -> {b['tokens_per_byte']:<9.4f}")
