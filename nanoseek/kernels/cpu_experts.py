"""Grouped expert GEMMs for CPU training (`cpu_experts.c`), bf16 and float32, as PyTorch custom ops with their
backward.

`expert_linear(x, w, ends)`: rows of x grouped by expert (group g owns rows [ends[g-1], ends[g])), each group times
its expert's weight in nn.Linear layout, `x_g @ w[g].T`; the routed experts' projections in `moe.Experts._grouped`
(DeepSeekMoE, DeepSeek-V3 report §2.1.2). Its backward runs the two other grouped GEMMs of the step (input and
weight gradients) in the same library. Opaque ops with shape functions, so torch.compile'd training steps call
them as they are.

Why not `torch._grouped_mm`: on CPU it makes one oneDNN call per group, each split across the threads, so at
~150 rows an expert (`small`, 1024 tokens) the threads synchronise after every small GEMM and the weights are
repacked per call (and its float32 path copies its operands); here each thread takes whole (expert, column block)
tasks, so the threads meet once per GEMM. Per core the two are on a par; `bench/train.py` measures the step.

The library is built for the best variant this CPU runs (`isa.best()`; NANOSEEK_KERNEL_ISA caps it), and every
variant has both dtypes: bf16 through the AVX-512 BF16 dot product (bit-identical to `_grouped_mm` on Zen 5) or,
elsewhere, widened to float32 FMAs. `torch._grouped_mm` stays the reference the tests compare against and the path
where the library cannot be built (no compiler, NANOSEEK_CPU_KERNELS=0) or the shapes do not fit (N, K multiples
of 16).
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Optional

import torch

from nanoseek.kernels import isa
from nanoseek.kernels.build import build

_SRC = Path(__file__).with_name("cpu_experts.c")
_DTYPES = (torch.bfloat16, torch.float32)
# Where training routes float32 expert GEMMs through these kernels: only the variants measured faster than
# torch._grouped_mm (oneDNN) on the training bench's shapes (figures in the issue notes: AVX2 Zen 3, AVX-512 Zen 4).
# The neon variants' float32 kernels are tested (tests/test_cpu_experts*.py) but not yet timed on ARM hardware, so
# float32 keeps _grouped_mm there. bf16 always takes the kernels: without a bf16 dot product _grouped_mm emulates bf16.
F32_ROUTED = ("avx2", "avx512", "avx512bf16")  # (avx512bf16: its float32 kernels are the avx512 ones)


def routed(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the experts' training path should take the kernels for these operands: `usable`, and for float32
    a variant in F32_ROUTED."""
    return usable(x, *weights) and (x.dtype == torch.bfloat16 or _variant in F32_ROUTED)
_lib: Optional[ctypes.CDLL] = None
_variant: Optional[str] = None
_loaded = False
_ready = False  # the library is loaded: what `usable` reads while torch.compile traces (it cannot build it)


def load(variant: Optional[str]) -> Optional[ctypes.CDLL]:
    """Build and load the kernels for `variant` (an `isa.VARIANTS` name, or None for none) and make them the ones
    the ops call; None where this machine cannot build or run that variant. Tests and benches use it to pick a
    variant; everything else gets `library()`'s choice."""
    global _lib, _variant, _loaded, _ready
    try:
        lib = build(_SRC, variant)
    except OSError as e:  # unwritable cache, unloadable library
        warnings.warn(f"nanoseek: CPU expert kernels unavailable: {e}")
        lib = None
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for fn in (lib.ne_fwd, lib.ne_dgrad, lib.ne_wgrad, lib.ne_fwd_f32, lib.ne_dgrad_f32, lib.ne_wgrad_f32):
            fn.argtypes = [p, p, p, i64, i64, i64, i64, p, ctypes.c_int]
            fn.restype = ctypes.c_int
        lib.ne_isa.restype = ctypes.c_char_p
    _lib, _variant, _loaded, _ready = lib, variant if lib is not None else None, True, lib is not None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The kernels, built on first use for the best variant this CPU runs (every variant has both dtypes:
    `cpu_experts.c`); None where this machine cannot run them."""
    if not _loaded:
        load(isa.best())
    return _lib


def variant() -> Optional[str]:
    """The variant of the loaded kernels (`isa.py` name), None without them."""
    library()
    return _variant


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether x [M, K] and expert weights [G, N, K'] (x's K for the first) can take the kernels: bf16 or float32,
    all of one dtype. Under torch.compile, only if the library was loaded before (`train.loss_function` loads
    it)."""
    ready = _ready if torch.compiler.is_compiling() else library() is not None
    return (ready and x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 2
            and all(w.device.type == "cpu" and w.dtype == x.dtype and w.dim() == 3
                    and w.shape[1] % 16 == 0 and w.shape[2] % 16 == 0 for w in weights)
            and x.shape[1] == weights[0].shape[2])


def _kernels() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("expert_linear: the CPU expert kernels are unavailable here (see `usable`)")
    return lib


def _call(name: str, a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, G: int, M: int, N: int, K: int,
          out: torch.Tensor, a_shape: tuple, b_shape: tuple) -> torch.Tensor:
    # the C code reads raw memory by these sizes: check them here
    if any(t.device.type != "cpu" for t in (a, b, ends)):
        raise ValueError("expert_linear: CPU tensors only")
    if (tuple(a.shape) != a_shape or tuple(b.shape) != b_shape or a.dtype not in _DTYPES or b.dtype != a.dtype
            or out.dtype != a.dtype):
        raise ValueError(f"expert_linear: operands {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}, "
                         f"expected {a_shape} and {b_shape}, both bf16 or both float32")
    if ends.dim() != 1 or ends.numel() != G:
        raise ValueError(f"expert_linear: ends must hold one row end per group ({G}), got {tuple(ends.shape)}")
    if N % 16 or K % 16:
        raise ValueError(f"expert_linear: N={N} and K={K} must be multiples of 16")
    a, b, ends = a.contiguous(), b.contiguous(), ends.to(torch.int32).contiguous()
    fn = getattr(_kernels(), name if a.dtype == torch.bfloat16 else name + "_f32")
    rc = fn(a.data_ptr(), b.data_ptr(), ends.data_ptr(), G, M, N, K, out.data_ptr(),
            torch.get_num_threads())
    if rc == -2:
        raise MemoryError("expert_linear: no memory for the packing scratch")
    if rc != 0:
        raise ValueError(f"expert_linear: group ends must rise from 0 to at most {M} rows")
    return out


@torch.library.custom_op("nanoseek::expert_linear", mutates_args=())
def expert_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[M, N]: rows of group g = x[rows] @ w[g].T (x [M, K], w [G, N, K], both bf16 or both float32, ends [G]);
    rows past the last group are zeros."""
    M, (G, N, K) = x.shape[0], w.shape
    return _call("ne_fwd", x, w, ends, G, M, N, K, x.new_empty(M, N), (M, K), (G, N, K))


@expert_linear.register_fake
def _(x, w, ends):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("nanoseek::expert_linear_dgrad", mutates_args=())
def expert_linear_dgrad(dy: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[M, K]: rows of group g = dy[rows] @ w[g] (dy [M, N])."""
    M, (G, N, K) = dy.shape[0], w.shape
    return _call("ne_dgrad", dy, w, ends, G, M, N, K, dy.new_empty(M, K), (M, N), (G, N, K))


@expert_linear_dgrad.register_fake
def _(dy, w, ends):
    return dy.new_empty(dy.shape[0], w.shape[2])


@torch.library.custom_op("nanoseek::expert_linear_wgrad", mutates_args=())
def expert_linear_wgrad(dy: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[G, N, K]: group g = dy[rows].T @ x[rows] (dy [M, N], x [M, K]); zeros for a group without rows."""
    (M, N), K, G = dy.shape, x.shape[1], ends.shape[0]
    return _call("ne_wgrad", dy, x, ends, G, M, N, K, dy.new_empty(G, N, K), (M, N), (M, K))


@expert_linear_wgrad.register_fake
def _(dy, x, ends):
    return dy.new_empty(ends.shape[0], dy.shape[1], x.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, w, ends = ctx.saved_tensors
    dy = dy.contiguous()
    dx = expert_linear_dgrad(dy, w, ends) if ctx.needs_input_grad[0] else None
    dw = expert_linear_wgrad(dy, x, ends) if ctx.needs_input_grad[1] else None
    return dx, dw, None


expert_linear.register_autograd(_backward, setup_context=_setup)
