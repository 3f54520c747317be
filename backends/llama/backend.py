"""llama.cpp through llama-cpp-python.

Generation is our own loop over `Llama.generate` (token by token) rather than
`create_completion`, so that every token can notice a cancelled call, usage counts are exact,
and stop sequences never leak into the text, streamed or not.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import random
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from backends.llama.grammar import grammar_for_schema, llama_grammar
from backends.runtime import Backend, BackendError, Capability, invalid
from backends.runtime.text import (
    StopText,
    no_chat_template,
    template_inputs,
    template_rejected,
    token_budget,
)
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.llama")
#: Embedding inputs computed in one go; a cancelled call stops between groups.
_EMBED_GROUP = 16
#: A prompt longer than this many characters per token of context is first counted on its
#: start, which tells for any usual text whether the whole can fit.
_PROMPT_CHARS_PER_TOKEN = 16

DEFAULT_CONTEXT_SIZE = 4096
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


class LlamaBackend(Backend):
    """One GGUF model in one llama.cpp context; requests take turns on it."""

    name = "llama"
    adjustable_threads = True
    embed_batch_inputs = 64  # concurrent callers' inputs share llama.cpp's batches

    def __init__(self) -> None:
        self.llm: Any = None
        self.formatter: Any = None
        self.embeddings = False
        self.lock = threading.Lock()
        self.eog: frozenset[int] = frozenset()

    # Lifecycle --------------------------------------------------------------------------------

    def load(self, request: pb.LoadRequest) -> pb.LoadResponse:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

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
        llm = _open(Llama, settings)
        if request.embeddings and llm.pooling_type() == _POOLING["none"]:
            # A model that pools nothing (a generative one) gives a vector per token; OpenAI
            # clients want one per input, and llama-cpp-python mixes up batched per-token
            # vectors. Load it again pooling by mean, as llama.cpp's server would need too.
            log.info("the model does not pool its embeddings; using mean pooling")
            llm.close()
            llm = _open(Llama, {**settings, "pooling_type": _POOLING["mean"]})
        self.llm = llm
        self.embeddings = request.embeddings
        self.threads.loaded = threads
        self.eog = self._end_of_generation_tokens()
        template = request.chat_template or llm.metadata.get("tokenizer.chat_template", "")
        self.formatter = None
        if template:
            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(llm.token_eos()),
                bos_token=self._token_text(llm.token_bos()),
            )
        self._warm_up()
        log.info(
            "loaded %s: context %d, %d threads, chat template: %s",
            os.path.basename(path),
            llm.n_ctx(),
            threads,
            "from YAML" if request.chat_template else ("from GGUF" if template else "none"),
        )
        return pb.LoadResponse(context_size=llm.n_ctx(), threads=threads)

    def _warm_up(self) -> None:
        """One decode, as llama.cpp's server does at start: the weights are paged in now (so
        the first request is not slower, and the memory measured after load is what serving
        takes), not on the first request."""
        if self.embeddings:
            self.llm.embed("warm up")
            return
        bos = self.llm.token_bos()
        self.llm.eval([bos if bos >= 0 else 0])
        self.llm.reset()

    def apply_threads(self, threads: int) -> None:
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm.ctx, threads, threads)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self.llm.detokenize([token], special=True).decode("utf-8", errors="replace"))

    def _end_of_generation_tokens(self) -> frozenset[int]:
        import llama_cpp

        vocab = self.llm._model.vocab  # the public API has no is-end-of-generation check
        return frozenset(
            t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
        )

    def unload(self) -> None:
        with self.lock:
            if self.llm is not None:
                self.llm.close()
            self.llm = None

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.EMBEDDINGS if self.embeddings else Capability.TEXT})

    # Text -------------------------------------------------------------------------------------

    def _prompt_tokens(self, request: pb.GenerateRequest) -> list[int]:
        if request.WhichOneof("input") != "chat":
            return self._tokenize_prompt(request, request.prompt, add_bos=True)
        if self.formatter is None:
            raise no_chat_template()
        messages, tools = template_inputs(request.chat)
        try:
            formatted = self.formatter(messages=messages, tools=tools)
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise template_rejected(exc) from None
        # The template writes BOS itself where the model wants one.
        return self._tokenize_prompt(request, formatted.prompt, add_bos=False)

    def _tokenize_prompt(self, request: pb.GenerateRequest, text: str, add_bos: bool) -> list[int]:
        """The prompt's tokens, refusing one far past the context before reading all of it:
        llama.cpp's tokenizer takes quadratic time in the special tokens of a text (200,000
        one-word chat messages took minutes), and a prompt that cannot fit is a 400 anyway."""
        llm, context = self.llm, self.llm.n_ctx()
        head_chars = context * _PROMPT_CHARS_PER_TOKEN
        if len(text) > head_chars:
            head = llm.tokenize(text[:head_chars].encode("utf-8"), add_bos=add_bos, special=True)
            # Cutting the text splits at most one token in two: the whole has len(head) - 1 or more.
            if len(head) - 1 >= context:
                raise invalid(
                    Reason.CONTEXT_LENGTH_EXCEEDED,
                    f"the prompt is more than {len(head) - 1} tokens, and this model's context "
                    f"holds {context}: shorten the prompt or raise context_size in the model YAML",
                    param="messages" if request.WhichOneof("input") == "chat" else "prompt",
                )
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _grammar(self, request: pb.GenerateRequest) -> Any:
        """The grammar the response format asks for, checked before llama.cpp sees it: a
        schema can make one that crashes it or stalls it (see backends/llama/grammar.py)."""
        from llama_cpp.llama_grammar import JSON_GBNF

        kind = request.response_format.type
        if kind == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
            return llama_grammar(self.llm._model.vocab, JSON_GBNF)
        if kind == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
            text = grammar_for_schema(request.response_format.json_schema, self.llm.n_vocab())
            return llama_grammar(self.llm._model.vocab, text)
        return None

    def generate_stream(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        with self.lock:
            yield from self._generate(request, cancelled)

    def _generate(
        self, request: pb.GenerateRequest, cancelled: threading.Event
    ) -> Iterator[pb.GenerateStreamResponse]:
        llm = self.llm
        sampling = request.sampling
        prompt = self._prompt_tokens(request)
        budget = token_budget(request, len(prompt), llm.n_ctx())
        finish = pb.FINISH_REASON_LENGTH
        grammar = self._grammar(request)
        llm.set_seed(sampling.seed if sampling.HasField("seed") else random.getrandbits(31))
        if budget > 0 and not self._prefill(prompt, cancelled):
            log.info("generation cancelled while reading the prompt")
            return

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = StopText(list(sampling.stop))
        produced = 0
        tokens = llm.generate(
            prompt,
            temp=sampling.temperature if sampling.HasField("temperature") else DEFAULT_TEMPERATURE,
            top_k=sampling.top_k if sampling.HasField("top_k") else DEFAULT_TOP_K,
            top_p=sampling.top_p if sampling.HasField("top_p") else DEFAULT_TOP_P,
            min_p=sampling.min_p if sampling.HasField("min_p") else DEFAULT_MIN_P,
            repeat_penalty=sampling.repeat_penalty if sampling.HasField("repeat_penalty") else 1.0,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            grammar=grammar,
        )
        try:
            for token in tokens if budget > 0 else ():
                if cancelled.is_set():
                    log.info("generation cancelled after %d tokens", produced)
                    return
                if token in self.eog:
                    finish = pb.FINISH_REASON_STOP
                    break
                produced += 1
                ready = text.feed(decoder.decode(llm.detokenize([token])))
                if ready:
                    yield pb.GenerateStreamResponse(text=ready)
                if text.stopped:
                    finish = pb.FINISH_REASON_STOP
                    break
                if produced >= budget:
                    break
                self.follow_threads()  # the gateway may have given this model more or fewer cores
            else:
                if grammar is not None and produced < budget:
                    finish = pb.FINISH_REASON_STOP  # the grammar completed
        finally:
            tokens.close()
        rest = text.feed(decoder.decode(b"", final=True)) + text.rest()
        if rest:
            yield pb.GenerateStreamResponse(text=rest)
        yield pb.GenerateStreamResponse(
            finish_reason=finish,
            usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=produced),
        )

    def _prefill(self, prompt: list[int], cancelled: threading.Event) -> bool:
        """Read the prompt a batch at a time, reusing what the context already holds of it (the
        same conversation, one turn later).

        `Llama.generate` would read it in one call; in batches, a cancelled call stops between
        two, and a new thread share applies between two, not only after the whole prompt.
        Generation then finds the whole prompt read and samples at once. False if cancelled.
        """
        llm = self.llm
        cached = 0
        for held, wanted in zip(llm._input_ids.tolist(), prompt, strict=False):
            if held != wanted:
                break
            cached += 1
        # The last token is always read again: the logits to sample from must be its own.
        cached = min(cached, len(prompt) - 1)
        if cached < llm.n_tokens:
            # Keep the shared beginning, drop the rest. A recurrent or hybrid model (Mamba,
            # RWKV) keeps a state that cannot be cut back: it starts over.
            recurrent = getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False)
            if recurrent or not llm._ctx.kv_cache_seq_rm(-1, cached, -1):
                llm.reset()
                cached = 0
        llm.n_tokens = cached
        for start in range(cached, len(prompt), llm.n_batch):
            if cancelled.is_set():
                return False
            self.follow_threads()
            llm.eval(prompt[start : start + llm.n_batch])
        return True

    def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        with self.lock:
            ids = self.llm.tokenize(
                request.text.encode("utf-8"), add_bos=request.add_special, special=True
            )
        return pb.TokenizeResponse(tokens=ids)

    def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        vocabulary = self.llm.n_vocab()
        bad = [t for t in request.tokens if not 0 <= t < vocabulary]
        if bad:
            raise invalid(
                "invalid_token",
                f"token id {bad[0]} is outside this model's vocabulary of {vocabulary}",
                param="tokens",
            )
        with self.lock:
            data = self.llm.detokenize(list(request.tokens))
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
        with self.lock:
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
