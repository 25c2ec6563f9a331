"""ModelConfig: every architectural field of DeepSeek V2 / V3 / V3.2, named presets, HF config.json conversion.

Field names follow Hugging Face's `config.json` for the three model types (`deepseek_v2`, `deepseek_v3`,
`deepseek_v32`) so that a reader of a real checkpoint finds the same words here. Numbers for the real presets
come from DeepSeek's released configs (see shared reference, "Config values").
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


# what each field must hold: int+ a positive integer, int0 a non-negative one, int+? positive or None (q_lora_rank),
# float+ / float0 a positive / non-negative finite number (ints accepted, as JSON writes 1.0 as 1 sometimes)
_FIELD_KINDS = {
    "model_type": "str", "vocab_size": "int+", "hidden_size": "int+", "intermediate_size": "int+",
    "moe_intermediate_size": "int+", "num_hidden_layers": "int+", "first_k_dense_replace": "int0",
    "moe_layer_freq": "int+", "num_attention_heads": "int+", "q_lora_rank": "int+?", "kv_lora_rank": "int+",
    "qk_nope_head_dim": "int+", "qk_rope_head_dim": "int+", "v_head_dim": "int+", "n_routed_experts": "int0",
    "n_shared_experts": "int0", "num_experts_per_tok": "int0", "n_group": "int+", "topk_group": "int0",
    "scoring_func": "str", "topk_method": "str", "norm_topk_prob": "bool", "routed_scaling_factor": "float0",
    "rope_theta": "float+", "rope_type": "str", "rope_factor": "float+", "original_max_position_embeddings": "int+",
    "beta_fast": "float0", "beta_slow": "float0", "mscale": "float0", "mscale_all_dim": "float0",
    "max_position_embeddings": "int+", "index_n_heads": "int0", "index_head_dim": "int+", "index_topk": "int0",
    "num_nextn_predict_layers": "int0", "rms_norm_eps": "float+", "tie_word_embeddings": "bool",
    "initializer_range": "float0", "bos_token_id": "int0", "eos_token_id": "int0",
}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed / shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1  # layer i >= first_k_dense_replace is MoE when i % moe_layer_freq == 0
    num_attention_heads: int = 128
    # MLA (V2 §2.1): q-LoRA is optional (None = plain q_proj, as in V2-Lite)
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (V2 §2.2, V3 §2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # RoPE + YaRN (rope_type "default" disables YaRN)
    rope_theta: float = 10000.0
    rope_type: str = "yarn"
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    # DSA lightning indexer (V3.2 §2.1); index_topk = 0 turns DSA off
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 0
    # MTP (V3 §2.2)
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def use_dsa(self) -> bool:
        return self.index_topk > 0 and self.index_n_heads > 0

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    def softmax_scale(self) -> float:
        """(qk_nope+qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 when YaRN is on (as HF always does)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid ModelConfig: {msg}")
        # types and ranges first, field by field: a config.json value of the wrong kind ("64", -64, true) is named
        # here rather than surfacing later as a tensor-allocation error; bools are never integers
        for name, kind in _FIELD_KINDS.items():
            v = getattr(self, name)
            if kind == "bool":
                need(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
            elif kind == "str":
                need(isinstance(v, str), f"{name} must be a string, got {v!r}")
            elif kind in ("float+", "float0"):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                need(ok and (v > 0 if kind == "float+" else v >= 0),
                     f"{name} must be a {'positive' if kind == 'float+' else 'non-negative'} number, got {v!r}")
            elif not (kind == "int+?" and v is None):
                ok = isinstance(v, int) and not isinstance(v, bool)
                need(ok and (v >= 0 if kind == "int0" else v > 0),
                     f"{name} must be a {'non-negative' if kind == 'int0' else 'positive'} integer, got {v!r}")
        need(self.model_type in MODEL_TYPES, f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        need(self.scoring_func in SCORING_FUNCS, f"scoring_func {self.scoring_func!r} not in {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, f"topk_method {self.topk_method!r} not in {TOPK_METHODS}")
        need(self.rope_type in ("default", "yarn"), f"rope_type {self.rope_type!r} must be 'default' or 'yarn'")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        if self.n_routed_experts:
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts must be divisible by n_group")
            need(self.topk_group <= self.n_group, "topk_group must be <= n_group")
            need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok > n_routed_experts")
            if self.topk_method == "noaux_tc":
                need(self.scoring_func == "sigmoid", "noaux_tc routing needs scoring_func='sigmoid'")
                per_group = self.n_routed_experts // self.n_group
                need(per_group >= 2, "noaux_tc scores groups by their top-2 experts: need >= 2 experts per group")
        if self.use_dsa:
            need(self.q_lora_rank is not None, "DSA's indexer reads the q latent: q_lora_rank is required")
            need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim must be >= qk_rope_head_dim")

    # ---- parameter arithmetic ---------------------------------------------------------------------------
    def _attn_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        o = h * self.v_head_dim * d
        idx = 0
        if self.use_dsa:
            idx = (self.q_lora_rank * self.index_n_heads * self.index_head_dim + d * self.index_head_dim
                   + 2 * self.index_head_dim + d * self.index_n_heads)
        return q + kv + o + idx

    def _layer_params(self, moe: bool) -> tuple[int, int]:
        """(total, activated) parameters of a MoE or dense decoder layer, norms included."""
        d = self.hidden_size
        attn = self._attn_params() + 2 * d
        if not moe:
            ffn = 3 * d * self.intermediate_size
            return attn + ffn, attn + ffn
        expert = 3 * d * self.moe_intermediate_size
        router = self.n_routed_experts * d
        shared = self.n_shared_experts * expert
        total = attn + router + shared + self.n_routed_experts * expert
        active = attn + router + shared + self.num_experts_per_tok * expert
        return total, active

    def num_params(self, include_mtp: bool = False) -> dict[str, int]:
        """Total parameters and parameters activated per token (embedding and head included).

        MTP modules are excluded by default, as DeepSeek's 671B/37B figures exclude them.
        """
        d, v = self.hidden_size, self.vocab_size
        emb = v * d
        head = 0 if self.tie_word_embeddings else v * d
        total = active = emb + head + d
        # a closed form over the two layer kinds, not a loop over layers: the loader checks a config.json that
        # claims 10^6 layers against the bytes on disk with this before building anything
        L, first, freq = self.num_hidden_layers, self.first_k_dense_replace, self.moe_layer_freq
        # MoE layers: the multiples of freq in [first, L)
        n_moe = max(0, (L - 1) // freq - (first - 1) // freq) if self.n_routed_experts else 0
        for moe, count in ((True, n_moe), (False, L - n_moe)):
            t, a = self._layer_params(moe)
            total += t * count
            active += a * count
        if include_mtp:
            t, a = self._layer_params(self.is_moe_layer(self.num_hidden_layers))  # a MoE block in V3
            extra = 2 * d * d + 3 * d
            total += (t + extra) * self.num_nextn_predict_layers
            active += (a + extra) * self.num_nextn_predict_layers
        return {"total": total, "active": active}

    def kv_cache_values_per_token(self) -> int:
        """Values cached per token per layer: the KV latent + rotated k_pe (+ the indexer key with DSA)."""
        return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.use_dsa else 0)

    # ---- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json dict for this model type (transformers, vLLM and SGLang read it)."""
        arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                "deepseek_v32": "DeepseekV32ForCausalLM"}[self.model_type]
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": self.moe_layer_freq,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "scoring_func": self.scoring_func,
            "topk_method": self.topk_method,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "attention_bias": False,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "torch_dtype": "bfloat16",
        }
        if self.rope_type == "yarn":
            cfg["rope_scaling"] = {
                "type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            }
        if self.model_type == "deepseek_v3":
            cfg["rope_interleave"] = True
        if self.model_type == "deepseek_v32":
            cfg.update(index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                       index_topk=self.index_topk)
        return cfg

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; accepts old (`rope_scaling`) and new (`rope_parameters`)."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold a JSON object, not a {type(hf).__name__}")
        mt = hf.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r} in config.json; nanoseek reads {', '.join(MODEL_TYPES)}")
        kw: dict[str, Any] = {"model_type": mt}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in hf.items():
            if k in names and k not in ("model_type", "rope_type", "rope_theta"):
                kw[k] = v
        if kw.get("q_lora_rank") == 0:
            kw["q_lora_rank"] = None
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        for k in ("bos_token_id", "eos_token_id"):
            if kw.get(k) is None:
                kw.pop(k, None)
        # V2 defaults differ from the V3 field defaults: fill what old V2 configs leave out
        if mt == "deepseek_v2":
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("n_group", hf.get("n_group") or 1)
            kw.setdefault("topk_group", hf.get("topk_group") or 1)
            kw.setdefault("routed_scaling_factor", 1.0)
            kw.setdefault("num_nextn_predict_layers", 0)
        kw.setdefault("num_nextn_predict_layers", 0)
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw[k] = 1
        if mt != "deepseek_v32":
            kw["index_topk"] = 0
            kw["index_n_heads"] = 0
        key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope = hf.get(key) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{key} must be an object (or null), got {rope!r}")
        kw["rope_theta"] = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type") or rope.get("type") or "default"
        if rtype not in ("default", "yarn"):
            raise ValueError(f"unsupported rope scaling type {rtype!r}; nanoseek implements 'default' and 'yarn'")
        kw["rope_type"] = rtype
        if rtype == "yarn":
            if rope.get("factor") is None:
                raise ValueError(f"{key}: yarn needs a 'factor'")
            for name in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                         "mscale_all_dim"):  # named as config.json spells them; validate() checks the ranges
                v = rope.get(name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ValueError(f"{key}.{name} must be a number, got {v!r}")
            # the values go in as written (validate() names a wrong type); null means the default, as in HF
            kw["rope_factor"] = rope["factor"]
            kw["original_max_position_embeddings"] = rope.get("original_max_position_embeddings") or 4096
            kw["beta_fast"] = rope.get("beta_fast") or 32.0
            kw["beta_slow"] = rope.get("beta_slow") or 1.0
            kw["mscale"] = rope.get("mscale") or 0.0
            kw["mscale_all_dim"] = rope.get("mscale_all_dim") or 0.0
        cfg = cls(**kw)
        # JSON writes whole floats as ints at times: store floats so that round trips compare equal
        return cfg.replace(**{f: float(getattr(cfg, f)) for f, k in _FIELD_KINDS.items() if k.startswith("float")})

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            hf = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        try:
            return cls.from_hf(hf)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- presets ----------------------------------------------------------------------------------------------
def _tiny() -> ModelConfig:
    """V3.2-shaped and < 5M parameters: MoE with groups, sigmoid noaux_tc routing, q-LoRA, YaRN, DSA, MTP."""
    return ModelConfig(
        model_type="deepseek_v32", vocab_size=1024, hidden_size=64, intermediate_size=192,
        moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, rope_factor=4.0, original_max_position_embeddings=256,
        max_position_embeddings=1024, index_n_heads=8, index_head_dim=16, index_topk=32,
        num_nextn_predict_layers=1)


def _small() -> ModelConfig:
    """The CPU workhorse: ~100M total, ~25M activated per token (see `nanoseek.config` __main__). Indexer heads of
    64: llama.cpp's deepseek32 graph rotates the indexer's q and k with Hadamard matrices of 64 and up, so a
    narrower head (the 32 this preset had) converts but aborts there."""
    return ModelConfig(
        model_type="deepseek_v32", vocab_size=8192, hidden_size=384, intermediate_size=1152,
        moe_intermediate_size=256, num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=6,
        q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=32, v_head_dim=48,
        n_routed_experts=40, n_shared_experts=1, num_experts_per_tok=6, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_factor=4.0, original_max_position_embeddings=1024,
        max_position_embeddings=4096, index_n_heads=8, index_head_dim=64, index_topk=256,
        num_nextn_predict_layers=1)


def _v2_lite() -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=1, topk_group=1, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, mscale=0.707, mscale_all_dim=0.707, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001)


def _v3() -> ModelConfig:
    return ModelConfig()


def _v32() -> ModelConfig:
    return ModelConfig(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "deepseek-v2-lite": _v2_lite,
    "deepseek-v3": _v3,
    "deepseek-v3.2": _v32,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    try:
        cfg = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg


if __name__ == "__main__":  # python -m nanoseek.config: parameter table of the presets
    for name in PRESETS:
        n = get_preset(name).num_params()
        print(f"{name:18s} total {n['total'] / 1e6:12.1f}M  active {n['active'] / 1e6:10.1f}M")
