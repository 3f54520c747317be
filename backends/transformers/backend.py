"""Hugging Face Transformers: causal LMs (chat, completion, streaming), sentence embeddings,
and reranking (cross-encoders, and embedding models by cosine similarity: see rerank.py).

Only safetensors weights are loaded (pickle weights can run code), `trust_remote_code` stays off
unless the model YAML turns it on, and nothing is fetched from a hub: the model is a local
directory.

Concurrent generations share `model.generate` calls (static batching, see batch.py), all on one
compute thread; each caller's stream thread decodes its own token ids and watches its own stop
sequences, and its row of the batch ends within one token once it is cancelled or stopped.

LoRA adapters (a variant of the model: `base:` in its YAML, or its own `lora:`) come with each
generate request; one loaded model serves the base and every adapter set, in the same batches
(lora.py).

Structured output (response_format json_object and json_schema, and forced tool calls in the
model's call format) masks a row's scores to what its grammar allows (constrain.py, llguidance).

Embeddings and reranking run one forward pass per chunk of inputs, on the same compute thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from backends.runtime import Backend, Capability, invalid
from backends.runtime.constrain import Grammars
from backends.runtime.files import require_safetensors
from backends.runtime.text import (
    StopText,
    no_chat_template,
    template_rejected,
    token_budget,
)
from backends.runtime.tools import ToolPlan, family_of_template, generate_with_tools
from backends.transformers.batch import Generation, GenerationBatcher, model_unloaded
from backends.transformers.lora import LoraAdapters, request_adapters
from backends.transformers.rerank import (
    cancelled_error,
    cosine_scores,
    cross_encoder_scores,
    load_cross_encoder,
    pair_limit,
)
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.transformers")

# Models are local directories: never reach for a hub, even when a config names one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_POOLING_MODES = ("mean", "cls", "max")
_EMBED_CHUNK = 64  # inputs per forward pass
_DEFAULT_PARALLEL = 4  # generations per batch when the LoadRequest does not say
_DEFAULT_WINDOW_MS = 5.0  # how long an idle model waits for more prompts to batch


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _IncrementalText:
    """Decodes a growing list of token ids piece by piece without re-decoding all of them.

    A token decoded alone loses what its neighbours decide (a leading space, bytes merged into
    one character), so each step decodes a short window starting a few tokens back and hands out
    only the new end of it; text ending in half a UTF-8 character waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # where the window begins
        self.seen = 0  # ids whose text was handed out

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.start : self.seen])
        after = self._decode(self.ids[self.start :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.start, self.seen = self.seen, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back when generation ends."""
        before = self._decode(self.ids[self.start : self.seen])
        after = self._decode(self.ids[self.start :])
        self.start = self.seen = len(self.ids)
        return after[len(before) :]


class TransformersBackend(Backend):
    """One model directory: a causal LM, a sentence encoder (`embeddings: true`; it reranks
    too), or a cross-encoder (`rerank: true`)."""

    name = "transformers"
    adjustable_threads = True  # torch.set_num_threads between tokens and forward passes
    embed_batch_inputs = _EMBED_CHUNK  # concurrent callers' inputs share one forward pass
    # Callers of a batch wait on engine threads (the gateway allows up to 64 in parallel), with
    # room for tokenize calls; none of them computes: that is the compute thread's work.
    engine_threads = 64 + 8

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.embeddings = False
        self.cross_encoder = False
        self.chat_template: str | None = None
        self.pooling = "mean"
        self.normalize = True
        self.truncate = True
        self.max_length = 512
        self.context = 2048
        #: The format the model writes tool calls in; None: its template renders no tools.
        self.tool_family: str | None = None
        # Every forward pass runs on this one thread: torch keeps per-thread state (its OpenMP
        # team, the thread count the gateway gives), and a new thread per call costs dearly.
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.batcher: GenerationBatcher | None = None
        self.grammars: Grammars | None = None

    # Lifecycle --------------------------------------------------------------------------------

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # they would fill the gateway's log

        path = Path(request.model_path)
        if not request.model_path:
            raise invalid("model_missing", "the model YAML names no model directory")
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        require_safetensors(path)
        options = json_format.MessageToDict(request.options)
        trust = bool(options.get("trust_remote_code", False))
        if trust:
            log.warning(
                "trust_remote_code is on for %s: Python files in its directory will run "
                "with this process's rights",
                request.model_name,
            )
        dtype_name = str(options.get("dtype", "float32"))
        if dtype_name not in _DTYPES:
            raise invalid("invalid_option", f"options.dtype must be one of {', '.join(_DTYPES)}")
        dtype = dtype_name if dtype_name == "auto" else getattr(torch, dtype_name)
        window_ms = options.get("batch_window_ms", _DEFAULT_WINDOW_MS)
        if not isinstance(window_ms, (int, float)) or not 0 <= window_ms <= 1000:
            raise invalid("invalid_option", "options.batch_window_ms must be between 0 and 1000")
        self._stop_batching()
        if request.threads:
            torch.set_num_threads(request.threads)
        self.threads.loaded = torch.get_num_threads()
        if request.HasField("seed"):
            torch.manual_seed(request.seed)
        common = {"local_files_only": True, "trust_remote_code": trust}
        cross_encoder = request.rerank  # the model YAML's `rerank: true`
        if cross_encoder and request.embeddings:
            raise invalid(
                "invalid_option",
                "set rerank: true for a cross-encoder or embeddings: true for an embedding "
                "model (which reranks too), not both",
            )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, **common)
        self.embeddings, self.cross_encoder = request.embeddings, cross_encoder
        if cross_encoder:
            model = load_cross_encoder(path, dtype, common)
        else:
            loader = (
                transformers.AutoModel if self.embeddings else transformers.AutoModelForCausalLM
            )
            try:
                model = loader.from_pretrained(path, dtype=dtype, use_safetensors=True, **common)
            except (OSError, ValueError) as exc:
                raise invalid(
                    "invalid_model", f"transformers cannot load {path.name}: {exc}"
                ) from None
        self.model = model.eval()
        parallel = request.parallel or _DEFAULT_PARALLEL
        positions = getattr(model.config, "max_position_embeddings", None) or 2048
        if self.embeddings:
            self._configure_embeddings(path, options, positions)
        elif cross_encoder:
            self.max_length = pair_limit(self.tokenizer, positions, options)
            self.truncate = bool(options.get("truncate", True))
            self.tokenizer("")  # as below: settle a tokenizer.json's settings on this thread
        else:
            self.context = request.context_size or positions
            self.chat_template = request.chat_template or self.tokenizer.chat_template
            self.tool_family = request.tool_parser or family_of_template(self.chat_template or "")
            # The first call resets a tokenizer.json's padding and truncation settings; after
            # it, the callers' threads (tokenizing prompts at once) only read them.
            self.tokenizer("")
            # Masks cover the model's logits, or a tokenizer with more tokens (the extra ones
            # are never allowed where the logits end).
            width = max(self._logits_width(), len(self.tokenizer))
            self.grammars = Grammars(self._llguidance_tokenizer(width), width)
            self.batcher = GenerationBatcher(
                self.model,
                self.compute,
                parallel=parallel,
                window_seconds=window_ms / 1000,
                pad_token_id=self._pad_token(),
                end_tokens=self._end_tokens(),
                follow_threads=self.follow_threads,
                adapters=LoraAdapters(self.model),
            )
        log.info(
            "loaded %s (%s, %s, %d torch threads%s)",
            path.name,
            type(model).__name__,
            dtype_name,
            torch.get_num_threads(),
            "" if self.batcher is None else f", batches of up to {self.batcher.parallel}",
        )
        if self.embeddings or cross_encoder:
            return pb.LoadResponse(context_size=self.max_length)
        # As many calls at once as a batch holds (0: the gateway's one at a time).
        concurrent = parallel if parallel > 1 else 0
        return pb.LoadResponse(context_size=self.context, concurrent_calls=concurrent)

    def _configure_embeddings(self, path: Path, options: dict[str, Any], positions: int) -> None:
        pooling_file = _read_json(path / "1_Pooling" / "config.json")
        from_file = next(
            (m for m in _POOLING_MODES if pooling_file.get(f"pooling_mode_{m}_tokens")), None
        )
        if pooling_file.get("pooling_mode_cls_token"):
            from_file = "cls"
        pooling = str(options.get("pooling") or from_file or "mean")
        if pooling not in _POOLING_MODES:
            raise invalid(
                "invalid_option", f"options.pooling must be one of {', '.join(_POOLING_MODES)}"
            )
        self.pooling = pooling
        self.normalize = bool(options.get("normalize", True))
        self.truncate = bool(options.get("truncate", True))
        limits = [positions]
        sentence = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(sentence, int):
            limits.append(sentence)
        if isinstance(options.get("max_length"), (int, float)):
            limits = [int(options["max_length"])]
        self.max_length = min(limits)

    def apply_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def unload(self) -> None:
        self._stop_batching()
        self.model = None
        self.tokenizer = None
        self.grammars = None

    def _stop_batching(self) -> None:
        """Refuse queued generations and wait for the compute thread to finish its work."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        self.compute.submit(lambda: None).result()

    def capabilities(self) -> frozenset[Capability]:
        if self.cross_encoder:
            return frozenset({Capability.RERANK})
        if self.embeddings:
            return frozenset({Capability.EMBEDDINGS, Capability.RERANK})
        return frozenset({Capability.TEXT})

    # Text -------------------------------------------------------------------------------------

    def _prompt_ids(self, request: pb.GenerateRequest, plan: ToolPlan | None) -> list[int]:
        tokenizer = self.tokenizer
        if plan is None:
            return list(tokenizer(request.prompt).input_ids)
        if not self.chat_template:
            raise no_chat_template()
        try:
            prompt = tokenizer.apply_chat_template(
                plan.messages,
                tools=plan.tools,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise template_rejected(exc) from None
        # The template writes the special tokens it wants.
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)

    def generate_stream(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        yield from generate_with_tools(
            request,
            self.tool_family,
            lambda plan: self._generate(request, cancelled, plan),
            constrained=True,  # a forced call is forced by a grammar (constrain.py)
        )

    def _generate(
        self, request: pb.GenerateRequest, cancelled: threading.Event, plan: ToolPlan | None
    ) -> Iterator[pb.GenerateStreamResponse]:
        batcher, grammars = self.batcher, self.grammars
        if batcher is None or grammars is None:  # unloaded meanwhile
            raise model_unloaded()
        adapters = request_adapters(request)
        prompt = self._prompt_ids(request, plan)
        constraint = grammars.constraint(request, plan)  # a bad schema is a 400 before any token
        sampling = request.sampling
        generation = Generation(
            prompt=prompt,
            budget=token_budget(request, len(prompt), self.context),
            options=self._generation_options(sampling),
            seed=sampling.seed if sampling.HasField("seed") else None,
            cancelled=cancelled,
            constraint=constraint,
            adapters=adapters,
        )
        text = StopText(list(sampling.stop))
        decoder = _IncrementalText(self.tokenizer)
        batcher.submit(generation)
        try:
            while (token := generation.next_token()) is not None and not cancelled.is_set():
                ready = text.feed(decoder.push(token))
                if ready:
                    yield pb.GenerateStreamResponse(text=ready)
                if text.stopped:
                    break
        finally:
            batcher.release(generation)  # its row ends within a token, if it has not yet
        if cancelled.is_set():
            log.info(
                "generation cancelled after %d of %d tokens", len(decoder.ids), generation.budget
            )
            return
        ran_out = len(decoder.ids) >= generation.budget and not (
            text.stopped or generation.complete
        )
        finish = pb.FINISH_REASON_LENGTH if ran_out else pb.FINISH_REASON_STOP
        rest = text.feed(decoder.flush()) + text.rest()
        if rest:
            yield pb.GenerateStreamResponse(text=rest)
        yield pb.GenerateStreamResponse(
            finish_reason=finish,
            usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(decoder.ids)),
        )

    def _pad_token(self) -> int:
        """What fills the left of shorter prompts (masked out: any id would do)."""
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _logits_width(self) -> int:
        """How many scores the model gives per token (its vocabulary, often padded past the
        tokenizer's)."""
        head = self.model.get_output_embeddings()
        if head is not None and hasattr(head, "weight"):
            return int(head.weight.shape[0])
        return len(self.tokenizer)

    def _llguidance_tokenizer(self, width: int) -> Callable[[], Any]:
        """What makes llguidance's view of this model's tokenizer (see constrain.py)."""
        tokenizer, ends = self.tokenizer, sorted(self._end_tokens())

        def make() -> Any:
            import llguidance.hf

            try:
                return llguidance.hf.from_tokenizer(
                    tokenizer, n_vocab=width, eos_token=ends or None
                )
            except ValueError as exc:  # a slow (Python) tokenizer
                raise invalid(
                    Reason.UNSUPPORTED,
                    f"constrained output needs the model's fast tokenizer (tokenizer.json): {exc}",
                    param="response_format",
                ) from None

        return make

    def _end_tokens(self) -> set[int]:
        ends = self.model.generation_config.eos_token_id
        if ends is None:
            ends = self.tokenizer.eos_token_id
        if ends is None:
            return set()
        return set(ends) if isinstance(ends, list) else {int(ends)}

    def _generation_options(self, sampling: pb.SamplingParams) -> dict[str, Any]:
        temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
        options: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            options["temperature"] = temperature
            options["top_p"] = sampling.top_p if sampling.HasField("top_p") else 1.0
            options["top_k"] = sampling.top_k if sampling.HasField("top_k") else 0
            if sampling.HasField("min_p") and sampling.min_p > 0:
                options["min_p"] = sampling.min_p
        else:  # greedy: say so, so a model's own sampling defaults do not warn or apply
            options.update(temperature=None, top_p=None, top_k=None)
        if sampling.HasField("repeat_penalty"):
            options["repetition_penalty"] = sampling.repeat_penalty
        return options

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        ids = self.tokenizer(request.text, add_special_tokens=request.add_special).input_ids
        return pb.TokenizeResponse(tokens=list(ids))

    def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        size = len(self.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < size]
        if bad:
            raise invalid(
                "invalid_token",
                f"token id {bad[0]} is outside this model's vocabulary of {size}",
                param="tokens",
            )
        return pb.DetokenizeResponse(text=self.tokenizer.decode(list(request.tokens)))

    # Embeddings -------------------------------------------------------------------------------

    def embed(self, request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        # On the compute thread, tokenizing included: padding changes the tokenizer's state.
        return self.compute.submit(self._embed, request, cancelled).result()

    def _embed(self, request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        import torch

        texts = []
        for item in request.inputs:
            if item.WhichOneof("input") != "text":
                raise invalid(
                    "unsupported_input",
                    "send text: token arrays are ids of another tokenizer (tiktoken's, usually) "
                    "and would mean nothing to this model",
                    param="input",
                )
            texts.append(item.text)
        size = int(self.model.config.hidden_size)
        if request.dimensions and request.dimensions != size:
            raise invalid(
                "unsupported_dimensions",
                f"this model makes {size}-dimensional embeddings",
                param="dimensions",
            )
        pooled, counts = self._encode(
            texts, cancelled, lambda i: (f"input[{i}]", "input"), request.max_input_tokens
        )
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        vectors = [pb.Embedding(values=row) for row in pooled.float().tolist()]
        return pb.EmbedResponse(embeddings=vectors, prompt_tokens=sum(counts), input_tokens=counts)

    def _encode(
        self,
        texts: list[str],
        cancelled: threading.Event,
        where: Callable[[int], tuple[str, str]],
        most: int = 0,
    ) -> tuple[Any, list[int]]:
        """The pooled vectors of `texts` (one row each, not normalised) and their token counts.

        `where(i)` names text i and its request field in errors; `most` (0: none) is the
        request's bound on tokens per text, which holds whether or not the YAML truncates.
        """
        import torch

        lengths = [len(ids) for ids in self.tokenizer(texts).input_ids]
        over = next((i for i, n in enumerate(lengths) if most and n > most), None)
        if over is not None:
            name, param = where(over)
            raise invalid(
                Reason.INPUT_TOO_LONG,
                f"{name} is {lengths[over]} tokens; this server embeds at most {most} in one input",
                param=param,
            )
        too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            first = too_long[0]
            if not self.truncate:
                name, param = where(first)
                raise invalid(
                    Reason.INPUT_TOO_LONG,
                    f"{name} is {lengths[first]} tokens; this model reads at most "
                    f"{self.max_length} (the model YAML sets truncate: false)",
                    param=param,
                )
            log.info(
                "truncating %d input(s) to %d tokens (the longest had %d)",
                len(too_long),
                self.max_length,
                max(lengths),
            )
        rows: list[Any] = []
        counts: list[int] = []
        with torch.inference_mode():
            for start in range(0, len(texts), _EMBED_CHUNK):
                if cancelled.is_set():
                    raise cancelled_error()
                self.follow_threads()
                batch = self.tokenizer(
                    texts[start : start + _EMBED_CHUNK],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                counts.extend(batch["attention_mask"].sum(dim=1).tolist())
                rows.append(self._pool(hidden, mask))
        pooled = torch.cat(rows) if rows else torch.empty(0, int(self.model.config.hidden_size))
        return pooled, counts

    def _pool(self, hidden: Any, mask: Any) -> Any:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    # Rerank -----------------------------------------------------------------------------------

    def rerank(self, request: pb.RerankRequest, cancelled: threading.Event) -> pb.RerankResponse:
        """Each document's relevance to the query in [0, 1]: a cross-encoder's sigmoid of its
        logit, or for an embedding model (cos + 1) / 2 of the query's and the document's
        vectors, pooled as /v1/embeddings pools them (see rerank.py)."""
        if not request.documents:
            return pb.RerankResponse()
        # On the compute thread, tokenizing included, as embed does.
        return self.compute.submit(self._rerank, request, cancelled).result()

    def _rerank(self, request: pb.RerankRequest, cancelled: threading.Event) -> pb.RerankResponse:
        documents = list(request.documents)
        if self.cross_encoder:
            scores, read = cross_encoder_scores(
                self.model,
                self.tokenizer,
                request.query,
                documents,
                max_length=self.max_length,
                truncate=self.truncate,
                cancelled=cancelled,
                between_batches=self.follow_threads,
            )
            return pb.RerankResponse(scores=scores, prompt_tokens=read)

        def where(index: int) -> tuple[str, str]:
            return (
                ("the query", "query") if index == 0 else (f"documents[{index - 1}]", "documents")
            )

        pooled, counts = self._encode([request.query, *documents], cancelled, where)
        scores = cosine_scores(pooled[0], pooled[1:])
        return pb.RerankResponse(scores=scores, prompt_tokens=sum(counts))
