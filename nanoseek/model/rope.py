"""Rotary position embedding with YaRN context extension (DeepSeek-V2 §2.1.3, V3 §4.3; Peng et al. 2023).

Two layouts are used in the V3.2 network:
- MLA's decoupled rope dims rotate ADJACENT pairs (2i, 2i+1), DeepSeek's native layout (`apply_rope_pairs`);
- the DSA indexer rotates its first `qk_rope_head_dim` dims as two halves (`apply_rope_halves`).
Both take cos/sin of shape [..., T, R/2] built by `RotaryEmbedding` from absolute positions.

Legend: B batch, T tokens, H heads, R rope dims.
"""
import math

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

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the frequencies: keep them fp32, only follow the device
        inv = self.inv_freq
        super()._apply(fn, recurse)
        new = self.inv_freq
        self.inv_freq = new.float() if inv.is_meta else inv.to(new.device, torch.float32)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, R/2] in float32."""
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, R] (or [B, T, R]) rotated pairwise; cos/sin [B, T, R/2]. Computed in fp32, cast back."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, R] or [B, T, R] rotated as (first half, second half) pairs, in x's dtype like HF."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    c = torch.cat((cos, cos), -1).to(x.dtype)
    s = torch.cat((sin, sin), -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), -1) * s
