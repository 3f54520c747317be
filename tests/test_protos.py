"""The committed gencode is what the pinned grpcio-tools makes of backend.proto, and it imports."""

from __future__ import annotations

import importlib
from pathlib import Path

from protos.generate import ROOT, generate, proto_files

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc wrote nothing"
    for relative in fresh:
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is not committed: run `python -m protos.generate`"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale: run `python -m protos.generate` and commit the result"
        )
    committed_all = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "protos").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )
    assert committed_all == [p for p in fresh if p.name.endswith(GENERATED_SUFFIXES)]


def test_every_generated_module_imports() -> None:
    modules = []
    for proto in proto_files():
        base = str(proto.with_suffix("")).replace("/", ".")
        for suffix in ("_pb2", "_pb2_grpc"):
            modules.append(importlib.import_module(base + suffix))
    backend_pb2 = modules[0]
    services = backend_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {
        "Lifecycle", "Text", "Embeddings", "Transcription", "Images", "Speech", "Rerank"
    }  # fmt: skip
    assert backend_pb2.DESCRIPTOR.package == "hearth.backend.v1"
