"""`cpu_experts.c` for the kernel variants this machine cannot run: each compiles (with that variant's flags, a
cross compiler for another architecture) and exports every entry point. The self-test (`tests/cpu_experts_selftest.c`:
the three GEMMs in float32 and bf16 against double loops, bf16 ties to even) runs the NEON builds under qemu, and
the avx512 build's vector code with its intrinsics emulated by SIMDe (`tests/simde/immintrin.h`), where those are
installed. The variants this CPU runs are built and tested by `test_cpu_experts.py`.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from nanoseek.kernels import build, isa

KERNELS = Path(build.__file__).parent
SRC = KERNELS / "cpu_experts.c"
SELFTEST = Path(__file__).with_name("cpu_experts_selftest.c")
SIMDE = Path(__file__).with_name("simde")
ENTRY_POINTS = ("ne_isa", "ne_fwd", "ne_dgrad", "ne_wgrad", "ne_fwd_f32", "ne_dgrad_f32", "ne_wgrad_f32")
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "x86_64-linux-gnu-gcc"}  # Debian's cross compilers
QEMU_ARM = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max"]  # with the aarch64 libraries' root

pytestmark = pytest.mark.slow


def compiler_for(variant: str) -> str:
    arch = isa.VARIANTS[variant][0]
    cc = build.compiler() if arch == isa.arch() else CROSS_CC[arch]
    if cc is None or shutil.which(cc) is None:
        pytest.skip(f"no C compiler for {arch} ({cc or 'gcc'})")
    return cc


def variant_flags(variant: str) -> list[str]:
    """The library build's flags (`build.flags`) less -shared and the host's -mtune, plus warnings as errors."""
    return [f for f in build.flags(variant) if f not in ("-shared", "-fPIC") and not f.startswith("-mtune")] + [
        "-Wall", "-Werror", f"-I{KERNELS}"]


def run_selftest(cmd: list[str], variant: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"variant {variant}\n" in r.stdout and "FAILED" not in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("variant", isa.ORDER)
def test_compiles_for_variants_this_cpu_cannot_run(variant, tmp_path):
    if isa.runs(variant):
        pytest.skip(f"{variant} runs here: tests/test_cpu_experts.py builds and tests it")
    obj = tmp_path / "cpu_experts.o"
    r = subprocess.run([compiler_for(variant), *variant_flags(variant), "-c", str(SRC), "-o", str(obj)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = obj.read_bytes()  # the symbol table holds each exported name
    assert all(name.encode() + b"\0" in data for name in ENTRY_POINTS)
    assert f"{variant}\0".encode() in data  # ne_isa's string: simd.h picked this variant's vector code


@pytest.mark.parametrize("variant", ["neon", "neon-bf16"])
def test_selftest_under_qemu(variant, tmp_path):
    """The whole library for an ARM variant, run under qemu: the three GEMMs in both dtypes against plain loops."""
    if isa.runs(variant):
        pytest.skip(f"{variant} runs here: tests/test_cpu_experts.py tests it natively")
    cc = compiler_for(variant)
    if shutil.which(QEMU_ARM[0]) is None or not Path(QEMU_ARM[2]).is_dir():
        pytest.skip(f"no {QEMU_ARM[0]} with aarch64 libraries at {QEMU_ARM[2]}")
    exe = tmp_path / "selftest"
    r = subprocess.run([cc, *variant_flags(variant), str(SELFTEST), str(SRC), "-o", str(exe), "-lm"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_selftest([*QEMU_ARM, str(exe)], variant)


def test_avx512_selftest_emulated(tmp_path, simde_cc):
    """The avx512 variant's vector code (the float32 tiles, its 16 x 16 transpose, bf16 rounding) with SIMDe's
    portable AVX-512 intrinsics: what runs on an AVX-512 CPU without BF16, checked on any x86 CPU."""
    if isa.runs("avx512"):
        pytest.skip("avx512 runs here: tests/test_cpu_experts.py tests it natively")
    cc = simde_cc
    exe = tmp_path / "selftest"
    # AVX-512's feature macros without its instructions: simd.h takes its AVX-512 branch, SIMDe stays portable
    r = subprocess.run([cc, "-O1", "-fopenmp", "-ffp-contract=off", "-Wall", "-Werror", "-D__AVX512F__",
                        "-D__AVX512BW__", "-DSIMDE_NO_NATIVE", f"-I{SIMDE}", f"-I{KERNELS}", str(SELFTEST), str(SRC),
                        "-o", str(exe), "-lm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run_selftest([str(exe)], "avx512")
