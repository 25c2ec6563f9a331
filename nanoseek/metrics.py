"""What a training run shows: live progress, metrics.jsonl, MFU, expert-load balance, plots and report.md.

- metrics.jsonl: one JSON object per optimizer step (step, loss, lm/mtp/balance/indexer losses, lr, grad norm,
  tokens/s, MFU, memory, per-MoE-layer MaxVio and bias norm; eval_loss / eval_bpb on evaluation steps, and
  eval_base_loss / eval_base_bpb when adapting: the base domain's held-out text).
- MFU counts 6 x activated parameters x tokens/s (forward 2N + backward 4N FLOPs per token; attention's T^2
  term left out, as in PaLM's "6N" model FLOPs), over the peak of the device in the training dtype:
  CUDA from a table of datasheet dense peaks, CPU MEASURED at start-up with a large matmul (best of a few runs;
  a smaller one where the dtype multiplies slowly, so that this takes ~1.5 s at most), so CPU MFU means "share of
  what this machine's matmul reaches", not of a datasheet number.
- MaxVio = (max load - mean load) / mean load over the global batch (DeepSeek-V3 §4.5.2, Wang et al. 2024).
- plots (matplotlib Agg, no display): loss.png (train/eval loss and bits per byte), throughput.png, maxvio.png
  (per-layer MaxVio heatmap over steps); report.md summarises the run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

# Dense (non-sparse) datasheet peaks, FLOP/s, by substring of torch.cuda.get_device_name().
CUDA_PEAK = {
    torch.bfloat16: {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                     "L40S": 362e12, "4090": 165e12, "3090": 71e12, "V100": 125e12},
    torch.float32: {"H200": 67e12, "H100": 67e12, "H800": 67e12, "A100": 19.5e12, "A800": 19.5e12,
                    "L40S": 91.6e12, "4090": 82.6e12, "3090": 35.6e12, "V100": 15.7e12},
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 5,
                         budget_s: float = 1.5) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul in dtype: the practical peak of this device, measured in about
    budget_s at most. Where this dtype multiplies slowly (bf16 on a CPU without bf16 arithmetic runs at a few
    GFLOP/s, where the 1024^3 products would hold up the start of training for about a minute), the products
    shrink by halves, down to 256, as a short probe at 256 predicts."""
    probe = _matmul_seconds(device, dtype, 256, 1)
    while n > 256 and (reps + 1) * 4 * probe * (n / 256) ** 3 > budget_s:
        n //= 2
    return 2 * n ** 3 / _matmul_seconds(device, dtype, n, reps)


def _matmul_seconds(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Seconds of one n x n x n matmul: the best of reps + 1 runs of 4 back to back (the first warms up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in CUDA_PEAK.get(dtype, {}).items():
            if key in name:
                return v, f"datasheet {name}"
    return measure_matmul_flops(device, dtype), f"measured {device.type} matmul peak"


def flops_params(cfg, with_mtp: bool) -> int:
    """Activated parameters that cost matmul FLOPs per token: all activated ones minus the embedding lookup."""
    n = cfg.num_params(include_mtp=with_mtp)["active"]
    return n - cfg.vocab_size * cfg.hidden_size


def max_vio(load: torch.Tensor) -> float:
    """(max - mean) / mean of an expert-load vector [E]."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20
    except ImportError:  # Windows
        return float("nan")


class MetricsLog:
    """Appends one JSON line per step; on resume, drops lines past the resumed step first."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r.get("step", 0) <= resume_step:
                        self.records.append(r)
            self._rewrite()
        else:
            self.path.write_text("")

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(clean)
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True, every: int = 10, desc: str = "train"):
        self.enabled, self.every, self.total = enabled, every, total
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(desc, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total} {info}", highlight=False)

    def print(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# ---- plots and report -------------------------------------------------------------------------------------
def plot_run(out_dir: Path, records: list[dict]) -> list[str]:
    """Write loss.png, throughput.png and (MoE runs) maxvio.png; returns the file names written."""
    if not records:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.get("loss") for r in records], label="train loss", lw=1)
    if any(r.get("lm_loss") is not None for r in records):
        ax.plot(steps, [r.get("lm_loss") for r in records], label="train LM loss", lw=1, alpha=0.7)
    ev = [r for r in records if r.get("eval_loss") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in ev], [r["eval_bpb"] for r in ev], "s--", color="tab:red",
                 label="held-out bits/byte")
        base = [r for r in ev if r.get("eval_base_bpb") is not None]
        if base:
            ax2.plot([r["step"] for r in base], [r["eval_base_bpb"] for r in base], "^:", color="tab:purple",
                     label="base-domain bits/byte")
        ax2.set_ylabel("bits per byte")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right")
    ax.set_title("loss")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append("loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r.get("tokens_per_s") for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title("training throughput")
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=100)
    plt.close(fig)
    written.append("throughput.png")

    vio = [r.get("maxvio") for r in records if r.get("maxvio")]
    if vio:
        import numpy as np
        m = np.array(vio, dtype=float).T  # [layers, steps]
        fig, ax = plt.subplots(figsize=(7, 1 + 0.35 * m.shape[0]))
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="magma",
                       extent=(steps[0], steps[-1], m.shape[0] - 0.5, -0.5))
        ax.set_xlabel("step")
        ax.set_ylabel("MoE layer")
        ax.set_title("expert load MaxVio per layer")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "maxvio.png", dpi=100)
        plt.close(fig)
        written.append("maxvio.png")
    return written


def write_report(out_dir: Path, summary: dict, records: list[dict], plots: list[str],
                 samples: Optional[list[tuple[str, str]]] = None) -> Path:
    """report.md: what was trained, how fast, how well, with the plots and sampled completions."""
    lines = [f"# nanoseek training report: {summary.get('run', out_dir)}", ""]
    lines += ["| | |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"| {k} | {v} |")
    if records:
        first, last = records[0], records[-1]
        lines += ["", "## Training curve", "",
                  f"loss {first.get('loss', float('nan')):.4f} (step {first['step']}) -> "
                  f"{last.get('loss', float('nan')):.4f} (step {last['step']})."]
        ev = [r for r in records if r.get("eval_bpb") is not None]
        if ev:
            base = any(r.get("eval_base_bpb") is not None for r in ev)  # adapting: the base domain beside
            lines.append("")
            lines.append("| step | held-out loss | bits/byte |" + (" base-domain bits/byte |" if base else ""))
            lines.append("|---|---|---|" + ("---|" if base else ""))
            for r in ev:
                row = f"| {r['step']} | {r['eval_loss']:.4f} | {r['eval_bpb']:.4f} |"
                if base:
                    row += f" {r['eval_base_bpb']:.4f} |" if r.get("eval_base_bpb") is not None else " |"
                lines.append(row)
        kl = [r for r in records if r.get("indexer_kl") is not None]
        if kl:
            lines += ["", f"DSA indexer KL {kl[0]['indexer_kl']:.4f} -> {kl[-1]['indexer_kl']:.4f}, "
                          f"top-k recall of attention mass {kl[0].get('indexer_recall', float('nan')):.3f} -> "
                          f"{kl[-1].get('indexer_recall', float('nan')):.3f}."]
        vio = [r for r in records if r.get("maxvio")]
        if vio:
            a, b = vio[0]["maxvio"], vio[-1]["maxvio"]
            lines += ["", f"Expert load MaxVio (mean over MoE layers) {sum(a) / len(a):.3f} -> "
                          f"{sum(b) / len(b):.3f}."]
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    if samples:
        lines += ["", "## Samples", ""]
        for prompt, text in samples:
            lines += ["```", f"{prompt}{text}", "```", ""]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
