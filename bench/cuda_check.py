"""CUDA check (run on a GPU machine): the same tiny model on CPU and CUDA, compared path by path. Prints one line
per check and exits non-zero if any fails.

    python bench/cuda_check.py

What it compares (CPU float32 is the reference; CUDA float32 must agree to rounding, bf16 loosely):
- full forward and cached decode (dense MLA, DSA past its top-k, MoE), float32 and bfloat16;
- cached decode with an 8-bit KV cache (fp8, int8) against the CPU's decode with the same format;
- int8 and int4 weights, loaded quantized from a saved folder (`from_pretrained(quantize=)`) onto each device;
- the serving engine's greedy tokens (paged cache; 8-bit KV; MTP speculative decoding) against the CPU engine's;
- training steps under bf16 autocast (the loss falls).
"""
import copy
import sys
import tempfile
import time

import torch

import nanoseek
from nanoseek.config import get_preset

RESULTS: list[bool] = []


def report(good: bool, what: str) -> None:
    RESULTS.append(bool(good))
    print(f"{'ok  ' if good else 'FAIL'} {what}", flush=True)


def guarded(fn):
    """Run one check; an exception is that check's failure, and the others still run."""
    def run(*args):
        try:
            fn(*args)
        except Exception as e:
            report(False, f"{fn.__name__}: {type(e).__name__}: {e}")
    return run


def decode(model, ids, dtype, device, kv_cache_dtype="auto", prefill=40):
    """Logits of a prefill of `prefill` tokens then one-token steps: [B, T, V] float32 on the CPU."""
    B, T = ids.shape
    cache = nanoseek.DenseCache(model.config, B, T, dtype=dtype, device=device, kv_cache_dtype=kv_cache_dtype)
    parts = [model(ids[:, :prefill].to(device), cache=cache.step(prefill)).logits]
    for t in range(prefill, T):
        parts.append(model(ids[:, t:t + 1].to(device), cache=cache.step(1)).logits)
    return torch.cat(parts, 1).float().cpu()


@guarded
def forward_and_decode(cfg, cpu, ids):
    ref = cpu(ids).logits
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.15)):
        gpu = copy.deepcopy(cpu).to("cuda", dtype)
        out = gpu(ids.cuda()).logits.float().cpu()
        err = (out - ref).abs().max().item()
        derr = (decode(gpu, ids, dtype, "cuda") - out).abs().max().item()
        report(err < tol and derr < tol, f"forward {dtype}: max|cuda-cpu| {err:.2e}, decode-vs-full {derr:.2e} "
               f"(limit {tol})")


@guarded
def kv8_decode(cfg, cpu, ids):
    gpu = copy.deepcopy(cpu).cuda()
    for fmt in ("fp8", "int8"):
        ref = decode(cpu, ids, torch.float32, "cpu", fmt)
        out = decode(gpu, ids, torch.float32, "cuda", fmt)
        err = (out - ref).abs().max().item()
        # the same rows quantize to the same codes on both devices unless a value sits on a rounding edge
        report(err < 1e-3, f"decode with a {fmt} KV cache: max|cuda-cpu| {err:.2e} (limit 1e-3)")


@guarded
def quantized(cfg, cpu, ids):
    full = cpu(ids).logits
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(cpu, d)
        for fmt in ("int8", "int4"):
            q_cpu = nanoseek.from_pretrained(d, dtype=torch.float32, quantize=fmt)
            q_gpu = nanoseek.from_pretrained(d, dtype=torch.float32, device="cuda", quantize=fmt)
            ref = q_cpu(ids).logits
            out = q_gpu(ids.cuda()).logits.float().cpu()
            err = (out - ref).abs().max().item()
            derr = (decode(q_gpu, ids, torch.float32, "cuda") - out).abs().max().item()
            off = (ref - full).abs().max().item()
            report(err < 1e-4 and derr < 1e-4, f"{fmt} weights: max|cuda-cpu| {err:.2e}, decode-vs-full {derr:.2e} "
                   f"(quantization itself moves logits by {off:.2e})")


@guarded
def engine(cfg, cpu, ids):
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.tokenizer import train_from_documents
    tok = train_from_documents(["hello world " * 50, "the quick brown fox jumps " * 50], 300)
    torch.manual_seed(1)
    model = nanoseek.Transformer(cfg.replace(vocab_size=tok.vocab_size)).eval()
    prompts = [tok.encode(p, add_bos=True) for p in ("hello", "the quick", "brown fox jumps over", "world")]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for opts in ({}, {"kv_cache_dtype": "int8"}, {"speculative": "mtp", "num_draft": 1}):
        ref = [o.new_token_ids for o in Engine(model, tok, cache_bytes=16 << 20, **opts).generate(prompts, params)]
        eng = Engine(copy.deepcopy(model).cuda(), tok, cache_bytes=16 << 20, **opts)
        t0 = time.time()
        got = [o.new_token_ids for o in eng.generate(prompts, params)]
        same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
        total = sum(len(r) for r in ref)
        report(got == ref, f"engine {opts or 'float32'}: {same}/{total} greedy tokens equal to the CPU engine's "
               f"({time.time() - t0:.2f} s)")
    eng = Engine(copy.deepcopy(model).to("cuda", torch.bfloat16), tok)
    outs = eng.generate(prompts, params)
    report(all(o.num_generated == 24 for o in outs), "engine bfloat16, default cache size: 4 x 24 tokens")


@guarded
def training(cfg, cpu, ids):
    torch.manual_seed(0)
    m = nanoseek.Transformer(cfg).cuda().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (4, 65), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nanoseek.model.transformer.cross_entropy(m(x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    report(losses[-1] < losses[0], f"train steps on cuda (bf16 autocast): {losses[0]:.3f} -> {losses[-1]:.3f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.manual_seed(0)
    cfg = get_preset("tiny")  # DSA top-k 32 < T = 64: the sparse path runs
    cpu = nanoseek.Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        for check in (forward_and_decode, kv8_decode, quantized, engine):
            check(cfg, cpu, ids)
    training(cfg, cpu, ids)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{sum(RESULTS)}/{len(RESULTS)} checks passed")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
