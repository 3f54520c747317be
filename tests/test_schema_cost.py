"""Schemas llguidance's own limits do not bound are refused before they are compiled: each one
here crashed the backend, held it for seconds to minutes, or slowed every token of every
sequence (bench/fuzz_schemas.py found them)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from backends.runtime import BackendError, schema_cost
from tests.conftest import Gateway, write_model


def ref_chain(links: int) -> dict[str, Any]:
    """An object whose one property is the next definition, `links` deep."""
    definitions: dict[str, Any] = {
        f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}}
        for i in range(links)
    }
    definitions[f"d{links}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": definitions}


COSTLY = {
    # 939 links crashed the backend (a native stack overflow in llguidance's compiler).
    "a chain of 1000 $refs": (ref_chain(1000), "through $ref, more than 256 levels"),
    "a cycle of 1000 $refs": (
        {**ref_chain(1000), "$defs": {**ref_chain(1000)["$defs"], "d1000": {"$ref": "#"}}},
        "through $ref",
    ),
    # 2^31 ran for over 40 s and 2.7 GB; 3 x 2^20 took 7 s.
    "multipleOf 2^31": ({"type": "integer", "multipleOf": 2**31}, "multipleOf 2147483648"),
    "multipleOf 3 x 2^20": ({"type": "integer", "multipleOf": 3 * 2**20}, "multipleOf"),
    # About 1 µs a character on every token while it can come next: 64,000 took 81 ms a token.
    "a 64,000-character const": ({"const": "x" * 64_000}, "64000 characters"),
    "a long property name": (
        {"type": "object", "properties": {"k" * 5000: {"type": "string"}}},
        "5000 characters",
    ),
    # 313 patterns took 24 s and 4.9 GB before llguidance refused them; 1024 aborted it.
    "an allOf of 300 patterns": (
        {"type": "string", "allOf": [{"pattern": f"^.*a{i}.*$"} for i in range(300)]},
        "intersects 300 patterns",
    ),
    # 2838 optional properties took 0.5 s to compile, 16,384 took 6.8 s.
    "3000 properties": (
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}},
        "over 2000 properties",
    ),
    "a 300 kB schema": ({"enum": ["v" * 1000] * 300}, "characters of JSON"),
}


@pytest.mark.parametrize("case", COSTLY)
def test_a_schema_too_costly_to_compile_is_refused_with_the_reason(case: str) -> None:
    schema, words = COSTLY[case]
    with pytest.raises(BackendError) as refused:
        schema_cost.check(schema, "response_format")
    error = refused.value
    assert (error.reason, error.param) == ("schema_too_complex", "response_format")
    assert words in error.message


REASONABLE = {
    # What applications send: nested pydantic models, recursion, big enums, bounded multiples.
    "recursive tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
            }
        },
        "$ref": "#/$defs/node",
    },
    "a chain of 100 $refs": ref_chain(100),
    "enum of 2000 values": {"enum": [f"value-{i}" for i in range(2000)]},
    "multipleOf 0.01": {"type": "number", "multipleOf": 0.01},
    "multipleOf 5000": {"type": "integer", "multipleOf": 5000},
    "multipleOf 25 million": {"type": "integer", "multipleOf": 25_000_000},
    "1000 properties": {
        "type": "object",
        "properties": {f"p{i}": {"type": "integer"} for i in range(1000)},
    },
    "a 2000-character pattern": {"type": "string", "pattern": "^" + "a?" * 999 + "$"},
}


@pytest.mark.parametrize("case", REASONABLE)
def test_a_reasonable_schema_passes_the_check(case: str) -> None:
    schema_cost.check(REASONABLE[case], "response_format")


@pytest.mark.llama
def test_a_ref_chain_that_crashed_the_backend_is_a_400_and_it_lives_on(gateway: Gateway) -> None:
    messages = [{"role": "user", "content": "hi"}]
    plain = {"model": "tiny-llama", "messages": messages, "max_tokens": 2}
    costly = {
        **plain,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "chain", "schema": ref_chain(1000)},
        },
    }
    # The tools are written into the prompt too: a shorter chain, and a context that holds it.
    tool = {"type": "function", "function": {"name": "deep", "parameters": ref_chain(130)}}
    wide = "backend: llama\nmodel: tiny-llama.gguf\ncontext_size: 16384\nparallel: 1"
    write_model(gateway.models_dir, "tiny-llama-wide", wide)
    forced = {**plain, "model": "tiny-llama-wide", "tools": [tool], "tool_choice": "required"}
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        for model in ("tiny-llama", "tiny-llama-wide"):
            answer = http.post("/v1/chat/completions", json={**plain, "model": model})
            assert answer.status_code == 200, answer.text
        before = gateway.backend_pids()
        for body, param in ((costly, "response_format"), (forced, "tools")):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("schema_too_complex", param)
            assert "256 levels" in error["message"]
        assert http.post("/v1/chat/completions", json=plain).status_code == 200
        assert gateway.backend_pids() == before, "the same backend process answered"
