"""Terminal front ends of the engine: one completion, or a streaming chat REPL.

    nanoseek generate MODEL_DIR "Once upon a time" [--max-tokens 128] [--temperature 0.7] [--chat] [--thinking]
    nanoseek chat MODEL_DIR [--system "..."] [--thinking] [--speculative mtp]
    (both: [--quantize int8|int4 [--quant-group-size 32]], weight-only quantization at load, nanoseek.quant;
     [--kv-cache-dtype auto|fp8|int8], 8-bit KV-cache rows, nanoseek.model.kv_quant)

MODEL_DIR is a Hugging Face folder (config.json, safetensors, tokenizer.json). `generate` continues the raw
text (or, with --chat, answers it as a user message); `chat` keeps the conversation, encodes it with DeepSeek's
chat format (nanoseek.chat) and streams the reply, reasoning dimmed in thinking mode. REPL commands: /reset,
/exit (or Ctrl-D). Speed and MTP acceptance go to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from nanoseek import chat, quant
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.kv_quant import KV_CACHE_DTYPES

DIM, RESET = "\033[2m", "\033[0m"


def _parser(cmd: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"nanoseek {cmd}", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model folder (config.json, safetensors, tokenizer.json) or a .gguf file")
    if cmd == "generate":
        ap.add_argument("prompt", help="text to continue (or the user message with --chat)")
        ap.add_argument("--chat", action="store_true", help="wrap the prompt as a chat user turn")
    else:
        ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--thinking", action="store_true", help="DeepSeek thinking mode (chat format)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 256 (generate), 1024 (chat)")
    ap.add_argument("--temperature", type=float, default=0.0 if cmd == "generate" else 0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 where the device computes it natively and fast, else float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    ap.add_argument("--num-draft", type=int, default=1, help="draft tokens per step with --speculative mtp")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                    help="KV-cache rows: auto = the model's dtype; fp8 | int8 = 8 bits with scales (~2x the tokens)")
    quant.add_arguments(ap)
    return ap


def _load(args):
    from nanoseek.checkpoint import from_pretrained
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.precision import resolve
    dtype = resolve(args.dtype, args.device, "nanoseek")
    model = from_pretrained(args.model, dtype=dtype, device=args.device, quantize=args.quantize,
                            group_size=args.quant_group_size)
    tok = load_tokenizer(args.model)
    engine = Engine(model, tok, max_batch_size=1, max_model_len=args.max_model_len, speculative=args.speculative,
                    num_draft=args.num_draft, kv_cache_dtype=args.kv_cache_dtype)
    style = "v3.2" if model.config.model_type == "deepseek_v32" else "v3"
    return engine, tok, style


def _params(args, default_max: int) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens or default_max, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def stream(engine: Engine, prompt_ids: list[int], params: SamplingParams, thinking: bool, out=None) -> str:
    """Run one request, printing text as it comes (reasoning dimmed) to `out` (default: sys.stdout as it is at
    the call, not at import); returns the answer text (no reasoning)."""
    out = out if out is not None else sys.stdout
    params.max_tokens = min(params.max_tokens, engine.max_model_len - len(prompt_ids))
    if params.max_tokens < 1:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the context ({engine.max_model_len})")
    engine.add_request("cli", prompt_ids, params)
    parser = chat.ReasoningParser(thinking)
    answer, n, t0 = [], 0, time.perf_counter()
    t_first: Optional[float] = None
    while engine.has_unfinished():
        for o in engine.step():
            n = o.num_generated
            t_first = t_first or time.perf_counter()
            r, c = parser.feed(o.new_text)
            if o.finished:
                r2, c2 = parser.flush()
                r, c = r + r2, c + c2
            if r:
                out.write(DIM + r + RESET)
            out.write(c)
            answer.append(c)
            out.flush()
    dt = time.perf_counter() - (t_first or t0)
    s = engine.stats()
    extra = f", MTP acceptance {s['spec_acceptance_rate']:.0%}" if s["spec_acceptance_rate"] is not None else ""
    print(f"\n[{n} tokens, {max(n - 1, 0) / dt if dt > 0 else 0:.1f} tok/s after the first{extra}]",
          file=sys.stderr)
    return "".join(answer)


def _generate(args) -> int:
    engine, tok, style = _load(args)
    if args.chat or args.thinking:
        text = chat.encode_messages([{"role": "user", "content": args.prompt}], thinking=args.thinking, style=style)
        ids = tok.encode(text)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    if not args.chat and not args.thinking:
        sys.stdout.write(args.prompt)
    stream(engine, ids, _params(args, 256), args.thinking)
    return 0


def _chat(args) -> int:
    engine, tok, style = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = []
    print(f"nanoseek chat: KV cache of {engine.pool.capacity_tokens} tokens ({args.kv_cache_dtype}); /reset clears the "
          "conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(chat.encode_messages(system + messages, thinking=args.thinking, style=style))
        try:
            reply = stream(engine, ids, _params(args, 1024), args.thinking)
        except KeyboardInterrupt:  # stop this reply, keep the session
            engine.abort("cli")
            engine.step()
            reply = ""
            print(file=sys.stderr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def cli(cmd: str, argv: list[str]) -> int:
    args = _parser(cmd).parse_args(argv)
    try:
        return _generate(args) if cmd == "generate" else _chat(args)
    except (ValueError, FileNotFoundError) as e:
        from nanoseek.cli import error
        return error(f"nanoseek {cmd}", e, 2)
