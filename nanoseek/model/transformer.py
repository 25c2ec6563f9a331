"""The DeepSeek V2 / V3 / V3.2 decoder: embedding, pre-norm blocks (MLA + dense FFN or DeepSeekMoE), final norm,
output head, and the MTP modules.

`Transformer(cfg)(input_ids)` returns a `CausalLMOutput` with `.logits` [B, T, vocab] and `.hidden` [B, T, D]
(the final-normed hidden state, which the MTP modules consume). Pass `cache=` (a `LatentCache`) to run prefill or
decode steps against an external latent KV cache; positions and masks come from the cache. Pass `segment_ids=`
[B, T] to run rows that pack several documents (SFT): each run of equal ids is one document, attention is causal
inside it and blocked across (a block-diagonal mask), and RoPE positions restart at 0 with each run.

Parameter names follow Hugging Face's `model.` hierarchy minus the `model.` prefix (see `checkpoint.py`), so
the weights of a real checkpoint map 1:1 except for routed experts, which are stored fused here.

Legend: B batch, T tokens, D model width, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RopeTables, RotaryEmbedding
from nanoseek.model.stats import LayerStats


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, n, V] with num_logits=n)
    hidden: torch.Tensor  # [B, T, D] after the final norm
    stats: LayerStats = field(default_factory=LayerStats)  # expert ids, side losses (`stats.py`)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, cache=None, path="auto", stats: Optional[LayerStats] = None,
                mask: Optional[torch.Tensor] = None):
        h = x + self.self_attn(x, rope, cache, path, norm=self.input_layernorm, stats=stats, mask=mask)
        return h + self.mlp(self.post_attention_layernorm(h), stats)


def segment_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows: segment_ids [B, T] -> (positions [B, T] restarting at 0 with each run of equal ids, the
    attention mask [B, T, T]: key s visible to query t iff s <= t in the same run). Runs, not id values, delimit
    documents, so a repeated id further on is still a new document."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, 0).cummax(-1).values  # [B, T] where each token's run begins
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return idx - first, (first[:, :, None] == first[:, None, :]) & causal


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        L = cfg.num_hidden_layers
        # V3's MTP block is a MoE block (it is numbered after the last layer, which is MoE)
        self.mtp = nn.ModuleList(MTPModule(cfg, L + k, Block(cfg, L + k, cfg.is_moe_layer(L + k)))
                                 for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Random init: normal(0, initializer_range) for matrices (output projections scaled by depth as in
        GPT-2), ones for norms, zeros for biases and the balancing bias."""
        std = std or self.config.initializer_range
        depth_scale = 1 / math.sqrt(2 * max(1, self.config.num_hidden_layers))
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(p, 0.0, std * depth_scale)
            else:
                nn.init.normal_(p, 0.0, std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    # ---- pieces the engine and the trainer call ---------------------------------------------------------
    def positions_for(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        if cache is not None:
            return cache.positions
        B, T = input_ids.shape
        return torch.arange(T, device=input_ids.device).expand(B, -1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the head's logits for hidden [B, T, D] (final-normed) against targets [B, T] (-100:
        not a target): 'mean' over the targets or 'sum'. Training calls this rather than `head` + `cross_entropy`
        so that a fast path can skip the logits (`nanoseek/kernels/linear_ce.py`)."""
        return cross_entropy(self.head(hidden), targets, reduction=reduction)

    def rope_for(self, positions: torch.Tensor, cache) -> RopeTables:
        """The rotation tables of a call, shared by all layers; with a cache (inference) read from the angles
        computed once per position (the cache's mask bounds the positions without a device sync)."""
        return self.rotary(positions) if cache is None else self.rotary.lookup(positions, cache.mask.shape[-1])

    def forward(self, input_ids: torch.Tensor, cache=None, num_logits: Optional[int] = None,
                path: str = "auto", segment_ids: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V] (only the last num_logits positions if given), the final hidden
        state and the layers' stats. segment_ids [B, T]: packed documents (`segment_layout`; no cache)."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        x = self.embed_tokens(input_ids)
        mask = None
        if segment_ids is None:
            positions = self.positions_for(input_ids, cache)
        elif cache is not None:
            raise ValueError("segment_ids (packed documents) run without a cache")
        else:
            positions, mask = segment_layout(segment_ids)
        rope = self.rope_for(positions, cache)
        stats = LayerStats()
        for layer in self.layers:
            x = layer(x, rope, cache, path, stats, mask)
        h = self.norm(x)
        hl = h if num_logits is None else h[:, h.shape[1] - num_logits:]  # 0: none (the trainer's head_loss)
        return CausalLMOutput(logits=self.head(hl), hidden=h, stats=stats)

    def mtp_forward(self, k: int, hidden: torch.Tensor, next_ids: torch.Tensor, cache=None,
                    positions: Optional[torch.Tensor] = None, stats: Optional[LayerStats] = None,
                    segment_ids: Optional[torch.Tensor] = None, logits: bool = True):
        """Run MTP depth k (0-based) on hidden [B, T, D] and the tokens one step ahead next_ids [B, T]; its MoE
        layer reports into `stats` when given (training: the main forward's). segment_ids [B, T]: those of
        `hidden`'s positions in a packed row (its attention and positions, as in `forward`).

        Returns (logits [B, T, V] for the tokens two steps ahead of `hidden`'s positions, new hidden [B, T, D]);
        logits=False: the head's input (the depth's final-normed hidden) in place of the logits, for `head_loss`.
        """
        mask = None
        if segment_ids is not None:
            positions, mask = segment_layout(segment_ids)
        if positions is None:
            rope = self.rope_for(self.positions_for(next_ids, cache), cache)
        else:
            rope = self.rotary(positions)
        m = self.mtp[k]
        h = m(hidden, self.embed_tokens(next_ids), rope, cache, stats, mask)
        normed = m.head_norm(h)
        return (self.head(normed) if logits else normed), h

    def set_expert_impl(self, impl: str) -> None:
        """'grouped' (default, fast) or 'loop' (per-expert reference)."""
        for m in self.modules():
            if hasattr(m, "impl") and hasattr(m, "gate_up_proj"):
                m.impl = impl

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # What transformers users type; the work is nanoseek/checkpoint.py's (imported here, not at the top: it
    # imports this file).
    def save_pretrained(self, path, dtype=None, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
        """Write a Hugging Face folder (config.json + safetensors in HF names): `nanoseek.save_pretrained`."""
        from nanoseek.checkpoint import save_pretrained
        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", strict_mtp: bool = False) -> "Transformer":
        """Load a Hugging Face DeepSeek folder: `nanoseek.from_pretrained`."""
        from nanoseek.checkpoint import from_pretrained
        return from_pretrained(path, dtype=dtype, device=device, strict_mtp=strict_mtp)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32 ('mean' or 'sum' over the targets). logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
