"""The inference engine: paged latent cache + continuous batching + per-request sampling (+ MTP speculation).

    engine = Engine(model, tokenizer)
    engine.add_request("a", tokenizer.encode("Hello", add_bos=True), SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): print(out.new_text, end="")

One `step()` (1) decodes every running request in ONE forward: each feeds its last token (and its MTP drafts),
absorbed MLA over the paged latent rows ("auto" path, T <= 16; DSA layers gather only their top-k rows), then
samples, detokenises and checks stops; (2) admits waiting requests and prefills them, only the tokens after each
one's cached prefix: those with at most 16 such tokens together in one forward (absorbed, like a decode step), the
others one per forward (naive MLA); then samples their first tokens. It returns the new tokens and text
of every request that progressed. Invariant between steps: a live request's tokens[:-1] are in the cache and its
last token is pending.

Legend: B batch, T tokens per request (padded), V vocabulary, D model width.
"""
from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from nanoseek.engine.cache import BlockPool, CacheView
from nanoseek.engine.sampling import (SamplingParams, TokenHistory, TokenLogprob, process_logits,
                                      prompt_logprobs, sample, token_logprob)
from nanoseek.engine.scheduler import EngineFull, Request, Scheduler
from nanoseek.engine.speculative import MTPDrafter
from nanoseek import kernels
from nanoseek.kernels import hugepages
from nanoseek.kernels.decode_plan import MAX_PLAN_ROWS
from nanoseek.model.kv_quant import kv_format
from nanoseek.model.mla import ABSORB_MAX_QUERIES

DEFAULT_CACHE_CAP = 8 << 30  # bytes: default budgets never take more than this


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: Optional[list[TokenLogprob]]
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # set on a request's first output only
    num_generated: int = 0


def default_cache_bytes(device: torch.device, need: int) -> int:
    """A fraction of free accelerator memory (half) or of physical RAM (a tenth), capped, and never more than
    `need` (what max_batch_size full-length requests would use)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        avail = free // 2
    else:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 10
    return int(min(avail, DEFAULT_CACHE_CAP, need))


class Engine:
    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 16, block_size: int = 16,
                 cache_bytes: Optional[int] = None, max_model_len: Optional[int] = None, max_waiting: int = 64,
                 speculative: Optional[str] = None, num_draft: int = 1, prefill_token_budget: int = 4096,
                 pack_weights: Optional[bool] = None, kv_cache_dtype: str = "auto", huge_pages: Optional[bool] = None):
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if max_batch_size < 1 or max_waiting < 0:
            raise ValueError("max_batch_size must be >= 1 and max_waiting >= 0")
        # auto: rows in the model's dtype; fp8 | int8: 8-bit rows, ~2x the tokens per byte (kv_quant.py)
        kv_fmt = kv_format(kv_cache_dtype)
        self.kv_cache_dtype = kv_cache_dtype
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = self.cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # The fast paths go onto the model here (`nanoseek.kernels.install`: decode kernels, weight caches). On
        # CPU the matmuls the C kernels do not take run on oneDNN-packed copies of the weights: bf16 prefill and
        # decode ~1.7x faster per matvec, fp32 prefill ~2x per GEMM. That costs a second copy of the weights, so
        # by default only when they take at most a quarter of the machine's RAM.
        if pack_weights is None:
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            pack_weights = self.device.type == "cpu" and weight_bytes <= ram // 4
        kernels.install(model, pack_weights=pack_weights)
        # On CPU the weights move into transparent huge pages (`kernels/hugepages.py`, where Linux offers them), and
        # the KV cache pool is allocated in them: a decode step streams every weight and its requests' cache rows,
        # and on 4 KB pages that stream misses the TLB every 4 KB.
        if huge_pages is None:
            huge_pages = self.device.type == "cpu"
        self.huge_page_bytes = hugepages.place(model) if huge_pages else 0
        # MTP layers are cached only when they are used for drafting
        n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if speculative else 0)
        if cache_bytes is None:
            per_block = BlockPool.bytes_per_block(cfg, n_layers, block_size, self.dtype, kv_fmt)
            want_len = max_model_len or cfg.max_position_embeddings
            need = (max_batch_size * -(-want_len // block_size) + 1) * per_block
            cache_bytes = default_cache_bytes(self.device, need)
        self.pool = BlockPool(cfg, n_layers, block_size, cache_bytes, self.dtype, self.device,
                              lookahead=1 if speculative else 0, kv_format=kv_fmt, huge_pages=huge_pages)
        cap = self.pool.capacity_tokens - (num_draft + 1 if speculative else 0)
        if max_model_len is None:
            max_model_len = min(cfg.max_position_embeddings, cap)
        elif max_model_len > cap:
            raise ValueError(f"max_model_len {max_model_len} exceeds what the KV cache holds ({cap} tokens); "
                             f"raise cache_bytes")
        if max_model_len < 2:
            raise ValueError(f"the KV cache budget allows a context of only {max_model_len} tokens")
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(self.pool, max_batch_size, max_waiting, prefill_token_budget)
        self.drafter = MTPDrafter(model, self.pool, num_draft, max_model_len) if speculative else None
        self.eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        # Real checkpoints pad the embedding past the tokenizer (DeepSeek V3: 129280 rows, ~128.8K tokens): never
        # sample an id the tokenizer cannot decode.
        self.vocab_limit = min(cfg.vocab_size, getattr(tokenizer, "vocab_size", cfg.vocab_size))
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self.counters = dict(prompt_tokens=0, generation_tokens=0, spec_drafted=0, spec_accepted=0,
                             requests_finished=0, forward_calls=0)
        # Everything alive now (torch, the model) lives as long as the engine: keep it out of the garbage
        # collector's full passes, which would otherwise stall a decode step by ~80 ms now and then. Collect
        # first, so that no garbage cycle is frozen with it.
        gc.collect()
        gc.freeze()

    # ---- public API ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None) -> None:
        params = params or SamplingParams()
        params.validate()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_ids]
        V = self.cfg.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if any(t < 0 or t >= V for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        room = self.max_model_len - len(prompt)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room or room < 1:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the maximum "
                             f"context length of {self.max_model_len} tokens")
        if params.min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the {max_tokens} tokens left in the context")
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        history = TokenHistory(prompt, V, self.device) if params.needs_history else None
        req = Request(request_id, prompt, params, max_tokens, gen, history,
                      constraint=params.constraint() if params.constraint is not None else None)
        self.scheduler.add(req)  # raises EngineFull
        self.requests[request_id] = req
        self.counters["prompt_tokens"] += len(prompt)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; the next step() reports it finished with reason 'abort'."""
        req = self.scheduler.remove(request_id)
        if req is not None and not req.finished:
            req.finished, req.finish_reason = True, "abort"
            self._aborted.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._aborted)

    def stats(self) -> dict:
        s = self.scheduler
        drafted = self.counters["spec_drafted"]
        total = self.pool.num_blocks - 1
        prompt = self.counters["prompt_tokens"]
        return dict(running=len(s.running), waiting=len(s.waiting), cache_usage=self.pool.usage(),
                    free_blocks=self.pool.num_free(), used_blocks=total - self.pool.num_free(), total_blocks=total,
                    prefix_cache_hit_rate=s.prefix_cache_hits / prompt if prompt else 0.0,
                    block_size=self.pool.block_size, max_model_len=self.max_model_len,
                    cache_capacity_tokens=self.pool.capacity_tokens,
                    preemptions=s.preemptions, prefix_cache_hits=s.prefix_cache_hits,
                    spec_acceptance_rate=self.counters["spec_accepted"] / drafted if drafted else None,
                    **self.counters)

    @torch.no_grad()
    def step(self) -> list["RequestOutput"]:
        outputs = [self._output(r) for r in self._aborted]
        self._aborted = []
        batch = self.scheduler.schedule_decode()
        if batch:
            self._decode(batch)
            outputs += self._collect(batch)
        for group in self._prefill_groups(self.scheduler.schedule_prefill()):
            self._prefill(group)
            outputs += self._collect(group)
        return outputs

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """Admitted requests in prefill calls: those with a few new tokens (at most ABSORB_MAX_QUERIES, which the
        model feeds through the absorbed path as it does decode steps) together, up to MAX_PLAN_ROWS padded rows
        per call; the others (and any that wants prompt logprobs) one by one. A wave of short prompts (chat turns
        with a cached prefix, benchmark clients) is then one pass over the weights instead of one each. On the
        CPU kernels every row is computed on its own, so a request gets the same bits in a group as alone."""
        groups, short, T = [], [], 0  # T: the longest prompt of `short`
        for r in admitted:
            n = len(r.tokens) - r.num_computed
            if n > ABSORB_MAX_QUERIES or (r.params.prompt_logprobs is not None and not r.prompt_logprobs_sent):
                groups.append([r])
                continue
            if short and (len(short) + 1) * max(T, n) > MAX_PLAN_ROWS:
                groups.append(short)
                short, T = [], 0
            short.append(r)
            T = max(T, n)
        return groups + ([short] if short else [])

    def generate(self, prompts: list[list[int]], params: Union[SamplingParams, list[SamplingParams], None] = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion; returns one cumulative RequestOutput per prompt, in order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        ids = [f"generate-{id(self)}-{i}-{random.getrandbits(32)}" for i in range(len(prompts))]
        final: dict[str, RequestOutput] = {}
        pending = list(zip(ids, prompts, plist))
        while pending or self.has_unfinished():
            while pending:  # submit as many as the queue takes
                try:
                    self.add_request(*pending[0])
                except EngineFull:
                    break
                pending.pop(0)
            for o in self.step():
                if o.request_id not in final:
                    final[o.request_id] = o
                    continue
                acc = final[o.request_id]
                acc.new_token_ids += o.new_token_ids
                acc.new_text += o.new_text
                if o.new_logprobs is not None:
                    acc.new_logprobs = (acc.new_logprobs or []) + o.new_logprobs
                acc.finished, acc.finish_reason, acc.num_generated = o.finished, o.finish_reason, o.num_generated
        return [final[i] for i in ids]

    # ---- forward passes --------------------------------------------------------------------------------
    def _prefill(self, reqs: list[Request]) -> None:
        todo = [r.tokens[r.num_computed:] for r in reqs]
        T = max(len(t) for t in todo)
        want_plp = len(reqs) == 1 and reqs[0].params.prompt_logprobs is not None and not reqs[0].prompt_logprobs_sent
        view = CacheView(self.pool, [r.table for r in reqs], [r.num_computed for r in reqs], [len(t) for t in todo])
        # shorter requests padded with their last token: a padded row has the last real row's input, position and
        # mask (CacheView), so it computes that row again and its logits are the request's next-token logits (its
        # cache write goes to the null block)
        ids = torch.tensor([t + t[-1:] * (T - len(t)) for t in todo], device=self.device)
        out = self.model(ids, cache=view, num_logits=None if want_plp else 1)
        out.logits = out.logits[..., : self.vocab_limit]
        self.counters["forward_calls"] += 1
        for b, (req, t) in enumerate(zip(reqs, todo)):
            req.num_computed = len(req.tokens)
            if want_plp:
                req.prompt_logprobs = prompt_logprobs(out.logits[0], req.prompt, req.params.prompt_logprobs)
            self._accept(req, out.logits[b, -1:], None)
        live = [b for b, r in enumerate(reqs) if not r.finished]
        if live and self.drafter is not None:
            self.drafter.propose([reqs[b] for b in live], out.hidden[live], [len(todo[b]) for b in live])
        for b in live:
            self._register(reqs[b])

    def _decode(self, batch: list[Request]) -> None:
        B = len(batch)
        feeds = [[r.tokens[-1]] + r.drafts for r in batch]
        T = max(len(f) for f in feeds)
        ids = torch.tensor([f + [0] * (T - len(f)) for f in feeds], dtype=torch.long, device=self.device)
        view = CacheView(self.pool, [r.table for r in batch], [r.num_computed for r in batch],
                         [len(f) for f in feeds])
        out = self.model(ids, cache=view)
        out.logits = out.logits[..., : self.vocab_limit]
        self.counters["forward_calls"] += 1
        # one argmax for the whole batch serves every request that needs no per-request processing (in fp32:
        # PyTorch's CPU argmax over bf16 takes 4x as long, 28 us a token at small's vocabulary; same indices)
        greedy = out.logits.float().argmax(-1).tolist() if any(self._plain_greedy(r) for r in batch) else None
        emitted = []
        for b, r in enumerate(batch):
            drafts = r.drafts
            n = self._accept(r, out.logits[b, :len(feeds[b])], drafts, greedy[b] if greedy else None)
            r.num_computed += n
            new = r.tokens[-n:]
            accepted = next((j for j in range(len(drafts)) if j >= n or new[j] != drafts[j]), len(drafts))
            self.counters["spec_drafted"] += len(drafts)
            self.counters["spec_accepted"] += accepted
            emitted.append(n)
        if self.drafter is not None:
            live = [b for b in range(B) if not batch[b].finished]
            if live:
                self.drafter.propose([batch[b] for b in live], out.hidden[live], [emitted[b] for b in live])
        for r in batch:
            if not r.finished:
                self._register(r)

    def _register(self, req: Request) -> None:
        self.pool.register(req.table, req.hashes, req.tokens, req.num_computed)

    # ---- sampling and stopping -------------------------------------------------------------------------
    def _plain_greedy(self, r: Request) -> bool:
        p = r.params
        return p.greedy and p.plain and p.logprobs is None and r.num_generated >= p.min_tokens

    def _accept(self, req: Request, logits: torch.Tensor, drafts: Optional[list[int]],
                greedy: Optional[list[int]] = None) -> int:
        """Sample at each fed position (logits [T, V]) until a token differs from the draft there or the request
        finishes. Returns the number of tokens emitted."""
        p = req.params
        drafts = drafts or []
        for j in range(logits.shape[0]):
            if greedy is not None and self._plain_greedy(req):
                tok, lp = greedy[j], None
            else:
                raw = logits[j].float()
                banned = []
                if req.num_generated < p.min_tokens:
                    banned = p.stop_token_ids + ([] if self.eos_id is None else [self.eos_id])
                allowed = req.constraint.allowed() if req.constraint is not None else None
                tok = sample(process_logits(raw, p, req.history, banned, allowed), p, req.generator)
                lp = token_logprob(raw.log_softmax(-1), tok, p.logprobs) if p.logprobs is not None else None
            self._append(req, tok, lp)
            if req.finished or j >= len(drafts) or tok != drafts[j]:
                return j + 1
        return logits.shape[0]

    def _append(self, req: Request, tok: int, lp: Optional[TokenLogprob]) -> None:
        p = req.params
        req.tokens.append(tok)
        req.new_tokens.append(tok)
        if req.constraint is not None:
            req.constraint.accept(tok)
        if lp is not None:
            req.new_logprobs.append(lp)
        if req.history is not None:
            req.history.add(tok)
        self.counters["generation_tokens"] += 1
        n = req.num_generated
        if (tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(req, "stop", detok=True)  # the stop token itself is not decoded
            return
        before = len(req.text)
        self._detokenize(req, final=False)
        if req.stops is not None and self._find_stop(req, before):
            self._finish(req, "stop", detok=False)
        elif n >= req.max_tokens or len(req.tokens) >= self.max_model_len:
            self._finish(req, "length", detok=True)

    def _detokenize(self, req: Request, final: bool) -> None:
        """Incremental detokenisation over a sliding window of token ids (so a multi-byte character split across
        tokens or a tokenizer's space handling is decoded in context); incomplete characters wait."""
        if self.tokenizer is None:
            return
        out, skip = req.output, req.params.skip_special_tokens
        if req.finish_reason == "stop" and out and (out[-1] == self.eos_id or out[-1] in req.params.stop_token_ids):
            out = out[:-1]
        prefix = self.tokenizer.decode(out[req.prefix_offset:req.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(out[req.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            req.text += full[len(prefix):]
            req.prefix_offset, req.read_offset = req.read_offset, len(out)

    def _find_stop(self, req: Request, before: int) -> bool:
        """Feed the text added after `before` chars to the stop matcher (always: under min_tokens too, so that its
        state stays that of the whole text); cut the text at the earliest stop string that ends in it (the stop
        string is not returned) and return True if there was one. Costs the new text, not the text or stops."""
        start = req.stops.feed(req.text, before)
        if start is None or req.num_generated < req.params.min_tokens:
            return False
        req.text = req.text[:start]
        return True

    def _finish(self, req: Request, reason: str, detok: bool) -> None:
        req.finished, req.finish_reason = True, reason
        if detok:  # flush characters still waiting for their last bytes
            self._detokenize(req, final=True)
        self.scheduler.finish(req)
        self.counters["requests_finished"] += 1

    def _collect(self, reqs: list[Request]) -> list[RequestOutput]:
        return [self._output(r) for r in reqs if r.new_tokens or r.finished]

    def _output(self, req: Request) -> RequestOutput:
        text = req.text
        end = len(text)
        if not req.finished and req.stops is not None:  # hold back a tail that may be the start of a stop string
            end -= req.stops.held()
        end = max(end, req.sent_chars)
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=req.new_tokens, new_text=text[req.sent_chars:end],
            new_logprobs=req.new_logprobs if req.params.logprobs is not None else None,
            finished=req.finished, finish_reason=req.finish_reason, prompt_token_ids=req.prompt,
            num_generated=req.num_generated)
        if not req.prompt_logprobs_sent:
            out.prompt_logprobs = req.prompt_logprobs
            req.prompt_logprobs_sent = req.params.prompt_logprobs is not None and req.prompt_logprobs is not None
        req.sent_chars = end
        req.new_tokens, req.new_logprobs = [], []
        if req.finished:
            self.requests.pop(req.request_id, None)
        return out
