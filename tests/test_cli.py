"""`hearth models list` shows what the models dir holds, whether each model fits this machine,
and what is wrong with the files."""

from __future__ import annotations

from pathlib import Path

from gateway.cli import render_backends
from tests.conftest import hearth, write_model


def test_models_list(tmp_path: Path) -> None:
    (tmp_path / "here.gguf").write_bytes(b"x")
    write_model(tmp_path, "present", "backend: llama\nmodel: here.gguf")
    write_model(tmp_path, "absent", "backend: llama\nmodel: gone.gguf")
    write_model(tmp_path, "echo", "backend: echo")
    write_model(tmp_path, "huge", "backend: echo\nmemory: 2G")
    result = hearth("models", "list", "--models-dir", str(tmp_path), env={"HEARTH_MEMORY": "1G"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "# machine budget: " + lines[0].split(": ", 1)[1]
    assert "1.0 GiB of memory for models (HEARTH_MEMORY)" in lines[0]
    # A GGUF that is not one cannot be read: its runtime is all that is counted.
    assert lines[1:] == [
        "absent\tllama\tgone.gguf (missing)\t~80 MiB\tfits",
        "echo\techo\t-\t~45 MiB\tfits",
        "huge\techo\t-\t~2.0 GiB (declared)\ttoo big",
        "present\tllama\there.gguf\t~80 MiB\tfits",
    ]


def test_models_list_reports_broken_files_and_fails(tmp_path: Path) -> None:
    write_model(tmp_path, "ok", "backend: echo")
    write_model(tmp_path, "bad", "backend: echo\ncontext_size: big")
    result = hearth("models", "list", "--models-dir", str(tmp_path))
    assert result.returncode == 1
    assert "ok\techo" in result.stdout
    assert "bad.yaml: context_size: expected `int" in result.stderr


def test_bad_settings_are_one_clear_line(tmp_path: Path) -> None:
    result = hearth("models", "list", "--models-dir", str(tmp_path), env={"HEARTH_MEMORY": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: HEARTH_MEMORY='lots': not a size: 'lots' (use e.g. 8G, 512MiB or a number of bytes)"
    )


def test_run_refuses_impossible_limits(tmp_path: Path) -> None:
    result = hearth("run", "--models-dir", str(tmp_path), "--max-loaded-models", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: max-loaded-models must be at least 1, not 0"
    result = hearth("run", "--models-dir", str(tmp_path), "--keep-alive", "soon")
    assert result.returncode == 2
    assert "not a keep_alive: 'soon'" in result.stderr


def test_ps_shows_what_is_loaded() -> None:
    view = {
        "data": [
            {
                "model": "chat",
                "backend": "llama",
                "state": "ready",
                "pid": 41,
                "threads": 1,
                "threads_max": 2,
                "memory": {"rss_bytes": 300 << 20, "planned_bytes": 310 << 20,
                           "planned_from": "estimate"},
                "requests": {"in_flight": 1, "queued": 2},
                "keep_alive_seconds": 300,
                "expires_at": None,
                "variants": ["chat-pirate"],
            },
            {
                "model": "voice",
                "backend": "whisper",
                "state": "ready",
                "pid": 42,
                "threads": 2,
                "threads_max": 2,
                "memory": {"rss_bytes": 200 << 20, "planned_bytes": 200 << 20,
                           "planned_from": "measured"},
                "requests": {"in_flight": 0, "queued": 0},
                "keep_alive_seconds": 300,
                "expires_at": 1000 + 240,
            },
            {
                "model": "far", "replica": 1, "replicas": 2, "backend": "llama",
                "state": "ready", "healthy": False, "pid": None, "node": "10.0.0.7:50051",
                "memory": {"rss_bytes": None, "planned_bytes": 0, "planned_from": "remote"},
                "requests": {"in_flight": 0, "queued": 0}, "keep_alive_seconds": None,
            },
        ],
        "budget": {"cores": 2, "memory_bytes": 4 << 30, "memory_used_bytes": 500 << 20},
    }  # fmt: skip
    table = render_backends(view, now=1000).splitlines()
    assert table[0].split() == [
        "NAME", "BACKEND", "STATE", "PID/NODE", "THREADS", "MEMORY", "(PLANNED)", "REQUESTS",
        "UNTIL",
    ]  # fmt: skip
    assert table[1].split() == [
        "chat", "(+", "chat-pirate)", "llama", "ready", "41", "1/2", "300", "MiB", "(310", "MiB",
        "estimate)", "1+2", "queued", "busy",
    ]  # fmt: skip
    assert table[2].split()[:5] == ["voice", "whisper", "ready", "42", "2/2"]
    assert table[2].endswith("0+0 queued  4 minutes from now")
    # A replica elsewhere: which of how many, where, and that it is out of the rotation.
    assert table[3].split()[:7] == [
        "far", "[2/2]", "llama", "ready", "(out", "of", "rotation)",
    ]  # fmt: skip
    assert "10.0.0.7:50051" in table[3]
    assert table[-1] == "2 core(s); memory for models 500 MiB of 4.0 GiB in use"
