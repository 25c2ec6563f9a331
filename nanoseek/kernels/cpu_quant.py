"""Int8 / int4 weight-only matmuls on CPU (`cpu_quant.c`) for `nanoseek.quant`'s formats, called via ctypes.

`linear(x, codes, scale, min)` is x @ W'^T with W' the dequantized weight (quant.py's docstring), computed from
the packed codes as stored: a decode step reads 1 byte (int8) or ~0.56-0.63 byte (int4, with its bf16 scale and
min per group of 32-128) per weight instead of a float copy's 2 or 4. Activations float32 or bfloat16, fp32
arithmetic (the float path of the C source). The reference, which tests compare against, is dequantize-then-matmul
(`QuantLinear.reference`). `experts(...)` runs a decode batch's routed experts in one call (gate_up, SiLU gate
times up, down, the gate-weighted sum; int4 on int8 activations as below), where `QuantExperts.forward` issues a dozen PyTorch ops per expert. The
reference also serves everywhere the kernels do not (no C compiler, NANOSEEK_CPU_KERNELS=0,
autograd, more rows than LINEAR_ROWS / MAX_ROWS).

Two arithmetics for int4 (`cpu_quant.c`):
- float (every variant, and every int8 call): x in fp32, the codes widened and dequantized in registers, fp32
  FMAs: W' x up to fp32 sums (tests/test_cpu_quant.py bounds it). It is the reference of the other.
- int8 activations (`set_int8_activations`; the avx512 build on CPUs with AVX512-VNNI, detected at run time, and
  the avx2 build): llama.cpp's Q4_1 x Q8_1, x quantized per block of 32 values to int8, VPDPBUSD (AVX2:
  VPMADDUBSW + VPMADDWD) over the 4-bit codes (quant4.h). Measured on the Zen 4 here, one thread, a 4096 x 4096
  weight (G = 32): 0.37 ms against the float path's 1.11 ms at M = 1 (3.0x), 1.01 against 2.64 ms at M = 4; with
  G = 128, 0.31 against 0.89 ms; the avx2 build on the same CPU (NANOSEEK_KERNEL_ISA=avx2): 0.44 against 1.20 ms
  at M = 1 (2.7x), 1.29 against 2.57 ms at M = 4, G = 128 0.39 against 1.17 ms. The int4 float path is bound by
  its arithmetic (~7 GB/s of codes on one core), int8's float path is not (~27 GB/s, what one core streams here),
  so int8 keeps the float path. The error it adds, measured (same run, Gaussian x, every G, M = 1..8): the output
  is W' times the quantized x, 0.51-0.58% relative RMS from W' x, against ~7% relative RMS error of the int4
  weights themselves (quant.py); tests/test_cpu_quant.py checks it is exactly W' x^ up to fp32 sums. The experts'
  one call (x, then the hidden rows SiLU(gate) * up quantized alike) measured 1.0-1.4% from its float path, and
  at the speedrun model's expert shapes (D = 384, I = 256, 6 of 40 experts, one token) barely faster (245 against
  255 us a call; int8: 156 us): rows that short are bound by per-row overhead, not by the dot products.
No bf16 dot products: the codes are integers, so AVX-512 BF16 CPUs run the avx512 build.

One C source built per kernel variant (`isa.py`, `build.py`); the library is the best of VARIANTS this CPU runs
(NANOSEEK_KERNEL_ISA caps it).
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Optional

import torch

from nanoseek.kernels import isa
from nanoseek.kernels.build import build

_SRC = Path(__file__).with_name("cpu_quant.c")
VARIANTS = ("avx512", "avx2", "neon")
DTYPES = (torch.float32, torch.bfloat16)
# Rows of x up to which `linear` beats the reference class's path (QuantLinear.forward), measured on the Zen 4 here
# (one thread; weights 1536 x 1024, 384 x 384, 8192 x 384; M = 1..128): int8 with bf16 activations is on a par
# with torch._weight_int8pack_mm at one row (0.075 against 0.109 ms at 1536 x 1024, even at the others) and
# slower from two (the float path spends an FMA per row per weight, oneDNN's int8 kernel less), so it takes one
# row; int8 with float32 activations beats dequantize-then-matmul up to 32 rows (2.5 against 2.5 ms at 32, 8.3
# against 4.0 at 64), int4 up to 64 (2.1 against 26 ms: dequantizing int4 in PyTorch is slow). A prefill's larger
# calls keep the reference.
LINEAR_ROWS = {(torch.int8, torch.bfloat16): 1, (torch.int8, torch.float32): 32, (torch.uint8, torch.bfloat16): 64,
               (torch.uint8, torch.float32): 64}
MAX_ROWS = 16  # tokens of a decode batch up to which `experts` (one call for all pairs) runs them
_int8_activations = True  # int4 over int8 activations where the library has it (module docstring)
_built: dict = {}  # variant -> its library, or None where it cannot be built or run here
_lib: Optional[ctypes.CDLL] = None
_variant: Optional[str] = None
_chosen = False


def _build(variant: str) -> Optional[ctypes.CDLL]:
    try:
        lib = build(_SRC, variant)
    except OSError as e:  # unwritable cache, unloadable library: the reference path
        warnings.warn(f"nanoseek: CPU quantized kernels unavailable: {e}")
        return None
    if lib is None:
        return None
    lib.nq_isa.restype = ctypes.c_char_p
    got = lib.nq_isa().decode()
    if got != variant:  # the flags of isa.py did not give the vector code simd.h expects of them
        raise RuntimeError(f"nanoseek: {_SRC.name} was compiled for {variant} but its vector code is {got}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.nq_int8.argtypes = [p, i64, i64, p, p, i64, p, i32, i32]
    lib.nq_int4.argtypes = lib.nq_int4_q8.argtypes = [p, i64, i64, p, p, p, i64, i64, p, i32, i32]
    lib.nq_int4_q8.restype = lib.nq_q8.restype = i32
    lib.nq_experts.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p, p, i64, p, p, p, i64, p, i32, i32, i32]
    lib.nq_int8.restype = lib.nq_int4.restype = lib.nq_experts.restype = i32
    return lib


def library(variant: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """Without `variant`: the library every call uses (the best of VARIANTS this CPU runs, built on first use), or
    None. With it: that variant's library (None where this CPU cannot run it), for tests and benches."""
    global _lib, _variant, _chosen
    if variant is None:
        if not _chosen:
            best = isa.best(VARIANTS)
            _lib = library(best) if best is not None else None
            _variant, _chosen = (best if _lib is not None else None), True
        return _lib
    if variant not in VARIANTS:
        raise ValueError(f"cpu_quant has no {variant!r} build (VARIANTS: {', '.join(VARIANTS)})")
    if variant not in _built:
        _built[variant] = _build(variant) if isa.runs(variant) else None
    return _built[variant]


def set_int8_activations(on: bool) -> bool:
    """int4 calls on int8 activations where the library has them (on, the default) or on the float path (off:
    every call W' x up to fp32 sums). Returns the previous setting."""
    global _int8_activations
    prev, _int8_activations = _int8_activations, on
    return prev


def int8_activations(lib: Optional[ctypes.CDLL] = None) -> bool:
    """Whether int4 calls on this library (default: `library()`) run on int8 activations."""
    lib = lib or library()
    return _int8_activations and lib is not None and bool(lib.nq_q8())


def variant() -> Optional[str]:
    """The variant of the library the calls use (loading it if needed), or None without one."""
    library()
    return _variant


def reset() -> None:
    """Choose the library again at the next call (after NANOSEEK_KERNEL_ISA changes); built ones stay loaded."""
    global _chosen
    _chosen = False


def usable(x: torch.Tensor, codes: torch.Tensor, rows: Optional[int] = None) -> bool:
    """Whether x [..., K] times these codes should take the kernels: CPU, float32 or bf16, at most `rows` rows
    (default: LINEAR_ROWS for these dtypes), no autograd, contiguous codes, the library here."""
    limit = LINEAR_ROWS.get((codes.dtype, x.dtype), 0) if rows is None else rows
    return (x.is_cpu and x.dtype in DTYPES and x.numel() <= limit * x.shape[-1] and codes.is_cpu
            and codes.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad)
            and library() is not None)


def linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mn: Optional[torch.Tensor] = None,
           lib: Optional[ctypes.CDLL] = None) -> torch.Tensor:
    """x [..., K] @ W'^T -> [..., N] in x's dtype, W' from int8 codes [N, K] and scale [N] (mn None), or from
    int4 codes [N, K/2], scale and mn [N, K/G] (on int8 activations where `int8_activations`); `lib`: a
    variant's library (tests), else `library()`."""
    lib = lib or library()
    K = x.shape[-1]
    N = codes.shape[0]
    xf = x.reshape(-1, K).contiguous()
    # the C code reads raw memory by these sizes: check them here
    int4 = mn is not None
    want = (N, K // 2) if int4 else (N, K)
    if tuple(codes.shape) != want or codes.dtype != (torch.uint8 if int4 else torch.int8):
        raise ValueError(f"cpu_quant: codes {codes.dtype} {tuple(codes.shape)} for x of width {K}")
    scale, mn = scale.contiguous(), (mn.contiguous() if int4 else None)  # (alive through the call)
    if scale.dtype != torch.bfloat16 or (int4 and (mn.dtype != torch.bfloat16 or mn.shape != scale.shape)):
        raise ValueError("cpu_quant: scales and mins must be bf16 (quant.py)")
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    bf, nt = int(x.dtype == torch.bfloat16), torch.get_num_threads()
    if int4:
        G = K // scale.shape[-1] if scale.dim() == 2 and scale.shape[0] == N and scale.shape[-1] else 0
        args = (xf.data_ptr(), xf.shape[0], K, codes.data_ptr(), scale.data_ptr(), mn.data_ptr(), G, N, y.data_ptr(),
                bf, nt)
        rc = lib.nq_int4_q8(*args) if _int8_activations else -3
        if rc == -3:  # off, or not in this library on this CPU: the float path
            rc = lib.nq_int4(*args)
    else:
        if tuple(scale.shape) != (N,):
            raise ValueError(f"cpu_quant: int8 scale {tuple(scale.shape)} for {N} rows")
        rc = lib.nq_int8(xf.data_ptr(), xf.shape[0], K, codes.data_ptr(), scale.data_ptr(), N, y.data_ptr(), bf, nt)
    if rc == -2:
        raise MemoryError("cpu_quant: no memory for the activation scratch")
    if rc != 0:
        raise ValueError(f"cpu_quant: int4 needs K ({K}) a multiple of the group size, itself one of 32, 64, 128")
    return y


def _group(codes: torch.Tensor, scale: torch.Tensor, mn: Optional[torch.Tensor], width: int) -> int:
    """The group size of a projection's codes (0: int8), checking the shapes the C code will read by."""
    if mn is None:
        if codes.dtype != torch.int8 or codes.shape[-1] != width or scale.shape != codes.shape[:-1]:
            raise ValueError(f"cpu_quant: int8 codes {tuple(codes.shape)}, scale {tuple(scale.shape)} for width "
                             f"{width}")
        return 0
    ng = scale.shape[-1]
    if (codes.dtype != torch.uint8 or codes.shape[-1] * 2 != width or scale.shape != mn.shape or not ng
            or scale.shape[:-1] != codes.shape[:-1]):
        raise ValueError(f"cpu_quant: int4 codes {tuple(codes.shape)}, scale {tuple(scale.shape)} for width {width}")
    return width // ng


def experts(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gate_up: tuple, down: tuple) -> torch.Tensor:
    """sum_k w[n, k] * expert_idx[n,k](x[n]) -> [N, D] in x's dtype: x [N, D], w [N, K], idx [N, K], gate_up and
    down each (codes, scale, min or None) over all E experts ([E, 2I, ...], [E, D, ...]), as QuantExperts holds
    them (check `usable` on x with rows=MAX_ROWS and both codes first)."""
    N, D = x.shape
    E, I2 = gate_up[0].shape[:2]
    I = I2 // 2
    if down[0].shape[:2] != (E, D):
        raise ValueError(f"cpu_quant: down codes {tuple(down[0].shape)} for {E} experts of width {D}")
    G_gu, G_dn = _group(*gate_up, D), _group(*down, I)
    (gc, gs, gm), (dc, ds, dm) = [tuple(None if t is None else t.contiguous() for t in p) for p in (gate_up, down)]
    xc = x.contiguous()
    idx = idx.to(torch.int64).contiguous()
    wf = w.float().contiguous()
    if idx.shape != wf.shape or idx.shape[0] != N:
        raise ValueError(f"cpu_quant: idx {tuple(idx.shape)} and w {tuple(w.shape)} for {N} tokens")
    y = torch.empty(N, D, dtype=x.dtype)
    rc = library().nq_experts(
        xc.data_ptr(), N, D, idx.data_ptr(), wf.data_ptr(), idx.shape[1], E, I, gc.data_ptr(), gs.data_ptr(),
        None if gm is None else gm.data_ptr(), G_gu, dc.data_ptr(), ds.data_ptr(),
        None if dm is None else dm.data_ptr(), G_dn, y.data_ptr(), int(x.dtype == torch.bfloat16),
        int(_int8_activations), torch.get_num_threads())
    if rc == -2:
        raise MemoryError("cpu_quant: no memory for the experts' scratch")
    if rc != 0:
        raise ValueError(f"cpu_quant: an expert id outside [0, {E}) or a group size that does not divide its width")
    return y
