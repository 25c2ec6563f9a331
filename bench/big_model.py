"""A real-size model on this machine: DeepSeek-V2-Lite's exact shapes, streamed in quantized (issue 15 item 3).

    python bench/big_model.py [--dir /tmp/nanoseek-v2-lite-random] [--formats int8,int4] [--tokens 6]

Writes a random-weight checkpoint with the `deepseek-v2-lite` preset's shapes (15.7B parameters: bf16 shards of
~5 GB in HF names with model.safetensors.index.json, ~31 GB; reused when the folder already holds a complete one;
skipped with a message where the disk is too small). Random fill without torch.randn: one pool of random bf16 bit
patterns (random sign and mantissa, exponent 2^-6, so |w| in [1/64, 1/32): a sane scale for 2048-wide matmuls)
written at a random offset into each tensor, norms at 1 (their biases 0). Then, for each format, in a fresh process (so the peak is
that format's alone): `from_pretrained(dir, quantize=FORMAT)`, timed, with its peak RSS (VmHWM) right after the
load; then batch-1 greedy decode with the engine (bench/decode.py's `nanoseek_rate`: the rate of the steps after
the first token, after a warm-up run) and the fraction of the memory-bandwidth bound it reaches: bytes read per
token (every non-expert weight at its stored size, codes + scales + mins, the embedding one row; the shared
experts; num_experts_per_tok routed experts per layer) over the bandwidth bench/decode.py measures (copy and
read), measured just before and after the timing, keeping the higher.
Targets (issue 15): peak RSS <= 20 GB for int8, <= 12 GB for int4; decode >= 50% of the bandwidth bound.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_DIR = Path("/tmp/nanoseek-v2-lite-random")
SHARD_BYTES = 5 * 10 ** 9
POOL_VALUES = 1 << 25  # 64 MB of bf16 bit patterns
CHUNK_VALUES = 1 << 24


# ---- the checkpoint --------------------------------------------------------------------------------------
def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of a checkpoint of this config, from a meta-device model."""
    from nanoseek.checkpoint import hf_state_dict
    from nanoseek.model.transformer import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    return [(name, tuple(t.shape)) for name, t in hf_state_dict(model)]


def constant(name: str, ones, zeros):
    """The fill of a norm's scale (1) or bias (0, DSA's indexer LayerNorm); None for the random weights."""
    return ones if name.endswith("norm.weight") else zeros if name.endswith("norm.bias") else None


def write_checkpoint(cfg, path: Path) -> None:
    """config.json, shards and the index (written last: its presence marks a complete folder)."""
    import numpy as np
    specs = tensor_specs(cfg)
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, POOL_VALUES, dtype=np.uint16)
    exponent = 127 - 6  # 2^-6: |w| in [1/64, 1/32)
    pool = (bits & 0x807F) | np.uint16(exponent << 7)  # keep sign and 7 mantissa bits, set the exponent
    ones = np.full(CHUNK_VALUES, 0x3F80, dtype=np.uint16)  # bf16 1.0
    zeros = np.zeros(CHUNK_VALUES, dtype=np.uint16)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)  # data aligned to 8 bytes, as safetensors writes it
        with open(path / fname, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name, shape in shard:
                left = math.prod(shape)
                start = int(rng.integers(0, POOL_VALUES))
                fill = constant(name, ones, zeros)
                while left:
                    if fill is not None:
                        chunk = fill[:min(left, CHUNK_VALUES)]
                    else:
                        chunk = pool[start:start + min(left, CHUNK_VALUES)]
                        start = (start + len(chunk)) % POOL_VALUES
                    f.write(memoryview(chunk))
                    left -= len(chunk)
        total += offset
        print(f"  wrote {fname} ({offset / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s so far)", flush=True)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def complete(cfg, path: Path) -> bool:
    """Whether `path` already holds this config's checkpoint (index present, every tensor in a file of the
    right size)."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return False
    weight_map = json.loads(index.read_text())["weight_map"]
    if sorted(weight_map) != sorted(name for name, _ in tensor_specs(cfg)):
        return False
    from nanoseek.checkpoint import CheckpointError, SafetensorsFile
    try:
        for fname in set(weight_map.values()):
            SafetensorsFile(path / fname).close()  # checks every offset against the file size
    except CheckpointError:
        return False
    return True


# ---- one load, in its own process -------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def activated_bytes(model) -> int:
    """Bytes a decode token reads at their stored size: every tensor but the MTP layers' and the rotary tables,
    the embedding one row, routed experts num_experts_per_tok of n_routed_experts."""
    cfg = model.config
    n = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(("mtp.", "rotary.")):
            continue
        b = t.numel() * t.element_size()
        if name == "embed_tokens.weight":
            b = t.shape[1] * t.element_size()
        elif ".experts.gate_up_proj" in name or ".experts.down_proj" in name:
            b = b // t.shape[0] * cfg.num_experts_per_tok
        n += b
    return n


def one_load(path: Path, fmt: str, tokens: int, prompt_len: int) -> dict:
    from decode import bandwidth_gbs, nanoseek_rate, read_bandwidth_gbs
    import nanoseek
    from nanoseek import quant
    from nanoseek.kernels import hugepages
    t0 = time.perf_counter()
    model = nanoseek.from_pretrained(path, quantize=fmt)
    load_s = time.perf_counter() - t0
    out = {"format": fmt, "load_s": load_s, "peak_rss_load": peak_rss_bytes(), "model_bytes": quant.bytes_of(model),
           "activated_bytes": activated_bytes(model)}
    prompt = [int(x) for x in torch.randint(0, model.config.vocab_size, (prompt_len,), generator=torch.Generator()
                                            .manual_seed(0))]
    # what the engine does (`nanoseek/kernels/hugepages.py`): the weights into huge pages where this system offers
    # them and the move's memory is free; the bound is measured in the memory they are in
    huge = hugepages.place(model) > 0
    bw, bw_read = bandwidth_gbs(huge=huge), read_bandwidth_gbs(huge=huge)
    rate = nanoseek_rate(model, prompt, tokens, repeats=1)
    out.update(tok_s=rate, bw_copy=max(bw, bandwidth_gbs(huge=huge)),
               bw_read=max(bw_read, read_bandwidth_gbs(huge=huge)), peak_rss_decode=peak_rss_bytes(), huge_pages=huge)
    return out


# ---- driver ----------------------------------------------------------------------------------------------
TARGET_RSS = {"int8": 20e9, "int4": 12e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="checkpoint folder (written if not complete)")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--tokens", type=int, default=6, help="decoded tokens per timed run (the first excluded)")
    ap.add_argument("--prompt", type=int, default=4, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--one", choices=("int8", "int4"), help=argparse.SUPPRESS)  # the child: one load, JSON out
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(one_load(a.dir, a.one, a.tokens, a.prompt)))
        return 0

    from nanoseek.config import get_preset
    cfg = get_preset("deepseek-v2-lite")
    n = cfg.num_params()
    need = n["total"] * 2
    print(f"deepseek-v2-lite shapes: {n['total'] / 1e9:.2f}B parameters ({n['active'] / 1e9:.2f}B activated), "
          f"{need / 1e9:.1f} GB in bf16; checkpoint {a.dir}")
    if complete(cfg, a.dir):
        print("  reusing the checkpoint there")
    else:
        a.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(a.dir).free + sum(f.stat().st_size for f in a.dir.glob("*.safetensors"))
        if free < need * 1.05:
            print(f"skipped: {a.dir} has {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB "
                  f"(give --dir on a larger disk)")
            return 0
        for f in a.dir.glob("*.safetensors"):
            f.unlink()
        t = time.perf_counter()
        write_checkpoint(cfg, a.dir)
        print(f"  written in {time.perf_counter() - t:.0f} s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    print(f"{a.threads} threads; bound = activated bytes per token / bandwidth (copy and read, the higher of the "
          f"measurements before and after the timing)")
    print("| format | weights GB | peak RSS at load GB (target) | after decode GB | load s | activated MB/token | "
          "weights in huge pages | decode tok/s | of bound (copy) | of bound (read) |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for fmt in a.formats.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", fmt, "--dir", str(a.dir), "--tokens", str(a.tokens),
                            "--prompt", str(a.prompt), "--threads", str(a.threads)], capture_output=True, text=True,
                           env=env)
        if r.returncode:
            print(f"{fmt}: the load failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            continue
        r = json.loads(r.stdout.splitlines()[-1])
        act = r["activated_bytes"]
        ok = "ok" if r["peak_rss_load"] <= TARGET_RSS[fmt] else "OVER"
        print(f"| {fmt} | {r['model_bytes'] / 1e9:.2f} | {r['peak_rss_load'] / 1e9:.2f} "
              f"(<= {TARGET_RSS[fmt] / 1e9:.0f}: {ok}) | {r['peak_rss_decode'] / 1e9:.2f} | {r['load_s']:.0f} | "
              f"{act / 1e6:.0f} | {'yes' if r['huge_pages'] else 'no'} | {r['tok_s']:.2f} | "
              f"{act / (r['bw_copy'] * 1e9) * r['tok_s']:.0%} "
              f"({r['bw_copy']:.1f} GB/s) | {act / (r['bw_read'] * 1e9) * r['tok_s']:.0%} ({r['bw_read']:.1f} GB/s) |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
