"""Loaders that fail fast with one clear line (issue 16, item 3): `from_pretrained` on broken model folders.

Each case starts from a good tiny checkpoint and breaks one thing: a config.json value of the wrong type or range,
a malformed safetensors header, a config that claims a far larger model than the weights on disk. Every one must
end in a single-line CheckpointError naming the file and the field or tensor, without allocating the model the
config claims (peak RSS measured in a subprocess, against a good load in the same run). The commands print that
line and no traceback (`--debug` shows it).
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loaders") / "good"
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.Transformer(nanoseek.get_preset("tiny")), out)
    return out


def broken(good: Path, tmp_path: Path, config=None, weights=None) -> Path:
    """A copy of the good folder with config.json edited by config(dict) -> JSON value, and/or model.safetensors
    rewritten by weights(header, data) -> bytes."""
    d = tmp_path / "broken"
    shutil.copytree(good, d)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config(json.loads((good / "config.json").read_text()))))
    if weights is not None:
        raw = (good / "model.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        (d / "model.safetensors").write_bytes(weights(json.loads(raw[8:8 + n]), raw[8 + n:]))
    return d


def pack(header, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def edit(**kw):
    return lambda c: {**c, **kw}


def without(*keys):
    return lambda c: {k: v for k, v in c.items() if k not in keys}


def rope(fn):
    return lambda c: {**c, "rope_scaling": fn(c["rope_scaling"])}


def one_tensor(fn, name="model.norm.weight"):
    def weights(h, data):
        fn(h[name])
        return pack(h, data)
    return weights


def one_line_error(path: Path, *must_name: str) -> str:
    with pytest.raises(CheckpointError) as e:
        nanoseek.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for s in must_name:
        assert s in msg, (s, msg)
    return msg


CONFIG_CASES = {
    "hidden_size_string": (edit(hidden_size="64"), "hidden_size"),
    "hidden_size_negative": (edit(hidden_size=-64), "hidden_size"),
    "layers_bool": (edit(num_hidden_layers=True), "num_hidden_layers"),
    "layers_float": (edit(num_hidden_layers=3.0), "num_hidden_layers"),
    "vocab_null": (edit(vocab_size=None), "vocab_size"),
    "eps_string": (edit(rms_norm_eps="1e-6"), "rms_norm_eps"),
    "tie_int": (edit(tie_word_embeddings=1), "tie_word_embeddings"),
    "rope_scaling_string": (edit(rope_scaling="yarn"), "rope_scaling"),
    "rope_scaling_no_factor": (rope(lambda r: {k: v for k, v in r.items() if k != "factor"}), "factor"),
    "rope_factor_string": (rope(lambda r: {**r, "factor": "4"}), "rope_scaling.factor must be a number"),
    "rope_factor_negative": (rope(lambda r: {**r, "factor": -4}), "rope_factor must be a positive number"),
    "config_is_a_list": (lambda c: [c], "JSON object"),
    "quant_block_bad": (edit(quantization_config={"weight_block_size": [128]}), "weight_block_size"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_malformed_config_is_one_line_naming_the_field(good, tmp_path, case):
    mutate, field = CONFIG_CASES[case]
    d = broken(good, tmp_path, config=mutate)
    one_line_error(d, str(d / "config.json"), field)


HEADER_CASES = {
    "header_is_a_list": (lambda h, data: pack([1, 2], data), "not an object"),
    "no_data_offsets": (one_tensor(lambda t: t.pop("data_offsets")), "'model.norm.weight' has no valid data_offsets"),
    "no_shape": (one_tensor(lambda t: t.pop("shape")), "'model.norm.weight' has no valid shape"),
    "bad_dtype": (one_tensor(lambda t: t.update(dtype="F7")), "'model.norm.weight' has unsupported dtype"),
    # the shape says more bytes than the offsets give: formerly a reshape error masked by BufferError
    "data_shorter_than_declared": (one_tensor(lambda t: t.update(shape=[t["shape"][0] * 2])),
                                   "'model.norm.weight' declares shape [128]"),
    "file_truncated": (lambda h, data: pack(h, data[:-1000]), "truncated safetensors file"),
    "header_not_json": (lambda h, data: (5).to_bytes(8, "little") + b"{nope" + data, "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_safetensors_header_is_one_line_naming_the_tensor(good, tmp_path, case):
    mutate, expect = HEADER_CASES[case]
    d = broken(good, tmp_path, weights=mutate)
    one_line_error(d, str(d / "model.safetensors"), expect)


def test_shape_mismatch_names_tensor_before_allocating(good, tmp_path):
    """A header consistent in itself but not with config.json: named by tensor, checked on a meta model."""
    d = broken(good, tmp_path, config=edit(kv_lora_rank=16))
    one_line_error(d, "model.safetensors", "'model.layers.0.self_attn.kv_a_layernorm.weight' has shape (32,), "
                   "the config expects (16,)")


def test_index_that_is_not_an_object(good, tmp_path):
    d = broken(good, tmp_path)
    (d / "model.safetensors.index.json").write_text("[1]")
    one_line_error(d, "model.safetensors.index.json")


def test_missing_field_takes_transformers_default_and_the_mismatch_names_it(good, tmp_path):
    """transformers' DeepseekV3Config fills a missing hidden_size with 7168; so do we, but the tiny weights on disk
    then refuse it, naming the field config.json left out."""
    d = broken(good, tmp_path, config=without("hidden_size"))
    one_line_error(d, str(d / "config.json"), "does not set hidden_size")


# from_pretrained on each folder, then the process's peak RSS (Linux: ru_maxrss in KiB). A watchdog ends the process
# as soon as the peak passes the cap, so a loader that builds what a bogus config claims fails in seconds, not after
# minutes of allocation
PEAK_RSS = """
import json, os, resource, sys, threading, time
import nanoseek
cap_mb = float(sys.argv[1])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def watchdog():
    while peak_mb() <= cap_mb:
        time.sleep(0.05)
    print(json.dumps({"peak_mb": peak_mb(), "over_cap": True}), flush=True)
    os._exit(3)
threading.Thread(target=watchdog, daemon=True).start()
out = {}
for d in sys.argv[2:]:
    try:
        nanoseek.from_pretrained(d)
        out[d] = None
    except nanoseek.CheckpointError as e:
        out[d] = str(e)
out["peak_mb"] = peak_mb()
print(json.dumps(out))
"""


def peak_rss(cap_mb: float, *dirs: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, str(cap_mb), *map(str, dirs)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


def test_config_claiming_a_huge_model_allocates_nothing(good, tmp_path):
    """num_hidden_layers 10^6 (formerly minutes of building modules, RSS growing all along), 10^9 MTP layers,
    8x10^5 experts and a 7168-wide model over tiny weights: refused by arithmetic on the headers, the process
    peaking no higher than a good tiny load does (+100 MB of slack)."""
    cases = {"layers": edit(num_hidden_layers=10 ** 6), "mtp": edit(num_nextn_predict_layers=10 ** 9),
             "wide": without("hidden_size"),
             "experts": edit(n_routed_experts=8 * 10 ** 5, n_group=1, topk_group=1)}
    dirs = {}
    for name, mutate in cases.items():
        (tmp_path / name).mkdir()
        dirs[name] = broken(good, tmp_path / name, config=mutate)
    base = peak_rss(float("inf"), good)
    assert base[str(good)] is None
    # the smallest of the claimed models, the 7168-wide one, is 145M float32 parameters (555 MB): building any of
    # them shows far above the cap
    wide = nanoseek.config.ModelConfig.from_hf(json.loads((dirs["wide"] / "config.json").read_text()))
    assert wide.num_params(include_mtp=True)["total"] * 4 / 2 ** 20 > 500
    bad = peak_rss(base["peak_mb"] + 100, *dirs.values())
    assert "num_hidden_layers is 1000000" in bad[str(dirs["layers"])]
    assert "num_nextn_predict_layers 1000000000" in bad[str(dirs["mtp"])]
    assert "hidden_size" in bad[str(dirs["wide"])]
    assert "describes a model of" in bad[str(dirs["experts"])]
    assert bad["peak_mb"] < base["peak_mb"] + 100, (bad["peak_mb"], base["peak_mb"])


# ---- the commands ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_model_dir(good, tmp_path_factory) -> Path:
    """A folder with a tokenizer, a good config and a safetensors header that is a list."""
    from nanoseek.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("badcli")
    corpus = root / "corpus.txt"
    corpus.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    d = root / "model"
    shutil.copytree(good, d)
    train_tokenizer([corpus], vocab_size=300, out_dir=d)
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    (d / "model.safetensors").write_bytes(pack([1, 2], raw[8 + n:]))
    return d


def nanoseek_cmd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("cmd", [["generate", "{d}", "hello", "--dtype", "float32"],
                                 ["serve", "{d}", "--port", "0", "--dtype", "float32"]], ids=["generate", "serve"])
def test_commands_print_one_line_and_traceback_only_with_debug(bad_model_dir, cmd):
    argv = [a.format(d=bad_model_dir) for a in cmd]
    r = nanoseek_cmd(*argv)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    culprit = f"{bad_model_dir / 'model.safetensors'}: corrupt safetensors header"
    lines = [line for line in r.stderr.splitlines() if culprit in line]
    assert len(lines) == 1, r.stderr
    r = nanoseek_cmd(*argv, "--debug")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and culprit in r.stderr
