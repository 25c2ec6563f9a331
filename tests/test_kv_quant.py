"""8-bit KV cache (--kv-cache-dtype fp8 | int8, nanoseek/model/kv_quant.py): round-trip error bounds per format,
decode against the full-precision cache, pool capacity, prefix caching, MTP speculation, DSA's sparse reads,
the whole-stack CPU decode over the 8-bit planes (against the block-by-block dequantize-on-read path), and the
CLI/server wiring."""
import pytest
import torch

from nanoseek import DenseCache, get_preset
from nanoseek.engine import BlockPool, CacheView, Engine
from nanoseek.kernels import cpu_decode, decode_plan, isa
from nanoseek.model.kv_quant import FORMATS, RowStore, kv_format
from test_engine import alone, damped_model, greedy, prompts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FMTS = ["fp8", "int8"]


# ---- the formats -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FMTS)
def test_round_trip_error_bounds(name):
    fmt = FORMATS[name]
    # 256 wide: two 128-value groups, the second 1000x smaller (per-group scales keep it accurate)
    x = torch.randn(64, 256) * torch.cat((torch.full((128,), 3.0), torch.full((128,), 3e-3)))
    q, scale = fmt.quantize(x)
    assert q.dtype == fmt.container and q.element_size() == 1
    assert scale.shape == (64, 2) and scale.dtype == torch.float32
    y = fmt.dequantize(q, scale, torch.float32)
    amax = x.abs().unflatten(-1, (2, 128)).amax(-1, keepdim=True)
    err = (y - x).abs().unflatten(-1, (2, 128))
    if name == "int8":  # uniform steps of amax/127: half a step at most
        bound = amax / 254
    else:  # e4m3: 3 mantissa bits, half an ulp = 2^-4 relative; subnormals (below 2^-6 * scale): 2^-10 * scale
        bound = torch.maximum(x.abs().unflatten(-1, (2, 128)) * 2 ** -4, amax / 448 * 2 ** -10)
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    assert y[:, :128].abs().amax(-1).sub(x[:, :128].abs().amax(-1)).abs().max() < 1e-5  # the max is exact
    # an all-zero row (padding) stays zero; a width that is not a multiple of 128 takes one scale per row
    z, s = fmt.quantize(torch.zeros(3, 40))
    assert s.shape == (3, 1) and (fmt.dequantize(z, s, torch.float32) == 0).all()


def test_kv_format_names():
    assert kv_format("auto") is None and kv_format("fp8").storage == torch.float8_e4m3fn
    assert kv_format("int8").storage == torch.int8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_format("fp16")


@pytest.mark.parametrize("name", FMTS)
def test_row_store_scales_each_part_and_reads_agree(name):
    fmt = FORMATS[name]
    store = RowStore(2, (10,), (256, 8), torch.bfloat16, "cpu", fmt)  # c_kv: 2 groups of 128; k_pe: 1 group
    rows = torch.randn(4, 264).to(torch.bfloat16)
    rows[:, 256:] *= 1e-3  # a k_pe far smaller than c_kv keeps its own precision
    slots = torch.tensor([7, 2, 5, 9])
    store.write(1, slots, rows)
    got = store.take(1, slots)
    assert got.dtype == torch.bfloat16 and store.scale.shape == (2, 10, 3)
    for a, b in ((0, 128), (128, 256), (256, 264)):
        x, y = rows[:, a:b].float(), got[:, a:b].float()
        assert ((y - x).abs().amax(-1) <= x.abs().amax(-1) * 2 ** -4 * 1.01).all()
    assert torch.equal(store.read(1, slice(0, 10))[slots], got)  # read (a span) and take (slots) agree
    assert RowStore.bytes_per_row((256, 8), torch.bfloat16, fmt) == 264 + 4 * 3
    assert RowStore.bytes_per_row((256, 8), torch.bfloat16, None) == 264 * 2


# ---- against the full-precision cache ----------------------------------------------------------------------
def _teacher_forced(m, ids, n0, kv_fmt):
    """Logits [len(ids), V] of a prefill of n0 tokens then one-token decode steps through a paged cache."""
    pool = BlockPool(m.config, m.config.num_hidden_layers, 4, 1 << 20, torch.float32, "cpu", kv_format=kv_fmt)
    table = []
    assert pool.grow(table, len(ids))
    with torch.no_grad():
        outs = [m(torch.tensor([ids[:n0]]), cache=CacheView(pool, [table], [0], [n0])).logits[0]]
        for i in range(n0, len(ids)):
            outs.append(m(torch.tensor([[ids[i]]]), cache=CacheView(pool, [table], [i], [1])).logits[0])
    return torch.cat(outs), pool


@pytest.mark.parametrize("name", FMTS)
@pytest.mark.parametrize("dsa", [True, False])
def test_greedy_decode_logits_close_to_the_full_cache(name, dsa):
    """A greedy continuation from the full cache, replayed through the 8-bit cache: every step's logits stay
    within 3x the format's own relative rounding error (measured on this model's layer-0 cache rows).
    Why that tolerance: attention is smooth in its keys and values, so a relative error e in the cached rows
    moves the output by O(e); through 3 layers it is measured at up to 2x e. On DSA models top-k = 1024 here
    (no selection): past top-k a rounded indexer key can swap a near-tie at the k-th score, a discrete change
    that no smooth bound covers (the sparse path is checked below by its reads)."""
    m = tiny_model(dsa, **({"index_topk": 1024} if dsa else {}))
    prompt = prompts(1, 20, 21)[0]
    ids = prompt + alone(m, prompt, greedy(40)).new_token_ids
    ref, full = _teacher_forced(m, ids, len(prompt), None)
    got, pool = _teacher_forced(m, ids, len(prompt), FORMATS[name])
    R = m.config.kv_lora_rank
    rows = full.rows.plain[0, :len(ids) + 4, :R]  # layer 0's latents: same inputs in both caches
    fmt = FORMATS[name]
    row_err = ((fmt.dequantize(*fmt.quantize(rows), torch.float32) - rows).norm() / rows.norm()).item()
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() <= 3 * row_err, (rel.max().item(), row_err)
    assert (got[len(prompt) - 1:].argmax(-1) == ref[len(prompt) - 1:].argmax(-1)).float().mean() >= 0.9
    assert pool.rows.q.element_size() == 1  # it really was the 8-bit store


@pytest.mark.parametrize("name", FMTS)
def test_pool_holds_about_twice_the_tokens(name):
    m = tiny_model()
    budget = 1 << 20
    auto = Engine(m, None, cache_bytes=budget)
    q8 = Engine(m, None, cache_bytes=budget, kv_cache_dtype=name)
    assert q8.stats()["cache_capacity_tokens"] >= 2 * auto.stats()["cache_capacity_tokens"]  # fp32 model: 2.5x
    # a bf16 V3.2-shaped row (512 + 64 latent, 128 indexer key): 1408 bytes -> 512 + 16 + 64 + 4 + 128 + 4
    v32 = get_preset("tiny", kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128)
    ratio = (BlockPool.bytes_per_block(v32, 1, 1, torch.bfloat16)
             / BlockPool.bytes_per_block(v32, 1, 1, torch.bfloat16, FORMATS[name]))
    assert ratio == pytest.approx(1408 / 728)


def test_dense_cache_equals_paged_cache():
    m = tiny_model()
    ids = prompts(1, 40, 41)[0]
    paged, _ = _teacher_forced(m, ids, 10, FORMATS["int8"])
    c = DenseCache(m.config, 1, 48, kv_cache_dtype="int8")
    with torch.no_grad():
        outs = [m(torch.tensor([ids[:10]]), cache=c.step(10)).logits[0]]
        outs += [m(torch.tensor([[t]]), cache=c.step(1)).logits[0] for t in ids[10:]]
    torch.testing.assert_close(torch.cat(outs), paged, atol=1e-5, rtol=1e-5)


# ---- engine features on the 8-bit cache --------------------------------------------------------------------
@pytest.mark.parametrize("name", FMTS)
def test_prefix_cache_hit_equals_miss(name):
    m = tiny_model()
    base = prompts(1, 40, 41)[0]
    p2 = base + [5, 6, 7]
    params = greedy(6, logprobs=2)
    e = Engine(m, None, block_size=4, cache_bytes=4 << 20, kv_cache_dtype=name)
    e.generate([base], params)
    hit = e.generate([p2], params)[0]
    assert e.stats()["prefix_cache_hits"] >= 36
    miss = alone(m, p2, params, block_size=4, kv_cache_dtype=name)
    assert hit.new_token_ids == miss.new_token_ids
    for x, y in zip(hit.new_logprobs, miss.new_logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)


@pytest.mark.parametrize("name", FMTS)
def test_mtp_speculative_equals_plain_greedy(name):
    m = damped_model()
    ps = prompts(3)
    plain = Engine(m, None, cache_bytes=4 << 20, kv_cache_dtype=name).generate(ps, greedy(20))
    e = Engine(m, None, cache_bytes=4 << 20, speculative="mtp", num_draft=2, block_size=4, kv_cache_dtype=name)
    spec = e.generate(ps, greedy(20))
    assert [o.new_token_ids for o in spec] == [o.new_token_ids for o in plain]
    s = e.stats()
    assert 0 < s["spec_accepted"] < s["spec_drafted"]  # both paths exercised


@pytest.mark.parametrize("name", FMTS)
def test_sparse_decode_gathers_the_same_dequantized_rows(name):
    """DSA decode past top-k reads only its K selected rows, and they are exactly the rows a full read gives."""
    m = tiny_model()
    ids = prompts(1, 50, 51)[0]
    K, L = m.config.index_topk, m.config.num_hidden_layers
    pool = BlockPool(m.config, L, 8, 1 << 20, torch.float32, "cpu", kv_format=FORMATS[name])
    table = []
    pool.grow(table, len(ids))
    with torch.no_grad():
        m(torch.tensor([ids[:-1]]), cache=CacheView(pool, [table], [0], [len(ids) - 1]))
        view = CacheView(pool, [table], [len(ids) - 1], [1])
        m(torch.tensor([ids[-1:]]), cache=view)
    assert len(ids) > K and view.rows_read == L * K  # gathered K rows per layer, never the whole context
    idx = torch.randperm(len(ids))[:K].view(1, 1, K)
    for layer in range(L):
        full = view.read(layer)  # [1, S, C] dequantized
        torch.testing.assert_close(view.gather(layer, idx)[0, 0], full[0, idx[0, 0]], atol=0, rtol=0)
        keys = view.read_index_keys(layer)
        assert keys.dtype == torch.float32 and keys.shape == (1, len(ids), m.config.index_head_dim)


# ---- the whole-stack CPU decode over the 8-bit cache (decode_plan.py, ns_decode_stack) -----------------------
# Against the block-by-block path on the same cache (PyTorch's dequantize-on-read rows into the same kernels): the
# kernel dequantizes the same values (the model's dtype of value * scale) but sums them in another order, so
# float32 logits agree within 1e-5 of their scale and bf16 ones within 2^-6 (a bf16 rounding of a score or an
# output that the order flips, grown through the layers); greedy tokens are equal.
KERNEL_DTYPES = [pytest.param(dt, marks=pytest.mark.skipif(cpu_decode.library(dt) is None,
                                                            reason="CPU decode kernels unavailable here"))
                 for dt in (torch.float32, torch.bfloat16)]


_PLAN_RUN = decode_plan.run


def _plan_runs(monkeypatch, on: bool) -> dict:
    """The plan on (its runs counted) or off (every step block by block)."""
    runs = {"n": 0}

    def counted(*a):
        y = _PLAN_RUN(*a)
        runs["n"] += y is not None
        return y

    monkeypatch.setattr(decode_plan, "run", counted if on else (lambda *a: None))
    return runs


def _decode_steps(m, ids, n0, feeds, fmt):
    """Prefill ids[:, :n0] into a paged 8-bit cache (blocks of 4), then decode calls where request b feeds
    feeds[c][b] tokens (padded to the longest): the logits of the real tokens per request, and the pool."""
    B, L = ids.shape
    pool = BlockPool(m.config, m.config.num_hidden_layers, 4, 1 << 22, m.embed_tokens.weight.dtype, "cpu",
                     kv_format=fmt)
    tables = [[] for _ in range(B)]
    for t in tables:
        assert pool.grow(t, L)
    outs, n = [[] for _ in range(B)], [n0] * B
    with torch.no_grad():
        m(ids[:, :n0], cache=CacheView(pool, tables, [0] * B, [n0] * B))
        for k in feeds:
            feed = torch.stack([torch.nn.functional.pad(ids[b, n[b]:n[b] + k[b]], (0, max(k) - k[b]))
                                for b in range(B)])
            out = m(feed, cache=CacheView(pool, tables, n, k)).logits.float()
            for b in range(B):
                outs[b].append(out[b, :k[b]])
                n[b] += k[b]
    return [torch.cat(o) for o in outs], pool


def _agree(a, b, dt):
    """Logits [steps, V] of the plan (a) and the blocks (b): within the tolerance above, the same greedy tokens."""
    rel = 1e-5 if dt == torch.float32 else 2 ** -6
    assert ((a - b).abs().amax(-1) <= rel * b.abs().amax(-1)).all(), (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("dt", KERNEL_DTYPES)
@pytest.mark.parametrize("name", FMTS)
def test_kernel_writes_the_bytes_and_scales_of_the_format(name, dt):
    """The kernel's cache write (ns_kv8_write, what ns_decode_stack runs per block) quantizes as
    `KVFormat.quantize`: the same bytes and scales, for rows from 1e-30 to 1e3, an all-zero row, c_kv in groups of
    128 and a k_pe part narrower than a group (one scale)."""
    fmt, lib = FORMATS[name], cpu_decode.library(dt)
    torch.manual_seed(0)
    R, P, M = 256, 16, 64
    x = (torch.randn(M, R + P) * torch.logspace(-30, 3, M)[:, None]).to(dt)
    x[3] = 0
    (q0, s0), (q1, s1) = fmt.quantize(x[:, :R]), fmt.quantize(x[:, R:])
    slots = torch.randperm(M)
    q, s = torch.zeros(M, R + P, dtype=torch.uint8), torch.zeros(M, R // 128 + 1)
    lib.ns_kv8_write(x.data_ptr(), M, R, P, decode_plan._KV_FORMATS[name], 128, P, slots.data_ptr(), q.data_ptr(),
                     s.data_ptr())
    assert torch.equal(q[slots].view(fmt.container), torch.cat([q0, q1], -1))
    assert torch.equal(s[slots], torch.cat([s0, s1], -1))


@pytest.fixture(params=[v for v in cpu_decode.VARIANTS[torch.bfloat16] if isa.VARIANTS[v][0] == isa.arch()])
def kernel_variant(request, monkeypatch):
    """The kernels of one variant this CPU runs (NANOSEEK_KERNEL_ISA caps the choice; the float32 build's next one
    down covers a variant it has no build of)."""
    v, dt = request.param, request.node.callspec.params.get("dt")
    if not isa.runs(v):
        pytest.skip(f"this CPU does not run {v} code")
    if dt is torch.float32 and v not in cpu_decode.VARIANTS[dt]:
        pytest.skip(f"the float32 build has no {v} variant")
    monkeypatch.setenv("NANOSEEK_KERNEL_ISA", v)
    cpu_decode.reset()
    yield v
    cpu_decode.reset()


@pytest.mark.parametrize("dt", KERNEL_DTYPES)
@pytest.mark.parametrize("name", FMTS)
@pytest.mark.parametrize("dsa", [True, False])
def test_whole_stack_decode_on_the_8bit_cache_equals_the_blocks(dsa, name, dt, kernel_variant, monkeypatch):
    """The plan takes an 8-bit cache (one ns_decode_stack call per step) and agrees with the block-by-block path:
    one request (contiguous rows), a ragged batch (1 and 3 tokens: rows through the slots of blocks of 4), DSA past
    its top-k (16: the kernel scores the 8-bit index keys and attends to the selected 8-bit rows), and the
    DenseCache. The rows it writes are the blocks' rows, byte for byte, where their inputs are (the first layer).
    On each kernel variant this CPU runs."""
    from test_cpu_decode import earliest_on_ties, kernel_model
    assert cpu_decode.variant(dt) == kernel_variant
    earliest_on_ties(monkeypatch)
    m = kernel_model(dt, **({"index_topk": 16} if dsa else {"index_topk": 0, "index_n_heads": 0}))
    fmt = FORMATS[name]
    ids = torch.randint(0, m.config.vocab_size, (2, 40))
    for rows, feeds in ((ids[:1], [[1]] * 6), (ids, [[1, 3]] * 4)):
        runs = _plan_runs(monkeypatch, True)
        planned, pool_p = _decode_steps(m, rows, 20, feeds, fmt)
        assert runs["n"] == len(feeds)
        _plan_runs(monkeypatch, False)
        reference, pool_r = _decode_steps(m, rows, 20, feeds, fmt)
        for a, b in zip(planned, reference):
            _agree(a, b, dt)
        assert torch.equal(pool_p.rows.q[0], pool_r.rows.q[0]) and torch.equal(pool_p.rows.scale[0],
                                                                                   pool_r.rows.scale[0])
        if dsa:
            assert torch.equal(pool_p.index_rows.q[0], pool_r.index_rows.q[0])

    def dense_cache_steps():  # batch rows at slot b * max_len + p
        c = DenseCache(m.config, 2, 32, dt, kv_cache_dtype=name)
        with torch.no_grad():
            m(ids[:, :20], cache=c.step(20))
            return torch.stack([m(ids[:, 20 + i:21 + i], cache=c.step(1)).logits[:, 0].float() for i in range(6)])

    runs = _plan_runs(monkeypatch, True)
    planned = dense_cache_steps()
    assert runs["n"] == 6
    _plan_runs(monkeypatch, False)
    reference = dense_cache_steps()
    for b in range(2):
        _agree(planned[:, b], reference[:, b], dt)


@pytest.mark.parametrize("name", FMTS)
def test_engine_on_the_8bit_cache_equals_the_blocks(name, monkeypatch):
    """bf16 through the engine (paged blocks of 4, a batch of two, then a prompt that hits the prefix cache, DSA
    past top-k): with the plan the greedy tokens are the block-by-block path's, their logprobs within bf16
    roundings of the order of sums."""
    from test_cpu_decode import earliest_on_ties, kernel_model
    if cpu_decode.library(torch.bfloat16) is None:
        pytest.skip("no CPU decode kernels on this machine")
    earliest_on_ties(monkeypatch)
    m = kernel_model(torch.bfloat16)
    base, other = prompts(2, 36, 41)
    params = greedy(10, logprobs=1)

    def serve():
        e = Engine(m, None, block_size=4, cache_bytes=4 << 20, kv_cache_dtype=name)
        outs = e.generate([base, other], params) + e.generate([base + [5, 6, 7]], params)
        assert e.stats()["prefix_cache_hits"] >= 32
        return outs

    runs = _plan_runs(monkeypatch, True)
    fast = serve()
    assert runs["n"] >= 2 * 9  # the 9 decode steps of both calls (at least) ran through the plan
    _plan_runs(monkeypatch, False)
    for x, y in zip(fast, serve()):
        assert x.new_token_ids == y.new_token_ids
        for a, b in zip(x.new_logprobs, y.new_logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=2e-2)


def test_engine_rejects_unknown_cache_dtype():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(tiny_model(), None, cache_bytes=1 << 20, kv_cache_dtype="fp4")


# ---- front ends ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_server import tiny_model_dir
    return tiny_model_dir(tmp_path_factory.mktemp("kv8") / "kv8-tiny")


def test_serve_with_an_8bit_cache_logs_its_capacity_and_answers(model_dir, caplog):
    import httpx
    from nanoseek.server.api import ServeConfig, ServerThread
    budget = 1 << 20
    caps = {}
    for kv in ("auto", "int8"):
        with caplog.at_level("INFO", logger="nanoseek.server"), \
                ServerThread(ServeConfig(str(model_dir), dtype="float32", cache_bytes=budget,
                                         kv_cache_dtype=kv)) as srv:
            srv.wait_ready()
            caps[kv] = srv.state.engine.pool.capacity_tokens
            assert f"KV cache: {caps[kv]} tokens ({kv})" in caplog.text
            r = httpx.post(srv.url + "/v1/completions", timeout=60, json=dict(
                model="kv8-tiny", prompt="My kingdom for", max_tokens=5, temperature=0, ignore_eos=True))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert caps["int8"] >= 2 * caps["auto"]


def test_cli_flags(model_dir, capsys):
    from nanoseek.generate import cli as generate_cli
    from nanoseek.server.api import cli as serve_cli
    assert generate_cli("generate", [str(model_dir), "My kingdom", "--max-tokens", "3", "--dtype", "float32",
                                     "--kv-cache-dtype", "fp8"]) == 0
    assert "3 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        serve_cli("serve", [str(model_dir), "--kv-cache-dtype", "fp4"])
    assert e.value.code == 2 and "invalid choice: 'fp4'" in capsys.readouterr().err


def test_quality_bench_through_the_cache_equals_the_plain_forward(model_dir):
    """bench/kv_cache_quality.py: with the full-precision cache, chunked prefill through it gives the bits per
    byte of one plain forward (`nanoseek eval`); the 8-bit caches move it by a little."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kv_cache_quality
    from nanoseek.evaluate import bits_per_byte, token_stream
    from nanoseek.tokenizer import load_tokenizer
    import nanoseek
    tok = load_tokenizer(model_dir)
    m = nanoseek.from_pretrained(model_dir, dtype=torch.float32)
    stream = token_stream(tok, ["To be, or not to be, that is the question: " * 12])[:129]
    plain, _ = bits_per_byte(m, tok, stream, 64)
    auto = kv_cache_quality.cached_bits_per_byte(m, tok, stream, 64, 16, "auto")
    assert auto == pytest.approx(plain, rel=1e-5)
    for kv in FMTS:
        q8 = kv_cache_quality.cached_bits_per_byte(m, tok, stream, 64, 16, kv)
        assert q8 != auto and q8 == pytest.approx(auto, rel=0.05)
