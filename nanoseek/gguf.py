"""GGUF files (llama.cpp's format) of DeepSeek V2 / V3 / V3.2 models: read them into nanoseek, write them for llama.cpp.

    model, tok = nanoseek.gguf.load_gguf("model.gguf", dtype=None, device="cpu", quantize=None)
    nanoseek export-gguf HF_DIR OUT.gguf --type f32|bf16|q8_0

The container is parsed and written by the `gguf` package (llama.cpp's gguf-py, from PyPI); this file only knows
the layout llama.cpp's converter (`convert_hf_to_gguf.py`, conversion/deepseek.py) gives DeepSeek models, read
back the way llama.cpp's `src/models/deepseek2.cpp` reads it:
- architecture `deepseek2` for V2 / V3 (no MTP block: the converter drops it), `deepseek32` for V3.2 (the DSA
  indexer `blk.N.indexer.*` and the MTP block appended as `blk.{L+k}` with its `nextn.*` tensors);
- MLA as MQA: `attn_kv_a_mqa` is kv_a_proj_with_mqa, and kv_b_proj is split per head into `attn_k_b` [H, R, N]
  (k part, transposed) and `attn_v_b` [H, V, R]; files of older converters hold the whole `attn_kv_b`;
- routed experts stacked per layer (`ffn_{gate,up,down}_exps` [E, out, in]), router `ffn_gate_inp`, its
  correction bias `exp_probs_b.bias`, shared experts `ffn_*_shexp`;
- `{arch}.*` keys for the shapes, `tokenizer.ggml.*` for the byte-level BPE vocabulary (gpt2 model).
Shapes below are torch's (numpy's): GGUF's own dimension lists are the reverse.

GGUF does not store every field of config.json; what is inferred on reading: the model type (deepseek32 ->
V3.2; deepseek2 with sigmoid gating -> V3, softmax -> V2), the routing method (sigmoid: noaux_tc; softmax:
group-limited greedy when there are expert groups, greedy otherwise), YaRN's mscale = mscale_all_dim =
yarn_log_multiplier / 0.1 (as the converter wrote it; DeepSeek's releases have the two equal); fields a file
does not store because they are off (YaRN's without YaRN, the indexer's without DSA) and initializer_range take
ModelConfig's defaults. float32 metadata is read back as the shortest decimal that gives the same float32
(1e-06, not 9.99999997e-07).

Tensor types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K (dequantized by `gguf.quants`); any other
type stops the load with one line naming it and the tensor. Written: what the converter writes for --outtype f32,
bf16 or q8_0, tensor by tensor (norms, biases, the router and the indexer's head weights stay F32; a Q8_0 tensor
whose rows are not a multiple of 32 is written F16, as the converter falls back); for a folder of one
safetensors file, the very same bytes.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import gguf
import numpy as np
import torch

from nanoseek.checkpoint import CheckpointError, internal_to_hf
from nanoseek.config import ModelConfig
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import SPLIT_PATTERN, Tokenizer

T = gguf.GGMLQuantizationType
READ_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K)
WRITE_TYPES = {"f32": (T.F32, gguf.LlamaFileType.ALL_F32), "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
               "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
ARCHS = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2", "deepseek_v32": "deepseek32"}
# llama.cpp's pre-tokenizers (src/llama-vocab.cpp) as the regex splits a tokenizer.json applies before the byte map.
# llama-bpe is nanoseek's own split (GPT-4's); deepseek-v3 is DeepSeek V3's tokenizer.json
PRE_TOKENIZERS = {
    "llama-bpe": [SPLIT_PATTERN],
    "deepseek-v3": [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs, kana
                    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
_TT = gguf.TokenType


# ---- names ------------------------------------------------------------------------------------------------
_LAYER = {  # nanoseek name inside a decoder block -> GGUF name inside blk.N (kv_b_proj and the experts: below)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "self_attn.indexer.wk.weight": "indexer.attn_k.weight",
    "self_attn.indexer.k_norm.weight": "indexer.k_norm.weight",
    "self_attn.indexer.k_norm.bias": "indexer.k_norm.bias",
    "self_attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_MTP = {"enorm.weight": "nextn.enorm.weight", "hnorm.weight": "nextn.hnorm.weight",
        "eh_proj.weight": "nextn.eh_proj.weight", "head_norm.weight": "nextn.shared_head_norm.weight"}
_TOP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def _split(name: str, cfg: ModelConfig) -> tuple[Optional[str], str]:
    """nanoseek name -> (GGUF block prefix "blk.N." or None at the top, the rest of the nanoseek name)."""
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m:
        return f"blk.{m.group(1)}.", m.group(2)
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        rest = m.group(2)
        return f"blk.{cfg.num_hidden_layers + int(m.group(1))}.", rest[len("block."):] if rest.startswith(
            "block.") else "@" + rest  # "@": an MTP-only tensor (_MTP), not a block's
    return None, name


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of every tensor the converter writes for this model, in nanoseek's float values:
    kv_b_proj split into k_b / v_b, experts as three stacks, the MTP block's embedding / head copies added."""
    cfg = model.config
    sd = model.state_dict()
    H, N, V, R, I = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                     cfg.moe_intermediate_size)
    for name, t in sd.items():
        if name.startswith("rotary.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        blk, rest = _split(name, cfg)
        if blk is None:
            yield _TOP[rest], t
        elif rest.startswith("@"):
            yield blk + _MTP[rest[1:]], t
        elif rest == "self_attn.kv_b_proj.weight":
            k_b, v_b = t.view(H, N + V, R).split([N, V], dim=1)
            yield blk + "attn_k_b.weight", k_b.transpose(1, 2)
            yield blk + "attn_v_b.weight", v_b
        elif rest == "mlp.experts.gate_up_proj":
            yield blk + "ffn_gate_exps.weight", t[:, :I]
            yield blk + "ffn_up_exps.weight", t[:, I:]
        elif rest == "mlp.experts.down_proj":
            yield blk + "ffn_down_exps.weight", t
        else:
            yield blk + _LAYER[rest], t
    for k in range(len(model.mtp)):
        blk = f"blk.{cfg.num_hidden_layers + k}."
        yield blk + "nextn.embed_tokens.weight", sd["embed_tokens.weight"]
        yield blk + "nextn.shared_head_head.weight", sd["embed_tokens.weight" if cfg.tie_word_embeddings
                                                        else "lm_head.weight"]


# ---- reading ----------------------------------------------------------------------------------------------
def _reader(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:  # gguf-py's own errors for a bad magic / header
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(v)))


def _fields(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def read_config(path_or_reader) -> ModelConfig:
    """The ModelConfig a deepseek2 / deepseek32 GGUF file describes (see the module docstring for what is inferred)."""
    r = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else _reader(path_or_reader)
    meta = _fields(r)
    where = Path(r.data.filename) if hasattr(r.data, "filename") else "GGUF"
    arch = meta.get("general.architecture")
    if arch not in ("deepseek2", "deepseek32"):
        raise CheckpointError(f"{where}: architecture {arch!r} is not a DeepSeek one nanoseek reads "
                              f"(deepseek2, deepseek32)")

    def get(key: str, default=None, required: bool = False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise CheckpointError(f"{where}: metadata key {full!r} is missing")
            return default
        return meta[full]

    names = {t.name: t for t in r.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{where}: tensor 'token_embd.weight' is missing")
    vocab = int(names["token_embd.weight"].shape[1])  # GGUF lists dimensions innermost first
    nextn = int(get("nextn_predict_layers", 0))
    rope = int(get("rope.dimension_count", required=True))
    if get("attention.key_length_mla") is not None:  # MQA layout: key/value_length are the latent's
        nope, v = int(get("attention.key_length_mla")) - rope, int(get("attention.value_length_mla", required=True))
    else:  # older converters: per-head MHA lengths
        nope, v = int(get("attention.key_length", required=True)) - rope, int(get("attention.value_length",
                                                                                    required=True))
    experts = int(get("expert_count", 0))
    groups = int(get("expert_group_count", 1))
    sigmoid = int(get("expert_gating_func", 1)) == int(gguf.ExpertGatingFuncType.SIGMOID)
    model_type = "deepseek_v32" if arch == "deepseek32" else "deepseek_v3" if sigmoid else "deepseek_v2"
    kw = dict(
        model_type=model_type, vocab_size=vocab,
        hidden_size=int(get("embedding_length", required=True)),
        intermediate_size=int(get("feed_forward_length", required=True)),
        moe_intermediate_size=int(get("expert_feed_forward_length", get("feed_forward_length"))),
        num_hidden_layers=int(get("block_count", required=True)) - nextn,
        first_k_dense_replace=int(get("leading_dense_block_count", 0)),
        num_attention_heads=int(get("attention.head_count", required=True)),
        q_lora_rank=int(get("attention.q_lora_rank")) if get("attention.q_lora_rank") else None,
        kv_lora_rank=int(get("attention.kv_lora_rank", required=True)),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        n_routed_experts=experts, n_shared_experts=int(get("expert_shared_count", 0)),
        num_experts_per_tok=int(get("expert_used_count", 0)), n_group=groups,
        topk_group=int(get("expert_group_used_count", 1)),
        scoring_func="sigmoid" if sigmoid else "softmax",
        topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if groups > 1 else "greedy",
        norm_topk_prob=bool(get("expert_weights_norm", False)),
        routed_scaling_factor=_f32(get("expert_weights_scale", 1.0)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", required=True)),
        num_nextn_predict_layers=nextn,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", required=True)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 0)),
        eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
    )
    if get("rope.scaling.type") == "yarn":
        m = round(_f32(get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1, 6)
        kw.update(rope_type="yarn", rope_factor=_f32(get("rope.scaling.factor", required=True)),
                  original_max_position_embeddings=int(get("rope.scaling.original_context_length", required=True)),
                  beta_fast=_f32(get("rope.scaling.yarn_beta_fast", 32.0)),
                  beta_slow=_f32(get("rope.scaling.yarn_beta_slow", 1.0)), mscale=m, mscale_all_dim=m)
    else:
        kw["rope_type"] = "default"
    if arch == "deepseek32":
        kw.update(index_n_heads=int(get("attention.indexer.head_count", required=True)),
                  index_head_dim=int(get("attention.indexer.key_length", required=True)),
                  index_topk=int(get("attention.indexer.top_k", required=True)))
    else:
        kw.update(index_n_heads=0, index_topk=0)
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def dequantize(t, where: str = "GGUF", index: Optional[int] = None) -> torch.Tensor:
    """A GGUF tensor (a `gguf.ReaderTensor`) as float32 in torch's dimension order, through `gguf.quants`;
    index: only that slice of the outermost dimension (one expert of a stack)."""
    if t.tensor_type not in READ_TYPES:
        raise CheckpointError(f"{where}: tensor {t.name!r} has type {t.tensor_type.name}, which nanoseek does not "
                              f"read (it reads {', '.join(x.name for x in READ_TYPES)})")
    data = t.data if index is None else t.data[index]
    if t.tensor_type not in (T.F32, T.F16):
        data = gguf.quants.dequantize(data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    shape = shape if index is None else shape[1:]
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a copy: the file is mapped read-only


def _pick_dtype(r: gguf.GGUFReader, dtype) -> torch.dtype:
    """dtype asked, else bfloat16 for a file whose matrices are all BF16 and float32 for any other."""
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    mats = {t.tensor_type for t in r.tensors if len(t.shape) > 1 and t.tensor_type != T.F32}
    return torch.bfloat16 if mats == {T.BF16} else torch.float32


def _sources(cfg: ModelConfig, names: set[str]) -> dict[str, list[str]]:
    """nanoseek name -> the GGUF names it is built from; kv_b from k_b + v_b (or an older file's kv_b)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    out: dict[str, list[str]] = {}
    for g, _ in gguf_tensors(model):
        if ".nextn.embed_tokens." in g or ".nextn.shared_head_head." in g:
            continue  # copies of the embedding and the head
        m = re.match(r"^blk\.\d+\.", g)
        out.setdefault(_internal(g, cfg, m.group(0) if m else ""), []).append(g)
    for n, srcs in out.items():
        if n.endswith("kv_b_proj.weight") and not set(srcs) <= names:
            blk = srcs[0][:srcs[0].rindex("attn_k_b")]
            out[n] = [blk + "attn_kv_b.weight"]
    return out


def _internal(g: str, cfg: ModelConfig, blk: str) -> str:
    """GGUF name -> the nanoseek parameter it belongs to (experts: the fused parameter)."""
    if not blk:
        return {v: k for k, v in _TOP.items()}[g]
    i = int(blk.split(".")[1])
    prefix = f"layers.{i}." if i < cfg.num_hidden_layers else f"mtp.{i - cfg.num_hidden_layers}."
    rest = g[len(blk):]
    mtp_only = {v: k for k, v in _MTP.items()}
    if rest in mtp_only:
        return prefix + mtp_only[rest]
    if i >= cfg.num_hidden_layers:
        prefix += "block."
    if rest in ("attn_k_b.weight", "attn_v_b.weight", "attn_kv_b.weight"):
        return prefix + "self_attn.kv_b_proj.weight"
    if rest in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
        return prefix + "mlp.experts.gate_up_proj"
    if rest == "ffn_down_exps.weight":
        return prefix + "mlp.experts.down_proj"
    return prefix + {v: k for k, v in _LAYER.items()}[rest]


def _assemble(param: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The nanoseek parameter from its GGUF tensors (the inverse of `gguf_tensors`)."""
    if param.endswith("kv_b_proj.weight") and len(parts) == 2:  # k_b [H, R, N], v_b [H, V, R]
        k_b, v_b = parts
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, cfg.kv_lora_rank)
    if param.endswith("experts.gate_up_proj"):
        return torch.cat(parts, dim=1)
    return parts[0]


def load_gguf(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
              quantize: Optional[str] = None, group_size: int = 32) -> tuple[Transformer, Tokenizer]:
    """A deepseek2 / deepseek32 GGUF file as (nanoseek Transformer, its Tokenizer).

    dtype: torch dtype or name; None = bfloat16 when every matrix in the file is BF16, else float32 (quantized
    tensors are dequantized to it). quantize: "int8" | "int4" re-quantizes the loaded weights into nanoseek's
    formats (`nanoseek.quant`, group_size values per int4 scale). Every tensor name, shape and type is checked
    against the metadata before the model is allocated; a mismatch is one CheckpointError naming the tensor.
    """
    return load_model(path, dtype, device, quantize, group_size), load_tokenizer(path)


def load_model(path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
               quantize: Optional[str] = None, group_size: int = 32) -> Transformer:
    """The Transformer of a GGUF file (`load_gguf` without the tokenizer); what `from_pretrained` calls."""
    r = _reader(path)
    where = str(path)
    cfg = read_config(r)
    dtype = _pick_dtype(r, dtype)
    tensors = {t.name: t for t in r.tensors}
    plan = _sources(cfg, set(tensors))
    wanted = {g for srcs in plan.values() for g in srcs}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) missing for this config, e.g. "
                              f"{', '.join(missing[:5])}")
    copies = re.compile(r"^blk\.\d+\.nextn\.(embed_tokens|shared_head_head)\.weight$")
    unexpected = sorted(n for n in tensors if n not in wanted and not copies.match(n))
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensor(s) for this config, e.g. "
                              f"{', '.join(unexpected[:5])}")
    for n in sorted(wanted):
        if tensors[n].tensor_type not in READ_TYPES:
            dequantize(tensors[n], where)  # raises, naming the type and the tensor
    with torch.device("meta"):
        model = Transformer(cfg)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for param, srcs in plan.items():
        shapes = [tuple(int(d) for d in reversed(tensors[g].shape)) for g in srcs]
        got = tuple(_assemble(param, [torch.empty(s, device="meta") for s in shapes], cfg).shape)
        if got != tuple(params[param].shape):
            raise CheckpointError(f"{where}: tensor(s) {', '.join(srcs)} of shape(s) {shapes} do not make "
                                  f"{param} {tuple(params[param].shape)} of the config in the metadata")
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty gives every module a new Parameter: tie the head to the embedding again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg).to(device)  # computed, not loaded
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for param, srcs in plan.items():
            dst = params[param]
            if param.endswith(("experts.gate_up_proj", "experts.down_proj")):
                # one expert at a time: the float32 copy held is one expert's, not the whole stack's
                for j in range(dst.shape[0]):
                    dst[j].copy_(torch.cat([dequantize(tensors[g], where, j) for g in srcs]))
            else:
                dst.copy_(_assemble(param, [dequantize(tensors[g], where) for g in srcs], cfg))
    model.eval()
    if quantize is not None:
        from nanoseek import quant
        model = quant.quantize_model(model, quantize, group_size)
    return model


def load_tokenizer(path_or_reader) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF file carries (tokenizer.ggml.*: model gpt2, a pre-tokenizer of
    PRE_TOKENIZERS), as a nanoseek Tokenizer: CONTROL and USER_DEFINED tokens are added tokens matched whole in
    text, BOS / EOS / padding are the special ones, UNUSED padding entries are left out (those ids decode to
    nothing), and the chat template is kept in `config`."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    r = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else _reader(path_or_reader)
    meta = _fields(r)
    where = getattr(r.data, "filename", "GGUF")
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise CheckpointError(f"{where}: tokenizer.ggml.model is {kind!r}; nanoseek reads byte-level BPE ('gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{where}: pre-tokenizer {pre!r} is not one nanoseek knows "
                              f"({', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != _TT.UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    # llama.cpp's llama-bpe takes a word that is a whole vocabulary entry as one token (HF's ignore_merges)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    ids = {role: meta.get(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "padding")}
    if ids["bos"] is None or ids["eos"] is None:
        raise CheckpointError(f"{where}: tokenizer.ggml.bos_token_id / eos_token_id are missing")
    control = {int(i) for i in ids.values() if i is not None}
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(control)])
    backend.add_tokens([AddedToken(tok, special=False, normalized=False) for i, (tok, ty) in
                        enumerate(zip(tokens, types)) if ty in (_TT.CONTROL, _TT.USER_DEFINED) and i not in control])
    bos, eos = tokens[int(ids["bos"])], tokens[int(ids["eos"])]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, int(ids["bos"]))])
    config = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    pad = tokens[int(ids["padding"])] if ids["padding"] is not None else None
    return Tokenizer(backend, bos, eos, pad, config=config)


# ---- writing ----------------------------------------------------------------------------------------------
def _write_type(name: str, ndim: int, want: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The converter's choice for one tensor (conversion/base.py prepare_tensors): vectors, norms, biases, the
    router and the indexer's head weights stay F32; every other matrix takes the file's type."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32
    if name.endswith(("ffn_gate_inp.weight", "indexer.proj.weight")):
        return T.F32
    return want


def _looks_special(token: str) -> bool:
    """The added tokens the converter types CONTROL although tokenizer.json does not mark them special."""
    return token.startswith(("<|", "<｜")) and token.endswith(("|>", "｜>")) or token == "<pad>"


def _tokenizer_pre(spec: dict) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE tokenizer.json: its Split regexes, then ByteLevel."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("use_regex", True) and set(kinds[:-1]) == {"Split"}:
        regexes = [(s.get("pattern") or {}).get("Regex") for s in steps[:-1]]
        for name, known in PRE_TOKENIZERS.items():
            if regexes == known:
                return name
    raise CheckpointError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) is none that llama.cpp "
                          f"names among {', '.join(PRE_TOKENIZERS)}")


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* as the converter writes them (get_vocab_base + SpecialVocab): one entry per model row,
    rows past the tokenizer as UNUSED "[PADi]"."""
    spec = json.loads(tok.to_str())
    if spec.get("model", {}).get("type") != "BPE" or not tok.byte_level:
        raise CheckpointError("only byte-level BPE tokenizers can be written to GGUF")
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {vocab_size} rows")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        t = tok.backend.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TT.UNUSED)
        else:
            tokens.append(t)
            types.append(_TT.NORMAL if i not in added else
                         _TT.CONTROL if added[i]["special"] or _looks_special(t) else _TT.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_tokenizer_pre(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(bool(tok.config.get("add_bos_token", True)))
    w.add_add_sep_token(bool(tok.config.get("add_sep_token", False)))
    w.add_add_eos_token(bool(tok.config.get("add_eos_token", False)))
    if isinstance(tok.config.get("chat_template"), str):
        w.add_chat_template(tok.config["chat_template"])


def _hf_name(g: str, cfg: ModelConfig) -> str:
    """The Hugging Face tensor a GGUF tensor is converted from. The converter writes in the order of these names
    (gguf-py's SafetensorsLocal sorts a file's tensors by name), so writing in it makes the same bytes as the
    converter run on a single-file folder."""
    m = re.match(r"^blk\.(\d+)\.nextn\.(embed_tokens|shared_head_head)\.weight$", g)
    if m:
        return f"model.layers.{m.group(1)}." + ("embed_tokens.weight" if m.group(2) == "embed_tokens"
                                                 else "shared_head.head.weight")
    m = re.match(r"^blk\.\d+\.", g)
    return internal_to_hf(_internal(g, cfg, m.group(0) if m else ""), cfg)


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: str | os.PathLike, out_type: str = "f32",
               source: Optional[str | os.PathLike] = None) -> Path:
    """Write `model` and `tokenizer` as the GGUF file llama.cpp's converter writes for the same Hugging Face folder
    with --outtype out_type (f32 | bf16 | q8_0): same architecture, keys, tensor names, shapes and types. A V2 / V3
    model is `deepseek2` without its MTP block (as the converter drops it); V3.2 is `deepseek32` with it.
    source: the model folder it came from, whose name (and model card, if any) give the general.* keys through
    gguf-py's Metadata as in the converter; without it general.name is the file's stem. The tensors are held in
    memory until the file is written."""
    if out_type not in WRITE_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(WRITE_TYPES)}, got {out_type!r}")
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError("a model quantized by nanoseek.quant cannot be written to GGUF: export the float "
                              "checkpoint")
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    want, ftype = WRITE_TYPES[out_type]
    path = Path(path)
    w = gguf.GGUFWriter(path, arch)
    # sorted by source name, stably: k_b before v_b, and down, gate, up for the experts, as the converter
    for gname, t in sorted(gguf_tensors(model), key=lambda item: _hf_name(item[0], cfg)):
        if arch == "deepseek2" and gname.startswith(f"blk.{cfg.num_hidden_layers}."):
            continue  # the converter's skip_mtp for deepseek2
        data = t.detach().to("cpu", torch.float32).contiguous().numpy()
        qtype = _write_type(gname, data.ndim, want)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a multiple of the block: the converter's fallback
            qtype = T.F16
            packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(gname, packed, raw_dtype=qtype)
    mtp = cfg.num_nextn_predict_layers if arch == "deepseek32" else 0
    counts = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, Path(source) if source is not None else None, None, counts[0])
    meta.name = meta.name or (Path(source).name if source is not None else path.stem)
    meta.size_label = meta.size_label or gguf.size_label(*counts)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.add_block_count(cfg.num_hidden_layers + mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA as MQA over the latent
    if cfg.rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(cfg.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.beta_slow)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_file_type(ftype)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if cfg.rope_type == "yarn":
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.mscale_all_dim)  # the converter's legacy deepseek2 form
    if arch == "deepseek32":
        w.add_nextn_predict_layers(cfg.num_nextn_predict_layers)
        w.add_indexer_head_count(cfg.index_n_heads)
        w.add_indexer_key_length(cfg.index_head_dim)
        w.add_indexer_top_k(cfg.index_topk)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer, cfg.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- command line: nanoseek export-gguf -------------------------------------------------------------------
def cli(cmd: str, argv: list[str]) -> int:
    """nanoseek export-gguf IN OUT.gguf --type f32|bf16|q8_0."""
    import argparse
    from nanoseek.checkpoint import from_pretrained
    from nanoseek.cli import error
    from nanoseek.tokenizer import load_tokenizer
    ap = argparse.ArgumentParser(prog="nanoseek export-gguf",
                                 description="write a model as llama.cpp's converter would (deepseek2 / deepseek32 "
                                             "GGUF), tokenizer included")
    ap.add_argument("src", help="model folder (config.json, safetensors, tokenizer.json) or a .gguf file")
    ap.add_argument("dst", help="output .gguf file")
    ap.add_argument("--type", default="bf16", choices=list(WRITE_TYPES),
                    help="type of the matrices (norms, biases and the router stay f32)")
    a = ap.parse_args(argv)
    try:
        model = from_pretrained(a.src, dtype="float32")
        tok = load_tokenizer(a.src)
        out = write_gguf(model, tok, a.dst, a.type, source=None if Path(a.src).is_file() else Path(a.src).resolve())
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        return error("nanoseek export-gguf", e, 1)
    print(f"saved {out} ({a.type}, {out.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0
