"""What keeps one request from stalling the server: a body size limit, and input-sized work off the event loop.

The event loop serves every connection (every stream's next chunk, /health), so nothing whose cost grows with a
request's size may run on it. Three pieces:
- `BodyLimit`, ASGI middleware: a body larger than the limit is refused with 413 before anything parses it, by
  its Content-Length, or, for a chunked body, as soon as the bytes received cross the limit.
- `parse_body`: JSON parsing and pydantic validation in a worker thread (FastAPI does both on the loop: 3.5 MB of
  chat messages take ~0.7 s to validate). Routes that use it declare their body through `body_schema` so the
  OpenAPI schema still describes it, and `add_body_schemas` puts those models into the schema's components.
- `json_response`: a large response body (a long /tokenize answer) is encoded in a worker thread too.
The routes run tokenization, chat rendering and detokenization through `asyncio.to_thread` the same way.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter, ValidationError

Body = TypeVar("Body", bound=BaseModel)
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: ~1M tokens of text, far past any context this server runs


def _too_large(limit: int) -> bytes:
    return json.dumps({"error": {
        "message": f"the request body is larger than this server accepts ({limit} bytes; --max-request-bytes)",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()


class _TooLarge(Exception):
    """Raised from `receive` when a chunked body crosses the limit (caught by BodyLimit, which answers 413)."""


class BodyLimit:
    """ASGI middleware: 413 (OpenAI error shape) for a body over `limit` bytes, before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send) -> None:
        body = _too_large(self.limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1  # the HTTP server already refuses a malformed length
                if declared > self.limit:
                    return await self._refuse(send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)


SLICE = 512  # list items validated per call: each call holds the interpreter lock ~2 ms, then the loop may run


async def parse_body(request: Request, model: type[Body], sliced: Optional[tuple[str, type[BaseModel]]] = None
                     ) -> Body:
    """The request body validated as `model`, in a worker thread; errors become the same 400s as FastAPI's own
    body validation (its RequestValidationError handler shapes them).

    Parsing and validation are single calls into C and Rust that hold the interpreter lock throughout, so even in
    a worker thread they would block the event loop for as long as they take: JSON parsing is bounded by the body
    limit (~40 ms for 4 MiB of small objects here), but validating a list of models is slower (~4 us a message:
    0.6 s for 4 MiB of chat messages). `sliced` = (field, item model) names such a list: its items are validated
    SLICE at a time, and the model then takes the validated items as they are."""
    raw = await request.body()

    def invalid(errors: list) -> RequestValidationError:
        return RequestValidationError(errors)

    def validate() -> Body:
        try:
            data = json.loads(raw) if raw else None
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise invalid([{"type": "json_invalid", "loc": (), "msg": "JSON decode error",
                            "ctx": {"error": str(e)}}]) from None
        if sliced is not None and isinstance(data, dict) and isinstance(data.get(sliced[0]), list):
            name, item = sliced
            adapter = TypeAdapter(list[item])
            values, done = data[name], []
            for i in range(0, len(values), SLICE):
                try:
                    done += adapter.validate_python(values[i:i + SLICE])
                except ValidationError as e:
                    raise invalid([{**err, "loc": (name, err["loc"][0] + i, *err["loc"][1:])}
                                   for err in e.errors(include_url=False, include_input=False)]) from None
            data = {**data, name: done}
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise invalid(e.errors(include_url=False, include_input=False)) from None

    return await asyncio.to_thread(validate)


def body_schema(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that reads its body with `parse_body`."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def add_body_schemas(app: FastAPI, models: list[type[BaseModel]],
                     extend: Optional[Callable[[dict], None]] = None) -> None:
    """Make app.openapi() include `models` (and the models they use) in components/schemas, then apply `extend`
    (e.g. links between operations) to the finished schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in models:
                s = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[m.__name__] = s
            if extend is not None:
                extend(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def int_list_json(ids: list[int]) -> str:
    """A long list of ints as JSON, encoded a slice at a time (one json.dumps of 1M ints holds the lock ~20 ms)."""
    return "[" + ",".join(json.dumps(ids[i:i + 65536])[1:-1] for i in range(0, len(ids), 65536)) + "]"


async def json_response(build: Callable[[], str]) -> Response:
    """A JSON response whose body `build` computes and encodes in a worker thread."""
    return Response(await asyncio.to_thread(build), media_type="application/json")
