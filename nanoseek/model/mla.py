"""Multi-head latent attention (DeepSeek-V2 §2.1) with the V3.2 sparse-attention hook (V3.2-Exp §2.1).

Two ways to compute the same attention:
- naive (training, prefill): expand the cached latent c_kv into per-head k_nope and v with W_kvb, then ordinary
  attention (SDPA) over [k_nope ; k_pe];
- absorbed (decode): fold W_UK into the query and W_UV after the weighted sum, so attention runs directly over
  the cached rows [c_kv ; k_pe] (width C = 576 for V3), never materialising per-head keys.
`tests/test_mla.py` checks that the two agree.

On DSA layers the lightning indexer (`dsa.py`) picks top-k positions per query; prefill masks the rest, decode
gathers only those K latent rows from the cache (O(K) work). The indexer's training loss (KL to the main
attention distribution) is computed here because it needs the attention probabilities.

Legend: B batch, T queries, S keys, H heads, D model width, R kv_lora_rank, P qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim, C = R + P, K top-k.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.dsa import Indexer
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RopeTables, apply_rope_pairs
from nanoseek.model.stats import LayerStats

# "auto" path: absorbed when a cached call has at most this many new tokens per request (decode steps, MTP
# verification, short prompts after a cached prefix); longer prefills take the naive path
ABSORB_MAX_QUERIES = 16


def _explicit_is_faster(q: torch.Tensor, S: int) -> bool:
    """Training on CPU under torch.compile, short rows: softmax(q k^T) v written out, which inductor fuses, runs
    forward + backward 2x faster than CPU flash attention at 256 tokens (`small`'s 6 heads, bf16: 5.6 against
    10.6 ms a layer), as fast at 512 and slower past it. It keeps the [B, H, T, S] probabilities for backward,
    so it is also limited to 2^25 of them (128 MB in fp32) per layer."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and T <= 512 and B * H * T * S <= 1 << 25 and torch.is_grad_enabled()
            and torch.compiler.is_compiling())


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.num_attention_heads
        self.R, self.P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.N, self.V = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale()
        H, qk = self.n_heads, cfg.qk_head_dim
        # HF names: self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa, kv_a_layernorm,
        # kv_b_proj, o_proj}
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.R + self.P, bias=False)
        self.kv_a_layernorm = RMSNorm(self.R, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.R, H * (self.N + self.V), bias=False)
        self.o_proj = nn.Linear(H * self.V, cfg.hidden_size, bias=False)
        self.indexer = Indexer(cfg) if cfg.use_dsa else None
        # DSA training switches (set by nanoseek.train): "sparse" = top-k attention (inference default),
        # "dense" = full attention (dense warm-up stage). indexer_loss_on: report the indexer's KL loss (and its
        # top-k recall) into the forward's LayerStats.
        self.dsa_mode = "sparse"
        self.indexer_loss_on = False

    # ---- projections -----------------------------------------------------------------------------------
    def _project(self, x):
        """x [B, T, D] -> q [B, T, H, N+P] (rope not yet applied), c_q [B, T, q_lora] or None, the raw
        kv_a_proj_with_mqa output [B, T, R+P], and the indexer's wk(x) [B, T, Di] (None without DSA)."""
        B, T, _ = x.shape
        if hasattr(self, "q_a_proj"):
            cq = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(cq)
        else:
            cq, q = None, self.q_proj(x)
        wk_x = self.indexer.wk(x) if self.indexer is not None else None
        return q.view(B, T, self.n_heads, -1), cq, self.kv_a_proj_with_mqa(x), wk_x

    def _project_rotated(self, x, rope: RopeTables, norm: Optional[RMSNorm] = None):
        """x [B, T, D] -> (x after `norm` if given, q [B, T, H, N+P] with its rope dims rotated, c_q or None, the
        new cache rows [B, T, C], the indexer's key [B, T, Di] or None): norm + `_project` + rope + `_latent` +
        `Indexer.key`."""
        if norm is not None:
            x = norm(x)
        q, cq, kv, wk_x = self._project(x)
        q = apply_rope_pairs(q, rope, lead=self.N)  # only the last P dims of each head rotate
        index_k = self.indexer.key(x, rope, wk_x) if self.indexer is not None else None
        return x, q, cq, self._latent(kv, rope), index_k

    def _latent(self, kv, rope: RopeTables):
        """kv_a_proj_with_mqa output [B, T, R+P] -> cache rows [B, T, C] = [RMSNorm(c_kv) ; rope(k_pe)]."""
        c, k_pe = kv.split([self.R, self.P], dim=-1)
        return torch.cat((self.kv_a_layernorm(c), apply_rope_pairs(k_pe, rope)), dim=-1)

    def _absorb_weights(self):
        """W_UK [H, N, R] and W_UV [H, V, R]: views of kv_b_proj's weight (DeepSeek-V2 §2.1.2: W_UK folds into the
        query, W_UV into the output)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.N + self.V, self.R)
        return w[:, : self.N], w[:, self.N:]

    # ---- the two attention paths -------------------------------------------------------------------------
    def naive(self, q, rows, mask, need_probs=False, causal_rows=0):
        """q [B, T, H, N+P] (rotated), rows [B, S, C], mask [B, T, S] bool or None (= causal, S == T).
        causal_rows: the mask's first rows are plain causal over S == T keys (uncached DSA prefill), so they
        can use SDPA's causal kernel and only the rest the masked one.

        Returns out [B, T, H, V] and, if need_probs, the attention probabilities [B, H, T, S] in fp32.
        """
        B, S, _ = rows.shape
        H = self.n_heads
        c, k_pe = rows.split([self.R, self.P], dim=-1)
        k_nope, v = self.kv_b_proj(c).view(B, S, H, -1).split([self.N, self.V], -1)
        q = q.transpose(1, 2)  # [B, H, T, N+P]
        k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, H, -1)), -1).transpose(1, 2)
        v = v.transpose(1, 2)
        causal = mask is None
        explicit = need_probs or _explicit_is_faster(q, S)
        if causal and explicit:
            T = q.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None]
        if explicit:
            # the mask as an additive bias [B, 1, T, S] and the scale in the same add: one pass over the
            # [B, H, T, S] scores forward and one backward (eager DSA stages; inductor fuses either way)
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill_(~mask, float("-inf"))
            scores = torch.add(bias[:, None], torch.matmul(q, k.transpose(-1, -2)).float(), alpha=self.scale)
            probs = scores.softmax(-1)
            out = torch.matmul(probs.to(v.dtype), v)
            return out.transpose(1, 2), (probs if need_probs else None)
        # CPU flash attention is ~2x slower when v's head dim differs from q/k's: pad v, slice the output
        pad = q.shape[-1] - self.V
        if pad > 0:
            v = F.pad(v, (0, pad))
        if causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        elif causal_rows:
            r = causal_rows
            top = F.scaled_dot_product_attention(q[:, :, :r], k[:, :, :r], v[:, :, :r], is_causal=True,
                                                 scale=self.scale)
            rest = F.scaled_dot_product_attention(q[:, :, r:], k, v, attn_mask=mask[:, None, r:], scale=self.scale)
            out = torch.cat((top, rest), dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
        return out[..., : self.V].transpose(1, 2), None

    def _absorbed_out(self, q, rows, mask):
        """o_proj(absorbed(q, rows, mask)) [B, T, D]."""
        return self.o_proj(self.absorbed(q, rows, mask).flatten(2))

    def absorbed(self, q, rows, mask):
        """Attention over latent rows. q [B, T, H, N+P] (rotated); rows [B, S, C] with mask [B, T, S], or rows
        [B, T, K, C] gathered per query (DSA decode) with mask [B, T, K]. Returns out [B, T, H, V]."""
        w_uk, w_uv = self._absorb_weights()
        B, T, H, _ = q.shape
        q_nope, q_pe = q.split([self.N, self.P], dim=-1)
        # per-head q_nope W_UK as one batched matmul over heads: [H, B*T, N] x [H, N, R] (einsum adds permutes)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, self.N).transpose(0, 1).to(w_uk.dtype), w_uk)
        qc = torch.cat((q_lat.transpose(0, 1).view(B, T, H, self.R).to(q.dtype), q_pe), -1)  # [B, T, H, C]
        if rows.dim() == 3:  # shared rows: one matmul over all (query, head) pairs
            scores = torch.matmul(qc.view(B, T * H, -1), rows.transpose(1, 2)).view(B, T, H, -1)
        else:  # per-query selected rows [B, T, K, C]
            scores = torch.matmul(qc, rows.transpose(-1, -2))  # [B, T, H, K]
        scores = torch.where(mask[:, :, None], scores.float() * self.scale, float("-inf"))
        probs = scores.softmax(-1).to(qc.dtype)
        # weight the whole rows and drop the k_pe part afterwards: slicing rows[..., :R] first would copy S x R
        if rows.dim() == 3:
            o_lat = torch.matmul(probs.view(B, T * H, -1), rows)  # [B, T*H, C]
        else:
            o_lat = torch.matmul(probs, rows)  # [B, T, H, C]
        o_lat = o_lat.reshape(B * T, H, -1)[..., : self.R].transpose(0, 1)  # [H, B*T, R]
        out = torch.bmm(o_lat.to(w_uv.dtype), w_uv.transpose(1, 2))  # [H, B*T, V]
        return out.transpose(0, 1).reshape(B, T, H, self.V).to(q.dtype)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, rope: RopeTables, cache=None, path: str = "auto",
                norm: Optional[RMSNorm] = None, stats: Optional[LayerStats] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. x is the block's input_layernorm'ed input, or its raw input with that
        `norm` given (then applied before the projections). path: auto | naive | absorbed. mask [B, T, T] bool:
        the keys each query sees in a row of packed documents (no cache; None = causal)."""
        B, T, _ = x.shape
        x, q, cq, new_rows, index_k = self._project_rotated(x, rope, norm)
        if cache is not None:
            cache.write(self.layer_id, new_rows, index_k)
            # rows are read below only where needed: DSA decode gathers its K rows itself (O(K), not O(S))
            rows, mask = None, cache.mask
        else:
            rows = new_rows
        if path == "auto":
            path = "absorbed" if cache is not None and T <= ABSORB_MAX_QUERIES else "naive"

        if self.indexer is not None and (self.dsa_mode == "sparse" or self.indexer_loss_on):
            return self._forward_dsa(x, cq, q, rows, mask, index_k, rope, cache, path, stats)
        if rows is None:
            rows = cache.read(self.layer_id)
        if path == "absorbed":
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None].expand(B, -1, -1)
            return self._absorbed_out(q, rows, mask)
        out, _ = self.naive(q, rows, mask)
        return self.o_proj(out.flatten(2))

    def _forward_dsa(self, x, cq, q, rows, mask, index_k, rope, cache, path, stats):
        B, T, _ = x.shape
        S = rows.shape[1] if rows is not None else mask.shape[-1]
        plain = mask is None  # plain causal self-attention (no cache, no packed documents)
        if plain:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None].expand(B, -1, -1)
        keys = cache.read_index_keys(self.layer_id) if cache is not None else index_k
        if not self.indexer_loss_on:
            return self._forward_sparse(x, cq, q, rows, mask, keys, rope, cache, path, plain)
        # Training with the indexer's KL loss (V3.2-Exp §2.1): explicit attention, since the KL needs its
        # probabilities. Sparse stage: the indexer learns only from its KL, so its inputs are cut from the graph.
        if self.dsa_mode == "sparse":
            keys = self.indexer.key(x.detach(), rope) if cache is None else keys.detach()
            scores = self.indexer.scores(x.detach(), cq.detach(), keys, rope, mask)
        else:
            scores = self.indexer.scores(x, cq, keys, rope, mask)
        sparse = self.dsa_mode == "sparse" and self.indexer.topk < S
        idx = self.indexer.select(scores) if sparse else None
        if rows is None:
            rows = cache.read(self.layer_id)
        attn_mask = mask if idx is None else self._selected_mask(mask, idx)
        out, probs = self.naive(q, rows, attn_mask, need_probs=True)
        if stats is not None:
            stats.indexer_losses.append(self._indexer_kl(probs, scores, attn_mask))
            stats.indexer_recalls.append(self._indexer_recall(probs, scores, idx))
        return self.o_proj(out.flatten(2))

    def _forward_sparse(self, x, cq, q, rows, mask, keys, rope, cache, path, plain):
        """Inference-time DSA. Queries that see at most k positions attend to all of them, so the indexer
        scores and selects only from the first query that sees more (rows r0: of this call). plain: the mask is
        plain causal (no cache, no packed documents)."""
        B, T, _ = x.shape
        k = self.indexer.topk
        first_over = None  # the first query that sees more than k rows
        if cache is None:  # query t sees at most t + 1 rows (exactly that many unless documents are packed)
            first_over = k if T > k else None
        elif mask.shape[-1] > k:  # (no query sees more than S rows: S <= k says "dense" without a host sync)
            over = (mask.sum(-1) > k).any(0).nonzero()  # visible rows grow with t inside a call (causal)
            first_over = int(over[0]) if over.numel() else None
        if first_over is None:
            if rows is None:
                rows = cache.read(self.layer_id)
            if path == "absorbed":
                return self._absorbed_out(q, rows, mask)
            # a plain causal mask: let SDPA use its causal kernel
            out = self.naive(q, rows, None if plain else mask)[0]
            return self.o_proj(out.flatten(2))
        r0 = 0 if path == "absorbed" else first_over  # absorbed (decode) calls are short: score them all
        with torch.no_grad():
            scores = self.indexer.scores(x[:, r0:], cq[:, r0:], keys, rope[r0:], mask[:, r0:])
            idx = self.indexer.select(scores)  # [B, T - r0, K]
        if path == "absorbed":
            sel_rows = cache.gather(self.layer_id, idx) if cache is not None else self._gather(rows, idx)
            return self._absorbed_out(q, sel_rows, torch.gather(mask, -1, idx))
        if rows is None:
            rows = cache.read(self.layer_id)
        attn_mask = torch.cat((mask[:, :r0], self._selected_mask(mask[:, r0:], idx)), dim=1)
        out = self.naive(q, rows, attn_mask, causal_rows=r0 if plain else 0)[0]
        return self.o_proj(out.flatten(2))

    @staticmethod
    def _selected_mask(mask, idx):
        sel = torch.zeros_like(mask).scatter_(-1, idx, True)
        return mask & sel

    @staticmethod
    def _gather(rows, idx):
        B, T, K = idx.shape
        flat = idx.reshape(B, T * K, 1).expand(-1, -1, rows.shape[-1])
        return torch.gather(rows, 1, flat).view(B, T, K, -1)

    def _indexer_kl(self, probs, scores, attn_mask) -> torch.Tensor:
        """KL(main attention summed over heads, L1-normalised || softmax(index scores)) over attn_mask."""
        target = self._attention_target(probs)
        logp = scores.masked_fill(~attn_mask, float("-inf")).log_softmax(-1)
        kl = torch.where(attn_mask & (target > 0), target * (target.clamp_min(1e-12).log() - logp),
                         torch.zeros_like(target))
        return kl.sum(-1).mean()

    def _indexer_recall(self, probs, scores, idx=None) -> torch.Tensor:
        """The share of the attention mass on the indexer's top-k positions (a diagnostic, no gradient); idx: those
        positions [B, T, K] if already selected."""
        with torch.no_grad():
            if idx is None:
                idx = scores.topk(min(self.indexer.topk, scores.shape[-1]), dim=-1).indices
            return torch.gather(self._attention_target(probs), -1, idx).sum(-1).mean()

    @staticmethod
    def _attention_target(probs) -> torch.Tensor:
        target = probs.detach().sum(1)  # [B, T, S]
        return target / target.sum(-1, keepdim=True).clamp_min(1e-12)
