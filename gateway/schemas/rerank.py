"""/v1/rerank wire types: the Jina / Cohere shape that LocalAI and llama.cpp's server use."""

from __future__ import annotations

from typing import Annotated

import msgspec

from gateway.schemas.common import KeepAlive

#: Cohere's limit on the documents of one request.
MAX_RERANK_DOCUMENTS = 1000


class Document(msgspec.Struct):
    """A document as Cohere's v1 and Jina also take it: an object with its text."""

    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    query: str
    # llama.cpp's server takes none (it serves one model): the models dir's one reranker.
    model: str | None = None
    documents: Annotated[list[str | Document], msgspec.Meta(max_length=MAX_RERANK_DOCUMENTS)]
    top_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Cohere's and llama.cpp's default: results carry indexes, not the documents again.
    return_documents: bool | None = False
    keep_alive: KeepAlive = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: Document | None = None


class RerankUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(msgspec.Struct, kw_only=True):
    object: str = "list"
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
