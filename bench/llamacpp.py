"""llama.cpp as the peer of `bench/decode.py --peer llamacpp` and `bench/llamacpp_greedy.py`: its source, its tools
built from it, the bench's model converted by llama.cpp's own converter, and the tools' results.

The source comes from the llama-cpp-python sdist on PyPI (pinned below; its vendor/llama.cpp is the whole llama.cpp
tree, converter and gguf-py included), fetched with pip and unpacked once into ~/.cache/nanoseek/llamacpp/<version>
(or $NANOSEEK_CACHE/llamacpp/<version>), where the TOOLS alone (`llama-bench`, `llama-batched-bench`,
`llama-quantize`) are built with cmake, once, and reused; `llamacpp_greedy.c` is compiled against the static
libraries that build leaves. The converter runs under the transformers its requirements pin, installed with pip
once beside the source. Quantized files: Q8_0 from the converter (--outtype q8_0), Q4_1 from llama-quantize on
the f32 file (QUANT_TYPES says which llama.cpp type stands against which nanoseek format). Every step that
cannot run here (no pip download, no cmake or C++ compiler, a failed build, conversion or run) raises
`Unavailable` with a one-line reason, which the bench prints before going on without llama.cpp.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# llama-cpp-python 0.3.36 vendors llama.cpp 0c1e570 (2026-10-01): its deepseek2 architecture runs MLA with the
# absorbed (latent) cache, as nanoseek's decode does
VERSION = "0.3.36"
# Release build for this CPU's instruction set (-march=native), the TOOLS alone, nothing that needs a network
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF")
# llama-bench: decode at batch 1; llama-batched-bench: prefill and decode of several sequences at once;
# llama-quantize: the quantized files the converter cannot write (Q4_1)
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
OUTTYPES = {"float32": "f32", "bfloat16": "bf16"}  # torch dtype name -> the converter's --outtype
# nanoseek's weight-only format (nanoseek/quant.py) -> the llama.cpp type closest to it. int8 (symmetric, one scale
# per row) -> Q8_0 (symmetric, one f16 scale per block of 32), written by the converter (--outtype q8_0). int4
# (asymmetric: a scale and a min per group) -> Q4_1 (an f16 scale and min per block of 32; Q4_0 has no min), made
# by llama-quantize from the f32 file; nanoseek loads it with groups of Q4_1's 32
QUANT_TYPES = {"int8": "Q8_0", "int4": "Q4_1"}
INT4_GROUP = 32
_HERE = Path(__file__).resolve().parent


class Unavailable(RuntimeError):
    """llama.cpp cannot be fetched, built, fed or run here; the message says why, in one line."""


def cache_root() -> Path:
    base = Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek")
    return base / "llamacpp" / VERSION


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def fetch_source(root: Path) -> Path:
    """The llama.cpp tree of the pinned llama-cpp-python sdist, downloaded with pip and unpacked under root once.
    The whole sdist is kept: vendor/llama.cpp's git metadata lives in its top folder, and the build reads the
    commit from it."""
    sdist = root / f"llama_cpp_python-{VERSION}"
    src = sdist / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    print(f"llama.cpp: downloading the llama-cpp-python {VERSION} source with pip (once) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={VERSION}", "-d", tmp],
                             capture_output=True, text=True, errors="replace")
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            raise Unavailable(f"pip download llama-cpp-python=={VERSION} failed: {_last_line(got.stderr)}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        if not (Path(tmp) / sdist.name / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            raise Unavailable(f"llama-cpp-python {VERSION}'s sdist has no vendor/llama.cpp")
        shutil.rmtree(sdist, ignore_errors=True)  # a partial tree left by an interrupted earlier run
        os.replace(Path(tmp) / sdist.name, sdist)
    return src


def build_tools(src: Path, root: Path) -> dict[str, Path]:
    """The TOOLS built from src under root/build, each once (a log of the build goes to root/build.log): a cache
    made by an earlier version of this module, with llama-bench alone, gets the missing ones added."""
    binaries = {t: root / "build" / "bin" / t for t in TOOLS}
    missing = [t for t, b in binaries.items() if not b.is_file()]
    if not missing:
        return binaries
    cmake = shutil.which("cmake")
    if cmake is None:
        raise Unavailable(f"no cmake on PATH to build {', '.join(missing)}")
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        raise Unavailable(f"no C++ compiler on PATH to build {', '.join(missing)}")
    print(f"llama.cpp: building {', '.join(missing)} (once; about 10 minutes on 2 cores), log {root / 'build.log'} ...",
          flush=True)
    with open(root / "build.log", "a") as log:
        for cmd in ([cmake, "-S", str(src), "-B", str(root / "build"), *CMAKE_FLAGS],
                    [cmake, "--build", str(root / "build"), "--target", *missing, "-j", str(os.cpu_count() or 1)]):
            log.write(" ".join(cmd) + "\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise Unavailable(f"building {', '.join(missing)} failed (see {root / 'build.log'})")
    for t in missing:
        if not binaries[t].is_file():
            raise Unavailable(f"the llama.cpp build made no {binaries[t]}")
    return binaries


def build_greedy(src: Path, root: Path) -> Path:
    """`llamacpp_greedy.c` compiled against the static libraries the tools' build left under root/build (rebuilt
    when the C file is newer than the binary): the libraries' locations are those of the pinned llama.cpp."""
    build = root / "build"
    c_file, binary = _HERE / "llamacpp_greedy.c", build / "bin" / "nanoseek-llamacpp-greedy"
    if binary.is_file() and binary.stat().st_mtime >= c_file.stat().st_mtime:
        return binary
    libs = [build / "src" / "libllama.a", *(build / "ggml" / "src" / f"lib{n}.a" for n in ("ggml", "ggml-cpu",
                                                                                       "ggml-base"))]
    if not all(lib.is_file() for lib in libs):
        raise Unavailable(f"no llama.cpp static libraries under {build} to link the greedy tool against")
    if not (shutil.which("cc") and shutil.which("c++")):
        raise Unavailable("no cc and c++ on PATH to build the greedy tool")
    obj = build / "nanoseek-llamacpp-greedy.o"
    # llama and ggml are C++ with OpenMP (the tools' build has GGML_OPENMP on): the link goes through c++
    for cmd in (["cc", "-O2", "-std=c11", "-I", str(src / "include"), "-I", str(src / "ggml" / "include"), "-c",
                 str(c_file), "-o", str(obj)],
                ["c++", str(obj), *map(str, libs), "-fopenmp", "-lpthread", "-ldl", "-lm", "-o", str(binary)]):
        got = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if got.returncode:
            raise Unavailable(f"building the greedy tool failed: {_last_line(got.stderr)}")
    return binary


def prepare() -> tuple[Path, dict[str, Path]]:
    """(llama.cpp source tree, {tool name: binary}), fetched and built on first use."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot create {root}: {e}") from None
    src = fetch_source(root)
    return src, build_tools(src, root)


def add_tokenizer(hf_dir: str | Path, vocab_size: int) -> None:
    """Save a small nanoseek tokenizer into a model folder that has none (the bench's random-weight model): the
    converter writes the vocabulary into the GGUF. Byte-level BPE trained on 2 MB of the default corpus (about a
    second); ids past what it learns are padding to the converter."""
    from nanoseek import data, tokenizer
    docs = (doc for f in data.default_corpus() for doc in data.read_documents(f))
    tokenizer.train_from_documents(docs, vocab_size, max_chars=2_000_000).save(hf_dir)


def converter_deps(src: Path, root: Path) -> Path:
    """A folder with the transformers that llama.cpp's converter is pinned to (its requirements file), installed
    with pip once, to go first on the converter's PYTHONPATH; nanoseek's own environment keeps its transformers.
    transformers 5 drops tokenizer_config's add_bos_token for any tokenizer with a tokenizer.json (the file's
    post-processor rules), so the V3.2 converter's `assert tokenizer.add_bos_token` fails on every such tokenizer
    under it; under the pinned 4.x it reads the tokenizer_config that nanoseek saves."""
    req = (src / "requirements" / "requirements-convert_legacy_llama.txt").read_text(encoding="utf-8")
    pin = next((ln.strip() for ln in req.splitlines() if ln.strip().startswith("transformers==")), None)
    if pin is None:
        raise Unavailable("llama.cpp's converter requirements pin no transformers version")
    deps = root / "convert-deps" / pin.split("==")[1]
    if (deps / "transformers").is_dir():
        return deps
    print(f"llama.cpp: installing the converter's {pin} into {deps} (once) ...", flush=True)
    # transformers 4.57's own dependencies that nanoseek's environment has too new (huggingface-hub 1+, tokenizers
    # 0.23.1+) go into the folder with it; the rest (numpy, safetensors, regex, ...) are shared
    got = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(deps), pin,
                          "huggingface-hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0"],
                         capture_output=True, text=True, errors="replace")
    if got.returncode:
        shutil.rmtree(deps, ignore_errors=True)
        raise Unavailable(f"pip install {pin} failed: {_last_line(got.stderr)}")
    return deps


def convert(src: Path, hf_dir: str | Path, out: Path, outtype: str) -> Path:
    """The HF folder as a GGUF of this --outtype (f32, bf16, q8_0, ...), by llama.cpp's converter under its pinned
    transformers (through `llamacpp_convert.py`, which names the pre-tokenizer of nanoseek's tokenizers)."""
    deps = converter_deps(src, cache_root())
    # the converter's transformers first; then nanoseek, for the split regex
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(deps), str(_HERE.parent), os.environ.get("PYTHONPATH")) if p))
    got = subprocess.run([sys.executable, str(_HERE / "llamacpp_convert.py"), str(src), str(hf_dir),
                          "--outfile", str(out), "--outtype", outtype],
                         capture_output=True, text=True, errors="replace", env=env)
    if got.returncode or not out.is_file():
        raise Unavailable(f"converting to a {outtype} GGUF failed: {_last_line(got.stderr)}")
    return out


def quantize(binary: Path, src: Path, out: Path, qtype: str, threads: int) -> Path:
    """src (an f32 GGUF) as a GGUF of llama.cpp's `qtype` (Q4_1, ...), by llama-quantize with its own choice of type
    per tensor, except the output head: Q8_0, as nanoseek keeps its int4 models' head int8 (llama-quantize's own
    pick for a Q4_x file is Q6_K)."""
    cmd = [str(binary), "--output-tensor-type", "q8_0", str(src), str(out), qtype, str(threads)]
    got = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if got.returncode or not out.is_file():
        raise Unavailable(f"llama-quantize to {qtype} failed ({got.returncode}): {_last_line(got.stderr)}")
    return out


def weight_bytes_per_token(gguf_file: Path, experts_per_token: int) -> tuple[int, dict[str, int]]:
    """Bytes of the GGUF's tensors a decode token reads, each at its size in the file (its blocks' codes, scales
    and mins), as nanoseek's `activated_bytes` counts its own: the token embedding one row, the routed experts
    (`*_exps`, [E, ...]) experts_per_token of E, every other tensor whole; and those bytes by tensor type."""
    import gguf
    by_type: dict[str, int] = {}
    for t in gguf.GGUFReader(gguf_file).tensors:
        b = int(t.n_bytes)
        if t.name == "token_embd.weight":
            b //= int(t.shape[-1])  # GGUF lists dimensions innermost first: the last is the rows
        elif "_exps." in t.name:
            b = b // int(t.shape[-1]) * experts_per_token
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + b
    return sum(by_type.values()), by_type


def run_bench(binary: Path, gguf: Path, threads: int, depth: int, n_gen: int, repeats: int) -> list[dict]:
    """llama-bench's JSON results for decoding n_gen tokens one at a time after `depth` tokens of context (-d: a
    prefill outside the timing; -p 0: no prompt test), best of `repeats` after its own warm-up run."""
    cmd = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(n_gen), "-d", str(depth), "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    got = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if got.returncode:
        raise Unavailable(f"llama-bench failed ({got.returncode}): {_last_line(got.stderr)}")
    return json.loads(got.stdout)


def run_batched_bench(binary: Path, gguf: Path, threads: int, n_prompt: int, n_gen: int,
                      n_seqs: list[int]) -> list[dict]:
    """llama-batched-bench's results, one per count in n_seqs: that many sequences of n_prompt tokens prefilled in
    one batch (speed_pp, tokens/s over all sequences), then n_gen steps that decode one token for every sequence
    (speed_tg). The KV cache holds exactly all sequences at their longest."""
    cmd = [str(binary), "-m", str(gguf), "-c", str(max(n_seqs) * (n_prompt + n_gen)), "-npp", str(n_prompt),
           "-ntg", str(n_gen), "-npl", ",".join(map(str, n_seqs)), "-t", str(threads), "-tb", str(threads),
           "--output-format", "jsonl"]
    got = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if got.returncode:
        raise Unavailable(f"llama-batched-bench failed ({got.returncode}): {_last_line(got.stderr)}")
    # its log goes to the same streams as the results: keep the result lines
    results = [json.loads(ln) for ln in f"{got.stdout}\n{got.stderr}".splitlines() if ln.startswith('{"n_kv_max"')]
    if len(results) != len(n_seqs):
        raise Unavailable(f"llama-batched-bench gave {len(results)} results for {len(n_seqs)} batch sizes: "
                          f"{_last_line(got.stderr)}")
    return results


def rates(results: list[dict]) -> dict[int, float]:
    """Decode tokens/s of llama-bench's generation tests, by thread count: the best of the repetitions (as the
    bench takes nanoseek's best)."""
    return {r["n_threads"]: max(r["samples_ts"]) for r in results if r["n_gen"] > 0 and r["n_prompt"] == 0}


def describe(result: dict) -> str:
    """Which llama.cpp ran, and how, from one llama-bench result."""
    return (f"llama.cpp {result['build_commit']} (build {result['build_number']}, vendored by llama-cpp-python "
            f"{VERSION}), {result['backends']} backend, KV cache "
            f"{result['type_k']}/{result['type_v']}, flash attention {('auto', 'off', 'on')[result['flash_attn'] + 1]}"
            f"; llama-bench built with cmake {' '.join(CMAKE_FLAGS)}")


def format_batched_table(rows: list[tuple[str, int, int, float, float, float, float]]) -> str:
    """Markdown table of (weights, threads, sequences, nanoseek prefill, llama.cpp prefill, nanoseek decode,
    llama.cpp decode) tokens/s rows; ratios = nanoseek / llama.cpp."""
    lines = ["| weights | threads | sequences | prefill nanoseek | prefill llama.cpp | ratio | decode nanoseek | "
             "decode llama.cpp | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {t} | {n} | {p_ns:.1f} | {p_ll:.1f} | {p_ns / p_ll:.2f}x | {d_ns:.1f} | {d_ll:.1f} | "
              f"{d_ns / d_ll:.2f}x |" for name, t, n, p_ns, p_ll, d_ns, d_ll in rows]
    return "\n".join(lines)


def format_table(rows: list[tuple[str, int, float, float]]) -> str:
    """Markdown table of (weights, threads, nanoseek tok/s, llama.cpp tok/s) rows; ratio = nanoseek / llama.cpp."""
    lines = ["| weights | threads | nanoseek tok/s | llama.cpp tok/s | ratio |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {t} | {r_ns:.1f} | {r_ll:.1f} | {r_ns / r_ll:.2f}x |" for name, t, r_ns, r_ll in rows]
    return "\n".join(lines)
