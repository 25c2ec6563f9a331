"""nanoseek/compile.py: the compile cache is keyed on the CPU's vector ISA. (That the compiled training step
computes what the eager one does is tests/test_train.py::test_compiled_training_matches_eager.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# one tiny graph compiled in a fresh process; prints inductor's graph-cache hits and misses and the result
PROBE = """
import json, torch
from torch._dynamo.utils import counters
from nanoseek.compile import key_cache_on_cpu_isa
key_cache_on_cpu_isa()
f = torch.compile(lambda x: torch.tanh(x) * 2 + 1, dynamic=False)
x = torch.linspace(-3, 3, 37)
ok = torch.allclose(f(x), torch.tanh(x) * 2 + 1)
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "ok": ok}))
"""


def probe(cache_dir, capability=None) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tag_is_added_once_and_keeps_the_users():
    import torch.compiler.config as cc
    from nanoseek.compile import key_cache_on_cpu_isa
    old = cc.cache_key_tag
    try:
        cc.cache_key_tag = "mine"
        key_cache_on_cpu_isa()
        key_cache_on_cpu_isa()
        tags = cc.cache_key_tag.split(",")
        assert tags[0] == "mine" and len(tags) == 2 and tags[1].startswith("nanoseek-cpu-isa:")
    finally:
        cc.cache_key_tag = old


@pytest.mark.slow
def test_a_graph_cached_for_another_isa_is_not_reused(tmp_path):
    """A graph compiled without vector code (ATEN_CPU_CAPABILITY=default) is compiled again, not loaded, by a
    process that vectorises, and that one's graph is reused by the next such process. Without the ISA in the key
    the second process loads the first one's graph: for AVX2 graphs loaded by an AVX-512 process, the training
    step corrupted the heap."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from nanoseek.kernels import build
    if build.compiler() is None:
        pytest.skip("no C compiler: torch.compile cannot build CPU kernels here")
    if not pick_vec_isa():
        pytest.skip("torch.compile generates no vector code on this CPU: a single ISA")
    first = probe(tmp_path, "default")
    second, third = probe(tmp_path), probe(tmp_path)
    assert first["ok"] and second["ok"] and third["ok"]
    assert (first["miss"], second["miss"], second["hit"]) == (1, 1, 0)
    assert (third["hit"], third["miss"]) == (1, 0)
