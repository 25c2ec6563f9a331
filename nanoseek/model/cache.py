"""The latent KV cache interface the model reads and writes, and a plain contiguous implementation.

MLA (DeepSeek-V2 §2.1.2) caches, per token and layer, only the normalised KV latent c_kv (kv_lora_rank values)
and the rotated shared key k_pe (qk_rope_head_dim values) - one row of C = kv_lora_rank + qk_rope_head_dim -
plus, on DSA layers (V3.2 §2.1), the lightning indexer's key (index_head_dim values).

A `LatentCache` is the view of a cache for ONE forward call: it knows where this call's tokens go, which cached
rows each query may see, and how to read rows back. The model only calls the four methods below, so the
engine's paged cache (`nanoseek.engine.cache`) and `DenseCache` here are interchangeable.

Legend: B batch, T new tokens, S visible cache rows, C latent row width (R + P), I indexer key width, K top-k.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from nanoseek.model.kv_quant import RowStore, kv_format


class LatentCache(Protocol):
    positions: torch.Tensor  # [B, T] absolute positions of this call's tokens (RoPE)
    mask: torch.Tensor  # [B, T, S] bool, True where query t may attend cached row s (causal and valid)

    def write(self, layer: int, kv: torch.Tensor, index_k: Optional[torch.Tensor]) -> None:
        """Store this call's rows: kv [B, T, C], index_k [B, T, I] or None."""

    def read(self, layer: int) -> torch.Tensor:
        """All visible latent rows [B, S, C] (the ones just written included)."""

    def read_index_keys(self, layer: int) -> torch.Tensor:
        """All visible indexer keys [B, S, I]."""

    def gather(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """Only the selected rows: idx [B, T, K] (values in [0, S)) -> [B, T, K, C]. O(K) reads, for DSA decode."""

    # optional: slots(num_layers) -> (kv, index_k or None, write slots [B*T], the reads: read slots [B*S], or
    # (block tables [B, nb], block size bs) for row s of request b at tables[b, s // bs] * bs + s % bs, or None,
    # first slot of a single request's contiguous rows), kv and index_k each `RowStore.planes` flattened to slots
    # (values [L, slots, W], fp32 scales [L, slots, G] or None): the whole-stack CPU decode (`decode_plan.py`)
    # reads and writes the cache itself through it, in the cache's `kv_format` (8-bit rows, `kv_quant.py`) or
    # the model's dtype; a cache without it takes the blocks one by one.


class DenseCache:
    """A contiguous [B, S_max] cache for batches that advance together (tests, `generate`, benches).

    Usage: `cache = DenseCache(cfg, B, S_max, dtype)`; then each step `model(ids, cache=cache.step(T))`.
    Layers num_hidden_layers .. +n_mtp hold the MTP modules' rows. kv_cache_dtype "fp8" | "int8" stores the rows
    in 8 bits, dequantized on read (`kv_quant.py`).
    """

    def __init__(self, cfg, batch_size: int, max_len: int, dtype=torch.float32, device="cpu",
                 kv_cache_dtype: str = "auto"):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.kv_format = kv_format(kv_cache_dtype)
        lead = (batch_size, max_len)
        self.rows = RowStore(n_layers, lead, (cfg.kv_lora_rank, cfg.qk_rope_head_dim), dtype, device, self.kv_format)
        self.index_rows = (RowStore(n_layers, lead, (cfg.index_head_dim,), dtype, device, self.kv_format)
                           if cfg.use_dsa else None)
        self.batch_size, self.max_len = batch_size, max_len
        self.device = self.rows.device
        self.length = 0  # rows filled so far (the same for every batch row)
        self._t = 0

    def step(self, num_new: int) -> "DenseCache":
        """Prepare a call that appends num_new tokens; returns self with positions and mask set."""
        start, end = self.length, self.length + num_new
        if end > self.max_len:
            raise ValueError(f"DenseCache full: {end} tokens > max_len {self.max_len}")
        dev, B = self.device, self.batch_size
        pos = torch.arange(start, end, device=dev)
        self.positions = pos.expand(B, -1)
        self.mask = (torch.arange(end, device=dev)[None, :] <= pos[:, None]).expand(B, -1, -1)
        self._t, self.length = num_new, end
        return self

    def rewind(self, length: int) -> None:
        """Forget rows past `length` (speculative decoding rejects drafted tokens this way)."""
        self.length = length

    def write(self, layer, kv, index_k):
        new = (slice(None), slice(self.length - self._t, self.length))
        self.rows.write(layer, new, kv)
        if index_k is not None:
            self.index_rows.write(layer, new, index_k)

    def read(self, layer):
        return self.rows.read(layer, (slice(None), slice(0, self.length)))

    def read_index_keys(self, layer):
        return self.index_rows.read(layer, (slice(None), slice(0, self.length)))

    def slots(self, full_layers: int, gathered: int = 0):
        """The cache as pools of rows (see `CacheView.slots`): batch row b's position p is slot b * max_len + p."""
        kv = self.rows.planes()
        L, B, S_max, _ = kv[0].shape
        base = torch.arange(B, device=kv[0].device)[:, None] * S_max
        write = (base + torch.arange(self.length - self._t, self.length, device=kv[0].device)).reshape(-1)
        ik = None if self.index_rows is None else self.index_rows.planes()
        kv, ik = (None if p is None else tuple(None if t is None else t.view(L, B * S_max, t.shape[-1]) for t in p)
                  for p in (kv, ik))
        if B == 1:
            return kv, ik, write, None, 0
        read = (base + torch.arange(self.length, device=base.device)).reshape(-1)
        return kv, ik, write, read, 0

    def gather(self, layer, idx):
        B, T, K = idx.shape
        # only the selected rows are dequantized: slot b * max_len + s of the flattened [B * max_len] rows
        slots = (torch.arange(B, device=idx.device)[:, None, None] * self.max_len + idx)
        return self.rows.take(layer, slots)  # [B, T, K, C]
