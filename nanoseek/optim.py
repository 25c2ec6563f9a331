"""The optimizers (AdamW with DeepSeek-style parameter groups, Muon + AdamW), the learning-rate schedules, and
optimizer state <-> safetensors.

- Groups: weight decay on matrices (linear weights, fused expert weights, the router), none on vectors (norms,
  biases) and embeddings, as in DeepSeek-V3 §4.2 / nanoGPT. With Muon (`muon.py`; Moonlight's recipe), a third
  group of the blocks' matrices takes Muon's update at the same lr and weight decay (`MuonAdamW`).
- Schedules (V3 §4.2 uses warmup + constant + cosine decay; MiniCPM's WSD is the same idea with a short final
  decay): `cosine` = linear warm-up then cosine to min_lr; `wsd` = warm-up, stable at lr, then a linear decay to
  min_lr over the last `decay_fraction` of the steps.
- Optimizer state is written as plain tensors (safetensors) plus JSON hyper-parameters, keyed by parameter NAME,
  so a checkpoint never needs unpickling and survives a change of parameter order.
- `MasterWeightAdamW`: bf16 training with bf16 working copies of the matmul weights and fp32 master weights in
  the optimizer (mixed precision as in DeepSeek-V3 §3.3), the same arithmetic as bf16 autocast over fp32
  weights without casting every weight forward and every gradient back at each step; on CPU its update is one
  C pass per tensor (`cpu_adamw.c`), elsewhere the PyTorch reference below.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from nanoseek import muon as _muon
from nanoseek.kernels import cpu_adamw


@dataclass
class Schedule:
    lr: float
    min_lr: float
    warmup: int
    total: int
    kind: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    # steps of a first stage with its own warm-up (over at most its length) at the peak, after which the schedule
    # starts again, warm-up included, over the remaining steps: `adapt`'s new-rows stage, where most weights join
    # only at its end (their optimizer moments empty) and would otherwise take the peak rate on their first step
    stage: int = 0
    stage_lr: Optional[float] = None  # the first stage's peak (default lr)

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.kind!r}; choose cosine or wsd")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if not 0 <= self.stage <= self.total:
            raise ValueError(f"need 0 <= stage <= total (stage={self.stage}, total={self.total})")

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if self.stage:
            if step < self.stage:
                peak = self.lr if self.stage_lr is None else self.stage_lr
                return peak * min(1.0, (step + 1) / max(1, min(self.warmup, self.stage)))
            return dataclasses.replace(self, stage=0, stage_lr=None, total=self.total - self.stage)(step - self.stage)
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (step - self.warmup) / span)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))
        decay_start = max(self.warmup, int(self.total * (1 - self.decay_fraction)))
        if step < decay_start:
            return self.lr
        t = min(1.0, (step - decay_start) / max(1, self.total - decay_start))
        return self.lr + (self.min_lr - self.lr) * t


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2 and "embed_tokens" not in name


def _groups(model: nn.Module, weight_decay: float, muon: bool = False, muon_experts: bool = False,
            embed_lr_scale: float = 1.0):
    """(groups, blocks): AdamW's decayed and undecayed parameters; with `muon`, first a group of `kind` 'muon'
    (the others 'adamw') of the matrices Muon takes (`muon.matrices`; the routed experts only with
    `muon_experts`), blocks giving each one's matrix blocks. embed_lr_scale != 1: the token embedding and output
    head (their LoRA trainable-token rows too) go into groups of their own whose `lr_scale` `set_lr` applies."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    blocks: dict[nn.Parameter, list[tuple[int, int]]] = {}
    if muon:
        for n, p in named:
            if type(p).__name__ == "DTensor":
                raise ValueError("--optimizer muon runs single-process (Newton-Schulz needs whole matrices)")
            b = _muon.matrices(n, p)
            if b is not None and (p.dim() == 2 or muon_experts):
                blocks[p] = b
    decay = [p for n, p in named if p not in blocks and _decays(n, p)]
    other = [p for n, p in named if p not in blocks and not _decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    if embed_lr_scale != 1.0:
        rows = {p for n, p in named if "embed_tokens" in n or "lm_head" in n}
        groups = [{**g, "params": [p for p in g["params"] if p not in rows]} for g in groups] + \
                 [{**g, "params": [p for p in g["params"] if p in rows], "lr_scale": embed_lr_scale} for g in groups]
    if muon:
        groups = [{"params": list(blocks), "weight_decay": weight_decay, "kind": "muon"},
                  *({**g, "kind": "adamw"} for g in groups)]
    return [g for g in groups if g["params"]], blocks


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                fused: bool | None = None, bf16_weights: bool = False, embed_lr_scale: float = 1.0
                ) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; the fused kernel where torch has one (CPU and CUDA).
    bf16_weights: `MasterWeightAdamW`, which turns the model's matmul weights into bf16 working copies."""
    if bf16_weights:
        return MasterWeightAdamW(model, lr, weight_decay, betas, eps, embed_lr_scale=embed_lr_scale)
    groups, _ = _groups(model, weight_decay, embed_lr_scale=embed_lr_scale)
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in params) and not _has_dtensor(params)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if fused:
        opt.register_step_post_hook(_bump_versions)
    return opt


def _bump_versions(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """torch's fused AdamW (and MasterWeightAdamW's kernels) write the parameters without bumping their version
    counters, so caches keyed on them (`fused.py`: concatenated and packed weights for inference, the decode plan)
    went on using the old weights: held-out evaluations during training measured the weights of the first
    evaluation."""
    torch.autograd.graph.increment_version([p for g in opt.param_groups for p in g["params"]])


def _has_dtensor(params) -> bool:
    return any(type(p).__name__ == "DTensor" for p in params)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices, AdamW on the rest (`muon.py`), over fp32 weights. Groups carry
    `kind` ('muon' or 'adamw'); lr, weight_decay and the schedule apply to both. (bf16 working weights with fp32
    masters: `MasterWeightAdamW(..., muon=True)`.)"""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, momentum: float = _muon.MOMENTUM,
                 betas=(0.9, 0.95), eps: float = 1e-8, experts: bool = False, ns_steps: int = 5,
                 embed_lr_scale: float = 1.0):
        groups, self.blocks = _groups(model, weight_decay, muon=True, muon_experts=experts,
                                      embed_lr_scale=embed_lr_scale)
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, ns_steps=ns_steps))
        self.register_step_post_hook(_bump_versions)  # fused AdamW writes behind autograd's back

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "muon":
                _muon.muon_update(group, [(p, p.grad, p) for p in params], self.state, self.blocks)
            else:
                _fused_adamw_step(self.state, group, params)
        return None


def _fused_adamw_step(state: dict, group: dict, params: list) -> None:
    """torch's fused AdamW over `params` (gradients in .grad) with the group's hyper-parameters, the state in
    torch.optim.AdamW's layout (a fp32 `step` tensor beside the moments, as the fused kernel keeps it)."""
    states = []
    for p in params:
        st = state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states.append(st)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    b1, b2 = group["betas"]
    torch._fused_adamw_(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                        [st["exp_avg_sq"] for st in states], [], steps, amsgrad=False, lr=group["lr"], beta1=b1,
                        beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


# ---- bf16 working weights, fp32 masters ---------------------------------------------------------------------
def low_precision_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable fp32 weights that bf16 autocast only ever uses in bf16 matmuls (linear and expert weights):
    a bf16 copy of them computes exactly what autocast computes. Left out: vectors (norms run in fp32),
    embeddings (looked up, not cast; a tied head is the embedding) and the weights a module computes with in
    fp32, which it names in `fp32_weights` (the router, DSA's indexer)."""
    keep_fp32 = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            keep_fp32.add(id(mod.weight))
        for name in getattr(mod, "fp32_weights", ()):
            keep_fp32.add(id(mod.get_parameter(name)))
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.dtype == torch.float32 and p.dim() >= 2 and id(p) not in keep_fp32]


def _f32(x: float) -> float:
    """x rounded to fp32: the C kernel and the PyTorch reference take the same scalars."""
    return struct.unpack("f", struct.pack("f", x))[0]


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW for bf16 training in which the model's matmul weights (`low_precision_params`) are bf16 working
    copies and the optimizer holds their fp32 master weights. Autocast over fp32 weights casts every weight to
    bf16 at every use and every weight gradient back to fp32; here the forward reads the bf16 copies directly,
    the gradients stay bf16 (the same values autocast would upcast), and one pass per tensor updates the master
    and moments and writes the new bf16 copy: the same arithmetic in less time. Other parameters (norms,
    embeddings, the router) stay fp32 and take torch's fused AdamW.

    Gradients of the bf16 weights are taken from `.grad` as backward accumulates them: with several
    micro-batches per step they are summed in fp32 (DeepSeek-V3 §3.3: gradient accumulation in FP32).
    `clip_grad_norm_` replaces torch.nn.utils.clip_grad_norm_ (its scaling happens inside the update).
    The state (exp_avg, exp_avg_sq, step per parameter) has torch.optim.AdamW's layout, so checkpoints move
    between the two; the checkpointed weights are the masters (`full_precision_state`). `release()` puts the
    fp32 masters back into the model (end of training). muon=True: the groups and updates of `MuonAdamW`, Muon
    updating the masters."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 muon: bool = False, muon_experts: bool = False, momentum: float = _muon.MOMENTUM,
                 ns_steps: int = 5, embed_lr_scale: float = 1.0):
        groups, self.blocks = _groups(model, weight_decay, muon, muon_experts, embed_lr_scale)
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, ns_steps=ns_steps))
        self.master: dict[nn.Parameter, torch.Tensor] = {}
        self._grads: dict[nn.Parameter, torch.Tensor] = {}  # bf16 weights' gradients, out of .grad
        self._hooks = []
        self._scale = 1.0  # the clipping factor the next step applies
        self.register_step_post_hook(_bump_versions)  # the kernels write the weights behind autograd's back
        trainable = {p for g in self.param_groups for p in g["params"]}
        for _, p in low_precision_params(model):
            if p in trainable:
                self.master[p] = p.detach().clone()
                p.data = p.data.to(torch.bfloat16)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._take_grad))

    def _take_grad(self, p: torch.Tensor) -> None:
        g, p.grad = p.grad, None
        acc = self._grads.get(p)
        if acc is None:
            self._grads[p] = g
        elif acc.dtype == torch.bfloat16:
            self._grads[p] = acc.float().add_(g)
        else:
            acc.add_(g)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grads.clear()
        self._scale = 1.0
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global L2 norm of all gradients; if max_norm > 0, the next step scales them by
        min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does."""
        lib = cpu_adamw.library()
        sq = 0.0
        for g in self._grads.values():
            if lib is not None and g.is_cpu and g.dtype == torch.bfloat16 and g.is_contiguous():
                sq += lib.ns_sumsq_bf16(g.data_ptr(), g.numel(), torch.get_num_threads())
            else:
                sq += float(g.float().square().sum(dtype=torch.float64))
        rest = [p.grad for grp in self.param_groups for p in grp["params"] if p.grad is not None]
        if rest:
            sq += float(torch.stack(torch._foreach_norm(rest)).double().square().sum())
        norm = math.sqrt(sq)
        if max_norm > 0:  # torch's factor, NaN and all: an inf norm zeroes the finite gradients
            coef = max_norm / (norm + 1e-6)
            self._scale = coef if coef < 1.0 or math.isnan(coef) else 1.0
        return norm

    def _state(self, p: torch.Tensor, like: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=like.device)  # as fused AdamW keeps it
            st["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        scale, self._scale = self._scale, 1.0
        lib = cpu_adamw.library()
        for group in self.param_groups:
            if group.get("kind") == "muon":
                items = []
                for p in group["params"]:
                    g = self._grads.get(p, p.grad)
                    if g is not None:
                        items.append((p, g * scale if scale != 1.0 else g, self.master.get(p, p)))
                _muon.muon_update(group, items, self.state, self.blocks)
                for p, _, w in items:
                    if w is not p:
                        p.copy_(w)
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            plain = [p for p in group["params"] if p not in self.master and p.grad is not None]
            if plain:
                if scale != 1.0:
                    torch._foreach_mul_([p.grad for p in plain], scale)
                _fused_adamw_step(self.state, group, plain)
            scalars: dict[float, dict] = {}  # by step count: one set for the whole group in practice
            for p in group["params"]:
                g = self._grads.get(p)
                if g is None:
                    continue
                w = self.master[p]
                st = self._state(p, w)
                st["step"] += 1
                t = float(st["step"])
                if t not in scalars:
                    scalars[t] = dict(scale=_f32(scale), c1=_f32(1 - b1), b2=_f32(b2), c2=_f32(1 - b2),
                                      eps=_f32(eps), decay=_f32(1 - lr * wd), step=_f32(lr / (1 - b1 ** t)),
                                      bc2_sqrt=_f32(math.sqrt(1 - b2 ** t)))
                k = scalars[t]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if (lib is not None and all(x.is_cpu and x.is_contiguous() and x.numel() == p.numel()
                                            for x in (p, w, m, v, g))
                        and p.dtype == torch.bfloat16 and w.dtype == m.dtype == v.dtype == torch.float32
                        and g.dtype in (torch.bfloat16, torch.float32)):
                    g16 = g.data_ptr() if g.dtype == torch.bfloat16 else None
                    g32 = g.data_ptr() if g.dtype == torch.float32 else None
                    lib.ns_adamw_master(p.data_ptr(), w.data_ptr(), m.data_ptr(), v.data_ptr(), g16, g32, p.numel(),
                                        *k.values(), torch.get_num_threads())
                else:
                    adamw_master_reference(p, w, m, v, g, **k)
        return None

    def state_dict(self) -> dict:
        """torch's layout, each bf16 weight's state also holding its fp32 master ("master")."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]  # the indices torch's state_dict uses
        for i, p in enumerate(params):
            if p in self.master:
                sd["state"].setdefault(i, {})["master"] = self.master[p]
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to each parameter's dtype: show it the fp32 masters, not the bf16 copies
        low = {p: p.data for p in self.master}
        for p, w in self.master.items():
            p.data = w
        try:
            super().load_state_dict(state_dict)
        finally:
            for p, lo in low.items():
                p.data = lo
        for p, w in self.master.items():
            saved = self.state[p].pop("master", None)
            if saved is not None:
                w.copy_(saved)
                p.copy_(w)
        torch.autograd.graph.increment_version(list(self.master))

    def full_precision_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """model.state_dict() with each bf16 working weight replaced by its fp32 master (what checkpoints
        hold)."""
        masters = {n: self.master[p] for n, p in model.named_parameters() if p in self.master}
        return {k: masters.get(k, v).detach() for k, v in model.state_dict().items()}

    def release(self) -> None:
        """Put the fp32 masters back into the model as its weights; the optimizer is done."""
        for h in self._hooks:
            h.remove()
        for p, w in self.master.items():
            p.data = w
        self._hooks, self.master, self._grads = [], {}, {}


@torch.no_grad()
def adamw_master_reference(p: torch.Tensor, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                           scale: float, c1: float, b2: float, c2: float, eps: float, decay: float, step: float,
                           bc2_sqrt: float) -> None:
    """`ns_adamw_master` in PyTorch ops, the same operations in the same order: the reference of the C kernel,
    and the path where it is not built (other CPUs, CUDA)."""
    g = g.float() * scale
    m.add_((g - m) * c1)
    v.mul_(b2).add_((g * g) * c2)
    root = v.double().sqrt().float()  # correctly rounded, as the kernel's (torch's fp32 sqrt on CPU is not always)
    w.mul_(decay).sub_((m / (root / bc2_sqrt + eps)) * step)
    p.copy_(w)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: `lr` times the group's `lr_scale` (1 where it has none)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ---- state (de)serialisation ------------------------------------------------------------------------------
def optimizer_state_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """(tensors, meta): tensors '{param name}/{state key}' (exp_avg, exp_avg_sq, step) and JSON-able meta
    (hyper-parameters of each group, by parameter name). names: id(param) -> name."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for g in opt.param_groups:
        hp = {k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, tuple, list))}
        groups.append({"params": [names[id(p)] for p in g["params"]], **hp})
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{names[id(p)]}/{k}"] = v.detach().to("cpu").contiguous()
    return tensors, {"param_groups": groups}


def load_optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict, meta: dict) -> None:
    """Inverse of `optimizer_state_tensors`; raises ValueError if the parameters do not match."""
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"checkpoint optimizer has {len(saved_groups)} groups, this run {len(opt.param_groups)}")
    for g, sg in zip(opt.param_groups, saved_groups):
        mine = [names[id(p)] for p in g["params"]]
        if mine != sg["params"]:
            raise ValueError("checkpoint optimizer parameters differ from this model's "
                             f"(first differences: {sorted(set(mine) ^ set(sg['params']))[:3]})")
        for k, v in sg.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
        for p in g["params"]:
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                t = tensors.get(f"{names[id(p)]}/{key}")
                if t is not None:
                    # `step` stays where torch keeps it (CPU float unless capturable/fused on CUDA)
                    dev = p.device if key != "step" or t.dim() > 0 or _step_on_device(opt) else "cpu"
                    state[key] = t.to(dev, dtype=t.dtype).clone()
            if state:
                opt.state[p] = state


def _step_on_device(opt: torch.optim.Optimizer) -> bool:
    d = opt.defaults
    return bool(d.get("fused") or d.get("capturable")) or isinstance(opt, MasterWeightAdamW)
