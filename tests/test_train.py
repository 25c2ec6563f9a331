"""Training loop (nanoseek.train): loss falls, exact resume, crash-safe checkpoints, aux-loss-free balancing,
the DSA warm-up and sparse stages, and a final model that nanoseek and transformers both load.

Everything runs the `tiny` preset in float32 on a ~180 KB corpus of standard-library files with a 600-token
tokenizer trained once per module, through the same `nanoseek train` entry point users call.
"""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import train as T
from nanoseek.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py",
                "calendar.py", "csv.py", "ftplib.py", "sched.py", "colorsys.py"]
# eager steps: compiling costs ~30 s per run here; test_compiled_training_matches_eager covers the compiled path
BASE = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--dtype", "float32", "--no-progress",
        "--heldout-fraction", "0.2", "--no-compile"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A corpus folder, a trained tokenizer and a token-cache folder shared by the module's runs."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in CORPUS_FILES:
        shutil.copy(STDLIB / f, corpus / f)
    tok_dir = root / "tok"
    train_tokenizer([corpus], 600, tok_dir)
    return {"root": root, "corpus": corpus, "tok": tok_dir, "cache": root / "cache"}


def run(env, out, *args) -> list[dict]:
    argv = ["--data", str(env["corpus"]), "--tokenizer", str(env["tok"]), "--cache-dir", str(env["cache"]),
            "--out", str(out), *BASE, *args]
    assert T.cli("train", argv) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(env):
    """A 40-step pre-training run (MoE + MTP), reused as the --init of the DSA stages."""
    out = env["root"] / "pre"
    recs = run(env, out, "--max-steps", "40", "--lr", "3e-3", "--eval-every", "20", "--eval-tokens", "2048",
               "--bias-update-speed", "1e-2")
    return out, recs


def test_pretraining_learns_and_reports(pretrained):
    out, recs = pretrained
    assert [r["step"] for r in recs] == list(range(1, 41))
    losses = [r["lm_loss"] for r in recs]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "memory_mb", "maxvio", "bias_norm"):
        assert key in recs[-1], key
    assert len(recs[-1]["maxvio"]) == 3  # two MoE layers + the MTP block
    assert max(recs[-1]["bias_norm"]) > 0
    evals = [r for r in recs if "eval_bpb" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0 < evals[-1]["eval_bpb"] < 8
    for f in ("loss.png", "throughput.png", "maxvio.png", "report.md", "final/config.json",
              "final/model.safetensors", "final/tokenizer.json", "checkpoints/latest.json"):
        assert (out / f).exists(), f
    assert "bits/byte" in (out / "report.md").read_text()


def test_final_model_loads_in_nanoseek_and_transformers(pretrained):
    transformers = pytest.importorskip("transformers")
    out, _ = pretrained
    ours = nanoseek.from_pretrained(out / "final")
    assert len(ours.mtp) == 1  # MTP weights are saved too
    # same weights as the last training checkpoint (which holds the fp32 master weights)
    sd, _, _ = T.load_checkpoint(T.latest_checkpoint(out))
    for k, v in ours.state_dict().items():
        if not k.startswith("rotary."):
            assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"], skip_special_tokens=True) == \
        "def f(x):\n    return x"


@pytest.mark.parametrize("extra", [[], ["--dtype", "bfloat16", "--grad-accum", "2"], ["--optimizer", "muon"],
                                   ["--optimizer", "muon", "--muon-experts", "--dtype", "bfloat16"]],
                         ids=["float32", "bfloat16", "muon", "muon-experts-bfloat16"])
def test_resume_is_exact(env, tmp_path, extra):
    """float32, and bf16 training (bf16 working weights, fp32 masters in the optimizer, micro-batch gradients
    summed in fp32): checkpoints hold the fp32 masters, so the resumed run is the same run."""
    args = ["--max-steps", "6", "--save-every", "2", "--lr", "3e-3", "--eval-tokens", "0", *extra]
    full = run(env, tmp_path / "full", *args)
    part = run(env, tmp_path / "part", *args, "--stop-after", "3")
    assert [r["step"] for r in part] == [1, 2, 3]
    assert not (tmp_path / "part" / "final").exists()
    resumed = run(env, tmp_path / "part", *args, "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k, a[k], b[k])
        assert a["bias_norm"] == pytest.approx(b["bias_norm"], abs=1e-7)
    m1 = nanoseek.from_pretrained(tmp_path / "full" / "final")
    m2 = nanoseek.from_pretrained(tmp_path / "part" / "final")
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(v1, v2, atol=1e-6), k
    from safetensors import safe_open
    for f in [tmp_path / "full" / "final" / "model.safetensors", *(tmp_path / "part").rglob("model.safetensors")]:
        with safe_open(str(f), "pt") as st:  # the fp32 masters, never the bf16 working copies
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}, f


@pytest.mark.parametrize("fail_at", ["model.safetensors", "train_state.safetensors", "state.json",
                                     "rename", "pointer"])
def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch, fail_at):
    """A crash at any point of writing checkpoint 2 leaves checkpoint 1 published and loadable."""
    sd1 = {"w": torch.ones(3)}
    T.save_checkpoint(tmp_path, 1, sd1, {"opt/x": torch.zeros(2)}, {"step": 1})

    class Crash(Exception):
        pass

    real_tensors, real_json, real_rename, real_replace = T._save_tensors, T._write_json, T.os.rename, T.os.replace

    def tensors(t, path):
        if path.name == fail_at:
            path.write_bytes(b"partial")
            raise Crash
        real_tensors(t, path)

    def write_json(path, obj):
        if fail_at == "state.json" and path.name == "state.json":
            path.write_text("{\"st")
            raise Crash
        real_json(path, obj)

    def rename(a, b):
        if fail_at == "rename":
            raise Crash
        real_rename(a, b)

    def replace(a, b):
        if fail_at == "pointer" and Path(b).name == "latest.json":
            raise Crash
        real_replace(a, b)

    monkeypatch.setattr(T, "_save_tensors", tensors)
    monkeypatch.setattr(T, "_write_json", write_json)
    monkeypatch.setattr(T.os, "rename", rename)
    monkeypatch.setattr(T.os, "replace", replace)
    with pytest.raises(Crash):
        T.save_checkpoint(tmp_path, 2, {"w": torch.full((3,), 2.0)}, {"opt/x": torch.ones(2)}, {"step": 2})
    monkeypatch.undo()
    ck = T.latest_checkpoint(tmp_path)
    assert ck.name == "step_0000001"
    sd, ts, state = T.load_checkpoint(ck)
    assert torch.equal(sd["w"], sd1["w"]) and state["step"] == 1
    # the next save succeeds and replaces it
    T.save_checkpoint(tmp_path, 2, {"w": torch.full((3,), 2.0)}, {"opt/x": torch.ones(2)}, {"step": 2})
    assert T.load_checkpoint(T.latest_checkpoint(tmp_path))[2]["step"] == 2


def test_crash_mid_training_resumes_from_last_checkpoint(env, tmp_path, monkeypatch):
    args = ["--max-steps", "5", "--save-every", "2", "--lr", "3e-3", "--eval-tokens", "0"]
    full = run(env, tmp_path / "full", *args)
    calls = {"n": 0}
    real = T._save_tensors

    class Killed(BaseException):
        pass

    def dying(t, path):
        calls["n"] += 1
        if calls["n"] == 4:  # the optimizer file of the second checkpoint (step 4)
            raise Killed
        real(t, path)

    monkeypatch.setattr(T, "_save_tensors", dying)
    with pytest.raises(Killed):
        run(env, tmp_path / "crash", *args)
    monkeypatch.undo()
    assert T.latest_checkpoint(tmp_path / "crash").name == "step_0000002"
    resumed = run(env, tmp_path / "crash", *args, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6


def test_expert_bias_moves_toward_balance():
    """Aux-loss-free balancing on a router skewed towards two experts: the bias update evens the loads."""
    cfg = nanoseek.get_preset("tiny", n_group=1, topk_group=1, num_nextn_predict_layers=0)
    model = nanoseek.Transformer(cfg).eval()
    moes = T.moe_layers(model)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(mod, a[0])) for m in moes]
    with torch.no_grad():
        model(ids)
        for m in moes:  # experts 0 and 1 now score high for the average token
            u = inputs[m].reshape(-1, cfg.hidden_size).mean(0)
            m.gate.weight[:2] += 4 * u / u.norm() ** 2
    for h in hooks:
        h.remove()

    def loads():
        with torch.no_grad():
            return model(ids).stats.expert_load(cfg.n_routed_experts).double()

    from nanoseek.metrics import max_vio
    first = loads()
    vio0 = [max_vio(l) for l in first]
    assert min(vio0) > 1.0  # badly skewed
    for _ in range(60):
        T.update_expert_bias(moes, loads(), gamma=0.01)
    vio1 = [max_vio(l) for l in loads()]
    assert all(b < 0.5 * a for a, b in zip(vio0, vio1)), (vio0, vio1)
    for m in moes:  # the overloaded experts were pushed down
        assert (m.gate.e_score_correction_bias[:2] < 0).all()


def test_side_losses_and_loads_come_in_the_output_not_on_the_model():
    """The blocks' side losses (sequence-wise balance, indexer KL and recall) and expert loads come back in the
    forward's output (`LayerStats`), main layers and MTP: nothing with an autograd graph stays on the modules,
    where it would keep FSDP's hooks and so the model and its process group alive to interpreter exit (gloo
    threads can then abort the process, `nanoseek.parallel.destroy`)."""
    model = nanoseek.Transformer(nanoseek.get_preset("tiny"))
    T.set_dsa_stage(model, "sparse")
    for m in T.moe_layers(model):
        m.seq_aux_alpha = 1e-3
    ids = torch.randint(0, model.config.vocab_size, (2, 50))  # 48 > index_topk: the selection is active
    parts = T.micro_step_losses(model, ids[:, :48], ids[:, 1:49], T.TrainConfig(out="-", dsa_stage="sparse"), 1)
    assert {"balance_loss", "indexer_kl", "indexer_recall", "mtp_loss", "expert_load"} <= parts.keys()
    cfg = model.config
    moes = T.moe_layers(model)  # the main MoE layers, then MTP's
    assert len(moes) == cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    assert parts["expert_load"].shape == (len(moes), cfg.n_routed_experts)
    # MTP's layer runs over all 48 positions too (its last one fed a padding token and not trained)
    assert torch.equal(parts["expert_load"].sum(-1), torch.full((len(moes),), 2 * 48.0) * cfg.num_experts_per_tok)
    parts["loss"].backward()
    tensors = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    assert not [t for t in tensors if t.grad_fn is not None]


def test_mtp_loss_over_padded_rows_equals_the_loss_over_its_positions():
    """The trainer runs each MTP depth over all T positions (the last ones fed a padding token, not trained) so that
    the MTP block has the main blocks' shape: its loss and gradients are those of the depth run over its own T-1-k
    positions only (causal attention keeps the padding out of them)."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.get_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 41))
    x, y = ids[:, :40], ids[:, 1:]
    parts = T.micro_step_losses(model, x, y, T.TrainConfig(out="-", seq_aux_alpha=0.0), 1)
    parts["mtp_loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.mtp.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model(x, num_logits=0)
    logits, _ = model.mtp_forward(0, out.hidden[:, :-1], x[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())
    ref.backward()
    torch.testing.assert_close(parts["mtp_loss"], ref, rtol=1e-5, atol=1e-6)
    assert grads
    for n, p in model.mtp.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_samples_are_seeded_batched_and_stop_at_eos(pretrained):
    """`train.sample` (the report's completions, through the engine): the i-th prompt drawn with seed + i whatever
    the batch, text and token-id prompts alike, at most max_new tokens, and EOS ends a sample without showing."""
    import types
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.tokenizer import load_tokenizer
    final = pretrained[0] / "final"
    tok = load_tokenizer(final)
    m = nanoseek.from_pretrained(final, dtype=torch.float32)
    both = T.sample(m, tok, ["def ", "import os\n"], 12, seed=5)
    assert both[1] == T.sample(m, tok, ["import os\n"], 12, seed=6)[0]
    assert both[0] == T.sample(m, tok, [[tok.bos_id] + tok.encode("def ")], 12, seed=5)[0]
    assert all(len(tok.encode(t)) <= 14 for t in both) and any(both)
    ids = [tok.bos_id] + tok.encode("def ")
    first = Engine(m, None).generate([ids], SamplingParams(max_tokens=1, temperature=0.8, seed=5))[0].new_token_ids[0]
    stops_there = types.SimpleNamespace(bos_id=tok.bos_id, eos_id=first, encode=tok.encode, decode=tok.decode)
    assert T.sample(m, stops_there, ["def "], 12, seed=5) == [""]


def test_dsa_warmup_trains_only_the_indexer_and_kl_falls(env, pretrained, tmp_path):
    init = pretrained[0] / "final"
    out = tmp_path / "warm"
    recs = run(env, out, "--init", str(init), "--dsa-stage", "warmup", "--max-steps", "24", "--lr", "1e-2",
               "--seq-len", "96", "--eval-tokens", "0", "--warmup", "2")
    kl = [r["indexer_kl"] for r in recs]
    assert sum(kl[-4:]) / 4 < 0.7 * sum(kl[:4]) / 4, kl
    assert all("indexer_recall" in r for r in recs)
    before = nanoseek.from_pretrained(init).state_dict()
    after = nanoseek.from_pretrained(out / "final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)[:5]
    assert any(k.startswith("mtp.0.block.self_attn.indexer.") for k in changed)  # the MTP block's warms up too
    assert not any("lm_loss" in r or "mtp_loss" in r for r in recs)  # no head pass in the warm-up

    # sparse stage: everything trains with top-k attention (64 > index_topk 32) and the indexer KL is reported
    sparse = run(env, tmp_path / "sparse", "--init", str(out / "final"), "--dsa-stage", "sparse",
                 "--max-steps", "3", "--lr", "1e-4", "--seq-len", "96", "--eval-tokens", "1024")
    assert all(r["indexer_kl"] >= 0 and "mtp_loss" in r for r in sparse)
    assert "eval_bpb" in sparse[-1]
    s_after = nanoseek.from_pretrained(tmp_path / "sparse" / "final").state_dict()
    assert not torch.equal(s_after["layers.0.self_attn.o_proj.weight"], after["layers.0.self_attn.o_proj.weight"])


def test_bad_arguments_fail_clearly(env, tmp_path, capsys):
    assert T.cli("train", ["--out", str(tmp_path), "--dsa-stage", "warmup"]) == 2
    assert "--init" in capsys.readouterr().err
    assert T.cli("train", ["--out", str(tmp_path), "--data", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert T.cli("train", ["--out", str(tmp_path), "--data", str(env["corpus"]), "--tokenizer", str(env["tok"]),
                           "--batch-tokens", "1000", "--seq-len", "64", "--cache-dir", str(env["cache"]),
                           "--no-progress"]) == 1
    assert "multiple" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_matches_eager(env, tmp_path):
    """The default (torch.compile'd) training step computes the same losses as the eager one, and the same expert
    loads (the balancing bias update reads them). In float32, so the grouped GEMMs compile as opaque custom ops
    (the C expert kernels' where `cpu_experts.F32_ROUTED` has this CPU's variant, else `nanoseek::grouped_mm`);
    the attention is the written-out one (rows of 64)."""
    args = ["--max-steps", "4", "--lr", "3e-3", "--eval-tokens", "0", "--layers", "2"]
    eager = run(env, tmp_path / "eager", *args)
    argv = [a for a in BASE if a != "--no-compile"]
    compiled_out = tmp_path / "compiled"
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    assert T.cli("train", ["--data", str(env["corpus"]), "--tokenizer", str(env["tok"]), "--cache-dir",
                           str(env["cache"]), "--out", str(compiled_out), *argv, *args]) == 0
    compiled = [json.loads(line) for line in (compiled_out / "metrics.jsonl").read_text().splitlines()]
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile (errors would fall back to eager)
    for e, c in zip(eager, compiled, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4)
        assert c["maxvio"] == pytest.approx(e["maxvio"], rel=1e-3, abs=1e-6)
        assert c["bias_norm"] == pytest.approx(e["bias_norm"], rel=1e-3, abs=1e-6)
