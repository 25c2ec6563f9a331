"""Scale-out under torchrun: process group set-up, FSDP2 for the dense parts, expert parallelism for the routed
experts (DeepSeek-V3 §3.2 trains with EP across nodes; here one EP group spans all ranks), and full
(layout-independent) checkpoint state dicts.

    dist = init_distributed()                # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; world 1 without them
    model = parallelize(model, dist, expert_parallel=True)
    optimizer = torch.optim.AdamW(model.parameters(), ...)   # build it AFTER parallelize
    ...loss.backward(); all_reduce_sum(load, dist)           # expert loads over the whole global batch

Layout across W ranks:
- FSDP2 (`fully_shard`) shards every parameter of each block (attention, dense FFN, router, shared experts) and
  of the root (embedding, head, final norm, MTP projections) along dim 0; gradients are reduce-scattered with
  an average over ranks, so each rank's loss is the mean over its own share of the global batch.
- With expert parallelism, rank r owns routed experts [r·E/W, (r+1)·E/W) of every MoE layer. Their weights are
  DTensors sharded on the expert dim, outside FSDP, so clipping, the optimizer and the state-dict APIs see
  one consistent set of DTensors. A MoE forward sends each (token, expert) pair to the expert's owner
  (all-to-all), runs the grouped-expert kernel there and sends the outputs back; the gate weights are applied
  at home, so the router's gradient stays local.
- Buffers (the balancing bias e_score_correction_bias) are replicated: every rank applies the same update from
  the all-reduced loads.
- DSA warm-up (only the indexers train): no FSDP, the model is replicated and the indexer gradients averaged
  (see `parallelize`).

gloo implements `all_to_all_single` with uneven splits (checked on torch 2.11 and 2.13), so one exchange
function serves gloo (CPU) and NCCL (GPU).

Legend: N tokens on this rank, D model width, E routed experts, K experts per token, W world size,
M (token, expert) pairs received for this rank's experts.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from nanoseek.model.dsa import Indexer
from nanoseek.model.moe import Experts, MoE


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"torchrun environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) or, without torchrun's environment, return a
    single-process Dist with no process group. `device` ("cpu", "cuda", "cuda:N") defaults to CUDA when
    available; under torchrun each process takes cuda:LOCAL_RANK."""
    try:
        requested = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    kind = requested.type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if kind == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device() if requested.index is None else requested.index)
        else:
            dev = torch.device("cpu")
        return Dist(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        dev = torch.device("cpu")
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0)


def destroy(timeout_s: float = 60.0) -> None:
    """Leave the process group (no-op without one). Drop the sharded model and optimizer first.

    A barrier first lets every rank finish its last collective before any rank tears its connections down (gloo
    can abort a peer otherwise); it waits at most `timeout_s`, so a rank calling this after an error, while others
    are stuck elsewhere, still exits. The groups must then really die here, their worker threads joined: a gloo
    thread still alive at interpreter exit can be finishing a last work item whose tensors need the GIL, and the
    process aborts ("terminate called without an active exception", about one exit in twenty). DTensor's
    sharding caches keep device meshes, and through them the groups, alive after the model is gone, so they are
    emptied first."""
    if not torch_dist.is_initialized():
        return
    try:
        torch_dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError:  # a peer is gone or busy elsewhere: tear down anyway
        pass
    _clear_dtensor_caches()
    gc.collect()  # FSDP state and hooks form reference cycles that hold the mesh
    torch_dist.destroy_process_group()


def _clear_dtensor_caches() -> None:
    """Empty DTensor's caches that keep device meshes: sharding propagation, redistribution plans, mesh topology.
    They are private to torch, so each is skipped where this torch lacks it; the 2-process tests check that no
    gloo thread outlives `destroy`, which catches a cache this misses."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
        _clear_sharding_prop_cache()
    except (ImportError, AttributeError):
        pass
    try:
        from torch.distributed.tensor import _collective_utils, _redistribute
    except ImportError:
        return
    caches = [getattr(_redistribute, "_gen_transform_infos", None), getattr(_redistribute, "_planner_cache", None),
              getattr(getattr(_collective_utils, "MeshTopoInfo", None), "build_from_mesh", None)]
    for cache in caches:
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
        elif isinstance(cache, dict):
            cache.clear()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (no-op on one process)."""
    if dist.world_size > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


# ---- expert parallelism ---------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """rows [sum(send), ...] -> rows [sum(recv), ...]: send[j] rows go to rank j, recv[j] rows come from rank j.
    The backward is the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    torch_dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                                 group=group)
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class ExpertParallelExperts(Experts):
    """The routed experts of one MoE layer, split over the ranks of `mesh` (rank r owns E/W consecutive experts).

    Same parameter names and global shapes as `Experts` (gate_up_proj [E, 2I, D], down_proj [E, D, I]), held as
    DTensors sharded on dim 0, so state dicts are layout-independent. `forward` has `Experts`' contract."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        nn.Module.__init__(self)  # not Experts.__init__: the weights come from `experts`, already initialised
        self.impl = experts.impl
        self.mesh, self.group, self.W = mesh, mesh.get_group(), mesh.size()
        E = experts.gate_up_proj.shape[0]
        if E % self.W:
            raise ValueError(f"expert parallelism needs n_routed_experts ({E}) divisible by the world size "
                             f"({self.W})")
        self.E, self.E_local = E, E // self.W
        # distribute_tensor scatters rank 0's full tensor, so all ranks agree whatever their own init was
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(distribute_tensor(full.detach(), mesh, [Shard(0)]),
                                             requires_grad=full.requires_grad))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Every rank's tokens reach these experts, so their gradient is the SUM of the W ranks' loss gradients;
        # FSDP averages the other gradients over ranks, hence 1/W here.
        scale = 1.0 / self.W
        return (_ScaleGrad.apply(self.gate_up_proj.to_local(), scale),
                _ScaleGrad.apply(self.down_proj.to_local(), scale))

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], w [N, K], idx [N, K] -> sum_k w[n,k] * expert_idx[n,k](x[n])  [N, D]."""
        N, K = idx.shape
        W, El = self.W, self.E_local
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs sorted by expert, hence by owner rank
        counts = torch.bincount(flat, minlength=self.E)  # [E] pairs this rank sends to each expert
        # recv_counts[j*El + e]: pairs rank j sends to my local expert e
        recv_counts = _exchange(counts, [El] * W, [El] * W, self.group)
        send = counts.view(W, El).sum(1).tolist()  # one host sync per layer: split sizes must be known
        recv = recv_counts.view(W, El).sum(1).tolist()
        xr = _AllToAll.apply(x[order // K], send, recv, self.group)  # [M, D] by source rank, then expert
        local_idx = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv_counts)  # [M]
        if xr.shape[0]:
            ones = torch.ones(xr.shape[0], 1, device=x.device)
            yr = super().forward(xr, ones, local_idx[:, None])  # [M, D] plain expert outputs
        else:
            # Nothing routed here: still give the local weights a (zero) gradient so every rank's optimizer,
            # clipping and collectives see the same set of gradients.
            gate_up_proj, down_proj = self.weights()
            yr = xr + 0 * (gate_up_proj.sum() + down_proj.sum()).to(xr.dtype)
        y = _AllToAll.apply(yr, recv, send, self.group)  # [N*K, D] back home, in `order`
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros(N * K, x.shape[1], dtype=y.dtype, device=x.device).index_copy(0, order, y)
        return out.view(N, K, -1).sum(1).to(x.dtype)


def _mean_over_ranks(g: torch.Tensor, dist: Dist) -> torch.Tensor:
    g = g.contiguous().clone()
    torch_dist.all_reduce(g, op=torch_dist.ReduceOp.SUM)
    return g / dist.world_size


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.layers) + [m.block for m in model.mtp]


def parallelize(model: nn.Module, dist: Dist, expert_parallel: bool = False) -> nn.Module:
    """Shard `model` (a `Transformer`) over all ranks in place and return it; identity on one process.

    Every rank must call it; parameters and buffers are first broadcast from rank 0, so ranks may have been
    initialised differently. Set the DSA stage and frozen parameters before, and create the optimizer after
    (the parameters are replaced by DTensors). `mtp_forward` must follow `forward`, as in training."""
    if dist.world_size == 1:
        return model
    model.to(dist.device)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            torch_dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    ignored: set[nn.Parameter] = set()
    if expert_parallel:
        for m in model.modules():
            if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallelExperts):
                m.experts = ExpertParallelExperts(m.experts, mesh)
                ignored.update(m.experts.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    indexer = {id(p) for m in model.modules() if isinstance(m, Indexer) for p in m.parameters()}
    if trainable and all(id(p) in indexer for p in trainable):
        # DSA warm-up: only the indexers train, from KL losses that leave the blocks by a side channel. FSDP
        # reduces gradients from hooks on module outputs, which no gradient reaches here, so the model stays
        # replicated (frozen weights need no reduction) and each indexer gradient is averaged over the ranks
        # as it arrives, as DDP would.
        for p in trainable:
            p.register_hook(lambda g: _mean_over_ranks(g, dist))
        return model
    for block in _decoder_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=ignored or None)
    # The root keeps its weights (embedding, head, MTP projections) gathered from forward to backward, so
    # mtp_forward, called after forward, uses them as they are. (Registering mtp_forward as an FSDP forward
    # method instead breaks backward on torch 2.11: the root reshards after it.)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    return model


# ---- full checkpoints --------------------------------------------------------------------------------------
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Loading takes the full state on every rank (each reads the checkpoint file) and keeps each rank's slice, with
# no communication. (broadcast_from_rank0 would read one copy, but set_optimizer_state_dict skips its broadcast
# on ranks given an empty dict and rank 0 then waits forever: torch 2.13.)
_FULL_LOAD = StateDictOptions(full_state_dict=True)


def full_model_state_dict(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """The unsharded model state (parameters at their full [E, ...] shapes, buffers) on CPU, on rank 0; the
    other ranks get {}. Collective: every rank must call it."""
    return get_model_state_dict(model, options=_FULL)


def load_full_model_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], dist: Dist) -> None:
    """Load a full model state (from `full_model_state_dict`, any source layout) into this model, whatever its
    layout. Every rank passes the same full `sd`."""
    set_model_state_dict(model, sd, options=_FULL_LOAD)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> dict[str, Any]:
    """The unsharded optimizer state keyed by parameter name, on CPU, on rank 0 ({} elsewhere). Collective."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any],
                                   dist: Dist) -> None:
    """Load a full optimizer state (any source layout); every rank passes the same full `osd`."""
    # strict=False: parameters that never received a gradient (e.g. the DSA indexer outside its stages) have no
    # AdamW state in the checkpoint, which is correct, not an error.
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True, strict=False))
