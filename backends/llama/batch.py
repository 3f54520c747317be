"""Continuous batching: many generations share one llama.cpp context, a token each per step.

One engine thread owns the context. Each request becomes a sequence in a slot (a llama.cpp
sequence id with its own share of the KV cache); every step, one `llama_decode` computes the next
token of every sequence that is generating, and each is sampled with its own sampler chain. A
sequence that finishes or is cancelled frees its slot at once; a waiting request takes it at the
next step.

What keeps a request's greedy output identical alone and in a batch (measured on llama-cpp-python
0.3.36): the KV cache is split per sequence (a unified one changes the attention's arithmetic with
the company a sequence keeps), and a prompt is read in decode calls of its own, never mixed with
other sequences' tokens (llama.cpp splits a mixed batch into other shapes than a solo run's, and
other shapes round differently). Each step first reads waiting prompts, oldest first, up to a
batch of prompt tokens in all, then computes the next token of every generating sequence: short
prompts arriving together all get their first token at once, and a long one is read a chunk per
step while the others go on generating (its read delays them by a chunk, not by the whole prompt).
Reading prompts together in one decode was measured no faster than one by one on a CPU.

Structured output: a sequence may carry a constraint (backends/runtime/constrain.py, llguidance).
Before its token is sampled, the logits of the tokens its grammar forbids are set to -inf in
llama.cpp's own logits buffer, and its sampler chain then samples as it would; the sequence ends
when the grammar is complete. llama.cpp's grammar sampler (GBNF) in the chain was measured at
0.68x the free tokens/s, the mask at 0.99x (bench/structured_output.py).

Prefix reuse: a slot keeps the tokens its KV cache holds after its sequence ends; a request that
continues a conversation is given the free slot holding the longest start of its prompt, and only
the rest is read.

LoRA adapters: a sequence may carry a set of adapters (a variant of the model, `base:` in its
YAML). llama.cpp applies adapters to a whole context, so one decode computes only sequences of one
set: a step decodes each set's sequences in a decode of their own, switching the context's
adapters between them (a pointer swap: the base's weights are shared, never copied). An adapter is
loaded at its first use and kept while the model is. A slot's cache is reused only by a request
with the same adapters (the cache was computed with them).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from backends.runtime.constrain import Constraint
from backends.runtime.errors import BackendError, adapter_stamp
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.llama")

#: One token of a batch: token, position, sequence id (slot), logits wanted.
_Entry = tuple[int, int, int, bool]
#: A set of LoRA adapters, in order: (absolute path, scale) each; empty: the base model.
Adapters = tuple[tuple[str, float], ...]
#: How often a waiting consumer looks at its call's cancellation (seconds).
_POLL_SECONDS = 0.05


@dataclass
class Sampling:
    """One request's sampler settings, as llama.cpp's sampler chain takes them."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    #: How many recent tokens the penalties look at.
    penalty_last_n: int = 64


class SamplerChain:
    """llama.cpp's sampler chain for one sequence: penalties, then top-k, top-p, min-p,
    temperature and a seeded draw (or the most likely token, at temperature 0).

    The order is llama-cpp-python's own, so a seeded request samples as it did before batching.
    """

    def __init__(self, sampling: Sampling, vocabulary: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        add = self._add
        penalised = sampling.presence_penalty or sampling.frequency_penalty
        if penalised or sampling.repeat_penalty != 1.0:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    vocabulary,
                    sampling.penalty_last_n,
                    sampling.repeat_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        if sampling.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            add(llama_cpp.llama_sampler_init_dist(sampling.seed & 0xFFFFFFFF))

    def _add(self, sampler: Any) -> None:
        self._lib.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, ctx: Any, index: int) -> int:
        """The token for the logits at batch position `index`, accepted into the chain."""
        return int(self._lib.llama_sampler_sample(self.chain, ctx, index))

    def close(self) -> None:
        if self.chain is not None:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


@dataclass(frozen=True)
class Finished:
    """The end of a sequence: `stop` (end of generation) or `length` (its budget used)."""

    stopped: bool


@dataclass(frozen=True)
class Scored:
    """A sampled token with its log-probability and the most likely tokens at its place
    (token, log-probability; most likely first), for a sequence that asked for them."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. The engine puts on `events` each sampled token (an int,
    or a `Scored` where `logprobs` is set), then a `Finished`, or a BackendError."""

    prompt: list[int]
    budget: int
    sampler: SamplerChain
    cancelled: threading.Event
    events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    #: Set by the consumer when it needs no more tokens (a stop sequence, or done).
    ended: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    #: Prompt tokens in the KV cache so far.
    read: int = 0
    produced: int = 0
    #: The last sampled token, to be decoded next step.
    pending: int | None = None
    #: Prompt tokens found in the slot's cache (not read again).
    reused: int = 0
    #: Order of admission: prompts are read first come, first served.
    arrival: int = 0
    #: Score each token, with this many alternatives (None: tokens alone).
    logprobs: int | None = None
    #: The grammar its tokens must follow (structured output); None: free.
    constraint: Constraint | None = None
    #: The LoRA adapters it is generated with.
    adapters: Adapters = ()

    def gone(self) -> bool:
        """Nobody wants this sequence's tokens any more."""
        return self.ended.is_set() or self.cancelled.is_set()

    def next_event(self) -> Any:
        """The next event; None while there is none yet and the call is not cancelled."""
        while not self.cancelled.is_set():
            with contextlib.suppress(queue.Empty):
                return self.events.get(timeout=_POLL_SECONDS)
        return None


class BatchEngine:
    """Owns a llama.cpp context with `slots` sequences; decodes them on `compute`.

    `compute` is the backend's one thread for llama.cpp work: the model's load and warm-up ran
    there too. llama.cpp computes under OpenMP, which keeps a team of threads per calling
    thread; decoding from a second thread after the first had decoded was measured 30-50 %
    slower (71-96 against 131-145 tok/s on 2 threads).
    """

    def __init__(
        self,
        model: Any,
        ctx: Any,
        *,
        slots: int,
        batch_size: int,
        recurrent: bool,
        follow_threads: Callable[[], None],
        compute: ThreadPoolExecutor,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.model = model
        self.ctx = ctx  # a llama_cpp._internals.LlamaContext
        self.batch_size = batch_size
        #: Each sequence's share of the context.
        self.context_per_slot = ctx.n_ctx() // slots
        self._recurrent = recurrent
        self._follow_threads = follow_threads
        self._batch = llama_cpp.llama_batch_init(max(batch_size, slots), 0, 1)
        #: What each slot's KV cache holds (its sequence's tokens), for prefix reuse.
        self._held: list[list[int]] = [[] for _ in range(slots)]
        #: The adapters each slot's cache was computed with.
        self._held_adapters: list[Adapters] = [() for _ in range(slots)]
        #: Loaded adapters by path, with the stamp of the weights they were read from (freed
        #: with the model), and the set the context applies.
        self._loras: dict[str, tuple[Any, tuple[int, int, int]]] = {}
        self._applied: Adapters = ()
        self._most_sets = 0
        self._busy: list[Sequence | None] = [None] * slots
        self._waiting: deque[Sequence] = deque()
        self._arrivals = 0
        self._wake = threading.Condition()
        self._closing = False
        self._compute = compute
        self._loop: Future[None] | None = None

    def start(self) -> None:
        """Begin serving: the engine's loop takes the compute thread until `close`."""
        self._loop = self._compute.submit(self._run)

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._loop.done()

    # Requests ---------------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            if self._closing:
                sequence.sampler.close()
                raise BackendError(
                    grpc.StatusCode.UNAVAILABLE, Reason.MODEL_NOT_LOADED, "the model is unloading"
                )
            self._waiting.append(sequence)
            self._wake.notify()

    def nudge(self) -> None:
        """Have the engine look at its sequences now (one was cancelled)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        """Stop the engine thread, end every sequence, free the batch and the context."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._loop is not None:
            self._loop.result()
        self._lib.llama_batch_free(self._batch)
        self.ctx.close()

    def warm_up(self, token: int) -> None:
        """One decode before serving (the weights are paged in now), on the compute thread,
        before `start`."""
        self._decode([(token, 0, 0, False)])
        self._forget(0, 0)

    # The engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not any(self._busy):
                    self._wake.wait()
                if self._closing:
                    break
            try:
                self._step()
            except Exception as exc:  # never leave a caller waiting on a dead thread
                log.exception("the batch engine failed a step")
                self._fail_all(exc)
        self._fail_all(
            BackendError(
                grpc.StatusCode.UNAVAILABLE, Reason.MODEL_NOT_LOADED, "the model was unloaded"
            )
        )

    def _step(self) -> None:
        self._admit()
        self._drop_cancelled()
        self._follow_threads()
        # Prompts first, up to a batch of prompt tokens a step, the shortest rest first (then
        # the oldest): short prompts arriving together are all read before the next token of
        # the others, a long one does not hold back a short one that came after it, and it is
        # read a chunk per step while the others go on generating.
        reading = [s for s in self._busy if s is not None and s.read < len(s.prompt)]
        budget = self.batch_size
        for sequence in sorted(reading, key=lambda s: (len(s.prompt) - s.read, s.arrival)):
            if budget <= 0:
                break
            budget -= self._read_prompt(sequence, budget)
        generating = [s for s in self._busy if s is not None and s.pending is not None]
        groups: dict[Adapters, list[Sequence]] = {}
        for sequence in generating:
            groups.setdefault(sequence.adapters, []).append(sequence)
        if len(groups) > max(self._most_sets, 1):  # said at each new most, not every step
            self._most_sets = len(groups)
            log.info("generating for %d adapter sets in one step, a decode each", len(groups))
        for group in groups.values():  # one decode per adapter set
            self._generate(group)

    def _admit(self) -> None:
        """Give waiting requests the free slots: the one already holding most of a prompt's
        start, else the lowest free id (sparse ids make every step slower)."""
        admitted = []
        with self._wake:
            if any(s.gone() for s in self._waiting):  # cancelled before they had a slot
                for sequence in [s for s in self._waiting if s.gone()]:
                    self._waiting.remove(sequence)
                    sequence.sampler.close()
            while self._waiting and None in self._busy:
                sequence = self._waiting.popleft()
                if sequence.gone():
                    sequence.sampler.close()
                    continue
                free = [i for i, s in enumerate(self._busy) if s is None]
                shared = {
                    i: _shared_start(self._held[i], sequence.prompt)
                    if self._held_adapters[i] == sequence.adapters
                    else 0
                    for i in free
                }
                slot = max(free, key=lambda i: (shared[i], -i))
                self._busy[slot] = sequence
                sequence.slot = slot
                self._arrivals += 1
                sequence.arrival = self._arrivals
                admitted.append(sequence)
        for sequence in admitted:
            self._start(sequence)

    def _start(self, sequence: Sequence) -> None:
        """Keep what the slot holds of the prompt's start; the last prompt token is always
        read again, for the logits to sample from."""
        slot = sequence.slot
        failure = self._load_adapters(sequence.adapters)  # first: it may void what slots hold
        if failure is not None:
            self._fail(sequence, failure)
            return
        keep = min(_shared_start(self._held[slot], sequence.prompt), len(sequence.prompt) - 1)
        if self._held_adapters[slot] != sequence.adapters:
            keep = 0  # computed with other adapters
        self._forget(slot, keep)
        self._held_adapters[slot] = sequence.adapters
        sequence.read = sequence.reused = len(self._held[slot])

    def _load_adapters(self, adapters: Adapters) -> BackendError | None:
        """Load the adapters not loaded yet (on the engine thread, between decodes); the
        error for the request if llama.cpp refuses one."""
        for path, _ in adapters:
            try:
                stamp = adapter_stamp(path)
            except BackendError as exc:
                return exc
            known = self._loras.get(path)
            if known is not None and known[1] == stamp:
                continue
            if known is not None:  # the file was replaced: its new weights from now on
                self._replaced(path)
            handle = self._lib.llama_adapter_lora_init(self.model.model, path.encode())
            if not handle:
                name = path.rsplit("/", 1)[-1]
                return BackendError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    Reason.ADAPTER_INVALID,
                    f"llama.cpp cannot apply the LoRA adapter {name} to this model: it is not "
                    "a GGUF LoRA, or it was trained for another base model (its architecture "
                    "or tensor shapes differ)",
                )
            self._loras[path] = (handle, stamp)
            log.info("loaded LoRA adapter %s", path)
        return None

    def _replaced(self, path: str) -> None:
        """Forget what was computed with an adapter file's old weights: the context's applied
        set, and the caches made with it of slots not generating (llama.cpp frees the old
        weights with the model; a sequence generating with them ends with them)."""
        self._applied = ()
        for slot, held in enumerate(self._held_adapters):
            sequence = self._busy[slot]
            # Idle, or just admitted and not read from yet (its prefix is not reused then).
            if (sequence is None or sequence.read == 0) and any(p == path for p, _ in held):
                self._forget(slot, 0)
                self._held_adapters[slot] = ()

    def _use(self, adapters: Adapters) -> None:
        """Have the context apply `adapters` (none: the base model) from the next decode."""
        if adapters == self._applied:
            return
        lib = self._lib
        count = len(adapters)
        handles = (lib.llama_adapter_lora_p_ctypes * count)(
            *(self._loras[path][0] for path, _ in adapters)
        )
        scales = (ctypes.c_float * count)(*(scale for _, scale in adapters))
        if lib.llama_set_adapters_lora(self.ctx.ctx, handles, count, scales) != 0:
            raise RuntimeError("llama.cpp could not set the context's LoRA adapters")
        self._applied = adapters

    def _forget(self, slot: int, keep: int) -> None:
        """Drop the slot's cache from position `keep` on (all of it for a recurrent model,
        whose state cannot be cut back)."""
        memory = self.ctx.memory
        if keep and not self._recurrent and self._lib.llama_memory_seq_rm(memory, slot, keep, -1):
            self._held[slot] = self._held[slot][:keep]
            return
        self._lib.llama_memory_seq_rm(memory, slot, -1, -1)
        self._held[slot] = []

    def _drop_cancelled(self) -> None:
        for slot, sequence in enumerate(self._busy):
            if sequence is not None and sequence.gone():
                if sequence.cancelled.is_set():
                    log.info("sequence %d cancelled after %d tokens", slot, sequence.produced)
                self._release(sequence)

    def _release(self, sequence: Sequence) -> None:
        sequence.sampler.close()
        self._busy[sequence.slot] = None

    def _read_prompt(self, sequence: Sequence, most: int) -> int:
        """Read the next chunk of a prompt, `most` tokens at most, in a decode of its own;
        after its last, sample the first token. The tokens read."""
        start = sequence.read
        chunk = sequence.prompt[start : start + most]
        last = start + len(chunk) == len(sequence.prompt)
        entries = [
            (token, start + i, sequence.slot, last and i == len(chunk) - 1)
            for i, token in enumerate(chunk)
        ]
        self._use(sequence.adapters)
        if not self._decode_or_fail(entries, [sequence]):
            return len(chunk)
        self._held[sequence.slot].extend(chunk)
        sequence.read += len(chunk)
        if last:
            self._take(sequence, len(chunk) - 1)
        return len(chunk)

    def _generate(self, sequences: list[Sequence]) -> None:
        """One token for every generating sequence (of one adapter set), in one decode, in
        slot order."""
        sequences.sort(key=lambda s: s.slot)
        self._use(sequences[0].adapters)
        entries = []
        for sequence in sequences:
            position = len(self._held[sequence.slot])
            entries.append((int(sequence.pending or 0), position, sequence.slot, True))
        if not self._decode_or_fail(entries, sequences):
            return
        for index, sequence in enumerate(sequences):
            self._held[sequence.slot].append(int(sequence.pending or 0))
            self._take(sequence, index)

    def _take(self, sequence: Sequence, index: int) -> None:
        """Sample a sequence's next token from batch position `index` and hand it on."""
        import numpy as np

        lib = self._lib
        logits = np.ctypeslib.as_array(
            lib.llama_get_logits_ith(self.ctx.ctx, index), shape=(self.model.n_vocab(),)
        )
        # Scored on the raw logits, before penalties, grammar and temperature, as OpenAI
        # reports it.
        logprobs = None if sequence.logprobs is None else _log_softmax(logits)
        constraint = sequence.constraint
        if constraint is not None and not constraint.forbid(logits):
            self._fail(sequence, constraint.failure())
            return
        token = sequence.sampler.sample(self.ctx.ctx, index)  # reads the masked logits
        sequence.pending = None
        if lib.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(sequence, stopped=True)
            return
        if constraint is not None:
            failure = constraint.take(token)
            if failure is not None:
                self._fail(sequence, failure)
                return
        sequence.produced += 1
        sequence.events.put(
            token
            if logprobs is None
            else _scored(token, logprobs, min(sequence.logprobs or 0, len(logprobs)))
        )
        if constraint is not None and constraint.complete:
            self._finish(sequence, stopped=True)  # the grammar allows nothing more
        elif sequence.produced >= sequence.budget:
            self._finish(sequence, stopped=False)
        elif len(self._held[sequence.slot]) >= self.context_per_slot:
            self._finish(sequence, stopped=False)  # its share of the cache is full
        else:
            sequence.pending = token

    def _finish(self, sequence: Sequence, *, stopped: bool) -> None:
        sequence.events.put(Finished(stopped=stopped))
        self._release(sequence)

    def _fail(self, sequence: Sequence, error: BackendError) -> None:
        sequence.events.put(error)
        self._release(sequence)

    def _decode_or_fail(self, entries: list[_Entry], who: list[Sequence]) -> bool:
        result = self._decode(entries)
        if result == 0:
            return True
        log.error("llama_decode returned %d for %d sequence(s)", result, len(who))
        error = BackendError(
            grpc.StatusCode.INTERNAL,
            Reason.INTERNAL,
            f"llama.cpp could not compute the next token (llama_decode returned {result})",
        )
        for sequence in who:
            sequence.events.put(error)
            self._forget(sequence.slot, 0)
            self._release(sequence)
        return False

    def _decode(self, entries: list[_Entry]) -> int:
        batch = self._batch
        for i, (token, position, slot, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        return int(self._lib.llama_decode(self.ctx.ctx, batch))

    def _fail_all(self, exc: BaseException) -> None:
        error = exc
        if not isinstance(exc, BackendError):
            error = BackendError(
                grpc.StatusCode.INTERNAL,
                Reason.INTERNAL,
                f"backend error: {type(exc).__name__}: {exc}",
            )
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for sequence in waiting + [s for s in self._busy if s is not None]:
            sequence.events.put(error)  # first: whatever fails next, its caller is told
            try:
                if sequence.slot >= 0:
                    self._busy[sequence.slot] = None
                    self._forget(sequence.slot, 0)
            except Exception:  # the cache could not be cleared: forget what it held anyway
                log.exception("could not clear sequence %d", sequence.slot)
                self._held[sequence.slot] = []
            finally:
                sequence.sampler.close()


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    wide = logits.astype(np.float64)
    peak = wide.max()
    return wide - (peak + np.log(np.exp(wide - peak).sum()))


def _scored(token: int, logprobs: Any, alternatives: int) -> Scored:
    """`token`'s log-probability and the `alternatives` most likely tokens at its place."""
    import numpy as np

    top: list[tuple[int, float]] = []
    if alternatives:
        best = np.argpartition(logprobs, -alternatives)[-alternatives:]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = [(int(t), float(logprobs[t])) for t in best]
    return Scored(token, float(logprobs[token]), top)


def _shared_start(held: list[int], prompt: list[int]) -> int:
    shared = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        shared += 1
    return shared
