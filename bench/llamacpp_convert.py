"""llama.cpp's own converter (`convert_hf_to_gguf.py` of the llama.cpp source given first) run on a folder nanoseek
saved, told which pre-tokenizer nanoseek's tokenizers use. `bench/llamacpp.py` runs it in a subprocess.

    python bench/llamacpp_convert.py LLAMA_CPP_DIR HF_DIR --outfile M.gguf --outtype f32 [converter options]

The converter names a BPE tokenizer's pre-tokenizer by hashing the ids a fixed text encodes to, and knows only the
hashes of published models; every tokenizer nanoseek trains has merges of its own, so an unknown hash, and the
converter stops. Its split regex (`nanoseek.tokenizer.SPLIT_PATTERN`, GPT-4's) is the one llama.cpp's "llama-bpe"
(LLAMA3) pre-tokenizer applies, so a tokenizer.json that splits with exactly that regex before the byte-level
mapping is written as "llama-bpe"; any other goes to the converter's own check. (llama-bpe also takes a word
that is a whole vocabulary entry as one token without merging, which byte-level BPE trained by `tokenizers` gives
too.) The choice is patched into this process only: the llama.cpp files on disk stay as shipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

PRE_TOKENIZER = "llama-bpe"


def split_regex(tokenizer_json: dict) -> Optional[str]:
    """The regex of a byte-level BPE tokenizer.json's Split pre-tokenizer (nanoseek's layout), or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True):
        return None
    return (steps[0].get("pattern") or {}).get("Regex")


def main(argv: list[str]) -> None:
    from nanoseek.tokenizer import SPLIT_PATTERN

    src = Path(argv[0]).resolve()
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        spec = json.loads((Path(self.dir_model) / "tokenizer.json").read_text(encoding="utf-8"))
        return PRE_TOKENIZER if split_regex(spec) == SPLIT_PATTERN else known(self, tokenizer)

    TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv[1:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
