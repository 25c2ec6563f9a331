"""/v1/responses (the OpenAI Responses API) against a live server, driven by `client.responses.create`.

Same tiny model and forced text as tests/test_server_tools.py: the engine generates the given tokens and the
server translates the chat path's real output into Responses items and events.
"""
from __future__ import annotations

import json

import httpx
import pytest
from test_server_tools import USER, calls_text, client, forcing, n_prompt, srv  # noqa: F401  (srv: fixture)

from nanoseek.chat import encode_messages

FLAT_TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CHAT_TOOLS = [{"name": t["name"], "description": t["description"], "parameters": t["parameters"]}
              for t in FLAT_TOOLS]


def events(c, **kw) -> list:
    return list(c.responses.create(stream=True, **kw))


def test_text_with_and_without_streaming(srv):
    c = client(srv)
    with forcing(srv, "Hello there, friend.", "Hello there, friend."):
        r = c.responses.create(model="tools-tiny", input="Greet me", instructions="Be kind.", max_output_tokens=40)
        evs = events(c, model="tools-tiny", input="Greet me", instructions="Be kind.", max_output_tokens=40)
    assert r.object == "response" and r.status == "completed" and r.output_text == "Hello there, friend."
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Greet me"}]
    assert r.usage.input_tokens == n_prompt(srv, msgs)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    types = [e.type for e in evs]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    deltas = [e.delta for e in evs if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "Hello there, friend."
    final = evs[-1].response
    assert final.output_text == "Hello there, friend." and final.usage.input_tokens == r.usage.input_tokens


def test_reasoning_and_function_call_round_trip(srv):
    c = client(srv)
    text = "Need the weather tool.</think>" + calls_text(("get_weather", {"city": "Kyoto"}))
    kw = dict(model="tools-tiny", input=USER, tools=FLAT_TOOLS, reasoning={"effort": "medium"}, max_output_tokens=400)
    with forcing(srv, text, text):
        r = c.responses.create(**kw)
        evs = events(c, **kw)
    assert [o.type for o in r.output] == ["reasoning", "function_call"] and r.status == "completed"
    assert r.output[0].content[0].text == "Need the weather tool."
    call = r.output[1]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and json.loads(call.arguments) == {
        "city": "Kyoto"}
    assert r.usage.input_tokens == n_prompt(srv, USER, thinking=True, tools=CHAT_TOOLS)

    types = [e.type for e in evs]
    assert "response.reasoning_text.delta" in types and types[-1] == "response.completed"
    assert "".join(e.delta for e in evs if e.type == "response.reasoning_text.delta") == "Need the weather tool."
    arg_deltas = [e.delta for e in evs if e.type == "response.function_call_arguments.delta"]
    assert len(arg_deltas) > 3 and "".join(arg_deltas) == call.arguments
    (done,) = [e for e in evs if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments
    assert [o.type for o in evs[-1].response.output] == ["reasoning", "function_call"]

    # the output items go back as input with the function's result; the prompt is that chat conversation
    items = [{"role": "user", "content": "Weather in Paris?"}] + [o.model_dump(exclude_none=True) for o in r.output]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "snow"})
    with forcing(srv, "Snow, it says.</think>It snows in Kyoto."):
        r2 = c.responses.create(model="tools-tiny", input=items, tools=FLAT_TOOLS, reasoning={"effort": "high"},
                                max_output_tokens=60)
    assert r2.output_text == "It snows in Kyoto." and r2.output[0].type == "reasoning"
    chat_msgs = USER + [{"role": "assistant", "content": None, "reasoning_content": "Need the weather tool.",
                         "tool_calls": [{"id": call.call_id, "type": "function",
                                         "function": {"name": "get_weather", "arguments": call.arguments}}]},
                        {"role": "tool", "tool_call_id": call.call_id, "content": "snow"}]
    assert r2.usage.input_tokens == len(srv.state.tokenizer.encode(
        encode_messages(chat_msgs, thinking=True, tools=CHAT_TOOLS)))


def test_incomplete_when_max_output_tokens_cuts(srv):
    c = client(srv)
    with forcing(srv, "a long answer that will not fit", "a long answer that will not fit"):
        r = c.responses.create(model="tools-tiny", input="Talk", max_output_tokens=3)
        evs = events(c, model="tools-tiny", input="Talk", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    assert evs[-1].type == "response.incomplete" and evs[-1].response.output_text == r.output_text


def test_responses_validation(srv):
    def post(**body):
        return httpx.post(srv.url + "/v1/responses", json={"input": "hi", **body}, timeout=60)

    for body, param in [({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
                        ({"input": []}, "input"),
                        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
                        ({"tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice")]:
        r = post(**body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.json())
    r = post(tools=[{"type": "web_search"}])
    assert r.status_code == 400 and "tools" in r.json()["error"]["param"]
    assert post(store=False, max_output_tokens=1).status_code == 200


def test_responses_structured_output_and_forced_call(srv):
    """text.format and tool_choice "required" go through the chat route's grammar constraint: no forcing needed."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "rain": {"type": "boolean"}},
              "required": ["city", "rain"], "additionalProperties": False}
    c = client(srv)
    r = c.responses.create(model="tools-tiny", input="Weather?", temperature=1.0, max_output_tokens=200,
                           text={"format": {"type": "json_schema", "name": "w", "schema": schema, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    tool = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}
    r = c.responses.create(model="tools-tiny", input="Weather?", tools=[tool], tool_choice="required",
                           temperature=1.0, max_output_tokens=300, parallel_tool_calls=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", r.output
    jsonschema.validate(json.loads(calls[0].arguments), tool["parameters"])
