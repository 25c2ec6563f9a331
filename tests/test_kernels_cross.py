"""The C self-test of the decode kernels (`tests/kernels_selftest.c`) for every kernel variant and both dtypes.

- natively: built with the library's flags (`build.flags`) and run for each variant of `isa.py` this machine runs,
  and for the scalar build;
- ARM64 (slow): cross-compiled (`neon`, `neon-bf16`, scalar) and run under qemu-aarch64 `-cpu max` (BF16 included),
  where aarch64-linux-gnu-gcc, its libgomp and qemu-aarch64 are installed (Debian: gcc-aarch64-linux-gnu,
  libgomp1-arm64-cross, qemu-user);
- x86 variants this CPU does not run (slow): compiled only (`-c`), so that their code at least builds.
The self-test compares the kernels' vector code with plain loops and prints "N passed, N failed".
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nanoseek.kernels import build, isa

SELFTEST = Path(__file__).with_name("kernels_selftest.c")
DEFINES = {"bf16": (), "float32": ("-DNS_F32",)}
SCALAR = {"x86_64": ("-march=x86-64",), "aarch64": ("-march=armv8-a+nosimd",)}  # no vector ISA: simd.h's scalar
AARCH64_ROOT = Path("/usr/aarch64-linux-gnu")  # Debian's sysroot of the cross libraries (qemu -L)


def flags(variant: str, dtype: str, arch: str) -> list[str]:
    """The library's compiler flags for `variant` (build.flags), for an executable that includes its source."""
    if variant == "scalar":
        fl = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")] + list(SCALAR[arch]) + list(DEFINES[dtype])
    else:
        fl = [f for f in build.flags(variant, DEFINES[dtype]) if f not in ("-shared", "-fPIC")]
    return fl + [f"-I{build.HERE}"]


def compile_selftest(cc: str, variant: str, dtype: str, out: Path, arch: str, only: bool = False) -> None:
    cmd = [cc, *flags(variant, dtype, arch), str(SELFTEST), "-o", str(out)] + (["-c"] if only else ["-lm"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode and re.search(r"cannot find -lgomp|libgomp\.spec", r.stderr):
        pytest.skip(f"{cc} has no libgomp (Debian: libgomp1-arm64-cross)")
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-3000:]}"


def run_selftest(cmd: list[str], variant: str) -> None:
    r = subprocess.run(cmd + [variant], capture_output=True, text=True, timeout=300)
    counts = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert r.returncode == 0 and counts and counts[2] == "0" and int(counts[1]) > 0, r.stdout[-3000:] + r.stderr
    assert f"cpu_decode self-test: {variant}," in r.stdout  # it ran the variant's vector code


NATIVE = [v for v in isa.ORDER if isa.VARIANTS[v][0] == isa.arch()] + ["scalar"]


@pytest.mark.parametrize("dtype", list(DEFINES))
@pytest.mark.parametrize("variant", NATIVE)
def test_selftest_native(variant, dtype, tmp_path):
    if variant != "scalar" and not isa.runs(variant):
        pytest.skip(f"this CPU does not run {variant} code (test_compiles_for_x86_variants_not_run_here builds it)")
    if isa.arch() not in SCALAR:
        pytest.skip(f"no kernel variants for {isa.arch()}")
    cc = build.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "selftest"
    compile_selftest(cc, variant, dtype, exe, isa.arch())
    run_selftest([str(exe)], variant)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DEFINES))
@pytest.mark.parametrize("variant", ["neon", "neon-bf16", "scalar"])
def test_selftest_aarch64_under_qemu(variant, dtype, tmp_path):
    if isa.arch() == "aarch64":
        pytest.skip("an ARM64 machine: test_selftest_native runs these")
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None:
        pytest.skip("no cross compiler aarch64-linux-gnu-gcc (Debian: gcc-aarch64-linux-gnu)")
    if qemu is None:
        pytest.skip("no qemu-aarch64 (Debian: qemu-user)")
    if not AARCH64_ROOT.is_dir():
        pytest.skip(f"no ARM64 sysroot at {AARCH64_ROOT} for qemu -L")
    exe = tmp_path / "selftest"
    compile_selftest(cc, variant, dtype, exe, "aarch64")
    run_selftest([qemu, "-cpu", "max", "-L", str(AARCH64_ROOT), str(exe)], variant)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DEFINES))
@pytest.mark.parametrize("variant", [v for v in isa.ORDER if isa.VARIANTS[v][0] == "x86_64"])
def test_compiles_for_x86_variants_not_run_here(variant, dtype, tmp_path):
    if isa.runs(variant):
        pytest.skip(f"this CPU runs {variant}: test_selftest_native builds and runs it")
    cc = build.compiler() if isa.arch() == "x86_64" else shutil.which("x86_64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("no C compiler for x86-64")
    compile_selftest(cc, variant, dtype, tmp_path / "selftest.o", "x86_64", only=True)


SIMDE = Path(__file__).with_name("simde")  # an <immintrin.h> over SIMDe's emulated intrinsics
SIMDE_FLAGS = {"avx512": ("-D__AVX512F__", "-D__AVX512BW__"),
               "avx512bf16": ("-D__AVX512F__", "-D__AVX512BW__", "-D__AVX512BF16__")}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DEFINES))
@pytest.mark.parametrize("variant", list(SIMDE_FLAGS))
def test_selftest_avx512_emulated(variant, dtype, tmp_path, simde_cc):
    """The AVX-512 variants' vector code run where the CPU lacks AVX-512: AVX-512's feature macros without its
    instructions, so simd.h and cpu_decode.c take their AVX-512 (BF16) branches while SIMDe computes each
    intrinsic in portable C (VDPBF16PS included). The float32 build has no avx512bf16 variant."""
    if isa.runs(variant):
        pytest.skip(f"this CPU runs {variant}: test_selftest_native runs it")
    if variant == "avx512bf16" and dtype == "float32":
        pytest.skip("the float32 build runs the avx512 variant on AVX-512 BF16 CPUs")
    cc = simde_cc
    exe = tmp_path / "selftest"
    r = subprocess.run([cc, "-O1", "-fopenmp", "-ffp-contract=off", *SIMDE_FLAGS[variant], "-DSIMDE_NO_NATIVE",
                        *DEFINES[dtype], f"-I{SIMDE}", f"-I{build.HERE}", str(SELFTEST), "-o", str(exe), "-lm"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_selftest([str(exe)], variant)
