"""`nanoseek eval`: how well a model predicts text files, and how compactly its tokenizer cuts them.

    nanoseek eval MODEL_DIR --data FILE... [--max-tokens N] [--seq-len T] [--dtype auto] [--json]
                  [--quantize int8|int4 [--quant-group-size 32]]

Per file: bits per byte (the model's cross-entropy over the file's tokens, in bits, divided by the UTF-8 bytes
they stand for: comparable across tokenizers, so a model adapted with an extended vocabulary can be compared
with its base), tokens per whitespace-separated word and per byte (the tokenizer's compression). The file is
read as training reads data: documents (a text file, or each line of a .jsonl) each opened by BOS, back to
back, cut into rows of T+1 tokens that overlap by one, so every token after the first is predicted once; each
row starts with BOS, as training rows do. --max-tokens caps the predicted tokens per file (bits per byte then
covers the start of the file; the compression figures always cover all of it).

Output: a table, or with --json one JSON object per line per file with the keys `file`, `bits_per_byte`,
`tokens_per_word`, `tokens_per_byte`, `tokens`, `bytes`, `words`, `evaluated_tokens` (a contract: scripts parse
it).

Legend: B rows, T tokens per row, V vocabulary.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek import data as D
from nanoseek import quant
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer


def token_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """[N] int64: the documents' tokens back to back, each document opened by BOS (as the training cache)."""
    return np.fromiter((t for ids in tok.encode_batch(docs, add_bos=True) for t in ids), np.int64)


@torch.no_grad()
def bits_per_byte(model: Transformer, tok: Tokenizer, stream: np.ndarray, seq_len: int, batch_size: int = 8,
                  max_tokens: Optional[int] = None) -> tuple[float, int]:
    """(bits per byte, predicted tokens) of `model` over the token stream (see the module docstring)."""
    if max_tokens is not None:
        stream = stream[:max_tokens + 1]
    if len(stream) < 2:
        return float("nan"), 0
    lengths = torch.from_numpy(tok.token_byte_lengths())
    lengths[tok.bos_id] = 0  # the BOS the stream inserts stands for no text
    device = next(model.parameters()).device
    starts = list(range(0, len(stream) - 1, seq_len))
    nats, n_bytes, n_tok = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        rows = [stream[s:s + seq_len + 1] for s in starts[i:i + batch_size]]
        # rows of equal length batch together; the last, shorter row of the stream goes alone
        for group in ([r for r in rows if len(r) == seq_len + 1], [r for r in rows if len(r) != seq_len + 1]):
            if not group:
                continue
            buf = torch.from_numpy(np.stack(group))  # [B, T+1]
            buf[:, 0] = tok.bos_id
            x, y = buf[:, :-1].to(device), buf[:, 1:]
            logits = model(x).logits  # [B, T, V]
            nats += float(F.cross_entropy(logits.float().flatten(0, 1).cpu(), y.flatten(), reduction="sum"))
            n_bytes += int(lengths[y].sum())
            n_tok += y.numel()
    model.train(was_training)
    return nats / math.log(2) / max(n_bytes, 1), n_tok


def evaluate_file(model: Transformer, tok: Tokenizer, path: str | Path, seq_len: int = 512, batch_size: int = 8,
                  max_tokens: Optional[int] = None) -> dict:
    """The per-file record of `nanoseek eval` (keys in the module docstring)."""
    docs = list(D.read_documents(path))
    stream = token_stream(tok, docs)
    n_tokens = len(stream) - len(docs)  # the text's own tokens, without the inserted BOS
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    bpb, evaluated = bits_per_byte(model, tok, stream, seq_len, batch_size, max_tokens)
    return {"file": str(path), "bits_per_byte": bpb,
            "tokens_per_word": n_tokens / n_words if n_words else float("nan"),
            "tokens_per_byte": n_tokens / n_bytes if n_bytes else float("nan"),
            "tokens": n_tokens, "bytes": n_bytes, "words": n_words, "evaluated_tokens": evaluated}


def cli(cmd: str, argv: list[str]) -> int:
    from nanoseek.checkpoint import from_pretrained
    from nanoseek.precision import CHOICES, resolve
    from nanoseek.tokenizer import load_tokenizer
    ap = argparse.ArgumentParser(prog="nanoseek eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model folder (config.json, safetensors, tokenizer.json)")
    ap.add_argument("--data", nargs="+", required=True, help="text files or folders (each file reported apart)")
    ap.add_argument("--max-tokens", type=int, default=None, help="predicted tokens per file at most")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per row (context of each prediction)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=CHOICES, default="auto",
                    help="auto: bfloat16 where the device computes it natively and fast, else float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="one JSON object per line per file")
    quant.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        if args.seq_len < 1 or args.batch_size < 1 or (args.max_tokens is not None and args.max_tokens < 1):
            raise ValueError("--seq-len, --batch-size and --max-tokens must be positive")
        files = D.collect_files(args.data)
        if not files:
            raise ValueError(f"no text files in {' '.join(args.data)}")
        dtype = resolve(args.dtype, args.device, "nanoseek eval")
        model = from_pretrained(args.model, dtype=dtype, device=args.device, quantize=args.quantize,
                                group_size=args.quant_group_size)
        tok = load_tokenizer(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek eval: error: {e}", file=sys.stderr)
        return 2
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    if not args.json:
        print(f"{'file':40s} {'bits/byte':>10s} {'tokens/word':>12s} {'tokens/byte':>12s} {'tokens':>10s}")
    for f in files:
        rec = evaluate_file(model, tok, f, seq_len, args.batch_size, args.max_tokens)
        if args.json:
            # an empty file has no rates: null, since NaN is not JSON
            print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}),
                  flush=True)
        else:
            name = rec["file"] if len(rec["file"]) <= 40 else "..." + rec["file"][-37:]
            print(f"{name:40s} {rec['bits_per_byte']:>10.4f} {rec['tokens_per_word']:>12.4f} "
                  f"{rec['tokens_per_byte']:>12.4f} {rec['evaluated_tokens']:>10,d}", flush=True)
    return 0
