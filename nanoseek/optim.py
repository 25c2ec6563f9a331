"""AdamW with DeepSeek-style parameter groups, the learning-rate schedules, and optimizer state <-> safetensors.

- Groups: weight decay on matrices (linear weights, fused expert weights, the router), none on vectors (norms,
  biases) and embeddings, as in DeepSeek-V3 §4.2 / nanoGPT.
- Schedules (V3 §4.2 uses warmup + constant + cosine decay; MiniCPM's WSD is the same idea with a short final
  decay): `cosine` = linear warm-up then cosine to min_lr; `wsd` = warm-up, stable at lr, then a linear decay to
  min_lr over the last `decay_fraction` of the steps.
- Optimizer state is written as plain tensors (safetensors) plus JSON hyper-parameters, keyed by parameter NAME,
  so a checkpoint never needs unpickling and survives a change of parameter order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Schedule:
    lr: float
    min_lr: float
    warmup: int
    total: int
    kind: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.kind!r}; choose cosine or wsd")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
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


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad; the fused kernel where torch has one (CPU and CUDA)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters")
    decay = [p for n, p in named if _decays(n, p)]
    other = [p for n, p in named if not _decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for _, p in named) and not _has_dtensor(named)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def _has_dtensor(named) -> bool:
    return any(type(p).__name__ == "DTensor" for _, p in named)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


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
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = tensors.get(f"{names[id(p)]}/{key}")
                if t is not None:
                    # `step` stays where torch keeps it (CPU float unless capturable/fused on CUDA)
                    dev = p.device if key != "step" or t.dim() > 0 or _step_on_device(opt) else "cpu"
                    state[key] = t.to(dev, dtype=t.dtype).clone()
            if state:
                opt.state[p] = state


def _step_on_device(opt: torch.optim.Optimizer) -> bool:
    d = opt.defaults
    return bool(d.get("fused") or d.get("capturable"))
