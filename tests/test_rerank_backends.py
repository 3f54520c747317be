"""Reranking in the backends themselves, in this process: a tiny cross-encoder, embedding models
(all-MiniLM for real), and echo's word overlap."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from backends.echo.backend import EchoBackend
from backends.runtime import Backend, BackendError
from backends.transformers.backend import TransformersBackend
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Capability, Reason
from tests.tiny_models import write_tiny_cross_encoder

QUERY = "How do I bake sourdough bread?"
RELEVANT = (
    "Mix flour, water, salt and an active sourdough starter, let the dough rise overnight, "
    "then bake the loaf in a very hot oven."
)
UNRELATED = [
    "Check your car tyres' pressure once a month and replace them when the tread is worn.",
    "The tax form must be filed by the end of April, with every receipt attached.",
    "The football match ended in a draw after extra time and a missed penalty.",
    "The train to the airport leaves platform 4 every twenty minutes until midnight.",
]
WORDS = (
    "the water people work place time year number sound day could long make thing come "
    "find part take little only round show"
).split()


def rerank_request(query: str, documents: list[str]) -> pb.RerankRequest:
    return pb.RerankRequest(query=query, documents=documents)


def load_transformers(path: Path, *, rerank: bool = False, **settings: Any) -> TransformersBackend:
    request = pb.LoadRequest(model_name=path.name, model_path=str(path), threads=1, **settings)
    request.rerank = rerank  # as the gateway sends a model YAML's `rerank: true`
    backend = TransformersBackend()
    backend.load(request)
    return backend


def rerank(backend: Backend, query: str, documents: list[str]) -> pb.RerankResponse:
    return backend.rerank(rerank_request(query, documents), threading.Event())


def sentence(seed: int, length: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(length))


@pytest.fixture(scope="module")
def tiny_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cross_encoder(tmp_path_factory.mktemp("rerank") / "tiny-cross-encoder")


@pytest.fixture(scope="module")
def cross_encoder(tiny_cross_encoder_dir: Path) -> Iterator[TransformersBackend]:
    backend = load_transformers(tiny_cross_encoder_dir, rerank=True)
    yield backend
    backend.unload()


# The tiny cross-encoder --------------------------------------------------------------------------


def test_a_cross_encoder_scores_each_document_in_order(cross_encoder: TransformersBackend) -> None:
    documents = [sentence(i, 4 + i) for i in range(5)]
    first = rerank(cross_encoder, "how long does the water take", documents)
    assert len(first.scores) == len(documents)
    assert all(0.0 <= s <= 1.0 for s in first.scores)
    assert len(set(first.scores)) > 1, "different documents, different scores"
    assert first.prompt_tokens > 0
    again = rerank(cross_encoder, "how long does the water take", documents)
    assert list(again.scores) == list(first.scores)
    assert again.prompt_tokens == first.prompt_tokens
    reordered = rerank(cross_encoder, "how long does the water take", documents[::-1])
    assert list(reordered.scores) == pytest.approx(list(first.scores)[::-1], abs=1e-5)


def test_many_documents_score_as_they_do_one_by_one(cross_encoder: TransformersBackend) -> None:
    documents = [sentence(i, 2 + i % 9) for i in range(37)]  # three batches, uneven lengths
    together = rerank(cross_encoder, "find the number", documents)
    alone = [rerank(cross_encoder, "find the number", [d]) for d in documents]
    assert list(together.scores) == pytest.approx([a.scores[0] for a in alone], abs=1e-5)
    # Padding is not counted: the tokens read are the same either way.
    assert together.prompt_tokens == sum(a.prompt_tokens for a in alone)


def test_a_long_document_is_cut_to_fit_and_a_long_query_is_refused(
    cross_encoder: TransformersBackend, tiny_cross_encoder_dir: Path
) -> None:
    long_document = sentence(1, 400)  # past the model's 128 positions
    answer = rerank(cross_encoder, "the water", [long_document, "the water"])
    assert len(answer.scores) == 2
    assert answer.prompt_tokens <= 2 * 128
    with pytest.raises(BackendError) as caught:
        rerank(cross_encoder, long_document, ["the water"])
    assert caught.value.reason == Reason.INPUT_TOO_LONG
    assert caught.value.param == "query"
    strict = load_transformers(tiny_cross_encoder_dir, rerank=True, options={"truncate": False})
    with pytest.raises(BackendError) as caught:
        rerank(strict, "the water", ["the water", long_document])
    assert caught.value.reason == Reason.INPUT_TOO_LONG
    assert caught.value.param == "documents"
    assert "documents[1]" in caught.value.message


def test_a_cancelled_rerank_stops(cross_encoder: TransformersBackend) -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(BackendError) as caught:
        cross_encoder.rerank(rerank_request("the water", ["a day"] * 40), cancelled)
    assert caught.value.code == grpc.StatusCode.CANCELLED


def test_what_each_kind_of_transformers_model_serves(
    cross_encoder: TransformersBackend, tiny_cross_encoder_dir: Path, tiny_hf: Path
) -> None:
    assert cross_encoder.capabilities() == {Capability.RERANK}
    chat = load_transformers(tiny_hf)
    assert Capability.RERANK not in chat.capabilities()
    assert chat.capabilities() == {Capability.TEXT}
    # The cross-encoder's BERT body alone, as an embedding model: it embeds and reranks.
    encoder = load_transformers(tiny_cross_encoder_dir, embeddings=True)
    assert encoder.capabilities() == {Capability.EMBEDDINGS, Capability.RERANK}


def test_a_model_without_a_classifier_head_is_not_taken_for_a_cross_encoder(
    tiny_hf: Path, tiny_cross_encoder_dir: Path
) -> None:
    with pytest.raises(BackendError, match="is not a cross-encoder"):
        load_transformers(tiny_hf, rerank=True)
    with pytest.raises(BackendError, match="not both"):
        load_transformers(tiny_cross_encoder_dir, rerank=True, embeddings=True)


def test_an_embedding_model_reranks_by_the_cosine_of_its_embeddings(
    tiny_cross_encoder_dir: Path,
) -> None:
    encoder = load_transformers(tiny_cross_encoder_dir, embeddings=True)
    documents = [sentence(i, 3 + i) for i in range(4)]
    answer = rerank(encoder, "the water", documents)
    inputs = [pb.EmbedInput(text=t) for t in ["the water", *documents]]
    embedded = encoder.embed(pb.EmbedRequest(inputs=inputs), threading.Event())
    query, *vectors = (list(e.values) for e in embedded.embeddings)
    cosines = [sum(q * d for q, d in zip(query, v, strict=True)) for v in vectors]
    assert list(answer.scores) == pytest.approx([(c + 1) / 2 for c in cosines], abs=1e-5)
    assert answer.prompt_tokens == embedded.prompt_tokens


# all-MiniLM-L6-v2, for real ---------------------------------------------------------------------


@pytest.mark.real_model
def test_minilm_ranks_the_relevant_document_first(real_models: Path) -> None:
    backend = load_transformers(real_models / "all-minilm-l6-v2", embeddings=True)
    documents = [UNRELATED[0], UNRELATED[1], RELEVANT, UNRELATED[2], UNRELATED[3]]
    answer = rerank(backend, QUERY, documents)
    assert len(answer.scores) == len(documents)
    assert all(0.0 <= s <= 1.0 for s in answer.scores)
    best = max(range(len(documents)), key=lambda i: answer.scores[i])
    assert documents[best] == RELEVANT
    assert answer.prompt_tokens > len(QUERY.split())


# Echo -------------------------------------------------------------------------------------------


def load_echo(**options: Any) -> EchoBackend:
    backend = EchoBackend()
    request = pb.LoadRequest(model_name="echo")
    request.options.update(options)
    backend.load(request)
    return backend


def test_echo_scores_the_share_of_query_words_each_document_has() -> None:
    echo = load_echo()
    assert Capability.RERANK in echo.capabilities()
    documents = ["Sourdough bread, baked slowly", "Bread", "car tyres", ""]
    answer = rerank(echo, "bake sourdough bread bread", documents)
    # The query's distinct words: bake, sourdough, bread; "baked" is another word.
    assert list(answer.scores) == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert answer.prompt_tokens == 4 + 4 + 1 + 2 + 0
    assert list(rerank(echo, "", ["anything"]).scores) == [0.0]


def test_echo_rerank_honours_cancel_and_fail_switches() -> None:
    slow = load_echo(latency_ms=50)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(BackendError) as caught:
        slow.rerank(rerank_request("a", ["a", "b"]), cancelled)
    assert caught.value.code == grpc.StatusCode.CANCELLED
    failing = load_echo(fail_code="INTERNAL", fail_reason="broken", fail_after_words=1)
    with pytest.raises(BackendError) as caught:
        rerank(failing, "a", ["a", "b"])
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.INTERNAL, "broken")
