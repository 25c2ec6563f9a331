"""Decode speed: nanoseek's engine vs transformers `generate` (batch 1) or llama.cpp (batch 1, and prefill and
decode of several sequences at once), same weights, one run.

    python bench/decode.py [--preset small | --model FOLDER] [--prompt 64] [--tokens 64] [--threads N]
    python bench/decode.py --dtypes all --quantize int8,int4 [--quant-group-size 32]  # weight-only arms too
    python bench/decode.py --peer llamacpp [--dtypes float32] [--peer-threads 1,2] [--sequences 8]  # or --peer all
    python bench/decode.py --peer llamacpp --quantize int8,int4  # + nanoseek int8 / Q8_0, int4 / Q4_1

Builds the preset with random weights, saves it in HF layout, loads it with nanoseek.from_pretrained and with
transformers' AutoModelForCausalLM, and times greedy decoding (float32 and bfloat16). Decode rate excludes the
prefill: nanoseek times the engine steps after the first token; transformers times generate(N) - generate(1)
(best of --repeats). The memory-bandwidth bound is measured in the same run, twice: a large tensor copy
(read + write bytes) and a large sum (read only), each just before and just after nanoseek's timing of a dtype,
keeping the higher; the achieved fraction is (activated weight bytes per token / bandwidth) / measured time per
token, for each bandwidth, where activated weights = everything a decode token
reads: all non-expert matrices (the embedding counts one row), the shared experts, and num_experts_per_tok
routed experts per MoE layer, each tensor at its stored size (a quantized model's codes, scales and mins).
`--quantize` adds, per dtype, an arm for each weight-only format (`nanoseek.quant`, with its CPU kernels
`nanoseek/kernels/cpu_quant.c`): its rate and bound from its own bytes, its ratio against transformers running
the float weights of that dtype (transformers has no such format on CPU). For each arm it also reports how much
of a token is spent inside the C kernels (`cpu_decode.c`, and `cpu_quant.c` for the quantized arms) and at what
bandwidth, and for the float arms the rate the kernels' own matvec streams
a 256 MB matrix at (what streaming weights can reach on this machine). KV cache bytes per token: nanoseek's from
its config, transformers' measured from its cache objects, and both for the deepseek-v3.2 shape by arithmetic.

`--peer llamacpp` times llama.cpp instead (`bench/llamacpp.py`: the source of a pinned llama-cpp-python sdist,
fetched with pip and built once; the model converted by llama.cpp's own convert_hf_to_gguf.py, f32 for float32 and
bf16 for bfloat16, and nanoseek loading that same GGUF file), with nanoseek at the same thread counts right before
it, one thread count at a time: `llama-bench` decodes --tokens - 1 tokens after a --prompt-token context (`-d`),
the positions of nanoseek's timed steps, best of --repeats on both sides; then `llama-batched-bench` prefills 1
and --sequences prompts of --prompt tokens at once and decodes --tokens - 1 steps of one token per sequence, with
nanoseek's engine doing the same with as many requests (prefill and decode tokens/s, two ratios). With
`--quantize`, the same two tables get quantized arms, each file read by both sides, nanoseek quantizing it at
load into its own format (`nanoseek.gguf` dequantizes, `nanoseek.quant` quantizes) and its activations in each
--dtypes dtype: "int8 / Q8_0" is the converter's --outtype q8_0 file, nanoseek int8 (one scale per row) against
llama.cpp's Q8_0 (one scale per 32 values); "int4 G32 / Q4_1" is llama-quantize's Q4_1 of the f32 file (head
Q8_0, as nanoseek keeps an int4 model's head int8), nanoseek int4 at group 32 (a scale and a min per 32 values,
as Q4_1's blocks; --quant-group-size is for the transformers arms). A third table gives, per arm, the weight bytes
a decode token reads on each side: nanoseek's `activated_bytes`, llama.cpp's the same count over the GGUF's
tensor sizes, by tensor type. Where llama.cpp cannot be fetched, built, fed or run, or nanoseek cannot read a
file, one line says why (per arm, where it is the arm's) and the rest of the bench runs.

`--kv-cache-dtypes auto,fp8,int8` adds nanoseek's decode rate with each KV-cache dtype (`--peer none`: only that).
`--pages` adds nanoseek's decode rate with its weights and KV cache in 4 KB pages against transparent huge pages
(the engine's default on CPU), at each --peer-threads count.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

import llamacpp
import nanoseek
from nanoseek import precision, quant
from nanoseek.checkpoint import CheckpointError
from nanoseek.config import ModelConfig, get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.kernels import hugepages


def buffer(nbytes: int, huge: Optional[bool] = None) -> torch.Tensor:
    """uint8 [nbytes] in the memory the engine keeps weights in, so that the bound is that memory's: huge pages
    where this system offers them (`nanoseek/kernels/hugepages.py`; huge=False: 4 KB pages, as a model the engine
    could not move)."""
    huge = hugepages.supported() if huge is None else huge and hugepages.supported()
    return hugepages.empty(nbytes) if huge else torch.empty(nbytes, dtype=torch.uint8)


def bandwidth_gbs(mb: int = 512, repeats: int = 5, huge: Optional[bool] = None) -> float:
    """Best-of copy bandwidth in GB/s, counting the read and the write (`buffer` memory)."""
    a = buffer(mb << 20, huge)
    a.fill_(1)
    b = buffer(mb << 20, huge)
    b.fill_(0)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() / best / 1e9


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5, huge: Optional[bool] = None) -> float:
    """Best-of read bandwidth in GB/s: a sum over a large fp32 tensor (what streaming weights needs; `buffer`
    memory)."""
    a = buffer(mb << 20, huge).view(torch.float32).fill_(1)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def matvec_bandwidth_gbs(dtype: torch.dtype, mb: int = 256, width: int = 384, repeats: int = 5) -> Optional[float]:
    """Best-of GB/s of the decode kernels' own matvec (`ns_linear`, one row of x) over a weight matrix of this
    dtype far larger than the caches: what streaming weights can reach here, for reference (None without the
    kernels)."""
    from nanoseek.kernels import cpu_decode
    if cpu_decode.library(dtype) is None:
        return None
    elem = torch.empty((), dtype=dtype).element_size()
    rows = (mb << 20) // (elem * width)
    w = buffer(rows * width * elem).view(dtype).view(rows, width).fill_(1)
    x = torch.ones(1, width, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        cpu_decode.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return w.numel() * elem / best / 1e9


def activated_bytes(model) -> int:
    """Bytes a decode token reads, each weight tensor at its stored size: parameters, and a quantized model's
    codes, scales and mins (buffers); the embedding one row, the routed experts num_experts_per_tok of E."""
    cfg = model.config
    n = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(("mtp.", "rotary.")):
            continue
        b = t.numel() * t.element_size()
        if name == "embed_tokens.weight":
            b //= t.shape[0]  # one row per token
        elif ".experts." in name:  # routed experts [E, ...]: gate_up_proj, down_proj and their scales / mins
            b = b // t.shape[0] * cfg.num_experts_per_tok
        n += b
    return n


def nanoseek_rate(model, prompt, n_tokens, repeats, kv_cache_dtype: str = "auto", clock=time.perf_counter,
                  huge_pages: Optional[bool] = None) -> float:
    engine = Engine(model, None, max_batch_size=1, kv_cache_dtype=kv_cache_dtype, huge_pages=huge_pages)
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    best = float("inf")
    for r in range(repeats + 1):  # the first run warms up
        engine.add_request(f"r{r}", prompt, params)
        engine.step()  # prefill + first token
        t = clock()
        while engine.has_unfinished():
            engine.step()
        if r:
            best = min(best, clock() - t)
    return (n_tokens - 1) / best


def nanoseek_batched_rates(model, prompts: list[list[int]], n_gen: int, repeats: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s of the engine running len(prompts) sequences at once, as llama-batched-bench
    times its side: the prompts admitted together and prefilled (until every sequence has its first token), then
    n_gen steps that decode one token for every sequence; best of repeats after a warm-up run."""
    engine = Engine(model, None, max_batch_size=len(prompts))
    params = SamplingParams(max_tokens=n_gen + 1, temperature=0, ignore_eos=True)
    best_pp = best_tg = float("inf")
    for r in range(repeats + 1):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{r}-{i}", p, params)
        t0, started = time.perf_counter(), set()
        while len(started) < len(prompts):
            started.update(o.request_id for o in engine.step())
        t1 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        if r:
            best_pp, best_tg = min(best_pp, t1 - t0), min(best_tg, time.perf_counter() - t1)
    return sum(map(len, prompts)) / best_pp, len(prompts) * n_gen / best_tg


def kernel_time_per_token(model, prompt, n_tokens, dtype) -> Optional[float]:
    """Seconds per decoded token spent inside the C kernels (`nanoseek/kernels/cpu_decode.c`, `cpu_quant.c`),
    the ctypes calls alone: what a step would cost with no Python or PyTorch around them. None where they do
    not run."""
    from nanoseek.kernels import cpu_decode, cpu_quant
    lib, qlib = cpu_decode.library(dtype), cpu_quant.library()
    if lib is None and qlib is None:
        return None
    spent = [0.0]

    class Timed:
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            fn = getattr(self.lib, name)

            def timed(*a):
                t = time.perf_counter()
                r = fn(*a)
                spent[0] += time.perf_counter() - t
                return r
            return timed

    engine = Engine(model, None, max_batch_size=1)
    engine.add_request("k", prompt, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
    engine.step()
    cpu_decode._libs[dtype] = Timed(lib) if lib is not None else None
    cpu_quant._lib = Timed(qlib) if qlib is not None else None
    try:
        while engine.has_unfinished():
            engine.step()
    finally:
        cpu_decode._libs[dtype], cpu_quant._lib = lib, qlib
    return spent[0] / (n_tokens - 1) if spent[0] else None


def hf_rate(model, prompt, n_tokens, repeats) -> float:
    ids = torch.tensor([prompt])

    def run(n):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    run(2)
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(n_tokens) for _ in range(repeats))
    return (n_tokens - 1) / max(tn - t1, 1e-9)


def hf_cache_bytes_per_token(model, prompt) -> int:
    """Bytes of every tensor held by transformers' cache after a prompt, per prompt token."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
    cache = out.past_key_values
    seen, total = set(), 0

    def walk(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif depth < 3 and hasattr(obj, "__dict__"):
            for x in vars(obj).values():
                walk(x, depth + 1)
    walk(cache)
    return total // len(prompt)


def latent_bytes_per_token(cfg, elem: int) -> int:
    return cfg.num_hidden_layers * cfg.kv_cache_values_per_token() * elem


def full_kv_bytes_per_token(cfg, elem: int) -> int:
    """A cache of expanded per-head keys and values (what an MLA-unaware cache holds)."""
    return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem


def transformers_comparison(args, cfg, prompt) -> None:
    rows, notes, bws = [], [], []
    with tempfile.TemporaryDirectory() as d:
        from transformers import AutoModelForCausalLM

        if args.model:
            d = args.model
        else:
            nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            elem = torch.empty((), dtype=dtype).element_size()
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            r_hf = hf_rate(hf, prompt, args.tokens, args.repeats)
            hf_kv = hf_cache_bytes_per_token(hf, prompt)
            del hf
            for q in [None] + args.quantize:
                arm = name if q is None else f"{name} {q}" + (f" G{args.quant_group_size}" if q == "int4" else "")
                ns = nanoseek.from_pretrained(d, dtype=dtype, quantize=q, group_size=args.quant_group_size)
                bw0, bw_read0 = bandwidth_gbs(), read_bandwidth_gbs()
                r_ns = nanoseek_rate(ns, prompt, args.tokens, args.repeats)
                # this machine's bandwidth drifts: the bound takes the higher of the measurements just before and
                # just after the timing (the fraction is then the lower of the two)
                bw_d, bw_read_d = max(bw0, bandwidth_gbs()), max(bw_read0, read_bandwidth_gbs())
                bws.append((arm, bw_d, bw_read_d))
                k_s = kernel_time_per_token(ns, prompt, args.tokens, dtype)
                act = activated_bytes(ns)
                frac = act / (bw_d * 1e9) * r_ns
                frac_read = act / (bw_read_d * 1e9) * r_ns
                rows.append((arm, r_ns, r_hf, act, frac, frac_read, latent_bytes_per_token(cfg, elem), hf_kv))
                if k_s:
                    notes.append(f"{arm}: {k_s * 1e3:.2f} ms of each {1e3 / r_ns:.2f} ms token are spent inside the "
                                 f"C kernels ({act / k_s / 1e9:.1f} GB/s over the activated bytes); the rest is "
                                 f"Python and PyTorch around them")
                    bw_mv = matvec_bandwidth_gbs(dtype) if q is None else None
                    if bw_mv:
                        notes.append(f"{arm}: the kernels' matvec streams a 256 MB matrix at {bw_mv:.1f} GB/s "
                                     f"here; against that rate, decode reaches {act / (bw_mv * 1e9) * r_ns:.0%}")
                del ns

    print("| weights | nanoseek tok/s | transformers tok/s (float) | ratio | activated MB/token | of bandwidth bound "
          "(copy) | of bandwidth bound (read) |")
    print("|---|---|---|---|---|---|---|")
    for name, r_ns, r_hf, act, frac, frac_read, _, _ in rows:
        print(f"| {name} | {r_ns:.1f} | {r_hf:.1f} | {r_ns / r_hf:.2f}x | {act / 1e6:.1f} | {frac:.0%} | "
              f"{frac_read:.0%} |")
    for name, b, br in bws:
        print(f"{name}: bound from copy {b:.1f} GB/s and read {br:.1f} GB/s, the higher of the measurements "
              f"just before and after its timing")
    for n in notes:
        print(n)
    print("\nKV cache bytes per token (all layers)")
    print("| model | dtype | nanoseek (latent + indexer key) | transformers (measured) | expanded per-head K+V |")
    print("|---|---|---|---|---|")
    for name, *_, ns_kv, hf_kv in rows:
        if " " in name:  # a quantized arm: the cache is its dtype's
            continue
        elem = torch.empty((), dtype=getattr(torch, name)).element_size()
        print(f"| {args.model or args.preset} | {name} | {ns_kv:,} | {hf_kv:,} | "
              f"{full_kv_bytes_per_token(cfg, elem):,} |")
    big = get_preset("deepseek-v3.2")
    print(f"| deepseek-v3.2 | bfloat16 | {latent_bytes_per_token(big, 2):,} | (not instantiated) | "
          f"{full_kv_bytes_per_token(big, 2):,} |")


def kv_cache_comparison(args, cfg, prompt) -> None:
    """nanoseek's decode rate with each --kv-cache-dtypes value, per dtype, in one run (interleaved, best of
    --repeats each), by the wall clock and by this process's CPU time (with --threads 1, the rate a busy shared
    machine does not lower): an 8-bit cache bypasses the whole-stack CPU decode and dequantizes on every read."""
    kinds = args.kv_cache_dtypes.split(",")
    clocks = {"wall": time.perf_counter, "CPU time": time.process_time}
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
        print("\n| dtype | clock | " + " | ".join(f"KV {k} tok/s" for k in kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for name in args.dtypes.split(","):
            ns = nanoseek.from_pretrained(d, dtype=getattr(torch, name))
            best = {(c, k): 0.0 for c in clocks for k in kinds}
            for _ in range(2):  # interleaved rounds: the machine's speed drifts
                for c, clock in clocks.items():
                    for k in kinds:
                        best[c, k] = max(best[c, k], nanoseek_rate(ns, prompt, args.tokens, args.repeats, k, clock))
            for c in clocks:
                print(f"| {name} | {c} | " + " | ".join(f"{best[c, k]:.1f}" for k in kinds) + " |")
            del ns


def pages_comparison(args, cfg, prompt) -> None:
    """nanoseek's decode rate with its weights and KV cache pool in 4 KB pages (`Engine(huge_pages=False)`) and in
    transparent huge pages (the engine's default on CPU, `nanoseek/kernels/hugepages.py`), per dtype and
    --peer-threads count: two copies of the same weights, interleaved rounds, best of --repeats each."""
    if not hugepages.supported():
        print(f"\npages comparison skipped: no transparent huge pages here (mode {hugepages.mode() or 'none'})")
        return
    threads, prev = [int(t) for t in args.peer_threads.split(",")], torch.get_num_threads()
    print("\nDecode with the weights and KV cache in 4 KB pages and in huge pages (batch 1)")
    print("| dtype | threads | 4 KB pages tok/s | huge pages tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
        for name in args.dtypes.split(","):
            models = {huge: nanoseek.from_pretrained(d, dtype=getattr(torch, name)) for huge in (False, True)}
            best = {}
            try:
                for _ in range(2):  # interleaved rounds: the machine's speed drifts
                    for t in threads:
                        torch.set_num_threads(t)
                        for huge, m in models.items():
                            r = nanoseek_rate(m, prompt, args.tokens, args.repeats, huge_pages=huge)
                            best[t, huge] = max(best.get((t, huge), 0.0), r)
            finally:
                torch.set_num_threads(prev)
            for t in threads:
                print(f"| {name} | {t} | {best[t, False]:.1f} | {best[t, True]:.1f} | "
                      f"{best[t, True] / best[t, False]:.2f}x |")
            del models


def llamacpp_comparison(args, cfg, prompt) -> None:
    """nanoseek against llama.cpp on the same GGUF file (nanoseek reads it with `nanoseek.gguf`), per arm (each
    dtype, then each --quantize format against its llama.cpp type) and thread count: decode at batch 1
    (llama-bench), then prefill and decode of 1 and --sequences sequences at once (llama-batched-bench), and the
    weight bytes a token reads on each side; a line saying why where llama.cpp, or an arm, cannot run here."""
    try:
        src, tools = llamacpp.prepare()
    except llamacpp.Unavailable as e:
        print(f"llama.cpp peer skipped: {e}")
        return
    if cfg.use_dsa and cfg.index_head_dim < 64:
        # llama.cpp's deepseek32 graph rotates the indexer's heads with Hadamard matrices of 64 and up and aborts on
        # narrower heads (tiny: 16). Up to index_topk past tokens DSA attends to every token, so without its
        # indexer the preset computes the same attention there; both sides run that model.
        dense = args.prompt + args.tokens <= cfg.index_topk
        print(f"llama.cpp: both sides run {args.preset} as deepseek_v3, without the DSA indexer (llama.cpp's "
              f"deepseek32 needs indexer heads of 64 or more, {args.preset}'s are {cfg.index_head_dim}); "
              + (f"within {cfg.index_topk} tokens DSA attends to every token anyway" if dense else
                 f"past {cfg.index_topk} tokens this is dense attention where DSA would select"))
        cfg = cfg.replace(model_type="deepseek_v3", index_topk=0, index_n_heads=0)
    cfg = cfg.replace(num_nextn_predict_layers=0)  # decode runs no MTP
    threads = [int(t) for t in args.peer_threads.split(",")]
    n_seqs = sorted({1, args.sequences})
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(max(n_seqs))]
    prev_threads = torch.get_num_threads()
    dtypes = args.dtypes.split(",")
    # (row name, GGUF type, nanoseek dtype, nanoseek format): the float arms, then per format one arm per dtype
    # (nanoseek's activations in it; llama.cpp's file is the same for all)
    arms = [(name, llamacpp.OUTTYPES[name], name, None) for name in dtypes]
    for q in args.quantize:
        qtype = llamacpp.QUANT_TYPES[q]
        fmt = q + (f" G{llamacpp.INT4_GROUP}" if q == "int4" else "")
        arms += [(f"{name} {fmt} / {qtype}", qtype, name, q) for name in dtypes]
    rows, batched_rows, byte_rows, info = [], [], [], None
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_pretrained(nanoseek.Transformer(cfg), d)
        llamacpp.add_tokenizer(d, cfg.vocab_size)
        files: dict[str, Path] = {}

        def gguf_file(kind: str) -> Path:
            """The model as a GGUF of this kind (f32, bf16, Q8_0, Q4_1), made once and kept for the other arms."""
            if kind not in files:
                out = Path(d) / f"model-{kind}.gguf"
                if kind == "Q4_1":
                    files[kind] = llamacpp.quantize(tools["llama-quantize"], gguf_file("f32"), out, kind, max(threads))
                else:
                    files[kind] = llamacpp.convert(src, d, out, kind.lower())
            return files[kind]

        for i, (arm, kind, name, q) in enumerate(arms):
            try:
                gguf = gguf_file(kind)
                ns = nanoseek.from_pretrained(gguf, dtype=getattr(torch, name), quantize=q,
                                              group_size=llamacpp.INT4_GROUP)
                byte_rows.append((arm, activated_bytes(ns), *llamacpp.weight_bytes_per_token(
                    gguf, cfg.num_experts_per_tok)))
                # one thread count at a time, the two engines back to back, so that load from other processes
                # meets both alike
                for t in threads:
                    torch.set_num_threads(t)
                    r_ns = nanoseek_rate(ns, prompt, args.tokens, args.repeats)
                    # llama-bench decodes after -d tokens of context, as nanoseek's timed steps follow the prompt
                    # and the first token: the same positions, prompt .. prompt + tokens - 2
                    res = llamacpp.run_bench(tools["llama-bench"], gguf, t, depth=len(prompt),
                                             n_gen=args.tokens - 1, repeats=args.repeats)
                    rows.append((arm, t, r_ns, llamacpp.rates(res)[t]))
                    info = res[0]
                    ll = {r["pl"]: r for r in llamacpp.run_batched_bench(
                        tools["llama-batched-bench"], gguf, t, args.prompt, args.tokens - 1, n_seqs)}
                    for n in n_seqs:
                        pp, tg = nanoseek_batched_rates(ns, prompts[:n], args.tokens - 1, args.repeats)
                        batched_rows.append((arm, t, n, pp, ll[n]["speed_pp"], tg, ll[n]["speed_tg"]))
                del ns
            except (llamacpp.Unavailable, CheckpointError) as e:
                print(f"llama.cpp peer skipped for {arm}: {e}")
            finally:
                torch.set_num_threads(prev_threads)
            # a file no later arm reads (nor llama-quantize, for a Q4_1 still to make) goes: a preset's files add up
            needed = {k for _, k, _, _ in arms[i + 1:]}
            needed |= {"f32"} if "Q4_1" in needed and "Q4_1" not in files else set()
            for k in [k for k in files if k not in needed]:
                files.pop(k).unlink()
    if not rows:
        return
    print(f"\nDecode at batch 1 against llama.cpp ({args.preset}, {args.prompt}-token context, {args.tokens - 1} "
          f"timed tokens, best of {args.repeats}; ratio = nanoseek / llama.cpp)")
    print(llamacpp.format_table(rows))
    print(f"\nPrefill and decode of several sequences at once against llama-batched-bench ({args.prompt}-token "
          f"prompts, one per sequence, prefilled together; then {args.tokens - 1} decode steps of one token per "
          f"sequence; tokens/s over all sequences; nanoseek: its engine, best of {args.repeats}; llama.cpp: one "
          f"run after its warm-up)")
    print(llamacpp.format_batched_table(batched_rows))
    print(llamacpp.describe(info))
    print("\nWeight bytes a decode token reads (each tensor at its stored size; the embedding one row, the routed "
          "experts num_experts_per_tok of E): nanoseek's model as loaded, llama.cpp's GGUF file")
    print("| weights | nanoseek MB/token | llama.cpp MB/token | llama.cpp's by tensor type |")
    print("|---|---:|---:|---|")
    for arm, b_ns, b_ll, by_type in byte_rows:
        types = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]))
        print(f"| {arm} | {b_ns / 1e6:.2f} | {b_ll / 1e6:.2f} | {types} |")
    if "bfloat16" in args.dtypes and not precision.native_bf16_cpu():
        print("bfloat16: this CPU has no native bf16 arithmetic; both widen the bf16 weights to fp32 for fp32 FMAs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", default=None,
                    help="a model folder for the transformers comparison instead of the preset's random weights")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="auto",
                    help="auto (the dtype `--dtype auto` picks on this CPU), all, or a list: float32,bfloat16")
    ap.add_argument("--peer", choices=("transformers", "llamacpp", "all", "none"), default="transformers",
                    help="what nanoseek is timed against (all: transformers, then llama.cpp)")
    ap.add_argument("--kv-cache-dtypes", default="auto",
                    help="with more than auto (e.g. auto,fp8,int8): also time nanoseek with each KV-cache dtype")
    ap.add_argument("--peer-threads", default="1,2", help="thread counts of the llama.cpp comparison")
    ap.add_argument("--sequences", type=int, default=8,
                    help="concurrent sequences of the llama.cpp comparison's batched rows (beside 1)")
    ap.add_argument("--quantize", default="", help="weight-only arms beside each dtype: int8, int4 or int8,int4")
    ap.add_argument("--quant-group-size", type=int, default=32, choices=quant.GROUP_SIZES)
    ap.add_argument("--pages", action="store_true",
                    help="also time nanoseek with its weights in 4 KB pages against huge pages (--peer none: only that)")
    args = ap.parse_args()
    args.quantize = [q for q in args.quantize.split(",") if q]
    if any(q not in quant.FORMATS for q in args.quantize):
        ap.error(f"--quantize: formats are {', '.join(quant.FORMATS)}")
    for name in ("prompt", "tokens", "repeats", "sequences"):
        if getattr(args, name) < (2 if name == "tokens" else 1):
            ap.error(f"--{name} must be at least {2 if name == 'tokens' else 1}")
    args.dtypes = ",".join(precision.dtype_names(args.dtypes, what="decode"))
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig.from_json(args.model) if args.model else get_preset(args.preset)
    torch.manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt,)).tolist()
    from nanoseek.kernels import cpu_decode, cpu_quant, isa
    print(f"{'model ' + args.model if args.model else 'preset ' + args.preset}, prompt {args.prompt} tokens, "
          f"{args.tokens} generated, torch threads "
          f"{torch.get_num_threads()}")
    print(f"CPU {isa.describe()}; decode kernel variant: "
          + ", ".join(f"{n} {cpu_decode.variant(getattr(torch, n))}" for n in args.dtypes.split(","))
          + (f"; quantized kernel variant: {cpu_quant.variant()}" if args.quantize else ""))
    print(f"transparent huge pages: {hugepages.mode() or 'none'}; nanoseek's engine keeps its weights "
          + ("in huge pages (madvise), where the bandwidth bound is measured too" if hugepages.supported() else
             "in 4 KB pages") + "\n")
    if args.peer in ("transformers", "all"):
        transformers_comparison(args, cfg, prompt)
    if args.peer in ("llamacpp", "all"):
        llamacpp_comparison(args, cfg, prompt)
    if args.kv_cache_dtypes != "auto":
        kv_cache_comparison(args, cfg, prompt)
    if args.pages:
        pages_comparison(args, cfg, prompt)


if __name__ == "__main__":
    main()
