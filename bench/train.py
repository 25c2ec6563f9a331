"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, same config, weights, batch and dtype.

    .venv/bin/python bench/train.py                       # small preset as deepseek_v3, float32 and bfloat16
    .venv/bin/python bench/train.py --layers 4 --steps 6 --seq-len 256 --batch-size 4 --dtypes bfloat16

One training step = forward + cross-entropy + backward + gradient clipping + AdamW (same settings for both).
bfloat16 = bf16 matmuls with fp32 master weights for both: transformers autocasts its fp32 weights (casting each
weight at each use and each weight gradient back); nanoseek keeps bf16 working copies of its matmul weights and
their fp32 masters in the optimizer (`MasterWeightAdamW`), the same arithmetic without the casts. nanoseek's step
is the one `nanoseek train` runs: its blocks torch.compile'd (`--no-compile`: eager; the compilation happens
in the untimed first step), the head's cross-entropy without the logits (`nanoseek/kernels/linear_ce.py`), its
optimizer and clipping.
The process keeps freed memory in malloc's heap as `nanoseek train` does (`keep_freed_memory`), which speeds up
both models alike. The two models are timed in alternation (one step each, repeated) so that load from other
processes hits both alike; the median step is reported, both in wall-clock time and in process CPU time /
threads ("CPU time" columns: what the step costs when the cores are not shared; on a busy machine the wall-clock
figures mostly measure the other processes).
The config is the chosen preset with DSA and MTP off (transformers' DeepseekV3 has neither), so both compute
the same function; nanoseek's first step is checked against transformers' loss before timing.

MFU = 6 x activated non-embedding parameters x tokens/s / peak, the peak being this machine's measured matmul
FLOP/s in that dtype, both in CPU time.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

import nanoseek
from nanoseek import metrics as M
from nanoseek.kernels import cpu_experts
from nanoseek.model.transformer import cross_entropy
from nanoseek import train as T
from nanoseek.optim import build_adamw
from nanoseek import kernels, precision
from nanoseek.train import TrainConfig, keep_freed_memory, loss_function


def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.train()
    return m


def make_step(model, opt, x, y, dtype, forward, clip):
    def step() -> float:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = forward(model, x, y)
        loss.backward()
        clip(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def cpu_peak(dtype: torch.dtype, threads: int, n: int = 1024, reps: int = 5) -> tuple[float, str]:
    """Best-of-reps matmul FLOP/s of this process in CPU time (per thread x threads): robust to other load."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        for _ in range(4):
            a @ b
        best = min(best, (time.process_time() - c0) / 4 / threads)
    return 2 * n ** 3 / best, "matmul peak in CPU time"


def experts_path(dtype: torch.dtype) -> str:
    """What nanoseek's training step runs the routed experts' grouped GEMMs on, in this dtype."""
    v = cpu_experts.variant()
    routed = v is not None and (dtype == torch.bfloat16 or v in cpu_experts.F32_ROUTED)
    return f"cpu_experts {v}" if routed else "torch._grouped_mm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model and dtype")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--dtypes", default="auto",
                    help="auto (the dtype `--dtype auto` picks on this CPU), all, or a list: float32,bfloat16")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="nanoseek's step eagerly")
    ap.add_argument("--profile", action="store_true",
                    help="also print where one nanoseek step spends its time (torch.profiler, by op)")
    a = ap.parse_args()
    a.dtypes = ",".join(precision.dtype_names(a.dtypes, what="train"))
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    over = dict(model_type="deepseek_v3", index_topk=0, index_n_heads=0, num_nextn_predict_layers=0)
    if a.layers:
        over["num_hidden_layers"] = a.layers
    cfg = nanoseek.get_preset(a.preset, **over)
    n = cfg.num_params()
    n_flops = M.flops_params(cfg, with_mtp=False)
    tokens = a.batch_size * a.seq_len
    print(f"config: {a.preset} as deepseek_v3, {cfg.num_hidden_layers} layers, {n['total'] / 1e6:.1f}M params "
          f"({n['active'] / 1e6:.1f}M active, {n_flops / 1e6:.1f}M in matmuls), batch {a.batch_size}x{a.seq_len} "
          f"= {tokens} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, nanoseek's expert GEMMs: "
          f"{experts_path(torch.bfloat16)} (bfloat16), {experts_path(torch.float32)} (float32)")
    x = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len))
    y = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len))
    tc = TrainConfig(out="", mtp_weight=0.0, seq_aux_alpha=0.0, compile=a.compile)
    # what `nanoseek train` does on a CPU; process-wide, so transformers runs with it too
    keep_freed_memory()
    ns_losses = {}

    def ns_forward(model, x, y):  # the training loop's loss function: compiled unless --no-compile
        if model not in ns_losses:
            ns_losses[model] = loss_function(model, tc, mtp_depth=0)
        return ns_losses[model](x, y)["loss"]

    def hf_forward(model, x, y):
        return cross_entropy(model(input_ids=x).logits, y)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = nanoseek.Transformer(cfg)
        nanoseek.save_pretrained(base, tmp)
        for dname in a.dtypes.split(","):
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dname]
            ns = nanoseek.Transformer(cfg)
            ns.load_state_dict(base.state_dict())
            kernels.install(ns)  # as `nanoseek train` does: the C expert GEMMs where this CPU has them
            ns.train()
            hf = hf_model(tmp)
            impl = getattr(hf.config, "_experts_implementation_internal", None) or "?"
            # nanoseek: what `nanoseek train` builds for this dtype on a CPU
            masters = T.master_weights(dataclasses.replace(tc, dtype=dname), torch.device("cpu"), 1)
            steps = {
                "nanoseek": make_step(ns, build_adamw(ns, 1e-4, 0.1, bf16_weights=masters), x, y, dtype, ns_forward,
                                      lambda m, opt: T.clip_gradients(m, opt, 1.0)),
                "transformers": make_step(hf, build_adamw(hf, 1e-4, 0.1), x, y, dtype, hf_forward,
                                          lambda m, opt: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)),
            }
            l_ns, l_hf = steps["nanoseek"](), steps["transformers"]()
            if abs(l_ns - l_hf) > (1e-3 if dtype == torch.float32 else 5e-2):
                raise SystemExit(f"models disagree before timing: nanoseek loss {l_ns:.5f}, transformers {l_hf:.5f}")
            for _ in range(a.warmup_steps - 1):
                for s in steps.values():
                    s()
            wall: dict[str, list[float]] = {k: [] for k in steps}
            cpu: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(a.steps):
                for k, s in steps.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    s()
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append((time.process_time() - c0) / threads)
            peak, src = cpu_peak(dtype, threads)
            res = {}
            for k in steps:
                tps, tps_cpu = tokens / statistics.median(wall[k]), tokens / statistics.median(cpu[k])
                res[k] = (tps, tps_cpu)
                rows.append((dname, k if k == "nanoseek" else f"transformers ({impl} experts)", tps, tps_cpu,
                             6 * n_flops * tps_cpu / peak))
            rows.append((dname, "speed-up", res["nanoseek"][0] / res["transformers"][0],
                         res["nanoseek"][1] / res["transformers"][1], None))
            print(f"  {dname}: peak {peak / 1e9:.0f} GFLOP/s ({src}); first-step loss nanoseek {l_ns:.4f}, "
                  f"transformers {l_hf:.4f}")
            if a.profile:
                from torch.profiler import profile
                with profile() as prof:
                    steps["nanoseek"]()
                print(f"\none nanoseek {dname} step, by op (self CPU time, both threads):")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            del ns, hf, steps
    print()
    print("| dtype | model | tokens/s (wall) | tokens/s (CPU time) | MFU (CPU time) |")
    print("|---|---|---|---|---|")
    for d, k, v, vc, mfu in rows:
        if mfu is None:
            print(f"| {d} | **nanoseek / transformers** | **{v:.2f}x** | **{vc:.2f}x** | |")
        else:
            print(f"| {d} | {k} | {v:,.0f} | {vc:,.0f} | {100 * mfu:.1f}% |")


if __name__ == "__main__":
    main()
