"""What a quantize or convert reports while it runs, and what it made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Where a quantize or convert stands: its phase, and tensors and bytes done of total."""

    #: fetching-converter | converting | writing | quantizing | checking | placing
    phase: str = "queued"
    tensors_done: int = 0
    tensors_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class MadeModel:
    """A model made and added: what it is, and what the output check saw."""

    name: str
    yaml: str
    file: str
    source: str
    type: str
    source_bytes: int
    bytes: int
    seconds: float
    #: The check: what it was asked, what it answered, in how many tokens.
    prompt: str = ""
    answer: str = ""
    tokens: int = 0
    embedding_size: int | None = None
    #: A LoRA adapter: the model it applies to, and what that answered the check alone.
    base: str | None = None
    base_answer: str | None = None
    #: Tensors llama.cpp gave another type than asked (rows its blocks do not divide).
    fallback_tensors: int | None = None
    notes: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "yaml": self.yaml,
            "file": self.file,
            "source": self.source,
            "type": self.type,
            "base": self.base,
            "source_bytes": self.source_bytes,
            "bytes": self.bytes,
            "size_ratio": round(self.bytes / self.source_bytes, 3) if self.source_bytes else None,
            "seconds": round(self.seconds, 1),
            "check": {
                "prompt": self.prompt,
                "answer": self.answer,
                "tokens": self.tokens,
                "embedding_size": self.embedding_size,
                "base_answer": self.base_answer,
            },
            "fallback_tensors": self.fallback_tensors,
            "notes": self.notes,
        }
