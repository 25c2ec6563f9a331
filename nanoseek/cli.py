"""The `nanoseek` command: a thin dispatcher to each subcommand's own module (each owns its argparse).

    nanoseek train | adapt | sft | tokenizer | generate | chat | serve | lora | convert | info | eval | quantize
             | export-gguf
             [--debug]

An error the user can act on (a broken model folder, a bad option) is printed as one line naming its cause; with
--debug (anywhere on the line) its traceback is printed too.
"""
from __future__ import annotations

import importlib
import sys
import traceback

DEBUG = False  # set by --debug: every error reported through `error` shows its traceback


def error(prog: str, e: BaseException, code: int, prefix: str = "error: ") -> int:
    """Report `e` on stderr as one line `PROG: error: MESSAGE` (after its traceback under --debug); returns code."""
    if DEBUG:
        traceback.print_exception(e)
    print(f"{prog}: {prefix}{e}", file=sys.stderr)
    return code

COMMANDS = {
    "train": ("nanoseek.train", "train a model (pre-training, DSA stages); runs under torchrun too"),
    "adapt": ("nanoseek.adapt", "continued pre-training on a new language (extended vocabulary, replay)"),
    "sft": ("nanoseek.sft", "supervised fine-tuning on chat conversations (JSONL, TRL's format)"),
    "tokenizer": ("nanoseek.tokenizer", "train, extend or inspect a byte-level BPE tokenizer"),
    "generate": ("nanoseek.generate", "complete one prompt from a model folder"),
    "chat": ("nanoseek.generate", "interactive streaming chat in the terminal"),
    "serve": ("nanoseek.server.api", "OpenAI-compatible HTTP server with a chat page"),
    "lora": ("nanoseek.lora", "merge a LoRA adapter (PEFT format) into its base model"),
    "convert": ("nanoseek.checkpoint", "re-save a checkpoint (e.g. FP8 -> bf16) in HF layout"),
    "info": ("nanoseek.checkpoint", "print a model folder's config and parameter counts"),
    "eval": ("nanoseek.evaluate", "bits per byte, tokens per word and per byte of a model on text files"),
    "quantize": ("nanoseek.quant", "write a model folder with int8 / int4 weights"),
    "export-gguf": ("nanoseek.gguf", "write a model as a llama.cpp GGUF file (f32, bf16 or q8_0)"),
}


def main(argv: list[str] | None = None) -> int:
    global DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        DEBUG = True
        argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: nanoseek <command> [options]\n\ncommands:")
        for name, (_, desc) in COMMANDS.items():
            print(f"  {name:10s} {desc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[cmd][0])
    from nanoseek.checkpoint import CheckpointError
    try:
        return int(module.cli(cmd, rest) or 0)
    except CheckpointError as e:  # wherever a command met a broken model folder: the line, not the traceback
        return error(f"nanoseek {cmd}", e, 1)


if __name__ == "__main__":
    raise SystemExit(main())
