"""`hearth models list` shows what the models dir holds, and what is wrong with it."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import hearth, write_model


def test_models_list(tmp_path: Path) -> None:
    (tmp_path / "here.gguf").write_bytes(b"x")
    write_model(tmp_path, "present", "backend: llama\nmodel: here.gguf")
    write_model(tmp_path, "absent", "backend: llama\nmodel: gone.gguf")
    write_model(tmp_path, "echo", "backend: echo")
    result = hearth("models", "list", "--models-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "absent\tllama\tgone.gguf (missing)",
        "echo\techo\t-",
        "present\tllama\there.gguf",
    ]


def test_models_list_reports_broken_files_and_fails(tmp_path: Path) -> None:
    write_model(tmp_path, "ok", "backend: echo")
    write_model(tmp_path, "bad", "backend: echo\ncontext_size: big")
    result = hearth("models", "list", "--models-dir", str(tmp_path))
    assert result.returncode == 1
    assert "ok\techo" in result.stdout
    assert "bad.yaml: context_size: expected `int" in result.stderr
