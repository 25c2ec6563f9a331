"""Greedy equality with llama.cpp: the same weights decoded greedily by nanoseek and by llama.cpp, token by token.

    python bench/llamacpp_greedy.py [--model HF_DIR] [--preset small] [--outtypes f32,q8_0] [--tokens 32]

The model is a folder nanoseek saved, with its tokenizer (--model), or else the preset with random weights and a
tokenizer trained on the default corpus. llama.cpp's own converter writes it as a GGUF of each --outtype
(`bench/llamacpp.py`: the pinned llama.cpp, its converter under its pinned transformers); `llamacpp_greedy.c`,
linked against that llama.cpp, tokenizes each of 3 prompts with the GGUF's tokenizer and decodes --tokens
greedy steps, printing the ids and, at every step, the margin of its pick over the runner-up. nanoseek decodes
the same prompt ids with its engine (float32, the 3 prompts as one batch) from two sources: the HF folder, and
the GGUF file itself (`nanoseek.gguf`, which dequantizes q8_0 to float32). Per prompt it prints whether nanoseek's
tokenizer gives llama.cpp's prompt ids, whether the greedy tokens match, and where they first differ: the step,
and the logit margins there (nanoseek, from its plain forward: its pick over llama.cpp's; llama.cpp: its pick
over the runner-up), which says whether the difference is a near-tie or a real disagreement.

llama.cpp's q8_0 matmuls also round the activations to 8 bits, which nanoseek's dequantized weights do not: a q8_0
row may part ways at a near-tie where f32 rows match.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import llamacpp
import nanoseek
from nanoseek.config import get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.tokenizer import load_tokenizer

PROMPTS = ("The history of the city begins with", "def fibonacci(n):\n    ", "Q: What is twelve times seven?\nA:")


@dataclass
class Comparison:
    same: bool
    step: Optional[int] = None  # the first step where the tokens differ
    ns_margin: Optional[float] = None  # nanoseek's logit of its pick minus that of llama.cpp's pick there
    ll_margin: Optional[float] = None  # llama.cpp's logit of its pick minus its runner-up's there


def llamacpp_greedy(binary: Path, gguf: Path, prompts: tuple[str, ...], n_tokens: int, threads: int) -> list[dict]:
    """{"prompt": ids, "tokens": ids, "margins": floats} per prompt, from `llamacpp_greedy.c`."""
    got = subprocess.run([str(binary), str(gguf), str(n_tokens), str(threads), *prompts],
                         capture_output=True, text=True, errors="replace")
    if got.returncode:
        raise llamacpp.Unavailable(f"llama.cpp greedy decoding failed ({got.returncode}): "
                                   f"{llamacpp._last_line(got.stderr)}")
    return [json.loads(line) for line in got.stdout.splitlines()]


def nanoseek_greedy(model, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """The engine's greedy tokens for each prompt, all prompts in one batch (what `nanoseek serve` runs)."""
    engine = Engine(model, None, max_batch_size=len(prompts))
    outs = engine.generate(prompts, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
    return [o.new_token_ids for o in outs]


@torch.no_grad()
def compare(model, prompt: list[int], ns: list[int], ll: list[int], ll_margins: list[float]) -> Comparison:
    """Where the two token lists first differ, with nanoseek's logits there from its plain forward (no cache, the
    reference path) over the prefix both decoded alike."""
    for i, (a, b) in enumerate(zip(ns, ll)):
        if a != b:
            logits = model(torch.tensor([prompt + ns[:i]]), num_logits=1).logits[0, -1].float()
            return Comparison(False, i, float(logits[a] - logits[b]), ll_margins[i])
    return Comparison(True)


def format_rows(rows: list[tuple[str, str, int, bool, Comparison]]) -> str:
    """Markdown table of (llama.cpp GGUF, nanoseek's weights, prompt number, same prompt ids, comparison)."""
    lines = ["| llama.cpp | nanoseek from | prompt | same prompt ids | greedy tokens | first difference | "
             "nanoseek margin there | llama.cpp margin there |", "|---|---|---:|---|---|---:|---:|---:|"]
    for gguf, source, p, same_ids, c in rows:
        where = ("-", "-", "-") if c.same else (f"step {c.step}", f"{c.ns_margin:.4f}", f"{c.ll_margin:.4f}")
        lines.append(f"| {gguf} | {source} | {p} | {'yes' if same_ids else 'NO'} | "
                     f"{'equal' if c.same else 'differ'} | {' | '.join(where)} |")
    return "\n".join(lines)


def without_indexer(model, hf_dir: str, out: str) -> str:
    """The model saved into out as deepseek_v3 (its DSA indexer dropped, MTP kept), with hf_dir's tokenizer."""
    cfg = model.config.replace(model_type="deepseek_v3", index_topk=0, index_n_heads=0)
    dense = nanoseek.Transformer(cfg)
    missing, _ = dense.load_state_dict(model.state_dict(), strict=False)  # the indexer's weights are left out
    assert not missing, missing
    nanoseek.save_pretrained(dense, out)
    load_tokenizer(hf_dir).save(out)
    return out


def run(args, hf_dir: str) -> None:
    src, _ = llamacpp.prepare()
    binary = llamacpp.build_greedy(src, llamacpp.cache_root())
    hf_model = nanoseek.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = hf_model.config
    tok = load_tokenizer(hf_dir)
    rows, margins = [], []
    with tempfile.TemporaryDirectory() as d:
        if cfg.use_dsa and cfg.index_head_dim < 64:
            # llama.cpp's deepseek32 graph needs indexer heads of 64 or more (a `small` model trained before the
            # preset had 64 has 32). Within index_topk tokens DSA attends to every token, so the model without its
            # indexer computes the same thing: llama.cpp runs that, as deepseek_v3 (nanoseek still runs V3.2)
            longest = max(len(tok.encode(p, add_bos=True)) for p in PROMPTS) + args.tokens
            if longest > cfg.index_topk:
                raise llamacpp.Unavailable(f"indexer heads of {cfg.index_head_dim} (llama.cpp needs 64 or more) and "
                                           f"{longest} tokens, past DSA's top-{cfg.index_topk}")
            print(f"llama.cpp runs the model as deepseek_v3 without its DSA indexer: its indexer heads are "
                  f"{cfg.index_head_dim} wide (llama.cpp's deepseek32 needs 64 or more); within {cfg.index_topk} "
                  f"tokens DSA attends to every token, so the two compute the same")
            hf_dir = without_indexer(hf_model, hf_dir, str(Path(d) / "v3"))
        for outtype in args.outtypes.split(","):
            gguf = llamacpp.convert(src, hf_dir, Path(d) / f"model-{outtype}.gguf", outtype)
            ll_runs = llamacpp_greedy(binary, gguf, PROMPTS, args.tokens, args.threads)
            gguf_model = nanoseek.from_pretrained(gguf, dtype=torch.float32)
            for source, model in (("HF folder", hf_model), (f"the {outtype} GGUF", gguf_model)):
                ns_runs = nanoseek_greedy(model, [r["prompt"] for r in ll_runs], args.tokens)
                for p, (text, r, ns) in enumerate(zip(PROMPTS, ll_runs, ns_runs), 1):
                    c = compare(model, r["prompt"], ns, r["tokens"], r["margins"])
                    rows.append((outtype, source, p, tok.encode(text, add_bos=True) == r["prompt"], c))
                    margins.append(min(r["margins"]))
            del gguf_model
            gguf.unlink()
    print(f"\nGreedy decoding, {args.tokens} steps, {len(PROMPTS)} prompts (float32 on nanoseek's side; margins "
          f"in logits)")
    print(format_rows(rows))
    print(f"smallest llama.cpp margin of any step: {min(margins):.4f} (a near-tie there can flip under any "
          f"rounding)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a folder nanoseek saved, with its tokenizer (default: --preset, random)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--outtypes", default="f32,q8_0", help="the converter's --outtype values to compare")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    try:
        if args.model:
            run(args, args.model)
            return
        cfg = get_preset(args.preset)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
            llamacpp.add_tokenizer(d, cfg.vocab_size)
            run(args, d)
    except llamacpp.Unavailable as e:
        print(f"llama.cpp unavailable: {e}")


if __name__ == "__main__":
    main()
