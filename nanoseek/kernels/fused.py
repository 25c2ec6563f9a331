"""Inference-time weight caches: tensors derived from parameters (concatenations, casts, per-expert views,
oneDNN-packed copies), built once and reused until a parameter changes.

Decoding one token on a CPU costs far more per PyTorch op than per byte of weights, so
- projections that read the same input run as ONE matmul over their concatenated weights (`fused_linear`);
  the parameters keep their own names and shapes, so checkpoints are unaffected;
- bf16 calls with a few rows (decode) go to the fused C kernels of `cpu_decode.py`, which read the weights as
  they are;
- otherwise, with weight packing on (`Transformer.pack_weights_`, the engine's default on CPU), matmuls run on
  copies of the weights pre-packed in oneDNN's blocked layout (`linear`). bf16: the plain `F.linear` re-packs its weight
  on every call, which costs about as much as a matvec itself (same kernel, bit-identical results, ~1.7x
  faster). fp32: oneDNN's packed GEMM runs ~2x faster than MKL's on prefill-sized inputs (same values up to the
  accumulation order), but slower on matvecs, so fp32 decode keeps the plain path. Twice the weight memory.

A cache entry is keyed on each source tensor's storage, version counter (bumped by every in-place update, e.g.
an optimizer step or a checkpoint load), dtype and device. Whenever autograd needs the separate parameters (grad
enabled and one requires grad) there is no cache and callers run their plain path, whose result is the same up
to the order of floating-point accumulation. Entries live in a weak registry beside the modules (never in their
state dict, never deep-copied).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels import cpu_decode

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def derived(owner: nn.Module, name: str, sources: Sequence[torch.Tensor], build: Callable):
    """build(*detached sources), cached for `owner` under `name`; None when autograd needs the sources or they
    are inference tensors (which keep no version counter, so a change could not be seen)."""
    if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
        return None
    if any(s.is_inference() for s in sources):
        return None
    key = tuple((s.data_ptr(), s._version, s.dtype, s.device) for s in sources)
    entries = _CACHE.setdefault(owner, {})
    hit = entries.get(name)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False):  # a normal tensor even when first built under inference_mode
            hit = entries[name] = (key, build(*(s.detach() for s in sources)))
    return hit[1]


def forget(model: nn.Module) -> None:
    """Drop the cached entries of `model`'s modules (rebuilt on their next use)."""
    for m in model.modules():
        _CACHE.pop(m, None)


def packing_supported() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


PACK_MIN_ROWS_FP32 = 16  # fp32: below this many input rows MKL's unpacked kernel is the faster one


def packs(owner: nn.Module, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `owner` runs x @ w^T on a packed weight: packing on, CPU, and bf16, or fp32 with enough rows."""
    if not owner.__dict__.get("_pack_weights", False) or x.device.type != "cpu" or x.dtype != w.dtype:
        return False
    if x.dtype == torch.bfloat16:
        return True
    return x.dtype == torch.float32 and x.numel() >= PACK_MIN_ROWS_FP32 * x.shape[-1]


def _pack(w: torch.Tensor) -> torch.Tensor:
    # the batch-size hint picks oneDNN's blocking: bf16 packs for decode (1 row), fp32 only serves prefill
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1 if w.dtype == torch.bfloat16 else 64)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def linear(owner: nn.Module, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (bias-free); through the CPU decode kernel for a few bf16 rows, or a packed copy of
    the weight when `owner` packs."""
    if cpu_decode.usable(x, weight):
        return cpu_decode.linear(x, weight)
    if packs(owner, x, weight):
        packed = derived(owner, name, [weight], _pack)
        if packed is not None:
            return _packed_linear(x, packed)
    return F.linear(x, weight)


def fused_linear(owner: nn.Module, name: str, x: torch.Tensor, linears: Sequence[nn.Linear]
                 ) -> tuple[torch.Tensor, ...]:
    """[linear(x) for linear in linears] (bias-free), as one matmul over the row-concatenated weights (cached
    for `owner` under `name`) when no gradient is needed."""
    weights = [m.weight for m in linears]
    sizes = [w.shape[0] for w in weights]
    if cpu_decode.usable(x, *weights):
        w = derived(owner, name, weights, lambda *ws: torch.cat(ws))
        if w is not None:
            return cpu_decode.linear(x, w).split(sizes, dim=-1)
    if packs(owner, x, weights[0]):
        packed = derived(owner, name + "_packed", weights, lambda *ws: _pack(torch.cat(ws)))
        if packed is not None:
            return _packed_linear(x, packed).split(sizes, dim=-1)
    w = derived(owner, name, weights, lambda *ws: torch.cat(ws))
    if w is None:
        return tuple(m(x) for m in linears)
    return F.linear(x, w).split(sizes, dim=-1)


def expert_weights(owner: nn.Module, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor):
    """Per-expert (gate_up [2I, D], down [D, I]) weights as two lists, cached (packed when `owner` packs), and the
    matmul to apply them with: the decode loop then issues no indexing ops."""
    if packs(owner, x, gate_up):
        packed = derived(owner, "_experts_packed", [gate_up, down],
                         lambda g, d: ([_pack(t) for t in g], [_pack(t) for t in d]))
        if packed is not None:
            return packed[0], packed[1], _packed_linear
    views = derived(owner, "_experts", [gate_up, down], lambda g, d: (g.unbind(0), d.unbind(0)))
    if views is None:
        views = (gate_up.unbind(0), down.unbind(0))
    return views[0], views[1], F.linear


def set_packing(module: nn.Module, on: bool) -> None:
    """Turn weight packing on or off for every submodule (and drop the packed copies when turning it off)."""
    for m in module.modules():
        m.__dict__["_pack_weights"] = on
        if not on and m in _CACHE:
            _CACHE[m] = {k: v for k, v in _CACHE[m].items() if "packed" not in k}
