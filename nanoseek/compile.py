"""Regional torch.compile for training: one compiled graph per kind of transformer block, shared by every block of
that kind (as torchtitan's `apply_compile` and PyTorch's regional-compilation recipe do).

Compiling the whole training step traces every layer into one graph, so inductor generates, and the C++ compiler
builds, the same kernels once per layer: a cold first step of minutes on a 2-core CPU. A block is the unit that
repeats: compiled as a function of (block, inputs), with the block's parameters as graph inputs, its graph and
kernels are reused by every block of the same structure, at the same length and input dtype: the dense block, and
the MoE blocks, MTP's included (the trainer runs MTP at the main blocks' length, `train.micro_step_losses`).
Embedding, final norm, head and losses stay eager: they run once per step.

Two things would make every block a new compilation and are kept outside the compiled region: the
`LayerStats` lists (a guard on their length) and the `RopeTables` memo (a guard on its keys). The region returns
its own stats lists and builds its rope tables from the plain tensors.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from nanoseek.model.rope import RopeTables
from nanoseek.model.stats import LayerStats
from nanoseek.model.transformer import Transformer

_STATS = ("expert_ids", "balance_losses", "indexer_losses", "indexer_recalls")


def _block_region(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  pair_swap: torch.Tensor, half_swap: torch.Tensor, mask: Optional[torch.Tensor]):
    """One block's training forward as a pure function: (hidden [B, T, D], the four stats lists)."""
    stats = LayerStats()
    h = type(block).forward(block, x, RopeTables(cos, sin, pair_swap, half_swap), None, "auto", stats, mask)
    return (h,) + tuple(getattr(stats, f) for f in _STATS)


def _regional_forward(block: nn.Module, region: Callable):
    reference = type(block).forward

    def forward(x, rope, cache=None, path="auto", stats=None, mask=None):
        # inference (a cache, no stats, or no autograd: evaluation) keeps the eager path and its own fast paths
        if cache is not None or stats is None or not torch.is_grad_enabled():
            return reference(block, x, rope, cache, path, stats, mask)
        h, *lists = region(block, x, rope.cos, rope.sin, rope.pair_swap, rope.half_swap, mask)
        for name, items in zip(_STATS, lists):
            getattr(stats, name).extend(items)
        return h
    return forward


def key_cache_on_cpu_isa() -> None:
    """Make the CPU's vector ISA part of every torch.compile cache key of this process.

    Inductor's on-disk graph cache (torch 2.13) keys a compiled graph on the graph, its inputs, the configs and the
    torch version, not on the vector ISA its C++ kernels were generated for, while it builds a cached graph's
    kernels with the flags of the process that loads it. A graph generated for AVX2 (by a process capped with
    ATEN_CPU_CAPABILITY=avx2, or another machine sharing the cache folder) and loaded by an AVX-512 process made
    the training step corrupt the heap (glibc: "corrupted size vs. prev_size"), every run until the cache folder
    was deleted. With the ISA in the key, each ISA compiles its own graphs."""
    import torch.compiler.config as cc
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    # inductor's own pick (it follows ATEN_CPU_CAPABILITY), not kernels.isa's: it is what its C++ is generated for
    tag = f"nanoseek-cpu-isa:{pick_vec_isa() or 'none'}"
    if tag not in cc.cache_key_tag.split(","):
        cc.cache_key_tag = ",".join(t for t in (cc.cache_key_tag, tag) if t)


def compile_blocks(model: Transformer) -> None:
    """Compile the training forward of every block of `model` (main layers and MTP) regionally, in place.
    Shapes stay static: each (block kind, length) is one graph."""
    import torch._dynamo
    key_cache_on_cpu_isa()
    # one entry per block kind and sequence length, with room for the stages' recompiles (e.g. a freeze change)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    region = torch.compile(_block_region, dynamic=False)
    blocks = list(model.layers) + [m.block for m in model.mtp]
    for b in blocks:
        b.forward = _regional_forward(b, region)
