"""Build a C source of this package into a shared library for one kernel variant (`isa.py`) with the machine's
compiler, once, and load it (ctypes). Used by the CPU decode kernels (`cpu_decode.c`), the grouped expert GEMMs
of CPU training (`cpu_experts.c`) and the optimizer kernel (`cpu_adamw.c`).

Libraries go to ~/.cache/nanoseek/kernels (or $NANOSEEK_CACHE/kernels), named by a hash of the sources (the .c
file and the headers beside it), the compiler, the flags and the CPU; each is written to a temporary name and
renamed, so concurrent processes are safe. NANOSEEK_CPU_KERNELS=0 turns every build off (callers then take their
PyTorch reference paths).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from nanoseek.kernels import isa

# no FMA contraction: scalar loops round like PyTorch's separate multiplies and adds
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# tuning (not the instruction set) follows the machine that builds
HERE = Path(__file__).parent


def compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def sources_key(src: Path) -> str:
    """The text of `src` and of every header beside it: a change to any of them is a new library."""
    return "\0".join(p.read_text() for p in [src, *sorted(src.parent.glob("*.h"))])


def flags(variant: str, defines: tuple[str, ...] = ()) -> list[str]:
    tune = ["-mtune=native"] if isa.VARIANTS[variant][0] == isa.arch() == "x86_64" else []
    return FLAGS + tune + list(isa.VARIANTS[variant][1]) + [f"-DNS_ISA_{variant.upper().replace('-', '_')}"] + list(defines)


def build(src: Path, variant: Optional[str], defines: tuple[str, ...] = ()) -> Optional[ctypes.CDLL]:
    """The library of `src` for `variant` (an `isa.VARIANTS` key this CPU runs) with `defines` (e.g. "-DNS_F32"),
    or None where it cannot be built or run here (no variant, turned off, no compiler, a compile error:
    warned)."""
    if variant is None or os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0" or not isa.runs(variant):
        return None
    cc = compiler()
    if cc is None:
        return None
    fl = flags(variant, defines)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([sources_key(src), cc, version, " ".join(fl), isa.arch()]).encode())
    root = Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek") / "kernels"
    path = root / f"{src.stem}-{variant}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            try:
                r = subprocess.run([cc, *fl, f"-I{src.parent}", str(src), "-o", tmp, "-lm"], capture_output=True,
                                   text=True, timeout=300)
            except subprocess.SubprocessError as e:  # a hung compiler: go on without the kernels
                warnings.warn(f"nanoseek: {src.name} ({variant}) not built ({cc}): {e}")
                return None
            if r.returncode != 0:
                warnings.warn(f"nanoseek: {src.name} ({variant}) not built ({cc}): {r.stderr.strip()[-500:]}")
                return None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(path))
