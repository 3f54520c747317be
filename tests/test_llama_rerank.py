"""The llama backend reranking with a cross-encoder GGUF, in this process, on a tiny random one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.tiny_models import TINY_RERANKER_POSITIONS, write_tiny_reranker_gguf

pytestmark = pytest.mark.llama

QUERY = "what is the water like"
DOCUMENTS = [
    "the water is hot",
    "he came back after a long day",
    "people like to write",
    "water",
    "",
]


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_reranker_gguf(tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf")


def load(path: Path, **settings: Any) -> Any:
    from backends.llama.backend import LlamaBackend
    from protos.hearth.backend.v1 import backend_pb2 as pb

    backend = LlamaBackend()
    backend.load(pb.LoadRequest(model_name="r", model_path=str(path), threads=1, **settings))
    return backend


@pytest.fixture(scope="module")
def reranker(tiny_reranker: Path) -> Iterator[Any]:
    backend = load(tiny_reranker, rerank=True)
    yield backend
    backend.unload()


def rerank(backend: Any, query: str, documents: list[str]) -> Any:
    from protos.hearth.backend.v1 import backend_pb2 as pb

    request = pb.RerankRequest(query=query, documents=documents)
    return backend.rerank(request, threading.Event())


def test_a_reranker_serves_only_reranking(reranker: Any) -> None:
    from backends.runtime import Capability

    assert reranker.capabilities() == {Capability.RERANK}


def test_scores_one_per_document_in_unit_range_and_repeatable(reranker: Any) -> None:
    first = rerank(reranker, QUERY, DOCUMENTS)
    assert len(first.scores) == len(DOCUMENTS)
    assert all(0.0 <= s <= 1.0 for s in first.scores)
    assert len(set(first.scores)) > 1, "different documents should score differently"
    assert first.prompt_tokens > 0
    again = rerank(reranker, QUERY, DOCUMENTS)
    assert list(again.scores) == list(first.scores)
    assert again.prompt_tokens == first.prompt_tokens


def test_batched_scores_equal_scores_alone(reranker: Any) -> None:
    together = rerank(reranker, QUERY, DOCUMENTS)
    alone = [rerank(reranker, QUERY, [d]) for d in DOCUMENTS]
    for score, single in zip(together.scores, alone, strict=True):
        assert score == pytest.approx(single.scores[0], abs=1e-4)
    assert together.prompt_tokens == sum(a.prompt_tokens for a in alone)


def test_pair_is_written_as_llama_cpp_server_writes_it(reranker: Any) -> None:
    # A BERT vocabulary adds BOS ([CLS]) and SEP, not EOS: [CLS] query [SEP] document.
    pair = reranker._pair_tokens("the water", "is hot")
    cls, sep = 2, 3
    query = reranker._tokenize("the water", add_bos=False)
    document = reranker._tokenize("is hot", add_bos=False)
    assert pair == [cls, *query, sep, *document]
    assert rerank(reranker, "the water", ["is hot"]).prompt_tokens == len(pair)


def test_a_document_too_long_is_cut_to_fit(reranker: Any) -> None:
    long = " ".join(["water"] * (3 * TINY_RERANKER_POSITIONS))
    cut = rerank(reranker, QUERY, [long, "the water is hot"])
    assert len(cut.scores) == 2
    assert 0.0 <= cut.scores[0] <= 1.0
    # What was read of the long one is what fits, and scores as that text alone does.
    limit = reranker.pair_limit
    assert limit == TINY_RERANKER_POSITIONS
    short = rerank(reranker, QUERY, ["the water is hot"])
    assert cut.prompt_tokens == limit + short.prompt_tokens
    fixed = len(reranker._pair_tokens(QUERY, ""))
    exact = " ".join(["water"] * (limit - fixed))
    assert cut.scores[0] == pytest.approx(rerank(reranker, QUERY, [exact]).scores[0], abs=1e-4)


def test_a_query_that_cannot_fit_is_refused(reranker: Any) -> None:
    from backends.runtime import BackendError

    query = " ".join(["water"] * TINY_RERANKER_POSITIONS)
    with pytest.raises(BackendError) as caught:
        rerank(reranker, query, ["the water is hot"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "input_too_long"
    assert caught.value.param == "query"


def test_with_truncate_off_a_long_document_is_refused(tiny_reranker: Path) -> None:
    from google.protobuf import struct_pb2

    from backends.runtime import BackendError

    options = struct_pb2.Struct()
    options.update({"truncate": False})
    backend = load(tiny_reranker, rerank=True, options=options)
    try:
        long = " ".join(["water"] * (2 * TINY_RERANKER_POSITIONS))
        with pytest.raises(BackendError) as caught:
            rerank(backend, QUERY, ["the water is hot", long])
        assert caught.value.reason == "input_too_long"
        assert caught.value.param == "documents"
        assert "documents[1]" in caught.value.message
    finally:
        backend.unload()


def test_a_cancelled_call_stops(reranker: Any) -> None:
    from backends.runtime import BackendError
    from protos.hearth.backend.v1 import backend_pb2 as pb

    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(BackendError) as caught:
        reranker.rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS), cancelled)
    assert caught.value.code == grpc.StatusCode.CANCELLED


def test_a_chat_model_is_not_a_reranker(tiny_gguf: Path) -> None:
    from backends.llama.backend import LlamaBackend
    from backends.runtime import BackendError
    from protos.hearth.backend.v1 import backend_pb2 as pb

    backend = LlamaBackend()
    request = pb.LoadRequest(model_name="r", model_path=str(tiny_gguf), threads=1, rerank=True)
    with pytest.raises(BackendError, match="no classification head") as caught:
        backend.load(request)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert backend.llm is None
    assert backend.model is None


def test_rerank_and_embeddings_together_are_refused(tiny_reranker: Path) -> None:
    from backends.runtime import BackendError

    with pytest.raises(BackendError, match="not both"):
        load(tiny_reranker, rerank=True, embeddings=True)
