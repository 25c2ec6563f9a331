"""`nanoseek train`: pre-training with MoE balancing and MTP, the two DSA stages, exact resume, torchrun scale-out.

    nanoseek train --data DIR --preset small --max-steps 1000 --out runs/x [--save-every 100] [--resume]
    torchrun --nproc_per_node 2 -m nanoseek train ...        (same command, FSDP2 + optional expert parallelism)

One optimizer step = world_size x grad_accum micro-batches of batch_size rows of seq_len tokens (each rank reads
its own share). Per step:
- loss = LM cross-entropy + lambda/D sum_k CE(MTP depth k)                   (DeepSeek-V3 §2.2)
        + sequence-wise balance loss alpha sum_i f_i P_i                      (V3 §2.1.2, optional)
        (+ sum over layers of the indexer KL in the DSA sparse stage)        (V3.2-Exp §2.1)
- AdamW (or Muon on the blocks' matrices: --optimizer muon), warm-up then cosine or warmup-stable-decay, gradient
  clipping, bf16 with fp32 master weights;
- auxiliary-loss-free balancing (V3 §2.1.2): after the optimizer step, each noaux_tc router's bias moves by
  b_i += gamma * sign(mean load - load_i), loads counted over the whole global batch (all-reduced over ranks).
DSA stages on a dense or DSA checkpoint (--init): `warmup` freezes everything but the lightning indexers and
trains them on KL(head-summed main attention || softmax(index scores)) with dense attention; `sparse` trains
everything with top-k attention, the indexer on its detached input and KL over the selected set. `none`
(pre-training) runs dense attention and leaves the indexer alone.
Adapting a model to a new language (`nanoseek adapt`): a --tokenizer that extends the --init model's resizes the
model (`vocab.py`); --new-rows-steps first trains only the new tokens' rows; --replay mixes base-domain rows into
every batch, and its held-out part (or --base-eval) is evaluated beside the held-out set.

Checkpoints (every --save-every steps and at the end) are folders run/checkpoints/step_N written as
safetensors + JSON into a temporary folder, fsync'ed, renamed, then published by atomically replacing
run/checkpoints/latest.json: a kill at any moment leaves the previous checkpoint intact. They hold the model
(fp32 master weights and the routers' balancing biases), AdamW moments, schedule position, loader position
and the torch / numpy / python RNG states, so `--resume` continues bit-exactly. A manifest.json written last
holds each file's size and CRC-32: `--resume` takes the newest checkpoint that verifies and loads (latest.json's,
then the older ones), says in one line which one it skipped and why, and removes the temporary folders a kill
during a save left. The final model goes to run/final in Hugging Face layout with the tokenizer.

LoRA (--lora-rank R with --init MODEL; `nanoseek/lora.py`): the base stays frozen in the run's dtype, only the fp32
adapters train (AdamW, autocast), checkpoints hold the adapters, and run/final is the adapter in PEFT's format
(merge it with `nanoseek lora merge`, or serve it with `nanoseek serve MODEL --lora NAME=run/final`).

Legend: B micro-batch rows, T tokens per row, V vocabulary, E routed experts, D MTP depth.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek import metrics as M
from nanoseek.checkpoint import CheckpointError, SafetensorsFile, from_pretrained, read_json, save_pretrained
from nanoseek.compile import compile_blocks
from nanoseek.config import PRESETS, get_preset
from nanoseek import kernels
from nanoseek import lora
from nanoseek.kernels import cpu_experts
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer
from nanoseek.optim import (MasterWeightAdamW, MuonAdamW, Schedule, build_adamw, load_optimizer_state,
                            optimizer_state_tensors, set_lr)
from nanoseek.vocab import NewRowsOnly, extend_model

DSA_STAGES = ("none", "warmup", "sparse")
from nanoseek.precision import CHOICES as DTYPE_CHOICES, DTYPES, resolve as resolve_dtype


@dataclass
class TrainConfig:
    out: str
    data: list[str] = field(default_factory=list)  # files / folders; empty = the default corpus
    strict_data: bool = False  # refuse files that are not UTF-8 text (default: warn and decode with U+FFFD)
    preset: str = "tiny"
    init: Optional[str] = None  # HF-layout folder to start from (DSA stages, fine-tuning)
    tokenizer: Optional[str] = None  # HF tokenizer folder; None = train one into out/tokenizer
    vocab_size: Optional[int] = None  # tokenizer size when training one (default: the preset's)
    layers: Optional[int] = None  # override num_hidden_layers (quick runs)
    index_topk: Optional[int] = None  # override the DSA top-k
    max_steps: int = 100
    stop_after: Optional[int] = None  # stop (checkpointed) after this step, schedule still spans max_steps
    seq_len: int = 256
    batch_size: int = 8  # micro-batch rows per rank
    grad_accum: int = 0  # 0 = derive from batch_tokens (or 1)
    batch_tokens: int = 0  # global batch in tokens; 0 = world x batch_size x seq_len x grad_accum
    lr: float = 3e-3
    min_lr: Optional[float] = None  # default lr / 10
    warmup: Optional[int] = None  # default min(100, max_steps // 10)
    schedule: str = "cosine"
    weight_decay: float = 0.1
    embed_lr_scale: float = 1.0  # the token embedding's and output head's lr, as a multiple of the schedule's
    optimizer: str = "adamw"  # adamw | muon (Muon on the hidden matrices, AdamW on the rest: nanoseek/muon.py)
    muon_experts: bool = False  # muon: the routed experts' matrices too (costly at small batches)
    clip: float = 1.0
    dtype: str = "auto"  # auto: bfloat16 where the device computes it natively and fast, else float32
    mtp_weight: float = 0.3  # lambda (V3: 0.3 early, 0.1 late)
    bias_update_speed: float = 1e-3  # gamma (V3: 0.001, 0 at the end)
    seq_aux_alpha: float = 1e-4  # alpha (V3: 0.0001)
    dsa_stage: str = "none"
    eval_every: int = 0  # 0 = only at the end
    eval_tokens: int = 32768
    heldout_fraction: float = 0.02
    cache_dir: Optional[str] = None  # token caches (default ~/.cache/nanoseek/tokens or $NANOSEEK_CACHE)
    tokenizer_max_chars: Optional[int] = None  # cap on the text the tokenizer trains on
    save_every: int = 0  # 0 = only at the end
    resume: bool = False
    expert_parallel: bool = False
    seed: int = 1337
    device: str = "auto"
    log_every: int = 10
    # adapting to a new language (`nanoseek adapt`, nanoseek/adapt.py)
    replay: list[str] = field(default_factory=list)  # base-domain files mixed into every batch against forgetting
    replay_ratio: float = 0.0  # share of each micro-batch's rows taken from `replay`
    base_eval: list[str] = field(default_factory=list)  # base-domain text evaluated beside the held-out set
    #   (default: the held-out part of `replay`)
    new_rows_steps: int = 0  # first steps train only the rows of the tokens a --tokenizer adds to --init's
    new_rows_lr: Optional[float] = None  # peak lr of those steps (default: lr)
    samples: int = 0  # sampled completions in the report
    sample_tokens: int = 48
    progress: bool = True
    compile: bool = True  # torch.compile the blocks (single process; eager if compiling fails)
    task: str = "pretrain"  # pretrain (text files) | sft (chat conversations, nanoseek/sft.py)
    thinking: str = "train"  # sft: what to do with the assistant's reasoning (nanoseek/sft.py)
    lora_rank: int = 0  # > 0: train a LoRA adapter on the frozen --init model (`lora.py`)
    lora_alpha: float = 8.0  # scale alpha / rank (PEFT's default alpha)
    lora_targets: str = ",".join(lora.TARGETS)  # comma-separated `lora.TARGETS`
    lora_dropout: float = 0.0
    lora_rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilised LoRA)


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> TrainConfig:
    d = TrainConfig(out="")
    ap = argparse.ArgumentParser(prog="nanoseek train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", nargs="*", default=[], help="text/markdown/source/JSONL files or folders "
                    "(default: this Python's standard library source)")
    ap.add_argument("--strict-data", action="store_true",
                    help="refuse data files that are not UTF-8 text (default: a warning each)")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("--preset", default=d.preset, choices=list(PRESETS))
    ap.add_argument("--init", help="start from this Hugging Face model folder (e.g. for --dsa-stage)")
    ap.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json); default: train one on the data")
    ap.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (default: preset's)")
    ap.add_argument("--layers", type=int, help="override the preset's number of layers")
    ap.add_argument("--index-topk", type=int, help="override the DSA top-k")
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--stop-after", type=int, help="stop after this step (schedule still spans --max-steps)")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="micro-batch rows per process")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step (default 1)")
    g.add_argument("--batch-tokens", type=int, default=0, help="global batch in tokens (sets --grad-accum)")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--min-lr", type=float, help="final lr (default lr/10)")
    ap.add_argument("--warmup", type=int, help="warm-up steps (default min(100, max_steps/10))")
    ap.add_argument("--schedule", default=d.schedule, choices=["cosine", "wsd"])
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--embed-lr-scale", type=float, default=d.embed_lr_scale,
                    help="the token embedding's and output head's lr as a multiple of --lr")
    ap.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "muon"],
                    help="muon: Muon on the blocks' matrices with Moonlight's AdamW-matched update size, AdamW on "
                    "embeddings, head, norms and routers (one process)")
    ap.add_argument("--muon-experts", action="store_true", help="muon: the routed experts' matrices too")
    ap.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip (0 = off)")
    ap.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES,
                    help="compute dtype (bfloat16: bf16 compute, fp32 master weights; auto: bfloat16 where the "
                    "device computes it natively and fast, else float32)")
    ap.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="MTP loss weight lambda")
    ap.add_argument("--bias-update-speed", type=float, default=d.bias_update_speed,
                    help="gamma of auxiliary-loss-free balancing (0 = off)")
    ap.add_argument("--seq-aux-alpha", type=float, default=d.seq_aux_alpha,
                    help="weight of the sequence-wise balance loss (0 = off)")
    ap.add_argument("--dsa-stage", default=d.dsa_stage, choices=DSA_STAGES)
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out eval period (0 = at the end)")
    ap.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens per eval (0 = off)")
    ap.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                    help="share of files held out for evaluation")
    ap.add_argument("--cache-dir", help="token cache folder (default $NANOSEEK_CACHE or ~/.cache/nanoseek)")
    ap.add_argument("--tokenizer-max-chars", type=int, help="train the tokenizer on at most this much text")
    ap.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period (0 = at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.json")
    ap.add_argument("--expert-parallel", action="store_true", help="split routed experts across processes")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--samples", type=int, default=d.samples, help="sampled completions in the report")
    ap.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="run the training step eagerly (default: torch.compile its blocks when single-process)")
    add_lora_arguments(ap)
    a = ap.parse_args(argv)
    tc = TrainConfig(**{k: v for k, v in vars(a).items()})
    validate(tc)
    return tc


def add_lora_arguments(ap: argparse.ArgumentParser) -> None:
    """The --lora-* options (train, adapt, sft)."""
    d = TrainConfig(out="")
    g = ap.add_argument_group("LoRA (with --init)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="train a LoRA adapter of this rank (0 = off); the rows of tokens a --tokenizer adds to the "
                   "--init model train with it and are saved in it (PEFT's trainable tokens)")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="scale alpha / rank")
    g.add_argument("--lora-targets", default=d.lora_targets, help=f"comma-separated, of {', '.join(lora.TARGETS)}")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="attention targets only (as PEFT)")
    g.add_argument("--lora-rslora", action="store_true", help="scale alpha / sqrt(rank)")


def validate(tc: TrainConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)
    need(tc.max_steps >= 1, "--max-steps must be >= 1")
    need(tc.seq_len >= 2 and tc.batch_size >= 1, "--seq-len must be >= 2 and --batch-size >= 1")
    need(tc.grad_accum >= 0 and tc.batch_tokens >= 0, "--grad-accum / --batch-tokens must be >= 0")
    need(tc.stop_after is None or 1 <= tc.stop_after <= tc.max_steps, "--stop-after must be in [1, max-steps]")
    need(tc.dsa_stage in DSA_STAGES, f"--dsa-stage must be one of {DSA_STAGES}")
    need(tc.task in ("pretrain", "sft"), "task must be pretrain or sft")
    need(tc.dtype in DTYPE_CHOICES, f"--dtype must be one of {DTYPE_CHOICES}")
    need(tc.optimizer in ("adamw", "muon"), "--optimizer must be adamw or muon")
    need(not tc.muon_experts or tc.optimizer == "muon", "--muon-experts needs --optimizer muon")
    need(0 <= tc.heldout_fraction < 1, "--heldout-fraction must be in [0, 1)")
    need(tc.preset in PRESETS, f"unknown preset {tc.preset!r}; choose one of {', '.join(PRESETS)}")
    need(tc.mtp_weight >= 0 and tc.bias_update_speed >= 0 and tc.seq_aux_alpha >= 0,
         "--mtp-weight, --bias-update-speed and --seq-aux-alpha must be >= 0")
    if tc.dsa_stage != "none":
        need(tc.init is not None or tc.resume, "--dsa-stage warmup|sparse starts from a checkpoint: give --init DIR")
    if tc.init is not None:
        need(Path(tc.init).is_dir(), f"--init {tc.init}: not a directory")
    if tc.tokenizer is not None:
        need(Path(tc.tokenizer).exists(), f"--tokenizer {tc.tokenizer}: not found")
    need(0 <= tc.replay_ratio < 1, "--replay-ratio must be in [0, 1)")
    need(tc.embed_lr_scale > 0, "--embed-lr-scale must be > 0")
    need(bool(tc.replay) == (tc.replay_ratio > 0), "--replay and --replay-ratio go together")
    if tc.replay:
        rows = replay_rows(tc)
        need(1 <= rows < tc.batch_size, f"--replay-ratio {tc.replay_ratio} of --batch-size {tc.batch_size} rows "
             f"gives {rows} replay rows; it must leave at least one row of each kind")
    need(0 <= tc.new_rows_steps <= tc.max_steps, "--new-rows-steps must be in [0, max-steps]")
    need(tc.new_rows_steps == 0 or tc.init is not None, "--new-rows-steps needs --init (the model to extend)")
    need(tc.new_rows_lr is None or tc.new_rows_lr > 0, "--new-rows-lr must be > 0")
    for flag, paths in (("--data", tc.data), ("--replay", tc.replay), ("--base-eval", tc.base_eval)):
        for p in paths:
            need(Path(p).exists(), f"{flag} {p}: not found")
    need(tc.lora_rank >= 0, "--lora-rank must be >= 0")
    if tc.lora_rank:
        need(tc.init is not None, "--lora-rank trains an adapter on a base model: give --init MODEL")
        need(tc.optimizer == "adamw" and tc.dsa_stage == "none" and not tc.expert_parallel,
             "--lora-rank trains with --optimizer adamw, --dsa-stage none and no --expert-parallel")
        _lora_config(tc).validate()


def replay_rows(tc: TrainConfig) -> int:
    """Rows of each micro-batch read from the replay data (the rest from --data)."""
    return round(tc.replay_ratio * tc.batch_size) if tc.replay else 0


def _lora_config(tc: TrainConfig) -> lora.LoraConfig:
    return lora.LoraConfig(tc.lora_rank, tc.lora_alpha, tuple(t.strip() for t in tc.lora_targets.split(",")),
                           tc.lora_dropout, tc.lora_rslora)


def cli(cmd: str, argv: list[str]) -> int:
    return run_command("nanoseek train", parse_args, argv)


def run_command(prog: str, parse, argv: list[str]) -> int:
    """Parse argv into a TrainConfig with `parse` and train: the shared body of `nanoseek train` and `adapt`."""
    try:
        tc = parse(argv)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return run(tc, prog)


def run(tc: TrainConfig, prog: str = "nanoseek train") -> int:
    """train(tc) as a command: errors and interrupts become messages and exit codes."""
    from nanoseek.parallel import destroy
    try:
        train(tc)
    except (ValueError, FileNotFoundError) as e:
        from nanoseek.cli import error
        return error(prog, e, 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; `--resume` continues from the last checkpoint in {tc.out}", file=sys.stderr)
        return 130
    finally:
        destroy()  # under torchrun: leave the group once train()'s sharded model is gone (see destroy)
    return 0


# ---- distributed glue (nanoseek.parallel) ----------------------------------------------------------------
def _barrier(dist) -> None:
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce_sum(t: torch.Tensor, dist) -> torch.Tensor:
    if dist.world_size == 1:
        return t
    from nanoseek.parallel import all_reduce_sum
    return all_reduce_sum(t, dist)


# ---- the model's training switches -------------------------------------------------------------------------
def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def dsa_layers(model: torch.nn.Module) -> list[MLA]:
    return [m for m in model.modules() if isinstance(m, MLA) and m.indexer is not None]


def set_dsa_stage(model: torch.nn.Module, stage: str, training: bool = True) -> None:
    """none: dense attention, no indexer; warmup: dense attention + indexer KL; sparse: top-k + indexer KL.
    Evaluation (training=False) keeps the stage's attention but skips the KL."""
    for m in dsa_layers(model):
        m.dsa_mode = "sparse" if stage == "sparse" else "dense"
        m.indexer_loss_on = training and stage in ("warmup", "sparse")


def freeze_for_stage(model: torch.nn.Module, stage: str) -> None:
    """What trains: the DSA warm-up only the lightning indexers; pre-training (dense attention, the indexer
    unused) everything but the indexers; the sparse stage everything."""
    for name, p in model.named_parameters():
        is_indexer = ".indexer." in name
        p.requires_grad_({"warmup": is_indexer, "none": not is_indexer, "sparse": True}[stage])


# ---- one micro-batch -------------------------------------------------------------------------------------
def _mtp_targets(y: torch.Tensor, segment_ids: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """MTP depth k's targets (0-based): y[:, i+k+1] for position i, -100 where that token is in another packed
    document than position i's [B, T-1-k]."""
    n = y.shape[1] - 1 - k
    target = y[:, k + 1:k + 1 + n]
    if segment_ids is not None:
        target = target.masked_fill(segment_ids[:, k + 1:k + 1 + n] != segment_ids[:, :n], -100)
    return target


def target_counts(y: torch.Tensor, segment_ids: Optional[torch.Tensor], mtp_depth: int) -> torch.Tensor:
    """Trained targets in a micro-batch: [1 + mtp_depth] (the LM's, then each MTP depth's)."""
    ys = [y] + [_mtp_targets(y, segment_ids, k) for k in range(mtp_depth) if y.shape[1] - 1 - k > 0]
    counts = [(t != -100).sum() for t in ys]
    return torch.stack(counts + [counts[0].new_zeros(())] * (1 + mtp_depth - len(counts))).double()


def micro_step_losses(model: Transformer, x: torch.Tensor, y: torch.Tensor, tc: TrainConfig, mtp_depth: int,
                      segment_ids: Optional[torch.Tensor] = None,
                      per_target: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Forward one micro-batch x, y [B, T] (y = -100 where nothing is trained), with segment_ids [B, T] for rows
    that pack several documents (SFT); returns the loss to backpropagate ('loss'), its parts and the expert
    loads of the MoE layers that ran ('expert_load' [L, E], main layers then MTP, as `moe_layers`).

    per_target [1 + mtp_depth]: divide each loss's summed nats by this instead of taking the micro-batch's own
    mean: the global batch's target count over (processes x micro-batches), so that micro-batches holding
    different numbers of trained tokens (SFT's masks) add up to the global batch's per-token mean, the same
    however the batch is split across processes and accumulation steps."""
    out = model(x, segment_ids=segment_ids, num_logits=0)  # the head runs in head_loss (no [B, T, V] logits)
    if tc.dsa_stage == "warmup":
        # only the indexers train, on their KL to the frozen model's attention: the MTP blocks run (their indexers
        # warm up too) but no head pass does (the LM losses would be the frozen model's, at a sixth of the step)
        for _ in _mtp_depths(model, x, out, mtp_depth, segment_ids):
            pass
        kl = out.stats.indexer_loss()
        return _with_loads(model, out.stats, {"indexer_kl": kl, "indexer_recall": out.stats.indexer_recall(),
                                              "loss": kl})

    def mean_nats(hidden: torch.Tensor, target: torch.Tensor, i: int) -> torch.Tensor:
        nats = model.head_loss(hidden, target, reduction="sum")
        return nats / (per_target[i] if per_target is not None else (target != -100).sum().clamp_min(1))
    lm = model.head_loss(out.hidden, y) if per_target is None else mean_nats(out.hidden, y, 0)
    parts: dict[str, torch.Tensor] = {"lm_loss": lm}
    total = lm
    if mtp_depth:
        # depth k's targets: y[:, i+k+1] at position i, -100 past the row's end (`_mtp_depths`)
        mtp = lm.new_zeros(())
        for k, normed in _mtp_depths(model, x, out, mtp_depth, segment_ids):
            target = F.pad(_mtp_targets(y, segment_ids, k), (0, k + 1), value=-100)
            if segment_ids is None and per_target is None:
                mtp = mtp + model.head_loss(normed, target)
            else:  # a target in another document than position i's is not predicted (it may leave none)
                mtp = mtp + mean_nats(normed, target, k + 1)
        mtp = mtp / mtp_depth
        parts["mtp_loss"] = mtp
        total = total + tc.mtp_weight * mtp
    stats = out.stats
    if stats.balance_losses:
        parts["balance_loss"] = stats.balance_loss()
        total = total + parts["balance_loss"]
    if stats.indexer_losses:
        parts["indexer_kl"] = stats.indexer_loss()
        parts["indexer_recall"] = stats.indexer_recall()
        total = total + parts["indexer_kl"]
    parts["loss"] = total
    return _with_loads(model, stats, parts)


def _mtp_depths(model: Transformer, x: torch.Tensor, out, mtp_depth: int, segment_ids: Optional[torch.Tensor]):
    """Run the MTP depths after the main blocks' output `out`, yielding (k, normed hidden [B, T, D]) for each depth
    k (0-based) that has a token k+1 steps ahead. Depth k reads the hidden state of depth k-1 at i and token i+k+1
    (= x[:, i+k+1]), and predicts y[:, i+k+1]. It runs over all T positions, its last k+1 fed a repeat of the row's
    last token (their targets are -100): causal attention keeps them out of the other positions' outputs, and at the
    main blocks' length the MTP block reuses their compiled graph (`nanoseek.compile`) instead of compiling its own."""
    h = out.hidden
    for k in range(min(mtp_depth, x.shape[1] - 1)):
        ahead = torch.cat((x[:, k + 1:], x[:, -1:].expand(-1, k + 1)), dim=1)
        normed, h = model.mtp_forward(k, h, ahead, stats=out.stats, segment_ids=segment_ids, logits=False)
        yield k, normed


def _with_loads(model: Transformer, stats, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """parts with the expert loads of the MoE layers that ran ('expert_load' [L, E]), where any did."""
    load = stats.expert_load(model.config.n_routed_experts)
    if load is not None:
        parts["expert_load"] = load
    return parts


def loss_function(model: Transformer, tc: TrainConfig, mtp_depth: int, world: int = 1):
    """(x, y) -> micro_step_losses(...), with the blocks torch.compile'd when tc.compile and single-process (FSDP2
    and expert parallelism run eagerly). Compiling fuses the elementwise work around the GEMMs (norms, RoPE,
    SwiGLU, the routers, the casts); it compiles one graph per kind of block rather than the whole step
    (`nanoseek.compile`), so the cold first step costs one dense, one MoE and one MTP block, not every layer.
    Should compiling fail (no C++ compiler, say), the step runs eagerly with a warning."""
    def fn(x, y, segment_ids=None, per_target=None):
        return micro_step_losses(model, x, y, tc, mtp_depth, segment_ids, per_target)

    if tc.compile and world == 1:
        cpu_experts.library()  # built before tracing: the traced step calls it where it can (`FastExperts`)
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True  # fall back to eager instead of failing the run
        compile_blocks(model)
    return fn


def keep_freed_memory() -> bool:
    """glibc malloc: serve allocations up to 32 MB from the heap and never return freed heap memory to the
    system. A training step frees and re-allocates the same large activation and gradient buffers every step;
    by default each comes back as fresh mmap'ed pages, and the page faults cost up to a third of a bf16 step
    on this CPU. Process-wide; returns False where it does not apply (not glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


@torch.no_grad()
def update_expert_bias(moes: list[MoE], loads: torch.Tensor, gamma: float) -> None:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i). loads [n_moe, E] (global)."""
    if gamma <= 0:
        return
    for m, load in zip(moes, loads):
        b = m.gate.e_score_correction_bias
        if b is None:  # softmax / greedy routers have no balancing bias
            continue
        load = load.float()
        b.add_(gamma * torch.sign(load.mean() - load).to(b.device))


# ---- checkpoints -----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON) of the torch, CUDA, numpy and python generators."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    npk, npstate, nppos, npg, npc = np.random.get_state()
    js = {"python": _listify(random.getstate()),
          "numpy": {"key": npk, "state": npstate.tolist(), "pos": nppos, "has_gauss": npg, "cached": npc}}
    return tensors, js


def set_rng_state(tensors: dict, js: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = js["numpy"]
    np.random.set_state((n["key"], np.array(n["state"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_tuplify(js["python"]))


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# Each checkpoint's manifest.json (written last) holds every file's size and CRC-32, so --resume can tell a
# damaged checkpoint from a good one before trusting it. CRC-32 because the danger is accidental damage (a
# truncated copy, a flipped bit on disk), not tampering, and it is the fastest check in the standard library: on a
# 100 MB file on this project's machine, zlib.crc32 over 1 MiB chunks took 64 ms (1.6 GB/s), hashlib.file_digest
# with sha1 103 ms, sha256 112 ms, blake2b 200 ms, md5 222 ms. It catches every error burst up to 32 bits long.
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("model.safetensors", "train_state.safetensors", "state.json")


def _crc32(path: Path) -> int:
    import zlib
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _published(ck: Path) -> Path:
    """The folder latest.json names (it may be missing); CheckpointError if latest.json cannot be read."""
    ptr = ck / "latest.json"
    try:
        name = json.loads(ptr.read_text())["dir"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ptr}: unreadable ({type(e).__name__}: {e})") from None
    if not (isinstance(name, str) and name.startswith("step_") and "/" not in name and "\\" not in name):
        raise CheckpointError(f"{ptr}: 'dir' is {name!r}, not a checkpoint folder name")
    return ck / name


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The published checkpoint folder, or None. Only latest.json (replaced atomically) publishes one."""
    ck = Path(run_dir) / "checkpoints"
    if not (ck / "latest.json").exists():
        return None
    path = _published(ck)
    if not (path / "state.json").exists():
        raise CheckpointError(f"{ck / 'latest.json'} points to {path}, which is missing or incomplete")
    return path


def clean_stale_saves(run_dir: Path) -> list[str]:
    """Remove what a save killed midway leaves in run/checkpoints (.tmp_step_* folders, .latest_*.json); returns
    their names. Only called at start-up, when no save of this run can be in progress."""
    ck = Path(run_dir) / "checkpoints"
    stale = sorted([*ck.glob(".tmp_step_*"), *ck.glob(".latest_*.json")]) if ck.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.name for p in stale]


def verify_checkpoint(path: Path) -> bool:
    """Check every file of a checkpoint folder against its manifest (sizes, then CRC-32); raises CheckpointError
    naming the first damaged file. False for a checkpoint saved before manifests: nothing to check it against
    (load_checkpoint still checks what the files say about themselves)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing")
    man = path / MANIFEST
    if not man.exists():
        return False
    try:
        files = json.loads(man.read_text())["files"]
        listed = {name: (int(v["bytes"]), int(v["crc32"])) for name, v in files.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{man}: unreadable ({type(e).__name__}: {e})") from None
    for name, (size, crc) in listed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated or replaced)")
        if _crc32(f) != crc:
            raise CheckpointError(f"{f}: checksum mismatch (the file was damaged after it was saved)")
    return True


def save_checkpoint(run_dir: Path, step: int, model_sd: dict, opt_tensors: dict, state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step_N atomically and publish it in latest.json; keep the `keep` newest."""
    ck = Path(run_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final = ck / f"step_{step:07d}"
    tmp = ck / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(model_sd, tmp / "model.safetensors")
    _save_tensors(opt_tensors, tmp / "train_state.safetensors")
    _write_json(tmp / "state.json", state)
    # written last: sizes and checksums of the files as they were fsync'ed (read back from the page cache)
    _write_json(tmp / MANIFEST, {"files": {n: {"bytes": (tmp / n).stat().st_size, "crc32": _crc32(tmp / n)}
                                           for n in CHECKPOINT_FILES}})
    _fsync_dir(tmp)
    if final.exists():  # a stale folder from an abandoned run past the resumed step (never the published one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ck)
    ptr_tmp = ck / f".latest_{os.getpid()}.json"
    _write_json(ptr_tmp, {"dir": final.name, "step": step})
    os.replace(ptr_tmp, ck / "latest.json")
    _fsync_dir(ck)
    olds = sorted(p for p in ck.glob("step_*") if p.is_dir() and p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    SafetensorsFile(f).close()  # header, dtypes and offsets against the file size: a named error, not a panic
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors' own errors: still one line naming the file
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state dict, train-state tensors, state JSON) of a checkpoint folder; CheckpointError names the file
    that cannot be read."""
    f = path / "state.json"
    state = read_json(f)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int)):
        raise CheckpointError(f"{f}: not a training state (no integer 'step')")
    return _load_tensors(path / "model.safetensors"), _load_tensors(path / "train_state.safetensors"), state


def resume_checkpoint(run_dir: Path, say=print) -> Optional[tuple[Path, tuple[dict, dict, dict]]]:
    """(folder, load_checkpoint's contents) of the newest checkpoint that verifies and loads, or None if the run
    has none. The published one (latest.json) comes first, then the older folders, newest first; each one skipped
    is reported through `say` in one line naming the damaged file. Folders newer than the published one were
    never published (a kill between the rename and latest.json) and are not considered, unless latest.json itself
    is unreadable."""
    ck = Path(run_dir) / "checkpoints"
    folders = sorted((p for p in ck.glob("step_*") if p.is_dir()), reverse=True) if ck.is_dir() else []
    if (ck / "latest.json").exists():
        try:
            published = _published(ck)
            folders = [published] + [p for p in folders if p.name < published.name]
        except CheckpointError as e:
            say(f"--resume: {e}; trying the checkpoint folders, newest first")
    elif not folders:
        return None
    for path in folders:
        try:
            checked = verify_checkpoint(path)
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            say(f"--resume: skipping {path.name}: {e}")
            continue
        if not checked:
            say(f"--resume: {path.name} has no {MANIFEST} (saved by an older nanoseek): its file sizes were checked, "
                f"not its contents")
        return path, loaded
    raise CheckpointError(f"--resume: no checkpoint in {ck} is intact (see above); move the folder away to start "
                          f"from scratch")


def _full_state(model, dist) -> dict:
    """The unsharded model state (on the main process; {} elsewhere under torchrun). Collective."""
    if dist.world_size > 1:
        from nanoseek.parallel import full_model_state_dict
        return full_model_state_dict(model, dist)
    return {k: v.detach() for k, v in model.state_dict().items()}


# ---- evaluation and sampling -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches, autocast, dist, stage: str) -> dict[str, float]:
    """Held-out LM loss (nats per trained token) and bits per byte over `batches` of (x, y, n_bytes) or, for
    packed documents, (x, y, n_bytes, segment ids); y = -100 is not a target."""
    was_training = model.training
    model.eval()
    set_dsa_stage(model, stage, training=False)
    nats = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    nbytes = torch.zeros((), dtype=torch.float64)
    for x, y, b, *seg in batches:
        with autocast():
            out = model(x, segment_ids=seg[0] if seg else None, num_logits=0)
            nats += model.head_loss(out.hidden, y, reduction="sum").double().cpu()
        tokens += (y != -100).sum().double().cpu()
        nbytes += b
    sums = _all_reduce_sum(torch.stack([nats, tokens, nbytes]).to(dist.device), dist).cpu()
    set_dsa_stage(model, stage, training=True)
    model.train(was_training)
    nats, tokens, nbytes = sums.tolist()
    if tokens == 0:
        return {}
    return {"eval_loss": nats / tokens, "eval_bpb": nats / math.log(2) / max(nbytes, 1.0)}


@torch.no_grad()
def sample(model: Transformer, tok, prompts: list, max_new: int, temperature: float = 0.8,
           seed: int = 0) -> list[str]:
    """Sampled completions of `prompts` (text, BOS put before it, or token ids as they are), the i-th drawn with
    seed + i, up to max_new tokens or the tokenizer's EOS: one batch through the serving engine (its decode
    kernels: the report's four samples in a quarter of the time a plain cached loop takes on CPU)."""
    from nanoseek.engine import Engine, SamplingParams
    ids = [[tok.bos_id] + tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    engine = Engine(model, None, max_batch_size=len(ids), max_model_len=max(map(len, ids)) + max_new)
    params = [SamplingParams(max_tokens=max_new, temperature=temperature, seed=seed + i, stop_token_ids=[tok.eos_id])
              for i in range(len(ids))]
    texts = []
    for out in engine.generate(ids, params):
        new = out.new_token_ids
        if out.finish_reason == "stop" and new and new[-1] in (tok.eos_id, engine.eos_id):
            new = new[:-1]
        texts.append(tok.decode(new))
    return texts


SAMPLE_PROMPTS = ["def ", "import os\n", "class Parser:\n    def ", "# Copyright", "The "]


# ---- the run ---------------------------------------------------------------------------------------------
def _grad_accum(tc: TrainConfig, world: int) -> int:
    if tc.batch_tokens:
        per = world * tc.batch_size * tc.seq_len
        if tc.batch_tokens % per:
            raise ValueError(f"--batch-tokens {tc.batch_tokens} is not a multiple of world_size x batch_size x "
                             f"seq_len = {per}")
        return tc.batch_tokens // per
    return tc.grad_accum or 1


def train(tc: TrainConfig) -> dict:
    """Run a training job described by `tc`; returns the final summary (also in report.md)."""
    from nanoseek.parallel import init_distributed
    dist = init_distributed(None if tc.device == "auto" else tc.device)
    device = dist.device
    # every rank resolves alike (same device kind); only the main one says why
    dtype = resolve_dtype(tc.dtype, device, "nanoseek train", out=sys.stderr if dist.is_main else io.StringIO())
    tc = dataclasses.replace(tc, dtype=str(dtype).split(".")[-1])
    run = Path(tc.out)
    main = dist.is_main
    def say(msg: str) -> None:
        if main:
            print(f"nanoseek train: {msg}", file=sys.stderr)

    if main:
        run.mkdir(parents=True, exist_ok=True)
        stale = clean_stale_saves(run)
        if stale:
            say(f"removed what an interrupted save left in {run / 'checkpoints'}: {', '.join(stale)}")
    _barrier(dist)
    found = resume_checkpoint(run, say) if tc.resume else None
    if tc.resume and found is None:
        say(f"no checkpoint in {run / 'checkpoints'}; starting from scratch")
    resume_from, saved = found or (None, None)
    if saved is not None:
        prev = saved[2].get("train_config") or {}
        default = TrainConfig(out="")
        for k in ("dsa_stage", "seq_len", "preset", "layers", "index_topk", "replay_ratio",
                  "new_rows_steps", "embed_lr_scale"):  # batch: the loader checks; the last: optimizer groups
            if prev.get(k, getattr(default, k)) != getattr(tc, k):
                raise ValueError(f"--resume: {k} was {prev.get(k)!r} in {resume_from}, now {getattr(tc, k)!r}")
        if tc.lora_rank or prev.get("lora_rank"):  # the adapter resumes on the same base
            for k in ("init", "lora_rank", "lora_alpha", "lora_targets", "lora_rslora"):
                if prev.get(k) != getattr(tc, k):
                    raise ValueError(f"--resume: {k} was {prev.get(k)!r} in {resume_from}, now {getattr(tc, k)!r}")
    elif tc.dsa_stage != "none" and tc.init is None:
        raise ValueError("--dsa-stage warmup|sparse needs --init DIR (no checkpoint to resume from)")
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    if main:
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2) + "\n")

    # -- tokenizer and data --------------------------------------------------------------------------------
    from nanoseek import data as D
    tok = _tokenizer(tc, run, dist)
    world, rank = dist.world_size, dist.rank
    task_summary: dict = {}
    prompts: list = list(SAMPLE_PROMPTS[:tc.samples])  # the report's samples: text, or token ids (sft)
    replay_loader, base_heldout = None, None

    def heldout(token_file):
        return lambda: D.heldout_batches(token_file, tc.seq_len, tc.batch_size, tc.eval_tokens, rank, world, device)

    if tc.task == "sft":  # packed chat conversations, loss on the assistant's tokens (nanoseek/sft.py)
        from nanoseek import sft
        loader, eval_batches, task_summary, prompts = sft.loaders(tc, tok, rank, world, device, is_main=main)
    else:
        data = D.prepare(tc.data or None, tok, tc.cache_dir, heldout_fraction=tc.heldout_fraction, is_main=main,
                         barrier=lambda: _barrier(dist), strict=tc.strict_data)
        n_replay = replay_rows(tc)
        loader = D.PackedLoader(data.train, tc.seq_len, tc.batch_size - n_replay, rank, world, tc.seed)
        eval_batches = None if data.heldout is None else heldout(data.heldout)
        if tc.replay:
            replay = D.prepare(tc.replay, tok, tc.cache_dir, heldout_fraction=tc.heldout_fraction, is_main=main,
                               barrier=lambda: _barrier(dist), strict=tc.strict_data)
            replay_loader = D.PackedLoader(replay.train, tc.seq_len, n_replay, rank, world, tc.seed + 1)
            base_heldout = replay.heldout
        if tc.base_eval:
            base_heldout = D.prepare(tc.base_eval, tok, tc.cache_dir, heldout_fraction=0.0, is_main=main,
                                     barrier=lambda: _barrier(dist), strict=tc.strict_data).train
    eval_base = None if base_heldout is None else heldout(base_heldout)
    accum = _grad_accum(tc, world)
    step_tokens = world * accum * tc.batch_size * tc.seq_len

    # -- model ---------------------------------------------------------------------------------------------
    new_rows: Optional[range] = None  # ids of the tokens --tokenizer adds to the --init model's
    if tc.init is not None and (saved is None or tc.lora_rank):
        model = from_pretrained(tc.init, dtype=torch.float32, device="cpu")
        new_rows = _extend_vocabulary(model, tok, tc.init, main)
        cfg = model.config
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"--init model has {cfg.vocab_size} vocabulary rows, the tokenizer "
                             f"{tok.vocab_size} (to extend the model, put its own tokenizer in {tc.init})")
        if tc.index_topk is not None:
            for m in dsa_layers(model):
                m.indexer.topk = tc.index_topk
            cfg = model.config = cfg.replace(index_topk=tc.index_topk)
    else:
        if saved is not None:
            from nanoseek.config import ModelConfig
            cfg = ModelConfig.from_hf(saved[2]["model_config"])
            if saved[2].get("new_rows"):
                new_rows = range(*saved[2]["new_rows"])
        else:
            over = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
            if tc.layers is not None:
                over["num_hidden_layers"] = tc.layers
                over["first_k_dense_replace"] = min(get_preset(tc.preset).first_k_dense_replace, tc.layers)
            if tc.index_topk is not None:
                over["index_topk"] = tc.index_topk
            cfg = get_preset(tc.preset, **over)
        model = Transformer(cfg)
    if tc.new_rows_steps and new_rows is None:
        raise ValueError("--new-rows-steps: the tokenizer adds no tokens to the --init model's")
    if tc.new_rows_steps and dist.world_size > 1:
        raise ValueError("--new-rows-steps runs in one process (its gradient mask is not sharded); "
                         "under torchrun pass --new-rows-steps 0")
    if tc.dsa_stage != "none" and not cfg.use_dsa:
        raise ValueError(f"--dsa-stage {tc.dsa_stage}: the model has no DSA indexer (model_type "
                         f"{cfg.model_type}, index_topk {cfg.index_topk})")
    if saved is not None and not tc.lora_rank:
        _load_full_state_plain(model, saved[0])
    model.train()
    for m in moe_layers(model):
        m.seq_aux_alpha = tc.seq_aux_alpha
    set_dsa_stage(model, tc.dsa_stage)
    freeze_for_stage(model, tc.dsa_stage)
    if tc.mtp_weight == 0:  # the MTP modules do not run: keep them (and the optimizer) out of it
        for p in model.mtp.parameters():
            p.requires_grad_(False)
    model.to(device)
    kernels.install(model)  # the fast paths (C expert GEMMs on CPU; weight caches and decode kernels at evaluation)
    if tc.lora_rank:
        if world > 1:
            raise ValueError("--lora-rank trains in one process")
        model.to(DTYPES[tc.dtype])  # the frozen base in the run's dtype; the adapters are made (fp32) after
        # the new tokens' embedding and head rows train with the adapter and are saved in it (PEFT's trainable
        # tokens), since the base model has no such rows
        lcfg = dataclasses.replace(_lora_config(tc), token_rows=tuple(new_rows or ()))
        lora.apply_lora(model, **dataclasses.asdict(lcfg))  # (takes the fast paths off: lora.py)
        if saved is not None:
            lora.load_adapter_state(model, saved[0])
    if world > 1:
        from nanoseek.parallel import parallelize
        model = parallelize(model, dist, expert_parallel=tc.expert_parallel) or model
    mtp_depth = len(model.mtp) if tc.mtp_weight > 0 else 0
    idle = set(moe_layers(model.mtp)) if mtp_depth == 0 else set()
    moes = [m for m in moe_layers(model) if m not in idle]  # the MoE layers that run (and get balanced)

    # -- optimizer, schedule -------------------------------------------------------------------------------
    dtype = DTYPES[tc.dtype]
    muon = tc.optimizer == "muon"
    if master_weights(tc, device, world):
        opt = MasterWeightAdamW(model, tc.lr, tc.weight_decay, muon=muon, muon_experts=tc.muon_experts,
                                embed_lr_scale=tc.embed_lr_scale)
    elif muon:
        opt = MuonAdamW(model, tc.lr, tc.weight_decay, experts=tc.muon_experts, embed_lr_scale=tc.embed_lr_scale)
    else:
        opt = build_adamw(model, tc.lr, tc.weight_decay, embed_lr_scale=tc.embed_lr_scale)
    names = {id(p): n for n, p in model.named_parameters()}
    only_new = NewRowsOnly(model, new_rows) if tc.new_rows_steps else None
    group_decay = [g["weight_decay"] for g in opt.param_groups]
    warmup = tc.warmup if tc.warmup is not None else min(100, tc.max_steps // 10)
    sched = Schedule(tc.lr, tc.min_lr if tc.min_lr is not None else tc.lr / 10, warmup, tc.max_steps, tc.schedule,
                     stage=tc.new_rows_steps, stage_lr=tc.new_rows_lr)
    start = 0
    if saved is not None:
        _, tstate, js = saved
        _load_optim(model, opt, names, {k: v for k, v in tstate.items() if not k.startswith("rng/")},
                    js["optimizer"], dist)
        loader.load_state_dict(js["loader"])  # global position: valid for any number of ranks
        if replay_loader is not None:
            replay_loader.load_state_dict(js["replay_loader"])
        set_rng_state(tstate, js["rng"])
        start = js["step"]
    if device.type == "cpu":
        keep_freed_memory()
    losses = loss_function(model, tc, mtp_depth, world)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    # -- what the user sees --------------------------------------------------------------------------------
    peak, peak_src = M.peak_flops(device, dtype)
    # matmul FLOPs a token (6N: forward + backward; attention left out); the DSA warm-up runs the frozen model's
    # forward (2N) without its head passes (`micro_step_losses`)
    n_params = M.flops_params(cfg, with_mtp=mtp_depth > 0)
    n_flops = 6 * n_params
    if tc.dsa_stage == "warmup":
        n_flops = 2 * (n_params - (1 + mtp_depth) * cfg.vocab_size * cfg.hidden_size)
    log = M.MetricsLog(run / "metrics.jsonl", resume_step=start if saved is not None else None, enabled=main)
    stop = tc.stop_after or tc.max_steps
    n = cfg.num_params()
    if main:
        name = f"from {tc.init}" if tc.init and saved is None else tc.preset
        peak_s = f"{peak / 1e12:.2f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.1f} GFLOP/s"
        print(f"nanoseek train: {name} ({n['total'] / 1e6:.1f}M params, {n['active'] / 1e6:.1f}M active), "
              f"stage {tc.dsa_stage}, {world} process(es) on {device}, {tc.dtype}, global batch {step_tokens} "
              f"tokens ({world}x{accum}x{tc.batch_size}x{tc.seq_len}), steps {start + 1}..{stop} of "
              f"{tc.max_steps}; peak {peak_s} ({peak_src})", file=sys.stderr)
    bar = M.Progress(tc.max_steps, start, enabled=main and tc.progress, every=tc.log_every,
                     desc=f"train[{tc.dsa_stage}]" if tc.dsa_stage != "none" else "train")

    def checkpoint(step: int) -> None:
        if tc.lora_rank:
            sd = lora.adapter_state_dict(model)
        elif isinstance(opt, MasterWeightAdamW):
            sd = opt.full_precision_state(model)
        else:
            sd = _full_state(model, dist)
        ot, ometa = optimizer_state_tensors(opt, names) if world == 1 else _full_optim(model, opt, dist)
        if not main:
            return
        rt, rj = rng_state()
        state = {"step": step, "tokens": step * step_tokens, "optimizer": ometa, "loader": loader.state_dict(),
                 "rng": rj, "lr": sched(step - 1), "model_config": cfg.to_hf(),
                 "replay_loader": replay_loader.state_dict() if replay_loader is not None else None,
                 "new_rows": [new_rows.start, new_rows.stop] if new_rows is not None else None,
                 "train_config": dataclasses.asdict(tc),
                 "expert_bias_norms": [float(m.gate.e_score_correction_bias.norm())
                                       for m in moes if m.gate.e_score_correction_bias is not None]}
        save_checkpoint(run, step, sd, {**ot, **rt}, state)

    # -- the loop ------------------------------------------------------------------------------------------
    t_start = time.perf_counter()
    last_saved = start if saved is not None else -1
    step = start
    rec: dict = {}
    try:
        for step in range(start + 1, stop + 1):
            t0 = time.perf_counter()
            lr = sched(step - 1)
            set_lr(opt, lr)
            new_rows_stage = step <= tc.new_rows_steps
            if only_new is not None:
                if new_rows_stage:
                    only_new.on()
                else:
                    only_new.off()
                # zero gradients leave the other rows as they are, but decoupled weight decay would not
                for g, wd in zip(opt.param_groups, group_decay):
                    g["weight_decay"] = 0.0 if new_rows_stage else wd
            sums: dict[str, torch.Tensor] = {}  # loss parts summed over micro-batches, kept on the device
            loads = torch.zeros(len(moes), cfg.n_routed_experts, dtype=torch.float64, device=device)
            micro = []
            for _ in range(accum):
                x, y, *seg = loader.next()  # seg: packed documents (sft)
                if replay_loader is not None:
                    xr, yr = replay_loader.next()
                    x, y = torch.cat((x, xr)), torch.cat((y, yr))
                micro.append([t.to(device, non_blocking=True) for t in (x, y, *seg)])
            per_target = None
            if tc.task == "sft":  # masked targets: normalise by the global batch's count (micro_step_losses)
                counts = sum(target_counts(y, seg[0] if seg else None, mtp_depth) for _, y, *seg in micro)
                per_target = (_all_reduce_sum(counts.to(device), dist).clamp_min(1) / (accum * world)).float()
            for x, y, *seg in micro:
                with autocast():
                    parts = losses(x, y, *seg, per_target=per_target)
                (parts["loss"] / accum).backward()
                if moes:
                    loads += parts.pop("expert_load")
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
            gnorm = clip_gradients(model, opt, tc.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            keys = sorted(sums)
            red = _all_reduce_sum(torch.stack([sums[k] for k in keys]), dist).cpu()  # global means below
            means = {k: float(v) / (accum * world) for k, v in zip(keys, red)}
            if moes:
                loads = _all_reduce_sum(loads, dist)  # expert loads over the whole global batch
                # (new-rows stage: the routers are frozen; LoRA: the balancing biases belong to the frozen base,
                # which an adapter cannot carry)
                if tc.dsa_stage != "warmup" and not new_rows_stage and not tc.lora_rank:
                    update_expert_bias(moes, loads, tc.bias_update_speed)
                loads = loads.cpu()
            dt = time.perf_counter() - t0
            tps = step_tokens / dt
            rec = {"step": step, **means, "lr": lr, "grad_norm": gnorm, "tokens": step * step_tokens,
                   "tokens_per_s": tps, "mfu": n_flops * tps / (peak * world), "memory_mb": M.memory_mb(device),
                   "step_time_s": dt}
            if moes:
                rec["maxvio"] = [M.max_vio(l) for l in loads]
                rec["bias_norm"] = [float(m.gate.e_score_correction_bias.norm())
                                    if m.gate.e_score_correction_bias is not None else 0.0 for m in moes]
            if tc.eval_tokens and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps):
                if eval_batches is not None:
                    rec.update(evaluate(model, eval_batches(), autocast, dist, tc.dsa_stage))
                if eval_base is not None:
                    base = evaluate(model, eval_base(), autocast, dist, tc.dsa_stage)
                    rec.update({k.replace("eval_", "eval_base_"): v for k, v in base.items()})
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(f"loss is {means['loss']} at step {step}; lower --lr or check the data")
            log.log(rec)
            info = f"loss {means['loss']:.4f}" + (f" (LM {means['lm_loss']:.4f})" if "lm_loss" in means else "")
            info += f" | {tps:,.0f} tok/s | lr {lr:.2e}"
            if "indexer_kl" in means:
                info += f" | KL {means['indexer_kl']:.4f}"
            bar.update(step, info)
            if "eval_bpb" in rec:
                base = f"; base domain {rec['eval_base_bpb']:.4f} bits/byte" if "eval_base_bpb" in rec else ""
                bar.print(f"step {step}: held-out loss {rec['eval_loss']:.4f}, {rec['eval_bpb']:.4f} bits/byte{base}")
            if tc.save_every and step % tc.save_every == 0:
                checkpoint(step)
                last_saved = step
    finally:
        bar.close()
        if isinstance(opt, MasterWeightAdamW):
            opt.release()  # the model's weights are the fp32 masters again, even if the loop raised
    if last_saved != step:
        checkpoint(step)
    elapsed = time.perf_counter() - t_start
    summary = {"run": str(run), "preset": tc.preset if tc.init is None else None, "init": tc.init,
               "stage": tc.dsa_stage, "steps": step, "tokens": step * step_tokens, "params_total": n["total"],
               "params_active": n["active"], "processes": world, "device": str(device), "dtype": tc.dtype,
               "wall_time_s": elapsed, **task_summary}
    if step == tc.max_steps:
        _finish(model, tok, tc, run, dist, log, summary, rec, peak_src, prompts)
    elif main:
        print(f"nanoseek train: stopped after step {step} of {tc.max_steps} (checkpoint saved); continue with "
              f"the same command and --resume", file=sys.stderr)
    _barrier(dist)
    return summary


def _load_full_state_plain(model: Transformer, sd: dict) -> None:
    """Checkpoints hold the full (unsharded) state; load it before any parallel wrapping."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def master_weights(tc: TrainConfig, device: torch.device, world: int) -> bool:
    """Whether bf16 training keeps bf16 working weights with fp32 masters in the optimizer (`MasterWeightAdamW`)
    instead of autocasting fp32 weights: on CPU in one process, where the casts cost a fifth of a step (on CUDA
    they are cheap next to the GEMMs; FSDP2 has its own mixed-precision policy). Not with LoRA: its base is
    already in bf16 and frozen, its few adapters stay fp32 under autocast."""
    return DTYPES[tc.dtype] == torch.bfloat16 and device.type == "cpu" and world == 1 and not tc.lora_rank


def clip_gradients(model, opt, max_norm: float) -> float:
    """Clip all gradients to a global L2 norm of max_norm (0: no clipping); returns the norm before clipping."""
    if isinstance(opt, MasterWeightAdamW):
        return opt.clip_grad_norm_(max_norm)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _full_optim(model, opt, dist) -> tuple[dict, dict]:
    """Sharded optimizer state gathered (torch.distributed.checkpoint, keyed by parameter name) into our
    layout-independent (tensors, meta) form, so a checkpoint resumes on any number of processes. Collective."""
    from nanoseek.parallel import full_optimizer_state_dict
    osd = full_optimizer_state_dict(model, opt, dist)
    tensors = {f"{name}/{k}": v for name, st in osd.get("state", {}).items() for k, v in st.items()
               if torch.is_tensor(v)}
    groups = [{k: v for k, v in g.items() if isinstance(v, (int, float, bool, str, tuple, list))}
              for g in osd.get("param_groups", [])]
    return tensors, {"param_groups": groups}


def _load_optim(model, opt, names, tensors: dict, meta: dict, dist) -> None:
    if dist.world_size == 1:
        load_optimizer_state(opt, names, tensors, meta)
        return
    from nanoseek.parallel import load_full_optimizer_state_dict
    state: dict = {}
    for key, t in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = t
    load_full_optimizer_state_dict(model, opt, {"state": state, "param_groups": meta["param_groups"]}, dist)


def _tokenizer(tc: TrainConfig, run: Path, dist):
    """--tokenizer, else the --init model's, else the run's own (trained on the training data once)."""
    from nanoseek import tokenizer as TK
    if tc.tokenizer:
        return TK.load_tokenizer(tc.tokenizer)
    if tc.init and (Path(tc.init) / "tokenizer.json").exists():
        return TK.load_tokenizer(tc.init)
    tdir = run / "tokenizer"
    if not (tdir / "tokenizer.json").exists():
        if dist.is_main:
            from nanoseek import data as D
            files = D.collect_files(tc.data) if tc.data else D.default_corpus()
            # the same split the loader makes (by file, else inside the text): the held-out text stays unseen
            train_docs, _ = D.split_corpus(files, tc.heldout_fraction)
            vocab = tc.vocab_size or get_preset(tc.preset).vocab_size
            print(f"nanoseek train: training a {vocab}-token BPE tokenizer on the training split of "
                  f"{len(files)} files", file=sys.stderr)
            TK.train_from_documents(train_docs, vocab, max_chars=tc.tokenizer_max_chars).save(tdir)
        _barrier(dist)
    return TK.load_tokenizer(tdir)


def _extend_vocabulary(model: Transformer, tok, init: str, main: bool) -> Optional[range]:
    """When `tok` extends the tokenizer saved with the --init model, resize the model to it (`vocab.py`);
    returns the new tokens' ids, or None when it adds none."""
    from nanoseek import tokenizer as TK
    if not (Path(init) / "tokenizer.json").exists():
        return None
    base = TK.load_tokenizer(init)
    if tok.vocab_size <= base.vocab_size:
        return None
    rows_before = model.config.vocab_size
    new = extend_model(model, base, tok)
    if main:
        print(f"nanoseek train: extended the vocabulary: {len(new)} new tokens (ids {new.start}..{new.stop - 1}), "
              f"embedding and head {rows_before} -> {model.config.vocab_size} rows, new rows initialised as the "
              f"mean of their base pieces' rows", file=sys.stderr)
    return new


def _finish(model, tok, tc: TrainConfig, run: Path, dist, log, summary: dict, rec: dict, peak_src: str,
            prompts: list) -> None:
    """Final HF-layout model + tokenizer, plots, samples and report.md (main process)."""
    sd = _full_state(model, dist)
    if not dist.is_main:
        return
    final = run / "final"
    if tc.lora_rank:  # the adapter in PEFT's format, for the --init model
        lora.save_adapter(model, final, str(Path(tc.init).resolve()))
    else:
        if dist.world_size > 1:  # save the gathered full weights through an unsharded copy
            plain = Transformer(model.config)
            _load_full_state_plain(plain, sd)
            model = plain
        save_pretrained(model, final)
    tok.save(final)
    records = log.records
    plots = M.plot_run(run, records)
    samples = []
    if tc.samples:
        m = from_pretrained(tc.init if tc.lora_rank else final, dtype=torch.float32)
        if tc.lora_rank:  # cached decoding reads kv_b_proj's weight directly: sample from the merged model
            m = lora.merge_lora(lora.load_adapter(m, final))
        texts = sample(m, tok, prompts, tc.sample_tokens, seed=tc.seed)
        samples = [(p if isinstance(p, str) else tok.decode(p), t) for p, t in zip(prompts, texts)]
    last = records[-1] if records else rec
    summary.update({"final_loss": last.get("loss"), "final_lm_loss": last.get("lm_loss"), "tokens_per_s": _median([r.get("tokens_per_s")
                                                                            for r in records[-20:]]),
                    "mfu": _median([r.get("mfu") for r in records[-20:]]), "mfu_peak": peak_src,
                    "peak_memory_mb": last.get("memory_mb")})
    ev = [r for r in records if r.get("eval_bpb") is not None]
    if ev:
        summary.update({"heldout_loss": ev[-1]["eval_loss"], "heldout_bits_per_byte": ev[-1]["eval_bpb"]})
        if ev[-1].get("eval_base_bpb") is not None:
            summary["base_domain_bits_per_byte"] = ev[-1]["eval_base_bpb"]
    summary["final_model"] = str(final)
    report = M.write_report(run, summary, records, plots, samples)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"nanoseek train: done in {summary['wall_time_s']:.0f}s; {'adapter' if tc.lora_rank else 'model'} in "
          f"{final}, report {report}", file=sys.stderr)
    if tc.lora_rank:
        print(f"nanoseek train: merge it with `nanoseek lora merge --base {tc.init} --adapter {final} --out DIR`, or "
              f"serve it with `nanoseek serve {tc.init} --lora NAME={final}`", file=sys.stderr)


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None
