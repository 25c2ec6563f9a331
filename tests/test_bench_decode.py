"""bench/decode.py's llama.cpp peer, the parts that need no network and no build: llama-bench's JSON into rates, the
skip lines where llama.cpp (or one float or quantized arm) cannot be had, the tables, the weight bytes per token
of a GGUF against nanoseek's count, and the pre-tokenizer check of the converter wrapper."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode  # noqa: E402
import llamacpp  # noqa: E402
import llamacpp_convert  # noqa: E402

from nanoseek import tokenizer  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402


def bench_result(n_threads, samples_ts, n_prompt=0, n_gen=63):
    """One llama-bench JSON result, with the fields of llama.cpp 0c1e570 this module reads."""
    return {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "backends": "CPU",
            "n_threads": n_threads, "type_k": "f16", "type_v": "f16",
            "flash_attn": -1, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 64,
            "avg_ts": sum(samples_ts) / len(samples_ts), "samples_ts": samples_ts}


def test_rates_take_the_best_generation_sample_per_thread_count():
    text = json.dumps([bench_result(1, [103.937, 141.282]), bench_result(2, [7.49386, 49.9392]),
                       bench_result(2, [900.0], n_prompt=512, n_gen=0)])  # a prompt test: not decode
    assert llamacpp.rates(json.loads(text)) == {1: 141.282, 2: 49.9392}


def test_describe_names_the_build():
    line = llamacpp.describe(bench_result(1, [100.0]))
    assert line.startswith(f"llama.cpp 0c1e570 (build 1, vendored by llama-cpp-python {llamacpp.VERSION})")
    assert "KV cache f16/f16, flash attention auto" in line and "-DGGML_NATIVE=ON" in line


def test_format_table():
    assert llamacpp.format_table([("float32", 1, 150.0, 120.0), ("float32", 2, 250.0, 200.0)]) == (
        "| weights | threads | nanoseek tok/s | llama.cpp tok/s | ratio |\n"
        "|---|---:|---:|---:|---:|\n"
        "| float32 | 1 | 150.0 | 120.0 | 1.25x |\n"
        "| float32 | 2 | 250.0 | 200.0 | 1.25x |")


def test_failed_pip_download_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))

    def pip(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llama-cpp-python")
    monkeypatch.setattr(llamacpp.subprocess, "run", pip)
    with pytest.raises(llamacpp.Unavailable, match=r"pip download llama-cpp-python==.* failed: ERROR: No matching"):
        llamacpp.prepare()


def test_no_cmake_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    with pytest.raises(llamacpp.Unavailable, match="no cmake"):
        llamacpp.build_tools(tmp_path / "src", tmp_path)


def test_bench_prints_one_line_and_goes_on_without_llamacpp(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))

    def offline(root):
        raise llamacpp.Unavailable("pip download llama-cpp-python==0.3.36 failed: no network")
    monkeypatch.setattr(llamacpp, "fetch_source", offline)
    args = argparse.Namespace(preset="tiny", prompt=8, tokens=8, repeats=1, dtypes="float32", peer_threads="1,2",
                              quantize=[])
    decode.llamacpp_comparison(args, get_preset("tiny"), list(range(3, 11)))
    out = capsys.readouterr().out
    assert out == "llama.cpp peer skipped: pip download llama-cpp-python==0.3.36 failed: no network\n"


def test_converter_wrapper_recognises_nanoseek_split():
    spec = json.loads(tokenizer.new_backend().to_str())
    assert llamacpp_convert.split_regex(spec) == tokenizer.SPLIT_PATTERN
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}  # GPT-2's own
    assert llamacpp_convert.split_regex(spec) is None


def batched_line(pl, speed_pp, speed_tg):
    """One llama-batched-bench --output-format jsonl result line, with the fields of llama.cpp 0c1e570."""
    return json.dumps({"n_kv_max": 1016, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0,
                       "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 64, "tg": 63, "pl": pl,
                       "n_kv": pl * 127, "t_pp": 0.1, "speed_pp": speed_pp, "t_tg": 0.5, "speed_tg": speed_tg,
                       "t": 0.6, "speed": 1.0}, separators=(", ", ": "))


def test_batched_bench_results_are_its_json_lines_among_the_log(monkeypatch):
    log = "llama_model_loader: loaded meta data\nmain: n_kv_max = 1016\n"
    out = "\n".join([batched_line(1, 300.5, 40.25), batched_line(8, 900.0, 180.0)]) + "\n"

    def bench(cmd, **kw):
        assert cmd[cmd.index("-npl") + 1] == "1,8" and cmd[cmd.index("-c") + 1] == str(8 * (64 + 63))
        return subprocess.CompletedProcess(cmd, 0, out, log)
    monkeypatch.setattr(llamacpp.subprocess, "run", bench)
    res = llamacpp.run_batched_bench(Path("llama-batched-bench"), Path("m.gguf"), 2, 64, 63, [1, 8])
    assert [(r["pl"], r["speed_pp"], r["speed_tg"]) for r in res] == [(1, 300.5, 40.25), (8, 900.0, 180.0)]
    # a run that stopped before its last batch size (the KV cache full, say) is no result
    monkeypatch.setattr(llamacpp.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, batched_line(1, 1.0, 1.0), log))
    with pytest.raises(llamacpp.Unavailable, match="gave 1 results for 2 batch sizes"):
        llamacpp.run_batched_bench(Path("llama-batched-bench"), Path("m.gguf"), 2, 64, 63, [1, 8])


def test_format_batched_table():
    assert llamacpp.format_batched_table([("float32", 2, 8, 600.0, 300.0, 100.0, 200.0)]) == (
        "| weights | threads | sequences | prefill nanoseek | prefill llama.cpp | ratio | decode nanoseek | "
        "decode llama.cpp | ratio |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| float32 | 2 | 8 | 600.0 | 300.0 | 2.00x | 100.0 | 200.0 | 0.50x |")


def test_nanoseek_batched_rates_finish_every_sequence(one_thread):
    import nanoseek
    model = nanoseek.Transformer(get_preset("tiny"))
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 7)]
    pp, tg = decode.nanoseek_batched_rates(model, prompts, 4, repeats=1)
    assert pp > 0 and tg > 0


def test_activated_bytes_count_the_stored_sizes_of_a_quantized_model():
    """The bandwidth bound of bench/decode.py's quantized arms counts what a decode token reads: codes, scales and
    mins at their stored sizes, and num_experts_per_tok of the E routed experts."""
    from nanoseek import quant
    from nanoseek.model.transformer import Transformer
    cfg = get_preset("tiny")
    m = Transformer(cfg)
    f32 = decode.activated_bytes(m)
    q = quant.quantize_model(m, "int8")
    int8 = decode.activated_bytes(q)
    # 1 byte per quantized weight (plus a bf16 scale a row) against 4; kv_b_proj, router, norms stay float
    assert f32 / 4 < int8 < f32 / 2
    e = q.layers[1].mlp.experts
    per_expert = sum(t[0].numel() * t.element_size() for t in (e.gate_up_proj, e.gate_up_proj_scale, e.down_proj,
                                                                 e.down_proj_scale))
    # one more routed expert per token reads exactly one more expert's codes and scales per MoE layer
    q.config = cfg.replace(num_experts_per_tok=cfg.num_experts_per_tok + 1)
    n_moe = sum(1 for layer in q.layers if hasattr(layer.mlp, "experts"))
    assert decode.activated_bytes(q) - int8 == n_moe * per_expert


def test_each_arm_that_cannot_run_prints_one_line_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    """The float arm and the quantized ones (`--quantize int8,int4`), each named by both sides' formats, fail one
    at a time: the Q4_1 arm through the f32 file llama-quantize would start from."""
    monkeypatch.setattr(llamacpp, "prepare", lambda: (tmp_path, {t: tmp_path / t for t in llamacpp.TOOLS}))
    monkeypatch.setattr(llamacpp, "add_tokenizer", lambda d, vocab_size: None)

    def convert(src, hf_dir, out, outtype):
        raise llamacpp.Unavailable(f"converting to a {outtype} GGUF failed: no converter here")
    monkeypatch.setattr(llamacpp, "convert", convert)
    args = argparse.Namespace(preset="tiny", prompt=8, tokens=8, repeats=1, dtypes="float32", peer_threads="1",
                              sequences=2, quantize=["int8", "int4"])
    decode.llamacpp_comparison(args, get_preset("tiny"), list(range(3, 11)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["llama.cpp peer skipped for float32: converting to a f32 GGUF failed: no converter here",
                         "llama.cpp peer skipped for float32 int8 / Q8_0: converting to a q8_0 GGUF failed: no "
                         "converter here",
                         "llama.cpp peer skipped for float32 int4 G32 / Q4_1: converting to a f32 GGUF failed: no "
                         "converter here"]
    assert lines[0].startswith("llama.cpp: both sides run tiny as deepseek_v3")  # tiny's indexer heads are 16


def test_gguf_weight_bytes_per_token_count_as_nanoseek_counts_its_model(tmp_path):
    """llama.cpp's column of the bytes table: over an f32 GGUF of a model, exactly nanoseek's activated_bytes of
    that model (kv_b_proj split into attn_k_b and attn_v_b, the embedding one row, k of E experts); over its Q8_0
    file, the types the converter writes, Q8_0 the most."""
    import torch

    from nanoseek.gguf import write_gguf
    from nanoseek.model.transformer import Transformer
    from test_vocab import base_docs
    tok = tokenizer.train_from_documents(base_docs(), 400)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    m = Transformer(cfg)
    total, by_type = llamacpp.weight_bytes_per_token(write_gguf(m, tok, tmp_path / "f32.gguf", "f32"),
                                                     cfg.num_experts_per_tok)
    assert by_type == {"F32": total} and total == decode.activated_bytes(m)
    q_total, q_types = llamacpp.weight_bytes_per_token(write_gguf(m, tok, tmp_path / "q8.gguf", "q8_0"),
                                                       cfg.num_experts_per_tok)
    assert set(q_types) == {"Q8_0", "F16", "F32"} and max(q_types, key=q_types.get) == "Q8_0"
    assert total / 4 < q_total < total / 2


def test_pages_comparison_times_both_kinds_of_memory(monkeypatch, capsys):
    """--pages: one engine over weights in 4 KB pages, one over weights moved into huge pages, per thread count."""
    from nanoseek.kernels import hugepages
    placed = []
    real_rate = decode.nanoseek_rate

    def rate(model, *a, huge_pages=None, **kw):
        r = real_rate(model, *a, huge_pages=huge_pages, **kw)
        placed.append((huge_pages, hugepages.inside(model.lm_head.weight)))
        return r
    monkeypatch.setattr(decode, "nanoseek_rate", rate)
    args = argparse.Namespace(prompt=8, tokens=4, repeats=1, dtypes="float32", peer_threads="1,2")
    decode.pages_comparison(args, get_preset("tiny"), list(range(3, 11)))
    out = capsys.readouterr().out
    if not hugepages.supported():
        assert out.startswith("\npages comparison skipped: no transparent huge pages here")
        return
    rows = [line for line in out.splitlines() if line.startswith("| float32 |")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "2"]
    assert set(placed) == {(False, False), (True, True)} and len(placed) == 8  # 2 rounds x 2 threads x 2 kinds


@pytest.mark.parametrize("bad", [["--sequences", "0"], ["--tokens", "1"], ["--prompt", "0"], ["--repeats", "0"]])
def test_counts_out_of_range_are_refused_in_one_line(bad, monkeypatch, capsys):
    """(--sequences 0 made llama-batched-bench print a result line that is not JSON, and the bench stopped in a
    traceback halfway through its llama.cpp comparison)"""
    monkeypatch.setattr(sys, "argv", ["decode.py", *bad])
    with pytest.raises(SystemExit) as e:
        decode.main()
    assert e.value.code == 2
    assert f"{bad[0]} must be at least" in capsys.readouterr().err
