"""DSA lightning indexer (DeepSeek-V3.2-Exp §2.1): picks, for each query, the top-k past tokens to attend.

    q^I = W^I_qb c_q                 [B, T, Hi, Di]  (c_q: MLA's normalised q latent)
    k^I = LayerNorm(W^I_k x)          [B, T, Di]      (one key head, cached for decode)
    w   = W^I_w x · Hi^-1/2           [B, T, Hi]
    I(t, s) = Σ_j w_t,j · ReLU(q^I_t,j · k^I_s · Di^-1/2)

RoPE is applied to the FIRST qk_rope_head_dim dims of q^I and k^I, half-split (not MLA's pair layout).
The main attention of token t then reads only the top-k positions by I(t, ·); with T <= k that is all of them.
Deployment tricks that do not change the result (Hadamard rotation, FP8 scoring) are left out.

Legend: B batch, T queries, S keys, Hi indexer heads, Di indexer head dim, K top-k.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.rope import RopeTables, apply_rope_halves


BLOCK_LOGITS = 1 << 21  # index logits computed at once when scoring many queries (`Indexer.scores`)


class Indexer(nn.Module):
    # under autocast the index scores (and so the KL the indexer trains on) are computed in fp32 (`scores`):
    # bf16 training keeps these weights fp32 (optim.py)
    fp32_weights = ("wq_b.weight", "weights_proj.weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        # HF names: self_attn.indexer.{wq_b, wk, k_norm, weights_proj}
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def key(self, x: torch.Tensor, rope: RopeTables, wk_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D] -> indexer keys [B, T, Di] (what the cache stores). wk_x: wk(x) if already computed
        (MLA fuses it with its own projections of x)."""
        k = self.k_norm(self.wk(x) if wk_x is None else wk_x)
        return apply_rope_halves(k, rope, tail=self.head_dim - self.rope_dim)

    def scores(self, x: torch.Tensor, cq: torch.Tensor, keys: torch.Tensor, rope: RopeTables,
               mask: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, T, S] in fp32, -inf where mask [B, T, S] is False.

        The two GEMMs run in the keys' dtype (fp32 models: exactly HF's arithmetic; bf16 models: bf16 with fp32
        accumulation, as DeepSeek itself runs this in FP8): converting all S cached keys to fp32 at every
        decode step would cost more than the scoring."""
        if torch.is_autocast_enabled(x.device.type):
            # training under autocast: score in true fp32 so the indexer's KL is computed on fp32 scores
            with torch.autocast(x.device.type, enabled=False):
                return self.scores(x.float(), cq.float(), keys.float(), rope, mask)
        B, T, _ = x.shape
        dt = keys.dtype
        q = apply_rope_halves(self.wq_b(cq).view(B, T, self.n_heads, self.head_dim), rope,
                              tail=self.head_dim - self.rope_dim)
        q = q.to(dt).reshape(B, T * self.n_heads, -1) * self.head_dim ** -0.5
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5  # [B, T, Hi]
        if T == 1:
            # decode: keys first, [B, S, Di] x [B, Di, Hi] -> [B, S, Hi], so the S cached keys are read in place
            # (keys^T as the right operand makes CPU bmm copy all of them: ~10 ms at 64K for V3.2's shape)
            logits = torch.matmul(keys, q.transpose(1, 2)).relu_()
            scores = torch.matmul(logits, w.to(dt).view(B, self.n_heads, 1)).view(B, 1, -1).float()
        else:
            # per row, blocks of n queries: [n*Hi, Di] x [Di, S] -> logits [n*Hi, S], summed over heads by w.
            # All of them at once would be B*T*Hi*S logits (32 MB in fp32 for `small` at 4 x 512 tokens, quadratic
            # in T); in blocks of at most BLOCK_LOGITS they stay in the last-level cache and the allocator reuses
            # the same memory (CPU, 4 x 512: the indexer's forward + backward in half the time)
            H, S = self.n_heads, keys.shape[1]
            n = max(1, BLOCK_LOGITS // (H * S))
            w = w.to(dt)
            rows = []
            for b in range(B):
                kt = keys[b].t()
                rows.append(torch.cat([
                    torch.bmm(w[b, t:t + n].unsqueeze(1), (q[b, t * H:(t + n) * H] @ kt).relu_().view(-1, H, S))
                    for t in range(0, T, n)]).view(T, S))
            scores = torch.stack(rows).float()
        return scores.masked_fill(~mask, float("-inf"))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k positions [B, T, K], K = min(index_topk, S). Masked positions only fill in when S < k."""
        return scores.topk(min(self.topk, scores.shape[-1]), dim=-1, sorted=False).indices
