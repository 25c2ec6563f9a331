"""8-bit latent KV cache storage: `--kv-cache-dtype auto | fp8 | int8`, and the row store both caches use.

MLA's cache row per token and layer is [c_kv (kv_lora_rank R) ; k_pe (qk_rope_head_dim P)], plus the DSA
indexer's key (index_head_dim I) on V3.2 models (DeepSeek-V2 §2.1.2, V3.2 §2.1). In 8 bits:

- fp8: float8_e4m3fn values, scaled so each group's largest magnitude maps to e4m3's largest finite 448;
- int8: symmetric, round(x / scale) in [-127, 127] with scale = amax / 127.

Scales are fp32, one per group of 128 values (FlashMLA's V3.2 fp8 cache uses 128-value tiles of the latent),
or one per row part when the part's width is not a multiple of 128 (tiny test models). The latent c_kv and the
indexer key are quantized this way; the rope key k_pe stays in the model's dtype, as in FlashMLA's cache: it is
an eighth of a V3 row (64 of 512 + 64), and it carries the position signal, whose dot products with the query's
rope part are not normalised like c_kv's (c_kv is the output of an RMSNorm, k_pe is not).
Per V3 row in bf16: 512 + 16 (scales) + 128 (k_pe) bytes, + 128 + 4 for the indexer key, against 1408: 1.8x
the tokens for the same budget.

Dequantization happens on read: every attention path (naive, absorbed, DSA's gather, the indexer's scores)
gets rows in the model's dtype from `RowStore.read`/`take`, so all of them see the same values. The whole-stack
CPU decode (`kernels/decode_plan.py`) reads the cache's planes itself in the model's dtype: it does not apply to
an 8-bit cache, whose decode steps run block by block (the per-block fused kernels take the dequantized rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "int8")
GROUP = 128  # values per scale


@dataclass(frozen=True)
class KVFormat:
    name: str  # "fp8" | "int8"
    storage: torch.dtype  # the number format of the stored values
    qmax: float  # the largest stored magnitude

    @property
    def container(self) -> torch.dtype:
        """The dtype the values are kept in: fp8 as its raw bytes (uint8), since PyTorch's CPU index_copy_ and
        index_select do not take float8 tensors."""
        return torch.uint8 if self.storage.is_floating_point else self.storage

    def groups(self, width: int) -> int:
        return width // GROUP if width % GROUP == 0 else 1

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., W] -> (values [..., W] in `storage`, as `container`, fp32 scales [..., G])."""
        g = self.groups(x.shape[-1])
        xg = x.float().unflatten(-1, (g, -1))
        # all-zero groups (padding rows) get the tiniest scale, not 0: no 0/0, and they stay 0
        scale = xg.abs().amax(-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny).div_(self.qmax)
        y = xg / scale
        # |y| <= qmax up to an ulp, so int8 rounding needs no clamp and e4m3's cast never overflows
        if self.storage == torch.int8:
            y = y.round_()
        return y.to(self.storage).view(self.container).flatten(-2), scale.squeeze(-1)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inverse of `quantize`: values [..., W], scales [..., G] -> [..., W] in dtype (written into `out`,
        a [..., W] tensor of dtype, when given: one op less per read)."""
        g = scale.shape[-1]
        v = q.view(self.storage)
        if v.dtype != torch.int8:  # PyTorch promotes int8 with fp32 in the multiply, not float8
            v = v.float()
        if out is None:
            out = torch.empty(q.shape, dtype=dtype, device=q.device)
        torch.mul(v.unflatten(-1, (g, -1)), scale[..., None], out=out.unflatten(-1, (g, -1)))
        return out


FORMATS = {"fp8": KVFormat("fp8", torch.float8_e4m3fn, 448.0), "int8": KVFormat("int8", torch.int8, 127.0)}


def kv_format(name: str) -> Optional[KVFormat]:
    """The format of a --kv-cache-dtype value: None for auto (rows stored in the model's dtype)."""
    if name == "auto":
        return None
    if name not in FORMATS:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return FORMATS[name]


Index = Union[torch.Tensor, slice, tuple]


class RowStore:
    """Rows of `width` values for L layers, addressed by a leading shape (`lead`: [slots] for the paged pool,
    [B, S_max] for DenseCache). With a format, the first width - keep values are stored in 8 bits with their
    scales and the last `keep` (the rope key) in `dtype`; without one, the rows are one plain tensor (`plain`,
    [L, *lead, width]) that the whole-stack CPU decode reads directly.

    Indices: a LongTensor of slots into the flattened lead dimensions (index_select / index_copy_), or a basic
    index (slices) of the lead dimensions.
    """

    def __init__(self, num_layers: int, lead: tuple[int, ...], width: int, dtype: torch.dtype, device,
                 fmt: Optional[KVFormat], keep: int = 0):
        self.fmt, self.dtype, self.width, self.keep = fmt, dtype, width, keep
        self.device = torch.device(device)
        shape = (num_layers, *lead)
        self.plain: Optional[torch.Tensor] = None
        if fmt is None:
            self.plain = torch.zeros(*shape, width, dtype=dtype, device=device)
            return
        n = width - keep
        self.q = torch.zeros(*shape, n, dtype=fmt.container, device=device)
        self.scale = torch.ones(*shape, fmt.groups(n), dtype=torch.float32, device=device)
        self.tail = torch.zeros(*shape, keep, dtype=dtype, device=device) if keep else None

    @staticmethod
    def bytes_per_row(width: int, dtype: torch.dtype, fmt: Optional[KVFormat], keep: int = 0) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        if fmt is None:
            return width * size
        n = width - keep
        return n + 4 * fmt.groups(n) + keep * size

    def _planes(self) -> list[torch.Tensor]:
        return [self.q, self.scale] + ([self.tail] if self.keep else [])

    def write(self, layer: int, index: Index, rows: torch.Tensor) -> None:
        """Store rows [..., width] at index (a slot tensor: rows [N, width]; a basic index: rows of its shape)."""
        if self.fmt is None:
            parts = [rows]
            planes = [self.plain]
        else:
            head, tail = rows.split([self.width - self.keep, self.keep], dim=-1)
            parts = list(self.fmt.quantize(head)) + ([tail] if self.keep else [])
            planes = self._planes()
        for plane, part in zip(planes, parts):
            if isinstance(index, torch.Tensor):
                plane[layer].view(-1, plane.shape[-1]).index_copy_(0, index, part.reshape(-1, part.shape[-1]))
            else:
                plane[layer][index] = part

    def read(self, layer: int, index: Index) -> torch.Tensor:
        """Rows at a basic index, in `dtype` ([..., width]; a view of the storage when plain)."""
        if self.fmt is None:
            return self.plain[layer][index]
        return self._join([p[layer][index] for p in self._planes()])

    def take(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows at a slot tensor of any shape -> [*slots.shape, width] in `dtype`. index_select: a quarter of
        advanced indexing's cost on CPU (one per layer and step)."""
        flat = slots.reshape(-1)
        planes = [p[layer].view(-1, p.shape[-1]).index_select(0, flat)
                  for p in ([self.plain] if self.fmt is None else self._planes())]
        out = planes[0] if self.fmt is None else self._join(planes)
        return out.view(*slots.shape, self.width)

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        q = parts[0]
        out = torch.empty(*q.shape[:-1], self.width, dtype=self.dtype, device=q.device)
        self.fmt.dequantize(q, parts[1], self.dtype, out=out[..., :q.shape[-1]])
        if self.keep:
            out[..., q.shape[-1]:] = parts[2]
        return out
