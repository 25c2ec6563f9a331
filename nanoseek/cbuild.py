"""Build a C source of this package into a shared library with the machine's compiler, once, and load it
(ctypes). Used by the fused CPU decode kernels (`model/cpu_decode.c`), the grouped expert GEMMs of CPU training
(`model/cpu_experts.c`) and the CPU optimizer kernel (`cpu_adamw.c`).

Libraries go to ~/.cache/nanoseek/kernels (or $NANOSEEK_CACHE/kernels), named by a hash of the source, the
compiler, the flags and the CPU; each is written to a temporary name and renamed, so concurrent processes are
safe. NANOSEEK_CPU_KERNELS=0 turns every build off (callers then take their PyTorch reference paths).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

# no FMA contraction: scalar loops round like PyTorch's separate multiplies and adds
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build(src: Path, defines: tuple[str, ...] = ()) -> Optional[ctypes.CDLL]:
    """The library of `src` compiled with FLAGS and `defines` (e.g. "-DNS_F32"), or None where it cannot be
    built here (turned off, not x86-64, no compiler, a compile error: warned)."""
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    flags = FLAGS + list(defines)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([src.read_text(), cc, version, " ".join(flags), _cpu_id()]).encode())
    root = Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek") / "kernels"
    path = root / f"{src.stem}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            try:
                r = subprocess.run([cc, *flags, str(src), "-o", tmp, "-lm"], capture_output=True, text=True,
                                   timeout=300)
            except subprocess.SubprocessError as e:  # a hung compiler: go on without the kernels
                warnings.warn(f"nanoseek: {src.name} not built ({cc}): {e}")
                return None
            if r.returncode != 0:
                warnings.warn(f"nanoseek: {src.name} not built ({cc}): {r.stderr.strip()[-500:]}")
                return None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(path))
