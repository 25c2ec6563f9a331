"""Whole-stack decode on the CPU kernels: one C call runs every decoder block of a decode step.

A decode step of a few bf16 rows on CPU runs three fused C calls per decoder block (`cpu_decode.py`): MLA's
projections, absorbed attention with o_proj, and the feed-forward half. Taken block by block
(`Block.forward` -> `MLA.decode_block`, `MoE.fused_block`), each call looks up its derived weights, checks them,
lays out its arguments in Python and writes or reads the cache with PyTorch ops: at `small`'s size that cost as
much as the kernels themselves (about 1.1 ms of a 2.2 ms token). A `DecodePlan` resolves the blocks once into an
array of C structs (weight addresses, shapes, epsilons, router settings);
the structs hold the modules' own weights (MLA's q_a, kv_a and indexer key projections, an MLP's gate and up, as
separate matrices: no concatenated copy; only a bf16 router's fp32 weight is derived);
a step checks one key for the model (the address of every weight it reads, the version of those a copy derives
from, the attention modes, and
a count of parameter, buffer and module assignments anywhere) and makes one call, `ns_decode_stack`, which
runs the blocks' kernels in order, does the cache's writes and reads itself, through the cache's slot view
(`slots()`), and ends with the final norm and the head. Past DSA's top-k the call also runs the lightning indexer
and the selection (`ns_dsa_select`): each query scores the cached index keys and attends to its top-k rows.
RoPE's angles come from the rotary module's table of every position (`RotaryEmbedding.cached`).
A model quantized to int8 or int4 (`nanoseek.quant`) takes the same call: its structs hold the codes, scales
(and int4's mins) of the quantized matrices (projections, o_proj, experts, head), which the kernels read in
registers (cpu_decode.c `mdots`, over cpu_quant.c's dot products: quant_dot.h, quant4.h; int4 on int8 activations
where cpu_quant does it, `cpu_quant.int8_activations`); the per-op quantized path (QuantLinear, QuantExperts,
block by block) stays the reference (tests/test_quant_decode.py).

Same kernels, same arguments: within top-k the result is bit-identical to the block-by-block path (where that
path runs on the kernels too: calls of at most MAX_ROWS rows), which stays the reference (tests/test_cpu_decode.py
compares them); past it the two select alike up to ties at the k-th score and bf16 ulps of the scores. The
blocks run one by one wherever the plan does not apply: training, grad mode, more than ABSORB_MAX_QUERIES new
tokens per request or MAX_PLAN_ROWS rows, the indexer's loss, a DSA layer without q-LoRA, or a cache without a
slot view.

An 8-bit cache (`--kv-cache-dtype fp8|int8`, `kv_quant.py`) goes through the plan too: the call gets its value
planes and scales and the format, quantizes the new rows as `KVFormat.quantize` (same bytes, same scales) and
dequantizes each value it reads as `KVFormat.dequantize` (the model's dtype of value * scale) inside attention's
dot products and the indexer's, without a dequantized copy. Against the block-by-block path over the same cache
(PyTorch's dequantized rows into the same kernels) it differs by the order of fp32 sums only.

Legend: B requests, T new tokens each, M = B*T rows, S visible cache rows, D model width, H heads, L blocks.
"""
from __future__ import annotations

import ctypes
import weakref
from typing import Optional

import torch

from nanoseek.kernels import cpu_decode, cpu_quant
from nanoseek.kernels.cpu_decode import kernel_weights
from nanoseek.model.kv_quant import GROUP
from nanoseek.model.mla import ABSORB_MAX_QUERIES
from nanoseek.model.moe import MoE
from nanoseek.quant import QuantExperts, QuantLinear

_PLANS: "weakref.WeakKeyDictionary[torch.nn.Module, DecodePlan]" = weakref.WeakKeyDictionary()
# Rows (requests x new tokens, each at most ABSORB_MAX_QUERIES) of one call: a decode batch, or a group of short
# prompts (engine.py `_prefill_groups`). The kernels compute every row on its own, so the bound only caps the
# scratch (a few MB at `small`'s size); past it the blocks run one by one.
MAX_PLAN_ROWS = 256
# the cache's formats as ns_decode_stack takes them (cpu_decode.c NS_KV_*): rows in the model's dtype, fp8, int8
_KV_FORMATS = {None: 0, "fp8": 1, "int8": 2}
MAX_PLAN_SCORES = 1 << 22  # rows x visible cache rows of a call past MAX_ROWS rows (48 MB of DSA selection scratch)

# A plan holds the tensors it was built from. An assignment of a parameter, buffer or submodule anywhere
# (load_state_dict(assign=True), a swapped layer or expert) puts other tensors in the model and bumps this
# counter, so every plan is rebuilt; `.data` swaps (hugepages.place) keep the tensors and show in the key (their
# addresses), and in-place writes need no rebuild but where a copy derives from the weight (its version is keyed).
_assignments = [0]
_data_ptr = torch.Tensor.data_ptr


def _assigned(*_) -> None:
    _assignments[0] += 1


for _register in (torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook,
                  torch.nn.modules.module.register_module_module_registration_hook):
    _register(_assigned)


def run(model, x: torch.Tensor, cache, num_logits: Optional[int]):
    """The decoder blocks, the final norm and the head on x [B, T, D] (embedded tokens of a decode call) through
    the plan of `model` (a Transformer), built or rebuilt as needed: (logits [B, T or num_logits, V], normed
    hidden [B, T, D], each MoE block's expert ids [B*T, K]), or None where the plan does not apply (the caller
    runs the blocks)."""
    B, T, _ = x.shape
    if model.training or torch.is_grad_enabled() or T > ABSORB_MAX_QUERIES or B * T > MAX_PLAN_ROWS or \
            not cpu_decode.available(x):
        return None
    if not hasattr(cache, "slots"):
        return None
    if B * T > cpu_decode.MAX_ROWS and B * T * _visible(cache) > MAX_PLAN_SCORES:
        return None  # DSA's selection scratch is [rows, S]: a big group over a long context runs block by block
    plan = _PLANS.get(model)
    if plan is None or plan.dtype is not x.dtype or plan.assignments != _assignments[0] or \
            plan.key != plan.current_key() or plan.layers != [id(b) for b in model.layers] or \
            plan.q8 != cpu_quant.int8_activations():
        plan = DecodePlan.build(model, x.dtype)
        if plan is None:
            return None
        _PLANS[model] = plan
    return plan.run(x, cache, model.rotary, num_logits)


def _visible(cache) -> int:
    """S, the rows a query of this cache's step can see"""
    return cache.num_visible if hasattr(cache, "num_visible") else cache.mask.shape[-1]


class _Block(ctypes.Structure):
    """One decoder block's constant arguments: `ns_block` in cpu_decode.c, field for field."""
    _p, _i, _f, _c = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    _fields_ = [("layer", _i), ("wx", _p), ("q_out", _i), ("R", _i), ("P", _i), ("Di", _i), ("qa_norm", _p),
                ("qa_eps", _f), ("wqb", _p), ("H", _i), ("N", _i), ("kv_norm", _p), ("kv_eps", _f), ("ik_w", _p),
                ("ik_b", _p), ("ik_eps", _f), ("in_norm", _p), ("in_eps", _f), ("Nk", _i), ("kv_b", _p), ("V", _i),
                ("scale", _f), ("w_o", _p), ("Dm", _i), ("post_w", _p), ("post_eps", _f), ("router_w32", _p),
                ("E", _i), ("bias", _p), ("scoring", _c), ("method", _c), ("n_group", _i), ("topk_group", _i),
                ("K", _i), ("norm", _c), ("scaling", _f), ("gate_up", _p), ("down", _p), ("I", _i),
                ("s_gate_up", _p), ("s_down", _p), ("Is", _i), ("Kp", _i),
                ("wx_s", _p), ("ik_wk", _p), ("wqb_s", _p), ("w_o_s", _p), ("gate_up_s", _p), ("down_s", _p),
                ("s_gate_up_s", _p), ("s_down_s", _p), ("wx_m", _p), ("wqb_m", _p), ("w_o_m", _p),
                ("gate_up_m", _p), ("down_m", _p), ("s_gate_up_m", _p), ("s_down_m", _p), ("qg", _i), ("q8", _c),
                ("wkv", _p), ("wkv_s", _p), ("wkv_m", _p), ("s_up", _p), ("s_up_s", _p), ("s_up_m", _p),
                ("iwq", _p), ("iwp", _p), ("Hi", _i), ("topk", _i)]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class DecodePlan:
    """A model's decoder blocks as C structs for `ns_decode_stack`, valid while `key` is current."""

    def __init__(self, dtype: torch.dtype, sources: list[torch.Tensor], derived_from: list[torch.Tensor], modes: list,
                 blocks: list[dict], ks: list[int], keep: list, layers: list[int], final: tuple):
        self.dtype, self.sources, self.derived_from, self.modes = dtype, sources, derived_from, modes
        self.final = final  # (final norm's weight address, its eps, the head's weight and scales (int8) addresses,
        # vocabulary size)
        self.assignments = _assignments[0]
        self.q8 = cpu_quant.int8_activations()  # what the int4 matrices' products were planned on
        self.layers = layers  # ids of the blocks it was built from: a model can swap or add blocks
        self.key = self.current_key()
        self.structs = (_Block * len(blocks))(*(_Block(**b) for b in blocks))
        self.structs_addr = ctypes.addressof(self.structs)
        self.ks = ks  # per block, its experts per token (0: a dense block)
        self.keep = keep  # the derived weights whose addresses the structs hold (the routers' fp32 copies)
        # scratch widths, the largest over the blocks
        self.C, self.P, self.Di = blocks[0]["R"] + blocks[0]["P"], blocks[0]["P"], blocks[0]["Di"]
        self.Ow = max(b["q_out"] + b["R"] + b["P"] + b["Di"] for b in blocks)
        self.Oq = max(max(b["q_out"], 1) for b in blocks)
        self.Q = max(b["H"] * (b["N"] + b["P"]) for b in blocks)
        self.HV = max(b["H"] * b["V"] for b in blocks)
        self.H, self.R = max(b["H"] for b in blocks), max(b["R"] for b in blocks)
        self.Kp = blocks[0]["Kp"]
        self.KI = max(self.Kp * b.get("I", 0) + b.get("Is", 0) for b in blocks)  # expert rows: routed + shared
        self.E = max(max(b.get("E", 0), 1) for b in blocks)
        self.topks = [b.get("topk", 0) for b in blocks]  # per block, DSA's top-k where the kernel selects
        self.topk = max(self.topks)  # DSA selection scratch (0: no DSA block selects)
        self.HiDi = max(b.get("Hi", 0) * b["Di"] for b in blocks)
        self.Hi = max(b.get("Hi", 0) for b in blocks)

    def current_key(self) -> tuple:
        """What the plan's addresses and branches depend on: every weight's address, the version of those it reads
        through a derived copy (the routers' fp32 weights: a bf16 router's is a cast; the kernels read every other
        weight where it is, so an in-place write needs no rebuild), and the attention modes (set_dsa_stage changes
        them without touching a weight). Checked every step: flat lists are the cheapest to build and compare."""
        return (list(map(_data_ptr, self.sources)), [t._version for t in self.derived_from],
                [(m.dsa_mode, m.indexer_loss_on) for m in self.modes])

    @staticmethod
    def build(model, dtype: torch.dtype) -> Optional["DecodePlan"]:
        sources: list[torch.Tensor] = []
        blocks, ks, keep, modes, derived_from = [], [], [], [], []
        groups: set[int] = set()  # the int4 matrices' group sizes (one per model: ns_block's qg)
        for layer in model.layers:
            attn, ffn, norm, post = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
            if attn.indexer_loss_on:
                return None
            # attention: the arguments MLA._project_fused and cpu_decode.mla_absorbed pass, the projections as the
            # module holds them (float weights, or quant.py's codes, scales and mins)
            got = _attention(attn, norm, groups)
            if got is None:
                return None
            w, src = got
            if not kernel_weights(w["check"], dtype):
                return None
            idx, H, R, P, V = attn.indexer, attn.n_heads, attn.R, attn.P, attn.V
            Di = w["ik_wk"].shape[0] if w["ik_wk"] is not None else 0
            kv_b = w["kv_b"]
            b = dict(layer=attn.layer_id, wx=_ptr(w["wx"]), q_out=w["q_out"], R=R, P=P, Di=Di,
                     qa_norm=_ptr(w["qa_norm"]), qa_eps=w["qa_eps"], wqb=_ptr(w["wqb"]), H=H, N=attn.N,
                     kv_norm=_ptr(w["kv_norm"]), kv_eps=w["kv_eps"], in_norm=_ptr(norm.weight), in_eps=norm.eps,
                     Nk=kv_b.shape[0] // H - V, kv_b=_ptr(kv_b), V=V, scale=attn.scale, w_o=_ptr(w["o"]),
                     Dm=w["o"].shape[0], post_w=_ptr(post.weight), post_eps=post.eps, wx_s=_ptr(w.get("wx_s")),
                     ik_wk=_ptr(w.get("ik_wk")), wqb_s=_ptr(w.get("wqb_s")), w_o_s=_ptr(w.get("o_s")),
                     wx_m=_ptr(w.get("wx_m")), wqb_m=_ptr(w.get("wqb_m")), w_o_m=_ptr(w.get("o_m")),
                     wkv=_ptr(w["wkv"]), wkv_s=_ptr(w.get("wkv_s")), wkv_m=_ptr(w.get("wkv_m")))
            if Di:
                b.update(ik_w=_ptr(idx.k_norm.weight), ik_b=_ptr(idx.k_norm.bias), ik_eps=idx.k_norm.eps)
            if idx is not None and attn.dsa_mode == "sparse":  # the kernel selects past top-k (from c_q)
                if w["qa_norm"] is None or not kernel_weights([idx.wq_b.weight, idx.weights_proj.weight], dtype):
                    return None
                b.update(iwq=_ptr(idx.wq_b.weight), iwp=_ptr(idx.weights_proj.weight), Hi=idx.n_heads,
                         topk=idx.topk)
                src = src + [idx.wq_b.weight, idx.weights_proj.weight]
            sources += src
            modes.append(attn)
            # feed-forward: the arguments MoE.fused_block / MLP.fused_block pass
            if isinstance(ffn, MoE):
                g, ex = ffn.gate, ffn.experts
                if isinstance(ex, QuantExperts):  # codes with their scales (, mins)
                    (gate_up, gs, gm), (down, ds, dm) = ex._weights("gate_up_proj"), ex._weights("down_proj")
                    if not (_readable(gate_up, gs, gm, ex.D, groups) and _readable(down, ds, dm, ex.I, groups)):
                        return None
                    b.update(gate_up_s=_ptr(gs), down_s=_ptr(ds), gate_up_m=_ptr(gm), down_m=_ptr(dm))
                    sources += [t for t in (gs, gm, ds, dm) if t is not None]
                else:
                    gate_up, down = ex.weights()
                    if not kernel_weights([gate_up, down], dtype):
                        return None
                w32 = g.weight_fp32() if hasattr(g, "weight_fp32") else None
                if w32 is None or gate_up.shape[0] != g.E or g.n_group > 256:
                    return None
                E, K, I = g.E, g.K, (ex.I if isinstance(ex, QuantExperts) else down.shape[-1])
                bias = g.e_score_correction_bias
                b.update(router_w32=_ptr(w32), E=E, bias=_ptr(bias), scoring=cpu_decode._SCORING[g.scoring],
                         method=cpu_decode._METHOD[g.method], n_group=g.n_group, topk_group=g.topk_group, K=K,
                         norm=int(g.norm_topk), scaling=g.scaling, gate_up=_ptr(gate_up), down=_ptr(down), I=I)
                sources += [g.weight, gate_up, down] + ([bias] if bias is not None else [])
                keep.append(w32)
                derived_from.append(g.weight)
                ks.append(K)
                s = ffn.shared_experts
            else:
                b.update(n_group=1, topk_group=1, scaling=1.0)
                ks.append(0)
                s = ffn  # the dense MLP runs as the "shared" expert
            if s is not None:  # its gate and up matrices as they are (no stacked copy)
                lins = (s.gate_proj, s.up_proj, s.down_proj)
                if isinstance(s.down_proj, QuantLinear):
                    if not all(_quantized(lin, groups) for lin in lins) or not _same_format(*lins[:2]):
                        return None
                    routed = b.get("gate_up_s")  # the kernel prepares xn once for both gate_ups: one format
                    if routed is not None and (b.get("gate_up_m") is None) != (s.gate_proj.format == "int8"):
                        return None
                elif (any(isinstance(lin, QuantLinear) for lin in lins)
                      or not kernel_weights([lin.weight for lin in lins], dtype)):
                    return None
                (gate, gs, gm), (up, us, um), (dn, ds, dm) = map(_mat, lins)
                b.update(s_gate_up=_ptr(gate), s_gate_up_s=_ptr(gs), s_gate_up_m=_ptr(gm), s_up=_ptr(up),
                         s_up_s=_ptr(us), s_up_m=_ptr(um), s_down=_ptr(dn), s_down_s=_ptr(ds), s_down_m=_ptr(dm),
                         Is=s.down_proj.in_features)
                sources += [t for lin in lins for t in _parts(lin)]
            if not kernel_weights([post.weight], dtype):
                return None
            sources.append(post.weight)
            blocks.append(b)
        # the cache rows and index keys of all blocks go through one buffer each: their widths must agree (they
        # come from the config)
        if not blocks or len({(b["R"] + b["P"], b["Di"]) for b in blocks}) != 1:
            return None
        # int4 matrices: one group size, and the arithmetic of cpu_quant's int4 calls (the per-op path), which this
        # library must offer
        q8 = cpu_quant.int8_activations()
        if len(groups) > 1 or (groups and q8 and not cpu_decode.library(dtype).ns_q8()):
            return None
        for b in blocks:  # expert ids: idx [L, M, K'] with K' the largest K, each block's [M, K] at its start
            b["Kp"] = max(1, *ks)
            b.update(qg=min(groups, default=0), q8=int(q8 and bool(groups)))
        # the final norm and the head (an int8 head: its codes and scales; quant.py keeps an int4 model's head int8)
        norm, head, head_s = model.norm, model.lm_head.weight, None
        if isinstance(model.lm_head, QuantLinear):
            if not _quantized(model.lm_head, groups) or model.lm_head.format != "int8":
                return None
            head_s = model.lm_head.weight_scale
            sources.append(head_s)
        elif not kernel_weights([head], dtype):
            return None
        if not kernel_weights([norm.weight], dtype):
            return None
        sources += [norm.weight, head]
        return DecodePlan(dtype, sources, derived_from, modes, blocks, ks, keep, [id(b) for b in model.layers],
                          (norm.weight.data_ptr(), norm.eps, head.data_ptr(), _ptr(head_s), head.shape[0]))

    def run(self, x: torch.Tensor, cache, rotary, num_logits: Optional[int]):
        B, T, D = x.shape
        M = B * T
        # bool [B, T, S]; a mask by position (s <= the query's position) the kernel builds itself
        mask = None if getattr(cache, "causal_positions", False) else cache.mask.contiguous()
        S = _visible(cache)
        selecting = [k for k in self.topks if 0 < k < S]  # DSA blocks that read only their top-k rows
        (kv_pool, kv_scales), ik, write, read, span0 = cache.slots(len(self.topks) - len(selecting),
                                                                   M * sum(selecting))
        tables, bs = read if isinstance(read, tuple) else (None, 0)  # block tables: the kernel computes the slots
        read = None if tables is not None else read
        ik_pool, ik_scales = ik if ik is not None else (None, None)
        fmt = getattr(cache, "kv_format", None)
        cos, sin = rotary.cached(S)  # fp32 [positions, P/2], every position < S
        pos = cache.positions.contiguous()
        norm_w, norm_eps, head_w, head_s, V = self.final
        nl = T if num_logits is None else min(num_logits, T)
        C, Di, H, Kp, KI, E = self.C, self.Di, self.H, self.Kp, self.KI, self.E
        # the scratch of every kernel of the step, carved once: the blocks run one after another and share it
        # (w: bytes of the model's dtype; 4 and 8: fp32 and int64 buffers; the experts' activations: fp32 for an int8
        # model's routed ones, ns_ffn_block)
        w = x.element_size()
        sel = M * self.topk if S > self.topk > 0 else 0  # DSA-selected rows, when a block selects
        scratch = cpu_decode._scratch(
            max(sel, 1) * 8, M * C * w, M * max(Di, 1) * w, M * D * w, M * self.Ow * w, M * self.Oq * w,
            M * self.Q * w, M * self.HV * w, H * C * w, H * S * 4, H * self.R * 4, H * (S + 1) * w,
            M * D * w, M * KI * 4, M * (Kp + 1) * D * 4, M * 2 * E * 4, M * Kp * 4,
            M * max(self.HiDi, 1) * w, M * max(self.Hi, 1) * 4, (M * S if sel else 1) * 4, (M * S if sel else 1) * 8,
            max(sel, 1), M * self.P * 4, M * D * w, M * D * w, M * D * w)
        cs, h, out, hl = scratch[-4:]  # RoPE's angles, the stream after attention, after each block, head rows
        hn = torch.empty(B, T, D, dtype=x.dtype)  # the result: the normed hidden state ...
        logits = torch.empty(B, nl, V, dtype=x.dtype)  # ... and the logits of the last nl rows of each request
        idx = torch.empty(len(self.ks), M, Kp, dtype=torch.int64)
        rc = cpu_decode.library(x.dtype).ns_decode_stack(
            self.structs_addr, len(self.ks), x.data_ptr(), B, T, D, cos.data_ptr(), sin.data_ptr(),
            pos.data_ptr(), cs, _ptr(mask), S, kv_pool.data_ptr(), _ptr(ik_pool), kv_pool.shape[1],
            write.data_ptr(), _ptr(read), span0, _ptr(tables), tables.shape[1] if tables is not None else 0, bs,
            _KV_FORMATS[fmt.name if fmt is not None else None], GROUP,
            _ptr(kv_scales), _ptr(ik_scales), *scratch[:-4], h, out, idx.data_ptr(), norm_w, norm_eps,
            hn.data_ptr(), head_w, head_s, V, nl, hl, logits.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise MemoryError("ns_decode_stack: no memory for its scratch")
        expert_ids = []  # per MoE block, [M, K]: what `LayerStats.expert_ids` holds
        for K, ids in zip(self.ks, idx.unbind(0)):
            if K:
                expert_ids.append(ids if K == Kp else ids.view(-1)[:M * K].view(M, K))
        return logits, hn, expert_ids


# ---- quantized models (quant.py): the matrices the kernels read as codes, scales and int4's mins (cpu_decode.c
# `ns_mat`) ----
def _readable(codes: torch.Tensor, scale: torch.Tensor, mn: Optional[torch.Tensor], width: int, groups: set) -> bool:
    """Whether the kernels read these codes as they are: int8 [..., K] with bf16 scales, or int4 [..., K/2] with bf16
    scales and mins per group (its group size added to `groups`), contiguous on the CPU."""
    parts = (codes, scale) if mn is None else (codes, scale, mn)
    if not all(t.is_cpu and t.is_contiguous() for t in parts) or scale.dtype is not torch.bfloat16:
        return False
    if mn is None:
        return codes.dtype is torch.int8
    if codes.dtype is not torch.uint8 or mn.dtype is not torch.bfloat16 or mn.shape != scale.shape:
        return False
    groups.add(width // scale.shape[-1])
    return True


def _quantized(lin, groups: set) -> bool:
    """Whether `lin` is a QuantLinear (int8 or int4) that the kernels read as it is."""
    return isinstance(lin, QuantLinear) and _readable(*lin._weights("weight"), lin.in_features, groups)


def _parts(lin) -> list[torch.Tensor]:
    """the tensors of `_mat(lin)`: weight, or codes, scale (, min)"""
    return [t for t in _mat(lin) if t is not None]


def _same_format(a: QuantLinear, b: QuantLinear) -> bool:
    """Whether a and b (of one input width) stack by rows: one format, one group size"""
    return a.format == b.format and (a.format == "int8" or a.weight_scale.shape[-1] == b.weight_scale.shape[-1])


def _mat(lin) -> tuple:
    """A projection's matrix as the kernels read it: (weight, None, None) for a float Linear, (codes, scale, min or
    None) for a QuantLinear"""
    return lin._weights("weight") if isinstance(lin, QuantLinear) else (lin.weight, None, None)


def _attention(attn, norm, groups: set) -> Optional[tuple[dict, list]]:
    """An MLA's decode arguments as FastMLA._decode_build's dict, with the projections of x as the module holds them:
    wx the weight (or int8 / int4 codes) of q_a (or q), wkv that of kv_a, ik_wk the indexer key's float weight (no
    concatenated copy: the kernel takes the three), and, where quantized, the scales and int4's mins (wx_s, wx_m,
    wqb_s, ...); and the tensors it reads. None where its projections are neither all float nor all quantized ones
    the kernels read as they are, or its shapes exceed the kernels'."""
    lora, idx = hasattr(attn, "q_a_proj"), attn.indexer
    first, kv_a = (attn.q_a_proj if lora else attn.q_proj), attn.kv_a_proj_with_mqa
    lins = [first, kv_a, attn.o_proj] + ([attn.q_b_proj] if lora else [])
    if isinstance(attn.o_proj, QuantLinear):
        if not all(_quantized(lin, groups) for lin in lins) or not _same_format(first, kv_a):
            return None
    elif any(isinstance(lin, QuantLinear) for lin in lins):
        return None
    if attn.P > 512 or attn.R > cpu_decode.MAX_LATENT or (idx is not None and (idx.head_dim > 1024 or
                                                                                  idx.rope_dim != attn.P)):
        return None
    (wq, qs, qm), (wkv, kvs, kvm), o = _mat(first), _mat(kv_a), _mat(attn.o_proj)
    wqb = _mat(attn.q_b_proj) if lora else (None, None, None)
    floats = [attn.kv_a_layernorm.weight, attn.kv_b_proj.weight] + ([norm.weight] if norm is not None else [])
    floats += [attn.q_a_layernorm.weight] if lora else []
    floats += [idx.wk.weight, idx.k_norm.weight, idx.k_norm.bias] if idx is not None else []
    w = {"wx": wq, "wx_s": qs, "wx_m": qm, "wkv": wkv, "wkv_s": kvs, "wkv_m": kvm,
         "ik_wk": idx.wk.weight if idx is not None else None, "q_out": wq.shape[0],
         "qa_norm": attn.q_a_layernorm.weight if lora else None, "qa_eps": attn.q_a_layernorm.eps if lora else 0.0,
         "wqb": wqb[0], "wqb_s": wqb[1], "wqb_m": wqb[2], "kv_norm": attn.kv_a_layernorm.weight,
         "kv_eps": attn.kv_a_layernorm.eps, "kv_b": attn.kv_b_proj.weight, "o": o[0], "o_s": o[1], "o_m": o[2],
         "check": floats + [lin.weight for lin in lins if not isinstance(lin, QuantLinear)]}
    return w, [t for lin in lins for t in _parts(lin)] + floats
