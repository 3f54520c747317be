"""POST /v1/rerank through the gateway: the Jina / Cohere shape, on echo and real models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, link_tree, write_model
from tests.tiny_models import write_tiny_cross_encoder, write_tiny_reranker_gguf

QUERY = "How do I bake sourdough bread at home?"
DOCUMENTS = [
    "Check your car tyre pressure once a month and before long journeys.",
    "Feed the starter, mix flour, water and salt, let the dough rise overnight, then bake it "
    "in a hot oven for forty minutes.",
    "The tax return form is due by the end of January.",
    "The football match ended in a draw after extra time.",
    "The next train to the city leaves from platform two at nine.",
]


@pytest.fixture(scope="module")
def ranking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("rerank-models")
    write_model(directory, "echo", "backend: echo")
    gateway = Gateway(directory).start()
    yield gateway
    gateway.cleanup()


def rerank(gateway: Gateway, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=120)


def test_results_come_best_first_with_top_n_and_documents(ranking: Gateway) -> None:
    # Echo scores by the share of the query's words a document has.
    documents = ["nothing here", "bread at home", "sourdough bread at home, baked"]
    answer = rerank(ranking, model="echo", query="sourdough bread at home", documents=documents)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    assert body["model"] == "echo"
    assert [r["index"] for r in body["results"]] == [2, 1, 0]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(1.0)
    assert "document" not in body["results"][0], "only with return_documents"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    top = rerank(
        ranking,
        model="echo",
        query="sourdough bread at home",
        documents=[{"text": d} for d in documents],  # Cohere's v1 and Jina's object form
        top_n=2,
        return_documents=True,
    ).json()
    assert [(r["index"], r["document"]["text"]) for r in top["results"]] == [
        (2, documents[2]),
        (1, documents[1]),
    ]
    for path in ("/rerank", "/v2/rerank"):  # llama.cpp's and Cohere's paths
        again = rerank(ranking, path, model="echo", query="bread", documents=documents)
        assert again.json()["results"][0]["index"] in (1, 2)
    many = rerank(ranking, model="echo", query="bread", documents=documents, top_n=50)
    assert len(many.json()["results"]) == 3, "top_n past the documents: all of them"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "", "documents": ["a"]}, "query"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": [1, 2]}, "documents[0]"),
        ({"query": "q", "documents": ["a"] * 1001}, "documents"),
        ({"documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["a"], "model": "nobody"}, "model"),
    ],
)
def test_bad_requests_are_400_naming_the_field(ranking: Gateway, body: dict, param: str) -> None:
    answer = rerank(ranking, **{"model": "echo", **body})
    assert answer.status_code == (404 if param == "model" else 400), answer.text
    assert answer.json()["error"]["param"] == param


@pytest.mark.real_model
def test_an_embedding_model_ranks_the_relevant_document_first(
    tmp_path: Path, real_models: Path
) -> None:
    link_tree(real_models / "all-minilm-l6-v2", tmp_path / "all-minilm-l6-v2")
    minilm = "backend: transformers\nmodel: all-minilm-l6-v2\nembeddings: true"
    write_model(tmp_path, "all-minilm-l6-v2", minilm)
    gateway = Gateway(tmp_path).start()
    try:
        answer = rerank(gateway, model="all-minilm-l6-v2", query=QUERY, documents=DOCUMENTS)
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert results[0]["index"] == 1, results
        assert results[0]["relevance_score"] > results[1]["relevance_score"] + 0.05
        assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)
        # llama.cpp's server is called without a model: the one that can rank answers.
        unnamed = rerank(gateway, "/rerank", query=QUERY, documents=DOCUMENTS)
        assert unnamed.status_code == 200, unnamed.text
        assert unnamed.json()["results"] == results
    finally:
        gateway.cleanup()


def test_cross_encoders_on_llama_and_transformers_rank_over_http(tmp_path: Path) -> None:
    # Tiny random models: the scores mean nothing, the plumbing must hold.
    write_tiny_reranker_gguf(tmp_path / "tiny-reranker.gguf")
    write_model(
        tmp_path,
        "gguf-reranker",
        "backend: llama\nmodel: tiny-reranker.gguf\nrerank: true\ncontext_size: 128",
    )
    write_tiny_cross_encoder(tmp_path / "tiny-cross-encoder")
    write_model(
        tmp_path, "hf-reranker", "backend: transformers\nmodel: tiny-cross-encoder\nrerank: true"
    )
    gateway = Gateway(tmp_path).start()
    try:
        for model in ("gguf-reranker", "hf-reranker"):
            answer = rerank(gateway, model=model, query=QUERY, documents=DOCUMENTS, top_n=3)
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            assert len(results) == 3
            assert len({r["index"] for r in results}) == 3
            assert all(0.0 <= r["relevance_score"] <= 1.0 for r in results)
            again = rerank(gateway, model=model, query=QUERY, documents=DOCUMENTS, top_n=3)
            assert again.json()["results"] == results, f"{model}: the same answer twice"
            # A reranker does nothing else.
            chat = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                timeout=60,
            )
            assert chat.status_code == 400, chat.text
    finally:
        gateway.cleanup()
