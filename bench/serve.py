"""Serving throughput: aggregate generated tokens/s with 1, 4 and 16 concurrent streaming clients.

    python bench/serve.py                      # a random `small` model (built in a temp folder), float32
    python bench/serve.py --preset tiny --dtype bfloat16 --max-tokens 128
    python bench/serve.py --model-dir path/to/hf_folder

Starts `nanoseek serve` as a separate process on 127.0.0.1 (so the clients do not share its interpreter), then
for each concurrency level C runs C clients that each send --requests streaming /v1/completions requests one
after the other (distinct prompts, ignore_eos, fixed max_tokens, so every request generates exactly max_tokens).
Aggregate tokens/s = all generated tokens / the level's wall time. Client-side time to first token and
inter-token latency are reported beside it. The levels run --repeat times in turn (1, 4, 16, 1, 4, 16, ...) and
the table keeps each level's fastest run: on a shared machine, other load only ever slows a run down. Continuous
batching is what makes 16 clients faster than one: the target is 16 clients >= 4x one client.

Decoding on a CPU is bound by reading the weights, and a MoE step reads every expert that any of its requests
routes to. So the bench also prints the weight bytes of a decode step with 1 and with C requests (routing spread
uniformly and independently: E(1 - (1 - k/E)^C) of the E routed experts per MoE layer) and the speed-up they allow
at equal bandwidth, C x bytes(1) / bytes(C): the most C clients can make over one if both run at the same
fraction of the memory bandwidth.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import nanoseek
from nanoseek import precision

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
WORDS = ("king queen ghost fool nurse friar duke page clown witch lord lady soldier sailor porter herald "
         "moor jew shrew prince").split()


def build_model(out: Path, preset: str) -> Path:
    """A random model of `preset` with a byte-level BPE trained on Tiny Shakespeare (vocab = the preset's)."""
    from nanoseek.tokenizer import train_tokenizer
    cfg = nanoseek.get_preset(preset)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / "corpus.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8"), encoding="utf-8")
    tok = train_tokenizer([corpus], vocab_size=cfg.vocab_size, out_dir=out)
    cfg = cfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.Transformer(cfg), out)
    return out


def step_weight_bytes(model, rows: int, elem: int) -> tuple[float, float]:
    """(weight bytes a decode step of `model` with `rows` requests reads, expected distinct routed experts per MoE
    layer): every weight once, the embedding one row per request, and the routed experts that routing spread
    uniformly and independently would touch. MTP layers are not read by plain decoding."""
    cfg = model.config
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    distinct = E * (1 - (1 - k / E) ** rows) if E else 0.0
    n = 0.0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "embed_tokens.weight":
            n += p.numel() if cfg.tie_word_embeddings else rows * p.shape[1]  # tied: also the whole head
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            n += p.numel() / E * distinct
        else:
            n += p.numel()
    return n * elem, distinct


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, float, list[float]]:
    """-> (generated tokens, time to first token, inter-token gaps) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
    return tokens, first or 0.0, gaps


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker(c: int):
            out = []
            for r in range(requests):
                out.append(await one_request(client, f"Enter the {WORDS[c % len(WORDS)]}, scene {c}.{r}:",
                                             max_tokens))
            return out

        t0 = time.perf_counter()
        results = [x for per in await asyncio.gather(*(worker(c) for c in range(clients))) for x in per]
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    gaps = [g for r in results for g in r[2]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tok_s": tokens / wall, "ttft_ms": 1000 * statistics.mean(r[1] for r in results),
            "itl_ms": 1000 * statistics.mean(gaps) if gaps else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None, help="a model folder (default: build a random --preset model)")
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: the dtype `nanoseek serve --dtype auto` picks on this CPU")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each level; the fastest is kept")
    ap.add_argument("--speculative", choices=["mtp"], default=None)
    args = ap.parse_args()
    args.dtype = precision.dtype_names(args.dtype, what="serve")[0]
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else build_model(Path(tmp) / f"random-{args.preset}",
                                                                            args.preset)
        cfg = nanoseek.ModelConfig.from_json(model_dir)
        port = free_port()
        cmd = [sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--port", str(port), "--dtype", args.dtype,
               "--max-batch-size", str(max(levels)), "--log-level", "warning"]
        if args.speculative:
            cmd += ["--speculative", args.speculative]
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            t_end = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > t_end:
                    print("the server did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            asyncio.run(run_level(url, 1, 1, 8))  # warm-up
            runs = [asyncio.run(run_level(url, c, args.requests, args.max_tokens))
                    for _ in range(args.repeat) for c in levels]
            rows = [max((r for r in runs if r["clients"] == c), key=lambda r: r["tok_s"]) for c in levels]
        finally:
            server.terminate()
            server.wait(30)

    base = rows[0]["tok_s"]
    print(f"\nnanoseek serve {model_dir.name if args.model_dir else 'random ' + args.preset}, {args.dtype}, "
          f"{args.max_tokens} tokens/request, {args.requests} requests/client, best of {args.repeat}"
          f"{', MTP speculation' if args.speculative else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| clients | requests | tokens | seconds | tokens/s | vs 1 client | TTFT ms | ITL ms |")
    print("|--------:|---------:|-------:|--------:|---------:|------------:|--------:|-------:|")
    for r in rows:
        print(f"| {r['clients']:7d} | {r['requests']:8d} | {r['tokens']:6d} | {r['seconds']:7.2f} | "
              f"{r['tok_s']:8.1f} | {r['tok_s'] / base:10.2f}x | {r['ttft_ms']:7.1f} | {r['itl_ms']:6.1f} |")
    top = rows[-1]
    print(f"\n{top['clients']} clients: {top['tok_s'] / base:.2f}x one client (target >= 4x): "
          f"{'met' if top['tok_s'] >= 4 * base else 'NOT met'}")
    elem = 2 if args.dtype == "bfloat16" else 4
    with torch.device("meta"):  # shapes only
        model = nanoseek.Transformer(cfg)
    one, _ = step_weight_bytes(model, 1, elem)
    many, distinct = step_weight_bytes(model, top["clients"], elem)
    print(f"weight bytes per decode step (routing spread uniformly): {one / 1e6:.1f} MB with 1 request, "
          f"{many / 1e6:.1f} MB with {top['clients']} ({distinct:.1f} of {cfg.n_routed_experts} routed experts per "
          f"MoE layer): at equal bandwidth {top['clients']} clients can make at most "
          f"{top['clients'] * one / many:.2f}x one client")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
