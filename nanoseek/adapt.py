"""`nanoseek adapt`: continued pre-training of a model on a new language, through the trainer of `train.py`.

    nanoseek tokenizer extend BASE_MODEL --data TEXT --add N --out TOK        (new tokens: nanoseek/vocab.py)
    nanoseek adapt --init BASE_MODEL --tokenizer TOK --data TEXT --max-steps N --out DIR \
        [--replay BASE_TEXT --replay-ratio 0.375] [--new-rows-steps K] [--save-every S] [--resume]

The steps (all in `train.train`, so metrics, plots, report, atomic checkpoints, exact resume and torchrun are the
trainer's own):
1. the model of --init is resized to the extended tokenizer, new rows initialised as the mean of their base
   pieces' rows (`vocab.extend_model`);
2. with --new-rows-steps K, the first K steps train only those new embedding and head rows, everything else
   frozen, at --new-rows-lr. Off by default: in bench/adapt.py's short runs the stage cost held-out bits per byte
   in every language, the mean-of-pieces rows being a good enough start;
3. then everything trains, the schedule starting again over the remaining steps (warm-up, then decay: the weights
   that join here have no optimizer moments yet and would otherwise take the peak rate on their first step); with
   --lora-rank, a LoRA adapter and the new rows train instead, the base frozen, and DIR/final/ is the adapter in
   PEFT's format with the new rows and the tokenizer. The token embedding and output head train at
   --embed-lr-scale times the lr (default 3): the new tokens' rows have the most to learn, and raising their rate
   alone forgets less than raising the lr of the whole model;
4. --replay mixes that share of each batch's rows from base-domain text, which limits forgetting; the report shows
   held-out bits per byte of the new language and of the base domain (the replay data's held-out part, or
   --base-eval) at every evaluation.
DIR/final/ is the adapted model in Hugging Face layout with its tokenizer.
"""
from __future__ import annotations

import argparse

from nanoseek.precision import CHOICES as DTYPE_CHOICES
from nanoseek.train import TrainConfig, add_lora_arguments, run_command, validate


def parse_args(argv: list[str]) -> TrainConfig:
    d = TrainConfig(out="")
    ap = argparse.ArgumentParser(prog="nanoseek adapt", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init", required=True, help="the base model folder (Hugging Face layout, with its tokenizer)")
    ap.add_argument("--tokenizer", required=True, help="the extended tokenizer (`nanoseek tokenizer extend`)")
    ap.add_argument("--data", nargs="+", required=True, help="text of the new language: files or folders")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--stop-after", type=int, help="stop after this step (schedule still spans --max-steps)")
    ap.add_argument("--new-rows-steps", type=int, default=0,
                    help="first steps that train only the new tokens' rows, the rest frozen")
    ap.add_argument("--new-rows-lr", type=float,
                    help="peak learning rate of the new-rows stage (default: --lr)")
    ap.add_argument("--replay", nargs="+", default=[], help="base-domain text mixed into every batch")
    ap.add_argument("--replay-ratio", type=float, default=0.0, help="share of each batch's rows from --replay")
    ap.add_argument("--base-eval", nargs="+", default=[],
                    help="base-domain text to evaluate (default: the held-out part of --replay)")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="micro-batch rows per process")
    ap.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step (default 1)")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (lower than pre-training's)")
    ap.add_argument("--embed-lr-scale", type=float, default=3.0,
                    help="the token embedding's and output head's lr as a multiple of --lr (where the new tokens' "
                    "rows learn)")
    ap.add_argument("--min-lr", type=float, help="final lr (default lr/10)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default min(100, max_steps/10))")
    ap.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "muon"])
    ap.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES)
    ap.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="MTP loss weight lambda")
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out eval period (0 = at the end)")
    ap.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens per eval (0 = off)")
    ap.add_argument("--heldout-fraction", type=float, default=0.05,
                    help="share of the new text (and of --replay) held out for evaluation")
    ap.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period (0 = at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.json")
    ap.add_argument("--cache-dir", help="token cache folder (default $NANOSEEK_CACHE or ~/.cache/nanoseek)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--samples", type=int, default=d.samples, help="sampled completions in the report")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="run the training step eagerly (default: torch.compile its blocks when single-process)")
    add_lora_arguments(ap)
    a = vars(ap.parse_args(argv))
    tc = TrainConfig(**a)
    validate(tc)
    return tc


def cli(cmd: str, argv: list[str]) -> int:
    return run_command("nanoseek adapt", parse_args, argv)
