"""Resume that survives a damaged checkpoint (issue 16, item 2).

The latest checkpoint of a stopped run has each of its files damaged in turn (truncated, emptied, one byte flipped,
garbage JSON, deleted): `--resume` must skip it with one line naming the file and continue from the previous
checkpoint into the very run an uninterrupted one gives; a damaged latest.json falls back to the folders, folders
left by a save killed midway are removed, and checkpoints saved before manifests still load (sizes checked).
"""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import train as T
from nanoseek.checkpoint import CheckpointError
from nanoseek.tokenizer import train_tokenizer

from conftest import assert_same_run

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ARGS = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--dtype", "float32", "--no-progress",
        "--heldout-fraction", "0.2", "--no-compile", "--max-steps", "6", "--save-every", "1", "--lr", "3e-3",
        "--eval-tokens", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- damage ---------------------------------------------------------------------------------------------------
def truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def zero_bytes(f: Path):
    f.write_bytes(b"")


def flip_byte(f: Path):
    b = bytearray(f.read_bytes())
    b[-3] ^= 0x10  # in the data of the last tensor / inside the JSON text: still well-formed, silently wrong
    f.write_bytes(bytes(b))


def garbage_json(f: Path):
    f.write_text("{\"step\": 3, \"optim")


def delete(f: Path):
    f.unlink()


DAMAGE = {"truncated": truncate, "zero_bytes": zero_bytes, "flipped_byte": flip_byte, "garbage": garbage_json,
          "missing": delete}
CASES = [(f, d) for f in ("model.safetensors", "train_state.safetensors", "state.json")
         for d in ("truncated", "zero_bytes", "flipped_byte", "missing")] + \
        [("state.json", "garbage"), ("manifest.json", "garbage"), ("manifest.json", "truncated")]


# ---- the unit: resume_checkpoint over two saved checkpoints ---------------------------------------------------
def two_checkpoints(root: Path) -> Path:
    for step in (1, 2):
        T.save_checkpoint(root, step, {"w": torch.full((1000,), float(step))}, {"opt/m": torch.ones(500) * step},
                          {"step": step, "train_config": {}})
    return root / "checkpoints"


@pytest.mark.parametrize("name,damage", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_damaged_latest_is_skipped_in_one_line(tmp_path, name, damage):
    ck = two_checkpoints(tmp_path)
    DAMAGE[damage](ck / "step_0000002" / name)
    said = []
    path, (sd, _, state) = T.resume_checkpoint(tmp_path, said.append)
    assert path.name == "step_0000001" and state["step"] == 1 and torch.equal(sd["w"], torch.ones(1000))
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("--resume: skipping step_0000002: ") and str(ck / "step_0000002" / name) in said[0]


def test_unreadable_latest_json_falls_back_to_the_folders(tmp_path):
    ck = two_checkpoints(tmp_path)
    garbage_json(ck / "latest.json")
    said = []
    path, _ = T.resume_checkpoint(tmp_path, said.append)
    assert path.name == "step_0000002"
    assert len(said) == 1 and str(ck / "latest.json") in said[0], said


def test_latest_json_pointing_nowhere_falls_back(tmp_path):
    ck = two_checkpoints(tmp_path)
    shutil.rmtree(ck / "step_0000002")
    said = []
    assert T.resume_checkpoint(tmp_path, said.append)[0].name == "step_0000001"
    assert len(said) == 1 and "step_0000002" in said[0], said


def test_every_checkpoint_damaged_is_one_error(tmp_path):
    ck = two_checkpoints(tmp_path)
    for step in ("step_0000001", "step_0000002"):
        flip_byte(ck / step / "model.safetensors")
    said = []
    with pytest.raises(CheckpointError, match="no checkpoint in .* is intact"):
        T.resume_checkpoint(tmp_path, said.append)
    assert len(said) == 2


def test_checkpoint_without_manifest_loads_with_a_note(tmp_path):
    """Saved before manifests: still resumable; what the files say about themselves is checked, and a truncated
    one is still skipped by name."""
    ck = two_checkpoints(tmp_path)
    for step in ("step_0000001", "step_0000002"):
        (ck / step / "manifest.json").unlink()
    said = []
    assert T.resume_checkpoint(tmp_path, said.append)[0].name == "step_0000002"
    assert len(said) == 1 and "no manifest.json" in said[0] and "sizes were checked" in said[0]
    truncate(ck / "step_0000002" / "train_state.safetensors")
    said = []
    assert T.resume_checkpoint(tmp_path, said.append)[0].name == "step_0000001"
    assert "skipping step_0000002" in said[0] and "train_state.safetensors" in said[0]


def test_stale_temporary_folders_are_removed(tmp_path):
    ck = two_checkpoints(tmp_path)
    (ck / ".tmp_step_0000003_4242").mkdir()
    (ck / ".tmp_step_0000003_4242" / "model.safetensors").write_bytes(b"partial")
    (ck / ".latest_4242.json").write_text("{")
    assert T.clean_stale_saves(tmp_path) == [".latest_4242.json", ".tmp_step_0000003_4242"]
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step_0000001", "step_0000002"]


# ---- end to end: `nanoseek train --resume` continues into the same run ------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A corpus and tokenizer, a 6-step run done in one go, and the same run stopped after step 3 (checkpoints
    step 2 and step 3 kept)."""
    root = tmp_path_factory.mktemp("resume")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        shutil.copy(STDLIB / f, corpus / f)
    train_tokenizer([corpus], 600, root / "tok")

    def run(out: Path, *args: str) -> list[dict]:
        argv = ["--data", str(corpus), "--tokenizer", str(root / "tok"), "--cache-dir", str(root / "cache"),
                "--out", str(out), *ARGS, *args]
        assert T.cli("train", argv) == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(root / "full")
    run(root / "part", "--stop-after", "3")
    assert sorted(p.name for p in (root / "part" / "checkpoints").glob("step_*")) == ["step_0000002",
                                                                                     "step_0000003"]
    return {"run": run, "full": full, "full_dir": root / "full", "part_dir": root / "part"}


E2E = CASES + [("latest.json", "garbage")]


@pytest.mark.parametrize("name,damage", E2E, ids=[f"{f}-{d}" for f, d in E2E])
def test_resume_after_damage_is_the_uninterrupted_run(runs, tmp_path, capsys, name, damage):
    part = tmp_path / "part"
    shutil.copytree(runs["part_dir"], part)
    ck = part / "checkpoints"
    DAMAGE[damage](ck / name if name == "latest.json" else ck / "step_0000003" / name)
    (ck / ".tmp_step_0000004_999999").mkdir()  # a save killed midway
    capsys.readouterr()
    resumed = runs["run"](part, "--resume")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if name == "latest.json":  # the folders are intact: the newest one is taken
        assert f"--resume: {ck / 'latest.json'}: unreadable" in err
        assert "steps 4..6 of 6" in err
    else:
        lines = [line for line in err.splitlines() if "skipping" in line]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"nanoseek train: --resume: skipping step_0000003: {ck / 'step_0000003' / name}: ")
        assert "steps 3..6 of 6" in err
    assert "removed what an interrupted save left" in err and not (ck / ".tmp_step_0000004_999999").exists()
    assert_same_run(runs["full"], resumed, runs["full_dir"], part, steps=6)
    m1 = nanoseek.from_pretrained(runs["full_dir"] / "final").state_dict()
    m2 = nanoseek.from_pretrained(part / "final").state_dict()
    assert all(torch.equal(v, m2[k]) for k, v in m1.items())  # bit-identical, not merely close
