"""The compute dtype a device runs fast: `--dtype auto`, the default of `train`, `generate`, `chat`, `serve`, the
benches and the speedrun.

bfloat16 halves weight bytes and, where the hardware multiplies bf16 natively (AVX-512 BF16 and AMX on x86,
BFDOT/BFMMLA on ARMv8.6, every recent GPU), runs matmuls faster than float32. Without that support PyTorch
emulates bf16 and a CPU matmul becomes an order of magnitude slower than float32 (an AVX2 EPYC: ~30x). So `auto`
is bfloat16 only where the CPU reports native bf16 AND a short bf16 matmul measures at least as fast as float32
here; float32 otherwise. The measurement (a few tenths of a second) runs once per CPU model, torch version and
thread count, and is cached in ~/.cache/nanoseek/precision (or $NANOSEEK_CACHE/precision). CUDA devices take
bfloat16 where `torch.cuda.is_bf16_supported()`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from nanoseek.kernels import isa

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHOICES = ["auto", *DTYPES]
_memo: dict = {}


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 multiply instructions (x86 AVX-512 BF16 or AMX-BF16; ARM BF16)."""
    flags = isa.cpu_flags()
    if isa.arch() == "x86_64":
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return isa.arch() == "aarch64" and "bf16" in flags


def _matmul_seconds(dtype: torch.dtype, n: int = 512, m: int = 256) -> float:
    a, b = torch.randn(m, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # first call: oneDNN / BLAS set-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_matmul_speed() -> dict:
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s} of a 256x512x512 matmul on this CPU, measured once per CPU,
    torch version and thread count (cached on disk)."""
    key = hashlib.sha256("\0".join([isa.cpu_name(), " ".join(sorted(isa.cpu_flags())), torch.__version__,
                                    str(torch.get_num_threads())]).encode()).hexdigest()[:16]
    if key in _memo:
        return _memo[key]
    path = Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek") / "precision" / f"{key}.json"
    try:
        speed = json.loads(path.read_text())
        assert set(speed) == set(DTYPES)
    except (OSError, ValueError, AssertionError):
        flops = 2 * 256 * 512 * 512
        speed = {name: flops / _matmul_seconds(dt) / 1e9 for name, dt in DTYPES.items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(speed))
            os.replace(tmp, path)
        except OSError:  # an unwritable cache: measure again next time
            pass
    _memo[key] = speed
    return speed


def auto_dtype(device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """(the dtype `auto` picks for this device, the reason in a few words)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return torch.float32, f"{torch.cuda.get_device_name(device)} has no bf16"
    if device.type != "cpu":
        return torch.float32, f"{device.type}: float32 by default"
    speed = cpu_matmul_speed()
    ratio = speed["bfloat16"] / speed["float32"]
    measured = (f"bf16 matmul {speed['bfloat16']:.1f} vs float32 {speed['float32']:.1f} GFLOP/s "
                f"({ratio:.2f}x)")
    if not native_bf16_cpu():
        return torch.float32, f"{isa.cpu_name()} has no native bf16 ({measured})"
    if ratio < 1.0:
        return torch.float32, f"native bf16, but slower than float32 here ({measured})"
    return torch.bfloat16, f"native bf16 on {isa.cpu_name()} ({measured})"


def resolve(name: Optional[str], device: torch.device | str = "cpu", what: str = "nanoseek",
            out=None) -> torch.dtype:
    """The dtype for `--dtype name` ("auto" or None, "float32", "bfloat16") on `device`. Prints the choice and
    its reason in one line for `auto`, and a one-line warning for an explicit bfloat16 on a CPU that computes it
    slowly, to `out` (default: sys.stderr as it is at the call, not at import: a redirected stream may be closed
    since)."""
    out = sys.stderr if out is None else out
    if name in (None, "auto"):
        dtype, why = auto_dtype(device)
        print(f"{what}: dtype auto -> {str(dtype).split('.')[-1]}: {why}", file=out)
        return dtype
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {CHOICES}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
        speed = cpu_matmul_speed()
        slow = speed["float32"] / speed["bfloat16"]
        if not native_bf16_cpu() or slow > 1.0:
            print(f"{what}: warning: bfloat16 on {isa.cpu_name()}, which "
                  f"{'has no native bf16' if not native_bf16_cpu() else 'runs it slower than float32'}: "
                  f"bf16 matmuls measured {slow:.1f}x slower than float32 here (--dtype auto picks float32)",
                  file=out)
    return dtype


def dtype_names(spec: str, device: torch.device | str = "cpu", what: str = "bench") -> list[str]:
    """A bench's `--dtypes`: "auto" (the default) -> the one dtype `auto` picks here (said in one line),
    "all" -> float32 and bfloat16, else a comma-separated list of names."""
    if spec == "auto":
        return [str(resolve("auto", device, what)).split(".")[-1]]
    names = list(DTYPES) if spec == "all" else spec.split(",")
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}: use auto, all or names from {list(DTYPES)}")
    return names
