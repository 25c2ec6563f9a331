"""Multi-token prediction module (DeepSeek-V3 §2.2).

Depth k combines the previous depth's hidden state h (the main model's for k = 1) at position i with the
embedding of token i+k:  h' = Block(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)])), then the SHARED output
head after its own norm (`shared_head.norm`) predicts token i+k+1. Embedding first, as inference engines and
DeepSeek's checkpoints lay out eh_proj. The embedding and head are the main model's (passed in), so the
checkpoint's per-module copies are not separate parameters here.

Legend: B batch, T tokens, D model width.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.layer_id = layer_id  # = num_hidden_layers + k: its cache layer and its HF layer index
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.head_norm = RMSNorm(d, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(self, h: torch.Tensor, emb_next: torch.Tensor, rope, cache=None, stats=None,
                mask=None) -> torch.Tensor:
        """h [B, T, D] previous depth's hidden, emb_next [B, T, D] embeddings of the shifted tokens, mask
        [B, T, T] the block's attention mask for packed rows (None: causal).

        Returns this depth's hidden state [B, T, D] (before head_norm; feed it to the next depth)."""
        # the block's residual stream in h's dtype, as the main blocks': fp32 under bf16 autocast, not the
        # projection's bf16 output
        x = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h)), dim=-1)).to(h.dtype)
        return self.block(x, rope, cache, stats=stats, mask=mask)
