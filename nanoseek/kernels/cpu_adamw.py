"""The CPU kernels of `MasterWeightAdamW` (`nanoseek/optim.py`): one pass per tensor over a bf16 working weight,
its fp32 master and AdamW moments (`ns_adamw_master`), and the bf16 gradients' sum of squares for clipping
(`ns_sumsq_bf16`); `cpu_adamw.c`, built per ISA (`isa.py`), with a PyTorch reference in optim.py that gives the
same bits (tests/test_optim.py)."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

from nanoseek.kernels import isa
from nanoseek.kernels.build import build

_SRC = Path(__file__).with_name("cpu_adamw.c")
_lib: list = []  # [the loaded library or None], built on first use


def library() -> Optional[ctypes.CDLL]:
    """The kernels for this CPU's best variant, or None where they cannot be built (then optim.py's PyTorch
    reference runs)."""
    if not _lib:
        try:
            lib = build(_SRC, isa.best())
        except OSError:  # unwritable cache, unloadable library
            lib = None
        if lib is not None:
            p, i64, f, nt = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
            lib.ns_sumsq_bf16.argtypes = [p, i64, nt]
            lib.ns_sumsq_bf16.restype = ctypes.c_double
            lib.ns_adamw_master.argtypes = [p, p, p, p, p, p, i64] + [f] * 8 + [nt]
            lib.ns_isa.restype = ctypes.c_char_p
        _lib.append(lib)
    return _lib[0]


def variant() -> Optional[str]:
    """The instruction set the loaded library was built for (e.g. "avx2"), or None."""
    lib = library()
    return None if lib is None else lib.ns_isa().decode()
