"""Hugging Face checkpoint import/export: config.json + safetensors (single or sharded), FP8 dequantisation.

Reads what DeepSeek, transformers and other tools write for `deepseek_v2`, `deepseek_v3` and `deepseek_v32`:
- per-expert (`mlp.experts.j.{gate,up,down}_proj.weight`, DeepSeek's releases) or fused
  (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]) routed experts;
- MTP layers at index num_hidden_layers + k (their embedding / head copies are checked, not duplicated);
- DeepSeek's FP8 releases: float8_e4m3fn weights with fp32 `<name>_scale_inv` [ceil(out/128), ceil(in/128)];
  block (i, j) is fp8.float() * scale_inv[i, j], partial edge blocks included.
Loading is tensor by tensor from memory-mapped files into a model allocated once in the target dtype, so peak
memory stays near the final weights. Nothing is ever unpickled: safetensors and JSON only.

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
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return {k: path / v for k, v in weight_map.items()}
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
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.header = header
        for name, info in header.items():
            start, end = info["data_offsets"]
            if self.base + end > size:
                raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                                      f"{self.base + end} but the file has {size} bytes")

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        import mmap
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
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
    sf = _open(f)
    if name not in sf.header:
        raise CheckpointError(f"{f}: the index lists tensor {name!r} but the file does not hold it")
    return sf.get(name)


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
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def from_pretrained(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
                    strict_mtp: bool = False, quantize: Optional[str] = None, group_size: int = 32) -> Transformer:
    """Load a Hugging Face DeepSeek folder (config.json + safetensors) into a `Transformer`.

    dtype: torch dtype or name; None = the checkpoint's (FP8 releases: bfloat16). If the checkpoint has no MTP
    tensors at all (transformers' save_pretrained drops them), the MTP modules are removed from the model.
    quantize: "int8" | "int4" (group_size values per int4 scale): weight-only quantization (`nanoseek.quant`).
    A folder written by `nanoseek quantize` loads quantized as it is.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model folder)")
    try:
        hf = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    try:
        cfg = ModelConfig.from_hf(hf)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    saved = quant.saved_config(hf)
    if saved is None:
        dtype = _pick_dtype(hf, dtype)
    elif quantize is not None and (quantize != saved.format or (quantize == "int4" and group_size != saved.group_size)):
        raise CheckpointError(f"{path}: already quantized ({saved.format}, group {saved.group_size}); "
                              f"it cannot be re-quantized to {quantize} (quantize the float checkpoint)")
    qcfg = hf.get("quantization_config") or {}
    block = tuple(qcfg.get("weight_block_size", (128, 128)))

    _close_all()
    try:
        if saved is not None:  # built quantized: the float weights are never held
            return quant.load_quantized(path, hf, cfg, dtype, device)
        model = _load(path, cfg, dtype, device, block, strict_mtp)
    finally:
        _close_all()
    return model if quantize is None else quant.quantize_model(model, quantize, group_size)


def _load(path: Path, cfg: ModelConfig, dtype, device, block, strict_mtp: bool) -> Transformer:
    files = _weight_files(path)
    L = cfg.num_hidden_layers
    has_mtp = any(re.match(rf"^model\.layers\.(\d+)\.", n) and int(n.split(".")[2]) >= L for n in files)
    if cfg.num_nextn_predict_layers and not has_mtp and not strict_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = RotaryEmbedding(cfg).to(device)  # its tables are computed, not loaded: build them for real
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    todo: dict[str, set] = {n: {None} for n in params if not n.startswith("rotary.")}
    experts_per_layer = cfg.n_routed_experts
    for n in list(todo):
        if n.endswith("experts.gate_up_proj"):
            todo[n] = {(j, part) for j in range(experts_per_layer) for part in ("gate_proj", "up_proj")}
        elif n.endswith("experts.down_proj"):
            todo[n] = {(j, "down_proj") for j in range(experts_per_layer)}
    unexpected: list[str] = []
    I = cfg.moe_intermediate_size

    def tensor(name: str) -> torch.Tensor:
        t = _get(files[name], name)
        if t.dtype == torch.float8_e4m3fn:
            sname = name + "_scale_inv"
            if sname not in files:
                raise CheckpointError(f"FP8 tensor {name!r} has no {sname!r} beside it")
            t = dequantize_fp8(t, _get(files[sname], sname), block, torch.float32)
        return t

    def put(dst: torch.Tensor, src: torch.Tensor, label: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise CheckpointError(f"tensor {label!r} has shape {tuple(src.shape)}, the config expects "
                                  f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))

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
            if pname not in params or j >= experts_per_layer:
                unexpected.append(hf_name)
                continue
            p = params[pname]
            dst = p[j] if part == "down_proj" else p[j, :I] if part == "gate_proj" else p[j, I:]
            put(dst, tensor(hf_name), hf_name)
            todo[pname].discard((j, part))
            continue
        if internal not in params:
            unexpected.append(hf_name)
            continue
        put(params[internal], tensor(hf_name), hf_name)
        if internal.endswith("experts.gate_up_proj"):
            todo[internal] = set()
        elif internal.endswith("experts.down_proj"):
            todo[internal] = set()
        else:
            todo[internal].discard(None)
    if cfg.tie_word_embeddings:
        todo.pop("lm_head.weight", None)
    missing = [n for n, rest in todo.items() if rest]
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) for this config, e.g. "
                              f"{', '.join(unexpected[:5])}")
    if missing:
        names = [internal_to_hf(n, cfg) for n in missing]
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              f"{', '.join(names[:5])}")
    model.eval()
    return model


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
        ap.add_argument("model", help="HF model folder or a preset name")
        a = ap.parse_args(argv)
        from nanoseek.config import PRESETS, get_preset
        cfg = get_preset(a.model) if a.model in PRESETS else ModelConfig.from_json(a.model)
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
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_pretrained(model, a.dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(a.src) / f).exists():
            (Path(a.dst) / f).write_bytes((Path(a.src) / f).read_bytes())
    print(f"saved {a.dst}")
    return 0
