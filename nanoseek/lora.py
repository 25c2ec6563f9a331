"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the decoder's attention
projections, dense and shared-expert MLPs and the fused routed experts, saved in PEFT's format.

A target W (out x in) becomes W + s B A with A (r x in), B (out x r), s = alpha / r (alpha / sqrt(r) with rsLoRA);
A starts like nn.Linear's weight (PEFT's default), B at zero, so an adapted model starts as its base. The base is
frozen; the adapters are fp32 whatever the base dtype (PEFT does the same), and they live in the decoder layers only
(transformers' DeepseekV3 model has no MTP modules to carry them).

- `LoraLinear` (a class swap of nn.Linear: the base weight keeps its name) adds s B(A(dropout(x))) to the output,
  PEFT's lora.Linear;
- `LoraExperts` (a class swap of `Experts`) gives each routed expert its own A and B and returns W + s B_e A_e from
  `Experts.weights()`, the seam every expert path computes with: the per-expert delta weights, PEFT's ParamWrapper;
- `TokenRows` (class swaps of the embedding and the head) trains a copy of some tokens' rows that replaces them in
  the forward, PEFT's TrainableTokens (`trainable_token_indices`): how an adapter carries the rows of tokens that
  `nanoseek adapt` adds to the vocabulary. The base the adapter applies to must have those rows: PEFT users call
  `model.resize_token_embeddings(len(tokenizer))` with the adapter's tokenizer first, `load_adapter` grows ours.

Unmerged, the adapters act through those forwards. Code that reads a target's `.weight` directly does not see
them: the fast paths (`nanoseek.kernels`), which `apply_lora` therefore takes off the model, and MLA's absorbed
decode over a latent cache (kv_b_proj's weight). Generation (`serve --lora`, `lora merge`) merges first.

PEFT's format (`save_adapter`, `load_adapter`): adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<transformers module>.lora_{A,B}.weight`. How PEFT >= 0.17 adapts transformers 5's DeepseekV3:
- attention projections through `target_modules` (lora.Linear);
- the dense and shared MLPs' gate/up/down through `target_parameters` ("gate_proj.weight", ...): PEFT >= 0.21 on
  transformers 5 rewrites the `target_modules` names gate_proj/up_proj/down_proj of DeepSeek models into the
  routed experts' fused parameters (its v4 -> v5 MoE conversion), so listed there they would miss the MLPs;
- the routed experts through `target_parameters` "experts.gate_up_proj" ([E, 2I, D]) and "experts.down_proj"
  ([E, D, I]). PEFT wraps gate_up_proj first, so its factors sit under `experts.base_layer.` and down_proj's under
  `experts.`; A is [E r, in] (expert e's rows e r .. e r + r), B is [out, r E] with expert e's column k at k E + e.
Trainable token rows are saved whole (fp32) under `<module>.token_adapter.trainable_tokens_delta` [n, D].
PEFT cannot apply dropout to adapted parameters (x cannot be factored out of the delta weight), so
`lora_dropout` > 0 is refused unless only attention projections are targeted.

    nanoseek lora merge --base MODEL --adapter DIR --out DIR      (a plain checkpoint: W + s B A)

Legend: E routed experts, D model width, I expert width, r rank.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import kernels
from nanoseek.checkpoint import internal_to_hf
from nanoseek.model.moe import Experts
from nanoseek.model.transformer import Transformer

ATTENTION = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")  # dense layers and shared experts
TARGETS = ATTENTION + MLP + ("experts",)  # "experts": the routed experts' gate_up_proj and down_proj
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    rslora: bool = False
    token_rows: tuple[int, ...] = ()  # ids whose embedding and head rows train too (new vocabulary)

    def __post_init__(self):
        object.__setattr__(self, "token_rows", tuple(sorted(set(int(i) for i in self.token_rows))))
        # one order whatever the order given (TARGETS', unknown names last for `validate` to name)
        known = [t for t in TARGETS if t in self.targets]
        object.__setattr__(self, "targets", tuple(known + sorted(set(self.targets) - set(TARGETS))))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {unknown or '(none)'}: choose from {', '.join(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if any(i < 0 for i in self.token_rows):
            raise ValueError("LoRA token rows must be token ids (>= 0)")
        if self.dropout and not set(self.targets) <= set(ATTENTION):
            raise ValueError("LoRA dropout works on the attention projections only: PEFT adapts the MLPs and "
                             "experts as parameters, where it cannot apply dropout")


class LoraLinear(nn.Linear):
    """nn.Linear + s B(A(dropout(x))), A = lora_A.weight [r, in], B = lora_B.weight [out, r]."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    scale: float

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, scale: float, dropout: float) -> None:
        dev = linear.weight.device
        linear.__class__ = cls
        linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.zeros_(linear.lora_B.weight)
        linear.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        linear.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (h * self.scale).to(y.dtype)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"weight": (self.lora_A.weight, self.lora_B.weight)}

    def unwrap(self) -> None:
        del self.lora_A, self.lora_B, self.lora_dropout, self.scale
        self.__class__ = nn.Linear


class LoraExperts(Experts):
    """Routed experts with per-expert factors: gate_up A [E, r, D], B [E, 2I, r]; down A [E, r, I], B [E, D, r]."""

    scale: float

    @classmethod
    def wrap(cls, experts: Experts, rank: int, scale: float) -> None:
        experts.__class__ = cls
        for name in ("gate_up", "down"):
            w = getattr(experts, f"{name}_proj")
            E, out, inp = w.shape
            # A like the rows of PEFT's nn.Linear(in, r E): kaiming-uniform with a = sqrt(5), bound 1 / sqrt(in)
            a = torch.empty(E, rank, inp, device=w.device, dtype=torch.float32).uniform_(-1, 1) / math.sqrt(inp)
            setattr(experts, f"{name}_lora_A", nn.Parameter(a))
            setattr(experts, f"{name}_lora_B", nn.Parameter(w.new_zeros(E, out, rank, dtype=torch.float32)))
        experts.scale = scale

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up, down = super().weights()
        return gate_up + self._delta("gate_up", gate_up.dtype), down + self._delta("down", down.dtype)

    def _delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        A, B = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
        return (torch.bmm(B, A) * self.scale).to(dtype)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {f"{n}_proj": (getattr(self, f"{n}_lora_A"), getattr(self, f"{n}_lora_B")) for n in ("gate_up", "down")}

    def unwrap(self) -> None:
        for n in ("gate_up", "down"):
            delattr(self, f"{n}_lora_A")
            delattr(self, f"{n}_lora_B")
        del self.scale
        self.__class__ = Experts


class TokenRows:
    """Mixin of the class swaps below: `token_rows` [n, D] fp32 (trained) replace rows `token_ids` of the weight."""

    weight: nn.Parameter
    token_ids: torch.Tensor
    token_rows: nn.Parameter

    @classmethod
    def wrap(cls, mod: nn.Module, ids: tuple[int, ...]) -> None:
        if ids[-1] >= mod.weight.shape[0]:
            raise ValueError(f"LoRA token row {ids[-1]} is past the model's {mod.weight.shape[0]} vocabulary rows")
        mod.__class__ = cls
        mod.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=mod.weight.device),
                            persistent=False)
        mod.token_rows = nn.Parameter(mod.weight.detach()[mod.token_ids].float().clone())

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.token_ids, self.token_rows.to(self.weight.dtype))

    def merge(self) -> None:
        with torch.no_grad():
            self.weight.index_copy_(0, self.token_ids, self.token_rows.to(self.weight.dtype))

    def unwrap(self) -> None:
        del self.token_rows, self.token_ids
        self.__class__ = self.plain


class TokenRowsEmbedding(TokenRows, nn.Embedding):
    plain = nn.Embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.merged_weight())


class TokenRowsLinear(TokenRows, nn.Linear):
    plain = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)


def _token_modules(model: Transformer) -> dict[str, TokenRows]:
    """PEFT's module name -> our module, for the token-row modules the model has."""
    return {n: m for n, m in (("embed_tokens", model.embed_tokens), ("lm_head", model.lm_head))
            if isinstance(m, TokenRows)}


def _token_key(name: str) -> str:
    return PREFIX + ("model." if name == "embed_tokens" else "") + name + ".token_adapter.trainable_tokens_delta"


def lora_modules(model: nn.Module) -> dict[str, LoraLinear | LoraExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))}


def apply_lora(model: Transformer, rank: int, alpha: float, targets=TARGETS, dropout: float = 0.0,
               rslora: bool = False, token_rows=()) -> Transformer:
    """Put fresh adapters on the targeted modules of the decoder layers (and trainable copies of the `token_rows`
    rows on the embedding and the head), in place; everything else is frozen."""
    cfg = LoraConfig(rank, float(alpha), tuple(targets), dropout, rslora, tuple(token_rows))
    cfg.validate()
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (merge_lora them first)")
    if kernels.installed(model):
        kernels.uninstall(model)  # the fast paths read the weights directly, past the adapters
    model.requires_grad_(False)
    for name, m in model.layers.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(m) is nn.Linear and leaf in cfg.targets:
            LoraLinear.wrap(m, rank, cfg.scale, dropout)
        elif isinstance(m, Experts) and "experts" in cfg.targets:
            if type(m) is not Experts:
                raise ValueError(f"LoRA on {type(m).__name__} (e.g. expert parallelism) is not supported")
            LoraExperts.wrap(m, rank, cfg.scale)
    if not lora_modules(model):
        raise ValueError(f"no module of this model matches the LoRA targets {', '.join(cfg.targets)}")
    if cfg.token_rows:
        if model.lm_head.weight is model.embed_tokens.weight:
            raise ValueError("LoRA token rows on a model with a tied embedding and head are not supported")
        TokenRowsEmbedding.wrap(model.embed_tokens, cfg.token_rows)
        TokenRowsLinear.wrap(model.lm_head, cfg.token_rows)
    model.lora_config = cfg
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (W += s B A, computed in fp32) and restore the plain modules."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            for pname, (A, B) in m.factors().items():
                w = getattr(m, pname)
                delta = B @ A if A.dim() == 2 else torch.bmm(B, A)
                w.copy_((w.float() + delta * m.scale).to(w.dtype))
            m.unwrap()
        for m in _token_modules(model).values():
            m.merge()
            m.unwrap()
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---- PEFT's names and layouts --------------------------------------------------------------------------------
def _peft_tensors(name: str, m: LoraLinear | LoraExperts, model_cfg) -> dict[str, tuple[torch.Tensor, str]]:
    """PEFT key -> (our tensor, its layout: 'plain' | 'expert_A' | 'expert_B') for one adapted module."""
    base = PREFIX + internal_to_hf(name, model_cfg)
    if isinstance(m, LoraLinear):
        return {f"{base}.lora_A.weight": (m.lora_A.weight, "plain"), f"{base}.lora_B.weight": (m.lora_B.weight, "plain")}
    out = {}
    for pname, (A, B) in m.factors().items():
        at = f"{base}.base_layer" if pname == "gate_up_proj" else base  # gate_up_proj is PEFT's inner wrapper
        out[f"{at}.lora_A.weight"] = (A, "expert_A")
        out[f"{at}.lora_B.weight"] = (B, "expert_B")
    return out


def _to_peft(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "expert_A":  # [E, r, in] -> [E r, in]
        return t.reshape(-1, t.shape[-1])
    if layout == "expert_B":  # [E, out, r] -> [out, r E], column k E + e
        return t.permute(1, 2, 0).reshape(t.shape[1], -1)
    return t


def _from_peft(t: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    E, a, b = like.shape if like.dim() == 3 else (1, *like.shape)
    if layout == "expert_A":
        return t.reshape(E, a, b)
    if layout == "expert_B":  # [out, r E] -> [E, out, r]
        return t.reshape(a, b, E).permute(2, 0, 1)
    return t


def _adapter_tensors(model: Transformer) -> dict[str, tuple[torch.Tensor, str]]:
    out = {k: v for name, m in lora_modules(model).items() for k, v in _peft_tensors(name, m, model.config).items()}
    out.update({_token_key(name): (m.token_rows, "plain") for name, m in _token_modules(model).items()})
    return out


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters' factors (and token rows) under PEFT's keys and layouts (fp32, detached)."""
    return {k: _to_peft(t.detach(), layout).float().contiguous() for k, (t, layout) in _adapter_tensors(model).items()}


def load_adapter_state(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Copy `adapter_state_dict`-keyed factors into the model's adapters; every key must match both ways."""
    expected = _adapter_tensors(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, (t, layout) in expected.items():
            src = state[key]
            if src.numel() != t.numel() or _from_peft(src, layout, t).shape != t.shape:
                raise ValueError(f"adapter tensor {key}: {tuple(src.shape)} does not fit this model")
            t.copy_(_from_peft(src, layout, t))


def peft_config(cfg: LoraConfig, base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json for `cfg` (the fields PEFT's LoraConfig reads; the rest keep its defaults)."""
    modules = [t for t in ATTENTION if t in cfg.targets]
    params = [f"{t}.weight" for t in MLP if t in cfg.targets]
    params += list(EXPERT_PARAMETERS) if "experts" in cfg.targets else []
    rows = list(cfg.token_rows)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
            "target_modules": modules, "target_parameters": params or None, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "trainable_token_indices": {"embed_tokens": rows, "lm_head": rows} if rows else None}


def config_from_peft(js: dict) -> LoraConfig:
    """The inverse of `peft_config`; raises ValueError on what nanoseek cannot reproduce."""
    if js.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter (peft_type {js.get('peft_type')!r})")
    for k in ("rank_pattern", "alpha_pattern"):
        if js.get(k):
            raise ValueError(f"adapter_config.json: {k} is not supported")
    if js.get("use_dora") or js.get("bias", "none") != "none" or js.get("modules_to_save"):
        raise ValueError("adapter_config.json: DoRA, LoRA biases and modules_to_save are not supported")
    modules = js.get("target_modules") or []
    if isinstance(modules, str):
        raise ValueError("adapter_config.json: a regex target_modules is not supported (list the module names)")
    params = list(js.get("target_parameters") or [])
    targets = list(modules)
    experts = [p for p in params if p in EXPERT_PARAMETERS]
    if experts and len(experts) != len(EXPERT_PARAMETERS):
        raise ValueError(f"adapter_config.json: adapt both {' and '.join(EXPERT_PARAMETERS)} or neither")
    targets += ["experts"] if experts else []
    for p in params:
        if p not in EXPERT_PARAMETERS:
            leaf = p.removesuffix(".weight")
            if leaf == p or leaf not in MLP:
                raise ValueError(f"adapter_config.json: target parameter {p!r} is not supported")
            targets.append(leaf)
    rows = js.get("trainable_token_indices") or {}
    if rows and (not isinstance(rows, dict) or set(rows) != {"embed_tokens", "lm_head"}
                 or sorted(rows["embed_tokens"]) != sorted(rows["lm_head"])):
        raise ValueError("adapter_config.json: trainable_token_indices must give the same ids for embed_tokens and "
                         "lm_head (the form nanoseek writes)")
    cfg = LoraConfig(int(js["r"]), float(js["lora_alpha"]), tuple(targets), float(js.get("lora_dropout") or 0.0),
                     bool(js.get("use_rslora")), tuple(rows.get("embed_tokens", ())))
    cfg.validate()
    return cfg


def save_adapter(model: Transformer, path: str | os.PathLike, base_model_name_or_path: Optional[str] = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, str(path / WEIGHTS_FILE),
              metadata={"format": "pt"})
    js = peft_config(model.lora_config, base_model_name_or_path)
    (path / CONFIG_FILE).write_text(json.dumps(js, indent=2) + "\n")


def load_adapter(model: Transformer, path: str | os.PathLike) -> Transformer:
    """Put the adapter saved at `path` (PEFT's format) onto `model`, in place, unmerged."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path}: not a LoRA adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = config_from_peft(json.loads((path / CONFIG_FILE).read_text()))
    if cfg.token_rows:  # rows of tokens the base lacks (its vocabulary extended): as many as the adapter's tokenizer
        from nanoseek.vocab import resize_rows
        rows = cfg.token_rows[-1] + 1
        if (path / "tokenizer.json").is_file():
            from nanoseek.tokenizer import load_tokenizer
            rows = max(rows, load_tokenizer(path).vocab_size)
        resize_rows(model, rows)
    apply_lora(model, **asdict(cfg))
    load_adapter_state(model, load_file(str(path / WEIGHTS_FILE)))
    return model


# ---- nanoseek lora merge ---------------------------------------------------------------------------------------
def cli(cmd: str, argv: list[str]) -> int:
    from nanoseek.checkpoint import CheckpointError, from_pretrained, save_pretrained
    ap = argparse.ArgumentParser(prog="nanoseek lora", description="LoRA adapters (PEFT format)")
    sub = ap.add_subparsers(dest="action", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base and save a plain checkpoint")
    m.add_argument("--base", required=True, help="the base model folder the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="where to write the merged model")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="saved dtype (default: the base's)")
    a = ap.parse_args(argv)
    try:
        model = from_pretrained(a.base)
        dtype = model.embed_tokens.weight.dtype
        model = merge_lora(load_adapter(model.float(), a.adapter))
    except (CheckpointError, ValueError) as e:
        print(f"nanoseek lora merge: error: {e}", file=sys.stderr)
        return 1
    save_pretrained(model, a.out, dtype=getattr(torch, a.dtype) if a.dtype else dtype)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the adapter's tokenizer if it has one, else the base's
        src = next((Path(d) / f for d in (a.adapter, a.base) if (Path(d) / f).is_file()), None)
        if src is not None:
            (Path(a.out) / f).write_bytes(src.read_bytes())
    print(f"merged {a.adapter} into {a.base}: {a.out}")
    return 0
