"""DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2): shared experts + fine-grained routed experts, three routers.

Routers (`Router`):
- softmax + greedy top-k (V2-Lite), softmax + group-limited greedy (V2: group score = group max);
- sigmoid + noaux_tc (V3): selection on s + b (b = e_score_correction_bias, the auxiliary-loss-free balancing
  bias, fp32), groups scored by the sum of their top-2 biased scores; gate weights from the UNBIASED s.
Gates are renormalised when norm_topk_prob, then multiplied by routed_scaling_factor.

Experts (`Experts`) keep all routed weights fused ([E, 2I, D] gate+up, [E, D, I] down). `grouped` sorts the N·K
(token, expert) pairs by expert and runs one grouped matmul per projection (`torch._grouped_mm`); `loop` is the
plain per-expert reference (`tests/test_model.py` checks they agree); `_active` visits only the experts that got
tokens, where grouped matmuls are unavailable. The fast paths (C grouped GEMMs for CPU training, decode kernels,
packed weights) are put on from outside by `nanoseek.kernels.install`, through the hooks `_gemm` and
`_expert_weights`.

For balancing, each MoE layer reports its tokens' expert ids and, when `seq_aux_alpha` > 0 in training, the
sequence-wise balance loss, into the forward's `LayerStats` (`stats.py`).

Legend: N tokens (B·T flattened), D model width, E routed experts, K experts per token, I expert width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.stats import LayerStats


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, stats: Optional[LayerStats] = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    fp32_weights = ("weight",)  # routing scores in fp32 (bf16 training keeps this weight fp32: optim.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.E, self.K = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.norm_topk, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        # HF names: mlp.gate.weight (kept fp32), mlp.gate.e_score_correction_bias (noaux_tc only)
        self.weight = nn.Parameter(torch.empty(self.E, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # The balancing bias stays fp32 whatever the model dtype: its steps (gamma = 1e-3) vanish in bf16.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            new = self.e_score_correction_bias
            self.e_score_correction_bias = new.float() if bias.is_meta else bias.to(new.device, torch.float32)
        return self

    def weight_fp32(self) -> torch.Tensor:
        """The weight in fp32 (routing scores are computed in fp32)."""
        return self.weight.float()

    def forward(self, x: torch.Tensor):
        """x [N, D] -> gate weights [N, K] (fp32), expert ids [N, K], scores [N, E] (fp32)."""
        logits = F.linear(x.float(), self.weight_fp32())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.method != "greedy" and self.n_group > 1:
            groups = choice.view(-1, self.n_group, self.E // self.n_group)
            if self.method == "noaux_tc":
                group_score = groups.topk(2, dim=-1).values.sum(-1)
            else:
                group_score = groups.amax(-1)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)  # [N, groups]
            # HF's group_limited_greedy masks with 0.0; noaux_tc with -inf. Same choice while scores > 0.
            fill = float("-inf") if self.method == "noaux_tc" else 0.0
            choice = groups.masked_fill(drop[:, :, None], fill).view(-1, self.E)
        idx = choice.topk(self.K, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        if self.norm_topk and self.K > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx, scores


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (`_grouped_mm` rejects stride-0 grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _DispatchRows(torch.autograd.Function):
    """x [N, D] -> xs [P, D] with xs[dest[q]] = x[q // K] for each (token, slot) pair q, and zero rows elsewhere
    (src [P]: each row's token, N for a zero row). Backward gathers the pairs' gradient rows and sums each token's
    K of them: autograd's scatter-add for an indexed read is several times slower on CPU, and compiled (inductor)
    it was a third of a training step."""

    @staticmethod
    def forward(ctx, x, src, dest, K):
        ctx.save_for_backward(dest)
        ctx.K = K
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, src)

    @staticmethod
    def backward(ctx, g):
        (dest,) = ctx.saved_tensors
        return g.index_select(0, dest).view(dest.numel() // ctx.K, ctx.K, -1).sum(1), None, None, None


class _CollectRows(torch.autograd.Function):
    """y [P, D] -> y[dest] [N*K, D] for injective dest: backward writes the gradient rows back (index_copy),
    where autograd would scatter-add."""

    @staticmethod
    def forward(ctx, y, dest):
        ctx.save_for_backward(dest)
        ctx.rows = y.shape[0]
        return y.index_select(0, dest)

    @staticmethod
    def backward(ctx, g):
        (dest,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, g.shape[1]).index_copy_(0, dest, g), None


# bf16 grouped GEMMs: each expert's rows padded with zero rows to a multiple of 16. oneDNN JIT-compiles a kernel
# (~1 ms) for every new GEMM shape: unpadded, every expert load is a new shape, and over a run they overflow its
# primitive cache, so the recompiles never stop (10-16 ms of a ~400 ms `small` step, measured); padded, the
# loads fall into a few dozen shapes, for at most 15 extra rows per expert (~5% of `small`'s ~150).
GROUP_ALIGN = 16


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a [M, K] with rows grouped by offs, b [G, K, N]) -> [M, N]. Its CPU kernel takes float32
    but its shape function (used by torch.compile) only bf16, so a compiled float32 step failed to compile (and
    torch.compile then skipped the step's frames in every dtype for the rest of the process): compiled float32
    calls go through `grouped_mm`, an opaque op with its own shape function and backward."""
    if a.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("nanoseek::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[G, K, N]: per group, a[rows]^T @ g[rows] (a [M, K], g [M, N]): the weight gradient of `grouped_mm`."""
    return torch._grouped_mm(a.t(), g, offs=offs)


@grouped_mm_wgrad.register_fake
def _(a, g, offs):
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, g):
    a, b, offs = ctx.saved_tensors
    g = g.contiguous()
    ga = grouped_mm(g, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gb = grouped_mm_wgrad(a, g, offs) if ctx.needs_input_grad[1] else None
    return ga, gb, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    # CUDA grouped GEMM needs Hopper-class hardware and bf16
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # rows [0, I) gate, [I, 2I) up
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = "grouped"  # or "loop" (reference)

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], w [N, K], idx [N, K] -> sum_k w[n,k] * expert_idx[n,k](x[n])  [N, D]."""
        if self.impl == "loop":
            return self._loop(x, w, idx)
        if not _grouped_mm_ok(x):
            # decode-sized batches touch few experts: visit only those instead of all E groups
            return self._active(x, w, idx)
        return self._grouped(x, w, idx)

    def _gemm(self, xs: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs [P, In] rows grouped by expert (group g ends at offs[g]) times weight[g]^T ([E, Out, In], nn.Linear
        layout) -> [P, Out]."""
        return _ContiguousGrad.apply(_grouped_mm(xs, weight.transpose(1, 2), offs))

    def _expert_weights(self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor):
        """Per-expert weights as two sequences and the matmul to apply them with (`_active`)."""
        return gate_up.unbind(0), down.unbind(0), F.linear

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, D], down [E, D, I]) the paths compute with; expert parallelism (`parallel.py`)
        overrides this to return its rank's experts."""
        return self.gate_up_proj, self.down_proj

    def _loop(self, x, w, idx):
        out = torch.zeros_like(x)
        gate_up_proj, down_proj = self.weights()
        I = down_proj.shape[-1]
        for e in range(gate_up_proj.shape[0]):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            gate, up = F.linear(x[tok], gate_up_proj[e]).split(I, dim=-1)
            y = F.linear(F.silu(gate) * up, down_proj[e])
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))
        return out

    def _active(self, x, w, idx):
        """Per-expert matmuls over the experts that received tokens only (tokens sorted by expert)."""
        N, K = idx.shape
        gate_up_proj, down_proj = self.weights()
        gu, dn, mm = self._expert_weights(gate_up_proj, down_proj, x)
        I = down_proj.shape[-1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()
        tok = order // K
        xs = x.index_select(0, tok)  # [N*K, D] (index_select: cheaper than advanced indexing)
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n:
                gate, up = mm(xs[start:start + n], gu[e]).split(I, dim=-1)
                ys.append(mm(F.silu(gate) * up, dn[e]))
                start += n
        # gate-weighted sum per token straight into [N, D], in the activations' dtype (as HF accumulates); an
        # fp32 round trip of the [N*K, D] outputs costs ~10% of a bf16 prefill
        y = torch.cat(ys)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros(N, x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, tok, y).to(x.dtype)

    def _grouped(self, x, w, idx):
        N, K = idx.shape
        gate_up_proj, down_proj = self.weights()
        E, I = gate_up_proj.shape[0], down_proj.shape[-1]
        autocast = torch.is_autocast_enabled(x.device.type)
        dt = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        align = GROUP_ALIGN if dt == torch.bfloat16 else 1
        # Rows by expert: expert e owns rows [ends[e] - padded[e], ends[e]), its pairs first (in pair order), then
        # zero rows up to a multiple of `align`. P is a static bound (the step stays traceable); rows past
        # ends[-1] are never read. Loads by scatter-add, not bincount: a fixed output shape, for torch.compile.
        flat = idx.reshape(-1)  # [N*K] expert of pair q = n*K + k
        ar = torch.arange(flat.numel(), device=flat.device)
        counts = torch.zeros(E, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        padded = (counts + align - 1) // align * align
        ends = padded.cumsum(0)
        order = flat.argsort(stable=True)  # pairs sorted by expert
        e = flat[order]
        rows = (ends - padded)[e] + ar - (counts.cumsum(0) - counts)[e]
        dest = torch.empty_like(flat).scatter_(0, order, rows)  # [N*K] row of pair q
        P = flat.numel() + E * (align - 1)
        src = torch.full((P,), N, dtype=flat.dtype, device=flat.device).scatter_(0, dest, ar // K)
        xs = _DispatchRows.apply(x, src, dest, K)  # [P, D]
        if autocast:
            # _grouped_mm is not on autocast's list: cast like F.linear would, or bf16 training runs it in fp32
            xs, gate_up_proj, down_proj = xs.to(dt), gate_up_proj.to(dt), down_proj.to(dt)
        offs = ends.to(torch.int32)
        gate, up = self._gemm(xs, gate_up_proj, offs).split(I, dim=-1)
        y = self._gemm((F.silu(gate) * up).contiguous(), down_proj, offs)
        y = _CollectRows.apply(y, dest)  # [N*K, D], pair order
        y = y * w.reshape(-1, 1).to(y.dtype)
        return y.view(N, K, -1).sum(1).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.seq_aux_alpha = 0.0  # set by training; > 0 computes the sequence-wise balance loss

    def forward(self, x: torch.Tensor, stats: Optional[LayerStats] = None) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        w, idx, scores = self.gate(flat)
        if stats is not None:
            stats.expert_ids.append(idx)
            if self.training and self.seq_aux_alpha > 0:
                stats.balance_losses.append(self._seq_balance_loss(idx.view(B, T, -1), scores.view(B, T, -1)))
        out = self.experts(flat, w, idx).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _seq_balance_loss(self, idx, scores):
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch."""
        B, T, K = idx.shape
        E = self.gate.E
        counts = torch.zeros(B, E, device=idx.device).scatter_add_(
            1, idx.reshape(B, -1), torch.ones(B, T * K, device=idx.device))
        f = counts * E / (K * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        return self.seq_aux_alpha * (f * p).sum(-1).mean()
