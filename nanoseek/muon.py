"""Muon's update for the hidden matrices (`--optimizer muon`; the optimizers that use it are in `optim.py`).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") replaces each matrix's momentum update by the
nearest semi-orthogonal matrix, computed with a few Newton-Schulz iterations, so that every direction of the
update moves by the same amount. Moonlight (Liu et al. 2025, "Muon is Scalable for LLM Training", §2) makes it a
drop-in for AdamW at scale: decoupled weight decay, and the update scaled by 0.2 * sqrt(max(rows, cols)) so its
RMS matches AdamW's, which lets both kinds of parameter share one learning rate and schedule; Kimi K2 and
DeepSeek-V4 train with it.

What takes which:
- Muon: the 2-D weights inside the blocks (attention projections, dense and shared-expert MLPs, DSA's indexer,
  MTP's eh_proj) and, with `experts=True`, each routed expert's matrices (the fused [E, 2I, D] / [E, D, I]
  weights, orthogonalised expert by expert, with gate and up apart).
- AdamW (torch's, as `build_adamw` groups it): embeddings, the output head, norms, biases and the routers, which
  are classifiers more than hidden layers.
Routed experts default to AdamW: orthogonalising 40 experts x 3 matrices per layer costs more than the
forward and backward of a small batch, since each expert sees only top-k/E of the tokens.

State: a fp32 `momentum_buffer` per Muon parameter, beside AdamW's state of the others, so checkpoints stay plain
tensors keyed by name (`optim.optimizer_state_tensors`). Single process: Newton-Schulz needs each whole matrix,
which FSDP2 shards.

Legend: n matrices of one shape stacked, m x k each (m <= k after transposing).
"""
from __future__ import annotations

import math

import torch

# quintic Newton-Schulz coefficients (Jordan et al.): pushes singular values into ~[0.7, 1.2] in 5 steps
NS_COEFFS = (3.4445, -4.7750, 2.0315)
MOMENTUM = 0.95  # Nesterov momentum of Muon's updates (Moonlight, Kimi K2)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """g [n, m, k] -> approximately U V^T of each matrix (its singular values pushed to ~1), in fp32."""
    a, b, c = NS_COEFFS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT  # [n, m, m]
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.mT if tall else x


def matrices(name: str, p: torch.Tensor) -> list[tuple[int, int]] | None:
    """How Muon sees parameter `name`: a list of (row offset, rows) blocks of its last two dims (the gate and up
    halves of a fused expert weight apart), or None if AdamW takes it."""
    if p.dim() == 3 and name.endswith("gate_up_proj"):
        half = p.shape[1] // 2
        return [(0, half), (half, half)]
    if p.dim() == 3 and name.endswith("down_proj"):
        return [(0, p.shape[1])]
    if p.dim() != 2 or "embed_tokens" in name or "lm_head" in name or name.endswith("mlp.gate.weight"):
        return None
    return [(0, p.shape[0])]


@torch.no_grad()
def muon_update(group: dict, items: list, state: dict, blocks: dict) -> None:
    """One Muon step of a 'muon' group. items: (parameter, gradient, weight to update): the weight is the
    parameter itself, or its fp32 master where the parameter is a bf16 working copy (`MasterWeightAdamW`).
    Nesterov momentum per parameter (fp32), then one batched Newton-Schulz per matrix shape."""
    lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
    by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for p, g, w in items:
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(w)
        buf = st["momentum_buffer"]
        buf.lerp_(g.to(buf.dtype), 1 - mu)
        u = g.to(buf.dtype).lerp(buf, mu)  # out of place: g may be the parameter's .grad
        w3, u3 = (w[None], u[None]) if w.dim() == 2 else (w, u)  # [n, rows, cols]
        for r0, rows in blocks[p]:
            by_shape.setdefault((rows, w3.shape[-1]), []).append((w3[:, r0:r0 + rows], u3[:, r0:r0 + rows]))
    for (rows, cols), pairs in by_shape.items():
        o = orthogonalize(torch.cat([u for _, u in pairs]), group["ns_steps"])
        scale = 0.2 * math.sqrt(max(rows, cols))  # Moonlight: AdamW's update RMS
        i = 0
        for w, _ in pairs:
            n = w.shape[0]
            w.mul_(1 - lr * wd).add_(o[i:i + n].to(w.dtype), alpha=-lr * scale)
            i += n
