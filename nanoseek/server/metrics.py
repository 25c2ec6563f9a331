"""Server metrics in the Prometheus text exposition format (GET /metrics), without a client library.

What operators of vLLM / SGLang dashboards look for: request counts by endpoint and outcome, prompt and
generated token counters, time-to-first-token, inter-token latency and end-to-end latency histograms, and,
read from the engine at scrape time, running / waiting requests, KV-cache usage and MTP acceptance.
Names use the `nanoseek_` prefix and Prometheus units (seconds, ratios, `_total` counters).
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from typing import Any, Optional

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def render(self, name: str) -> list[str]:
        lines, cum = [], 0
        for le, c in zip(list(self.buckets) + [math.inf], self.counts):
            cum += c
            lines.append(f'{name}_bucket{{le="{_fmt(le)}"}} {cum}')
        lines += [f"{name}_sum {_fmt(self.sum)}", f"{name}_count {self.count}"]
        return lines


def _fmt(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else f"{x:.1f}"


class ServerMetrics:
    """Counters and histograms updated by request handlers (event loop) and read by /metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, HTTP status) -> count
        self.finished: dict[str, int] = defaultdict(int)  # finish_reason -> sequences
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def sequence_done(self, finish_reason: Optional[str], prompt_tokens: int, generated: int, e2e_s: float) -> None:
        with self._lock:
            self.finished[finish_reason or "abort"] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            self.e2e.observe(e2e_s)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def tokens_after(self, seconds: float, num_tokens: int) -> None:
        """num_tokens arrived `seconds` after the previous ones (several at once with MTP speculation)."""
        if num_tokens > 0:
            with self._lock:
                self.itl.observe(seconds / num_tokens, num_tokens)

    def render(self, engine_stats: Optional[dict[str, Any]], loaded: bool) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines])

        with self._lock:
            metric("nanoseek_model_loaded", "gauge", "1 once the model is loaded and the server is ready.",
                   [f"nanoseek_model_loaded {int(loaded)}"])
            metric("nanoseek_http_requests_total", "counter", "API requests by endpoint and HTTP status.",
                   [f'nanoseek_http_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())])
            metric("nanoseek_request_success_total", "counter", "Finished sequences by finish reason.",
                   [f'nanoseek_request_success_total{{finish_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())])
            metric("nanoseek_prompt_tokens_total", "counter", "Prompt tokens of finished sequences.",
                   [f"nanoseek_prompt_tokens_total {self.prompt_tokens}"])
            metric("nanoseek_generation_tokens_total", "counter", "Generated tokens of finished sequences.",
                   [f"nanoseek_generation_tokens_total {self.generation_tokens}"])
            metric("nanoseek_time_to_first_token_seconds", "histogram", "Request arrival to first token.",
                   self.ttft.render("nanoseek_time_to_first_token_seconds"))
            metric("nanoseek_inter_token_latency_seconds", "histogram", "Time between generated tokens.",
                   self.itl.render("nanoseek_inter_token_latency_seconds"))
            metric("nanoseek_e2e_request_latency_seconds", "histogram", "Request arrival to last token.",
                   self.e2e.render("nanoseek_e2e_request_latency_seconds"))
        for key, name, kind, help_ in ENGINE_GAUGES:
            if engine_stats is not None and engine_stats.get(key) is not None:
                metric(name, kind, help_, [f"{name} {_fmt(float(engine_stats[key]))}"])
        return "\n".join(out) + "\n"


# engine.stats() key -> exported metric; keys the engine does not report are left out
ENGINE_GAUGES = (
    ("running", "nanoseek_num_requests_running", "gauge", "Sequences in the running batch."),
    ("waiting", "nanoseek_num_requests_waiting", "gauge", "Requests waiting for admission."),
    ("preemptions", "nanoseek_num_preemptions_total", "counter", "Sequences preempted for lack of blocks."),
    ("cache_usage", "nanoseek_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use."),
    ("used_blocks", "nanoseek_kv_cache_used_blocks", "gauge", "KV-cache blocks in use."),
    ("total_blocks", "nanoseek_kv_cache_blocks", "gauge", "KV-cache blocks in the pool."),
    ("prefix_cache_hit_rate", "nanoseek_prefix_cache_hit_rate", "gauge", "Prompt tokens served from cache."),
    ("spec_drafted", "nanoseek_spec_decode_draft_tokens_total", "counter", "MTP tokens drafted."),
    ("spec_accepted", "nanoseek_spec_decode_accepted_tokens_total", "counter", "MTP drafts accepted."),
    ("spec_acceptance_rate", "nanoseek_spec_decode_acceptance_rate", "gauge", "Accepted / drafted MTP tokens."),
)
