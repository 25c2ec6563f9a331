"""Training data: corpora from files or folders, a cached memory-mapped token stream, and a packed loader.

Pipeline (issue 3, item 2):
  files/folders --collect_files--> documents (one per text file, one per JSONL line) --cache_tokens--> one
  token stream on disk, each document prefixed with BOS (uint16 when the vocabulary fits, else uint32),
  tokenised once with `tokenizers`' parallel batch encoder and keyed by the files and tokenizer.json --
  PackedLoader--> [B, T] batches in a seeded order that is identical whatever the number of ranks.

With no data given, the corpus is the running interpreter's Python standard library source: present on every
machine, nothing to download. Train and held-out sets are split by file, by a stable hash of each file's path
(relative to the files' common folder), so the split is the same on every run and every machine with the same
files. A corpus too small to give any held-out file (e.g. one big text file) is split inside its text instead:
the last `heldout_fraction` of its characters, cut at a line end.

Shapes: B batch rows, T = seq_len tokens, N tokens in a stream.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from nanoseek import chat

TEXT_SUFFIXES = {
    ".txt", ".md", ".rst", ".tex", ".jsonl",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".kt", ".scala", ".js",
    ".ts", ".jsx", ".tsx", ".sh", ".lua", ".rb", ".php", ".swift", ".m", ".jl", ".r", ".sql", ".html", ".css",
    ".toml", ".yaml", ".yml", ".cfg", ".ini",
}
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
STDLIB_SKIP_DIRS = SKIP_DIRS | {"test", "tests", "idle_test"}  # the test suites would double the corpus
CACHE_VERSION = 1


def _walk(root: Path, suffixes: set[str], skip: set[str]) -> list[Path]:
    """Files under root with a wanted suffix, hidden and skipped folders left out, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def collect_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into a list of text files (folders: known text/source suffixes, recursively).

    A file named explicitly is always taken; duplicates are dropped, the given order is kept.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out, seen = [], set()
    for p in map(Path, paths):
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = _walk(p, TEXT_SUFFIXES, SKIP_DIRS)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:
        raise ValueError(f"no text files found in {[str(p) for p in paths]} (suffixes: {sorted(TEXT_SUFFIXES)})")
    return out


def _text_problem(raw: bytes) -> Optional[str]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"
    nul = raw.find(b"\x00")
    return None if nul < 0 else f"binary data (a NUL byte at {nul})"


def text_problem(path: str | Path) -> Optional[str]:
    """Why a file is not UTF-8 text, or None: the offset of its first undecodable byte, or of a NUL byte (binary
    data can decode as UTF-8)."""
    return _text_problem(Path(path).read_bytes())


def read_documents(path: str | Path, on_problem: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """The documents of one file: the whole file for text, one per line for JSONL.

    A JSONL line needs a string `text` field, or chat `messages` (rendered with nanoseek.chat, V3.2 style,
    without the BOS that the token cache adds). Undecodable bytes become U+FFFD rather than failing a corpus;
    on_problem, if given, first hears 'FILE: why' of a file that is not UTF-8 text (`text_problem`).
    """
    path = Path(path)
    raw = path.read_bytes()
    if on_problem is not None and (why := _text_problem(raw)) is not None:
        on_problem(f"{path}: {why}")
    text = raw.decode("utf-8", errors="replace")
    if path.suffix.lower() != ".jsonl":
        if text.strip():
            yield text
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            if obj["text"]:
                yield obj["text"]
        elif isinstance(obj, dict) and "messages" in obj:
            try:
                yield chat.encode_messages(obj["messages"], add_generation_prompt=False)[len(chat.BOS):]
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
        else:
            raise ValueError(f"{path}:{lineno}: a JSONL line needs a string 'text' field (or chat 'messages')")


def default_corpus() -> list[Path]:
    """The running interpreter's standard library source (.py), test suites and site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk(root, {".py"}, STDLIB_SKIP_DIRS)
    if not files:
        raise ValueError(f"no Python standard library source found under {root}")
    return files


def _stable_score(key: str) -> float:
    """A uniform number in [0, 1) from a string, the same in every process (unlike the salted hash())."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_files(files: Sequence[str | Path], heldout_fraction: float = 0.02) -> tuple[list[Path], list[Path]]:
    """(train, held-out) by file: a file is held out when the hash of its relative path falls below the fraction.

    The held-out list may be empty for small corpora (see `prepare` for the in-text fallback); the train
    list never is.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("split_files needs at least one file")
    if len(files) == 1:
        return files, []
    root = os.path.commonpath([str(f.resolve()) for f in files])
    held = {f for f in files if _stable_score(f.resolve().relative_to(root).as_posix()) < heldout_fraction}
    if len(held) == len(files):  # absurdly small corpus: keep at least one training file
        held.discard(files[0])
    return [f for f in files if f not in held], [f for f in files if f in held]


def split_text(docs: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Cut a list of documents at (1 - fraction) of its characters, moved forward to the next line end."""
    total = sum(len(d) for d in docs)
    cut = int(total * (1.0 - heldout_fraction))
    train, held, pos = [], [], 0
    for d in docs:
        if pos + len(d) <= cut:
            train.append(d)
        elif pos >= cut:
            held.append(d)
        else:
            nl = d.find("\n", cut - pos)
            at = len(d) if nl < 0 else nl + 1
            train.append(d[:at])
            if d[at:]:
                held.append(d[at:])
        pos += len(d)
    return [d for d in train if d], held


def split_corpus(files: Sequence[str | Path],
                 heldout_fraction: float = 0.02) -> tuple[Iterator[str], Iterator[str]]:
    """(train documents, held-out documents), lazily: the same split `prepare` makes (by file, else in-text).

    Train a tokenizer on the first so that the held-out text stays unseen by it too.
    """
    train, held = split_files(files, heldout_fraction)
    if held or heldout_fraction == 0.0:
        return (d for f in train for d in read_documents(f)), (d for f in held for d in read_documents(f))

    def side(i: int) -> Iterator[str]:
        yield from split_text([d for f in train for d in read_documents(f)], heldout_fraction)[i]

    return side(0), side(1)


@dataclass
class TokenFile:
    """A cached token stream: `tokens` [N] memory-mapped, every document starting with BOS.

    n_bytes is the UTF-8 size of the text the tokens came from, so that
    bits per byte = mean loss (nats/token) * n_tokens / (ln 2 * n_bytes), comparable across tokenizers.
    """
    path: Path
    tokens: np.ndarray  # [N]
    n_tokens: int
    n_bytes: int
    n_docs: int
    bos_id: int
    vocab_size: int
    byte_lengths: np.ndarray  # [V] UTF-8 bytes of each token's text; 0 for BOS, which the cache inserts

    def bytes_of(self, ids: torch.Tensor | np.ndarray) -> int:
        """Text bytes that a set of (target) tokens stands for: the denominator of bits per byte."""
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        return int(self.byte_lengths[ids[ids < len(self.byte_lengths)]].sum())

    @classmethod
    def open(cls, path: str | Path) -> "TokenFile":
        path = Path(path)
        meta_file = path.with_suffix(".json")
        if not path.is_file() or not meta_file.is_file():
            raise FileNotFoundError(f"no token file at {path} (with its {meta_file.name})")
        meta = json.loads(meta_file.read_text())
        n, dtype = int(meta["n_tokens"]), np.dtype(meta["dtype"])
        if path.stat().st_size != n * dtype.itemsize:
            raise ValueError(f"{path} holds {path.stat().st_size} bytes, expected {n} x {dtype}")
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        lengths = np.load(path.with_suffix(".lens.npy"))
        return cls(path, tokens, n, int(meta["n_bytes"]), int(meta["n_docs"]), int(meta["bos_id"]),
                   int(meta["vocab_size"]), lengths)

    def bits_per_byte(self, mean_loss_nats: float) -> float:
        return mean_loss_nats * self.n_tokens / (math.log(2) * self.n_bytes)


def default_cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek")) / "tokens"


def _warn_not_text(line: str) -> None:
    print(f"warning: {line}; read as text anyway, undecodable bytes as U+FFFD (--strict-data refuses such files)",
          file=sys.stderr)


def cache_tokens(files: Sequence[str | Path], tokenizer, cache_dir: Optional[str | Path] = None,
                 part: Optional[tuple[str, float]] = None, batch_chars: int = 1 << 22,
                 check_text: Optional[str] = None) -> TokenFile:
    """Tokenise the documents of `files` once into a memory-mapped stream; later calls reuse it.
    check_text: "warn" (on stderr, as each is read) or "strict" (one ValueError naming them all, nothing cached)
    for the files that are not UTF-8 text.

    The cache key hashes every file's path, size and mtime, the tokenizer.json content and `part`.
    part=("train" | "heldout", fraction) keeps one side of `split_text` over all the documents.
    Beside the stream: each token's byte length (.lens.npy) for exact per-batch bits per byte, and the
    metadata (.json). Files are written under temporary names and renamed, metadata last: a crash never leaves a
    half-written stream that looks complete, and concurrent ranks at worst write the same file twice.
    """
    files = [Path(f) for f in files]
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if part is not None and (part[0] not in ("train", "heldout") or not 0.0 < part[1] < 1.0):
        raise ValueError(f"part must be ('train' | 'heldout', fraction in (0, 1)), got {part}")
    # a strict build reads every file again, even where a lenient one cached the same files
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "files": stats, "part": part,
                                     **({"strict": True} if check_text == "strict" else {})}).encode()
                         + tokenizer.to_str().encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"tokens-{key}.bin"
    if out.is_file() and out.with_suffix(".json").is_file():
        return TokenFile.open(out)

    refused: list[str] = []
    on_problem = {None: None, "warn": _warn_not_text, "strict": refused.append}[check_text]

    def documents() -> Iterator[str]:
        if part is None:
            for f in files:
                yield from read_documents(f, on_problem)
        else:
            train, held = split_text([d for f in files for d in read_documents(f, on_problem)], part[1])
            yield from (train if part[0] == "train" else held)

    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    n_tokens = n_bytes = n_docs = 0
    with open(tmp, "wb") as fh:
        batch: list[str] = []

        def flush():
            nonlocal n_tokens, n_bytes, n_docs
            if batch:
                ids = np.fromiter((t for seq in tokenizer.encode_batch(batch, add_bos=True) for t in seq), np.int64)
                fh.write(ids.astype(dtype).tobytes())
                n_tokens += len(ids)
                n_bytes += sum(len(d.encode("utf-8")) for d in batch)
                n_docs += len(batch)
                batch.clear()

        size = 0
        for doc in documents():
            batch.append(doc)
            size += len(doc)
            if size >= batch_chars:  # bounded memory, yet big batches keep every core busy
                flush()
                size = 0
        flush()
    if refused:
        tmp.unlink()
        raise ValueError("not UTF-8 text (--strict-data): " + "; ".join(refused))
    os.replace(tmp, out)
    lengths = tokenizer.token_byte_lengths()
    lengths[tokenizer.bos_id] = 0
    tmp_lens = out.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp_lens, lengths)
    os.replace(tmp_lens, out.with_suffix(".lens.npy"))
    meta = {"dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_bytes": n_bytes, "n_docs": n_docs,
            "bos_id": tokenizer.bos_id, "vocab_size": tokenizer.vocab_size, "files": stats, "part": part}
    tmp_meta = out.with_suffix(f".json.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, out.with_suffix(".json"))
    return TokenFile.open(out)


@dataclass
class Datasets:
    train: TokenFile
    heldout: Optional[TokenFile]  # None only when heldout_fraction is 0


def prepare(paths: Optional[Sequence[str | Path]], tokenizer, cache_dir: Optional[str | Path] = None,
            heldout_fraction: float = 0.02, is_main: bool = True, barrier=None, strict: bool = False) -> Datasets:
    """Train and held-out token files for files/folders, or for the default corpus when `paths` is empty.

    Given files that are not UTF-8 text get a warning on stderr each as they are tokenised (their undecodable
    bytes become U+FFFD), or with `strict` one ValueError naming them. Under torchrun, pass is_main (rank 0 tokenises) and a barrier callable (the
    others wait, then open the cache); the key makes every rank find the same files.
    """
    files = collect_files(paths) if paths else default_corpus()
    check = None if not paths else "strict" if strict else "warn"  # the default corpus is the product's own
    train, held = split_files(files, heldout_fraction)
    if heldout_fraction == 0.0:
        jobs = [(files, None)]
    elif held:
        jobs = [(train, None), (held, None)]
    else:  # no file to spare: hold out the end of the text
        jobs = [(files, ("train", heldout_fraction)), (files, ("heldout", heldout_fraction))]
    if not is_main and barrier is not None:
        barrier()  # wait for rank 0 to write the cache
    out = [cache_tokens(f, tokenizer, cache_dir, part, check_text=check) for f, part in jobs]
    if is_main and barrier is not None:
        barrier()
    return Datasets(out[0], out[1] if len(out) > 1 else None)


def _rows(tf: TokenFile, rows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r = BOS + stream[r*T + 1 : r*T + T + 1]; returns x [B, T] and y [B, T] (int64)."""
    idx = rows[:, None] * seq_len + np.arange(seq_len + 1)  # [B, T+1]
    buf = tf.tokens[idx].astype(np.int64)
    buf[:, 0] = tf.bos_id
    return torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))


def _as_token_file(tokens: TokenFile | str | Path) -> TokenFile:
    return tokens if isinstance(tokens, TokenFile) else TokenFile.open(tokens)


class PackedLoader:
    """Seeded, resumable, rank-sharded batches of packed rows.

    Packing: the stream (documents back to back, each opened by BOS) is cut every T tokens; row r holds the
    T+1 tokens from r*T, so the targets of consecutive rows tile the stream and each token is predicted once.
    Each row's first token is set to BOS: it already is where a document starts there; otherwise the row starts
    mid-document with BOS as its start marker, and the token it replaced is still predicted, as the last
    target of the previous row. No padding, no tokens lost.

    Order: each epoch is a permutation of all rows from (seed, epoch). Global step g covers permuted rows
    [g*B*W, (g+1)*B*W), and rank k reads its k-th slice of B rows, so W ranks together read exactly what one
    process with batch B*W reads, in the same order. A remainder smaller than a global batch is skipped at the
    end of each epoch. The state (epoch, step) is global, so a resume may even change the number of ranks, as
    long as B*W stays the same.
    """

    def __init__(self, token_file: TokenFile | str | Path, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tf = _as_token_file(token_file)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n_rows = max(self.tf.n_tokens - 1, 0) // seq_len
        self.global_batch = batch_size * world_size
        if self.n_rows < self.global_batch:
            raise ValueError(f"{self.tf.path.name}: {self.tf.n_tokens} tokens make {self.n_rows} rows of "
                             f"{seq_len}+1, fewer than one global batch of {self.global_batch}; use more data "
                             f"or a smaller seq_len / batch")
        self.steps_per_epoch = self.n_rows // self.global_batch
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x [B, T], y [B, T]) int64 batch of this rank."""
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        start = self.step * self.global_batch + self.rank * self.batch_size
        rows = self._order()[start:start + self.batch_size]
        self.step += 1
        return _rows(self.tf, rows, self.seq_len)

    __next__ = next

    def __iter__(self):
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens (targets) one global step covers, all ranks together."""
        return self.global_batch * self.seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "seq_len", "global_batch", "n_rows"):
            if state.get(k) != getattr(self, k):
                raise ValueError(f"loader state has {k}={state.get(k)} but this loader has {getattr(self, k)}; "
                                 f"resume with the same data, seq_len, seed and global batch")
        if not (0 <= state["step"] <= self.steps_per_epoch and state["epoch"] >= 0):
            raise ValueError(f"loader state position (epoch {state['epoch']}, step {state['step']}) is invalid")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def heldout_batches(token_file: Optional[TokenFile | str | Path], seq_len: int, batch_size: int,
                    max_tokens: Optional[int] = None, rank: int = 0, world_size: int = 1,
                    device: Optional[torch.device | str] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Held-out rows in fixed order, as (x [b, T], y [b, T], text bytes of y) with b <= batch_size.

    The first ceil(max_tokens / T) rows (all when None) are split over ranks round-robin: rank k gets rows
    k, k+W, ...; summing losses, token and byte counts over ranks covers the set once, so
    bits per byte = sum of losses / (ln 2 * sum of bytes) is exact and tokenizer-independent.
    A held-out stream shorter than one row is read as a single shorter row; None (no held-out) gives nothing.
    """
    if token_file is None:
        return
    tf = _as_token_file(token_file)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if tf.n_tokens < 2:
        raise ValueError(f"{tf.path.name}: the held-out set has {tf.n_tokens} tokens; nothing to evaluate")
    seq_len = min(seq_len, tf.n_tokens - 1)
    n_rows = (tf.n_tokens - 1) // seq_len
    if max_tokens is not None:
        n_rows = min(n_rows, max(1, math.ceil(max_tokens / seq_len)))
    mine = np.arange(rank, n_rows, world_size)
    for i in range(0, len(mine), batch_size):
        x, y = _rows(tf, mine[i:i + batch_size], seq_len)
        n_bytes = tf.bytes_of(y)
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y, n_bytes
