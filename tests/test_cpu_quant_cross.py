"""`cpu_quant.c` for every kernel variant, the ones this CPU cannot run included: the C self-test
(`tests/cpu_quant_selftest.c`: int8 and int4 at G = 32, 64, 128, fp32 and bf16 activations, M = 1..8, odd N, K
with tails or several groups, against double loops within the fp32 error bound) built with each variant's flags
(`build.flags`, warnings as errors) and run natively (the variants this CPU runs, and the scalar build), under
qemu-aarch64 for NEON (Debian: gcc-aarch64-linux-gnu, libgomp1-arm64-cross, qemu-user), and with SIMDe's
emulated intrinsics for AVX-512 where the CPU lacks it; x86 variants this CPU cannot run otherwise are compiled."""
import shutil
import subprocess
from pathlib import Path

import pytest

from nanoseek.kernels import build, cpu_quant, isa

KERNELS = Path(build.__file__).parent
SRC = KERNELS / "cpu_quant.c"
SELFTEST = Path(__file__).with_name("cpu_quant_selftest.c")
SIMDE = Path(__file__).with_name("simde")
SCALAR = {"x86_64": ("-march=x86-64",), "aarch64": ("-march=armv8-a+nosimd",)}  # simd.h's scalar build
QEMU_ARM = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max"]  # with the aarch64 libraries' root


def flags(variant: str) -> list[str]:
    """The library's flags for `variant` (or the scalar build's) for an executable, host tuning left out."""
    if variant == "scalar":
        base = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")] + list(SCALAR[isa.arch()])
    else:
        base = [f for f in build.flags(variant) if f not in ("-shared", "-fPIC") and not f.startswith("-mtune")]
    return base + ["-Wall", "-Werror", f"-I{KERNELS}"]


def compile_selftest(cc: str, fl: list[str], exe: Path) -> None:
    r = subprocess.run([cc, *fl, str(SELFTEST), str(SRC), "-o", str(exe), "-lm"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def run_selftest(cmd: list[str], variant: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"variant {variant}\n" in r.stdout and " 0 failed" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("variant", [v for v in cpu_quant.VARIANTS if isa.VARIANTS[v][0] == isa.arch()] + ["scalar"])
def test_selftest_native(variant, tmp_path):
    if variant != "scalar" and not isa.runs(variant):
        pytest.skip(f"this CPU does not run {variant} code (the cross tests below build it)")
    if isa.arch() not in SCALAR or build.compiler() is None:
        pytest.skip("no C compiler or no kernel variants for this architecture")
    compile_selftest(build.compiler(), flags(variant), tmp_path / "selftest")
    run_selftest([str(tmp_path / "selftest")], variant)


@pytest.mark.slow
def test_selftest_neon_under_qemu(tmp_path):
    if isa.runs("neon"):
        pytest.skip("an ARM64 machine: test_selftest_native runs neon")
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None or shutil.which(QEMU_ARM[0]) is None or not Path(QEMU_ARM[2]).is_dir():
        pytest.skip("no aarch64-linux-gnu-gcc, qemu-aarch64 or aarch64 libraries")
    compile_selftest(cc, [f for f in build.flags("neon") if f not in ("-shared", "-fPIC")] + ["-Wall", "-Werror",
                                                                                               f"-I{KERNELS}"],
                     tmp_path / "selftest")
    run_selftest([*QEMU_ARM, str(tmp_path / "selftest")], "neon")


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in cpu_quant.VARIANTS if isa.VARIANTS[v][0] == "x86_64"])
def test_x86_variants_this_cpu_cannot_run(variant, tmp_path, simde_cc):
    """avx512: its vector code with SIMDe's portable intrinsics (AVX-512's feature macros without its
    instructions); avx2: compiled (every x86-64 CPU that runs these tests natively runs or lacks it alike)."""
    if isa.runs(variant):
        pytest.skip(f"this CPU runs {variant}: test_selftest_native runs it")
    if variant == "avx512":
        exe = tmp_path / "selftest"
        compile_selftest(simde_cc, ["-O1", "-fopenmp", "-ffp-contract=off", "-Wall", "-Werror", "-D__AVX512F__",
                                    "-D__AVX512BW__", "-DSIMDE_NO_NATIVE", f"-I{SIMDE}", f"-I{KERNELS}"], exe)
        run_selftest([str(exe)], variant)
    else:
        r = subprocess.run([simde_cc, *flags(variant), "-c", str(SRC), "-o", str(tmp_path / "q.o")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
