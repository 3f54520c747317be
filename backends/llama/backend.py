"""llama.cpp through llama-cpp-python.

Text generation runs on our own batch engine (batch.py) over llama-cpp-python's low-level API:
concurrent requests share one context and one decode per token (continuous batching), every token
can notice a cancelled call, usage counts are exact, and stop sequences never leak into the text,
streamed or not. Embedding models are served by llama-cpp-python's `Llama.embed`, with concurrent
calls merged by the runtime (see backends/runtime/batching.py). Rerankers (`rerank: true`, a
cross-encoder GGUF with a classification head) score (query, document) pairs as llama.cpp's
server does for /rerank: pooling RANK, one sequence per pair, several pairs per decode.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import math
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import grpc
from google.protobuf import json_format

from backends.llama.batch import (
    Adapters,
    BatchEngine,
    Finished,
    SamplerChain,
    Sampling,
    Scored,
    Sequence,
)
from backends.runtime import Backend, BackendError, Capability, invalid, missing_adapter
from backends.runtime.constrain import Grammars
from backends.runtime.text import (
    StopText,
    no_chat_template,
    scored_alternatives,
    template_rejected,
    token_budget,
    token_logprob,
)
from backends.runtime.tools import ToolPlan, family_of_template, generate_with_tools
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.llama")
#: Embedding inputs computed in one go; a cancelled call stops between groups.
_EMBED_GROUP = 16
#: A prompt longer than this many characters per token of context is first counted on its
#: start, which tells for any usual text whether the whole can fit.
_PROMPT_CHARS_PER_TOKEN = 16

DEFAULT_CONTEXT_SIZE = 4096
#: Generations computed together when the gateway does not say (continuous batching).
DEFAULT_PARALLEL = 4
#: The most sequences one context may hold.
MAX_PARALLEL = 64
# llama.cpp's own sampling defaults, used where neither request nor YAML says otherwise.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05


_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}
_POOLING_RANK = 4  # llama_cpp.LLAMA_POOLING_TYPE_RANK: the classification head on the pooled state
#: Architectures whose rank head llama.cpp ends with a softmax (Qwen3-Reranker's yes/no): its
#: first output is already the probability of "yes".
_SOFTMAX_HEADS = frozenset({"qwen3", "qwen3vl"})


def _pooling(name: object, embeddings: bool) -> int:
    """`options.pooling` as llama.cpp's enum; unset means the model's own (-1)."""
    if name is None:
        return -1
    allowed = [p for p in _POOLING if p != "none" or not embeddings]
    if name not in allowed:
        raise invalid(
            "invalid_option",
            f"options.pooling must be one of {', '.join(allowed)}, not {name!r}",
        )
    return _POOLING[str(name)]


def _open(llama: Any, settings: dict[str, Any]) -> Any:
    try:
        return llama(**settings)
    except ValueError as exc:  # llama-cpp-python's word for "llama.cpp could not load it"
        raise invalid(
            "invalid_model_file",
            f"llama.cpp cannot load {os.path.basename(settings['model_path'])}: {exc}",
        ) from None


#: GGUF value types: the fixed sizes; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


#: A reranker's context when its YAML sets none: the longest query + document pair it reads.
RERANK_CONTEXT_SIZE = 512


def gguf_tensor_names(path: str) -> list[str]:
    """The tensor names of a GGUF file, read from its header (the metadata is skipped over,
    the tensors are not read). ValueError: not a GGUF file this reader knows."""
    with open(path, "rb") as file:

        def number(size: int) -> int:
            data = file.read(size)
            if len(data) != size:
                raise ValueError("the GGUF header ends early")
            return int.from_bytes(data, "little")

        def skip_string() -> None:
            file.seek(number(8), os.SEEK_CUR)

        def skip_value(kind: int) -> None:
            if kind == _GGUF_STRING:
                skip_string()
            elif kind == _GGUF_ARRAY:
                item, count = number(4), number(8)
                if item in _GGUF_SIZES:
                    file.seek(_GGUF_SIZES[item] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip_value(item)
            elif kind in _GGUF_SIZES:
                file.seek(_GGUF_SIZES[kind], os.SEEK_CUR)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        if file.read(4) != b"GGUF" or number(4) not in (2, 3):
            raise ValueError("not a GGUF v2 or v3 file")
        tensors, values = number(8), number(8)
        for _ in range(values):
            skip_string()  # the key
            skip_value(number(4))
        names = []
        for _ in range(tensors):
            length = number(8)
            names.append(file.read(length).decode("utf-8", "replace"))
            file.seek(8 * number(4) + 4 + 8, os.SEEK_CUR)  # dims, type, offset
        return names


def _adapters(request: pb.GenerateRequest) -> Adapters:
    """The request's LoRA adapters, each a GGUF file (checked before the engine loads it)."""
    for adapter in request.adapters:
        if os.path.isdir(adapter.path):
            raise invalid(
                Reason.ADAPTER_INVALID,
                f"{os.path.basename(adapter.path)} is a folder (a PEFT adapter?): a llama model "
                "takes GGUF LoRA files; llama.cpp's convert_lora_to_gguf.py converts a PEFT one",
                param="model",
            )
        if not os.path.isfile(adapter.path):
            raise missing_adapter(adapter.path)
    return tuple((a.path, float(a.scale)) for a in request.adapters)


def _has_classifier(path: str) -> bool:
    """Whether the GGUF holds a classification head (`cls` or `cls.output`). Without one,
    llama.cpp's RANK pooling gives a value of the hidden state as the "score", and says
    nothing."""
    try:
        names = set(gguf_tensor_names(path))
    except (OSError, ValueError):
        return True  # llama.cpp's own load says what is wrong with the file
    return bool(names & {"cls.weight", "cls.output.weight"})


def _sigmoid(logit: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * logit))  # no overflow for any logit


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _llguidance_tokenizer(model: Any) -> Any:
    """llguidance's view of a GGUF's vocabulary: each token's bytes (control tokens marked as
    special), llama.cpp's tokenizer, and every end-of-generation token as an end."""
    import llama_cpp
    from llguidance.llamacpp import lltokenizer_from_vocab

    vocab = model.vocab
    ends = [t for t in range(model.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    return lltokenizer_from_vocab(vocab, eos_token=ends or None)


def _unloaded() -> BackendError:
    return BackendError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.MODEL_NOT_LOADED, "no model is loaded"
    )


class _InUse:
    """Counts the calls using the model outside the engine thread (tokenizing, decoding a
    stream's tokens), so that unloading frees it only once none is."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._idle:
            self._count += 1
        try:
            yield
        finally:
            with self._idle:
                self._count -= 1
                self._idle.notify_all()

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0)


class LlamaBackend(Backend):
    """One GGUF model. Text: up to `parallel` generations batched in one llama.cpp context.
    Embeddings: one context, concurrent callers' inputs merged into its batches."""

    name = "llama"
    scores_tokens = True
    adjustable_threads = True
    embed_batch_inputs = 64  # concurrent callers' inputs share llama.cpp's batches
    # A call waits on its runtime thread: llama.cpp computes on the backend's own compute
    # thread (the batch engine's loop, or embedding calls taking turns on `lock`).
    engine_threads = MAX_PARALLEL + 8

    def __init__(self) -> None:
        self.llm: Any = None  # the embedding model's Llama
        self.model: Any = None  # llama_cpp._internals.LlamaModel, either way
        self.engine: BatchEngine | None = None
        #: Structured output's constraints (llguidance, over llama.cpp's vocabulary).
        self.grammars: Grammars | None = None
        self.formatter: Any = None
        self.embeddings = False
        #: A cross-encoder (`rerank: true`): it serves only reranking.
        self.cross_encoder = False
        #: Its pair's logits to a relevance in [0, 1] (see _load_reranker).
        self.relevance: Any = None
        #: The most tokens of one (query, document) pair, and whether a longer one is cut.
        self.pair_limit = 0
        self.truncate = True
        self.context_size = 0  # per sequence
        self.lock = threading.Lock()
        self.in_use = _InUse()
        # Every llama.cpp computation runs on this one thread (see BatchEngine): the load and
        # its warm-up, then the batch engine's loop, or the embedding calls.
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="llama")
        #: The format the model writes tool calls in; None: its template renders no tools.
        self.tool_family: str | None = None

    # Lifecycle --------------------------------------------------------------------------------

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        path = request.model_path
        if not path:
            raise invalid("model_missing", "the model YAML names no file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path}")
        options = json_format.MessageToDict(request.options)
        if request.rerank and request.embeddings:
            raise invalid(
                "invalid_option",
                "set rerank: true for a reranker GGUF or embeddings: true for an embedding "
                "model, not both",
            )
        threads = request.threads or max(1, (os.cpu_count() or 2) // 2)
        settings = {
            "model_path": path,
            "n_ctx": request.context_size or DEFAULT_CONTEXT_SIZE,
            "n_threads": threads,
            "n_threads_batch": threads,
            "n_batch": request.batch_size or 512,
            "use_mmap": request.mmap if request.HasField("mmap") else True,
            "seed": request.seed if request.HasField("seed") else random.getrandbits(31),
            "embedding": request.embeddings or request.rerank,
            "n_gpu_layers": int(options.get("gpu_layers", 0)),
            "pooling_type": _pooling(options.get("pooling"), request.embeddings),
            "verbose": False,
        }
        if request.rerank:
            # A pair is read in one physical batch (non-causal attention needs all of it at
            # once): context_size bounds a pair (512 unless the YAML says: what rerankers are
            # trained on), and the batch is as large unless batch_size says otherwise.
            settings["n_ctx"] = request.context_size or RERANK_CONTEXT_SIZE
            settings["n_batch"] = request.batch_size or settings["n_ctx"]
            settings["pooling_type"] = _POOLING_RANK
            settings["n_ubatch"] = settings["n_batch"]
            self.truncate = bool(options.get("truncate", True))
        parallel = (
            1 if request.embeddings or request.rerank else request.parallel or DEFAULT_PARALLEL
        )
        if parallel > MAX_PARALLEL:
            raise invalid("invalid_option", f"parallel must be at most {MAX_PARALLEL}")
        self.unload()  # a model loaded before: its engine, context and weights go first
        try:
            response = self.compute.submit(self._load, request, settings, parallel).result()
        except BaseException:
            self.unload()
            raise
        if self.engine is not None:
            self.engine.start()
        return response

    def _load(
        self, request: pb.LoadRequest, settings: dict[str, Any], parallel: int
    ) -> pb.LoadResponse:
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if request.rerank:
            self._load_reranker(settings)
        elif request.embeddings:
            self._load_embeddings(settings)
        else:
            self._load_text(settings, parallel)
        threads = settings["n_threads"]
        self.embeddings, self.cross_encoder = request.embeddings, request.rerank
        self.threads.loaded = threads
        metadata = self.model.metadata()
        template = request.chat_template or metadata.get("tokenizer.chat_template", "")
        self.formatter = None
        self.tool_family = request.tool_parser or family_of_template(template)
        if template:
            try:
                self.formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=self._token_text(self.model.token_eos()),
                    bos_token=self._token_text(self.model.token_bos()),
                )
            except jinja2.TemplateError as exc:
                whose = "chat_template in the model YAML" if request.chat_template else "the GGUF's"
                whose += "" if request.chat_template else " chat template"
                raise invalid(
                    "invalid_chat_template", f"{whose} does not parse as Jinja: {exc}"
                ) from None
        self._warm_up()
        log.info(
            "loaded %s: context %d%s, %d threads, chat template: %s",
            os.path.basename(settings["model_path"]),
            self.context_size,
            f" for each of {parallel} sequences" if parallel > 1 else "",
            threads,
            "from YAML" if request.chat_template else ("from GGUF" if template else "none"),
        )
        return pb.LoadResponse(
            context_size=self.context_size,
            threads=threads,
            concurrent_calls=parallel if parallel > 1 else 0,
        )

    def _load_embeddings(self, settings: dict[str, Any]) -> None:
        from llama_cpp import Llama

        llm = _open(Llama, settings)
        if llm.pooling_type() == _POOLING["none"]:
            # A model that pools nothing (a generative one) gives a vector per token; OpenAI
            # clients want one per input, and llama-cpp-python mixes up batched per-token
            # vectors. Load it again pooling by mean, as llama.cpp's server would need too.
            log.info("the model does not pool its embeddings; using mean pooling")
            llm.close()
            llm = _open(Llama, {**settings, "pooling_type": _POOLING["mean"]})
        self.llm = llm
        self.model = llm._model
        self.context_size = llm.n_ctx()

    def _load_reranker(self, settings: dict[str, Any]) -> None:
        import llama_cpp
        from llama_cpp import Llama

        name = os.path.basename(settings["model_path"])
        if not _has_classifier(settings["model_path"]):
            raise invalid(
                "invalid_model",
                f"{name} is not a reranker: it has no classification head (cls, cls.output). "
                "A chat or embedding GGUF cannot rerank; use a cross-encoder converted by "
                "llama.cpp (bge-reranker, jina-reranker, Qwen3-Reranker, ...)",
            )
        llm = _open(Llama, settings)
        self.llm = llm  # freed by unload if what follows refuses it
        self.model = llm._model
        labels = llama_cpp.llama_model_n_cls_out(self.model.model)
        architecture = self.model.metadata().get("general.architecture", "")
        if architecture in _SOFTMAX_HEADS:
            self.relevance = lambda logits: logits[0]
        elif labels == 1:
            self.relevance = lambda logits: _sigmoid(logits[0])
        elif labels == 2:  # (irrelevant, relevant), as the transformers backend reads it
            self.relevance = lambda logits: _sigmoid(logits[1] - logits[0])
        else:
            raise invalid(
                "invalid_model",
                f"{name} classifies into {labels} labels; a reranker has 1 (a relevance logit) "
                "or 2 (irrelevant, relevant)",
            )
        self.context_size = llm.n_ctx()
        # Positions past the trained ones do not exist in a BERT (its position embeddings).
        self.pair_limit = min(
            int(llm.context_params.n_ubatch), self.context_size, self.model.n_ctx_train()
        )

    def _load_text(self, settings: dict[str, Any], parallel: int) -> None:
        """The model, and a context of `parallel` sequences each with the whole context size
        (llama-cpp-python's Llama makes a context of one)."""
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own lines: errors only, as `Llama(verbose=False)` does
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = settings["n_gpu_layers"]
        model_params.use_mmap = settings["use_mmap"]
        try:
            model = LlamaModel(
                path_model=settings["model_path"], params=model_params, verbose=False
            )
        except ValueError as exc:
            raise invalid(
                "invalid_model_file",
                f"llama.cpp cannot load {os.path.basename(settings['model_path'])}: {exc}",
            ) from None
        per_sequence = settings["n_ctx"]
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_sequence * parallel
        # A step decodes a token of every sequence at once: a batch holds at least that many.
        params.n_batch = params.n_ubatch = max(min(settings["n_batch"], per_sequence), parallel)
        params.n_seq_max = parallel
        params.n_threads = params.n_threads_batch = settings["n_threads"]
        # One share of the cache per sequence: with a unified one, a request's output would
        # depend on the requests it is batched with.
        params.kv_unified = False
        params.no_perf = True
        self.model = model  # freed by unload, with the context, if what follows fails
        try:
            ctx = LlamaContext(model=model, params=params, verbose=False)
        except ValueError as exc:
            raise invalid(
                "invalid_model_file",
                f"llama.cpp cannot make a context for {os.path.basename(settings['model_path'])}:"
                f" {exc} (a smaller context_size or parallel may fit)",
            ) from None
        recurrent = bool(
            llama_cpp.llama_model_is_recurrent(model.model)
            or llama_cpp.llama_model_is_hybrid(model.model)
        )
        self.engine = BatchEngine(
            model,
            ctx,
            slots=parallel,
            batch_size=int(params.n_batch),
            recurrent=recurrent,
            follow_threads=self.follow_threads,
            compute=self.compute,
        )
        self.context_size = self.engine.context_per_slot
        self.grammars = Grammars(partial(_llguidance_tokenizer, model), model.n_vocab())

    def _warm_up(self) -> None:
        """One decode, as llama.cpp's server does at start: the weights are paged in now (so
        the first request is not slower, and the memory measured after load is what serving
        takes), not on the first request."""
        if self.cross_encoder:
            self._scores([self._pair_tokens("warm up", "warm up")])
            return
        if self.engine is None:
            self.llm.embed("warm up")
            return
        bos = self.model.token_bos()
        self.engine.warm_up(bos if bos >= 0 else 0)

    def apply_threads(self, threads: int) -> None:
        import llama_cpp

        ctx = self.engine.ctx.ctx if self.engine is not None else self.llm.ctx
        llama_cpp.llama_set_n_threads(ctx, threads, threads)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self.model.detokenize([token], special=True).decode("utf-8", errors="replace"))

    def unload(self) -> None:
        """End the engine (its sequences fail as the model unloading), wait for the calls still
        using the model (a tokenization, a stream's last tokens), then free it."""
        engine, self.engine, self.grammars = self.engine, None, None
        with self.lock:
            llm, model = self.llm, self.model
            self.llm = self.model = None
        if engine is not None:
            engine.close()
        self.in_use.wait_idle()
        with self.lock:
            if llm is not None:
                llm.close()
            elif model is not None:
                model.close()

    def capabilities(self) -> frozenset[Capability]:
        if self.cross_encoder:
            return frozenset({Capability.RERANK})
        return frozenset({Capability.EMBEDDINGS if self.embeddings else Capability.TEXT})

    # Text -------------------------------------------------------------------------------------

    def _prompt_tokens(self, request: pb.GenerateRequest, plan: ToolPlan | None) -> list[int]:
        model = self.model
        if plan is None:
            if request.suffix:
                return self._infill_tokens(request)
            tokens = self._tokenize_prompt(request, request.prompt, add_bos=True)
            if not tokens:
                # An empty prompt (OpenAI's null one) begins a document, as OpenAI's
                # <|endoftext|> default does: the model's BOS, or else its end-of-text token.
                start = next((t for t in (model.token_bos(), model.token_eos()) if t >= 0), None)
                tokens = [start] if start is not None else []
            return tokens
        if self.formatter is None:
            raise no_chat_template()
        try:
            formatted = self.formatter(messages=plan.messages, tools=plan.tools)
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise template_rejected(exc) from None
        # The template writes BOS itself where the model wants one.
        return self._tokenize_prompt(request, formatted.prompt, add_bos=False)

    def _infill_tokens(self, request: pb.GenerateRequest) -> list[int]:
        """Fill in the middle: the prompt and the suffix around the model's infill tokens, in
        prefix-suffix-middle order (as llama.cpp's /infill writes them); the answer is the
        middle. A model without those tokens (most chat models) is the client's 400."""
        model = self.model
        prefix, suffix, middle = model.token_prefix(), model.token_suffix(), model.token_middle()
        if min(prefix, suffix, middle) < 0:
            raise invalid(
                "infill_unsupported",
                "this model has no fill-in-the-middle tokens, so it cannot use suffix; use a "
                "code model trained for infill (Qwen2.5-Coder, CodeLlama, StarCoder, ...)",
                param="suffix",
            )
        bos = [model.token_bos()] if model.add_bos_token() and model.token_bos() >= 0 else []
        return [
            *bos,
            prefix,
            *self._tokenize_prompt(request, request.prompt, add_bos=False),
            suffix,
            *self._tokenize_prompt(request, request.suffix, add_bos=False),
            middle,
        ]

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        return list(self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _tokenize_prompt(self, request: pb.GenerateRequest, text: str, add_bos: bool) -> list[int]:
        """The prompt's tokens, refusing one far past the context before reading all of it:
        llama.cpp's tokenizer takes quadratic time in the special tokens of a text (200,000
        one-word chat messages took minutes), and a prompt that cannot fit is a 400 anyway."""
        context = self.context_size
        head_chars = context * _PROMPT_CHARS_PER_TOKEN
        if len(text) > head_chars:
            head = self._tokenize(text[:head_chars], add_bos)
            # Cutting the text splits at most one token in two: the whole has len(head) - 1 or more.
            if len(head) - 1 >= context:
                raise invalid(
                    Reason.CONTEXT_LENGTH_EXCEEDED,
                    f"the prompt is more than {len(head) - 1} tokens, and this model's context "
                    f"holds {context}: shorten the prompt or raise context_size in the model YAML",
                    param="messages" if request.WhichOneof("input") == "chat" else "prompt",
                )
        return self._tokenize(text, add_bos)

    def _sampler(self, request: pb.GenerateRequest) -> SamplerChain:
        sampling = request.sampling

        def given(name: str, default: float) -> Any:
            return getattr(sampling, name) if sampling.HasField(name) else default

        settings = Sampling(
            temperature=given("temperature", DEFAULT_TEMPERATURE),
            top_k=given("top_k", DEFAULT_TOP_K),
            top_p=given("top_p", DEFAULT_TOP_P),
            min_p=given("min_p", DEFAULT_MIN_P),
            repeat_penalty=given("repeat_penalty", 1.0),
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            seed=given("seed", random.getrandbits(31)),
        )
        return SamplerChain(settings, self.model.n_vocab())

    def generate_stream(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        with self.in_use.held():
            yield from generate_with_tools(
                request,
                self.tool_family,
                lambda plan: self._generate(request, cancelled, plan),
                constrained=True,  # a forced call is forced by a grammar (constrain.py)
                infill=True,
            )

    def _generate(
        self, request: pb.GenerateRequest, cancelled: threading.Event, plan: ToolPlan | None
    ) -> Iterator[pb.GenerateStreamResponse]:
        engine, model, grammars = self.engine, self.model, self.grammars
        if engine is None or model is None or grammars is None:
            raise _unloaded()
        prompt = self._prompt_tokens(request, plan)
        if not prompt:
            raise invalid("empty_prompt", "the prompt is empty", param="prompt")
        budget = token_budget(request, len(prompt), self.context_size)
        finish = pb.FINISH_REASON_LENGTH
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = StopText(list(request.sampling.stop))
        produced = reused = 0
        # A tool-call format may be written in control tokens ([TOOL_CALLS] in Mistral's
        # tekken vocabulary): kept in the text while calls are parsed out of it.
        special = plan is not None and plan.parser is not None
        logprobs = scored_alternatives(request)
        if budget > 0:
            constraint = grammars.constraint(request, plan)  # a bad schema: a 400 before a token
            sequence = Sequence(prompt, budget, self._sampler(request), cancelled)
            sequence.logprobs = logprobs
            sequence.constraint = constraint
            sequence.adapters = _adapters(request)
            engine.submit(sequence)
            try:
                while True:
                    event = sequence.next_event()
                    if event is None:
                        log.info("generation cancelled after %d tokens", produced)
                        return
                    reused = sequence.reused  # set before the first event
                    if isinstance(event, Finished):
                        if event.stopped:
                            finish = pb.FINISH_REASON_STOP
                        break
                    if isinstance(event, BaseException):
                        raise event
                    produced += 1
                    scored = None
                    if isinstance(event, Scored):
                        scored = token_logprob(
                            event.token,
                            event.logprob,
                            event.top,
                            lambda t: model.detokenize([t], special=special),
                        )
                        event = event.token
                    piece = model.detokenize([event], special=special)
                    ready = text.feed(decoder.decode(piece), scored)
                    logprob_items = text.logprobs()
                    if ready or logprob_items:
                        yield pb.GenerateStreamResponse(text=ready, logprobs=logprob_items)
                    if text.stopped:
                        finish = pb.FINISH_REASON_STOP
                        break
            finally:
                # Done, stopped by a stop sequence, or the caller gone: the slot is free now.
                sequence.ended.set()
                engine.nudge()
        rest = text.feed(decoder.decode(b"", final=True)) + text.rest()
        logprob_items = text.logprobs()
        if rest or logprob_items:
            yield pb.GenerateStreamResponse(text=rest, logprobs=logprob_items)
        yield pb.GenerateStreamResponse(
            finish_reason=finish,
            usage=pb.Usage(
                prompt_tokens=len(prompt), completion_tokens=produced, cached_prompt_tokens=reused
            ),
        )

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        with self.in_use.held():
            if self.model is None:
                raise _unloaded()
            ids = self._tokenize(request.text, request.add_special)
        return pb.TokenizeResponse(tokens=ids)

    def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        with self.in_use.held():
            model = self.model
            if model is None:
                raise _unloaded()
            vocabulary = model.n_vocab()
            bad = [t for t in request.tokens if not 0 <= t < vocabulary]
            if bad:
                raise invalid(
                    "invalid_token",
                    f"token id {bad[0]} is outside this model's vocabulary of {vocabulary}",
                    param="tokens",
                )
            data = model.detokenize(list(request.tokens))
        return pb.DetokenizeResponse(text=data.decode("utf-8", errors="replace"))

    # Embeddings -------------------------------------------------------------------------------

    def embed(self, request: pb.EmbedRequest, cancelled: threading.Event) -> pb.EmbedResponse:
        texts = []
        for item in request.inputs:
            if item.WhichOneof("input") != "text":
                raise invalid(
                    "unsupported_input",
                    "the llama backend embeds text; send strings, not token arrays",
                    param="input",
                )
            texts.append(item.text)
        with self.lock:
            return self.compute.submit(self._embed, texts, request, cancelled).result()

    def _embed(
        self, texts: list[str], request: pb.EmbedRequest, cancelled: threading.Event
    ) -> pb.EmbedResponse:
        if self.llm is None:
            raise _unloaded()
        size = self.llm.n_embd()
        if request.dimensions and request.dimensions != size:
            raise invalid(
                "unsupported_dimensions",
                f"this model makes {size}-dimensional embeddings",
                param="dimensions",
            )
        # llama.cpp reads an input for an embedding in one physical batch (its server refuses a
        # longer one too); llama-cpp-python would cut it short without a word. Refuse it instead,
        # and one past the request's own bound, before any of them is computed.
        own = int(self.llm.context_params.n_ubatch)
        limit = min(own, request.max_input_tokens or own)
        counts: list[int] = []
        for index, text in enumerate(texts):
            tokens = len(self.llm.tokenize(text.encode("utf-8")))  # as embed() counts them
            counts.append(tokens)
            if tokens > limit:
                whose = "this model reads" if limit == own else "this server embeds"
                raise invalid(
                    Reason.INPUT_TOO_LONG,
                    f"input[{index}] is {tokens} tokens; {whose} at most {limit} in one input",
                    param="input",
                )
        # A few inputs at a time, so that a client who leaves stops the work between groups.
        rows: list[Any] = []
        count = 0
        for start in range(0, len(texts), _EMBED_GROUP):
            if cancelled.is_set():
                raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
            self.follow_threads()
            group, used = self.llm.embed(
                texts[start : start + _EMBED_GROUP],
                normalize=False,
                truncate=False,
                return_count=True,
            )
            rows.extend(group)
            count += used
        vectors = [pb.Embedding(values=_unit(row)) for row in rows]
        return pb.EmbedResponse(embeddings=vectors, prompt_tokens=count, input_tokens=counts)

    # Rerank -----------------------------------------------------------------------------------

    def rerank(self, request: pb.RerankRequest, cancelled: threading.Event) -> pb.RerankResponse:
        """Each document's relevance to the query in [0, 1]: the model's classification head on
        the pair, its logit through a sigmoid (see _load_reranker)."""
        if not request.documents:
            return pb.RerankResponse()
        with self.lock:
            return self.compute.submit(self._rerank, request, cancelled).result()

    def _rerank(self, request: pb.RerankRequest, cancelled: threading.Event) -> pb.RerankResponse:
        if self.llm is None or not self.cross_encoder:
            raise _unloaded()
        limit = self.pair_limit
        pairs = [self._pair_tokens(request.query, document) for document in request.documents]
        fixed = len(self._pair_tokens(request.query, ""))  # all but the document
        if fixed >= limit:
            raise invalid(
                Reason.INPUT_TOO_LONG,
                f"the query is {fixed} tokens with the pair's own; this model reads at most "
                f"{limit} for the query and a document together",
                param="query",
            )
        too_long = [i for i, pair in enumerate(pairs) if len(pair) > limit]
        if too_long:
            first = too_long[0]
            if not self.truncate:
                raise invalid(
                    Reason.INPUT_TOO_LONG,
                    f"documents[{first}] with the query is {len(pairs[first])} tokens; this "
                    f"model reads at most {limit} (the model YAML sets truncate: false)",
                    param="documents",
                )
            log.info(
                "truncating %d document(s) to fit %d tokens with the query (the longest pair "
                "had %d)",
                len(too_long),
                limit,
                max(len(pairs[i]) for i in too_long),
            )
            for i in too_long:
                room = limit - fixed
                pairs[i] = self._pair_tokens(request.query, request.documents[i], room)
                while len(pairs[i]) > limit and room > 0:
                    # A template's text is read whole: the cut may join tokens differently.
                    room = max(0, room - (len(pairs[i]) - limit))
                    pairs[i] = self._pair_tokens(request.query, request.documents[i], room)
        # As many pairs per decode as one physical batch and the context's sequences hold:
        # llama.cpp reads a non-causal batch whole, and aborts on a longer one.
        room = int(self.llm.context_params.n_ubatch)
        most = int(self.llm.context_params.n_seq_max)
        batches: list[list[list[int]]] = [[]]
        for pair in pairs:
            batch = batches[-1]
            if batch and (sum(map(len, batch)) + len(pair) > room or len(batch) >= most):
                batches.append(batch := [])
            batch.append(pair)
        scores: list[float] = []
        for batch in batches:
            if cancelled.is_set():
                raise BackendError(grpc.StatusCode.CANCELLED, Reason.CANCELLED, "cancelled")
            self.follow_threads()
            scores.extend(self._scores(batch))
        return pb.RerankResponse(scores=scores, prompt_tokens=sum(map(len, pairs)))

    def _pair_tokens(self, query: str, document: str, room: int | None = None) -> list[int]:
        """A (query, document) pair as llama.cpp's server writes it for /rerank
        (format_prompt_rerank in tools/server/server-common.cpp): the GGUF's "rerank" template
        with {query} and {document} filled in, or else [BOS] query [EOS] [SEP] document [EOS],
        each special token where the vocabulary adds it (EOS falling back to SEP). With `room`,
        the document keeps only its first `room` tokens."""
        import llama_cpp

        model = self.model
        vocab = model.vocab

        def text(value: str, special: bool = False) -> list[int]:
            return list(model.tokenize(value.encode("utf-8"), add_bos=False, special=special))

        doc = text(document)
        if room is not None and len(doc) > room:
            doc = doc[:room]
            document = model.detokenize(doc).decode("utf-8", errors="ignore")
        template = llama_cpp.llama_model_chat_template(model.model, b"rerank")
        if template is not None:
            # As the server does: filled in, then read whole, its control tokens included.
            prompt = template.decode("utf-8").replace("{query}", query)
            return text(prompt.replace("{document}", document), special=True)
        eos = llama_cpp.llama_vocab_eos(vocab)
        if eos < 0:
            eos = llama_cpp.llama_vocab_sep(vocab)
        add_eos = [eos] if llama_cpp.llama_vocab_get_add_eos(vocab) else []
        bos = [model.token_bos()] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        sep = [llama_cpp.llama_vocab_sep(vocab)] if llama_cpp.llama_vocab_get_add_sep(vocab) else []
        return [*bos, *text(query), *add_eos, *sep, *doc, *add_eos]

    def _scores(self, pairs: list[list[int]]) -> list[float]:
        """One decode of `pairs`, a sequence each; each one's relevance from its rank output
        (n_cls_out floats: Llama.embed would read n_embd)."""
        import llama_cpp

        llm = self.llm
        batch = llm._batch
        batch.reset()
        for seq_id, tokens in enumerate(pairs):
            batch.add_sequence(tokens, seq_id, True)
        llm._ctx.kv_cache_clear()  # the last batch's sequences (rerankers with a cache)
        llm._ctx.decode(batch)
        labels = llama_cpp.llama_model_n_cls_out(self.model.model)
        scores = []
        for seq_id in range(len(pairs)):
            row = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq_id)
            scores.append(float(self.relevance(row[:labels])))
        batch.reset()
        return scores
