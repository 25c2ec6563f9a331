"""The per-token cost of grammar-constrained decoding (nanoseek/engine/grammar.py) against free decoding, one run.

    python bench/grammar.py --model runs/speedrun/dsa_sparse/final [--tokens 128] [--batch 1,8] [--threads N]

Loads a saved model folder (it needs its tokenizer), renders one chat prompt asking for JSON, and decodes it
through the engine at temperature 1 (seeded) two ways, alternating, best of --repeats, timed after the prefill
step: under a JSON schema (records with strings, numbers and enums, at least 8 of them: longer than --tokens, so
every sequence is cut at exactly --tokens) and unconstrained with ignore_eos, each sequence as long as its
constrained twin. The constraint's cost is its own calls, timed inside the constrained run: `allowed()`
(llguidance's bitmask on the CPU + the unpack to a bool mask) and `accept()` (the matcher's advance), plus the
sampler's extra for applying a mask (process_logits with and without one), in microseconds per sequence-token
(the note printed under the table says why the wall-clock rates are not the measure of it). `allowed()` is also
replayed alone over one sequence's tokens (bitmask and unpack apart). One-off costs printed beside the table:
indexing the vocabulary for llguidance (once per served model) and compiling the schema (once per request).
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

import nanoseek
from nanoseek import chat, precision
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine import grammar
from nanoseek.engine.sampling import process_logits
from nanoseek.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 8, "maxItems": 40, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "qty": {"type": "integer"},
                           "price": {"type": "number"}, "unit": {"enum": ["kg", "g", "piece", "litre"]},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
            "required": ["name", "qty", "price", "unit", "tags"], "additionalProperties": False}},
        "total": {"type": "number"},
    },
    "required": ["items", "total"],
    "additionalProperties": False,
}


class Timed:
    """A TokenConstraint that times the wrapped one's calls."""

    def __init__(self, inner, clock: dict):
        self.inner, self.clock = inner, clock

    def allowed(self):
        t = time.perf_counter()
        out = self.inner.allowed()
        self.clock["allowed"] += time.perf_counter() - t
        self.clock["calls"] += 1
        return out

    def accept(self, token: int) -> None:
        t = time.perf_counter()
        self.inner.accept(token)
        self.clock["accept"] += time.perf_counter() - t


def decode_seconds(engine: Engine, prompt: list[int], params: list[SamplingParams]) -> tuple[float, list[int]]:
    """Seconds of the decode steps (after the prefill step) and each sequence's generated token count."""
    for i, p in enumerate(params):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", prompt, p)
    counts = {}
    for o in engine.step():  # prefill + first token of every sequence (the batch fits in one step)
        counts[o.request_id] = len(o.new_token_ids)
    t = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
    return time.perf_counter() - t, list(counts.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a saved model folder with its tokenizer")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", default="1,8", help="batch sizes (sequences decoded together)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    said = io.StringIO()
    dtype = precision.resolve(args.dtype, "cpu", "bench/grammar.py", out=said)
    model = nanoseek.from_pretrained(args.model, dtype=dtype).eval()
    tok = load_tokenizer(args.model)
    prompt = tok.encode(chat.encode_messages([{"role": "user", "content": "List a week of groceries as JSON."}]))

    t = time.perf_counter()
    compiler = grammar.compiler_for(tok)
    t_vocab = time.perf_counter() - t
    g = grammar.json_schema(SCHEMA)
    t = time.perf_counter()
    make = compiler.constraint(g, prompt)
    t_compile = time.perf_counter() - t

    from nanoseek.kernels import isa
    print(f"model {args.model} ({str(dtype).split('.')[-1]}, vocabulary {tok.vocab_size}), prompt {len(prompt)} "
          f"tokens, up to {args.tokens} generated at temperature 1, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"CPU {isa.describe()}")
    print(f"one-off: llguidance vocabulary index {t_vocab * 1e3:.0f} ms (per served model), schema compile "
          f"{t_compile * 1e3:.1f} ms (per request)\n")

    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        engine = Engine(model, tok, max_batch_size=batch)
        free_best, con_best, clock_best, n_tok = float("inf"), float("inf"), None, None
        for r in range(args.repeats + 1):  # the first round warms up
            clock = dict(allowed=0.0, accept=0.0, calls=0)
            con = [SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=r * 100 + i,
                                  constraint=lambda: Timed(make(), clock)) for i in range(batch)]
            s_con, counts = decode_seconds(engine, prompt, con)
            # the unconstrained sequences run to the constrained ones' lengths, token for token
            free = [SamplingParams(max_tokens=n, temperature=1.0, seed=r * 100 + i, ignore_eos=True)
                    for i, n in enumerate(counts)]
            s_free, _ = decode_seconds(engine, prompt, free)
            if r:
                steps = sum(counts) - batch  # tokens timed (after each sequence's first)
                if s_con / steps < con_best:
                    con_best, clock_best, n_tok = s_con / steps, clock, counts
                free_best = min(free_best, s_free / steps)
        per_call = clock_best["calls"]
        rows.append((batch, n_tok, 1 / free_best, 1 / con_best, clock_best["allowed"] / per_call * 1e6,
                     clock_best["accept"] / per_call * 1e6, free_best * 1e6))

    # the parts of allowed(), replayed over one constrained sequence's tokens: llguidance's bitmask, the unpack
    replay = engine.generate([prompt], SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0,
                                                      constraint=make))[0].new_token_ids
    m = compiler.compile(g)
    bits = np.zeros((compiler.vocab_size + 31) // 32, dtype=np.int32)
    t_mask = t_unpack = 0.0
    for token in replay:
        t = time.perf_counter()
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        t_mask += time.perf_counter() - t
        t = time.perf_counter()
        torch.from_numpy(np.unpackbits(bits.view(np.uint8), bitorder="little")[:compiler.vocab_size]).view(torch.bool)
        t_unpack += time.perf_counter() - t
        m.consume_token(token)

    # the sampler's share: masking one row of logits with a bool mask against no mask
    logits = torch.randn(model.config.vocab_size)
    mask = make().allowed()
    p = SamplingParams(temperature=1.0)
    for _ in range(50):
        process_logits(logits, p, None, [], mask)
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        process_logits(logits, p, None, [], None)
    t_plain = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        process_logits(logits, p, None, [], mask)
    t_masked = (time.perf_counter() - t) / n

    mask_us = (t_masked - t_plain) * 1e6
    print("| batch | tokens per sequence | free tok/s | constrained tok/s | ratio | allowed() us | accept() us | "
          "masking us | constraint share of a free token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, counts, free, con, allowed, accept, free_us in rows:
        lengths = f"{min(counts)}-{max(counts)}" if min(counts) != max(counts) else f"{counts[0]}"
        print(f"| {batch} | {lengths} | {free:.1f} | {con:.1f} | {con / free:.2f}x | {allowed:.0f} | {accept:.0f} | "
              f"{mask_us:.0f} | {(allowed + accept + mask_us) / free_us:.1%} |")
    print(f"\nallowed() replayed over {len(replay)} tokens: llguidance bitmask {t_mask / len(replay) * 1e6:.0f} us, "
          f"unpack to bool {t_unpack / len(replay) * 1e6:.1f} us per token")
    print(f"sampler masking (process_logits on {model.config.vocab_size} logits): {t_plain * 1e6:.0f} us without a "
          f"mask, {t_masked * 1e6:.0f} us with one")
    print("tok/s count every sequence's tokens (a batch of 8 decodes 8 per step); allowed() (llguidance's bitmask + "
          "unpack) and accept() (the matcher's advance) timed inside the constrained run, masking = the sampler's "
          "extra for applying the mask, all per sequence-token; share = their sum over the free run's time per "
          "sequence-token. The two runs sample different tokens, which in a MoE route to different experts, so "
          "their wall-clock rates differ by more than the constraint's cost, either way")


if __name__ == "__main__":
    main()
