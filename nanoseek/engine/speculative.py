"""MTP speculative decoding (DeepSeek-V3 §2.2 "MTP in inference"; Leviathan et al. 2023, Chen et al. 2023).

Drafting. MTP depth k at position i reads the previous depth's hidden state at i and the embedding of the token
at i+1, and predicts the token at i+2; its cache rows live in layer num_hidden_layers + k. After the main model
has fed positions up to n-1 and the next token t_n is known, one MTP pass over the newly fed positions (hidden
h_i with token t_{i+1}) writes their rows and yields draft d_1 from the last one. Further drafts run the MTP
modules recursively one token at a time (module min(j, depth-1), its own previous output as the hidden state),
like vLLM with more drafts than MTP layers. Those extra rows are provisional: the next pass overwrites them.

Verification (in engine.py): the main model feeds [t_n, d_1, ..., d_k] in one call; at each position the
request's own sampler draws a token from the target distribution and the draft is accepted while they agree.
Drafts are greedy (a point mass), for which accept-iff-equal is exactly the rejection rule of speculative
sampling, so every emitted token is a sample of the target model: greedy output is identical to plain decoding,
and a seeded sampler consumes one draw per emitted token as without speculation. Rows of rejected drafts are
simply forgotten (num_computed rolls back; the next write overwrites them).

Legend: B batch, T positions per request (padded), D model width.
"""
from __future__ import annotations

import torch

from nanoseek.engine.cache import CacheView


class MTPDrafter:
    def __init__(self, model, pool, num_draft: int, max_model_len: int):
        if model.config.num_nextn_predict_layers < 1:
            raise ValueError("speculative='mtp' needs a model with MTP layers (num_nextn_predict_layers >= 1)")
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.model, self.pool = model, pool
        self.num_draft, self.max_model_len = num_draft, max_model_len
        self.depth = model.config.num_nextn_predict_layers

    def _budget(self, req) -> int:
        """Drafts worth proposing: bounded by tokens left, context left and the rows already allocated."""
        left = req.max_tokens - req.num_generated - 1
        ctx = self.max_model_len - req.num_computed - 1
        rows = len(req.table) * self.pool.block_size - req.num_computed + 1  # recursion writes up to n+k-2
        return max(0, min(self.num_draft, left, ctx, rows))

    @torch.no_grad()
    def propose(self, reqs, hidden: torch.Tensor, num_new: list[int]) -> None:
        """Set req.drafts for each request. hidden [B, T, D]: the main model's final hidden states of the
        num_new[b] positions each request just fed (ending at num_computed - 1); the tokens that follow them are
        the request's tokens (the last one just sampled)."""
        dev = hidden.device
        B, T = len(reqs), max(num_new)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, (r, n) in enumerate(zip(reqs, num_new)):
            ids[b, :n] = torch.tensor(r.tokens[r.num_computed - n + 1: r.num_computed + 1])
        view = CacheView(self.pool, [r.table for r in reqs], [r.num_computed - n for r, n in zip(reqs, num_new)],
                         num_new)
        logits, h = self.model.mtp_forward(0, hidden[:, :T], ids.to(dev), cache=view)
        last = torch.tensor(num_new, device=dev) - 1
        ar = torch.arange(B, device=dev)
        tok = logits[ar, last].float().argmax(-1)  # [B] (fp32: see Engine._decode)
        h = h[ar, last][:, None]  # [B, 1, D]
        budgets = [self._budget(r) for r in reqs]
        drafts = [[t] if k > 0 else [] for t, k in zip(tok.tolist(), budgets)]
        for j in range(1, max(budgets, default=0)):
            live = [b for b in range(B) if budgets[b] > j]
            sub = [reqs[b] for b in live]
            view = CacheView(self.pool, [r.table for r in sub], [r.num_computed - 1 + j for r in sub], [1] * len(sub))
            prev = torch.tensor([drafts[b][-1] for b in live], device=dev)[:, None]
            logits, h_new = self.model.mtp_forward(min(j, self.depth - 1), h[live], prev, cache=view)
            h = h.clone()
            h[live] = h_new
            for b, t in zip(live, logits[:, -1].float().argmax(-1).tolist()):
                drafts[b].append(t)
        for r, d in zip(reqs, drafts):
            r.drafts = d
