"""8-bit latent KV cache storage: `--kv-cache-dtype auto | fp8 | int8`, and the row store both caches use.

MLA's cache row per token and layer is [c_kv (kv_lora_rank R) ; k_pe (qk_rope_head_dim P)], plus the DSA
indexer's key (index_head_dim I) on V3.2 models (DeepSeek-V2 §2.1.2, V3.2 §2.1). In 8 bits:

- fp8: float8_e4m3fn values, scaled so each group's largest magnitude maps to e4m3's largest finite 448;
- int8: symmetric, round(x / scale) in [-127, 127] with scale = amax / 127.

Scales are fp32, one per group of 128 values (FlashMLA's V3.2 fp8 cache uses 128-value tiles of the latent),
or one per part when a part's width is not a multiple of 128 (k_pe, tiny test models). Each part of a row has
its own scales: c_kv (the output of an RMSNorm), k_pe (rotated, not normalised) and the indexer key (a
LayerNorm's output) differ in magnitude. k_pe is quantized too, unlike FlashMLA's cache (bf16 k_pe): on the
speedrun model (bench/kv_cache_quality.py, bits per byte through the cache over 4,096 held-out tokens, against
the full cache) keeping it in the model's dtype gave fp8 +0.007% (float32) / -0.004% (bfloat16) and int8
+0.004% / -0.002%; quantizing it gives fp8 +0.018% / +0.017% and int8 +0.006% / -0.005%: at most 0.02% of bits
per byte (fp8's 3-bit mantissa; int8 shows none), for 1.88x instead of 1.66x the tokens of a bf16 cache there
(k_pe is 1/5 of its row; 1/9 on V3).
Per V3.2 row in bf16: 512 + 16 (scales) + 64 + 4 (k_pe) bytes, + 128 + 4 for the indexer key, against 1408:
1.93x the tokens for the same budget.

Dequantization happens on read: every attention path (naive, absorbed, DSA's gather, the indexer's scores)
gets rows in the model's dtype from `RowStore.read`/`take`, so all of them see the same values; that path is the
reference. The whole-stack CPU decode (`kernels/decode_plan.py`, `ns_decode_stack` in kernels/cpu_decode.c) reads
and writes the 8-bit planes and scales itself (`RowStore.planes`): it quantizes new rows as `KVFormat.quantize`
does, byte for byte, and dequantizes each value as `KVFormat.dequantize` does (the model's dtype of value * scale)
in registers or a row's worth of stack, inside its dot products: no dequantized copy of the cache is made. Its
results equal the reference's up to the order of fp32 sums (tests/test_kv_quant.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

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
    """Rows for L layers, addressed by a leading shape (`lead`: [slots] for the paged pool, [B, S_max] for
    DenseCache), each row the concatenation of `parts` (widths: [R, P] for MLA's c_kv and k_pe, [I] for the
    indexer key). With a format, every part is stored in 8 bits with its own scales (`KVFormat.groups` of them);
    without one, the rows are one plain tensor (`plain`, [L, *lead, width]). The whole-stack CPU decode reads
    either in place (`planes`).

    Indices: a LongTensor of slots into the flattened lead dimensions (index_select / index_copy_), or a basic
    index (slices) of the lead dimensions. zeros(shape, dtype): where the planes are allocated, zero-filled (the
    engine's CPU pool passes memory in huge pages, `nanoseek/kernels/hugepages.py`); torch.zeros by default.
    """

    def __init__(self, num_layers: int, lead: tuple[int, ...], parts: tuple[int, ...], dtype: torch.dtype, device,
                 fmt: Optional[KVFormat], zeros: Optional[Callable[[tuple, torch.dtype], torch.Tensor]] = None):
        self.fmt, self.dtype, self.parts, self.width = fmt, dtype, parts, sum(parts)
        self.device = torch.device(device)
        zeros = zeros or (lambda shape, dt: torch.zeros(shape, dtype=dt, device=device))
        shape = (num_layers, *lead)
        self.plain: Optional[torch.Tensor] = None
        if fmt is None:
            self.plain = zeros((*shape, self.width), dtype)
            return
        self.groups = [fmt.groups(w) for w in parts]
        self.q = zeros((*shape, self.width), fmt.container)
        self.scale = zeros((*shape, sum(self.groups)), torch.float32).fill_(1.0)

    @staticmethod
    def bytes_per_row(parts: tuple[int, ...], dtype: torch.dtype, fmt: Optional[KVFormat]) -> int:
        if fmt is None:
            return sum(parts) * torch.empty((), dtype=dtype).element_size()
        return sum(parts) + 4 * sum(fmt.groups(w) for w in parts)

    def write(self, layer: int, index: Index, rows: torch.Tensor) -> None:
        """Store rows [..., width] at index (a slot tensor: rows [N, width]; a basic index: rows of its shape)."""
        if self.fmt is None:
            planes, values = [self.plain], [rows]
        else:
            pairs = [self.fmt.quantize(x) for x in rows.split(self.parts, dim=-1)]
            q, scale = (pairs[0] if len(pairs) == 1 else
                        (torch.cat([p[0] for p in pairs], -1), torch.cat([p[1] for p in pairs], -1)))
            planes, values = [self.q, self.scale], [q, scale]
        for plane, v in zip(planes, values):
            if isinstance(index, torch.Tensor):
                plane[layer].view(-1, plane.shape[-1]).index_copy_(0, index, v.reshape(-1, v.shape[-1]))
            else:
                plane[layer][index] = v

    def read(self, layer: int, index: Index) -> torch.Tensor:
        """Rows at a basic index, in `dtype` ([..., width]; a view of the storage when plain)."""
        if self.fmt is None:
            return self.plain[layer][index]
        return self._dequantize(self.q[layer][index], self.scale[layer][index])

    def take(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows at a slot tensor of any shape -> [*slots.shape, width] in `dtype`. index_select: a quarter of
        advanced indexing's cost on CPU (one per layer and step)."""
        flat = slots.reshape(-1)
        if self.fmt is None:
            out = self.plain[layer].view(-1, self.width).index_select(0, flat)
        else:
            out = self._dequantize(self.q[layer].view(-1, self.width).index_select(0, flat),
                                   self.scale[layer].view(-1, self.scale.shape[-1]).index_select(0, flat))
        return out.view(*slots.shape, self.width)

    def planes(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The storage itself, for the whole-stack CPU decode that reads and writes it in place: (the rows
        [L, *lead, width] in `dtype`, None) when plain, else (the 8-bit values [L, *lead, width] as `container`,
        their fp32 scales [L, *lead, sum(groups)])."""
        return (self.plain, None) if self.fmt is None else (self.q, self.scale)

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=self.dtype, device=q.device)
        if len(self.parts) == 1:
            return self.fmt.dequantize(q, scale, self.dtype, out=out)
        a = g = 0
        for w, n in zip(self.parts, self.groups):
            self.fmt.dequantize(q[..., a:a + w], scale[..., g:g + n], self.dtype, out=out[..., a:a + w])
            a, g = a + w, g + n
        return out
