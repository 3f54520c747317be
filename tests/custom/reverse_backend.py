"""A custom backend that lives outside the hearth package: it answers with the text reversed.

It is what a user writes: subclass the runtime's Backend, implement the engine calls, run it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from backends.runtime import Backend, run
from protos.hearth.backend.v1 import backend_pb2 as pb


class ReverseBackend(Backend):
    name = "reverse"

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        return pb.LoadResponse()

    def generate_stream(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        if request.WhichOneof("input") == "prompt":
            text = request.prompt
        else:
            text = request.chat.messages[-1].content
        for character in reversed(text):
            if cancelled.is_set():
                return
            yield pb.GenerateStreamResponse(text=character)
        yield pb.GenerateStreamResponse(
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=len(text), completion_tokens=len(text)),
        )


if __name__ == "__main__":
    run(ReverseBackend())
