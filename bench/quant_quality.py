"""Quality of weight-only quantization (nanoseek.quant) on a trained model, from one run.

    python bench/quant_quality.py [--model runs/speedrun/dsa_sparse/final] [--data FILE...] [--max-tokens 16384]

Bits per byte (`nanoseek.evaluate`, what `nanoseek eval` prints) of the float32 model, bfloat16, and the
quantized forms: int8, int4 with groups of 32 / 64 / 128, and two int4 variants that were measured and not
chosen (the head in int4 instead of int8; symmetric int4 groups, codes -7..7 with no min), each relative to the
unquantized model in the same activation dtype, with the relative RMS error of the quantized weights. Then
greedy decoding, bf16 vs int8 (bf16 activations, the fused int8 path) for --steps tokens on 5 code prompts:
the first differing step, if any, with the bf16 model's logit margin there (top-1 minus the int8 model's pick)
against the quantization error of the logits at that step (max and RMS of |int8 - bf16| over the vocabulary): a
flip is explained when the margin is below the max error.

Default text: the speedrun's held-out files (its corpus is this Python's standard library; `split_files` holds
out 2% of the files by path hash, never trained on). Prints the CPU, the settings and one table.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek import data as D  # noqa: E402
from nanoseek import quant  # noqa: E402
from nanoseek.evaluate import bits_per_byte, token_stream  # noqa: E402
from nanoseek.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n",
           "    for i in range(len(", "# Read the configuration file\n"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def symmetric_int4(model: torch.nn.Module, float_model: torch.nn.Module) -> torch.nn.Module:
    """Rewrite an int4-quantized model's int4 weights as symmetric groups (scale = max|group| / 7, codes -7..7)
    from the float model's weights, held in the asymmetric format (min = -8 scale, codes + 8): the variant
    quant.py did not choose."""
    floats = dict(float_model.named_modules())
    for n, m in model.named_modules():
        if not isinstance(m, quant.QUANTIZED):
            continue
        for name in [b for b in list(m._buffers) if b + "_min" in m._buffers]:
            w = getattr(floats[n], name).detach().float()
            G = w.shape[-1] // m._buffers[name + "_scale"].shape[-1]
            g = w.unflatten(-1, (-1, G))
            s = quant._bf16(g.abs().amax(-1) / 7, up=True)
            sf = torch.where(s.float() > 0, s.float(), torch.ones_like(s.float()))
            q = ((g / sf[..., None]).round().clamp(-7, 7) + 8).to(torch.uint8).flatten(-2)
            m._buffers[name] = q[..., 0::2] | (q[..., 1::2] << 4)
            m._buffers[name + "_scale"] = s
            m._buffers[name + "_min"] = (-8 * s.float()).to(torch.bfloat16)
    return model


def quantized(float_model, fmt: str, G: int = 32, head: str = "", symmetric: bool = False):
    m = quant.quantize_model(copy.deepcopy(float_model), fmt, G)
    if head == "int4":
        m.lm_head = quant.QuantLinear.from_linear(float_model.lm_head, "int4", G)
    return symmetric_int4(m, float_model) if symmetric else m


def weight_error(model: torch.nn.Module, float_model: torch.nn.Module) -> float:
    """Relative RMS error of the quantized weights, sqrt(sum |W - W'|^2 / sum |W|^2) over every quantized tensor."""
    floats = dict(float_model.named_modules())
    num = den = 0.0
    for n, m in model.named_modules():
        if isinstance(m, quant.QUANTIZED):
            for name in [b for b in m._buffers if b + "_scale" in m._buffers]:
                w = getattr(floats[n], name).detach().float()
                num += float((quant.dequantize(*m._weights(name)) - w).pow(2).sum())
                den += float(w.pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    out, logits = list(ids), []
    for _ in range(steps):
        lg = model(torch.tensor([out])).logits[0, -1].float()
        logits.append(lg)
        out.append(int(lg.argmax()))
    return out[len(ids):], logits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/speedrun/dsa_sparse/final")
    ap.add_argument("--data", nargs="*", default=None, help="text files (default: the speedrun's held-out files)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="predicted tokens per configuration")
    ap.add_argument("--seq-len", type=int, default=256, help="context per row (the speedrun trains on 256)")
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens per prompt")
    args = ap.parse_args()

    files = D.collect_files(args.data) if args.data else D.split_files(D.default_corpus(), 0.02)[1]
    tok = load_tokenizer(args.model)
    docs = [d for f in files for d in D.read_documents(f)]
    stream = token_stream(tok, docs)
    f32 = nanoseek.from_pretrained(args.model, dtype=torch.float32)
    bf16 = copy.deepcopy(f32).to(torch.bfloat16)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"model: {args.model}; text: {len(files)} file(s), {sum(len(d.encode()) for d in docs):,} bytes "
          f"({', '.join(Path(f).name for f in files[:6])}{', ...' if len(files) > 6 else ''}); "
          f"first {min(args.max_tokens, len(stream) - 1):,} tokens, rows of {args.seq_len}")
    rows = [("float32", "-", f32, None), ("bfloat16", "-", bf16, None),  # (weights, activations, model, base)
            ("int8", "float32", lambda: quantized(f32, "int8"), "float32"),
            ("int8", "bfloat16", lambda: quantized(bf16, "int8"), "bfloat16"),
            ("int4 g32", "float32", lambda: quantized(f32, "int4", 32), "float32"),
            ("int4 g64", "float32", lambda: quantized(f32, "int4", 64), "float32"),
            ("int4 g128", "float32", lambda: quantized(f32, "int4", 128), "float32"),
            ("int4 g32, head int4 (not chosen)", "float32", lambda: quantized(f32, "int4", 32, head="int4"),
             "float32"),
            ("int4 g32 symmetric (not chosen)", "float32", lambda: quantized(f32, "int4", 32, symmetric=True),
             "float32")]
    base: dict[str, float] = {}
    print(f"\n{'weights':34s} {'activations':>11s} {'bits/byte':>10s} {'vs float':>9s} {'W error':>8s} "
          f"{'MiB':>7s} {'s':>6s}")
    for name, act, make, ref in rows:
        model = make if isinstance(make, torch.nn.Module) else make()
        t0 = time.perf_counter()
        bpb, _ = bits_per_byte(model, tok, stream, args.seq_len, max_tokens=args.max_tokens)
        dt = time.perf_counter() - t0
        if ref is None:
            base[name] = bpb
            rel = werr = ""
        else:
            rel = f"{(bpb / base[ref] - 1) * 100:+.2f}%"
            werr = f"{weight_error(model, f32 if ref == 'float32' else bf16):.4f}"
        act = act if act != "-" else name
        print(f"{name:34s} {act:>11s} {bpb:>10.4f} {rel:>9s} {werr:>8s} {quant.bytes_of(model) / 2**20:>7.1f} "
              f"{dt:>6.1f}", flush=True)

    print(f"\ngreedy, {args.steps} tokens: bfloat16 vs int8 (bf16 activations, the fused int8 op)")
    q8 = quantized(bf16, "int8")
    for p in PROMPTS:
        ids = tok.encode(p, add_bos=True)
        a, la = greedy(bf16, ids, args.steps)
        b, lb = greedy(q8, ids, args.steps)
        diff = next((i for i in range(args.steps) if a[i] != b[i]), None)
        label = repr(p if len(p) <= 30 else p[:27] + "...")
        if diff is None:
            err = max(float((x - y).abs().max()) for x, y in zip(la, lb))
            print(f"  {label:34s} equal for {args.steps} tokens (max |logit error| {err:.3f})")
            continue
        lbf, l8 = la[diff], lb[diff]  # same prefix up to here
        margin = float(lbf[a[diff]] - lbf[b[diff]])
        err = (l8 - lbf).abs()
        why = "explained" if margin < float(err.max()) else "NOT explained"
        print(f"  {label:34s} first differs at step {diff}: bf16 margin {margin:.4f} vs |logit error| max "
              f"{float(err.max()):.4f}, rms {float(err.pow(2).mean().sqrt()):.4f}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
