"""`nanoseek sft`: supervised fine-tuning on chat conversations, run by the trainer of `nanoseek.train`.

    nanoseek sft --init MODEL_DIR --data chat.jsonl --max-steps N --out DIR [--thinking train|skip|off]
                 [every option of `nanoseek train`: --seq-len, --batch-size, --lr, --save-every, --resume, ...]

Data: JSON lines in TRL's conversational format, {"messages": [...], "tools": [...]} (tools optional), with
system / user / assistant / tool turns; assistant turns may carry `reasoning_content` and `tool_calls`. Each
conversation is rendered in the model's DeepSeek chat format (`chat.py`: V3.2 for deepseek_v32 models, else V3)
and the loss covers the assistant's tokens only (`chat_loss_mask`). --thinking: `train` renders a conversation in
thinking mode when its last turn carries reasoning and trains on that reasoning; `skip` renders it alike but
trains only from the </think> on; `off` renders every conversation in non-thinking mode (reasoning dropped).

Rows that cannot be used (not JSON, no messages, no assistant turn, invalid turns, longer than --seq-len) are
skipped, each reported with its file and line number; --strict-data refuses the data instead.

Packing: whole conversations go into rows of --seq-len tokens, next-fit in a seeded order that changes every
epoch, the rest of a row padded. The row carries segment ids, so the model attends only inside each
conversation and restarts its RoPE positions with each (`Transformer.forward(segment_ids=)`). Targets are the
next token where that token is the assistant's and -100 (ignored) elsewhere: prompts, tool results, padding, and
the last token of each conversation, whose successor belongs to the next one.

A stable share of the conversations (--heldout-fraction) is held out; the trainer reports its assistant-token
loss and bits per byte as `eval_loss` / `eval_bpb`. Everything else (optimizer, schedule, metrics, plots,
report, atomic checkpoints, exact resume, torchrun, compile) is the trainer's: this file supplies its data when
`TrainConfig.task` is "sft".

Legend: B rows per micro-batch, T tokens per row (--seq-len), L tokens of one conversation.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from nanoseek import chat

THINKING = ("train", "skip", "off")
IGNORE = -100  # the target the losses skip (`cross_entropy`'s ignore_index)
# fine-tuning defaults in place of pre-training's; a flag given on the command line wins (argparse keeps the last)
DEFAULTS = ["--lr", "1e-4", "--heldout-fraction", "0.05"]
MAX_REPORTED = 10  # bad rows listed one by one; the rest are counted


@dataclass
class Conversation:
    ids: np.ndarray  # [L] token ids of the rendered conversation
    labels: np.ndarray  # [L] next token where it is trained, else IGNORE (always at the last position)
    line: int


def chat_style(model_type: str) -> str:
    """The chat format a model reads (as `nanoseek generate` picks it)."""
    return "v3.2" if model_type == "deepseek_v32" else "v3"


def encode_row(raw: bytes, tok, style: str, thinking: str) -> tuple[list[int], list[int]]:
    """One JSONL line -> (token ids, 0/1 loss mask); ValueError saying what is wrong with the row."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError("not an object with a 'messages' list")
    msgs = row["messages"]
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        raise ValueError("no assistant turn to train on")
    think = False
    if thinking != "off" and style == "v3.2":
        # thinking mode keeps only the reasoning after the last user turn (chat.py), so that is what decides
        last_user = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"),
                        default=-1)
        think = any(isinstance(m, dict) and (m.get("reasoning_content") or m.get("reasoning"))
                    for m in msgs[last_user + 1:])
    ids, mask = chat.chat_loss_mask(msgs, tok, thinking=think, style=style, tools=row.get("tools"),
                                    train_reasoning=thinking != "skip")
    if not any(mask[1:]):
        raise ValueError("the assistant wrote nothing to train on")
    return ids, mask


def read_conversations(paths: list[Path], tok, style: str, thinking: str,
                       seq_len: int) -> tuple[list[Conversation], list[str], int]:
    """(usable conversations, one message per skipped row, rows read). Blank lines are not rows."""
    convs, problems, n_rows = [], [], 0
    for path in paths:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                n_rows += 1
                try:
                    ids, mask = encode_row(raw, tok, style, thinking)
                except ValueError as e:
                    problems.append(f"{path} line {n}: {e}")
                    continue
                if len(ids) > seq_len:
                    problems.append(f"{path} line {n}: {len(ids)} tokens, longer than --seq-len {seq_len}")
                    continue
                ids_a = np.asarray(ids, dtype=np.int64)
                labels = np.full(len(ids), IGNORE, dtype=np.int64)
                trained = np.asarray(mask[1:], dtype=bool)
                labels[:-1][trained] = ids_a[1:][trained]
                convs.append(Conversation(ids_a, labels, n))
    return convs, problems, n_rows


def data_files(paths: list[str]) -> list[Path]:
    """--data: .jsonl files, or folders searched for them."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
    if not out:
        raise ValueError(f"--data {' '.join(paths)}: no .jsonl file")
    return out


def split(convs: list[Conversation], fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out): the ceil(fraction * n) conversations of smallest content hash, so the split does not
    depend on the file order or the seed; none held out when fraction is 0 or there is only one."""
    n_held = math.ceil(fraction * len(convs)) if fraction > 0 and len(convs) > 1 else 0
    score = [hashlib.sha1(c.ids.tobytes()).digest() for c in convs]
    held = set(sorted(range(len(convs)), key=lambda i: score[i])[:n_held])
    return ([c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held])


def pack(lengths: list[int], order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Next-fit: conversations (indices, in `order`) appended to the current row until one does not fit."""
    rows, cur, used = [], [], 0
    for i in order:
        if cur and used + lengths[i] > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += lengths[i]
    if cur:
        rows.append(cur)
    return rows


def build_rows(convs: list[Conversation], rows: list[list[int]], seq_len: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, segment ids [B, T] (int64) of packed rows; the padding is one more segment, never a target."""
    B = len(rows)
    x = np.full((B, seq_len), pad_id, dtype=np.int64)
    y = np.full((B, seq_len), IGNORE, dtype=np.int64)
    seg = np.empty((B, seq_len), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            c = convs[i]
            L = len(c.ids)
            x[b, t:t + L], y[b, t:t + L], seg[b, t:t + L] = c.ids, c.labels, s
            t += L
        seg[b, t:] = len(row)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg)


class ChatLoader:
    """Seeded, resumable, rank-sharded batches of packed conversations: next() -> (x, y, segment ids) [B, T].

    Epoch e packs the conversations in the order permutation(seed, e); global step g covers its rows
    [g*B*W, (g+1)*B*W) and rank k reads the k-th B of them (as `data.PackedLoader`), the remainder smaller than
    a global batch skipped. The state is (epoch, step) plus a digest of the conversations, so a resume with
    other data, --thinking or --seq-len is refused rather than silently reading something else."""

    def __init__(self, convs: list[Conversation], seq_len: int, batch_size: int, rank: int, world_size: int,
                 seed: int, pad_id: int):
        self.convs, self.seq_len, self.batch_size, self.seed = convs, seq_len, batch_size, seed
        self.rank, self.pad_id = rank, pad_id
        self.global_batch = batch_size * world_size
        self.lengths = [len(c.ids) for c in convs]
        h = hashlib.sha1()
        for c in convs:
            h.update(c.ids.tobytes())
            h.update(c.labels.tobytes())
        self.digest = h.hexdigest()
        self.epoch, self.step = 0, 0
        self._rows_epoch, self._rows = -1, []
        if len(self._epoch_rows()) < self.global_batch:
            raise ValueError(f"{len(convs)} training conversations pack into {len(self._rows)} rows of {seq_len} "
                             f"tokens, fewer than one global batch of {self.global_batch}; use more data or a "
                             f"smaller --batch-size")

    def _epoch_rows(self) -> list[list[int]]:
        if self._rows_epoch != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.convs))
            self._rows, self._rows_epoch = pack(self.lengths, order, self.seq_len), self.epoch
        return self._rows

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.step == len(self._epoch_rows()) // self.global_batch:
            self.epoch, self.step = self.epoch + 1, 0
        start = self.step * self.global_batch + self.rank * self.batch_size
        rows = self._epoch_rows()[start:start + self.batch_size]
        self.step += 1
        return build_rows(self.convs, rows, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "data": self.digest}

    def load_state_dict(self, state: dict) -> None:
        for k, have in (("seed", self.seed), ("seq_len", self.seq_len), ("global_batch", self.global_batch),
                        ("data", self.digest)):
            if state.get(k) != have:
                raise ValueError(f"loader state has {k}={state.get(k)!r} but this run has {have!r}; resume with "
                                 f"the same data, --thinking, --seq-len, --seed and global batch")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def heldout_batches(convs: list[Conversation], seq_len: int, batch_size: int, max_tokens: int, rank: int,
                    world_size: int, device, byte_lengths: np.ndarray
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]:
    """Held-out rows (packed in file order) as (x, y, bytes of the trained targets, segment ids): the first
    ceil(max_tokens / T) rows, split over ranks round-robin (as `data.heldout_batches`)."""
    rows = pack([len(c.ids) for c in convs], np.arange(len(convs)), seq_len)
    rows = rows[rank:max(1, math.ceil(max_tokens / seq_len)):world_size]
    for i in range(0, len(rows), batch_size):
        x, y, seg = build_rows(convs, rows[i:i + batch_size], seq_len, 0)
        n_bytes = int(byte_lengths[y[y != IGNORE].numpy()].sum())
        yield x.to(device), y.to(device), n_bytes, seg.to(device)


def loaders(tc, tok, rank: int, world_size: int, device, is_main: bool):
    """The trainer's data for an SFT run: (ChatLoader, held-out batches factory or None, summary entries, the
    report's sample prompts as token ids)."""
    if tc.init is None:
        raise ValueError("nanoseek sft starts from a model: give --init MODEL_DIR")
    model_type = json.loads((Path(tc.init) / "config.json").read_text()).get("model_type", "")
    style = chat_style(model_type)
    convs, problems, n_rows = read_conversations(data_files(tc.data), tok, style, tc.thinking, tc.seq_len)
    if problems and tc.strict_data:
        raise ValueError(f"{len(problems)} of {n_rows} rows cannot be used (--strict-data):\n  "
                         + "\n  ".join(problems[:MAX_REPORTED])
                         + (f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""))
    if is_main:
        for p in problems[:MAX_REPORTED]:
            print(f"nanoseek sft: skipped {p}", file=sys.stderr)
        if len(problems) > MAX_REPORTED:
            print(f"nanoseek sft: ... and {len(problems) - MAX_REPORTED} more", file=sys.stderr)
    if not convs:
        raise ValueError(f"no usable conversation in {n_rows} rows of {', '.join(tc.data)}")
    train, held = split(convs, tc.heldout_fraction)
    if is_main:
        print(f"nanoseek sft: {len(convs)} of {n_rows} conversations ({len(problems)} skipped), {len(held)} held "
              f"out; chat format {style}, thinking {tc.thinking}", file=sys.stderr)
    loader = ChatLoader(train, tc.seq_len, tc.batch_size, rank, world_size, tc.seed, tok.pad_id)
    byte_lengths = tok.token_byte_lengths()

    def eval_batches():
        return heldout_batches(held, tc.seq_len, tc.batch_size, tc.eval_tokens, rank, world_size, device,
                               byte_lengths)
    summary = {"task": "sft", "thinking": tc.thinking, "chat_format": style, "rows_read": n_rows,
               "rows_skipped": len(problems), "conversations_train": len(train), "conversations_heldout": len(held)}
    return loader, (eval_batches if held else None), summary, sample_prompts(held or train, tc.samples)


def sample_prompts(convs: list[Conversation], n: int) -> list[list[int]]:
    """The report's sample prompts: the first n conversations up to the cue of their first trained reply (so the
    sample is the model's answer to a question of the user's own data, in its language and format)."""
    out = []
    for c in convs[:n]:
        trained = np.flatnonzero(c.labels != IGNORE)
        if len(trained):
            out.append(c.ids[:trained[0] + 1].tolist())  # position i's label is token i + 1
    return out


def validate(tc) -> None:
    if tc.init is None:
        raise ValueError("nanoseek sft starts from a model: give --init MODEL_DIR")
    if not (Path(tc.init) / "config.json").exists():
        raise ValueError(f"--init {tc.init}: no config.json")
    if tc.tokenizer is None and not (Path(tc.init) / "tokenizer.json").exists():
        raise ValueError(f"--init {tc.init} has no tokenizer.json; give --tokenizer DIR")
    if not tc.data:
        raise ValueError("give --data with the conversations (.jsonl files or folders)")
    if tc.thinking not in THINKING:
        raise ValueError(f"--thinking must be one of {THINKING}")


def cli(cmd: str, argv: list[str]) -> int:
    from nanoseek import train as T
    ap = argparse.ArgumentParser(prog="nanoseek sft", description=__doc__.split("\n\n")[0], add_help=False,
                                 epilog="Every other option is nanoseek train's (see nanoseek train --help); "
                                 f"defaults changed here: {' '.join(DEFAULTS)}.")
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--thinking", default="train", choices=THINKING,
                    help="train: thinking mode where the last turn has reasoning, trained on; skip: the same "
                    "rendering, loss from </think> on; off: non-thinking mode, reasoning dropped")
    a, rest = ap.parse_known_args(argv)
    if a.help:
        ap.print_help()
        return 0
    try:
        tc = dataclasses.replace(T.parse_args(DEFAULTS + rest), task="sft", thinking=a.thinking)
        validate(tc)
    except ValueError as e:
        print(f"nanoseek sft: error: {e}", file=sys.stderr)
        return 2
    return T.run(tc, "nanoseek sft")
