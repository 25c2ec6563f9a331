"""Prefill throughput: nanoseek vs transformers on the same weights, side by side from one run.

    python bench/forward.py [--preset small] [--tokens 512] [--batch 1] [--repeats 5] [--threads N]

Builds the preset with random weights, saves it once in HF layout, loads it into both implementations, and
times a no-grad forward over `--tokens` tokens (float32 and bfloat16). Runs of the two are interleaved so that
background load hits both alike; the median of `--repeats` timed runs is reported after a warm-up. nanoseek is
timed with its fast paths on and weights packed for oneDNN (`kernels.install`), as its engine runs on CPU; the logit
difference is taken before packing. (Packed fp32 GEMMs accumulate in another order: on random weights the DSA
indexer's near-tied scores then pick a few different rows, which moves some logits by ~0.3; with DSA dense the
packed model matches the plain one to 3e-6.)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import nanoseek
from nanoseek import precision
from nanoseek import kernels
from nanoseek.config import get_preset


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="auto",
                    help="auto (the dtype `--dtype auto` picks on this CPU), all, or a list: float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.dtypes = ",".join(precision.dtype_names(args.dtypes, what="forward"))
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    print(f"preset {args.preset}: {cfg.num_params()['total'] / 1e6:.1f}M total, "
          f"{cfg.num_params()['active'] / 1e6:.1f}M active; batch {args.batch} x {args.tokens} tokens; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            ours = nanoseek.from_pretrained(d, dtype=dtype)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            with torch.inference_mode():
                a = ours(ids).logits.float()
                b = ref(ids).logits.float()
                err = (a - b).abs().max().item()
                kernels.install(ours, pack_weights=True)  # as the engine runs it on CPU
                t_ours = timed(lambda: ours(ids), args.repeats)
                t_ref = timed(lambda: ref(ids), args.repeats)
            n = args.batch * args.tokens
            rows.append((dt_name, n / t_ours, n / t_ref, t_ref / t_ours, err))
            del ours, ref
    print()
    print(f"| dtype | nanoseek tok/s | transformers tok/s | ratio | max |logit diff| |")
    print(f"|---|---:|---:|---:|---:|")
    for dt_name, a, b, r, err in rows:
        print(f"| {dt_name} | {a:,.0f} | {b:,.0f} | {r:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
