"""Checks on the model files a backend is asked to load."""

from __future__ import annotations

from pathlib import Path

from backends.runtime.errors import invalid


def require_safetensors(path: Path) -> None:
    """Refuse a model directory without .safetensors weights: pickle weights can run code."""
    if not any(path.rglob("*.safetensors")):
        raise invalid(
            "unsafe_weights",
            f"{path.name} has no .safetensors weights; Hearth does not load pickle weights "
            "(.bin, .pt, .ckpt), which can run code when loaded",
        )
