"""Reranking with transformers: a cross-encoder reads each (query, document) pair and scores it;
an embedding model scores a document by its vector's cosine similarity to the query's.

Both kinds answer with scores in [0, 1], as the contract asks: a cross-encoder's logit through a
sigmoid (the positive class's softmax for a two-label head), an embedding model's cosine mapped
linearly by (cos + 1) / 2.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from backends.runtime import BackendError, invalid
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.transformers")

#: (query, document) pairs per forward pass.
PAIRS_PER_BATCH = 16
#: Past this, a tokenizer's model_max_length is transformers' "no limit" placeholder.
_NO_LIMIT = 1_000_000


def cancelled_error() -> BackendError:
    return BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")


def load_cross_encoder(path: Path, dtype: Any, common: dict[str, Any]) -> Any:
    """The sequence-classification model in `path`, refused unless its classifier head is in its
    weights (transformers would otherwise make one of random numbers, and score at random)."""
    import transformers

    loader = transformers.AutoModelForSequenceClassification
    try:
        model, info = loader.from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True, **common
        )
    except (OSError, ValueError) as exc:
        raise invalid("invalid_model", f"transformers cannot load {path.name}: {exc}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise invalid(
            "invalid_model",
            f"{path.name} is not a cross-encoder (a sequence-classification model): its weights "
            f"lack {', '.join(missing[:4])}. An embedding model reranks with embeddings: true "
            "instead of rerank: true",
        )
    labels = int(model.config.num_labels)
    if labels not in (1, 2):
        raise invalid(
            "invalid_model",
            f"{path.name} classifies into {labels} labels; a cross-encoder has 1 (a relevance "
            "logit) or 2 (irrelevant, relevant)",
        )
    return model


def pair_limit(tokenizer: Any, positions: int, options: dict[str, Any]) -> int:
    """The most tokens one (query, document) pair may have: the model's positions and its
    tokenizer's limit, or the YAML's options.max_length."""
    if isinstance(options.get("max_length"), (int, float)):
        return int(options["max_length"])
    limits = [positions]
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < _NO_LIMIT:
        limits.append(stated)
    return min(limits)


def cross_encoder_scores(
    model: Any,
    tokenizer: Any,
    query: str,
    documents: list[str],
    *,
    max_length: int,
    truncate: bool,
    cancelled: threading.Event,
    between_batches: Callable[[], None],
) -> tuple[list[float], int]:
    """Each document's relevance to `query` and the tokens read (padding not counted).

    A pair longer than `max_length` loses the end of its document (the query is kept whole);
    with `truncate` off it is refused instead.
    """
    import torch

    query_tokens = len(tokenizer(query, add_special_tokens=False).input_ids)
    special = tokenizer.num_special_tokens_to_add(pair=True)
    if query_tokens + special >= max_length:
        raise invalid(
            Reason.INPUT_TOO_LONG,
            f"the query is {query_tokens} tokens; this model reads at most {max_length} for "
            "the query and a document together",
            param="query",
        )
    lengths = [
        query_tokens + special + len(ids)
        for ids in tokenizer(documents, add_special_tokens=False).input_ids
    ]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        first = too_long[0]
        if not truncate:
            raise invalid(
                Reason.INPUT_TOO_LONG,
                f"documents[{first}] with the query is {lengths[first]} tokens; this model reads "
                f"at most {max_length} (the model YAML sets truncate: false)",
                param="documents",
            )
        log.info(
            "truncating %d document(s) to fit %d tokens with the query (the longest pair had %d)",
            len(too_long),
            max_length,
            max(lengths),
        )
    # Without a padding token, pairs of different lengths cannot share a batch.
    per_batch = PAIRS_PER_BATCH if tokenizer.pad_token_id is not None else 1
    scores: list[float] = []
    read = 0
    with torch.inference_mode():
        for start in range(0, len(documents), per_batch):
            if cancelled.is_set():
                raise cancelled_error()
            between_batches()
            chunk = documents[start : start + per_batch]
            batch = tokenizer(
                [query] * len(chunk),
                chunk,
                padding=True,
                truncation="only_second",
                max_length=max_length,
                return_tensors="pt",
            )
            logits = model(**batch).logits.float()
            read += int(batch["attention_mask"].sum())
            scores.extend(relevance(logits).tolist())
    return scores, read


def relevance(logits: Any) -> Any:
    """Scores in [0, 1] from a cross-encoder's logits (one row per pair)."""
    import torch

    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=-1)[:, 1]


def cosine_scores(query: Any, documents: Any) -> list[float]:
    """(cos + 1) / 2 between a query vector and each document vector (rows).

    The linear map keeps the order cosine gives and every score in [0, 1]; clipping instead
    would give all unrelated documents (cosine near or below 0) the same score.
    """
    import torch

    query = torch.nn.functional.normalize(query.float(), p=2, dim=-1)
    documents = torch.nn.functional.normalize(documents.float(), p=2, dim=-1)
    cosine = documents @ query
    return [float(s) for s in ((cosine + 1) / 2).clamp(0.0, 1.0).tolist()]
