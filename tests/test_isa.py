"""nanoseek/kernels/isa.py: the CPU's features as nanoseek reads them."""
import fnmatch

from nanoseek import precision
from nanoseek.kernels import isa


def test_hidden_cpu_flags_are_absent_for_the_variants_and_the_dtype_rule(monkeypatch):
    """NANOSEEK_HIDE_CPU_FLAGS: the CPU reads as one without those features (here: no AVX-512, no AMX, no ARM
    BF16), for the kernel variants and `--dtype auto`'s native-bf16 test alike; the other flags stay. (The suite
    may itself run with the variable set: the flags as the session reads them are restored after.)"""
    session = isa.cpu_flags()
    patterns = ("avx512*", "amx*", "bf16")
    try:
        monkeypatch.delenv("NANOSEEK_HIDE_CPU_FLAGS", raising=False)
        isa.cpu_flags.cache_clear()
        real = isa.cpu_flags()
        monkeypatch.setenv("NANOSEEK_HIDE_CPU_FLAGS", "avx512* amx*,bf16")
        isa.cpu_flags.cache_clear()
        flags = isa.cpu_flags()
        assert flags == {f for f in real if not any(fnmatch.fnmatchcase(f, p) for p in patterns)}
        assert not any(isa.runs(v) for v in ("avx512bf16", "avx512", "neon-bf16"))
        assert isa.runs("avx2") == ("avx2" in real and isa.arch() == "x86_64" and {"fma", "f16c", "bmi2"} <= real)
        assert not precision.native_bf16_cpu()
    finally:
        monkeypatch.undo()
        isa.cpu_flags.cache_clear()
    assert isa.cpu_flags() == session
