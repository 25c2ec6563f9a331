"""`nanoseek adapt` (nanoseek.adapt over nanoseek.train): the vocabulary surgery on --init, a first stage that
trains only the new rows, replay of the base domain, both held-out bits per byte in the report, exact resume.

A random `tiny` model with a 500-token tokenizer trained on standard-library files is the "base model"; a
made-up language (tests/test_vocab.py) is the new one, its tokenizer extended by 40 tokens.
"""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import adapt, vocab as V
from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_tokenizer
from conftest import assert_resumes_exactly
from test_vocab import new_docs

STDLIB = Path(sysconfig.get_paths()["stdlib"])
BASE_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py"]
ARGS = ["--seq-len", "32", "--batch-size", "4", "--dtype", "float32", "--no-progress", "--no-compile",
        "--lr", "3e-3", "--heldout-fraction", "0.2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    base_text = root / "base"
    base_text.mkdir()
    for f in BASE_FILES:
        shutil.copy(STDLIB / f, base_text / f)
    new_text = root / "new"
    new_text.mkdir()
    for i, doc in enumerate([new_docs(10, seed=s) for s in range(4)]):
        (new_text / f"part{i}.txt").write_text("".join(doc))
    model_dir = root / "model"
    tok = train_tokenizer([base_text], 500, model_dir)
    nanoseek.save_pretrained(Transformer(get_preset("tiny", vocab_size=tok.vocab_size)), model_dir)
    ext = V.extend_tokenizer(tok, (d for f in sorted(new_text.iterdir()) for d in [f.read_text()]), 40)
    ext.save(root / "ext")
    return {"root": root, "base_text": base_text, "new_text": new_text, "model": model_dir, "ext": root / "ext",
            "cache": root / "cache", "base_vocab": tok.vocab_size}


def run(env, out, *args) -> list[dict]:
    argv = ["--init", str(env["model"]), "--tokenizer", str(env["ext"]), "--data", str(env["new_text"]),
            "--cache-dir", str(env["cache"]), "--out", str(out), *ARGS, *args]
    assert adapt.cli("adapt", argv) == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_rows_stage_trains_only_the_new_rows(env, tmp_path, capsys, dtype):
    """bfloat16: the head is a bf16 working copy with an fp32 master in the optimizer; the mask holds there too."""
    run(env, tmp_path / "a", "--max-steps", "3", "--new-rows-steps", "3", "--eval-tokens", "0", "--dtype", dtype)
    assert "extended the vocabulary: 40 new tokens" in capsys.readouterr().err
    before = nanoseek.from_pretrained(env["model"]).state_dict()
    after = nanoseek.from_pretrained(tmp_path / "a" / "final").state_dict()
    lo = env["base_vocab"]
    hi = lo + 40
    assert after["embed_tokens.weight"].shape[0] == hi
    for k, v in before.items():
        if k.startswith("rotary."):
            continue
        if k in ("embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[k][:lo], v), k  # old rows bit for bit, the head's too (no decay)
            assert not torch.equal(after[k][lo:hi], _initial_rows(env, k)), k  # the new rows trained
        else:
            assert torch.equal(after[k], v), k  # frozen, the routers' balancing bias included


def test_new_rows_stage_has_its_lr_and_the_rest_warms_up_again(env, tmp_path):
    recs = run(env, tmp_path / "lr", "--max-steps", "6", "--new-rows-steps", "2", "--new-rows-lr", "1e-2",
               "--warmup", "2", "--min-lr", "3e-4", "--eval-tokens", "0")
    lrs = [r["lr"] for r in sorted(recs, key=lambda r: r["step"]) if "lr" in r]
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])  # the stage: its own warm-up to --new-rows-lr
    assert lrs[2:4] == pytest.approx([1.5e-3, 3e-3])  # full training starts its warm-up again, to --lr
    assert lrs[4] == pytest.approx(3e-3) and lrs[5] < 3e-3  # then the decay


def _initial_rows(env, key: str) -> torch.Tensor:
    from nanoseek.tokenizer import load_tokenizer
    model = nanoseek.from_pretrained(env["model"])
    V.extend_model(model, load_tokenizer(env["model"]), load_tokenizer(env["ext"]))
    return model.state_dict()[key][env["base_vocab"]:]


def test_adapt_reports_both_domains_and_saves_the_extended_model(env, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "b"
    recs = run(env, out, "--max-steps", "4", "--new-rows-steps", "2", "--replay", str(env["base_text"]),
               "--replay-ratio", "0.25", "--eval-every", "2", "--eval-tokens", "256")
    evals = [r for r in recs if "eval_bpb" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 < r["eval_bpb"] < 20 and 0 < r["eval_base_bpb"] < 20 for r in evals)
    report = (out / "report.md").read_text()
    assert "base-domain bits/byte" in report and f"{evals[-1]['eval_base_bpb']:.4f}" in report
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert hf.get_input_embeddings().weight.shape[0] == env["base_vocab"] + 40
    assert transformers.AutoTokenizer.from_pretrained(out / "final").vocab_size >= env["base_vocab"]


def test_adapt_resumes_exactly(env, tmp_path):
    """Across the switch from the new-rows stage to full training, with replay rows in every batch."""
    args = ["--max-steps", "6", "--new-rows-steps", "2", "--save-every", "2", "--eval-tokens", "0",
            "--replay", str(env["base_text"]), "--replay-ratio", "0.25"]
    assert_resumes_exactly(lambda out, *a: run(env, out, *a), tmp_path / "full", tmp_path / "part", *args)


def test_bad_adapt_arguments_fail_clearly(env, tmp_path, capsys):
    assert adapt.cli("adapt", ["--init", str(env["model"]), "--tokenizer", str(env["ext"]), "--data",
                               str(env["new_text"]), "--out", str(tmp_path), "--replay-ratio", "0.5"]) == 2
    assert "--replay and --replay-ratio go together" in capsys.readouterr().err
    # the model's own tokenizer adds nothing: no new rows to train first
    assert adapt.cli("adapt", ["--init", str(env["model"]), "--tokenizer", str(env["model"]), "--data",
                               str(env["new_text"]), "--out", str(tmp_path / "x"), "--new-rows-steps", "1",
                               "--max-steps", "2", *ARGS, "--cache-dir", str(env["cache"])]) == 1
    assert "adds no tokens" in capsys.readouterr().err


def test_lora_adapt_carries_the_new_rows_in_the_adapter(env, tmp_path):
    """adapt --lora-rank: the base frozen, the new tokens' rows trained with the adapter and saved in it as PEFT's
    trainable tokens; `lora merge` gives the extended model, and PEFT on transformers' base (resized to the
    adapter's tokenizer, as PEFT users do) gives the same logits."""
    from nanoseek import lora
    from nanoseek.cli import main
    out = tmp_path / "lora"
    run(env, out, "--max-steps", "4", "--new-rows-steps", "2", "--eval-tokens", "0", "--lora-rank", "4")
    final = out / "final"
    js = json.loads((final / "adapter_config.json").read_text())
    lo, hi = env["base_vocab"], env["base_vocab"] + 40
    assert js["trainable_token_indices"] == {"embed_tokens": list(range(lo, hi)), "lm_head": list(range(lo, hi))}
    model = lora.load_adapter(nanoseek.from_pretrained(env["model"]), final)
    assert model.config.vocab_size == hi
    base = nanoseek.from_pretrained(env["model"]).state_dict()
    init = _initial_rows(env, "embed_tokens.weight")
    assert torch.equal(model.embed_tokens.weight[:lo], base["embed_tokens.weight"])  # the base untouched
    assert not torch.equal(model.embed_tokens.token_rows.detach(), init)  # the new rows trained
    assert main(["lora", "merge", "--base", str(env["model"]), "--adapter", str(final),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = nanoseek.from_pretrained(tmp_path / "merged")
    ids = torch.randint(lo - 20, hi, (2, 24))  # new tokens among them
    with torch.no_grad():
        ours = model(ids).logits
        assert (merged(ids).logits - ours).abs().max() <= 1e-5
    # serve BASE --lora NAME=ADAPTER: the adapter's extended tokenizer and rows (prompt logprobs of new tokens)
    openai = pytest.importorskip("openai")
    from nanoseek.server.api import ServeConfig, ServerThread
    prompt = ids[0].tolist()
    ref = ours[0].log_softmax(-1)
    want = [ref[t, prompt[t + 1]].item() for t in range(len(prompt) - 1)]
    with ServerThread(ServeConfig(str(env["model"]), dtype="float32", lora=("cy", str(final)))) as srv:
        srv.wait_ready()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        r = c.completions.create(model="cy", prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32)
    hf.resize_token_embeddings(transformers.AutoTokenizer.from_pretrained(final).vocab_size)
    pm = peft.PeftModel.from_pretrained(hf, final).eval()
    with torch.no_grad():
        diff = (pm(input_ids=ids).logits - ours).abs().max().item()
    assert diff <= 1e-4, diff


def test_lora_adapt_resumes_exactly(env, tmp_path):
    args = ["--max-steps", "6", "--new-rows-steps", "2", "--save-every", "2", "--eval-tokens", "0",
            "--lora-rank", "4"]
    assert_resumes_exactly(lambda out, *a: run(env, out, *a), tmp_path / "full", tmp_path / "part", *args)
