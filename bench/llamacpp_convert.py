"""llama.cpp's own converter (`convert_hf_to_gguf.py` of the llama.cpp source given first) run on a folder nanoseek
saved, told which pre-tokenizer nanoseek's tokenizers use. `bench/llamacpp.py` runs it in a subprocess.

    python bench/llamacpp_convert.py LLAMA_CPP_DIR HF_DIR --outfile M.gguf --outtype f32 [converter options]

This is the one thing the converter cannot be given from files, for any BPE vocabulary trained here (line numbers
of llama.cpp 0c1e570): a DeepseekV32ForCausalLM's vocabulary goes through `_set_vocab_gpt2` whatever the files
say (conversion/deepseek.py 506-510), which names the pre-tokenizer by `get_vocab_base_pre` (base.py 1590): it
encodes a fixed text with the tokenizer and hashes the ids (base.py 1636-1638), compares the hash with those of
published tokenizers (1648-1938) and raises on any other (1940-1953). The ids of that text follow from the
merges, so a vocabulary trained on other data never hashes to a known name, and no option of the converter
(`--metadata` sets general.* keys only) or field of tokenizer.json / tokenizer_config.json names it instead.
(Relabelling ids so that the text's tokens hash like a published tokenizer's would need the same split of that
text into the same number of tokens: not something a trained vocabulary has.)

nanoseek's split regex (`nanoseek.tokenizer.SPLIT_PATTERN`, GPT-4's) is the one llama.cpp's "llama-bpe" (LLAMA3)
pre-tokenizer applies, so a tokenizer.json that splits with exactly that regex before the byte-level mapping is
written as "llama-bpe"; any other goes to the converter's own check. (llama-bpe also takes a word that is a whole
vocabulary entry as one token without merging, which byte-level BPE trained by `tokenizers` gives too.) The
choice is patched into this process only: the llama.cpp files on disk stay as shipped. The other two obstacles
are gone from files alone: tokenizer_config.json says add_bos_token under the class DeepSeek's own tokenizers
name (`nanoseek.tokenizer`, read by the converter's pinned transformers, see `llamacpp.converter_deps`), and the
`small` preset's indexer heads are 64 wide, as llama.cpp's deepseek32 graph needs.
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
