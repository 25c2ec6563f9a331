"""Fast versions of the model's modules, put onto a model from outside (`install`), the way torchtitan's
overrides and nanochat's FP8 conversion swap layers: each class here subclasses a module of `nanoseek/model/`,
keeps its parameters, buffers and state dict, and overrides only where a fast path applies, falling back to the
reference (`super()`) everywhere else. `nanoseek/model/` stays the plain PyTorch the tests compare against.

What they add:
- decode of a few rows on CPU (bf16 or float32; `cpu_decode.py`): RMSNorm, MLA's projections (norm, q-LoRA, RoPE,
  the cache row and the indexer key in one call) and absorbed attention with o_proj, a block's whole
  feed-forward half (norm, router, routed and shared experts, residual), and whole decode steps
  (`decode_plan.py`: every block, the final norm and the head in one call);
- inference weight caches (`fused.py`): projections that read the same input as one matmul over their
  concatenated weights, fp32 copies of the router and of MLA's absorbed W_UK / W_UV, per-expert weight views,
  oneDNN-packed weights when packing is on (`pack_weights`), and a per-(token, expert) loop for decode-sized
  batches (the fewest PyTorch ops);
- training on CPU: the experts' grouped GEMMs in C (`cpu_experts.py`); on any device, the output head's
  cross-entropy without the [N, V] logits (`linear_ce.py`);
- quantized weights (`nanoseek.quant`): int8 / int4 matmuls from the packed codes for a few rows on CPU
  (`cpu_quant.py`), in the quantized linears and the routed experts.
Every fast path is checked against its reference in tests/test_cpu_decode.py, test_cpu_experts.py,
test_cpu_quant.py and test_model.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.kernels import cpu_decode, cpu_experts, cpu_quant, decode_plan
from nanoseek.kernels.fused import derived, expert_weights, fused_linear, linear, packing_supported, packs, set_packing
from nanoseek.kernels.linear_ce import linear_cross_entropy
from nanoseek.model.mla import ABSORB_MAX_QUERIES, MLA
from nanoseek.model.moe import MLP, Experts, MoE, Router
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RopeTables
from nanoseek.model.stats import LayerStats
from nanoseek.model.transformer import Block, CausalLMOutput, Transformer
from nanoseek.quant import QUANTIZED, QuantExperts, QuantLinear


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_decode.usable(x, self.weight):  # a few rows at decode: one fused call
            return cpu_decode.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastMLP(MLP):
    def forward(self, x: torch.Tensor, stats: Optional[LayerStats] = None) -> torch.Tensor:
        gate, up = fused_linear(self, "_fused_gate_up", x, (self.gate_proj, self.up_proj))  # one matmul
        return linear(self, "_down", F.silu(gate) * up, self.down_proj.weight)

    def fused_gate_up(self) -> Optional[torch.Tensor]:
        """gate_proj and up_proj's weights stacked [2*hidden, dim] (cached, `fused.py`; None under autograd)."""
        return derived(self, "_fused_gate_up", [self.gate_proj.weight, self.up_proj.weight],
                       lambda g, u: torch.cat((g, u)))

    def fused_block(self, h: torch.Tensor, norm, stats: Optional[LayerStats] = None) -> Optional[torch.Tensor]:
        """h + self(norm(h)) as one C call for a few rows on CPU (`cpu_decode.py`); None otherwise."""
        if not cpu_decode.usable(h, norm.weight, self.down_proj.weight):
            return None
        gate_up = self.fused_gate_up()
        if gate_up is None:
            return None
        return cpu_decode.ffn_block(h, norm.weight, norm.eps, shared=(gate_up, self.down_proj.weight))[0]


class FastRouter(Router):
    def weight_fp32(self) -> torch.Tensor:
        """The weight in fp32, cached at inference (`fused.py`): one cast less per layer."""
        w32 = derived(self, "_weight_fp32", [self.weight], lambda w: w.float())
        return super().weight_fp32() if w32 is None else w32


class FastExperts(Experts):
    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.impl != "loop":
            if x.device.type == "cpu" and idx.numel() <= self.gate_up_proj.shape[0]:
                return self._pairs(x, w, idx)  # CPU decode: per-op overhead dominates, issue the fewest ops
            if packs(self, x, self.gate_up_proj):
                return self._active(x, w, idx)  # oneDNN-packed per-expert weights beat the unpacked grouped GEMM
        return super().forward(x, w, idx)

    def _expert_weights(self, gate_up, down, x):
        return expert_weights(self, gate_up, down, x)

    def _gemm(self, xs: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if cpu_experts.routed(xs, weight):
            return cpu_experts.expert_linear(xs, weight, offs)
        return super()._gemm(xs, weight, offs)

    def _pairs(self, x, w, idx):
        """Decode-sized batches on CPU: one expert MLP per (token, expert) pair, no sorting or scattering, and
        one batched matmul for the gate-weighted sum. The per-expert weight views are cached (`fused.py`), so the
        loop issues only compute ops (grouped GEMM would walk all E groups; `_active` sorts and syncs)."""
        N, K = idx.shape
        gate_up_proj, down_proj = self.weights()
        gu, dn, mm = expert_weights(self, gate_up_proj, down_proj, x)
        I = down_proj.shape[-1]
        ys = []
        for n, row in enumerate(idx.tolist()):
            xn = x[n:n + 1]  # [1, D]
            for e in row:
                gate, up = mm(xn, gu[e]).split(I, dim=-1)
                ys.append(mm(F.silu(gate) * up, dn[e]))
        y = torch.cat(ys).view(N, K, -1)  # [N, K, D]
        # the gate-weighted sum in fp32 (w is fp32; a tiny fp32 bmm is also much cheaper than a bf16 one on CPU)
        return torch.bmm(w[:, None].float(), y.float()).view(N, -1).to(x.dtype)


class FastMoE(MoE):
    def fused_block(self, h: torch.Tensor, norm, stats: Optional[LayerStats] = None) -> Optional[torch.Tensor]:
        """h + self(norm(h)) as one C call (norm, router, routed and shared experts, residual) for a few rows at
        inference on CPU (`cpu_decode.py`); None otherwise. The expert ids go to `stats`, as `MoE.forward`'s."""
        g = self.gate
        gate_up, down = self.experts.weights()
        if self.training or not cpu_decode.usable(h, norm.weight, gate_up, down) or not isinstance(g, FastRouter):
            return None
        w32 = derived(g, "_weight_fp32", [g.weight], lambda w: w.float())
        # (expert parallelism holds only this rank's experts; the kernel scores at most 256 groups)
        if w32 is None or gate_up.shape[0] != g.E or g.n_group > 256:
            return None
        shared = None
        if self.shared_experts is not None:
            s = self.shared_experts
            s_gate_up = s.fused_gate_up() if isinstance(s, FastMLP) else None
            if s_gate_up is None or not cpu_decode.usable(h, s_gate_up, s.down_proj.weight):
                return None
            shared = (s_gate_up, s.down_proj.weight)
        router = (w32, g.e_score_correction_bias, g.scoring, g.method, g.n_group, g.topk_group, g.K, g.norm_topk,
                  g.scaling)
        out, idx = cpu_decode.ffn_block(h, norm.weight, norm.eps, router, (gate_up, down), shared)
        if stats is not None:
            stats.expert_ids.append(idx)
        return out


class CachedAbsorbMLA(MLA):
    """MLA with the absorbed decode weights cached: the fast class of an MLA whose projections are quantized (its
    fused paths below read float projection weights; kv_b_proj, which the absorbed weights come from, stays
    float in every quantized format), and the base of FastMLA."""
    def _absorb_weights(self):
        """W_UK, W_UV cached as contiguous tensors until the weight changes (`fused.py`), so decode steps do not
        re-copy the strided slices of kv_b_proj. On CPU the cached copies are fp32: these per-head matmuls are
        tiny, and a tiny fp32 bmm costs a third of a bf16 one there (bf16 products are exact in fp32, so only the
        accumulation order differs)."""
        def split(w):
            wv = (w.float() if w.device.type == "cpu" else w).view(self.n_heads, self.N + self.V, self.R)
            return wv[:, : self.N].contiguous(), wv[:, self.N:].contiguous()

        cached = derived(self, "_absorb_cache", [self.kv_b_proj.weight], split)
        return super()._absorb_weights() if cached is None else cached


class FastMLA(CachedAbsorbMLA):
    def _project(self, x):
        # all projections that read x (q_a or q, kv_a, indexer wk) as one matmul at inference (`fused.py`)
        B, T, _ = x.shape
        first = self.q_a_proj if hasattr(self, "q_a_proj") else self.q_proj
        linears = [first, self.kv_a_proj_with_mqa] + ([self.indexer.wk] if self.indexer is not None else [])
        outs = fused_linear(self, "_fused_x_proj", x, linears)
        if hasattr(self, "q_a_proj"):
            cq = self.q_a_layernorm(outs[0])
            q = linear(self, "_q_b", cq, self.q_b_proj.weight)
        else:
            cq, q = None, outs[0]
        return q.view(B, T, self.n_heads, -1), cq, outs[1], outs[2] if self.indexer is not None else None

    def _project_rotated(self, x, rope: RopeTables, norm: Optional[RMSNorm] = None):
        # norm + projections + rope + the cache row + the indexer key as one fused call for a few rows on CPU
        w = self._fused_weights(x, rope, norm)
        if w is not None:
            return self._project_fused(x, rope, norm, w)
        return super()._project_rotated(x, rope, norm)

    def _absorbed_out(self, q, rows, mask):
        # o_proj(absorbed(q, rows, mask)) as one fused call for a few rows on CPU
        if (cpu_decode.usable(q.flatten(2), rows, self.kv_b_proj.weight, self.o_proj.weight)
                and self.R <= cpu_decode.MAX_LATENT):
            return cpu_decode.mla_absorbed(q, self.kv_b_proj.weight, self.V, rows, mask, self.scale,
                                           self.o_proj.weight)
        return linear(self, "_o", self.absorbed(q, rows, mask).flatten(2), self.o_proj.weight)

    def decode_block(self, h: torch.Tensor, norm: RMSNorm, rope: RopeTables, cache) -> Optional[torch.Tensor]:
        """h + forward(norm(h)) for a decode call (a few rows on CPU, inference) in two fused C calls, the
        projections and the attention with o_proj and the residual, with no other PyTorch op than the cache
        write; None where it does not apply (then the caller runs `forward`): training or the indexer's loss,
        or a DSA layer whose queries see more than top-k rows (selection runs in `_forward_sparse`)."""
        if self.training or self.indexer_loss_on or h.shape[1] > ABSORB_MAX_QUERIES:
            return None
        mask = cache.mask
        if self.indexer is not None and self.dsa_mode == "sparse" and mask.shape[-1] > self.indexer.topk:
            return None
        w = self._fused_weights(h, rope, norm)
        if w is None:
            return None
        _, q, _, rows, index_k = self._project_fused(h, rope, norm, w)
        cache.write(self.layer_id, rows, index_k)
        return cpu_decode.mla_absorbed(q, w["kv_b"], self.V, cache.read(self.layer_id), mask, self.scale, w["o"],
                                       resid=h)

    def _fused_weights(self, x, rope: RopeTables, norm: Optional[RMSNorm]) -> Optional[dict]:
        """The fused path's weights for input x (cached per weight version, `fused.py`), or None where the
        kernels do not take this call."""
        if not (cpu_decode.usable(x) and rope.cos.is_contiguous() and rope.sin.is_contiguous()):
            return None
        w = derived(self, "_decode_weights", self._decode_sources(norm), self._decode_build)
        return w if w is not None and cpu_decode.usable(x, *w["check"]) else None

    def _project_fused(self, x, rope: RopeTables, norm: Optional[RMSNorm], w: dict):
        return cpu_decode.mla_project(
            x, w["wx"], w["q_out"], self.R, self.P, w["qa_norm"], w["qa_eps"], w["wqb"], self.n_heads, self.N,
            w["kv_norm"], w["kv_eps"], rope.cos, rope.sin, w["k_norm"], norm.weight if norm is not None else None,
            norm.eps if norm is not None else 0.0)

    def _decode_sources(self, norm: Optional[RMSNorm]) -> list[torch.Tensor]:
        lora = hasattr(self, "q_a_proj")
        first = self.q_a_proj if lora else self.q_proj
        src = [first.weight, self.kv_a_proj_with_mqa.weight]
        if self.indexer is not None:
            src += [self.indexer.wk.weight, self.indexer.k_norm.weight, self.indexer.k_norm.bias]
        if lora:
            src += [self.q_a_layernorm.weight, self.q_b_proj.weight]
        src += [self.kv_a_layernorm.weight, self.kv_b_proj.weight, self.o_proj.weight]
        return src + ([norm.weight] if norm is not None else [])

    def _decode_build(self, *src: torch.Tensor) -> Optional[dict]:
        """The fused path's weights, resolved once per weight version: the projections of x concatenated, and
        the tensors and constants of the calls (`_decode_sources` order)."""
        lora, idx = hasattr(self, "q_a_proj"), self.indexer
        if self.P > 512 or self.R > cpu_decode.MAX_LATENT or (idx is not None and (
                idx.head_dim > 1024 or idx.rope_dim != self.P)):
            return None
        n_x = 3 if idx is not None else 2
        rest = list(src[n_x + (2 if idx is not None else 0):])
        qa_norm, wqb = (rest.pop(0), rest.pop(0)) if lora else (None, None)
        kv_norm, kv_b, o = rest[:3]
        return {"wx": torch.cat(src[:n_x]), "q_out": src[0].shape[0], "qa_norm": qa_norm,
                "qa_eps": self.q_a_layernorm.eps if lora else 0.0, "wqb": wqb, "kv_norm": kv_norm,
                "kv_eps": self.kv_a_layernorm.eps, "k_norm": idx.k_norm if idx is not None else None, "kv_b": kv_b,
                "o": o, "check": list(src)}


class FastBlock(Block):
    def forward(self, x, rope, cache=None, path="auto", stats: Optional[LayerStats] = None,
                mask: Optional[torch.Tensor] = None):
        # decode of a few rows on CPU: each half of the block is one or two fused C calls (None elsewhere)
        attn, mlp = self.self_attn, self.mlp
        h = None
        if cache is not None and path != "naive" and isinstance(attn, FastMLA):
            h = attn.decode_block(x, self.input_layernorm, rope, cache)
        if h is None:
            h = x + attn(x, rope, cache, path, norm=self.input_layernorm, stats=stats, mask=mask)
        fused = isinstance(mlp, (FastMoE, FastMLP))
        out = mlp.fused_block(h, self.post_attention_layernorm, stats) if fused else None
        if out is not None:
            return out
        return h + mlp(self.post_attention_layernorm(h), stats)


class PlannedTransformer(Transformer):
    """A Transformer whose decode calls run the whole stack in one C call where `decode_plan` applies: the fast
    class of a model quantized to int8 or int4 (its other modules keep their reference classes), and the base of
    FastTransformer."""
    def forward(self, input_ids: torch.Tensor, cache=None, num_logits: Optional[int] = None,
                path: str = "auto", segment_ids: Optional[torch.Tensor] = None) -> CausalLMOutput:
        if cache is not None and path != "naive" and input_ids.dtype in (torch.int32, torch.int64):
            # decode on the CPU kernels: blocks, final norm and head in one call (None where the plan does not apply)
            out = decode_plan.run(self, self.embed_tokens(input_ids), cache, num_logits)
            if out is not None:
                return CausalLMOutput(logits=out[0], hidden=out[1], stats=LayerStats(expert_ids=out[2]))
        return super().forward(input_ids, cache, num_logits, path, segment_ids)


class FastTransformer(PlannedTransformer):
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(self, "_lm_head", hidden, self.lm_head.weight)

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = None
        if type(self.lm_head) is nn.Linear:  # (not a quantized or adapted head)
            loss = linear_cross_entropy(hidden, self.lm_head.weight, targets, reduction)  # no [N, V] logits
        return super().head_loss(hidden, targets, reduction) if loss is None else loss


class FastQuantLinear(QuantLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and cpu_quant.usable(x, self.weight):  # a few rows on CPU (LINEAR_ROWS): from the codes
            return cpu_quant.linear(x, self.weight, self.weight_scale, getattr(self, "weight_min", None))
        return super().forward(x)


class FastQuantExperts(QuantExperts):
    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # a decode batch on CPU: every routed (token, expert) pair in one C call
        if (self.fast and cpu_quant.usable(x, self.gate_up_proj, cpu_quant.MAX_ROWS)
                and cpu_quant.usable(x, self.down_proj, cpu_quant.MAX_ROWS)):
            return cpu_quant.experts(x, w, idx, self._weights("gate_up_proj"), self._weights("down_proj"))
        return super().forward(x, w, idx)

    def _mm(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        # the routed experts' rows (QuantExperts.forward visits only experts with tokens), straight from the codes
        codes, scale, mn = self._weights(name, e)
        if self.fast and cpu_quant.usable(x, codes):
            return cpu_quant.linear(x, codes, scale, mn)
        return super()._mm(x, name, e)


# each reference class and its fast version; install() swaps exact classes only, so a subclass with its own
# forward (expert parallelism's `ExpertParallelExperts`) keeps it
FAST: dict[type, type] = {RMSNorm: FastRMSNorm, MLP: FastMLP, Router: FastRouter, Experts: FastExperts, MoE: FastMoE,
                          MLA: FastMLA, Block: FastBlock, Transformer: FastTransformer, QuantLinear: FastQuantLinear,
                          QuantExperts: FastQuantExperts}
REFERENCE: dict[type, type] = {**{v: k for k, v in FAST.items()}, CachedAbsorbMLA: MLA, PlannedTransformer: Transformer}
# the fast class of a reference class whose module holds quantized ones (its FAST class reads float weights)
HELD_FAST: dict[type, type] = {MLA: CachedAbsorbMLA, Transformer: PlannedTransformer}


def install(model: nn.Module, pack_weights: bool = False) -> nn.Module:
    """Put the fast paths onto every module of `model` in place (same parameters, buffers and state dict) and
    return it. pack_weights: run CPU inference matmuls on oneDNN-packed copies of the weights (bf16 matvecs ~1.7x
    faster, bit-identical; fp32 prefill GEMMs ~2x faster; twice the weight memory); ignored where oneDNN's bf16
    support is missing. The quantized modules (`nanoseek.quant`) get their fast classes (`cpu_quant.py`); the
    modules that hold them keep their reference class, their fast paths reading plain float weights, except
    attention, which keeps the cached absorbed weights (CachedAbsorbMLA), and the model, whose decode steps run
    through the whole-stack plan (PlannedTransformer)."""
    from nanoseek.quant import holders
    held = holders(model)
    for m in model.modules():
        fast = FAST.get(type(m))
        if fast is not None and (id(m) not in held or isinstance(m, QUANTIZED)):
            m.__class__ = fast
        elif type(m) in HELD_FAST:  # holds quantized modules
            m.__class__ = HELD_FAST[type(m)]
    pack_weights_(model, pack_weights)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """The reference modules again (and no packed weights), in place."""
    pack_weights_(model, False)
    for m in model.modules():
        ref = REFERENCE.get(type(m))
        if ref is not None:
            m.__class__ = ref
    return model


def installed(model: nn.Module) -> bool:
    return type(model) in REFERENCE


def pack_weights_(model: nn.Module, on: bool = True) -> bool:
    """Turn oneDNN weight packing on or off for an installed model's inference matmuls; returns whether it is
    on (False where oneDNN bf16 is unavailable)."""
    on = on and packing_supported()
    set_packing(model, on)
    return on
