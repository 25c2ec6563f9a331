"""LoRA (`nanoseek/lora.py`): a frozen base, merged == unmerged, PEFT's format checked by loading the adapter with
peft onto transformers' model of the same base, `lora merge`, exact training resume and `serve --lora`."""
import json

import pytest
import torch

import nanoseek
from nanoseek import lora
from nanoseek.config import get_preset
from nanoseek.model.transformer import cross_entropy

B, T = 2, 40


def tiny_cfg(**kw):
    return get_preset("tiny", **{"model_type": "deepseek_v3", "index_topk": 0, "index_n_heads": 0, "n_group": 4,
                                 "topk_group": 2, "num_nextn_predict_layers": 0, **kw})


def base_model(cfg=None):
    model = nanoseek.Transformer(cfg or tiny_cfg()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def randomize_adapters(model, std=0.05):
    """B = 0 at init would make every check trivially pass: give the adapters non-zero factors."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)


def test_only_adapters_train_and_base_is_unchanged():
    model = lora.apply_lora(base_model(), rank=4, alpha=8).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # every target kind is adapted: attention, dense MLP (layer 0), shared and routed experts
    for part in ("self_attn.q_a_proj.lora_A", "self_attn.kv_b_proj.lora_B", "layers.0.mlp.gate_proj.lora_A",
                 "mlp.shared_experts.down_proj.lora_B", "mlp.experts.gate_up_lora_A", "mlp.experts.down_lora_B"):
        assert any(part in n for n in trainable), part
    with torch.no_grad():  # the adapted model starts as its base (B = 0)
        ids = torch.randint(0, model.config.vocab_size, (B, T))
        before = model(ids).logits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cross_entropy(model(ids[:, :-1]).logits, ids[:, 1:]).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    opt.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() > 1e-4  # the step did change the model


def test_merged_equals_unmerged():
    model = base_model()
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        plain = model(ids).logits
    lora.apply_lora(model, rank=4, alpha=16, rslora=True)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(ids).logits
        lora.merge_lora(model)
        merged = model(ids).logits
    assert not lora.lora_modules(model) and not any("lora_" in n for n, _ in model.named_parameters())
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (merged - plain).abs().max() > 1e-3


def test_expert_paths_agree_with_adapters():
    model = lora.apply_lora(base_model(), rank=2, alpha=4, targets=["experts"])
    randomize_adapters(model)
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        grouped = model(ids).logits
        model.set_expert_impl("loop")
        loop = model(ids).logits
    assert (grouped - loop).abs().max() <= 1e-5


def test_dropout_only_on_attention():
    with pytest.raises(ValueError, match="dropout"):
        lora.apply_lora(base_model(), rank=2, alpha=4, dropout=0.1)
    model = lora.apply_lora(base_model(), rank=2, alpha=4, targets=["q_a_proj", "o_proj"], dropout=0.1)
    assert all(isinstance(m, lora.LoraLinear) for m in lora.lora_modules(model).values())


def test_save_load_and_merge_cli(tmp_path):
    base = base_model()
    nanoseek.save_pretrained(base, tmp_path / "base")
    model = lora.apply_lora(nanoseek.from_pretrained(tmp_path / "base"), rank=3, alpha=6)
    randomize_adapters(model)
    lora.save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    again = lora.load_adapter(nanoseek.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    from nanoseek.cli import main
    assert main(["lora", "merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = nanoseek.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(again(ids).logits, ref)
        assert (merged(ids).logits - ref).abs().max() <= 1e-5


def test_peft_loads_the_adapter_onto_transformers(tmp_path):
    """PEFT's own loader on transformers' DeepseekV3 must give the adapted model's logits."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    base = base_model()
    nanoseek.save_pretrained(base, tmp_path / "base")
    model = lora.apply_lora(base, rank=4, alpha=8)
    randomize_adapters(model)
    lora.save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = peft_model(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"peft max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(input_ids=ids).logits - theirs).abs().max() > 1e-3  # the adapter did act


def test_adapter_config_is_peft_readable(tmp_path):
    peft = pytest.importorskip("peft")
    model = lora.apply_lora(base_model(), rank=2, alpha=4, targets=["o_proj", "up_proj", "experts"])
    lora.save_adapter(model, tmp_path, "base")
    js = json.loads((tmp_path / lora.CONFIG_FILE).read_text())
    cfg = peft.LoraConfig.from_pretrained(tmp_path)
    assert cfg.r == 2 and list(cfg.target_modules) == ["o_proj"]
    assert set(cfg.target_parameters) == {"up_proj.weight", "experts.gate_up_proj", "experts.down_proj"}
    assert lora.config_from_peft(js) == model.lora_config


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory):
    """A small corpus, a 400-token tokenizer and a random tiny base model (with that tokenizer) to adapt."""
    import shutil
    import sysconfig
    from pathlib import Path

    from nanoseek.tokenizer import load_tokenizer, train_tokenizer
    root = tmp_path_factory.mktemp("lora")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / f, corpus / f)
    train_tokenizer([corpus], 400, root / "tok")
    tok = load_tokenizer(root / "tok")
    base = base_model(tiny_cfg(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    nanoseek.save_pretrained(base, root / "base")
    tok.save(root / "base")
    return root


def train_lora(env, out, *args) -> list[dict]:
    from nanoseek import train as T
    argv = ["--data", str(env / "corpus"), "--init", str(env / "base"), "--cache-dir", str(env / "cache"),
            "--out", str(out), "--seq-len", "32", "--batch-size", "2", "--no-progress", "--no-compile",
            "--eval-tokens", "0", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", *args]
    assert T.cli("train", argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_training_resumes_exactly(lora_env, tmp_path, dtype, one_thread):
    """Checkpoints hold the adapters and their AdamW moments: stop-and-resume is the same run; final/ is a
    PEFT adapter of the frozen base."""
    from safetensors.torch import load_file
    args = ["--max-steps", "4", "--save-every", "2", "--dtype", dtype]
    full = train_lora(lora_env, tmp_path / "full", *args)
    part = train_lora(lora_env, tmp_path / "part", *args, "--stop-after", "3")
    assert [r["step"] for r in part] == [1, 2, 3]
    resumed = train_lora(lora_env, tmp_path / "part", *args, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for k in ("loss", "lm_loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k, a[k], b[k])
    final = tmp_path / "full" / "final"
    assert {p.name for p in final.iterdir()} >= {lora.CONFIG_FILE, lora.WEIGHTS_FILE, "tokenizer.json"}
    w1, w2 = load_file(str(final / lora.WEIGHTS_FILE)), load_file(str(tmp_path / "part" / "final" / lora.WEIGHTS_FILE))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(k.endswith("lora_B.weight") and w1[k].abs().max() > 0 for k in w1)  # the adapters trained
    base = nanoseek.from_pretrained(lora_env / "base")
    ckpt = load_file(str(next((tmp_path / "full" / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert ckpt.keys() == w1.keys()  # checkpoints hold the adapters only: the base stays where it is
    adapted = lora.load_adapter(nanoseek.from_pretrained(lora_env / "base"), final)
    ids = torch.randint(0, base.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (adapted(ids).logits - base(ids).logits).abs().max() > 1e-4


def test_serve_lora_serves_the_merged_adapter(lora_env, tmp_path):
    """`serve BASE --lora NAME=PATH`: the model is called NAME and its prompt logprobs are the adapted model's."""
    openai = pytest.importorskip("openai")
    from nanoseek.server.api import ServeConfig, ServerThread
    model = lora.apply_lora(nanoseek.from_pretrained(lora_env / "base"), rank=2, alpha=4)
    randomize_adapters(model, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter", str(lora_env / "base"))
    ids = [model.config.bos_token_id, *torch.randint(3, model.config.vocab_size, (11,)).tolist()]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [ref[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    with torch.no_grad():
        plain = nanoseek.from_pretrained(lora_env / "base")(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert max(abs(plain[t, ids[t + 1]].item() - w) for t, w in enumerate(want)) > 1e-3  # the adapter matters
    cfg = ServeConfig(str(lora_env / "base"), dtype="float32", lora=("my-adapter", str(tmp_path / "adapter")))
    with ServerThread(cfg) as srv:
        srv.wait_ready()
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["my-adapter", "my-adapter-thinking"]
        r = c.completions.create(model="my-adapter", prompt=ids, max_tokens=0, logprobs=1, echo=True)
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
