"""Fused bf16 CPU decode kernels (`cpu_decode.c`): compiled once with the machine's C compiler, called via ctypes.

Decoding a token on a CPU is bound by reading the activated weights and by the fixed cost of each PyTorch op;
a MoE layer alone issues a dozen small matmuls. These kernels stream each weight row once per call: a matvec for
a few rows of x (`linear`) and all routed experts of a MoE layer for all tokens in one call (`moe`). They serve
bf16 inference calls with few rows (`MAX_ROWS`) and no autograd; everything else, and every machine where the
library cannot be built (no compiler, not x86 with AVX-512 BF16, NANOSEEK_CPU_KERNELS=0), takes the PyTorch
path, which is also the reference the tests compare against (`tests/test_cpu_decode.py`).

The library is built with `-O3 -march=native -fopenmp` into ~/.cache/nanoseek (or $NANOSEEK_CACHE), keyed on
the source, the compiler and the CPU, written to a temporary name and renamed, so concurrent processes are safe.
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

import torch

MAX_ROWS = 16  # calls with more rows of x (prefill) keep oneDNN's GEMMs
_SRC = Path(__file__).with_name("cpu_decode.c")
_BF16 = torch.bfloat16
_lib: Optional[ctypes.CDLL] = None
_tried = False
_enabled = True


def set_enabled(on: bool) -> bool:
    """Turn the kernels on or off for this process (off: every call takes the PyTorch reference path).
    Returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, on
    return prev


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build() -> Optional[ctypes.CDLL]:
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    # no FMA contraction: the scalar loops round like PyTorch's separate multiplies and adds
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([_SRC.read_text(), cc, version, " ".join(flags), _cpu_id()]).encode())
    root = Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek") / "kernels"
    path = root / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, str(_SRC), "-o", tmp, "-lm"], capture_output=True, text=True,
                               timeout=300)
            if r.returncode != 0:
                warnings.warn(f"nanoseek: CPU decode kernels not built ({cc}): {r.stderr.strip()[-500:]}")
                return None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    if not lib.ns_has_avx512bf16():  # the portable loops are slower than oneDNN: not worth it
        return None
    i64, p, nt = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ns_linear_bf16.argtypes = [p, i64, i64, p, i64, p, nt]
    lib.ns_moe_bf16.argtypes = [p, i64, i64, p, p, i64, p, p, i64, p, p, p, nt]
    lib.ns_mla_absorbed_bf16.argtypes = [p, i64, i64, i64, i64, i64, p, p, i64, i64, p, i64, nt, p,
                                         ctypes.c_float, p, p, p, p, nt]
    lib.ns_rope_pairs_bf16.argtypes = [p, i64, i64, i64, i64, p, p, p]
    lib.ns_rmsnorm_bf16.argtypes = [p, i64, i64, p, ctypes.c_float, p]
    lib.ns_router.argtypes = [p, i64, i64, p, i64, p, nt, nt, i64, i64, i64, nt, ctypes.c_float, p, p, p, nt]
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, built on first use; None where they are unavailable."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except OSError as e:  # unwritable cache, unloadable library: fall back to PyTorch
            warnings.warn(f"nanoseek: CPU decode kernels unavailable: {e}")
            _lib = None
    return _lib


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a call on x (rows flattened) with these weights can take the kernels. Called for every op of a
    decode step, so it is written for speed."""
    if x.dtype is not _BF16 or not x.is_cpu or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if not _enabled or (_lib is None and (_tried or library() is None)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    for w in weights:
        if w.dtype is not _BF16 or not w.is_cpu or not w.is_contiguous():
            return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ weight[O, D]^T -> [..., O] (bf16; check `usable` first)."""
    xf = x.reshape(-1, x.shape[-1]).contiguous()
    O = weight.shape[0]
    y = torch.empty(*x.shape[:-1], O, dtype=x.dtype)
    _lib.ns_linear_bf16(xf.data_ptr(), xf.shape[0], xf.shape[1], weight.data_ptr(), O, y.data_ptr(),
                        torch.get_num_threads())
    return y


def moe(x: torch.Tensor, gate_w: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor) -> torch.Tensor:
    """Routed experts: x [N, D], gate weights [N, K] fp32, expert ids [N, K], gate_up [E, 2I, D], down [E, D, I]
    -> [N, D] (bf16; check `usable` first)."""
    x = x.contiguous()
    N, D = x.shape
    K, I = idx.shape[1], down.shape[-1]
    idx = idx.to(torch.int64).contiguous()
    gw = gate_w.to(torch.float32).contiguous()
    out = torch.empty(N, D, dtype=x.dtype)
    act = torch.empty(N * K, I, dtype=x.dtype)
    ys = torch.empty(N * K, D, dtype=torch.float32)
    _lib.ns_moe_bf16(x.data_ptr(), N, D, idx.data_ptr(), gw.data_ptr(), K, gate_up.data_ptr(), down.data_ptr(),
                     I, out.data_ptr(), act.data_ptr(), ys.data_ptr(), torch.get_num_threads())
    return out


MAX_LATENT = 1024  # the kernel keeps one head's latent query on the stack


def mla_absorbed(q: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Absorbed MLA attention: q [B, T, H, N+P] bf16, w_uk [H, N, R] / w_uv [H, V, R] fp32, rows [B, S, C] (shared
    by a request's queries) or [B, T, S, C] (per query), mask [B, T, S] -> [B, T, H, V] bf16."""
    B, T, H, _ = q.shape
    _, N, R = w_uk.shape
    V = w_uv.shape[1]
    S, C = rows.shape[-2], rows.shape[-1]
    q, rows = q.contiguous(), rows.contiguous()
    mask = mask.to(torch.uint8).contiguous()
    out = torch.empty(B, T, H, V, dtype=q.dtype)
    qc = torch.empty(H, C, dtype=q.dtype)
    sc = torch.empty(H, S, dtype=torch.float32)
    ol = torch.empty(H, R, dtype=torch.float32)
    _lib.ns_mla_absorbed_bf16(q.data_ptr(), B, T, H, N, C - R, w_uk.data_ptr(), w_uv.data_ptr(), R, V,
                              rows.data_ptr(), S, int(rows.dim() == 4), mask.data_ptr(), scale, out.data_ptr(),
                              qc.data_ptr(), sc.data_ptr(), ol.data_ptr(), torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] bf16 with a bf16 weight [D] (norm.py's roundings)."""
    xf = x.contiguous()
    y = torch.empty_like(xf)
    _lib.ns_rmsnorm_bf16(xf.data_ptr(), xf.numel() // xf.shape[-1], xf.shape[-1], weight.data_ptr(), eps,
                         y.data_ptr())
    return y


_SCORING = {"sigmoid": 0, "softmax": 1}
_METHOD = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def route(x: torch.Tensor, w32: torch.Tensor, bias: Optional[torch.Tensor], scoring: str, method: str,
          n_group: int, topk_group: int, k: int, norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of moe.py for x [N, D] bf16 with an fp32 router weight [E, D] -> gate weights [N, K] fp32, expert
    ids [N, K]."""
    x = x.contiguous()
    N, D = x.shape
    E = w32.shape[0]
    gw = torch.empty(N, k, dtype=torch.float32)
    idx = torch.empty(N, k, dtype=torch.int64)
    scratch = torch.empty(N, 2 * E, dtype=torch.float32)
    _lib.ns_router(x.data_ptr(), N, D, w32.data_ptr(), E, None if bias is None else bias.data_ptr(),
                   _SCORING[scoring], _METHOD[method], n_group, topk_group, k, int(norm), scaling, gw.data_ptr(),
                   idx.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return gw, idx


_ONE = torch.ones(1, 1)
_ZERO = torch.zeros(1, 1, dtype=torch.int64)


def mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP down(silu(gate x) * up x) for x [..., D] bf16, gate_up [2I, D] (gate rows first), down [D, I]:
    the expert kernel with one expert of weight 1 (same roundings as the PyTorch MLP)."""
    xf = x.reshape(-1, x.shape[-1])
    N = xf.shape[0]
    out = moe(xf, _ONE.expand(N, 1), _ZERO.expand(N, 1), gate_up[None], down[None])
    return out.view(x.shape)


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lead: int) -> torch.Tensor:
    """x [B, T, H, W] or [B, T, W] bf16 with dims lead.. rotated in pairs by cos, sin [B, T, (W - lead) / 2]."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    M = cos.numel() // cos.shape[-1]
    _lib.ns_rope_pairs_bf16(xc.data_ptr(), M, xc.numel() // (M * x.shape[-1]), x.shape[-1], lead,
                            cos.data_ptr(), sin.data_ptr(), y.data_ptr())
    return y
