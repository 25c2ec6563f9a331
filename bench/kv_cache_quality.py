"""Quality of the 8-bit KV cache (--kv-cache-dtype fp8 | int8, nanoseek/model/kv_quant.py) on a trained model.

    python bench/kv_cache_quality.py [--model runs/speedrun/dsa_sparse/final] [--data FILE...]
                                     [--max-tokens 8192] [--seq-len 512] [--chunk 64]

Bits per byte (as `nanoseek eval` counts them) with each cache dtype, relative to the full-precision cache in
the same model dtype (float32 and bfloat16). A plain forward pass never reads a cache, so each row of --seq-len
tokens is fed through a `DenseCache` in chunks of --chunk tokens, as a chunked prefill or a run of decode
steps would: every chunk attends to the rows earlier chunks left in the cache, read back (dequantized) from it,
its own included. Rows longer than the model's index_topk exercise DSA's selection over the cached indexer keys
(the speedrun: top-k 256, rows of 512). Default text: the speedrun's held-out files. (The variant with k_pe kept
in the model's dtype, measured with this bench at commit 38e1d40, is discussed in kv_quant.py.)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek import data as D  # noqa: E402
from nanoseek.evaluate import token_stream  # noqa: E402
from nanoseek.engine import BlockPool  # noqa: E402
from nanoseek.model.kv_quant import kv_format  # noqa: E402
from nanoseek.tokenizer import load_tokenizer  # noqa: E402
from quant_quality import cpu_name  # noqa: E402


@torch.no_grad()
def cached_bits_per_byte(model, tok, stream: np.ndarray, seq_len: int, chunk: int, kv: str,
                         batch_size: int = 8) -> float:
    """Bits per byte over rows of seq_len + 1 tokens (BOS first, as `nanoseek.evaluate`), each row's tokens fed
    through a DenseCache `chunk` at a time."""
    lengths = torch.from_numpy(tok.token_byte_lengths())
    lengths[tok.bos_id] = 0
    n_rows = (len(stream) - 1) // seq_len
    nats, n_bytes = 0.0, 0
    dtype = next(model.parameters()).dtype
    for i in range(0, n_rows, batch_size):
        buf = torch.from_numpy(np.stack([stream[s * seq_len:s * seq_len + seq_len + 1]
                                         for s in range(i, min(i + batch_size, n_rows))]))
        buf[:, 0] = tok.bos_id
        x, y = buf[:, :-1], buf[:, 1:]
        cache = nanoseek.DenseCache(model.config, len(buf), seq_len, dtype, kv_cache_dtype=kv)
        logits = torch.cat([model(x[:, c:c + chunk], cache=cache.step(min(chunk, seq_len - c))).logits.float()
                            for c in range(0, seq_len, chunk)], dim=1)
        nats += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n_bytes += int(lengths[y].sum())
    return nats / math.log(2) / max(n_bytes, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/speedrun/dsa_sparse/final")
    ap.add_argument("--data", nargs="*", default=None, help="text files (default: the speedrun's held-out files)")
    ap.add_argument("--max-tokens", type=int, default=8192, help="predicted tokens per configuration")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per row (past the speedrun's top-k of 256)")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per cached forward call")
    args = ap.parse_args()

    files = D.collect_files(args.data) if args.data else D.split_files(D.default_corpus(), 0.02)[1]
    tok = load_tokenizer(args.model)
    docs = [d for f in files for d in D.read_documents(f)]
    stream = token_stream(tok, docs)[:args.max_tokens + 1]
    f32 = nanoseek.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = f32.config
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"model: {args.model} (latent {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}, indexer key "
          f"{cfg.index_head_dim if cfg.use_dsa else 0}, top-k {cfg.index_topk if cfg.use_dsa else '-'}); text: "
          f"{len(files)} file(s), {(len(stream) - 1) // args.seq_len * args.seq_len:,} tokens in rows of "
          f"{args.seq_len}, fed in chunks of {args.chunk}")
    print(f"\n{'model dtype':>11s} {'kv cache':>8s} {'bits/byte':>10s} {'vs full':>9s} {'bytes/token':>12s} "
          f"{'s':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        model = f32 if dtype == torch.float32 else f32.to(dtype)
        base = None
        for kv in ("auto", "fp8", "int8"):
            t0 = time.perf_counter()
            bpb = cached_bits_per_byte(model, tok, stream, args.seq_len, args.chunk, kv)
            dt = time.perf_counter() - t0
            per_tok = BlockPool.bytes_per_block(cfg, cfg.num_hidden_layers, 1, dtype, kv_format(kv))
            base = bpb if base is None else base
            rel = "" if kv == "auto" else f"{(bpb / base - 1) * 100:+.3f}%"
            print(f"{str(dtype).split('.')[-1]:>11s} {kv:>8s} {bpb:>10.4f} {rel:>9s} {per_tok:>12d} {dt:>6.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
