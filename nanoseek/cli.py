"""The `nanoseek` command: a thin dispatcher to each subcommand's own module (each owns its argparse).

    nanoseek train | adapt | sft | tokenizer | generate | chat | serve | lora | convert | info | eval | quantize
"""
from __future__ import annotations

import importlib
import sys

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
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: nanoseek <command> [options]\n\ncommands:")
        for name, (_, desc) in COMMANDS.items():
            print(f"  {name:10s} {desc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.cli(cmd, rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
