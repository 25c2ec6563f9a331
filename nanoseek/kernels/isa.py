"""Which SIMD instruction sets this CPU runs, and the kernel variant each C library is built for.

The C kernels (`cpu_decode.c`, `cpu_experts.c`, `cpu_adamw.c`) are written once over a small vector layer
(`simd.h`) and compiled per variant, each with the compiler flags of its instruction set rather than
`-march=native`, so that a machine can build and test every variant it can run (an AVX-512 machine tests the
AVX2 build too) and cross-compile the others (`tests/test_kernels_cross.py`).

Variants, best first on each architecture:
- x86-64: `avx512bf16` (AVX-512 with the BF16 dot product), `avx512` (AVX-512F/BW/VL/DQ), `avx2` (x86-64-v3:
  AVX2 + FMA + F16C);
- ARM64: `neon-bf16` (ARMv8.6 BFDOT), `neon` (baseline AArch64 Advanced SIMD).
A library that needs an instruction the CPU lacks is never loaded. NANOSEEK_KERNEL_ISA=<variant> caps the choice
(e.g. `avx2` on an AVX-512 machine, to measure or test that path); NANOSEEK_CPU_KERNELS=0 turns the kernels off.
NANOSEEK_HIDE_CPU_FLAGS (shell patterns, e.g. "avx512* amx*") goes further: nanoseek reads the CPU as lacking those
features everywhere (kernel variants, `--dtype auto`'s native bf16), so that a developer's machine can run the
test suite as a CPU without them would (README "Tests").
"""
from __future__ import annotations

import fnmatch
import functools
import os
import platform
from pathlib import Path

# variant -> (architecture, compiler flags, the /proc/cpuinfo flags it needs)
VARIANTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "avx512bf16": ("x86_64", ("-march=x86-64-v4", "-mavx512bf16"),
                   ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma")),
    "avx512": ("x86_64", ("-march=x86-64-v4",), ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma")),
    "avx2": ("x86_64", ("-march=x86-64-v3",), ("avx2", "fma", "f16c", "bmi2")),
    "neon-bf16": ("aarch64", ("-march=armv8.6-a+bf16",), ("asimd", "bf16")),
    "neon": ("aarch64", ("-march=armv8-a",), ("asimd",)),
}
ORDER = ("avx512bf16", "avx512", "avx2", "neon-bf16", "neon")


def arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (x86 `flags`, ARM `Features`); outside Linux, what torch's
    own CPU checks report. Less those NANOSEEK_HIDE_CPU_FLAGS names."""
    hidden = os.environ.get("NANOSEEK_HIDE_CPU_FLAGS", "").replace(",", " ").split()
    return frozenset(f for f in _cpu_flags() if not any(fnmatch.fnmatchcase(f, h) for h in hidden))


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    import torch
    flags = set()
    if arch() == "x86_64":
        if torch.cpu._is_avx2_supported():
            flags |= {"avx2", "fma", "f16c", "bmi2"}
        if torch.cpu._is_avx512_supported():
            flags |= {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
        if torch.cpu._is_avx512_bf16_supported():
            flags.add("avx512_bf16")
    elif arch() == "aarch64":
        flags.add("asimd")  # Advanced SIMD is part of every AArch64 CPU
    return flags


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's model name, for benches and logs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or arch()


def runs(variant: str) -> bool:
    """Whether this CPU can run code built for `variant`."""
    a, _, needs = VARIANTS[variant]
    return a == arch() and all(f in cpu_flags() for f in needs)


def supported() -> list[str]:
    """Every variant this CPU runs, best first (ignores NANOSEEK_KERNEL_ISA)."""
    return [v for v in ORDER if runs(v)]


def best(among: tuple[str, ...] = ORDER) -> str | None:
    """The best variant among `among` that this CPU runs and NANOSEEK_KERNEL_ISA allows; None if there is none
    or the kernels are turned off."""
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0":
        return None
    cap = os.environ.get("NANOSEEK_KERNEL_ISA")
    allowed = ORDER if not cap else ORDER[ORDER.index(cap):] if cap in ORDER else ()
    return next((v for v in ORDER if v in among and v in allowed and runs(v)), None)


def describe() -> str:
    """One line: the CPU, its vector ISAs, native bf16 or not."""
    isas = supported()
    return f"{cpu_name()} ({arch()}; kernel ISAs: {', '.join(isas) if isas else 'none'})"
