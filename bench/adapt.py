"""Language adaptation, measured (issue 13): a base model extended and adapted to Welsh, Yoruba and Wolof, against
the base as it is, the same architecture trained from scratch, and a LoRA adapter, at an equal training budget.

    python bench/adapt.py --base runs/speedrun/dsa_sparse/final --budget 180            # the three languages
    python bench/adapt.py --base /tmp/base --base-data DIR --languages welsh --quick     # a smoke check

Everything runs through the CLI as subprocesses (`python -m nanoseek ...`), so the bench measures what users run.
Per language (a folder of ../shared/data with one sentence or document a line):
- data: the last --heldout-fraction (10%) of each text file's lines is held out, never trained on; the held-out
  parts of a language's files go into one file, evaluated with one `nanoseek eval` (exact bits per byte over all of
  it). The base domain is the base model's own training text (--base-data, default this Python's standard library
  source, as `nanoseek train` reads it): `data.split_corpus` at the trainer's default held-out fraction gives the
  text the base never trained on (by file, else the tail of the text, exactly as `nanoseek train` split it), capped
  at --base-eval-bytes; the rest, sampled to --replay-bytes, is (b)'s replay data.
- (a) the base model, no training: held-out bits per byte of the language and of the base domain;
- (b) `nanoseek tokenizer extend BASE --add N` on the language's training part, then `nanoseek adapt` (new rows
  initialised from their pieces, everything training from the first step, --replay-ratio of each batch from the
  base domain);
- (c) `nanoseek train --preset P` from scratch with (b)'s extended tokenizer (so (b) and (c) differ only in their
  start: the base's weights or random ones), P and any --layers / --index-topk found from the base's config;
- (d) `nanoseek adapt --lora-rank R` with (b)'s extended tokenizer and replay: a LoRA adapter on the frozen base
  plus the new tokens' rows (PEFT's trainable tokens), then `nanoseek lora merge`, evaluated merged.
All evaluation is `nanoseek eval MODEL --data FILE --json` (keys file, bits_per_byte, tokens_per_word,
tokens_per_byte), at the training --seq-len, so every arm predicts with the context length it trained at.

Equal budget: each training arm gets --budget seconds of optimizer steps. Its step time is calibrated by a short
run of the same command (--calibration-steps steps): the median step time over all steps but the first (which
pays torch.compile and the first allocations), read from that run's metrics.jsonl; the arm then runs
floor(budget / step time) steps, which sets its learning-rate schedule. Start-up, tokenisation, compilation,
saving and evaluation are outside the budget. The tables give each arm's steps and "train s", the sum of its step
times but the first, measured in the real run.

Targets checked (PASS/FAIL as measured, per language): (b) has lower held-out bits per byte than (a) and than (c);
the extended tokenizer cuts held-out tokens per word by at least a third; with replay, (b)'s base-domain bits per
byte are at most 10% above the base's. (d)'s base-domain figure is reported beside (b)'s, without a target.
Results go to --out (JSON); run folders (final models kept, checkpoints removed) and command logs to --work.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: the bench and its subprocesses use this tree's nanoseek

from nanoseek import data as D  # noqa: E402
from nanoseek.config import PRESETS, ModelConfig, get_preset  # noqa: E402
from nanoseek.train import TrainConfig  # noqa: E402

ARMS = {  # key: label in the tables
    "base": "(a) base, no training",
    "extended": "(b) extended tokenizer + adapt",
    "scratch": "(c) from scratch",
    "lora": "(d) LoRA, merged",
}
TOKENS_PER_WORD_CUT = 1 / 3  # the extended tokenizer must cut tokens per word by at least this share
FORGETTING_LIMIT = 0.10  # (b)'s base-domain bits per byte may rise by at most this share
# scratch: these fields may differ from a preset (the tokenizer sets the first three; `nanoseek train` takes
# --layers and --index-topk, and derives first_k_dense_replace from --layers)
SCRATCH_FREE_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "num_hidden_layers", "first_k_dense_replace",
                       "index_topk")


# ---- data ------------------------------------------------------------------------------------------------
def split_lines(text: str, fraction: float) -> tuple[list[str], list[str]]:
    """(train lines, held-out lines) of a text of one sentence or document per line: the last `fraction` of its
    non-empty lines (at least one) are held out, at least one line trains."""
    lines = [l for l in text.splitlines() if l.strip()]
    if len(lines) < 2:
        raise ValueError(f"need at least 2 non-empty lines to hold some out, got {len(lines)}")
    n_held = min(len(lines) - 1, max(1, math.ceil(fraction * len(lines))))
    return lines[:-n_held], lines[-n_held:]


def cap_documents(docs: Iterable[str], max_bytes: int) -> list[str]:
    """The first documents up to max_bytes of UTF-8 in all; the one that crosses the cap is cut at its last line
    end before it (kept whole when it has none there), so there is always at least one."""
    out, total = [], 0
    for d in docs:
        size = len(d.encode("utf-8"))
        if total + size <= max_bytes:
            out.append(d)
            total += size
            continue
        room = d.encode("utf-8")[:max_bytes - total].decode("utf-8", errors="ignore")
        cut = room[:room.rfind("\n") + 1]
        if cut.strip() or not out:
            out.append(cut if cut.strip() else d)
        break
    return out


def spread_sample(docs: Sequence[str], max_bytes: int) -> list[str]:
    """Every k-th document, k chosen so the sample is about max_bytes: replay text from all over the corpus
    rather than its first modules."""
    total = sum(len(d.encode("utf-8")) for d in docs)
    k = max(1, math.ceil(total / max_bytes))
    return list(docs[::k])


def write_jsonl(path: Path, docs: Iterable[str]) -> int:
    """One {"text": doc} a line (documents stay apart, each opened by BOS, as `nanoseek` reads .jsonl); bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            total += len(d.encode("utf-8"))
    return total


@dataclass
class LanguageData:
    train_dir: Path  # the training part of each file, one file each
    heldout: Path  # the held-out parts of all the files, one after the other
    files: list[str]
    train_lines: int
    heldout_lines: int


def prepare_language(src: Path, out: Path, fraction: float) -> LanguageData:
    """Split each .txt file of `src` by lines (`split_lines`) into out/train/ and out/heldout.txt."""
    files = sorted(src.glob("*.txt"))
    if not files:
        raise ValueError(f"no .txt files in {src}")
    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    held_all: list[str] = []
    n_train = 0
    for f in files:
        train, held = split_lines(f.read_text(encoding="utf-8"), fraction)
        (train_dir / f.name).write_text("\n".join(train) + "\n", encoding="utf-8")
        held_all += held
        n_train += len(train)
    heldout = out / "heldout.txt"
    heldout.write_text("\n".join(held_all) + "\n", encoding="utf-8")
    return LanguageData(train_dir, heldout, [str(f) for f in files], n_train, len(held_all))


def prepare_base_domain(paths: Sequence[str], out: Path, heldout_fraction: float, eval_bytes: int,
                        replay_bytes: int) -> tuple[Path, Path, dict]:
    """(replay .jsonl, held-out .jsonl, facts) of the base domain (see the module docstring)."""
    files = D.collect_files(paths) if paths else D.default_corpus()
    train_docs, held_docs = D.split_corpus(files, heldout_fraction)
    held = cap_documents(held_docs, eval_bytes)
    if not held:
        raise ValueError(f"the base data holds out no text at --base-heldout-fraction {heldout_fraction}")
    replay = spread_sample(list(train_docs), replay_bytes)
    replay_path, held_path = out / "replay.jsonl", out / "heldout.jsonl"
    facts = {"files": len(files), "replay_bytes": write_jsonl(replay_path, replay),
             "heldout_bytes": write_jsonl(held_path, held)}
    return replay_path, held_path, facts


# ---- the scratch arm's architecture ----------------------------------------------------------------------
def scratch_flags(cfg: ModelConfig) -> list[str]:
    """`nanoseek train` flags that build `cfg`'s architecture: a preset equal to it but for the tokenizer's
    fields, with --layers / --index-topk where those differ. ValueError when no preset fits."""
    def core(c: ModelConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in SCRATCH_FREE_FIELDS}
    for name in PRESETS:
        p = get_preset(name)
        if core(p) != core(cfg):
            continue
        if cfg.first_k_dense_replace != min(p.first_k_dense_replace, cfg.num_hidden_layers):
            continue  # `--layers` would not give this many dense layers
        flags = ["--preset", name]
        if cfg.num_hidden_layers != p.num_hidden_layers:
            flags += ["--layers", str(cfg.num_hidden_layers)]
        if cfg.index_topk != p.index_topk:
            flags += ["--index-topk", str(cfg.index_topk)]
        return flags
    raise ValueError("the base model's architecture is no preset of `nanoseek train` (with --layers / "
                     "--index-topk): give --scratch-preset")


# ---- budget ----------------------------------------------------------------------------------------------
def step_times(metrics: Path) -> list[float]:
    """Each step's wall time from a run's metrics.jsonl, in step order."""
    recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    return [r["step_time_s"] for r in sorted(recs, key=lambda r: r["step"]) if "step_time_s" in r]


def steps_for_budget(times: Sequence[float], budget: float) -> tuple[int, float]:
    """(steps, seconds a step) for `budget` seconds: the median step time over all steps but the first (the
    cold one), at least one step."""
    if len(times) < 2:
        raise ValueError("calibration needs at least 2 steps (the first is not counted)")
    step_s = statistics.median(times[1:])
    return max(1, int(budget // step_s)), step_s


# ---- running nanoseek ------------------------------------------------------------------------------------
class CommandFailed(RuntimeError):
    pass


def nanoseek(args: Sequence[str], log: Path, env: dict[str, str]) -> str:
    """Run `python -m nanoseek ARGS` with stdout and stderr into `log`; returns its stdout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nanoseek", *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(cmd)}\n{p.stdout}\n--- stderr ---\n{p.stderr}")
    print(f"    {' '.join(map(str, args[:2]))}: {time.perf_counter() - t0:.0f}s (log {log})", flush=True)
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-8:])
        raise CommandFailed(f"`{' '.join(cmd)}` exited with {p.returncode}; log {log}:\n{tail}")
    return p.stdout


def parse_eval(stdout: str) -> list[dict]:
    """The records of `nanoseek eval --json` (one JSON object a line; other lines are not its output)."""
    return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


@dataclass
class Runner:
    """How every command runs: environment, shared training and evaluation flags, where logs go."""
    env: dict[str, str]
    train_flags: list[str]
    eval_flags: list[str]
    budget: float
    calibration_steps: int

    def eval(self, model: Path, files: Sequence[Path], log: Path) -> list[dict]:
        recs = parse_eval(nanoseek(["eval", model, "--data", *files, "--json", *self.eval_flags], log, self.env))
        if len(recs) != len(files):
            raise CommandFailed(f"nanoseek eval gave {len(recs)} records for {len(files)} files; log {log}")
        return recs

    def train(self, command: list, run: Path, logs: Path) -> dict:
        """Calibrate `command` (a `nanoseek train|adapt` command without --max-steps / --out), then run it for
        the budget in `run`; returns steps, calibrated and measured times."""
        calib = run.with_name(run.name + "-calibration")
        shutil.rmtree(calib, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        nanoseek([*command, "--max-steps", self.calibration_steps, "--out", calib, *self.train_flags],
                 logs / f"{run.name}-calibration.log", self.env)
        steps, step_s = steps_for_budget(step_times(calib / "metrics.jsonl"), self.budget)
        shutil.rmtree(calib)
        t0 = time.perf_counter()
        nanoseek([*command, "--max-steps", steps, "--out", run, *self.train_flags], logs / f"{run.name}.log", self.env)
        wall = time.perf_counter() - t0
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the final model stays; resume is not needed
        times = step_times(run / "metrics.jsonl")
        return {"steps": steps, "calibrated_step_s": step_s, "train_s": sum(times[1:]),
                "first_step_s": times[0], "command_wall_s": wall}


# ---- one language ----------------------------------------------------------------------------------------
def run_language(lang: str, a: argparse.Namespace, r: Runner, base_eval: Path, replay: Path, base_rec: dict,
                 scratch: list[str]) -> dict:
    from nanoseek.tokenizer import load_tokenizer
    work = Path(a.work) / lang
    logs = work / "logs"
    ld = prepare_language(Path(a.data) / lang, work / "data", a.heldout_fraction)
    print(f"  {lang}: {len(ld.files)} files, {ld.train_lines} lines trained on, {ld.heldout_lines} held out",
          flush=True)
    base = Path(a.base)
    arms: dict[str, dict] = {}

    (rec,) = r.eval(base, [ld.heldout], logs / "eval-base.log")
    arms["base"] = {"bits_per_byte": rec["bits_per_byte"], "tokens_per_word": rec["tokens_per_word"],
                    "tokens_per_byte": rec["tokens_per_byte"], "base_domain_bits_per_byte": base_rec["bits_per_byte"]}

    tok = work / "tokenizer"
    t0 = time.perf_counter()
    # learnt on all of the training part (--heldout-fraction 0): the bench holds its own text out; its log gives
    # the base domain's compression before and after
    nanoseek(["tokenizer", "extend", base, "--data", ld.train_dir, "--add", a.add, "--out", tok,
              "--heldout-fraction", 0, "--base-data", base_eval], logs / "tokenizer-extend.log", r.env)
    added = load_tokenizer(tok).vocab_size - load_tokenizer(base).vocab_size
    extend_s = time.perf_counter() - t0

    def trained(arm: str, command: list, model_of) -> None:
        run = work / arm
        timing = r.train(command, run, logs)
        model = model_of(run)
        lang_rec, dom_rec = r.eval(model, [ld.heldout, base_eval], logs / f"eval-{arm}.log")
        arms[arm] = {**timing, "bits_per_byte": lang_rec["bits_per_byte"],
                     "tokens_per_word": lang_rec["tokens_per_word"], "tokens_per_byte": lang_rec["tokens_per_byte"],
                     "base_domain_bits_per_byte": dom_rec["bits_per_byte"], "model": str(model)}

    def lr(v: Optional[float]) -> list:
        return [] if v is None else ["--lr", v]  # None: the command's own default

    def merged(run: Path) -> Path:
        nanoseek(["lora", "merge", "--base", base, "--adapter", run / "final", "--out", run / "merged"],
                 logs / "lora-merge.log", r.env)
        return run / "merged"

    trained("extended", ["adapt", "--init", base, "--tokenizer", tok, "--data", ld.train_dir, "--replay", replay,
                         "--replay-ratio", a.replay_ratio, *lr(a.adapt_lr)], lambda run: run / "final")
    trained("scratch", ["train", *scratch, "--tokenizer", tok, "--data", ld.train_dir, *lr(a.scratch_lr)],
            lambda run: run / "final")
    trained("lora", ["adapt", "--init", base, "--tokenizer", tok, "--data", ld.train_dir, "--replay", replay,
                     "--replay-ratio", a.replay_ratio, "--lora-rank", a.lora_rank, "--lora-alpha", 2 * a.lora_rank,
                     *lr(a.lora_lr)], merged)
    return {"files": ld.files, "train_lines": ld.train_lines, "heldout_lines": ld.heldout_lines,
            "heldout_file": str(ld.heldout), "added_tokens": added, "tokenizer_extend_s": extend_s, "arms": arms}


# ---- verdicts and tables ---------------------------------------------------------------------------------
@dataclass
class Check:
    language: str
    target: str
    value: str  # what was measured, in words
    passed: bool


def _num(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def checks(languages: dict[str, dict]) -> list[Check]:
    """The issue's targets, per language, as measured (a missing figure fails its check)."""
    out = []
    for lang, res in languages.items():
        arms = res["arms"]
        bpb = {k: _num(arms.get(k, {}).get("bits_per_byte")) for k in ARMS}
        for other, name in (("base", "(b) beats (a): lower held-out bits/byte"),
                            ("scratch", "(b) beats (c): lower held-out bits/byte")):
            ok = bpb["extended"] is not None and bpb[other] is not None and bpb["extended"] < bpb[other]
            out.append(Check(lang, name, f"{_fmt(bpb['extended'])} vs {_fmt(bpb[other])}", ok))
        before = _num(arms.get("base", {}).get("tokens_per_word"))
        after = _num(arms.get("extended", {}).get("tokens_per_word"))
        cut = None if before is None or after is None else 1 - after / before
        out.append(Check(lang, f"tokens/word fall by >= {TOKENS_PER_WORD_CUT:.0%}",
                         f"{_fmt(before)} -> {_fmt(after)} ({_pct(-cut if cut is not None else None)})",
                         cut is not None and cut >= TOKENS_PER_WORD_CUT))
        d0 = _num(arms.get("base", {}).get("base_domain_bits_per_byte"))
        d1 = _num(arms.get("extended", {}).get("base_domain_bits_per_byte"))
        rise = None if d0 is None or d1 is None else d1 / d0 - 1
        out.append(Check(lang, f"base-domain bits/byte rise <= {FORGETTING_LIMIT:.0%} with replay",
                         f"{_fmt(d0)} -> {_fmt(d1)} ({_pct(rise)})", rise is not None and rise <= FORGETTING_LIMIT))
    return out


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:+.1%}"


def language_table(res: dict, labels: dict[str, str]) -> str:
    """One language's markdown table: an arm a row (`labels` names them)."""
    rows = ["| arm | steps | train s | held-out bits/byte | tokens/word | base-domain bits/byte |",
            "|---|---:|---:|---:|---:|---:|"]
    base_dom = _num(res["arms"].get("base", {}).get("base_domain_bits_per_byte"))
    for k, label in labels.items():
        arm = res["arms"].get(k)
        if arm is None:
            rows.append(f"| {label} | | | (not run) | | |")
            continue
        steps = f"{arm['steps']:,d}" if "steps" in arm else "–"
        secs = f"{arm['train_s']:.0f}" if "train_s" in arm else "–"
        dom = _num(arm.get("base_domain_bits_per_byte"))
        if k == "scratch":
            dom_s = "–"  # a model that never saw the base domain: not a forgetting figure
        elif k == "base" or dom is None or base_dom is None:
            dom_s = _fmt(dom)
        else:
            dom_s = f"{_fmt(dom)} ({_pct(dom / base_dom - 1)})"
        rows.append(f"| {label} | {steps} | {secs} | {_fmt(_num(arm.get('bits_per_byte')))} | "
                    f"{_fmt(_num(arm.get('tokens_per_word')), 2)} | {dom_s} |")
    return "\n".join(rows)


def checks_table(cs: Sequence[Check]) -> str:
    rows = ["| language | target | measured | verdict |", "|---|---|---|---|"]
    rows += [f"| {c.language} | {c.target} | {c.value} | {'PASS' if c.passed else 'FAIL'} |" for c in cs]
    return "\n".join(rows)


# ---- main ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base", required=True, help="base model folder (Hugging Face layout, with its tokenizer)")
    ap.add_argument("--base-data", nargs="+", default=[],
                    help="the base model's training text (default: this Python's standard library source)")
    ap.add_argument("--base-heldout-fraction", type=float, default=TrainConfig(out="").heldout_fraction,
                    help="the held-out share of --base-data the base was trained with (`nanoseek train`'s default)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder of the language folders")
    ap.add_argument("--languages", default="welsh,yoruba,wolof", help="comma-separated folders of --data")
    ap.add_argument("--heldout-fraction", type=float, default=0.1, help="last share of each file's lines held out")
    ap.add_argument("--budget", type=float, help="seconds of training steps per arm (default 180; --quick 6)")
    ap.add_argument("--calibration-steps", type=int, help="steps of each arm's timing run (default 8; --quick 3)")
    ap.add_argument("--add", type=int, help="tokens the extended tokenizer adds (default 2000; --quick 300)")
    ap.add_argument("--replay-ratio", type=float, default=0.375,
                    help="(b), (d): share of each batch from the base domain (3 rows in 8)")
    ap.add_argument("--lora-rank", type=int, default=16, help="(d): adapter rank (alpha = 2 x rank)")
    ap.add_argument("--adapt-lr", type=float, help="(b) peak lr (default: nanoseek adapt's)")
    ap.add_argument("--scratch-lr", type=float, help="(c) peak lr (default: nanoseek train's)")
    ap.add_argument("--lora-lr", type=float, help="(d) peak lr (default: nanoseek adapt's)")
    ap.add_argument("--scratch-preset", help="(c): `nanoseek train` architecture flags, e.g. \"--preset small\" "
                    "(default: found from the base's config)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row, in training and evaluation")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step (every arm)")
    ap.add_argument("--dtype", default="auto", help="--dtype of every command")
    ap.add_argument("--device", default="auto", help="--device of the training commands")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every command (default: as set)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly (--quick does)")
    ap.add_argument("--base-eval-bytes", type=int, help="base-domain held-out text evaluated (default 200000; "
                    "--quick 20000)")
    ap.add_argument("--replay-bytes", type=int, help="base-domain replay text (default 4000000; --quick 200000)")
    ap.add_argument("--eval-tokens", type=int, help="predicted tokens per evaluated file at most (default: all; "
                    "--quick 4096)")
    ap.add_argument("--quick", action="store_true", help="a smoke check: tiny budget and samples, eager")
    ap.add_argument("--work", default="runs/bench-adapt", help="folder of the data splits, runs and logs")
    ap.add_argument("--out", help="results JSON (default WORK/results.json)")
    a = ap.parse_args(argv)
    # --quick fills what was not given with its small values
    defaults = {"budget": (180.0, 6.0), "calibration_steps": (8, 3), "add": (2000, 300),
                "base_eval_bytes": (200_000, 20_000), "replay_bytes": (4_000_000, 200_000),
                "eval_tokens": (None, 4096)}
    for k, (full, quick) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    if a.quick:
        a.compile = False
    a.out = a.out or str(Path(a.work) / "results.json")
    if a.calibration_steps < 2 or a.budget <= 0:
        ap.error("--calibration-steps must be >= 2 and --budget > 0")
    return a


def machine(a: argparse.Namespace) -> dict:
    """What the figures were measured on: CPU and ISA, torch, threads, the dtype `--dtype` resolves to."""
    import torch

    from nanoseek import precision
    from nanoseek.kernels import isa
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device
    why = io.StringIO()
    dtype = precision.resolve(a.dtype, device, "bench", out=why)
    return {"cpu": isa.describe(), "device": device, "torch": torch.__version__,
            "threads": a.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
            "dtype": str(dtype).split(".")[-1], "dtype_reason": why.getvalue().strip()}


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    base_cfg = ModelConfig.from_json(a.base)
    scratch = a.scratch_preset.split() if a.scratch_preset else scratch_flags(base_cfg)
    work = Path(a.work)
    m = machine(a)
    print(f"CPU {m['cpu']}; device {m['device']}, torch {m['torch']}, {m['threads']} threads, dtype {m['dtype']} "
          f"({m['dtype_reason'] or 'as given'})")
    print(f"base {a.base}; scratch arm: nanoseek train {' '.join(scratch)}; budget {a.budget:g}s of training steps "
          f"per arm (step time calibrated by a {a.calibration_steps}-step run of each command); rows "
          f"{a.batch_size}x{a.seq_len}; +{a.add} tokens; replay {a.replay_ratio:g}; LoRA rank {a.lora_rank}"
          f"{'; eager' if not a.compile else ''}", flush=True)
    train_flags = ["--seq-len", a.seq_len, "--batch-size", a.batch_size, "--dtype", a.dtype, "--device", a.device,
                   # the bench holds out and evaluates its own text; no evaluation inside the budget
                   "--heldout-fraction", 0, "--eval-tokens", 0, "--no-progress"]
    if not a.compile:
        train_flags.append("--no-compile")
    eval_flags = ["--seq-len", a.seq_len, "--dtype", a.dtype]
    if a.eval_tokens:
        eval_flags += ["--max-tokens", a.eval_tokens]
    r = Runner(env, train_flags, eval_flags, a.budget, a.calibration_steps)
    replay, base_eval, facts = prepare_base_domain(a.base_data, work / "base-domain", a.base_heldout_fraction,
                                                   a.base_eval_bytes, a.replay_bytes)
    print(f"base domain: {facts['files']} files; held out {facts['heldout_bytes']:,} bytes, replay "
          f"{facts['replay_bytes']:,} bytes", flush=True)
    (base_rec,) = r.eval(Path(a.base), [base_eval], work / "base-domain" / "eval-base.log")
    results = {"machine": m, "config": vars(a), "scratch_flags": scratch,
               "base_domain": {**facts, "heldout_file": str(base_eval), "replay_file": str(replay),
                               "base_bits_per_byte": base_rec["bits_per_byte"]}, "languages": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = dict(ARMS, extended=f"{ARMS['extended']} (+{a.add} tokens, replay {a.replay_ratio:g})",
                  scratch=f"{ARMS['scratch']} ({' '.join(scratch)}, extended tokenizer)",
                  lora=f"{ARMS['lora']} (rank {a.lora_rank}, extended tokenizer, replay {a.replay_ratio:g})")
    try:
        for lang in a.languages.split(","):
            res = run_language(lang, a, r, base_eval, replay, base_rec, scratch)
            results["languages"][lang] = res
            print(f"\n### {lang}: {res['added_tokens']} tokens added\n\n{language_table(res, labels)}\n", flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")  # after each language: a failure keeps the rest
    except CommandFailed as e:
        print(f"bench/adapt.py: {e}", file=sys.stderr)
        return 1
    cs = checks(results["languages"])
    results["checks"] = [dataclasses.asdict(c) for c in cs]
    results["all_pass"] = all(c.passed for c in cs)
    out.write_text(json.dumps(results, indent=2) + "\n")
    failed = sum(not c.passed for c in cs)
    print(f"### Targets\n\n{checks_table(cs)}\n\n{len(cs) - failed} of {len(cs)} checks pass"
          f"{'' if failed else ': every target met'}. Results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
