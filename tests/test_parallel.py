"""Scale-out (`nanoseek/parallel.py`): 2 CPU processes (gloo) reproduce the single-process run.

Two paths:
- direct (fast): each test trains the tiny preset (MoE + MTP + DSA, float32) on fixed synthetic batches in this
  process, then in 2 processes spawned here that each take half of the same global batch, through
  `init_distributed` (torchrun's environment variables), `parallelize` (FSDP2, optionally expert parallelism),
  `all_reduce_sum` for the loads of the bias update, gradient clipping and AdamW, and compares loss curves,
  gradient norms and the gathered checkpoints; the same for the DSA warm-up stage, and a resume of a 1-process
  checkpoint on 2 processes with expert parallelism (and back). A layer test checks the expert-parallel layer
  itself (outputs and gradients, uneven loads, a rank with no tokens) on 2 gloo processes, and on 1 CUDA
  process with NCCL (fp32 and bf16) where a GPU is present.
- command line (marked slow): `torchrun --nproc_per_node 2 -m nanoseek train` against `nanoseek train` on one
  process, with and without --expert-parallel, and a resume that changes the layout.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import nanoseek
from nanoseek.model.mla import MLA
from nanoseek.model.moe import Experts, MoE
from nanoseek.model.transformer import cross_entropy
from nanoseek.parallel import (Dist, ExpertParallelExperts, all_reduce_sum, destroy, full_model_state_dict,
                               full_optimizer_state_dict, init_distributed, load_full_model_state_dict,
                               load_full_optimizer_state_dict, parallelize)

STEPS, B, T = 12, 4, 48  # T > index_topk (32): DSA's sparse selection is active
MTP_WEIGHT, GAMMA, CLIP = 0.3, 1e-3, 0.5
RTOL = 1e-4


def _batches(steps: int = STEPS) -> torch.Tensor:
    """[steps, B, T+2] tokens (+2: next-token and MTP targets) from 64 ids, so the loss falls within a few steps."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, 66, (steps, B, T + 2), generator=g)


def _model(warmup: bool = False) -> nanoseek.Transformer:
    """The tiny model; warmup=True sets up the DSA warm-up stage: dense attention, every weight frozen but the
    lightning indexers, which learn from their KL losses alone."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.get_preset("tiny"))
    if warmup:
        for m in model.modules():
            if isinstance(m, MLA):
                m.dsa_mode, m.indexer_loss_on = "dense", True
        for name, p in model.named_parameters():
            p.requires_grad_(".indexer." in name)
    return model


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def _train(model, opt, batches, dist: Dist, start: int = 0) -> list[dict]:
    """Train on this rank's share of each global batch; returns the global loss and grad norm per step."""
    share = B // dist.world_size
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    log = []
    for step in range(start, len(batches)):
        tok = batches[step, dist.rank * share:(dist.rank + 1) * share].to(dist.device)
        out = model(tok[:, :T])
        lm = cross_entropy(out.logits, tok[:, 1:T + 1])
        mtp_logits, _ = model.mtp_forward(0, out.hidden, tok[:, 1:T + 1], stats=out.stats)
        loss = lm + MTP_WEIGHT * cross_entropy(mtp_logits, tok[:, 2:T + 2])
        if not loss.requires_grad:  # DSA warm-up: only the indexers' KL losses train
            loss = out.stats.indexer_loss()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if isinstance(gnorm, torch.distributed.tensor.DTensor):
            gnorm = gnorm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # auxiliary-loss-free balancing from the loads of the whole global batch
        load = all_reduce_sum(out.stats.expert_load(len(moes[0].gate.weight)), dist)  # [layers, E]
        with torch.no_grad():
            for m, l in zip(moes, load):
                m.gate.e_score_correction_bias += GAMMA * torch.sign(l.mean() - l)
        mean_loss = all_reduce_sum(loss.detach().clone(), dist) / dist.world_size
        log.append({"step": step, "loss": mean_loss.item(), "grad_norm": float(gnorm),
                    "load": load.tolist()})
    return log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        _job(rank, world, dist, job)  # its sharded model and optimizer are gone when destroy() runs
    finally:
        destroy()
    assert _gloo_threads() == []  # the groups died in destroy(): no gloo thread is left to abort the exit


def _gloo_threads() -> list[str]:
    names = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]


def _job(rank: int, world: int, dist: Dist, job: dict) -> None:
    assert (dist.rank, dist.world_size, dist.is_main) == (rank, world, rank == 0)
    model = parallelize(_model(job.get("warmup", False)), dist, expert_parallel=job["ep"])
    opt = _optimizer(model)
    batches = _batches()
    start = 0
    if job.get("resume_from"):  # a single-process checkpoint, read by every rank
        ck = torch.load(job["resume_from"])
        load_full_model_state_dict(model, ck["model"], dist)
        load_full_optimizer_state_dict(model, opt, ck["optim"], dist)
        start = job["resume_step"]
    log = _train(model, opt, batches, dist, start)
    sd, osd = full_model_state_dict(model, dist), full_optimizer_state_dict(model, opt, dist)
    if dist.is_main:
        torch.save({"log": log, "model": sd, "optim": osd}, job["out"])
    else:
        assert sd == {} and osd == {}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_single_process_without_torchrun_env_and_bad_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one = init_distributed("cpu")
    assert (one.rank, one.world_size, one.is_main, one.device) == (0, 1, True, torch.device("cpu"))
    assert not torch.distributed.is_initialized()
    t = torch.arange(3.0)
    assert all_reduce_sum(t, one) is t and t.tolist() == [0.0, 1.0, 2.0]
    model = _model()
    assert parallelize(model, one, expert_parallel=True) is model
    assert not any(isinstance(m, ExpertParallelExperts) for m in model.modules())
    with pytest.raises(ValueError, match="device must be"):
        init_distributed("tpu")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="outside WORLD_SIZE"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="not an integer"):
        init_distributed("cpu")


def _expert_layer_worker(rank: int, world: int, port: int, device: str) -> None:
    """One MoE expert layer, split over the ranks, against the plain layer on the same tokens: outputs, input
    and gate-weight gradients per rank, and expert gradients of the mean loss over ranks."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = init_distributed(device)
    try:
        _expert_layer_checks(rank, world, dist)  # its DTensors, which hold the mesh and so the group, are gone
    finally:
        destroy()
    assert _gloo_threads() == []


def _expert_layer_checks(rank: int, world: int, dist: Dist) -> None:
    mesh = torch.distributed.device_mesh.init_device_mesh(dist.device.type, (world,))
    cfg = nanoseek.get_preset("tiny")
    E, N, K, D = cfg.n_routed_experts, 40, cfg.num_experts_per_tok, cfg.hidden_size
    dtypes = [torch.float32] + ([torch.bfloat16] if dist.device.type == "cuda" else [])
    for dtype, routing in [(dt, "uneven") for dt in dtypes] + [(torch.float32, "rank 0 only")]:
        torch.manual_seed(0)
        plain = Experts(cfg).to(dist.device, dtype)
        torch.nn.init.normal_(plain.gate_up_proj, std=0.1)
        torch.nn.init.normal_(plain.down_proj, std=0.1)
        ep = ExpertParallelExperts(plain, mesh)
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens and routing
        x = torch.randn(N, D, generator=g).to(dist.device, dtype)
        w = torch.rand(N, K, generator=g).to(dist.device)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(dist.device)
        if routing == "uneven" and rank == 0:
            idx[:, 0] = 0  # rank 0's experts get more pairs
        elif routing == "rank 0 only":  # the other ranks compute nothing but still get (zero) expert gradients
            idx = torch.stack([torch.randperm(E // world, generator=g)[:K] for _ in range(N)]).to(dist.device)
        outs, grads = [], []
        for layer in (plain, ep):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            out = layer(xi, wi, idx)
            (out.float() * torch.linspace(-1, 1, D, device=dist.device)).sum().backward()
            outs.append(out)
            grads.append((xi.grad, wi.grad))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(outs[1], outs[0], **tol)
        torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
        torch.testing.assert_close(grads[1][1], grads[0][1], **tol)
        lo, hi = rank * E // world, (rank + 1) * E // world
        for name in ("gate_up_proj", "down_proj"):
            ref = all_reduce_sum(getattr(plain, name).grad.float(), dist) / world  # grad of the mean loss
            got = getattr(ep, name).grad
            assert isinstance(got, torch.distributed.tensor.DTensor) and got.shape == ref.shape
            torch.testing.assert_close(got.to_local().float(), ref[lo:hi], **tol)


def test_expert_parallel_layer_matches_plain_experts(tmp_path):
    mp.spawn(_expert_layer_worker, args=(2, _free_port(), "cpu"), nprocs=2, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: NCCL all-to-all, bf16 grouped GEMM")
def test_expert_parallel_layer_on_cuda_nccl():
    mp.spawn(_expert_layer_worker, args=(1, _free_port(), "cuda"), nprocs=1, join=True)


def _run_two(tmp_path: Path, **job) -> dict:
    job["out"] = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, _free_port(), job), nprocs=2, join=True)
    return torch.load(job["out"])


def _single(steps: int = STEPS, stop: int | None = None):
    dist = init_distributed("cpu")
    model = _model()
    opt = _optimizer(model)
    batches = _batches(steps)
    log = _train(model, opt, batches[:stop] if stop else batches, dist)
    return model, opt, log


def _assert_curves_match(ref: list[dict], got: list[dict], rtol: float = RTOL) -> None:
    assert [r["step"] for r in ref] == [g["step"] for g in got]
    for r, g in zip(ref, got):
        assert abs(g["loss"] - r["loss"]) <= rtol * abs(r["loss"]), (r["step"], r["loss"], g["loss"])
        assert abs(g["grad_norm"] - r["grad_norm"]) <= 1e-3 * r["grad_norm"], (r["step"], r, g)
        # the bias updates saw the global loads: same totals, and the same routing up to near-tie flips
        ref_load, got_load = torch.tensor(r["load"]), torch.tensor(g["load"])
        assert torch.equal(got_load.sum(-1), ref_load.sum(-1)), r["step"]
        assert (got_load - ref_load).abs().sum() <= 0.05 * ref_load.sum(), (r["step"], ref_load, got_load)


@pytest.fixture(scope="module")
def reference():
    model, opt, log = _single()
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # it learns, so the curve comparison is not vacuous
    return model, opt, log


@pytest.mark.parametrize("ep", [False, True], ids=["fsdp", "fsdp+ep"])
def test_two_processes_match_single_process(reference, tmp_path, ep):
    model, _, ref_log = reference
    res = _run_two(tmp_path, ep=ep)
    _assert_curves_match(ref_log, res["log"])
    # the gathered checkpoint is layout-independent: same names and full shapes as the single-process model
    ref_sd = model.state_dict()
    assert res["model"].keys() == ref_sd.keys()
    # AdamW's update m / sqrt(v) is about lr whatever the gradient's size, so where an element's gradients are
    # near zero the two layouts' fp32 sums (in another order) move it by a visible fraction of lr = 3e-3: on an
    # AVX2 CPU one element in 12,288 lands 1.7e-5 to 3.3e-5 away. Every other element must match to 1e-5.
    for k, v in ref_sd.items():
        torch.testing.assert_close(res["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
        off = (res["model"][k].float() - v.float()).abs() > 1e-5 + 1e-3 * v.float().abs()
        assert off.float().mean() <= 1e-3, (k, int(off.sum()))


def test_dsa_warmup_two_processes_match_single_process(tmp_path):
    """Frozen model, indexers trained from their side-channel KL losses (which FSDP's hooks never see)."""
    model = _model(warmup=True)
    ref = _train(model, _optimizer(model), _batches(), init_distributed("cpu"))
    assert ref[-1]["loss"] < ref[0]["loss"]
    got = _run_two(tmp_path, ep=True, warmup=True)["log"]
    # the KL is ~2e-4 near initialisation and a sum of cancelling terms: 1e-4 relative is float32 noise there
    _assert_curves_match(ref, got, rtol=1e-3)


def test_resume_single_process_checkpoint_on_two_processes_with_ep(reference, tmp_path):
    """Checkpoint at step 6 of a 1-process run -> 2 processes with EP resume it and finish; the curve and the
    final full state match the uninterrupted 1-process run, and that state loads back into 1 process."""
    stop = 6
    model, opt, _ = _single(stop=stop)
    one = init_distributed("cpu")
    torch.save({"model": full_model_state_dict(model, one), "optim": full_optimizer_state_dict(model, opt, one)},
               tmp_path / "ck.pt")
    res = _run_two(tmp_path, ep=True, resume_from=str(tmp_path / "ck.pt"), resume_step=stop)
    ref_model, ref_opt, ref_log = reference
    _assert_curves_match(ref_log[stop:], res["log"])
    ref_osd = full_optimizer_state_dict(ref_model, ref_opt, one)
    for name, state in ref_osd["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(res["optim"]["state"][name][k], v, rtol=1e-3, atol=1e-6, msg=f"{name}.{k}")
    # 2-process EP state -> a plain single-process model and optimizer
    back = _model()
    load_full_model_state_dict(back, res["model"], one)
    back_opt = _optimizer(back)
    load_full_optimizer_state_dict(back, back_opt, res["optim"], one)
    tok = _batches()[0, :, :T]
    torch.testing.assert_close(back(tok).logits, ref_model(tok).logits, rtol=1e-3, atol=1e-4)


# ---- the same through the command line: `torchrun --nproc_per_node 2 -m nanoseek train` -------------------------
CLI_ARGS = ["--device", "cpu", "--preset", "tiny", "--seq-len", "64", "--dtype", "float32", "--no-progress",
            "--heldout-fraction", "0.2", "--max-steps", "10", "--lr", "3e-3", "--eval-tokens", "0", "--samples", "0",
            "--no-compile"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """A small standard-library corpus, its tokenizer, and the single-process reference run (global batch 4x64)."""
    from nanoseek.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py", "calendar.py"]:
        shutil.copy(stdlib / f, corpus / f)
    train_tokenizer([corpus], 600, root / "tok")
    env = {"root": root, "args": ["--data", str(corpus), "--tokenizer", str(root / "tok"), "--cache-dir",
                                  str(root / "cache"), *CLI_ARGS]}
    env["ref"] = _cli(env, root / "single", 1, "--batch-size", "4")
    return env


def _cli(env, out: Path, nproc: int, *args, command: str = "train") -> list[dict]:
    cmd = [sys.executable, "-m", "nanoseek", command]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "nanoseek", command]
    run_env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + env["args"] + ["--out", str(out), *args], env=run_env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_cli_losses_match(ref: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref][-len(got):]
    by_step = {r["step"]: r["loss"] for r in ref}
    for g in got:
        assert abs(g["loss"] - by_step[g["step"]]) <= RTOL * by_step[g["step"]], (g["step"], by_step, got)


@pytest.mark.slow
@pytest.mark.parametrize("ep", [False, True], ids=["fsdp", "fsdp+ep"])
def test_cli_torchrun_two_processes_match_single_process(cli_env, ep):
    got = _cli(cli_env, cli_env["root"] / f"two_{ep}", 2, "--batch-size", "2", *(["--expert-parallel"] if ep else []))
    assert len(got) == 10
    _assert_cli_losses_match(cli_env["ref"], got)
    assert (cli_env["root"] / f"two_{ep}" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_resume_expert_parallel_checkpoint_without_expert_parallelism(cli_env):
    """Stop a 2-process EP run at step 5 and resume it with FSDP only: the checkpoint is layout-independent."""
    out = cli_env["root"] / "resume"
    first = _cli(cli_env, out, 2, "--batch-size", "2", "--expert-parallel", "--stop-after", "5", "--save-every", "5")
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    _cli(cli_env, out, 2, "--batch-size", "2", "--resume")
    _assert_cli_losses_match(cli_env["ref"], [json.loads(line) for line in
                                              (out / "metrics.jsonl").read_text().splitlines()])


@pytest.mark.slow
def test_cli_sft_two_processes_match_single_process(tmp_path):
    """`torchrun -m nanoseek sft`: conversations of different lengths leave the ranks different numbers of
    assistant tokens; the loss is still the global batch's per-token mean (train.micro_step_losses)."""
    from nanoseek.tokenizer import train_tokenizer
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. what is one plus one? two.\n" * 40)
    tok = train_tokenizer([text], 500)
    cfg = nanoseek.get_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    nanoseek.save_pretrained(nanoseek.Transformer(cfg), tmp_path / "model")
    tok.save(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                          {"role": "assistant", "content": f"{i + 1}. the quick brown fox." * (1 + i % 3)}]}
            for i in range(48)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--init", str(tmp_path / "model"), "--data", str(tmp_path / "chat.jsonl"), "--seq-len", "96",
            "--dtype", "float32", "--no-progress", "--no-compile", "--heldout-fraction", "0.1", "--lr", "3e-3",
            "--max-steps", "4", "--eval-tokens", "0", "--samples", "0", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    env = {"args": args}
    ref = _cli(env, tmp_path / "one", 1, "--batch-size", "4", command="sft")
    got = _cli(env, tmp_path / "two", 2, "--batch-size", "2", command="sft")
    _assert_cli_losses_match(ref, got)
