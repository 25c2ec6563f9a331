"""Hugging Face checkpoint import/export: config.json + safetensors (single or sharded), FP8 dequantisation.

Reads what DeepSeek, transformers and other tools write for `deepseek_v2`, `deepseek_v3` and `deepseek_v32`:
- per-expert (`mlp.experts.j.{gate,up,down}_proj.weight`, DeepSeek's releases) or fused
  (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]) routed experts;
- MTP layers at index num_hidden_layers + k (their embedding / head copies are checked, not duplicated);
- DeepSeek's FP8 releases: float8_e4m3fn weights with fp32 `<name>_scale_inv` [ceil(out/128), ceil(in/128)];
  block (i, j) is fp8.float() * scale_inv[i, j], partial edge blocks included.
Loading is tensor by tensor from memory-mapped files, shard by shard in file order, into a model allocated once in
the target dtype, so peak memory stays near the final weights. With `quantize` (issue 15 item 3) the model is built
quantized (the quantized modules' float weights never exist) and each weight is quantized as it is read (FP8 ones
dequantized first; routed experts one expert at a time into their stacked buffers), so peak memory is the quantized
model plus about one float tensor, never the float model. Nothing is ever unpickled: safetensors and JSON only.

Writes per-expert names (what vLLM, SGLang and transformers all read), sharded above `max_shard_bytes`.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch

from nanoseek import quant
from nanoseek.config import ModelConfig
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file or tensor and the problem."""


# ---- names -----------------------------------------------------------------------------------------------
def hf_to_internal(name: str, cfg: ModelConfig) -> Optional[str]:
    """HF tensor name -> nanoseek parameter/buffer name (experts still per-expert); None = known, ignored."""
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        return name  # unknown: reported as unexpected by the caller
    name = name[len("model."):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    i, rest = int(m.group(1)), m.group(2)
    L = cfg.num_hidden_layers
    if i < L:
        return name
    k = i - L
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None  # copies of the shared embedding / head
    if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
        return f"mtp.{k}.{rest}"
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.head_norm.weight"
    if rest.endswith("rotary_emb.inv_freq"):
        return None
    return f"mtp.{k}.block.{rest}"


def internal_to_hf(name: str, cfg: ModelConfig) -> str:
    if name == "lm_head.weight":
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        i, rest = cfg.num_hidden_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            rest = rest[len("block."):]
        elif rest == "head_norm.weight":
            rest = "shared_head.norm.weight"
        return f"model.layers.{i}.{rest}"
    return "model." + name


# ---- reading safetensors ---------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index (sharded) or the single file."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = {k: path / v for k, v in weight_map.items()}
        for name, f in files.items():  # every listed file's header is read (and checked) before anything is built
            if name not in _open(f).header:
                raise CheckpointError(f"{f}: the index lists tensor {name!r} but the file does not hold it")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
            hint = " (pickled .bin/.pt weights are never loaded: convert them to safetensors)" if bins else ""
            raise CheckpointError(f"{path}: no model.safetensors or {INDEX_FILE} found{hint}")
        names: dict[str, Path] = {}
        for f in files:
            for k in _open(f).keys():
                names[k] = f
        return names
    return {k: single for k in _open(single).keys()}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """A memory-mapped safetensors file read one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets),
    then raw little-endian data. Reading it directly (instead of safe_open) lets us validate every offset against
    the file size, so a truncated download fails with a clear message, and release each tensor's pages right
    after copying (madvise DONTNEED), so resident memory stays near the size of the loaded weights.
    """

    def __init__(self, path: Path):
        import mmap
        self.path = path
        if not path.exists():
            raise CheckpointError(f"{path}: file listed in the checkpoint is missing")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (no header)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes "
                                      f"in a file of {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
            self.base = 8 + n
            self.header = self._check_header(header, size)
            # get() trusts the checked header (offsets span exactly each shape's bytes), so no read fails midway
            # with a view of the mapping open, which made close() raise BufferError over the real error
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _check_header(self, header, size: int) -> dict:
        """Every entry a known dtype, a shape of non-negative ints and data_offsets spanning exactly that shape's
        bytes inside the file: what get() then trusts, so a malformed or short file fails here, by tensor name."""
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                  f"not an object)")
        header = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, info in header.items():
            def bad(what: str):
                return CheckpointError(f"{self.path}: corrupt safetensors header: tensor {name!r} {what}")
            if not isinstance(info, dict):
                raise bad(f"has {info!r} instead of dtype, shape and data_offsets")
            if info.get("dtype") not in _DTYPES:
                raise bad(f"has unsupported dtype {info.get('dtype')!r}")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise bad(f"has no valid shape ({shape!r})")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise bad(f"has no valid data_offsets ({offsets!r})")
            nbytes = math.prod(shape) * _DTYPES[info["dtype"]].itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise bad(f"declares shape {shape} ({nbytes} bytes) but data_offsets span "
                          f"{offsets[1] - offsets[0]} bytes")
            if self.base + offsets[1] > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte "
                                      f"{self.base + offsets[1]} but the file has {size} bytes")
        return header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def numel(self) -> int:
        return sum(math.prod(info["shape"]) for info in self.header.values())

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        import mmap
        info = self.header[name]
        dtype = _DTYPES[info["dtype"]]
        start, end = (self.base + o for o in info["data_offsets"])
        shape = info["shape"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        view = memoryview(self._mm)[start:end]
        with warnings.catch_warnings():  # the mapping is read-only; we clone before anyone could write
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(view, dtype=torch.uint8).clone().view(dtype).reshape(shape)
        view.release()
        page = mmap.PAGESIZE
        lo = start - start % page
        if hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return t

    def close(self):
        self._mm.close()


_OPEN: dict[Path, SafetensorsFile] = {}


def _open(f: Path) -> SafetensorsFile:
    if f not in _OPEN:
        _OPEN[f] = SafetensorsFile(f)
    return _OPEN[f]


def _close_all() -> None:
    for f in _OPEN.values():
        f.close()
    _OPEN.clear()


def _get(f: Path, name: str) -> torch.Tensor:
    return _open(f).get(name)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype=torch.float32) -> torch.Tensor:
    """w [out, in] float8_e4m3fn, scale_inv [ceil(out/bo), ceil(in/bi)] -> w * scale per block (edges partial)."""
    out_f, in_f = w.shape
    bo, bi = block
    expected = (math.ceil(out_f / bo), math.ceil(in_f / bi))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                              f"with {bo}x{bi} blocks (expected {expected})")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return (w.float() * s).to(dtype)


# ---- loading ---------------------------------------------------------------------------------------------
def _pick_dtype(hf: dict, dtype) -> torch.dtype:
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if hf.get("quantization_config"):
        return torch.bfloat16
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name if isinstance(name, str) else "",
                                                                     torch.float32)


# The fields that set tensor shapes. transformers fills the ones a config.json leaves out with its defaults (a
# missing hidden_size is 7168), and so do we; when the weights on disk then disagree, the error names the fields
# that were defaulted, which is nearly always the cause.
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "first_k_dense_replace", "moe_layer_freq", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
                "index_n_heads", "index_head_dim", "num_nextn_predict_layers")


def read_json(f: Path):
    """A JSON file's value; CheckpointError naming the file when it is missing or not JSON."""
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def from_pretrained(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
                    strict_mtp: bool = False, quantize: Optional[str] = None, group_size: int = 32) -> Transformer:
    """Load a Hugging Face DeepSeek folder (config.json + safetensors) into a `Transformer`.

    dtype: torch dtype or name; None = the checkpoint's (FP8 releases: bfloat16). If the checkpoint has no MTP
    tensors at all (transformers' save_pretrained drops them), the MTP modules are removed from the model.
    Nothing is allocated before config.json, every safetensors header and every tensor shape has been checked
    against each other, so a broken folder fails fast with one CheckpointError naming the file and the field or
    tensor, however large a model its config.json claims.
    quantize: "int8" | "int4" (group_size values per int4 scale): weight-only quantization (`nanoseek.quant`),
    done as the weights stream in: bitwise what quantizing the loaded float model gives, without holding it.
    A folder written by `nanoseek quantize` loads quantized as it is.
    A `.gguf` file (llama.cpp's deepseek2 / deepseek32 layout) loads through `nanoseek.gguf`.
    """
    path = Path(path)
    if path.suffix == ".gguf" and not path.is_dir():
        from nanoseek import gguf
        return gguf.load_model(path, dtype, device, quantize, group_size)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model folder)")
    cpath = path / "config.json"
    hf = read_json(cpath)
    try:
        cfg = ModelConfig.from_hf(hf)
    except ValueError as e:
        raise CheckpointError(f"{cpath}: {e}") from None
    saved = quant.saved_config(hf)
    qc = None if quantize is None else quant.QuantConfig(quantize, group_size)  # a bad format fails before loading
    if saved is None:
        dtype = _pick_dtype(hf, dtype)
    elif quantize is not None and (quantize != saved.format or (quantize == "int4" and group_size != saved.group_size)):
        raise CheckpointError(f"{path}: already quantized ({saved.format}, group {saved.group_size}); "
                              f"it cannot be re-quantized to {quantize} (quantize the float checkpoint)")
    qcfg = hf.get("quantization_config") or {}
    block = qcfg.get("weight_block_size", [128, 128]) if isinstance(qcfg, dict) else None
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise CheckpointError(f"{cpath}: quantization_config.weight_block_size must be two positive integers, "
                              f"got {block!r}")
    unset = [f for f in _SIZE_FIELDS if f not in hf]
    hint = f" (config.json does not set {', '.join(unset)}: the defaults were used)" if unset else ""

    _close_all()
    try:
        if saved is not None:  # built quantized: the float weights are never held
            return quant.load_quantized(path, hf, cfg, dtype, device)
        return _load(path, cfg, dtype, device, tuple(block), strict_mtp, hint, qc)
    finally:
        _close_all()


def _check_size(path: Path, cfg: ModelConfig, files: dict[str, Path], layers: set[int], hint: str) -> None:
    """The model config.json describes must fit in what the headers say is on disk, checked by arithmetic before
    anything is built: a config claiming 10^6 layers or a 7168-wide model over tiny weights stops here."""
    where = path / "config.json"
    if cfg.num_hidden_layers + cfg.num_nextn_predict_layers > len(layers):
        mtp = f" + num_nextn_predict_layers {cfg.num_nextn_predict_layers}" if cfg.num_nextn_predict_layers else ""
        raise CheckpointError(f"{where}: num_hidden_layers is {cfg.num_hidden_layers}{mtp} but the safetensors files "
                              f"hold {len(layers)} layer(s){hint}")
    implied = cfg.num_params(include_mtp=True)["total"]
    on_disk = sum(_open(f).numel() for f in set(files.values()))
    if implied > on_disk:
        sizes = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                               "intermediate_size", "n_routed_experts"))
        raise CheckpointError(f"{where}: describes a model of {implied:,} parameters ({sizes}) but the safetensors "
                              f"files hold {on_disk:,} values{hint}")


def _dst(params: dict[str, torch.Tensor], pname: str, j: Optional[int], part: Optional[str], I: int) -> torch.Tensor:
    """The parameter (or the slice of a fused expert tensor) a checkpoint tensor goes to."""
    p = params[pname]
    if j is None:
        return p
    return p[j] if part == "down_proj" else p[j, :I] if part == "gate_proj" else p[j, I:]


def _plan(path: Path, cfg: ModelConfig, files: dict[str, Path], params: dict[str, torch.Tensor], block,
          hint: str) -> list[tuple[str, str, Optional[int], Optional[str]]]:
    """(HF name, parameter, expert, part) for every tensor to copy, each shape checked against its header, and
    every unexpected or missing tensor reported: all from headers and a meta-device model, before allocation."""
    todo: dict[str, set] = {n: {None} for n in params if not n.startswith("rotary.")}
    for n in list(todo):
        if n.endswith("experts.gate_up_proj"):
            todo[n] = {(j, part) for j in range(cfg.n_routed_experts) for part in ("gate_proj", "up_proj")}
        elif n.endswith("experts.down_proj"):
            todo[n] = {(j, "down_proj") for j in range(cfg.n_routed_experts)}
    plan, unexpected = [], []
    for hf_name in sorted(files):
        if hf_name.endswith("_scale_inv"):
            continue
        internal = hf_to_internal(hf_name, cfg)
        if internal is None:
            continue
        m = _EXPERT_RE.match(internal)
        if m:
            j, part = int(m.group(2)), m.group(3)
            pname = m.group(1) + (".down_proj" if part == "down_proj" else ".gate_up_proj")
            if pname not in params or j >= cfg.n_routed_experts:
                unexpected.append(hf_name)
                continue
            todo[pname].discard((j, part))
        elif internal not in params:
            unexpected.append(hf_name)
            continue
        else:
            j = part = None
            pname = internal
            todo[pname] = set() if pname.endswith(("experts.gate_up_proj", "experts.down_proj")) else \
                todo[pname] - {None}
        sf = _open(files[hf_name])
        want, have = tuple(_dst(params, pname, j, part, cfg.moe_intermediate_size).shape), sf.shape(hf_name)
        if have != want:
            raise CheckpointError(f"{sf.path}: tensor {hf_name!r} has shape {have}, the config expects {want}{hint}")
        if sf.header[hf_name]["dtype"] == "F8_E4M3":
            sname = hf_name + "_scale_inv"
            if sname not in files:
                raise CheckpointError(f"{sf.path}: FP8 tensor {hf_name!r} has no {sname!r} beside it")
            expected = tuple(math.ceil(n / b) for n, b in zip(have, block))
            if len(have) != 2 or _open(files[sname]).shape(sname) != expected:
                raise CheckpointError(f"{files[sname]}: FP8 scale {sname!r} has shape "
                                      f"{_open(files[sname]).shape(sname)}, expected {expected} for {have} "
                                      f"with {block[0]}x{block[1]} blocks")
        plan.append((hf_name, pname, j, part))
    if cfg.tie_word_embeddings:
        todo.pop("lm_head.weight", None)
    missing = [n for n, rest in todo.items() if rest]
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) for this config, e.g. "
                              f"{', '.join(unexpected[:5])}{hint}")
    if missing:
        names = [internal_to_hf(n, cfg) for n in missing]
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              f"{', '.join(names[:5])}{hint}")
    return plan


def _load(path: Path, cfg: ModelConfig, dtype, device, block, strict_mtp: bool, hint: str,
          qc: Optional[quant.QuantConfig] = None) -> Transformer:
    files = _weight_files(path)
    layers = {int(m.group(1)) for n in files if (m := re.match(r"^model\.layers\.(\d+)\.", n))}
    has_mtp = any(i >= cfg.num_hidden_layers for i in layers)
    if cfg.num_nextn_predict_layers and not has_mtp and not strict_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    _check_size(path, cfg, files, layers, hint)
    with torch.device("meta"):
        model = Transformer(cfg)
    plan = _plan(path, cfg, files, {**dict(model.named_parameters()), **dict(model.named_buffers())}, block, hint)
    # in file order, each file front to back: one shard's pages at a time, read sequentially
    plan.sort(key=lambda p: (str(files[p[0]]), _open(files[p[0]]).header[p[0]]["data_offsets"][0]))
    if qc is not None:  # quantized on the meta device: shapes only, the float weights of these modules never exist
        model = quant.quantize_model(model, qc.format, qc.group_size)

    model = model.to(dtype).to_empty(device=device)  # cast on meta: never a float32 copy of the weights first
    if cfg.tie_word_embeddings:  # to_empty gives every module a new Parameter: tie the head to the embedding again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg).to(device)  # its tables are computed, not loaded: build them for real
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    I = cfg.moe_intermediate_size
    for hf_name, pname, j, part in plan:
        src = _get(files[hf_name], hf_name)
        if src.dtype == torch.float8_e4m3fn:
            sname = hf_name + "_scale_inv"
            src = dequantize_fp8(src, _get(files[sname], sname), block, torch.float32)
        _put(params, pname, j, part, I, src, dtype, qc)
        del src  # before the next tensor is read
    model.eval()
    return model


@torch.no_grad()
def _put(params: dict[str, torch.Tensor], pname: str, j: Optional[int], part: Optional[str], I: int,
         src: torch.Tensor, dtype: torch.dtype, qc: Optional[quant.QuantConfig]) -> None:
    """Copy one checkpoint tensor into its parameter, or quantize it into its codes, scale (and min) slices."""
    if pname + "_scale" not in params:
        _dst(params, pname, j, part, I).copy_(src)
        return
    codes = _dst(params, pname, j, part, I)
    # rounded to `dtype` first, on the model's device: what the float model this replaces held and quantized there
    w = src.to(device=codes.device, dtype=dtype)
    quant.quantize_into(w, *(_dst(params, n, j, part, I) if n in params else None
                             for n in (pname, pname + "_scale", pname + "_min")), qc.group_size)


# ---- saving ----------------------------------------------------------------------------------------------
def hf_state_dict(model: Transformer, dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, routed experts split per expert, MTP embedding/head copies added."""
    cfg = model.config
    sd = model.state_dict()
    I = cfg.moe_intermediate_size
    for name, t in sd.items():
        if name.startswith("rotary.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if not name.endswith("e_score_correction_bias") and dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        m = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if m:
            base = internal_to_hf(m.group(1), cfg)
            for j in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    yield f"{base}.{j}.gate_proj.weight", t[j, :I]
                    yield f"{base}.{j}.up_proj.weight", t[j, I:]
                else:
                    yield f"{base}.{j}.down_proj.weight", t[j]
            continue
        yield internal_to_hf(name, cfg), t
    for k in range(len(model.mtp)):
        i = cfg.num_hidden_layers + k
        emb = sd["embed_tokens.weight"]
        head = sd["lm_head.weight"] if "lm_head.weight" in sd else emb
        if dtype is not None:
            emb, head = emb.to(dtype), head.to(dtype)
        yield f"model.layers.{i}.embed_tokens.weight", emb
        yield f"model.layers.{i}.shared_head.head.weight", head


def save_pretrained(model: Transformer, path: str | os.PathLike, dtype=None,
                    max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write config.json + model.safetensors (sharded with an index above max_shard_bytes) in HF names. A
    quantized model (`nanoseek.quant`) is written in its own folder format, as `nanoseek quantize` does."""
    if getattr(model, "quantization", None) is not None:
        return quant.save_quantized(model, path)
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf = cfg.to_hf()
    first = next(iter(model.parameters()))
    out_dtype = dtype or first.dtype
    hf["torch_dtype"] = hf["dtype"] = str(out_dtype).replace("torch.", "")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_state_dict(model, out_dtype):
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata=meta)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---- command line: nanoseek convert | info ----------------------------------------------------------------
def cli(cmd: str, argv: list[str]) -> int:
    import argparse
    if cmd == "info":
        ap = argparse.ArgumentParser(prog="nanoseek info", description="config and parameter counts")
        ap.add_argument("model", help="HF model folder, a .gguf file or a preset name")
        a = ap.parse_args(argv)
        from nanoseek.config import PRESETS, get_preset
        try:
            if a.model.endswith(".gguf") and Path(a.model).is_file():
                from nanoseek.gguf import read_config
                cfg = read_config(a.model)
            else:
                cfg = get_preset(a.model) if a.model in PRESETS else ModelConfig.from_json(a.model)
        except (ValueError, FileNotFoundError) as e:  # the message names config.json and the field
            from nanoseek.cli import error
            return error("nanoseek info", e, 1)
        n = cfg.num_params()
        print(json.dumps(cfg.to_hf(), indent=2))
        print(f"parameters: {n['total']:,} total, {n['active']:,} activated per token; "
              f"KV cache {cfg.kv_cache_values_per_token()} values/token/layer")
        return 0
    ap = argparse.ArgumentParser(prog="nanoseek convert",
                                 description="load a checkpoint (FP8 included) and save it in HF layout")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args(argv)
    try:
        model = from_pretrained(a.src, dtype=a.dtype)
    except CheckpointError as e:
        from nanoseek.cli import error
        return error("nanoseek convert", e, 1)
    save_pretrained(model, a.dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(a.src) / f).exists():
            (Path(a.dst) / f).write_bytes((Path(a.src) / f).read_bytes())
    print(f"saved {a.dst}")
    return 0
