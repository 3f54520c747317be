"""llama.cpp through llama-cpp-python.

Text generation runs on our own batch engine (batch.py) over llama-cpp-python's low-level API:
concurrent requests share one context and one decode per token (continuous batching), every token
can notice a cancelled call, usage counts are exact, and stop sequences never leak into the text,
streamed or not. Embedding models are served by llama-cpp-python's `Llama.embed`, with concurrent
calls merged by the runtime (see backends/runtime/batching.py).
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
    BatchEngine,
    Finished,
    SamplerChain,
    Sampling,
    Scored,
    Sequence,
)
from backends.runtime import Backend, BackendError, Capability, invalid
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
        threads = request.threads or max(1, (os.cpu_count() or 2) // 2)
        settings = {
            "model_path": path,
            "n_ctx": request.context_size or DEFAULT_CONTEXT_SIZE,
            "n_threads": threads,
            "n_threads_batch": threads,
            "n_batch": request.batch_size or 512,
            "use_mmap": request.mmap if request.HasField("mmap") else True,
            "seed": request.seed if request.HasField("seed") else random.getrandbits(31),
            "embedding": request.embeddings,
            "n_gpu_layers": int(options.get("gpu_layers", 0)),
            "pooling_type": _pooling(options.get("pooling"), request.embeddings),
            "verbose": False,
        }
        parallel = 1 if request.embeddings else request.parallel or DEFAULT_PARALLEL
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

        if request.embeddings:
            self._load_embeddings(settings)
        else:
            self._load_text(settings, parallel)
        threads = settings["n_threads"]
        self.embeddings = request.embeddings
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
