"""kernels/hugepages.py: a model's weights moved into a mapping that asks for transparent huge pages keep their
values, Parameter objects, state dict and sharing; the engine decodes the same tokens either way; the mapping goes
with the model; nothing moves where it is off, unsupported or would not fit twice in free memory."""
import gc
import subprocess
import sys

import pytest
import torch

from nanoseek import Transformer, get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.kernels import hugepages

pytestmark = pytest.mark.usefixtures("one_thread")
needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="no transparent huge pages here (not Linux, "
                               "THP mode never, or NANOSEEK_HUGEPAGES=0)")


def model(**kw):
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", **kw)).eval()


@needs_thp
def test_place_keeps_values_objects_and_sharing():
    m = model(tie_word_embeddings=True)
    params = dict(m.named_parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    view = m.layers[0].self_attn.kv_b_proj.weight[3:]  # a view another holder keeps: it stays where it was
    moved = hugepages.place(m)
    assert moved >= sum(p.numel() * p.element_size() for p in m.parameters())
    assert dict(m.named_parameters()) == params  # the same Parameter objects
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert m.lm_head.weight is m.embed_tokens.weight  # tied: one Parameter, now in the mapping
    assert all(hugepages.inside(t) for t in [*m.parameters(), *m.buffers()])
    assert not hugepages.inside(view) and torch.equal(view, m.layers[0].self_attn.kv_b_proj.weight[3:])
    stats = hugepages.mapping_stats(m.embed_tokens.weight)
    assert "hg" in stats["VmFlags"]  # the mapping asks for huge pages
    assert hugepages.place(m) == 0  # already there


@needs_thp
def test_shared_storage_stays_shared():
    base = torch.arange(24, dtype=torch.float32)
    a, b = base[:12].view(3, 4), base[6:].view(2, 9)[:, ::3]  # overlapping views of one storage, one strided
    hugepages.place_tensors([a, b, base])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert hugepages.inside(base) and b.stride() == (9, 3)
    base[7] = -1.0  # a write through one is seen through the others
    assert a[1, 3] == -1.0 and b[0, 0] == 6.0 and torch.equal(b[1], torch.tensor([15.0, 18.0, 21.0]))


def rss_bytes() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) * 1024


@needs_thp
@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_pool_memory_is_taken_as_the_cache_fills(kv):
    """The engine's pool in huge pages: zero, and no memory taken until rows are written, where a pool allocated by
    torch.zeros takes all of it at once (an 8-bit pool's scales, set to 1, are taken at once)."""
    m = model()
    grown, eager = {}, 0
    for huge in (False, True):
        gc.collect()
        before = rss_bytes()
        eng = Engine(m, None, kv_cache_dtype=kv, cache_bytes=256 << 20, huge_pages=huge)
        grown[huge] = rss_bytes() - before
        stores = (eng.pool.rows, eng.pool.index_rows)
        planes = [t for st in stores for t in st.planes() if t is not None]
        eager = sum(st.scale.numel() * 4 for st in stores) if kv != "auto" else 0
        assert all(hugepages.inside(t) == huge for t in planes) and not planes[0].any()
        del eng, stores, planes
    assert grown[False] > (200 << 20) and grown[True] < eager + (16 << 20), grown


@needs_thp
def test_mapping_goes_with_the_model():
    m = model()
    hugepages.place(m)
    live = [r for lo, hi, r in hugepages._mappings if lo <= m.embed_tokens.weight.data_ptr() < hi]
    assert len(live) == 1 and live[0]() is not None
    del m
    gc.collect()
    assert live[0]() is None  # the mmap closed: its memory is back


MOVE_PEAK = """
import torch
from nanoseek.kernels import hugepages
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
ts = [torch.ones(1 << 18) for _ in range(300)] + [torch.ones(8 << 20) for _ in range(4)]  # 300 x 1 MB, 4 x 32 MB
before = kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here
moved = hugepages.place_tensors(ts)
print(moved >> 20, (kb("VmHWM:") - before) >> 10, all(hugepages.inside(t) and t.eq(1).all() for t in ts))
"""


@needs_thp
def test_a_move_needs_memory_for_one_storage_not_a_second_copy():
    """place_tensors frees each old storage once copied (and trims the heap): the process's peak grows by about the
    largest storage (32 MB), not by the 428 MB moved."""
    out = subprocess.run([sys.executable, "-c", MOVE_PEAK], capture_output=True, text=True, check=True)
    moved_mb, peak_mb, ok = out.stdout.split()
    assert int(moved_mb) == 428 and ok == "True"
    assert int(peak_mb) < 100, out.stdout


def test_nothing_moves_when_off_or_too_big(monkeypatch):
    m = model()
    monkeypatch.setenv("NANOSEEK_HUGEPAGES", "0")
    assert not hugepages.supported() and hugepages.place(m) == 0
    monkeypatch.delenv("NANOSEEK_HUGEPAGES")
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    monkeypatch.setattr(hugepages, "available_bytes", lambda: nbytes)  # a second copy would not fit
    assert hugepages.place(m) == 0
    assert not any(hugepages.inside(p) for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_tokens_equal_with_and_without(dtype):
    """Weights and KV cache pool in huge pages (the engine's default on CPU) or not: the same greedy tokens."""
    prompts = [[5, 6, 7, 8, 9], list(range(20, 60))]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = {}
    for huge in (False, True):
        eng = Engine(model().to(dtype), None, huge_pages=huge)
        moved = huge and hugepages.supported()
        assert (eng.huge_page_bytes > 0) == moved
        assert hugepages.inside(eng.pool.rows.plain) == hugepages.inside(eng.pool.index_rows.plain) == moved
        out[huge] = [o.new_token_ids for o in eng.generate(prompts, sp)]
    assert out[True] == out[False]
