"""Shared fixtures: tiny random configs and models, built locally (nothing is downloaded)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from more, and OpenMP hand-offs on a busy
    2-core machine cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def simde_cc() -> str:
    """The C compiler for building AVX-512 kernel code over SIMDe's portable intrinsics (tests/simde), on an
    x86-64 host; skips where there is none or SIMDe's headers are missing."""
    from nanoseek.kernels import build, isa
    cc = build.compiler()
    if isa.arch() != "x86_64" or cc is None:
        pytest.skip("needs an x86-64 host with a C compiler")
    if not Path("/usr/include/simde/x86/avx512.h").exists():
        pytest.skip("SIMDe headers not installed (Debian: libsimde-dev)")
    return cc


def assert_resumes_exactly(run, full_dir: Path, part_dir: Path, *args: str, stop: int = 3, steps: int = 6) -> None:
    """A run stopped after `stop` steps and resumed gives the losses, gradient norms and final weights of the same
    run done in one go. run(out_dir, *args) trains and returns metrics.jsonl's records."""
    full = run(full_dir, *args)
    part = run(part_dir, *args, "--stop-after", str(stop))
    assert [r["step"] for r in part] == list(range(1, stop + 1))
    resumed = run(part_dir, *args, "--resume")
    assert_same_run(full, resumed, full_dir, part_dir, steps)


def assert_same_run(full: list[dict], resumed: list[dict], full_dir: Path, part_dir: Path, steps: int) -> None:
    """The resumed run's metrics.jsonl records and final weights are those of the run done in one go."""
    import nanoseek
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(full, resumed):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k, a[k], b[k])

    def weights(final: Path) -> dict:  # a model, or a LoRA adapter (PEFT's file)
        if (final / "adapter_model.safetensors").is_file():
            from safetensors.torch import load_file
            return load_file(final / "adapter_model.safetensors")
        return nanoseek.from_pretrained(final).state_dict()
    m1, m2 = weights(full_dir / "final"), weights(part_dir / "final")
    assert m1.keys() == m2.keys()
    for k, v in m1.items():
        assert torch.allclose(v, m2[k], atol=1e-6), k
