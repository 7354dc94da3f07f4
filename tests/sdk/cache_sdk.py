"""The response cache through the official `openai` Python SDK, unmodified (installed by scripts/setup.sh into
.tools/python from tests/sdk/requirements.txt): answers stored from one kind of request (streamed or not) and
replayed to the other, read by the SDK's stream iterator and its stream helper. Prints what the SDK returned (and
the `x-cache` header) as one JSON object; tests/tests/cache.rs asserts on it.

    .tools/python/bin/python tests/sdk/cache_sdk.py <gateway base URL> <API key of a caching key> <marker> store|replay

`store` makes the first request of each pair; `replay` the others, once the caller has seen the gateway log that
it stored them. Each call sends `x-client-request-id: <marker>-py-<call>`.
"""

import json
import sys

from openai import OpenAI

base, api_key, marker, phase = sys.argv[1:5]
client = OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=30)
MODEL = "openai/gpt-4o-mini"

PLAIN = dict(model=MODEL, temperature=0, max_tokens=64, messages=[{"role": "user", "content": f"py plain {marker}"}])
PLAIN_STANDIN = {"standin": {"chunks": 4}}
TOOLS = dict(
    model=MODEL,
    temperature=0,
    messages=[{"role": "user", "content": f"py tools {marker}"}],
    tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
)
TOOLS_STANDIN = {"standin": {"tool_call": {"name": "lookup", "arguments": json.dumps({"q": marker})}}}


def headers(name):
    return {"x-client-request-id": f"{marker}-py-{name}"}


def summary(completion):
    return {
        "id": completion.id,
        "object": completion.object,
        "choices": [
            {
                "content": c.message.content,
                "finish_reason": c.finish_reason,
                "tool_calls": [
                    {"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                    for t in (c.message.tool_calls or [])
                ],
            }
            for c in completion.choices
        ],
        "usage": completion.usage.model_dump() if completion.usage else None,
    }


def iterate(stream):
    out = {"ids": [], "chunks": 0, "content": "", "finish_reason": None, "usage": None}
    for chunk in stream:
        out["chunks"] += 1
        if chunk.id not in out["ids"]:
            out["ids"].append(chunk.id)
        if chunk.usage:
            out["usage"] = chunk.usage.model_dump()
        for choice in chunk.choices:
            out["content"] += choice.delta.content or ""
            out["finish_reason"] = choice.finish_reason or out["finish_reason"]
    return out


def plain_body():
    raw = client.chat.completions.with_raw_response.create(**PLAIN, extra_body=PLAIN_STANDIN, extra_headers=headers("plain_body"))
    return {"x_cache": raw.headers.get("x-cache"), **summary(raw.parse())}


def tools_stream():
    raw = client.chat.completions.with_raw_response.create(
        **TOOLS, stream=True, extra_body=TOOLS_STANDIN, extra_headers=headers("tools_stream")
    )
    return {"x_cache": raw.headers.get("x-cache"), **iterate(raw.parse())}


def plain_stream():
    raw = client.chat.completions.with_raw_response.create(
        **PLAIN,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=PLAIN_STANDIN,
        extra_headers=headers("plain_stream"),
    )
    return {"x_cache": raw.headers.get("x-cache"), **iterate(raw.parse())}


def plain_helper():
    with client.chat.completions.stream(**PLAIN, extra_body=PLAIN_STANDIN, extra_headers=headers("plain_helper")) as s:
        return summary(s.get_final_completion())


def tools_body():
    raw = client.chat.completions.with_raw_response.create(**TOOLS, extra_body=TOOLS_STANDIN, extra_headers=headers("tools_body"))
    return {"x_cache": raw.headers.get("x-cache"), **summary(raw.parse())}


PHASES = {
    "store": [plain_body, tools_stream],
    "replay": [plain_stream, plain_helper, tools_body],
}

results = {}
for call in PHASES.get(phase, []):
    try:
        results[call.__name__] = {"ok": True, **call()}
    except Exception as e:  # reported, asserted on by the caller
        results[call.__name__] = {"ok": False, "error": type(e).__name__, "message": str(e)}
print(json.dumps(results))
