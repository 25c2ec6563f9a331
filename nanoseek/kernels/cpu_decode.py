"""Fused CPU decode kernels (`cpu_decode.c`): compiled with the machine's C compiler, once per model dtype (bf16,
float32), called via ctypes.

Decoding a token on a CPU is bound by reading the activated weights and by the fixed cost of each PyTorch op:
a layer issues ~100 small ops. These kernels cover a decode step in a few calls per layer: the MLA projections
(`mla_project`), absorbed attention (`mla_absorbed`), the feed-forward half of a block with its router and
experts (`ffn_block`), RMSNorm and plain matvecs; `ns_decode_stack` runs all the blocks of a step in one
call, DSA's selection past top-k included (`dsa_select`), for `decode_plan.py`. They serve bf16 and float32
inference calls with few rows (`MAX_ROWS`) and no autograd; everything else, and every machine where the library
cannot be built (no C compiler, no vector ISA of `isa.py`, NANOSEEK_CPU_KERNELS=0), takes the PyTorch path, which
is also the reference the tests compare against (`tests/test_cpu_decode.py`).

One C source, compiled per kernel variant (`isa.py`, `build.py`) into ~/.cache/nanoseek; each dtype loads the best
variant this CPU runs among `VARIANTS[dtype]` (NANOSEEK_KERNEL_ISA caps it), and `variant(dtype)` says which.
On load the library's name for its variant (`ns_isa`) must be the one asked for, and its structs' layouts must
match the ctypes mirrors (`abi.py`): a mismatch raises rather than run on misread arguments.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from nanoseek.kernels import abi, isa
from nanoseek.kernels.build import build

MAX_ROWS = 16  # calls with more rows of x (prefill) keep oneDNN's GEMMs
_SRC = Path(__file__).with_name("cpu_decode.c")
_BF16 = torch.bfloat16
DTYPES = (torch.bfloat16, torch.float32)  # one build of the library each (-DNS_F32: float32)
# The variants each build may load, best first. The bf16 build runs VDPBF16PS on AVX-512 BF16 and FMAs over the
# widened bf16 pairs elsewhere; the float32 build has no bf16 arithmetic, so AVX-512 BF16 machines run its avx512
# variant. (The scalar build, below every variant, serves the C self-test only: slower than PyTorch's kernels.)
VARIANTS = {torch.bfloat16: ("avx512bf16", "avx512", "avx2", "neon-bf16", "neon"),
            torch.float32: ("avx512", "avx2", "neon")}
_libs: dict = {}  # dtype -> the library every call of that dtype uses (the best variant), or None where unavailable
_variants: dict = {}  # dtype -> the variant of _libs[dtype], or None
_built: dict = {}  # (dtype, variant) -> its library, or None where it cannot be built or run here
_enabled = True
_local = threading.local()


def set_enabled(on: bool) -> bool:
    """Turn the kernels on or off for this process (off: every call takes the PyTorch reference path).
    Returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, on
    return prev


def mirrors() -> dict[str, type[ctypes.Structure]]:
    """The ctypes mirrors of the C structs the library takes by pointer (C name -> Structure)."""
    from nanoseek.kernels.decode_plan import _Block  # (here: decode_plan imports this module)
    return {"ns_block": _Block}


def _build(dtype: torch.dtype, variant: str) -> Optional[ctypes.CDLL]:
    lib = build(_SRC, variant, ("-DNS_F32",) if dtype == torch.float32 else ())
    if lib is None:
        return None
    what = f"{_SRC.name} ({variant}, {str(dtype).removeprefix('torch.')})"
    lib.ns_isa.restype = ctypes.c_char_p
    got = lib.ns_isa().decode()
    if got != variant:  # the flags of isa.py did not give the vector code simd.h expects of them
        raise RuntimeError(f"nanoseek: {what} was compiled for {variant} but its vector code is {got}")
    abi.check(lib, mirrors(), what)
    i64, p, nt = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ns_linear.argtypes = [p, i64, i64, p, i64, p, nt]
    lib.ns_mla_absorbed.argtypes = [p, i64, i64, i64, i64, i64, p, i64, i64, p, p, i64, nt, p, ctypes.c_float, p, p,
                                    p, p, p, p, i64, p, p, nt]
    lib.ns_mla_project.argtypes = [p, i64, i64, p, i64, i64, i64, i64, p, ctypes.c_float, p, i64, i64, p,
                                   ctypes.c_float, p, p, ctypes.c_float, p, p, p, ctypes.c_float, p, p, p, p, p, p, nt]
    lib.ns_ffn_block.argtypes = [p, i64, i64, p, ctypes.c_float, p, i64, p, nt, nt, i64, i64, i64, nt,
                                 ctypes.c_float, p, p, i64, p, p, i64, p, p, p, p, p, p, p, nt]
    lib.ns_rmsnorm.argtypes = [p, i64, i64, p, ctypes.c_float, p]
    lib.ns_dsa_select.argtypes = [p, p] + [i64] * 9 + [p] * 6 + [p, i64] + [p] * 6 + [nt]
    lib.ns_decode_stack.argtypes = [p, i64, p, i64, i64, i64, p, p, p, p, p, i64, p, p, i64, p, p, i64, p, i64, i64,
                                    nt, i64, p, p] + [p] * 22 + [p, p, p, p, ctypes.c_float, p, p, p, i64, i64, p, p, nt]
    lib.ns_decode_stack.restype = lib.ns_q8.restype = nt
    lib.ns_kv8_write.argtypes = [p, i64, i64, i64, nt, i64, i64, p, p, p]
    return lib


def library(dtype: torch.dtype = _BF16, variant: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """The kernels for models of this dtype (bf16 or float32), built on first use; None where they are
    unavailable. Without `variant`, the best of VARIANTS[dtype] this CPU runs (the library every call uses);
    with it, that variant's library (None where this CPU cannot run it), for tests and benches. Raises where a
    library does not match its Python side (`abi.AbiMismatch`)."""
    if variant is None:
        if dtype not in _libs:
            best = isa.best(VARIANTS[dtype]) if dtype in VARIANTS else None
            lib = library(dtype, best) if best is not None else None
            _libs[dtype], _variants[dtype] = lib, best if lib is not None else None
        return _libs[dtype]
    if variant not in isa.VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r} (isa.VARIANTS: {', '.join(isa.VARIANTS)})")
    if (dtype, variant) not in _built:
        lib = None
        if variant in VARIANTS.get(dtype, ()):
            try:
                lib = _build(dtype, variant)
            except OSError as e:  # unwritable cache, unloadable library: fall back to PyTorch
                warnings.warn(f"nanoseek: CPU decode kernels unavailable: {e}")
        _built[dtype, variant] = lib
    return _built[dtype, variant]


def variant(dtype: torch.dtype = _BF16) -> Optional[str]:
    """The variant of the library the calls of this dtype use (loading it if needed), or None without one."""
    library(dtype)
    return _variants.get(dtype)


def reset() -> None:
    """Forget which library each dtype uses, so that the next call chooses again (after NANOSEEK_KERNEL_ISA
    changes: the tests run every variant in turn). Built libraries stay loaded for reuse."""
    _libs.clear()
    _variants.clear()


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a call on x (rows flattened) with these weights can take the kernels: at most MAX_ROWS rows, and
    `available`. Called for every op of a decode step, so it is written for speed."""
    return x.numel() <= MAX_ROWS * x.shape[-1] and available(x, *weights)


def available(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernels can take x and these weights, whatever the number of rows: on, on the CPU, built for
    x's dtype, no autograd, the weights readable as they are."""
    if not _enabled or not x.is_cpu:
        return False
    lib = _libs[x.dtype] if x.dtype in _libs else library(x.dtype)
    if lib is None:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return kernel_weights(weights, x.dtype)


def kernel_weights(weights, dtype: torch.dtype) -> bool:
    """Whether the kernels of this dtype can read these tensors as they are: of it, on CPU, contiguous."""
    return all(w.dtype is dtype and w.is_cpu and w.is_contiguous() for w in weights)


def _scratch(*sizes: int) -> list[int]:
    """Addresses of scratch areas of these byte sizes (64-byte aligned), carved from a per-thread buffer reused
    by every call: the kernels are synchronous, so a call's scratch is free again when it returns, and a decode
    step saves a few dozen allocations."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 64) * 64
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < total + 64:
        buf = _local.buf = torch.empty(max(total + 64, 1 << 20), dtype=torch.uint8)
    base = -(-buf.data_ptr() // 64) * 64
    return [base + o for o in offsets]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ weight[O, D]^T -> [..., O] (check `usable` first, as for every call below)."""
    xf = x.reshape(-1, x.shape[-1]).contiguous()
    O = weight.shape[0]
    y = torch.empty(*x.shape[:-1], O, dtype=x.dtype)
    _libs[x.dtype].ns_linear(xf.data_ptr(), xf.shape[0], xf.shape[1], weight.data_ptr(), O, y.data_ptr(),
                             torch.get_num_threads())
    return y


MAX_LATENT = 1024  # the kernel keeps one head's latent query on the stack


def mla_absorbed(q: torch.Tensor, w_kvb: torch.Tensor, V: int, rows: torch.Tensor, mask: torch.Tensor,
                 scale: float, w_o: torch.Tensor, resid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Absorbed MLA attention and the output projection: q [B, T, H, N+P], w_kvb = kv_b_proj's weight
    [H*(N+V), R], rows [B, S, C] (shared by a request's queries) or [B, T, S, C] (per query), mask [B, T, S],
    w_o = o_proj's weight [Dm, H*V] -> [B, T, Dm] (plus the residual resid [B, T, Dm] when given)."""
    B, T, H, _ = q.shape
    R = w_kvb.shape[1]
    N = w_kvb.shape[0] // H - V
    S, C = rows.shape[-2], rows.shape[-1]
    q, rows = q.contiguous(), rows.contiguous()
    mask = mask.contiguous()  # bool: one byte of 0 or 1 per entry, as the kernel reads it
    assert mask.dtype == torch.bool
    Dm = w_o.shape[0]
    resid = resid.contiguous() if resid is not None else None  # (kept alive in a name through the call)
    y = torch.empty(B, T, Dm, dtype=q.dtype)
    w = q.element_size()
    out, qc, sc, ol, pb = _scratch(B * T * H * V * w, H * C * w, H * S * 4, H * R * 4, H * (S + 1) * w)
    _libs[q.dtype].ns_mla_absorbed(q.data_ptr(), B, T, H, N, C - R, w_kvb.data_ptr(), R, V, rows.data_ptr(), None,
                                   S, int(rows.dim() == 4), mask.data_ptr(), scale, out, qc, sc, ol, pb,
                                   w_o.data_ptr(), Dm, None if resid is None else resid.data_ptr(), y.data_ptr(),
                                   torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] with a weight [D] of its dtype (norm.py's roundings)."""
    xf = x.contiguous()
    y = torch.empty_like(xf)
    _libs[x.dtype].ns_rmsnorm(xf.data_ptr(), xf.numel() // xf.shape[-1], xf.shape[-1], weight.data_ptr(), eps,
                              y.data_ptr())
    return y


def dsa_select(indexer, cq: torch.Tensor, xn: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor,
               mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """DSA's selection at decode as the whole-stack kernel runs it (`Indexer.scores` + `select`): cq [B, T, q_lora],
    xn [B, T, D] (the attention's normed input), keys [B, S, Di], rows [B, S, C], mask [B, T, S], cos/sin
    [B, T, P/2] -> (scores [B, T, S] fp32, positions [B, T, K] in increasing order, their mask [B, T, K], their
    rows [B, T, K, C])."""
    B, T, Oq = cq.shape
    S, C, D, K = keys.shape[1], rows.shape[-1], xn.shape[-1], indexer.topk
    Hi, Di, P = indexer.n_heads, indexer.head_dim, indexer.rope_dim
    cq, xn, mask, cos, sin = cq.contiguous(), xn.contiguous(), mask.contiguous(), cos.contiguous(), sin.contiguous()
    keys, rows = keys.reshape(B * S, Di).contiguous(), rows.reshape(B * S, C).contiguous()
    read = torch.arange(B * S)  # request b's row s at slot b * S + s
    iq, iw = torch.empty(B * T, Hi * Di, dtype=cq.dtype), torch.empty(B * T, Hi)
    scores, order = torch.empty(B, T, S), torch.empty(B, T, S, dtype=torch.int64)
    sel_mask, sel = torch.empty(B, T, K, dtype=torch.bool), torch.empty(B, T, K, dtype=torch.int64)
    library(cq.dtype).ns_dsa_select(
        indexer.wq_b.weight.data_ptr(), indexer.weights_proj.weight.data_ptr(), Hi, Di, P, K, B, T, D, Oq, S,
        cq.data_ptr(), xn.data_ptr(), cos.data_ptr(), sin.data_ptr(), mask.data_ptr(), keys.data_ptr(),
        read.data_ptr(), 0, iq.data_ptr(), iw.data_ptr(), scores.data_ptr(), order.data_ptr(), sel_mask.data_ptr(),
        sel.data_ptr(), torch.get_num_threads())
    return scores, order[..., :K], sel_mask, rows[sel]  # the rows at the selected slots


_SCORING = {"sigmoid": 0, "softmax": 1}
_METHOD = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def mla_project(x: torch.Tensor, wx: torch.Tensor, q_out: int, R: int, P: int, qa_norm: Optional[torch.Tensor],
                eps_q: float, wqb: Optional[torch.Tensor], H: int, N: int, kv_norm: torch.Tensor, eps_kv: float,
                cos: torch.Tensor, sin: torch.Tensor, index_norm: Optional[torch.nn.LayerNorm] = None,
                in_norm: Optional[torch.Tensor] = None, in_eps: float = 0.0):
    """MLA's projections of x [B, T, D] (see the C source), after the RMSNorm of weight in_norm when given:
    returns the normed x (x itself without in_norm), q [B, T, H, N+P] (rotated), cq [B, T, q_lora] or None,
    cache rows [B, T, R+P], and with the indexer's key norm given its key [B, T, Di] (else None)."""
    B, T, D = x.shape
    x = x.contiguous()
    M, Ow = B * T, wx.shape[0]
    Di = Ow - q_out - R - P
    (xo,) = _scratch(M * Ow * x.element_size())
    cq = torch.empty(B, T, q_out, dtype=x.dtype) if qa_norm is not None else None
    q = torch.empty(B, T, H, N + P, dtype=x.dtype)
    rows = torch.empty(B, T, R + P, dtype=x.dtype)
    ik = torch.empty(B, T, Di, dtype=x.dtype) if Di else None
    xn = torch.empty_like(x) if in_norm is not None else x
    ik_args = (index_norm.weight.data_ptr(), index_norm.bias.data_ptr(), index_norm.eps) if Di else (None, None, 0.0)
    _libs[x.dtype].ns_mla_project(x.data_ptr(), M, D, wx.data_ptr(), q_out, R, P, Di,
                                  None if qa_norm is None else qa_norm.data_ptr(), eps_q,
                                  None if wqb is None else wqb.data_ptr(), H, N, kv_norm.data_ptr(), eps_kv, *ik_args,
                                  cos.data_ptr(), sin.data_ptr(), None if in_norm is None else in_norm.data_ptr(),
                                  in_eps, xn.data_ptr(), xo, None if cq is None else cq.data_ptr(), q.data_ptr(),
                                  rows.data_ptr(), None if ik is None else ik.data_ptr(), torch.get_num_threads())
    return xn, q, cq, rows, ik


def ffn_block(h: torch.Tensor, norm_w: torch.Tensor, eps: float, router=None, experts=None,
              shared: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """h + FFN(RMSNorm(h)) for h [B, T, D] (see the C source). router: (w32 [E, D], bias or None, scoring,
    method, n_group, topk_group, K, norm, scaling) and experts: (gate_up [E, 2I, D], down [E, D, I]) for a MoE
    layer; shared: (gate_up [2Is, D], down [D, Is]), the shared expert or the dense MLP. Returns the new h and
    the expert ids [N, K] (None without a router)."""
    shape = h.shape
    h = h.contiguous()
    N, D = h.numel() // shape[-1], shape[-1]
    E = router[0].shape[0] if router is not None else 0
    K = router[6] if router is not None else 0
    I = experts[1].shape[-1] if experts is not None else 0
    Is = shared[1].shape[-1] if shared is not None else 0
    Kp = max(K, 1)
    out = torch.empty_like(h)
    idx = torch.empty(N, Kp, dtype=torch.int64)
    w = h.element_size()
    xn, act, ys, rs, gw = _scratch(N * D * w, N * (Kp * I + Is) * w, N * (Kp + 1) * D * 4, N * 2 * max(E, 1) * 4,
                                   N * Kp * 4)
    if router is not None:
        w32, bias, scoring, method, n_group, topk_group, _, norm, scaling = router
        r_args = (w32.data_ptr(), E, None if bias is None else bias.data_ptr(), _SCORING[scoring], _METHOD[method],
                  n_group, topk_group, K, int(norm), scaling, experts[0].data_ptr(), experts[1].data_ptr(), I)
    else:
        r_args = (None, 0, None, 0, 0, 1, 1, 0, 0, 1.0, None, None, 0)
    s_args = (shared[0].data_ptr(), shared[1].data_ptr(), Is) if shared is not None else (None, None, 0)
    _libs[h.dtype].ns_ffn_block(h.data_ptr(), N, D, norm_w.data_ptr(), eps, *r_args, *s_args, out.data_ptr(), xn,
                                act, ys, rs, gw, idx.data_ptr(), torch.get_num_threads())
    return out.view(shape), (idx if router is not None else None)
