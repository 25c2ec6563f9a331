"""CUDA smoke check (run on a GPU machine): the same tiny model on CPU and CUDA, fp32 and bf16, full forward,
cached decode, engine generation and one training step. Prints one line per check; exits non-zero on failure.

    python bench/cuda_check.py
"""
import sys
import time

import torch

import nanoseek
from nanoseek.config import get_preset


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    ok = True
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cpu = nanoseek.Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ref = cpu(ids).logits
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
            gpu = nanoseek.Transformer(cfg).eval()
            gpu.load_state_dict(cpu.state_dict())
            gpu = gpu.to("cuda", dtype)
            out = gpu(ids.cuda()).logits.float().cpu()
            err = (out - ref).abs().max().item()
            cache = nanoseek.DenseCache(cfg, 2, 64, dtype=dtype, device="cuda")
            parts = [gpu(ids[:, :40].cuda(), cache=cache.step(40)).logits]
            for t in range(40, 64):
                parts.append(gpu(ids[:, t:t + 1].cuda(), cache=cache.step(1)).logits)
            derr = (torch.cat(parts, 1).float().cpu() - out).abs().max().item()
            good = err < tol and derr < tol
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} forward {dtype}: max|cuda-cpu| {err:.2e}, decode-vs-full {derr:.2e}")
    try:
        from nanoseek.engine import Engine, SamplingParams
        from nanoseek.tokenizer import train_from_documents
        tok = train_from_documents(["hello world " * 50, "the quick brown fox " * 50], 300)
        model = nanoseek.Transformer(cfg.replace(vocab_size=tok.vocab_size)).to("cuda", torch.bfloat16).eval()
        eng = Engine(model, tok, cache_bytes=64 << 20)
        t0 = time.time()
        outs = eng.generate([tok.encode("hello", add_bos=True)] * 4, SamplingParams(max_tokens=32, temperature=0))
        n = sum(o.num_generated for o in outs)
        print(f"ok   engine on cuda: {n} tokens in {time.time() - t0:.2f}s")
    except Exception as e:  # report and continue: the remaining checks are independent
        ok = False
        print(f"FAIL engine on cuda: {type(e).__name__}: {e}")
    m = nanoseek.Transformer(cfg).cuda().train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (4, 65), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    good = losses[-1] < losses[0]
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} train steps on cuda (bf16 autocast): {losses[0]:.3f} -> {losses[-1]:.3f}")
    print("device:", torch.cuda.get_device_name(), "grouped_mm:", hasattr(torch, "_grouped_mm"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
