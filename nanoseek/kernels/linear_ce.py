"""The output head and its cross-entropy in one pass over chunks of rows, for training (and, loss only, the
trainer's held-out evaluation): the fused linear cross-entropy of Liger-Kernel and of Apple's Cut Cross-Entropy,
written with PyTorch ops. The [N, V] logits and their gradient never exist whole; the reference is
`Transformer.head_loss` (the head's logits, then `F.cross_entropy`), which `FastTransformer.head_loss` calls where
this does not apply.

Forward, chunk by chunk of rows: logits = h @ W^T (in the matmul dtype, then fp32, as the reference rounds them),
their log-softmax and the targets' nats; when a gradient is wanted, the gradient of the chunk's nats
(softmax - one-hot) goes straight into dh = g @ W and dW += g^T @ h while the chunk is still in cache. Backward
only scales dh and dW by the incoming gradient. The head's three GEMMs run once each, as in the unfused step.
"""
from __future__ import annotations

from typing import Optional

import torch

CHUNK_BYTES = 16 << 20  # fp32 logits per chunk: 512 rows of 8192 (GEMMs near full speed; the chunk mostly in cache)


def _matmul_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(h, w) computes in here: autocast's where it is on, else the inputs' promotion."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


def _chunks(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale,
            need_h: bool, need_w: bool):
    """Summed nats over the rows of h [N, D] whose target [N] is not ignore_index, and, as asked, the gradients
    of (scale x summed nats) with respect to h ([N, D], h's dtype) and w ([V, D], fp32)."""
    N, V = h.shape[0], w.shape[0]
    rows = max(1, CHUNK_BYTES // (4 * V))
    nats = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    for s in range(0, N, rows):
        x, t = h[s:s + rows], targets[s:s + rows]
        keep = t != ignore_index
        t = t.masked_fill(~keep, 0)
        # log-probabilities by one kernel that finishes each row while it is in cache (as F.cross_entropy computes
        # them); logsumexp and a subtraction made three passes over the [c, V] chunk and a temporary of its size
        logp = torch.log_softmax((x @ w.T).float(), -1)  # [c, V]
        nats -= (logp.gather(1, t[:, None]).squeeze(1) * keep).sum()
        if not (need_h or need_w):
            continue
        g = logp.exp_()  # softmax, in place of the log-probabilities
        g[torch.arange(len(t), device=t.device), t] -= 1.0
        g.mul_((keep * scale).to(g.dtype)[:, None])  # ignored rows: no gradient
        g = g.to(h.dtype)
        if need_h:
            torch.mm(g, w, out=dh[s:s + rows])
        if need_w:
            if g.dtype == torch.float32:
                dw.addmm_(g.T, x)
            else:
                dw += (g.T @ x).float()
    return nats, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, ignore_index: int, mean: bool, grad_mode: bool):
        dtype = _matmul_dtype(h, w)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)
            count = (targets != ignore_index).sum()
            scale = 1.0 / count if mean else torch.ones((), device=h.device)
            # (needs_input_grad says requires_grad even under no_grad: evaluation computes no gradient)
            nats, dh, dw = _chunks(hc, wc, targets, ignore_index, scale, grad_mode and ctx.needs_input_grad[0],
                                   grad_mode and ctx.needs_input_grad[1])
        ctx.save_for_backward(dh, dw)  # (None where that input needs no gradient)
        ctx.dtypes = (h.dtype, w.dtype)
        return nats / count if mean else nats

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else (dh * grad).to(ctx.dtypes[0])
        dw = None if dw is None else (dw * grad).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", ignore_index: int = -100) -> Optional[torch.Tensor]:
    """F.cross_entropy(F.linear(hidden, weight).float(), targets) over hidden [..., D], weight [V, D] and
    targets [...], without the logits: 'mean' over the targets that are not ignore_index (NaN when none is) or
    'sum'. None for a weight this cannot take as it is (a DTensor under FSDP): use the reference then."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None
    h = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(h, weight, targets.reshape(-1), ignore_index, reduction == "mean",
                                     torch.is_grad_enabled())
