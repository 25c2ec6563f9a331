"""Continuous batching: request state, a bounded waiting queue, admission, and preemption by recomputation.

Every step the running requests decode together in one forward (requests join after their prefill and leave when
they finish, between steps; Orca, Yu et al. 2022). Before a step each running request needs cache rows for the
tokens it will feed; when the pool runs dry the most recently admitted request is preempted: its blocks are
released and it returns to the head of the waiting queue with everything it generated, to be prefilled again
later (recompute; its sampling state, text and generator survive). A request never fails for lack of blocks:
the engine caps max_model_len at what the pool holds, so one request alone always fits.

Admission is FIFO, limited by max_batch_size, a per-step prefill token budget and the free blocks.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from nanoseek.engine.cache import BlockPool
from nanoseek.engine.sampling import SamplingParams, TokenConstraint, TokenHistory, TokenLogprob
from nanoseek.engine.stops import StopState


class EngineFull(RuntimeError):
    """The waiting queue is at its bound; retry later (HTTP 503/429)."""


_arrivals = itertools.count()


@dataclass(eq=False)  # a request is itself: membership tests in the queues compare identities, not every field
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against max_model_len
    generator: Optional[torch.Generator] = None
    history: Optional[TokenHistory] = None
    constraint: Optional[TokenConstraint] = None  # this sequence's state of params.constraint
    arrival: int = field(default_factory=lambda: next(_arrivals))
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # cache rows holding valid entries (tokens[:num_computed] have been fed)
    table: list[int] = field(default_factory=list)  # block table
    hashes: list[bytes] = field(default_factory=list)  # prefix hashes of table's leading full blocks
    drafts: list[int] = field(default_factory=list)  # MTP draft tokens to verify next step
    # incremental detokenisation (window of token offsets into the generated ids) and stop strings
    text: str = ""
    sent_chars: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    stops: Optional[StopState] = None  # how far the text's tail matches each stop string
    # what the next RequestOutput reports
    new_tokens: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    prompt_logprobs_sent: bool = False
    finished: bool = False
    finish_reason: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)
        if self.stops is None and self.params.stop:
            self.stops = self.params.compiled_stops().state()

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_waiting: int, prefill_token_budget: int):
        self.pool = pool
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.prefix_cache_hits = 0  # prompt tokens whose rows came from the prefix cache

    def add(self, req: Request) -> None:
        # The bound is on requests that will have to wait: those the free batch slots do not take at the next
        # step (several requests submitted between two steps all sit in `waiting` until then).
        free_slots = max(0, self.max_batch_size - len(self.running))
        if len(self.waiting) >= self.max_waiting + free_slots:
            raise EngineFull(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self.waiting.append(req)

    def remove(self, request_id: str) -> Optional[Request]:
        """Take a request out of the queues and free its blocks; None if unknown or already gone."""
        for queue in (self.running, self.waiting):
            for r in queue:
                if r.request_id == request_id:
                    queue.remove(r)
                    self.pool.release(r.table)
                    r.hashes.clear()
                    return r
        return None

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.table)
        req.hashes.clear()

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.table)
        req.hashes.clear()
        req.num_computed = 0
        req.drafts = []
        self.waiting.appendleft(req)
        self.preemptions += 1

    def schedule_decode(self) -> list[Request]:
        """Secure rows for each running request's next feed (last token + drafts), preempting as needed."""
        batch = []
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req not in self.running:  # preempted by an earlier request of this loop
                continue
            while not self.pool.grow(req.table, req.num_computed + 1 + len(req.drafts)):
                victims = [r for r in self.running if r.arrival > req.arrival]
                if req.drafts:
                    req.drafts = []  # speculation is optional: give it up before evicting anyone
                elif victims:
                    self._preempt(max(victims, key=lambda r: r.arrival))
                else:
                    self._preempt(req)
                    break
            else:
                batch.append(req)
        return batch

    def schedule_prefill(self) -> list[Request]:
        """Admit waiting requests (FIFO) while the batch, the prefill budget and the pool allow."""
        admitted, budget = [], self.prefill_token_budget
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            use_prefix = req.params.prompt_logprobs is None or req.prompt_logprobs_sent
            if use_prefix:
                cached, req.hashes = self.pool.match_prefix(req.tokens, req.table)
            else:
                cached = 0
            todo = len(req.tokens) - cached
            if (admitted and todo > budget) or not self.pool.grow(req.table, len(req.tokens)):
                self.pool.release(req.table)
                req.hashes.clear()
                break
            self.waiting.popleft()
            self.prefix_cache_hits += cached
            req.num_computed = cached
            budget -= todo
            self.running.append(req)
            admitted.append(req)
        return admitted
