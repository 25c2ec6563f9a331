"""Rotary position embedding with YaRN context extension (DeepSeek-V2 §2.1.3, V3 §4.3; Peng et al. 2023).

Two layouts are used in the V3.2 network:
- MLA's decoupled rope dims rotate ADJACENT pairs (2i, 2i+1), DeepSeek's native layout (`apply_rope_pairs`);
- the DSA indexer rotates its first `qk_rope_head_dim` dims as two halves (`apply_rope_halves`).
Both take the `RopeTables` that `RotaryEmbedding` builds once per forward from absolute positions.

Legend: B batch, T tokens, H heads, R rope dims.
"""
import math
from typing import Optional

import torch
from torch import nn

from nanoseek.config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin attention factor, matching HF `_compute_yarn_parameters`."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extra = 1.0 / pos
    if cfg.rope_type != "yarn":
        return inv_extra, 1.0
    f = cfg.rope_factor
    inv_inter = 1.0 / (f * pos)

    def corr_dim(n_rot: float) -> float:  # dimension whose wavelength completes n_rot turns over the window
        return dim * math.log(cfg.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp = 0 on high-frequency dims (kept as is: extrapolate), 1 on low-frequency dims (interpolated by f)
    inv = inv_inter * ramp + inv_extra * (1 - ramp)
    if cfg.mscale and cfg.mscale_all_dim:
        attn_factor = yarn_mscale(f, cfg.mscale) / yarn_mscale(f, cfg.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(f)
    return inv, attn_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv, self.attn_factor = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)
        R = cfg.qk_rope_head_dim
        # index permutations that pair each rotated dim with its partner (see `RopeTables`)
        pair_swap = torch.arange(R).view(-1, 2).flip(-1).reshape(-1)
        half_swap = torch.arange(R).roll(R // 2)
        self.register_buffer("pair_swap", pair_swap, persistent=False)
        self.register_buffer("half_swap", half_swap, persistent=False)
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # `cached`: every position's angles

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the frequencies: keep them fp32, only follow the device
        inv = self.inv_freq
        super()._apply(fn, recurse)
        new = self.inv_freq
        self.inv_freq = new.float() if inv.is_meta else inv.to(new.device, torch.float32)
        self._cache = None
        return self

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., R/2] in float32 (scaled by YaRN's attention factor)."""
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor

    def forward(self, positions: torch.Tensor) -> "RopeTables":
        """positions [B, T] -> the rotation tables of these positions (cos, sin [B, T, R/2] in float32)."""
        return RopeTables(*self.angles(positions), self.pair_swap, self.half_swap)

    def cached(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, R/2] of positions 0 .. n-1 for some n >= length, computed once (grown by doubling): the
        same values as `angles` of each position alone."""
        c = self._cache
        if c is None or c[0].shape[0] < length:
            n = max(1024, 1 << (length - 1).bit_length())
            c = self._cache = self.angles(torch.arange(n, device=self.inv_freq.device))
        return c

    def lookup(self, positions: torch.Tensor, length: int) -> "RopeTables":
        """Inference: the tables of positions [B, T] (all < length, a host-side bound, so no device sync) read
        from `cached`: a decode step computes no angles (six small ops a step, ~10 us on CPU)."""
        cos, sin = self.cached(length)
        return RopeTables(cos[positions], sin[positions], self.pair_swap, self.half_swap)


class RopeTables:
    """cos/sin of one forward call's positions, laid out once for every rotation the layers do.

    A rotation of pairs (a, b) -> (a cos - b sin, b cos + a sin) is written as  x * C + x[swap] * S  with
    C = (cos, cos) and S = (-sin, +sin) on each pair's two dims and `swap` exchanging the partners: two multiplies
    and an add per call instead of unbinding, rotating and re-stacking the halves (the decode step is bound by
    the number of small ops, and every layer rotates three times). Identity columns (C = 1, S = 0, swap = self)
    extend a table over dims that are not rotated, so a whole query head rotates without split and cat; both
    are exact: x * 1 + x' * 0 == x.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, pair_swap: torch.Tensor, half_swap: torch.Tensor):
        self.cos, self.sin = cos, sin  # [B, T, R/2] fp32
        self.pair_swap, self.half_swap = pair_swap, half_swap
        self._tables: dict = {}

    def __getitem__(self, rows: slice) -> "RopeTables":
        """The tables of query rows `rows` (a slice over T)."""
        return RopeTables(self.cos[:, rows], self.sin[:, rows], self.pair_swap, self.half_swap)

    def table(self, layout: str, lead: int, tail: int, dtype: torch.dtype, heads: bool):
        """(C, S, swap) over lead identity dims + the R rotated dims + tail identity dims, C/S [B, T, width]
        ([B, T, 1, width] with heads, to broadcast over x [B, T, H, width]).
        layout: "pairs" (adjacent dims 2i, 2i+1; MLA) or "halves" (i, i + R/2; the DSA indexer)."""
        key = (layout, lead, tail, dtype, heads)
        if key not in self._tables:
            cos, sin = self.cos, self.sin
            if layout == "pairs":
                c = torch.stack((cos, cos), -1).flatten(-2)
                s = torch.stack((-sin, sin), -1).flatten(-2)
                swap = self.pair_swap
            else:
                c, s, swap = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1), self.half_swap
            if lead or tail:
                B, T, R = c.shape
                one = c.new_ones(B, T, lead + R + tail)
                one[..., lead:lead + R] = c
                zero = s.new_zeros(B, T, lead + R + tail)
                zero[..., lead:lead + R] = s
                c, s = one, zero
                swap = torch.cat((torch.arange(lead, device=swap.device), swap + lead,
                                  torch.arange(lead + R, lead + R + tail, device=swap.device)))
            c, s = c.to(dtype), s.to(dtype)
            self._tables[key] = (c[:, :, None], s[:, :, None], swap) if heads else (c, s, swap)
        return self._tables[key]


class _Swap(torch.autograd.Function):
    """x.index_select(-1, swap) for a swap that is its own inverse (it exchanges partners): the gradient is the
    same gather, where autograd would scatter-add (compiled on CPU: atomic adds, ~1 ms a layer of training)."""

    @staticmethod
    def forward(ctx, x, swap):
        ctx.save_for_backward(swap)
        return x.index_select(-1, swap)

    @staticmethod
    def backward(ctx, g):
        (swap,) = ctx.saved_tensors
        return g.index_select(-1, swap), None


def _swapped(x: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _Swap.apply(x, swap)
    return x.index_select(-1, swap)


def apply_rope_pairs(x: torch.Tensor, rope: RopeTables, lead: int = 0) -> torch.Tensor:
    """x [B, T, H, lead + R] (or [B, T, lead + R]): the last R dims rotated pairwise (DeepSeek's layout), the
    first `lead` left as they are. Computed in fp32, cast back, as DeepSeek's reference does."""
    c, s, swap = rope.table("pairs", lead, 0, torch.float32, x.dim() == 4)
    xf = x.float()
    return (xf * c + _swapped(xf, swap) * s).to(x.dtype)


def apply_rope_halves(x: torch.Tensor, rope: RopeTables, tail: int = 0) -> torch.Tensor:
    """x [B, T, H, R + tail] or [B, T, R + tail]: the first R dims rotated as (first half, second half) pairs,
    the last `tail` left as they are; in x's dtype like HF."""
    c, s, swap = rope.table("halves", 0, tail, x.dtype, x.dim() == 4)
    return x * c + _swapped(x, swap) * s
