"""Weight-only quantization (issue 15, part 1): int8 and int4 weights, activations in the model's float dtype.

Formats (W [N, K]: N output rows, K input values per row; leading dims, e.g. experts [E, N, K], ride along):
- `int8`: symmetric per output row. scale = max|row| / 127, codes = round(W / scale) in [-127, 127] (int8,
  [N, K]), scale bf16 [N]. W' = codes * scale.
- `int4`: asymmetric per group of G consecutive input values of a row (G in 32, 64, 128; default 32):
  min = the group's minimum, scale = (max - min) / 15, codes = round((W - min) / scale) in [0, 15], packed two
  per byte (uint8 [N, K/2]: value 2j in the low nibble, 2j+1 in the high one); scale and min bf16 [N, K/G].
  W' = codes * scale + min. A row whose K is not a multiple of G is kept in int8 (e.g. `tiny`'s q_lora_rank 48).
  Asymmetric, not symmetric (codes -7..7, scale = max|group| / 7, no min): over the speedrun model's quantized
  weights the asymmetric form has 0.81x the relative RMS weight error at G=32 (0.0735 vs 0.0910; bits per byte
  +0.01% vs +0.02%, `bench/quant_quality.py`) for 0.5 extra bits per weight (Q4_1 vs Q4_0 in llama.cpp's terms).
Scales and mins are stored in bf16, rounded outward (min down, scale up) before the codes are computed from
them, so every value stays inside the representable range and |W - W'| <= scale / 2 per element holds exactly
with the stored scale (tests/test_quant.py). bf16 rather than fp16: the range of fp32, so a tiny scale never
underflows; and bf16 is what the fused int8 op takes.

What is quantized (`quantize_model`): every nn.Linear of attention (q, q_a/q_b, kv_a, o), of the dense and shared
MLPs, MTP's eh_proj, the output head, and the routed experts. Kept in float, by default:
- embeddings and norms: a lookup reads one row per token (no bandwidth to save), norms are tiny;
- the router (gate): expert choice is a top-k over close scores, a quantized router flips choices; it is small;
- MLA's kv_b_proj: absorbed decode reads kv_b_proj.weight directly as W_UK / W_UV (mla.py `_absorb_weights`),
  and it is small (kv_lora_rank x heads * (nope + v));
- DSA's indexer: it ranks past tokens for top-k (like the router, ranking is fragile) and is small;
- a head tied to the embedding (it is the embedding).
In `int4` the head is int8: the output projection sets every logit directly, llama.cpp keeps its output tensor at
higher precision (Q6_K / Q8_0) for the same reason. Measured on the speedrun model: an int4 head (group 32) costs
+0.05% bits per byte against +0.01% for the int8 head, for 1% less memory (README, Quantization).

Forward of each quantized module: the reference is dequantize to the activation dtype, then the plain matmul
(`QuantLinear.reference`, `QuantExperts.forward` with fast off). Fast path: int8 weights with bfloat16 activations
on CPU run `torch._weight_int8pack_mm` (int8 codes times bf16 activations, the scale applied to the output: no
dequantized copy; 1.8-2.7x faster than a dense bf16 matvec at 2048x1024 on the Zen 4 here). Not for float32
activations (that op is slow there) and not for int4: PyTorch's `_weight_int4pack_mm_for_cpu` measured no faster
than a dense bf16 matvec on this CPU and needs its own weight layout. The routed experts dequantize only the experts
a batch routes tokens to, never all E.
`nanoseek.kernels.install` gives the quantized modules fast classes (`nanoseek/kernels/cpu_quant.py`: int8 and
int4 matmuls in C straight from the codes, float32 or bf16 activations, a few rows on CPU, the routed experts
included; int4 on int8 activations where the CPU has them (AVX512-VNNI, AVX2), its added error stated there) and
leaves the modules that hold them on their reference classes, whose fused C kernels read plain float weights; a
decode step of the whole model runs in one C call that reads the codes with the same dot products
(kernels/decode_plan.py).

Loading a float checkpoint quantized (`from_pretrained(..., quantize=)`) streams (checkpoint.py): the model is
built quantized on the meta device and each weight is quantized as it is read (`quantize_into`: a block of rows at a
time, straight into the codes / scale / min buffers, one expert's slice at a time for the routed experts), bitwise
what `quantize_model` on the loaded float model gives, without ever holding the float model.

Folder format (`nanoseek quantize IN OUT`, read back by `from_pretrained` / `serve` as is, built quantized: the
float weights are never materialised): config.json is the model's HF config plus
    "quantization_config": {"quant_method": "nanoseek", "format": "int8"|"int4", "group_size": G}
and model.safetensors (one file, not sharded yet) holds, in HF names, each quantized weight
as `<weight name>` (codes: int8 = int8 format, uint8 = packed int4), `<weight name>_scale` (bf16) and for int4
`<weight name>_min` (bf16); routed experts fused per layer (`model.layers.i.mlp.experts.gate_up_proj` [E, 2I, ...],
`.down_proj` [E, D, ...], as the float loader also reads); every other tensor in the float dtype of the source. The
tokenizer files are copied.

Legend: N output rows, K input values, G group size, E routed experts, D model width, I expert width.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import Experts

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
QUANT_METHOD = "nanoseek"


@dataclass
class QuantConfig:
    format: str  # "int8" | "int4"
    group_size: int = 32  # int4 only: input values per scale

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"quantize: unknown format {self.format!r} (choose from {', '.join(FORMATS)})")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantize: group size must be one of {GROUP_SIZES}, got {self.group_size}")

    def to_hf(self) -> dict:
        return {"quant_method": QUANT_METHOD, **asdict(self)}


# ---- tensors ---------------------------------------------------------------------------------------------
def _bf16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x (fp32) in bf16, rounded toward +inf (up) or -inf: the stored value bounds x from that side."""
    b = x.to(torch.bfloat16)
    off = b.float() < x if up else b.float() > x
    toward = torch.full_like(b, float("inf") if up else float("-inf"))
    return torch.where(off, torch.nextafter(b, toward), b)


def quantize(w: torch.Tensor, fmt: str, group_size: int = 32
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """W [..., N, K] -> (codes, scale, min): int8: (int8 [..., N, K], bf16 [..., N], None); int4: (uint8
    [..., N, K/2], bf16 [..., N, K/G], bf16 [..., N, K/G]). See the module docstring."""
    w = w.detach().float()
    if fmt == "int8":
        scale = _bf16(w.abs().amax(-1) / 127, up=True)
        s = scale.float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: codes 0 whatever the scale
        return (w / s[..., None]).round().clamp(-127, 127).to(torch.int8), scale, None
    if fmt != "int4":
        raise ValueError(f"unknown format {fmt!r}")
    K = w.shape[-1]
    if K % group_size:
        raise ValueError(f"int4 needs the input width ({K}) to be a multiple of the group size ({group_size})")
    g = w.unflatten(-1, (K // group_size, group_size))
    lo = _bf16(g.amin(-1), up=False)
    scale = _bf16((g.amax(-1) - lo.float()) / 15, up=True)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group (bf16-exact): codes 0, W' = min
    q = ((g - lo.float()[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, lo


# Values per block of rows in `quantize_into`: quantize's fp32 temporaries are a few copies of the block, so they stay
# small whatever the tensor (V2-Lite's head is 210M values: gigabytes of temporaries in one piece), and at 1 MB in
# fp32 they stay in cache: a bf16 expert [1408, 2048] quantized ~9x faster (int8; ~3x int4) in 128-row blocks than
# whole, where every temporary is fresh memory the kernel must fault in and zero (one run, 1 thread, 2-core Zen 4).
_BLOCK_VALUES = 1 << 18


def quantize_into(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mn: Optional[torch.Tensor],
                  group_size: int = 32) -> None:
    """`quantize(w)` ([N, K]) written into preallocated buffers (the format is the codes': int8 or packed uint8),
    a block of rows at a time. Every row is quantized on its own, so the result is bitwise `quantize`'s."""
    fmt = "int8" if codes.dtype == torch.int8 else "int4"
    step = max(1, _BLOCK_VALUES // max(1, w.shape[-1]))
    for r in range(0, w.shape[0], step):
        c, s, m = quantize(w[r:r + step], fmt, group_size)
        codes[r:r + step].copy_(c)
        scale[r:r + step].copy_(s)
        if mn is not None:
            mn[r:r + step].copy_(m)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, min: Optional[torch.Tensor] = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize` up to its rounding: W' [..., N, K] in `dtype` (computed in fp32)."""
    if min is None:
        return (codes.float() * scale.float()[..., None]).to(dtype)
    q = torch.stack((codes & 15, codes >> 4), -1).flatten(-2)  # [..., N, K]
    q = q.unflatten(-1, (scale.shape[-1], -1)).float()  # [..., N, K/G, G]
    return (q * scale.float()[..., None] + min.float()[..., None]).flatten(-2).to(dtype)


def _int8_fast(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether x @ W'^T runs on torch._weight_int8pack_mm: int8 codes, bf16 activations on CPU, no autograd, and
    K a multiple of 16 (torch 2.13's CPU kernel crashes the process on other widths, e.g. a q_lora_rank of 136)."""
    return (codes.dtype == torch.int8 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and codes.shape[-1] % 16 == 0 and not (torch.is_grad_enabled() and x.requires_grad))


def _int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), codes, scale)
    return out.view(*x.shape[:-1], codes.shape[0])


def _format_for(fmt: str, in_features: int, group_size: int) -> str:
    return "int8" if fmt == "int4" and in_features % group_size else fmt


class _Quantized(nn.Module):
    """Shared by the quantized modules: scales and mins stay bf16 through `.to(dtype)` (they are exact in bf16,
    and the fused int8 op takes bf16 scales); `fast` picks the fused path where it applies (tests turn it off
    to run the reference)."""
    fast = True

    def _register(self, name: str, codes: torch.Tensor, scale: torch.Tensor, mn: Optional[torch.Tensor]) -> None:
        self.register_buffer(name, codes)
        self.register_buffer(name + "_scale", scale)
        if mn is not None:
            self.register_buffer(name + "_min", mn)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for n, b in self._buffers.items():
            if b is not None and n.endswith(("_scale", "_min")) and b.dtype != torch.bfloat16:
                self._buffers[n] = b.to(torch.bfloat16)
        return self

    def _weights(self, name: str, e: Optional[int] = None):
        codes, scale, mn = (getattr(self, name), getattr(self, name + "_scale"), getattr(self, name + "_min", None))
        if e is None:
            return codes, scale, mn
        return codes[e], scale[e], None if mn is None else mn[e]


class QuantLinear(_Quantized):
    """A bias-free nn.Linear with quantized weight: buffers `weight` (codes), `weight_scale` (+ `weight_min`)."""

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, scale: torch.Tensor,
                 mn: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = "int8" if mn is None else "int4"
        self._register("weight", codes, scale, mn)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, group_size: int = 32) -> "QuantLinear":
        if lin.bias is not None:
            raise ValueError("QuantLinear: linears with a bias are not quantized")
        fmt = _format_for(fmt, lin.in_features, group_size)
        return cls(lin.in_features, lin.out_features, *quantize(lin.weight, fmt, group_size))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(*self._weights("weight"), dtype=dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and _int8_fast(x, self.weight):
            return _int8_mm(x, self.weight, self.weight_scale)
        return self.reference(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class QuantExperts(_Quantized):
    """`Experts` (moe.py) with quantized routed weights: buffers `gate_up_proj` [E, 2I, ...] and `down_proj`
    [E, D, ...] (codes), each with `_scale` (+ `_min`). Same forward contract; like `Experts._active` it visits
    only the experts that got tokens, and dequantizes only those."""

    def __init__(self, E: int, D: int, I: int, gate_up: tuple, down: tuple):
        super().__init__()
        self.E, self.D, self.I = E, D, I
        self._register("gate_up_proj", *gate_up)
        self._register("down_proj", *down)

    @classmethod
    def from_experts(cls, experts: Experts, fmt: str, group_size: int = 32) -> "QuantExperts":
        gate_up, down = experts.weights()
        E, I2, D = gate_up.shape
        return cls(E, D, I2 // 2, quantize(gate_up, _format_for(fmt, D, group_size), group_size),
                   quantize(down, _format_for(fmt, I2 // 2, group_size), group_size))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' weights (gate_up [E, 2I, D], down [E, D, I]): for tests and export, never the forward."""
        return (dequantize(*self._weights("gate_up_proj"), dtype=dtype),
                dequantize(*self._weights("down_proj"), dtype=dtype))

    def _mm(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        codes, scale, mn = self._weights(name, e)
        if self.fast and _int8_fast(x, codes):
            return _int8_mm(x, codes, scale)
        return F.linear(x, dequantize(codes, scale, mn, x.dtype))

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, D], w [N, K], idx [N, K] -> sum_k w[n,k] * expert_idx[n,k](x[n])  [N, D]."""
        N, K = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.E).tolist()
        tok = order // K
        xs = x.index_select(0, tok)  # [N*K, D], rows sorted by expert
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n:
                gate, up = self._mm(xs[start:start + n], "gate_up_proj", e).split(self.I, dim=-1)
                ys.append(self._mm(F.silu(gate) * up, "down_proj", e))
                start += n
        y = torch.cat(ys)
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros(N, self.D, dtype=y.dtype, device=x.device).index_add_(0, tok, y).to(x.dtype)


# ---- models ----------------------------------------------------------------------------------------------
QUANTIZED = (QuantLinear, QuantExperts)
KEPT_LINEARS = ("kv_b_proj",)  # read as a plain weight by MLA's absorbed decode (see the module docstring)


def holders(model: nn.Module) -> set[int]:
    """ids of the modules of `model` that hold a quantized module (themselves included)."""
    out: set[int] = set()

    def walk(m: nn.Module) -> bool:
        held = isinstance(m, QUANTIZED)
        for c in m.children():
            held = walk(c) or held
        if held:
            out.add(id(m))
        return held

    walk(model)
    return out


def quantize_model(model: nn.Module, fmt: str, group_size: int = 32) -> nn.Module:
    """Swap the large linears and routed experts of `model` (a Transformer) for quantized ones, in place (see
    the module docstring for which); returns the model, with `model.quantization` its QuantConfig."""
    from nanoseek.kernels.modules import FAST, HELD_FAST, REFERENCE
    from nanoseek.model.dsa import Indexer
    qc = QuantConfig(fmt, group_size)
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization.format})")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    skip = {id(m) for i in model.modules() if isinstance(i, Indexer) for m in i.modules()}
    for parent in list(model.modules()):
        if id(parent) in skip:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in KEPT_LINEARS and child.bias is None:
                head = parent is model and name == "lm_head"
                if head and tied:
                    continue
                f = "int8" if head else qc.format  # the head at higher precision (module docstring)
                setattr(parent, name, QuantLinear.from_linear(child, f, group_size))
            elif type(child) in (Experts, FAST[Experts]):  # not expert parallelism's (DTensor weights)
                setattr(parent, name, QuantExperts.from_experts(child, qc.format, group_size))
    # the engine's fast classes of the holders read plain weights: where one is on already, its reference class
    # takes over (attention: the one that only caches the absorbed weights); the quantized modules of an
    # installed model get theirs
    installed = type(model) in REFERENCE
    held = holders(model)
    for m in model.modules():
        if isinstance(m, QUANTIZED):
            if installed and type(m) in FAST:
                m.__class__ = FAST[type(m)]
        elif id(m) in held and type(m) in REFERENCE:
            m.__class__ = REFERENCE[type(m)]
            if installed and m.__class__ in HELD_FAST:  # as kernels.install gives a holder of quantized modules
                m.__class__ = HELD_FAST[m.__class__]
    model.quantization = qc
    return model


def bytes_of(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (each tensor once)."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.data_ptr() if t.device.type != "meta" else id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


# ---- folders ---------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def saved_config(hf: dict) -> Optional[QuantConfig]:
    """The QuantConfig of a config.json written by `save_quantized`, or None (e.g. a float or FP8 checkpoint)."""
    q = hf.get("quantization_config") or {}
    if q.get("quant_method") != QUANT_METHOD:
        return None
    return QuantConfig(q.get("format"), q.get("group_size", 32))


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a quantized model (`quantize_model`) as the folder of the module docstring."""
    from safetensors.torch import save_file
    from nanoseek.checkpoint import SINGLE_FILE, internal_to_hf
    qc = getattr(model, "quantization", None)
    if qc is None:
        raise ValueError("save_quantized: the model is not quantized (quantize_model first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = str(model.embed_tokens.weight.dtype).replace("torch.", "")
    hf["quantization_config"] = qc.to_hf()
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("rotary.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        tensors[internal_to_hf(name, cfg)] = t.detach().to("cpu").contiguous()
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def load_quantized(path: Path, hf: dict, cfg, dtype, device) -> nn.Module:
    """A `save_quantized` folder as a quantized Transformer: the structure is built on the meta device, quantized
    there (shapes only), allocated once on `device` and filled tensor by tensor, so the float weights of the
    quantized modules never exist. dtype: of the float tensors (None: the folder's)."""
    from nanoseek.checkpoint import CheckpointError, _get, _weight_files, hf_to_internal
    from nanoseek.model.rope import RotaryEmbedding
    from nanoseek.model.transformer import Transformer
    qc = saved_config(hf)
    if dtype is None:
        dtype = getattr(torch, hf.get("torch_dtype") or "bfloat16")
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    files = _weight_files(path)
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(
            re.match(r"^model\.layers\.(\d+)\.", n) and int(n.split(".")[2]) >= L for n in files):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = quantize_model(Transformer(cfg), qc.format, qc.group_size)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: never a float32 copy first
    if cfg.tie_word_embeddings:  # to_empty gives every module a new Parameter: tie the head to the embedding again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg).to(device)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    todo = {n for n in targets if not n.startswith("rotary.")}
    if cfg.tie_word_embeddings:
        todo.discard("lm_head.weight")
    for hf_name, f in sorted(files.items()):
        internal = hf_to_internal(hf_name, cfg)
        if internal is None:
            continue
        if internal not in targets:
            raise CheckpointError(f"{path}: unexpected tensor {hf_name!r} for this config and "
                                  f"{qc.format} (group {qc.group_size})")
        src, dst = _get(f, hf_name), targets[internal]
        if tuple(src.shape) != tuple(dst.shape) or (src.is_floating_point() != dst.is_floating_point()):
            raise CheckpointError(f"{path}: tensor {hf_name!r} is {src.dtype} {tuple(src.shape)}, the config and "
                                  f"{qc.format} (group {qc.group_size}) expect {dst.dtype} {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))
        todo.discard(internal)
    if todo:
        raise CheckpointError(f"{path}: {len(todo)} tensor(s) missing, e.g. {', '.join(sorted(todo)[:5])}")
    return model.eval()


def add_arguments(ap) -> None:
    """--quantize and --quant-group-size, as `generate`, `chat`, `serve` and `eval` take them."""
    ap.add_argument("--quantize", choices=FORMATS, default=None,
                    help="weight-only quantization at load (nanoseek.quant); a `nanoseek quantize` folder loads "
                         "quantized without it")
    ap.add_argument("--quant-group-size", type=int, default=32, choices=GROUP_SIZES,
                    help="int4: input values per scale (default 32)")


def cli(cmd: str, argv: list[str]) -> int:
    """nanoseek quantize IN OUT --format int8|int4 [--group-size G] [--dtype bfloat16]."""
    import argparse
    import sys
    from nanoseek.checkpoint import CheckpointError, from_pretrained
    ap = argparse.ArgumentParser(prog="nanoseek quantize",
                                 description="write a model folder with int8 / int4 weights (nanoseek.quant)")
    ap.add_argument("src", help="model folder (config.json, safetensors, tokenizer.json)")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--group-size", type=int, default=32, choices=GROUP_SIZES, help="int4: input values per scale")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="dtype of the tensors left in float (embeddings, norms, router, kv_b_proj)")
    a = ap.parse_args(argv)
    try:
        model = from_pretrained(a.src, dtype=a.dtype, quantize=a.format, group_size=a.group_size)
    except (CheckpointError, ValueError) as e:
        print(f"nanoseek quantize: error: {e}", file=sys.stderr)
        return 2
    save_quantized(model, a.dst)
    for f in TOKENIZER_FILES:
        if (Path(a.src) / f).exists():
            shutil.copyfile(Path(a.src) / f, Path(a.dst) / f)
    print(f"saved {a.dst} ({a.format}{f', group {a.group_size}' if a.format == 'int4' else ''}, "
          f"{bytes_of(model) / 2 ** 20:.1f} MiB of weights)")
    return 0
