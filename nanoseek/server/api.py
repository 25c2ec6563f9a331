"""The OpenAI-compatible HTTP server over the engine, its chat page, and `nanoseek serve`.

    nanoseek serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--dtype auto|float32|bfloat16]
                             [--speculative mtp --num-draft 1] [--max-batch-size 16] [--max-model-len N]
                             [--max-request-bytes 4194304] ...

Endpoints (bodies in protocol.py; conventions in shared/reference/serving-api.md):
  POST /v1/chat/completions  messages -> DeepSeek chat encoding; thinking mode returns reasoning_content;
                             a last assistant message with prefix=true is continued (chat prefix completion)
                             response_format json_object / json_schema: grammar-constrained (engine/grammar.py)
                             tools / tool_choice / parallel_tool_calls: calls parsed into message.tool_calls,
                             streamed as delta.tool_calls (server/tools.py, tool_calls.py)
  POST /v1/responses         the OpenAI Responses API (non-stateful), translated onto chat completions
  POST /v1/completions       prompt as text, texts, token ids or lists of them; n; echo; legacy integer logprobs
                             (what lm-evaluation-harness's local-completions reads); suffix -> fill-in-the-middle
  GET  /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info (lm-eval's remote tokenizer probes)
  GET  /health (503 while the model loads), GET /metrics (Prometheus text), GET / (the chat page)

Decisions:
- The model loads in a background thread once the server listens: /health answers 503 until it is ready, so an
  orchestrator can probe it, and a load failure is logged and stops the server.
- One API call with several prompts or n > 1 becomes several engine requests read through one queue (`_Fanout`).
  The HTTP status is only decided once every engine request has been admitted or refused, so a full queue (429)
  or a prompt longer than the context (400) is a proper error response, never a broken stream.
- API key (`Authorization: Bearer`) on /v1/* only, as vLLM does: the tokenizer endpoints stay open for lm-eval.
- A client that goes away cancels its engine requests: `AsyncEngine.generate` aborts them and frees their blocks.
- Every error, including validation errors and unknown routes, is {"error": {message, type, param, code}}.
- No request can stall the others: bodies over --max-request-bytes are refused (413) before they are read, and
  parsing, validation, rendering, tokenization and large answers run in worker threads (offloop.py).
- Ctrl-C ends open requests at once with an error (streams: an error event, then [DONE]), not by cancelling them.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import logging
import os
import secrets
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.config import ModelConfig
from nanoseek.server import protocol as P
from nanoseek.server.metrics import ServerMetrics
from nanoseek.server.tools import ToolPlan, ToolRequestError, ToolStream, tool_plan
from nanoseek.server.offloop import (DEFAULT_MAX_REQUEST_BYTES, BodyLimit, add_body_schemas, body_schema,
                                     int_list_json, json_response, parse_body)

log = logging.getLogger("nanoseek.server")
STATIC_DIR = Path(__file__).parent / "static"
THINKING_SUFFIXES = ("-thinking", "reasoner")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    model_dir: str
    served_model_name: Optional[str] = None  # default: the model folder's name
    api_key: Optional[str] = None  # compared after dropping surrounding spaces; a blank one is refused
    trusted_hosts: Optional[list[str]] = None  # Host header names accepted (None: any); see `serve`
    dtype: str = "auto"  # bfloat16 where the device computes it natively and fast, else float32 (precision.py)
    device: str = "auto"  # cuda when available
    max_batch_size: int = 16
    block_size: int = 16
    cache_bytes: Optional[int] = None  # None: the engine's default budget
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | int8: 8-bit cache rows (model/kv_quant.py)
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    max_waiting: int = 64
    speculative: Optional[str] = None  # "mtp"
    num_draft: int = 1
    lora: Optional[tuple[str, str]] = None  # (name, adapter folder): serve model_dir + this adapter, merged at load
    quantize: Optional[str] = None  # "int8" | "int4": weight-only quantization at load (nanoseek.quant)
    quant_group_size: int = 32
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get a 413 before they are parsed


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII-escaped JSON: a message that quotes client input (lone surrogates included) always encodes
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


class _ClientGone(Exception):
    """The HTTP client disconnected before the (non-streaming) answer was ready."""


class _ShuttingDown(Exception):
    """The server is stopping (Ctrl-C): open requests end now, with an error, rather than being cut later."""

    def api_error(self) -> APIError:
        return APIError(503, "the server is shutting down", "service_unavailable_error", code="server_shutdown")


def _overloaded(msg: str) -> APIError:
    # 429 rather than 503: a full queue is the client's cue to back off and retry (OpenAI clients do so)
    return APIError(429, msg, "overloaded_error", code="queue_full", headers={"Retry-After": "1"})


# ---- several engine requests read as one stream -------------------------------------------------------------
class _Fanout:
    """The engine requests of one API call (prompts x n choices), read as one stream of (choice, RequestOutput)."""

    def __init__(self, aengine, jobs: list[tuple[str, list[int], Any]]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: collections.deque = collections.deque()
        self._open = len(jobs)
        self._tasks = [asyncio.create_task(self._pump(i, aengine.generate(rid, ids, params)))
                       for i, (rid, ids, params) in enumerate(jobs)]

    async def _pump(self, i: int, gen: AsyncIterator) -> None:
        try:
            async for out in gen:
                self._queue.put_nowait((i, out, None))
            self._queue.put_nowait((i, None, None))
        except Exception as e:  # EngineFull / ValueError at admission, or an engine failure later
            self._queue.put_nowait((i, None, e))

    async def admitted(self) -> None:
        """Wait until every request has produced its first output (or failed: the first failure is raised)."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            item = await self._queue.get()
            self._buffer.append(item)
            if item[2] is not None:
                raise item[2]
            started.add(item[0])

    async def __aiter__(self):
        while self._open:
            i, out, err = self._buffer.popleft() if self._buffer else await self._queue.get()
            if err is not None:
                raise err
            if out is None:
                self._open -= 1
                continue
            yield i, out

    def client_gone(self) -> None:
        self.cancel()
        self._queue.put_nowait((-1, None, _ClientGone()))

    def shut_down(self) -> None:
        self.cancel()
        self._queue.put_nowait((-1, None, _ShuttingDown()))

    def cancel(self) -> None:
        """Abort every engine request (synchronous, so it is safe in cancelled contexts and finally blocks)."""
        for t in self._tasks:
            t.cancel()


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, fan: _Fanout):
    """While a non-streaming answer is computed, a disconnect aborts its engine requests at once."""

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                fan.client_gone()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


class _CountRequests:
    """ASGI middleware counting API responses by endpoint and status for /metrics (pure ASGI: streaming-safe)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/tokenizer_info")

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.ENDPOINTS:
            return await self.app(scope, receive, send)
        status = [499]  # no response started: the client left first

        async def send_and_count(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.request(scope["path"], status[0])


class _SSEResponse(StreamingResponse):
    """Server-sent events whose engine requests are aborted however the response ends (done, error, disconnect)."""

    def __init__(self, content, fan: _Fanout):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._fan = fan

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._fan.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the server state ---------------------------------------------------------------------------------------
def _is_gguf(path: Path) -> bool:
    """A llama.cpp GGUF model file (`nanoseek.gguf`) rather than a Hugging Face folder."""
    return path.suffix == ".gguf" and path.is_file()


class _State:
    """Everything the routes share: config, the engine once loaded, metrics, and request -> engine helpers."""

    def __init__(self, cfg: ServeConfig, on_fatal: Optional[Callable[[BaseException], None]]):
        self.cfg = cfg
        self.on_fatal = on_fatal
        path = Path(cfg.model_dir)
        if _is_gguf(path):
            from nanoseek.gguf import read_config
            self.model_cfg = read_config(path)
        else:
            self.model_cfg = ModelConfig.from_json(path)
        # a GGUF file is served under its name without the extension, a folder under its own name
        self.name = cfg.lora[0] if cfg.lora else cfg.served_model_name or (
            path.resolve().stem if _is_gguf(path) else path.resolve().name)
        self.max_model_len = min(cfg.max_model_len or self.model_cfg.max_position_embeddings,
                                 self.model_cfg.max_position_embeddings)
        self.created = int(time.time())
        self.metrics = ServerMetrics()
        self.engine = self.aengine = self.tokenizer = None
        self.load_error: Optional[str] = None
        self.vocab_limit = self.model_cfg.vocab_size  # ids valid for both the model and the tokenizer
        self._token_str: dict[int, str] = {}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.fans: "weakref.WeakSet[_Fanout]" = weakref.WeakSet()  # the API calls in flight

    # ---- loading ------------------------------------------------------------------------------------------
    def _load_blocking(self):
        import torch

        import nanoseek
        from nanoseek.engine import Engine
        from nanoseek.tokenizer import load_tokenizer

        cfg = self.cfg
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        t0 = time.perf_counter()
        # an adapter trained on an extended vocabulary carries its tokenizer (and the new rows: lora.TokenRows)
        with_tok = cfg.lora and (Path(cfg.lora[1]) / "tokenizer.json").is_file()
        tokenizer = load_tokenizer(cfg.lora[1] if with_tok else cfg.model_dir)
        from nanoseek.precision import resolve
        said = io.StringIO()  # the choice and its reason (auto), or the slow-bf16 warning: into the server's log
        dtype = resolve(cfg.dtype, device, "nanoseek serve", out=said)
        if said.getvalue():
            log.info("%s", said.getvalue().strip())
        model = nanoseek.from_pretrained(cfg.model_dir, dtype=dtype, device=device,
                                         quantize=None if cfg.lora else cfg.quantize,
                                         group_size=cfg.quant_group_size).eval()
        if cfg.lora:  # merged: the engine's fast and cached paths read the weights directly (lora.py)
            from nanoseek.lora import load_adapter, merge_lora
            merge_lora(load_adapter(model, cfg.lora[1]))
            log.info("merged LoRA adapter %s, served as %r", cfg.lora[1], cfg.lora[0])
            if cfg.quantize:  # quantized after the merge (the merge writes float weights)
                from nanoseek.quant import quantize_model
                quantize_model(model, cfg.quantize, cfg.quant_group_size)
        engine = Engine(model, tokenizer, max_batch_size=cfg.max_batch_size, block_size=cfg.block_size,
                        cache_bytes=cfg.cache_bytes, max_model_len=cfg.max_model_len, max_waiting=cfg.max_waiting,
                        speculative=cfg.speculative, num_draft=cfg.num_draft, kv_cache_dtype=cfg.kv_cache_dtype)
        log.info("loaded %s (%s, %s) in %.1fs; KV cache: %d tokens (%s)", cfg.model_dir,
                 str(next(model.parameters()).dtype).split(".")[-1], device, time.perf_counter() - t0,
                 engine.pool.capacity_tokens, cfg.kv_cache_dtype)
        return tokenizer, engine

    async def load(self) -> None:
        from nanoseek.engine import AsyncEngine
        loop = self.loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(fn, value) -> None:
            if not done.done():
                fn(value)

        def work() -> None:
            try:
                outcome = (done.set_result, self._load_blocking())
            except BaseException as e:
                outcome = (done.set_exception, e)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:  # the server stopped while loading: nobody waits any more
                pass

        # a daemon thread (not the default executor), so that Ctrl-C during a long load exits at once
        threading.Thread(target=work, name="nanoseek-load", daemon=True).start()
        try:
            tokenizer, engine = await done
            # the engine caps the context at what its KV-cache budget holds
            self.max_model_len = engine.max_model_len
            # the loaded model's rows (an adapter may have grown them past config.json's)
            self.vocab_limit = min(engine.cfg.vocab_size, tokenizer.vocab_size)
            self.tokenizer, self.engine, self.aengine = tokenizer, engine, AsyncEngine(engine)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            from nanoseek.cli import DEBUG  # one line; the traceback only under --debug
            log.error("could not load the model from %s: %s", self.cfg.model_dir, self.load_error,
                      exc_info=e if DEBUG else None)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def stopping(self) -> None:
        """Shutdown began (any thread, a signal handler included): end every open request with an error now, so
        that streams close with an error event and [DONE] instead of being cancelled mid-response."""
        def end_all() -> None:
            for fan in list(self.fans):
                fan.shut_down()

        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(end_all)

    async def shutdown(self) -> None:
        if self.aengine is not None:
            await asyncio.to_thread(self.aengine.shutdown)  # joins the engine thread

    def ready(self) -> None:
        if self.aengine is None:
            msg = (f"the model failed to load: {self.load_error}" if self.load_error
                   else "the model is still loading; retry shortly")
            raise APIError(503, msg, "service_unavailable_error", code="model_not_ready",
                           headers={"Retry-After": "1"})

    # ---- small helpers ------------------------------------------------------------------------------------
    def resolve_model(self, name: Optional[str]) -> tuple[str, bool]:
        """Requested model name -> (name to report, thinking by name)."""
        if not name:
            return self.name, False
        if name == self.name or name in (self.name + s for s in THINKING_SUFFIXES):
            return name, name.endswith(THINKING_SUFFIXES)
        raise APIError(404, f"model {name!r} not found; this server serves {self.name!r} "
                            f"(and {self.name + '-thinking'!r} for thinking mode)", "not_found_error",
                       param="model", code="model_not_found")

    def token_str(self, tid: int) -> str:
        """One token as text (a lone piece of a multi-byte character shows as U+FFFD); '' past the tokenizer."""
        s = self._token_str.get(tid)
        if s is None:
            s = (self.tokenizer.decode([tid], skip_special_tokens=False) if tid < self.tokenizer.vocab_size
                 else "")
            self._token_str[tid] = s
        return s

    def token_bytes(self, tid: int) -> list[int]:
        return list(self.tokenizer.decode_bytes([tid])) if tid < self.tokenizer.vocab_size else []

    def encode(self, text: str, add_bos: bool, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_bos=add_bos)
        except ValueError as e:  # e.g. lone surrogates, which have no UTF-8 form
            raise APIError(400, f"{param}: {e}", param=param) from None

    def check_jobs(self, n: int) -> None:
        # all sequences of one call enter the engine's waiting queue together, before any is admitted
        cap = self.cfg.max_waiting
        if n > cap:
            raise APIError(400, f"this request needs {n} sequences (prompts x n); the server queues at most {cap} "
                                f"at once (--max-waiting)", param="n")

    def check_ids(self, ids: list[int], param: str) -> None:
        V = self.vocab_limit
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {V})", param=param,
                           code="invalid_token_id")

    def check_length(self, n_prompt: int, max_tokens: Optional[int], param: str) -> int:
        """Validate the prompt length against the context and return the max_tokens to use."""
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=param)
        room = self.max_model_len - n_prompt
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                                f"{n_prompt} tokens (one more is needed to generate)", param=param,
                           code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                                f"completion); reduce the prompt or max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    async def constraint(self, make_grammar: Callable, prompt_ids: list[int], param: str):
        """The SamplingParams.constraint factory of the grammar `make_grammar()` builds (grammar.json_schema,
        grammar.tool_calls, ...), compiled off the event loop: llguidance takes up to ~1 s for a large schema, and
        indexes the vocabulary on first use. A grammar that does not compile is a 400 naming `param`."""
        from nanoseek.engine import grammar

        def build():
            return grammar.compiler_for(self.tokenizer).constraint(make_grammar(), prompt_ids)
        try:
            return await asyncio.to_thread(build)
        except grammar.GrammarError as e:
            raise APIError(400, str(e), param=param) from None

    async def response_format(self, req: P.SamplingRequest, prompt_ids: list[int]):
        """The constraint of the request's response_format; None (unconstrained) for none or "text"."""
        from nanoseek.engine import grammar
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return await self.constraint(grammar.json_object, prompt_ids, "response_format")
        js = rf.json_schema
        return await self.constraint(lambda: grammar.json_schema(js.schema_, strict=bool(js.strict)), prompt_ids,
                                     "response_format.json_schema.schema")

    def sampling(self, req: P.SamplingRequest, max_tokens: int, logprobs: Optional[int],
                 prompt_logprobs: Optional[int], seed_offset: int, constraint=None):
        from nanoseek.engine import SamplingParams
        stops = req.stop_list()
        if len(stops) > P.MAX_STOP:
            raise APIError(400, f"at most {P.MAX_STOP} stop sequences are supported", param="stop")
        stop_ids = list(req.stop_token_ids or [])
        self.check_ids(stop_ids, "stop_token_ids")
        bias = {}
        for k, v in (req.logit_bias or {}).items():
            if not k.isdigit() or not -100 <= v <= 100:
                raise APIError(400, f"logit_bias maps token ids to numbers in [-100, 100]; got {k!r}: {v!r}",
                               param="logit_bias")
            bias[int(k)] = float(v)
        self.check_ids(list(bias), "logit_bias")
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must be <= max_tokens ({max_tokens})",
                           param="min_tokens")
        # each choice is its own engine request: offset the seed so that n seeded choices differ
        seed = None if req.seed is None else (req.seed + seed_offset) % 2**63
        # below 1e-5 dividing the logits overflows to inf; the distribution is a point mass anyway
        temperature = 0.0 if req.temperature < 1e-5 else req.temperature
        # a top_p that underflows float32 would drop every token; 1e-5 keeps just the most likely one
        top_p = max(req.top_p, 1e-5)
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=req.top_k,
                min_p=req.min_p, seed=seed, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, stop=stops,
                stop_token_ids=stop_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, logit_bias=bias, constraint=constraint)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        params.compiled_stops()  # here (a worker thread), not on the engine thread: O(total stop length)
        return params

    async def run(self, request: Request, jobs: list) -> _Fanout:
        """Submit the engine requests; raise the right API error if any is refused (the others are aborted)."""
        from nanoseek.engine import EngineFull
        fan = _Fanout(self.aengine, jobs)
        self.fans.add(fan)
        try:
            async with _watch_disconnect(request, fan):
                await fan.admitted()
        except EngineFull as e:
            fan.cancel()
            raise _overloaded(str(e)) from None
        except ValueError as e:
            fan.cancel()
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None
        except BaseException:
            fan.cancel()
            raise
        return fan

    async def collect(self, request: Request, fan: _Fanout, choices: list["_Choice"],
                      on_output: Callable[[int, Any], None]) -> None:
        try:
            async with _watch_disconnect(request, fan):
                async for i, out in fan:
                    on_output(i, out)
        finally:
            fan.cancel()
            for c in choices:
                c.abandoned()


# ---- per-choice bookkeeping ---------------------------------------------------------------------------------
class _Choice:
    """One sequence of an API call: token counts, timing for the metrics, and (chat) the reasoning split."""

    def __init__(self, state: _State, t0: float, n_prompt: int, thinking: bool, tools: Optional[ToolPlan] = None):
        from nanoseek.chat import ReasoningParser
        self.state, self.t0, self.n_prompt = state, t0, n_prompt
        self.parser = ReasoningParser() if thinking else None
        self.tools = ToolStream(tools) if tools is not None and tools.parse else None
        self.last: Optional[float] = None
        self.num_generated = 0
        self.finish_reason: Optional[str] = None

    def observe(self, out) -> None:
        now = time.perf_counter()
        new = len(out.new_token_ids)
        if new:
            if self.last is None:
                self.state.metrics.first_token(now - self.t0)
            else:
                self.state.metrics.tokens_after(now - self.last, new)
            self.last = now
        self.num_generated = out.num_generated
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"
            self.state.metrics.sequence_done(out.finish_reason, self.n_prompt, self.num_generated, now - self.t0)

    def abandoned(self) -> None:
        """The response ended before this sequence finished (client gone, error): count it as aborted."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.state.metrics.sequence_done("abort", self.n_prompt, self.num_generated,
                                             time.perf_counter() - self.t0)

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) deltas of a text delta."""
        if self.parser is None:
            return "", text
        return self.parser.feed(text)

    def chat_delta(self, out) -> tuple[str, str, list[dict]]:
        """(reasoning, content, delta.tool_calls entries) of an engine output; at the end, what was held back
        is settled and the finish reason becomes "tool_calls" when the model called tools."""
        r, t = self.split(out.new_text)
        if out.finished and self.parser is not None:
            fr, ft = self.parser.flush()
            r, t = r + fr, t + ft
        calls: list[dict] = []
        if self.tools is not None:
            t, calls = self.tools.feed(t, final=out.finished)
            if out.finished:
                self.finish_reason = self.tools.finish_reason(self.finish_reason)
        return r, t, calls


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(cfg: ServeConfig, on_fatal: Optional[Callable[[BaseException], None]] = None) -> FastAPI:
    """The FastAPI app; the model starts loading when the app starts (lifespan), in a background thread."""
    state = _State(cfg, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(state.load())
        try:
            yield
        finally:
            loader.cancel()
            await state.shutdown()

    api_key = None if cfg.api_key is None else cfg.api_key.strip()
    if api_key == "":
        raise ValueError("the API key is empty: give a key, or none for a server without one")
    # with a key, the schema is served behind it (below) and the browsable docs are off (a browser sends no key)
    docs = {} if api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for DeepSeek-class models", **docs)
    app.state.nanoseek = state
    # innermost of the two, so that /metrics counts the 413s too
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.add_middleware(_CountRequests, metrics=state.metrics)
    if cfg.trusted_hosts is not None:
        # a keyless server on the loopback answers only requests addressed to the loopback: a web page that makes
        # its own name resolve to 127.0.0.1 (DNS rebinding) sends its own name as the Host and gets a 400
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=cfg.trusted_hosts)
    errors = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
    # "stream": true answers the same routes with server-sent events; the schema describes one event (OpenAPI 3.1:
    # `schema` of text/event-stream is per event): its `data` is a JSON chunk, or "[DONE]" at the end
    sse_event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "data": {"type": "string", "description": 'a JSON chunk, or "[DONE]"'}}}
    streamed = {**errors, 200: {"content": {"text/event-stream": {"schema": sse_event}}}}
    add_body_schemas(app, [P.ChatCompletionRequest, P.CompletionRequest, P.TokenizeRequest, P.DetokenizeRequest],
                     extend=_links)

    # ---- errors in the OpenAI shape -------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                            code="invalid_json").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":  # OpenAI's words for a parameter it does not know
            return APIError(400, f"Unrecognized request argument supplied: {param} (nanoseek does not implement "
                                 f"it; see the README's list of accepted fields)", param=param,
                            code="unknown_parameter").response()
        msg = f"{param}: {first.get('msg')}" if param else f"the body must be a JSON object ({first.get('msg')})"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return APIError(400, msg, param=param, code="invalid_request").response()

    @app.exception_handler(_ShuttingDown)
    async def _shutting_down(request: Request, e: _ShuttingDown):
        return e.api_error().response()

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, e: _ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the logs do

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return APIError(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error").response()

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # the key guards /v1/* (as vLLM does): the tokenizer endpoints stay open, which is where lm-eval's remote
    # tokenizer looks without credentials
    protected = [Depends(auth)]
    if api_key is not None:
        @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
        async def openapi_schema():
            return JSONResponse(app.openapi())

    # ---- service endpoints ----------------------------------------------------------------------------------
    @app.get("/health", responses={503: {"model": P.ErrorResponse}})
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        stats = state.engine.stats() if state.engine is not None else None
        return PlainTextResponse(state.metrics.render(stats, state.aengine is not None),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=P.ModelList, dependencies=protected, responses=errors)
    async def models():
        names = [state.name, state.name + "-thinking"]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": state.created,
                                            "owned_by": "nanoseek", "root": state.name,  # not the path
                                            "max_model_len": state.max_model_len} for n in names]}

    # the routes below read their bodies with parse_body and do input-sized work (rendering, tokenizing,
    # detokenizing, encoding the answer) in worker threads: the event loop only routes (offloop.py)
    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=errors, operation_id="tokenize",
              openapi_extra=body_schema(P.TokenizeRequest))
    async def tokenize(request: Request):
        req = await parse_body(request, P.TokenizeRequest, sliced=("messages", P.ChatMessage))
        state.ready()
        if req.model is not None:
            state.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")

        def work() -> str:
            if req.messages is not None:
                text = _render_chat(req.messages, thinking=False, add_generation_prompt=req.add_generation_prompt)
                ids = state.encode(text, False, "messages")
            else:
                ids = state.encode(req.prompt, req.add_special_tokens, "prompt")
            return f'{{"tokens": {int_list_json(ids)}, "count": {len(ids)}, "max_model_len": {state.max_model_len}}}'

        return await json_response(work)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=errors, operation_id="detokenize",
              openapi_extra=body_schema(P.DetokenizeRequest))
    async def detokenize(request: Request):
        req = await parse_body(request, P.DetokenizeRequest)
        state.ready()
        if req.model is not None:
            state.resolve_model(req.model)

        def work() -> str:
            state.check_ids(req.tokens, "tokens")
            return json.dumps({"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)})

        return await json_response(work)

    @app.get("/tokenizer_info", response_model=P.TokenizerInfo, responses=errors)
    async def tokenizer_info():
        state.ready()
        tok = state.tokenizer
        bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else None
        eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else None
        return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size, "bos_token": bos,
                "eos_token": eos, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token": eos,
                "chat_template": tok.config.get("chat_template"), "model_max_length": state.max_model_len}

    # ---- chat completions -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, dependencies=protected,
              responses=streamed, operation_id="chat_completions", openapi_extra=body_schema(P.ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await parse_body(request, P.ChatCompletionRequest, sliced=("messages", P.ChatMessage))
        return await chat(req, request)

    async def chat(req: P.ChatCompletionRequest, request: Request):
        """A parsed chat request (from the route, or translated from /v1/responses) to its response."""
        t0 = time.perf_counter()
        state.ready()
        model, thinking = state.resolve_model(req.model)
        if req.thinking is not None:
            thinking = req.thinking.type == "enabled"
        kw = req.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if isinstance(kw.get(key), bool):
                thinking = kw[key]
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def prepare():  # check, render, tokenize: sized by the input, so in a worker thread
            prefix = req.messages[-1].prefix
            if prefix and req.messages[-1].role != "assistant":
                raise APIError(400, "prefix=true is only valid on a last message with role 'assistant'",
                               param="messages")
            if any(m.prefix for m in req.messages[:-1]):
                raise APIError(400, "prefix=true is only valid on the last message", param="messages")
            try:
                tools = tool_plan(req)
            except ToolRequestError as e:
                raise APIError(400, str(e), param=e.param) from None
            text = _render_chat(req.messages, thinking=thinking, add_generation_prompt=not prefix,
                                tools=tools.functions if tools is not None else None)
            ids = state.encode(text, False, "messages")
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if max_tokens == 0:
                raise APIError(400, "max_tokens must be at least 1 for chat completions", param="max_tokens")
            max_tokens = state.check_length(len(ids), max_tokens, "messages")
            state.check_jobs(req.n)
            return prefix, tools, ids, max_tokens

        prefix, tools, ids, max_tokens = await asyncio.to_thread(prepare)
        constraint = await _chat_constraint(state, req, tools, ids, prefix)  # compiles off the loop itself
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = await asyncio.to_thread(lambda: [
            (f"{rid}-{i}", ids, state.sampling(req, max_tokens, logprobs, None, i, constraint)) for i in range(req.n)])
        choices = [_Choice(state, t0, len(ids), thinking, tools) for _ in range(req.n)]
        fan = await state.run(request, jobs)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSEResponse(_sse_stream(rid, fan, choices, _chat_events(
                state, fan, choices, rid, created, model, include_usage)), fan)

        reasoning = [[] for _ in choices]
        content = [[] for _ in choices]
        lps: list[list] = [[] for _ in choices]

        def on_output(i: int, out) -> None:
            c = choices[i]
            c.observe(out)
            r, t, _ = c.chat_delta(out)  # tool calls: read whole from c.tools at the end
            reasoning[i].append(r)
            content[i].append(t)
            if out.new_logprobs:
                lps[i].extend(out.new_logprobs)

        def message(i: int, c: _Choice) -> dict:
            m = {"role": "assistant", "content": "".join(content[i]),
                 "reasoning_content": "".join(reasoning[i]) if thinking else None}
            if c.tools is not None:
                m.update(c.tools.message())
            return m

        await state.collect(request, fan, choices, on_output)
        return await json_response(lambda: json.dumps({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": message(i, c),
                         "logprobs": ({"content": [_chat_logprob(state, lp) for lp in lps[i]]}
                                      if req.logprobs else None),
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": _usage(len(ids), sum(c.num_generated for c in choices)),
        }))

    # ---- the Responses API, translated onto the chat route (server/responses.py) -----------------------------
    from nanoseek.server.responses import add_routes as add_responses_routes
    add_responses_routes(app, chat, protected, streamed)

    # ---- text completions -----------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=P.CompletionResponse, dependencies=protected, responses=streamed,
              operation_id="completions", openapi_extra=body_schema(P.CompletionRequest))
    async def completions(request: Request):
        t0 = time.perf_counter()
        req = await parse_body(request, P.CompletionRequest)
        state.ready()
        model, _ = state.resolve_model(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo=true (prompt logprobs)", param="max_tokens")
        rid = f"cmpl-{uuid.uuid4().hex}"
        # the engine always generates at least one token: with max_tokens=0 (echo only) it is dropped
        keep = req.max_tokens != 0
        def prepare():  # tokenize, check: sized by the input, so in a worker thread
            prompts = _prompts(state, req)  # [(ids, text)]
            lengths = [state.check_length(len(ids), req.max_tokens or None, "prompt") for ids, _ in prompts]
            state.check_jobs(len(prompts) * req.n)
            return prompts, lengths

        prompts, lengths = await asyncio.to_thread(prepare)
        # one constraint factory per prompt (its grammar state starts after that prompt); compiled off the loop
        constraints = [await state.response_format(req, ids) for ids, _ in prompts]
        want_prompt_lp = req.logprobs if req.echo else None

        def make_jobs():  # stop strings and logit_bias checked per job: sized by the input too
            jobs, meta = [], []
            for (ids, text), max_tokens, constraint in zip(prompts, lengths, constraints):
                for _ in range(req.n):
                    k = len(jobs)
                    jobs.append((f"{rid}-{k}", ids, state.sampling(req, max_tokens if keep else 1, req.logprobs,
                                                                     want_prompt_lp, k, constraint)))
                    meta.append((ids, text, keep))
            return jobs, meta

        jobs, meta = await asyncio.to_thread(make_jobs)
        choices = [_Choice(state, t0, len(ids), False) for ids, _, _ in meta]
        fan = await state.run(request, jobs)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSEResponse(_sse_stream(rid, fan, choices, _completion_events(
                state, req, fan, choices, meta, rid, created, model, include_usage)), fan)

        texts: list[list[str]] = [[] for _ in jobs]
        entries: list[list] = [[] for _ in jobs]  # (token id, TokenLogprob | None) in output order

        def on_output(i: int, out) -> None:
            ids, text, keep = meta[i]
            c = choices[i]
            if out.prompt_logprobs is not None and req.echo:
                entries[i][:0] = list(zip(ids, out.prompt_logprobs))
            if keep:
                c.observe(out)
                texts[i].append(out.new_text)
                if out.new_logprobs:
                    entries[i].extend((lp.token_id, lp) for lp in out.new_logprobs)
            elif out.finished:
                c.finish_reason = "length"
                c.state.metrics.sequence_done("length", c.n_prompt, 0, time.perf_counter() - c.t0)

        await state.collect(request, fan, choices, on_output)

        def answer() -> str:  # echoed prompts and their logprobs: sized by the input
            out_choices = []
            for i, c in enumerate(choices):
                ids, text, keep = meta[i]
                prefix = text if req.echo else ""
                lp = None
                if req.logprobs is not None:
                    lp = _legacy_logprobs(state, entries[i], 0)
                out_choices.append({"index": i, "text": prefix + "".join(texts[i]), "logprobs": lp,
                                    "finish_reason": c.finish_reason})
            n_prompt = sum(len(ids) for ids, _ in prompts)
            return json.dumps({"id": rid, "object": "text_completion", "created": created, "model": model,
                               "choices": out_choices,
                               "usage": _usage(n_prompt, sum(c.num_generated for c, m in zip(choices, meta) if m[2]))})

        return await json_response(answer)

    # ---- the chat page --------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _links(schema: dict) -> None:
    """OpenAPI links between operations (what a stateful fuzzer such as schemathesis chains): tokenize's ids go to
    detokenize and to a completion, detokenize's text back to tokenize, a completion's text to tokenize."""
    def on_ok(path: str, links: dict[str, tuple[str, dict]]) -> None:
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok["links"] = {name: {"operationId": op, "requestBody": body} for name, (op, body) in links.items()}

    on_ok("/tokenize", {"detokenize": ("detokenize", {"tokens": "$response.body#/tokens"}),
                        "complete": ("completions", {"prompt": "$response.body#/tokens", "max_tokens": 1})})
    on_ok("/detokenize", {"tokenize": ("tokenize", {"prompt": "$response.body#/prompt"})})
    on_ok("/v1/completions", {"tokenize": ("tokenize", {"prompt": "$response.body#/choices/0/text"})})


# ---- request -> prompt ----------------------------------------------------------------------------------------
async def _chat_constraint(state: _State, req: P.ChatCompletionRequest, tools: Optional[ToolPlan],
                           ids: list[int], prefix: bool):
    """The decoding constraint of a chat request (each choice gets its own state): the forced tool call of
    tool_choice "required" / a named function, or the response_format; None for a free answer."""
    from nanoseek.engine import grammar
    forced = tools.forced if tools is not None else None
    fmt = req.response_format is not None and req.response_format.type != "text"
    if forced is not None and fmt:
        raise APIError(400, f"tool_choice {forced!r} forces a tool call, response_format a JSON answer: give one",
                       param="response_format")
    if prefix and (forced is not None or fmt):
        param = "tool_choice" if forced is not None else "response_format"
        raise APIError(400, f"{param} cannot constrain a continued (prefix=true) assistant message", param=param)
    if forced is not None:
        return await state.constraint(lambda: grammar.tool_calls(tools.functions, forced, tools.parallel), ids,
                                      "tool_choice")
    return await state.response_format(req, ids)


def _render_chat(messages: list[P.ChatMessage], thinking: bool, add_generation_prompt: bool,
                 tools: Optional[list[dict]] = None) -> str:
    from nanoseek.chat import encode_messages
    msgs = []
    for m in messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            d["reasoning_content"] = reasoning
        if m.prefix:
            d["prefix"] = True
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        msgs.append(d)
    try:
        return encode_messages(msgs, add_generation_prompt=add_generation_prompt, thinking=thinking, tools=tools)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None


def _prompts(state: _State, req: P.CompletionRequest) -> list[tuple[list[int], str]]:
    """The request's prompt(s) as (token ids, text to echo)."""
    from nanoseek.chat import fim_prompt
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if req.suffix is not None and not all(isinstance(x, str) for x in items):
        raise APIError(400, "suffix (fill-in-the-middle) needs a text prompt", param="suffix")
    out = []
    for x in items:
        if isinstance(x, str):
            text = fim_prompt(x, req.suffix) if req.suffix is not None else x
            out.append((state.encode(text, True, "prompt"), x))
        else:
            state.check_ids(x, "prompt")
            if not x:
                raise APIError(400, "prompt must not be empty", param="prompt")
            out.append((list(x), state.tokenizer.decode(x, skip_special_tokens=False)))
    return out


# ---- logprobs formats -----------------------------------------------------------------------------------------
def _top_entry(state: _State, tid: int, lp: float) -> dict:
    return {"token": state.token_str(tid), "logprob": lp, "bytes": state.token_bytes(tid)}


def _chat_logprob(state: _State, lp) -> dict:
    d = _top_entry(state, lp.token_id, lp.logprob)
    d["top_logprobs"] = [_top_entry(state, t, v) for t, v in lp.top]
    return d


def _legacy_logprobs(state: _State, entries: list, offset: int) -> dict:
    """(token id, TokenLogprob | None) pairs -> {tokens, token_logprobs, top_logprobs, text_offset}."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in entries:
        s = state.token_str(tid)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        token_lps.append(None if lp is None else lp.logprob)
        if lp is None:
            tops.append(None)
        else:
            top: dict[str, float] = {}
            for t, v in lp.top:  # best first; two ids that decode alike keep the better logprob
                top.setdefault(state.token_str(t), v)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# ---- streaming --------------------------------------------------------------------------------------------------
async def _sse_stream(rid: str, fan: _Fanout, choices: list[_Choice], events: AsyncIterator[str]):
    """The SSE body around a stream's events: an engine failure mid-stream is reported in-band; the requests are
    cancelled (blocks freed) however the stream ends; `data: [DONE]` always closes it."""
    try:
        async for event in events:
            yield event
    except _ShuttingDown as e:
        yield _sse(e.api_error().body())
    except Exception as e:
        log.exception("error while streaming %s", rid)
        yield _sse(APIError(500, f"{type(e).__name__}: {e}", "internal_error").body())
    finally:
        await events.aclose()
        fan.cancel()
        for c in choices:
            c.abandoned()
    yield "data: [DONE]\n\n"


async def _chat_events(state: _State, fan: _Fanout, choices: list[_Choice], rid: str, created: int, model: str,
                       include_usage: bool):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict, finish: Optional[str] = None, logprobs=None) -> str:
        return _sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}], **extra})

    for i in range(len(choices)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, out in fan:
        c = choices[i]
        c.observe(out)
        r, t, calls = c.chat_delta(out)
        delta: dict[str, Any] = {}
        if r:
            delta["reasoning_content"] = r
        if t:
            delta["content"] = t
        if calls:
            delta["tool_calls"] = calls
        lps = ({"content": [_chat_logprob(state, lp) for lp in out.new_logprobs]}
               if out.new_logprobs else None)
        if delta or lps:
            yield chunk(i, delta, None, lps)
        if out.finished:
            yield chunk(i, {}, c.finish_reason)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(
            choices[0].n_prompt, sum(c.num_generated for c in choices))})


async def _completion_events(state: _State, req: P.CompletionRequest, fan: _Fanout, choices: list[_Choice],
                             meta: list, rid: str, created: int, model: str, include_usage: bool):
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(choices)

    def chunk(i: int, text: str, entries: list, finish: Optional[str]) -> str:
        lp = None
        if req.logprobs is not None:
            lp = _legacy_logprobs(state, entries, offsets[i])
            offsets[i] += sum(len(s) for s in lp["tokens"])
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}],
                     **extra})

    echoed = [False] * len(choices)
    async for i, out in fan:
        ids, prompt_text, keep = meta[i]
        c = choices[i]
        text, entries = "", []
        if req.echo and not echoed[i]:  # the prompt goes out with the first chunk of each choice
            echoed[i] = True
            text = prompt_text
            if out.prompt_logprobs is not None:
                entries = list(zip(ids, out.prompt_logprobs))
        if keep:
            c.observe(out)
            text += out.new_text
            entries += [(lp.token_id, lp) for lp in (out.new_logprobs or [])]
        elif out.finished:
            c.finish_reason = "length"
            c.state.metrics.sequence_done("length", c.n_prompt, 0, time.perf_counter() - c.t0)
        if text or entries or out.finished:
            yield chunk(i, text, entries, c.finish_reason if out.finished else None)
    if include_usage:
        n_prompt = sum(len(ids) for ids, _, _ in meta[::req.n])
        yield _sse({**base, "choices": [], "usage": _usage(
            n_prompt, sum(c.num_generated for c, m in zip(choices, meta) if m[2]))})


# ---- running it -----------------------------------------------------------------------------------------------
def _uvicorn_server(state: _State, app, **kw):
    """uvicorn's Server, which also tells open requests to end as soon as shutdown starts: uvicorn would otherwise
    wait out its graceful period, then cancel them mid-response (a CancelledError traceback, no [DONE])."""
    import socket

    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class NoDelay(AutoHTTPProtocol):
        # asyncio leaves Nagle's algorithm on for accepted connections, and uvicorn writes a response's head and
        # body (and each SSE event) separately: the second small write then waited for the client's delayed ACK,
        # 40 ms on every non-streamed answer (/health took 44 ms) and between stream chunks
        def connection_made(self, transport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            state.stopping()

    return Server(uvicorn.Config(app, http=NoDelay, timeout_graceful_shutdown=3, **kw))


class ServerThread:
    """The server in a background thread of this process (tests, benches, notebooks):

        with ServerThread(ServeConfig(model_dir)) as srv:
            srv.wait_ready(); openai.OpenAI(base_url=srv.url + "/v1", api_key="-")...
    """

    def __init__(self, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 0):
        import socket

        self.app = create_app(cfg)
        self.state: _State = self.app.state.nanoseek
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))  # port 0: a free port, known before the server starts
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.server = _uvicorn_server(self.state, self.app, log_level="warning")
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "ServerThread":
        """Block until the model is loaded (what /health reports)."""
        t_end = time.monotonic() + timeout
        while self.state.aengine is None:
            if self.state.load_error or time.monotonic() > t_end:
                raise RuntimeError(f"the model did not load: {self.state.load_error or 'timeout'}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.state.stopping()
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()


# ---- nanoseek serve -----------------------------------------------------------------------------------------
def cli(cmd: str, argv: list[str]) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="nanoseek serve", description="OpenAI-compatible server with a chat page.")
    ap.add_argument("model_dir", help="a Hugging Face model folder (config.json, safetensors, tokenizer.json) "
                                      "or a llama.cpp .gguf file")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--allowed-hosts", help="comma-separated Host header names to answer, '*' for any (default: the "
                    "loopback names when bound to the loopback without a key, against DNS rebinding; else any); "
                    "e.g. the name a reverse proxy forwards")
    ap.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else none)")
    ap.add_argument("--served-model-name", default=None, help="model name clients use (default: folder name)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 where the device computes it natively and fast (GPUs, CPUs with AVX-512 "
                         "BF16, AMX or ARM BF16), else float32")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    ap.add_argument("--cache-gb", type=float, default=None, help="KV-cache budget in GiB (default: the engine's)")
    from nanoseek.model.kv_quant import KV_CACHE_DTYPES
    ap.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                    help="KV-cache rows: auto = the model's dtype; fp8 | int8 = 8 bits with scales (~2x the tokens)")
    ap.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    ap.add_argument("--max-waiting", type=int, default=64, help="queued requests before 503")
    ap.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    ap.add_argument("--num-draft", type=int, default=1, help="MTP draft tokens per step")
    ap.add_argument("--lora", metavar="NAME=PATH", help="serve model_dir with this LoRA adapter (PEFT format) merged "
                    "in, under the model name NAME")
    from nanoseek.quant import add_arguments
    add_arguments(ap)
    ap.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                    help=f"largest request body accepted; larger ones get a 413 before they are read (default: "
                         f"{DEFAULT_MAX_REQUEST_BYTES} = {DEFAULT_MAX_REQUEST_BYTES >> 20} MiB)")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = ap.parse_args(argv)

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file() and not _is_gguf(model_dir):
        print(f"nanoseek serve: {model_dir} is not a model folder (no config.json) nor a .gguf file", file=sys.stderr)
        return 2
    for name, v in (("--port", args.port), ("--max-batch-size", args.max_batch_size),
                    ("--block-size", args.block_size), ("--max-waiting", args.max_waiting),
                    ("--num-draft", args.num_draft), ("--max-request-bytes", args.max_request_bytes)):
        if v < (0 if name == "--port" else 1) or (name == "--port" and v > 65535):
            print(f"nanoseek serve: invalid {name} {v}", file=sys.stderr)
            return 2
    lora = None
    if args.lora is not None:
        name, _, adapter = args.lora.partition("=")
        if not name.strip() or not (Path(adapter) / "adapter_config.json").is_file():
            print(f"nanoseek serve: --lora {args.lora}: give NAME=PATH, PATH an adapter folder (adapter_config.json)",
                  file=sys.stderr)
            return 2
        if args.served_model_name is not None:
            print("nanoseek serve: --lora NAME=PATH names the model; drop --served-model-name", file=sys.stderr)
            return 2
        lora = (name.strip(), adapter)
    api_key = None if args.api_key is None else args.api_key.strip()
    if api_key == "":  # never a server that a bare 'Bearer' passes, nor a silent fallback to none
        print("nanoseek serve: the API key (--api-key or NANOSEEK_API_KEY) is empty; give a key, or unset it to serve "
              "without one", file=sys.stderr)
        return 2
    loopback = args.host in LOOPBACK
    if args.allowed_hosts is not None:
        hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
        trusted = None if "*" in hosts else hosts
    else:
        trusted = list(LOOPBACK) + ["[::1]"] if loopback and api_key is None else None
    cfg = ServeConfig(model_dir=str(model_dir), served_model_name=args.served_model_name, api_key=api_key,
                      trusted_hosts=trusted,
                      dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
                      block_size=args.block_size,
                      cache_bytes=None if args.cache_gb is None else int(args.cache_gb * 2**30),
                      kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
                      max_waiting=args.max_waiting,
                      speculative=args.speculative, num_draft=args.num_draft, lora=lora,
                      quantize=args.quantize, quant_group_size=args.quant_group_size,
                      max_request_bytes=args.max_request_bytes)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not loopback and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", args.host)
    failed = threading.Event()
    server: Optional[uvicorn.Server] = None

    def on_fatal(e: BaseException) -> None:
        failed.set()
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(cfg, on_fatal=on_fatal)
    except (OSError, ValueError) as e:
        from nanoseek.cli import error
        return error("nanoseek serve", e, 2, prefix="")
    # a short graceful period (3 s): a stream that does not end when told is cut after it
    server = _uvicorn_server(app.state.nanoseek, app, host=args.host, port=args.port, log_level=args.log_level)
    log.info("serving %s as %r on http://%s:%d (chat page at /)", model_dir, app.state.nanoseek.name,
             args.host, args.port)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down cleanly
        pass
    log.info("nanoseek serve: shut down")
    return 1 if failed.is_set() else 0
