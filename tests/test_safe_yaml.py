"""YAML we did not write: too large, aliases that expand too far, or nesting too deep is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, load_catalog, load_model_file
from gateway.gallery import load_gallery
from gateway.safe_yaml import MODEL_FILE_LIMITS, YAMLLimitError, load_yaml
from tests.conftest import Gateway, write_model


def billion_laughs(key: str = "options", indent: str = "  ") -> str:
    """Nine anchors, each a list of nine aliases of the one before: 9**9 strings expanded, in
    under 450 bytes."""
    lines = [f'{indent}a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, anchor in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{indent}{anchor}: &{anchor} [" + ",".join([f"*{previous}"] * 9) + "]")
    return f"{key}:\n" + "\n".join(lines) + "\n"


def test_a_billion_laughs_model_file_is_refused_and_the_others_still_load(tmp_path: Path) -> None:
    write_model(tmp_path, "good", "backend: echo")
    laughs = write_model(tmp_path, "lol", "backend: echo\n" + billion_laughs())
    assert laughs.stat().st_size < 500
    catalog = load_catalog(tmp_path)
    assert list(catalog.models) == ["good"]
    assert catalog.errors == [
        f"{laughs}: refused: with its aliases expanded it is larger than 2 MiB, "
        "the limit for a model file"
    ]


def test_the_gateway_serves_the_other_models_and_404s_the_refused_one(tmp_path: Path) -> None:
    write_model(tmp_path, "good", "backend: echo")
    write_model(tmp_path, "lol", "backend: echo\n" + billion_laughs())
    gateway = Gateway(tmp_path).start()
    try:
        listed = httpx.get(f"{gateway.url}/v1/models", timeout=10)
        assert [m["id"] for m in listed.json()["data"]] == ["good"]
        asked = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "lol", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert asked.status_code == 404, asked.text
        assert asked.json()["error"]["param"] == "model"
        assert "refused: with its aliases expanded" in gateway.log()
    finally:
        gateway.cleanup()


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    template = "x" * (MODEL_FILE_LIMITS.file_bytes + 1)
    path = write_model(tmp_path, "big", f"backend: echo\nchat_template: '{template}'")
    with pytest.raises(ConfigError) as caught:
        load_model_file(path, tmp_path)
    assert str(caught.value) == f"{path}: refused: larger than 1 MiB, the limit for a model file"


def test_a_file_with_a_few_anchors_and_aliases_still_loads(tmp_path: Path) -> None:
    path = write_model(
        tmp_path,
        "anchored",
        "backend: echo\n"
        "options:\n"
        "  stop: &stop ['</s>', '<|end|>']\n"
        "  base: &base {beam_size: 5, language: en}\n"
        "  fast: {<<: *base, beam_size: 1}\n"
        "  stops: [*stop, *stop]\n"
        "parameters: {temperature: 0.3, stop: *stop}",
    )
    config = load_model_file(path, tmp_path)
    assert config.parameters.stop == ["</s>", "<|end|>"]
    assert config.options["fast"] == {"beam_size": 1, "language": "en"}
    assert config.options["stops"] == [["</s>", "<|end|>"]] * 2


def test_nesting_past_the_limit_is_refused_before_python_runs_out_of_stack() -> None:
    depth = MODEL_FILE_LIMITS.depth
    expected: list[Any] = []
    for _ in range(depth - 2):
        expected = [expected]
    assert load_yaml("[" * (depth - 1) + "]" * (depth - 1), source="fine") == expected
    for deep in ("[" * (depth + 1) + "]" * (depth + 1), "[" * 100_000 + "]" * 100_000):
        with pytest.raises(YAMLLimitError, match=f"deep: refused: nested deeper than {depth}"):
            load_yaml(deep, source="deep")


def test_nesting_through_aliases_counts_as_expanded() -> None:
    half = MODEL_FILE_LIMITS.depth // 2 + 1
    text = f"a: &a {'[' * half}1{']' * half}\nb: {'[' * half}*a{']' * half}\n"
    with pytest.raises(YAMLLimitError, match="nested deeper than"):
        load_yaml(text, source="aliased")


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(YAMLLimitError, match="an alias refers to a node that contains it"):
        load_yaml("a: &a [1, *a]\n", source="loop")


def test_what_python_cannot_construct_is_a_broken_file_not_a_crash(tmp_path: Path) -> None:
    write_model(tmp_path, "good", "backend: echo")
    write_model(tmp_path, "huge", "backend: echo\nthreads: " + "9" * 5000)
    catalog = load_catalog(tmp_path)
    assert list(catalog.models) == ["good"]
    assert "huge.yaml: not valid YAML" in catalog.errors[0]


def test_a_billion_laughs_gallery_index_is_refused(tmp_path: Path) -> None:
    index = tmp_path / "index.yaml"
    index.write_text("entries: []\n" + billion_laughs("extra"))
    with pytest.raises(ConfigError, match="larger than 16 MiB, the limit for a gallery index"):
        load_gallery(index)
