"""Structured output over HTTP with the official `openai` client: `response_format` json_schema / json_object on
/v1/chat/completions (and /v1/completions), enforced by grammar-constrained decoding on a tiny random model."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from nanoseek.server.api import ServeConfig, ServerThread
from test_server import KEY, client, tiny_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "temp": {"type": "integer", "minimum": -40, "maximum": 50},
        "sky": {"enum": ["clear", "cloudy", "rain"]},
        "wind": {"type": "object", "properties": {"kmh": {"type": "number", "minimum": 0, "maximum": 200},
                                                  "gusts": {"type": "boolean"}},
                 "required": ["kmh", "gusts"], "additionalProperties": False},
        "alerts": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["city", "temp", "sky", "wind", "alerts"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
MODEL = "nanoseek-tiny"
MESSAGES = [{"role": "user", "content": "The weather in Paris, as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("grammar") / "nanoseek-tiny")
    with ServerThread(ServeConfig(str(model_dir), api_key=KEY, max_model_len=512)) as srv:
        yield srv.wait_ready()


def test_json_schema_outputs_validate_for_20_seeds(server):
    c = client(server)
    texts = set()
    for seed in range(20):
        r = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=300,
                                      response_format=FORMAT)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        texts.add(choice.message.content)
    assert len(texts) > 10


def test_n_choices_streaming_and_text(server):
    """n choices each follow the grammar (their own matcher state); streamed deltas join into valid output;
    "text" is the unconstrained default. (Thinking mode: tests/test_grammar.py, where the model is nudged to
    close its reasoning.)"""
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, seed=5, n=3, max_tokens=300,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "w", "schema": SCHEMA["properties"]["wind"]}})
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), SCHEMA["properties"]["wind"])
    parts = []
    for chunk in c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, seed=1, max_tokens=300,
                                           response_format=FORMAT, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    jsonschema.validate(json.loads("".join(parts)), SCHEMA)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=200,
                                  response_format={"type": "text"})
    assert r.choices[0].message.content == c.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=200).choices[0].message.content


def test_completions_endpoint_takes_response_format(server):
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": MODEL, "prompt": "Weather:", "max_tokens": 300, "temperature": 1.0, "seed": 3, "n": 2,
        "response_format": FORMAT})
    assert r.status_code == 200, r.text
    for ch in r.json()["choices"]:
        assert ch["finish_reason"] == "stop"
        jsonschema.validate(json.loads(ch["text"]), SCHEMA)


@pytest.mark.parametrize("fmt,param,words", [
    ({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}},
     "response_format.json_schema.schema", "nonsense"),
    ({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "format": "no-such-format"}}}, "strict": True}},
     "response_format.json_schema.schema", "format"),
    ({"type": "json_schema"}, "response_format", "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "w", "schema": "{}"}}, "response_format.json_schema.schema",
     "dict"),
    ({"type": "xml"}, "response_format.type", "json_object"),
])
def test_bad_formats_are_400s_naming_the_field(server, fmt, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, response_format=fmt)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err
