"""Regenerate the committed Python code for every .proto under protos/.

Run it with the pinned grpcio-tools (the `test` extra): `python -m protos.generate`.
With `--out DIR` it writes the tree under DIR instead, which is how the tests check that the
committed code is current.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proto_files() -> list[Path]:
    """Every .proto file of the contract, relative to the repository root."""
    return sorted(p.relative_to(ROOT) for p in (ROOT / "protos").rglob("*.proto"))


def generate(out: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under `out`."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root of the generated tree")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
