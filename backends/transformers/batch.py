"""Static batching of generations: concurrent prompts share one `model.generate` call.

Generations wait in a queue. When the compute thread is free, the oldest one and every queued
one that can share its settings (`Generation.key`) go together, up to `parallel` of them, as one
left-padded `generate` call. One that finds the thread idle waits a few milliseconds (the
window) for others to join, unless the batch fills first; those arriving while a batch computes
wait for the next one (static batching: a batch never takes on rows once it has started).

A stopping criterion, called after every token, is the batch's main hook into `generate`: it
applies the gateway's thread share, hands each row's new token to its caller, and ends a row at
its end-of-sequence token, at its own token budget, once its constraint is satisfied, or once its
caller wants no more (a stop sequence appeared, it was cancelled, it left). Ended rows go on as
padding nobody reads, and `generate` returns once every row has ended.

A generation may carry a constraint (structured output, see backends/runtime/constrain.py): a
logits processor masks each constrained row's scores to the tokens its grammar allows, row by
row, so that constrained and free generations share a batch.

A generation may carry LoRA adapters (a variant of the model, see lora.py): they are loaded at
their first use, just before the batch that needs them computes, and applied to their own rows
only, so that the base model's generations and those of several variants share a batch.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from backends.runtime import BackendError
from protos.hearth.backend.v1.contract import Reason

if TYPE_CHECKING:
    from backends.runtime.constrain import Constraint
    from backends.transformers.lora import Adapters, LoraAdapters

log = logging.getLogger("hearth.backend.transformers")

#: How often a caller waiting for its next token looks whether it was cancelled.
_POLL_SECONDS = 0.05


@dataclass(eq=False)
class Generation:
    """One caller's prompt, limits and settings, and the queue its tokens come back on."""

    prompt: list[int]
    #: The most tokens it may produce.
    budget: int
    #: `generate` keywords (sampling settings).
    options: dict[str, Any]
    #: The caller's own seed: sampling with one computes alone, so that it repeats exactly.
    seed: int | None
    cancelled: threading.Event
    #: The grammar its tokens must follow (structured output); None: free.
    constraint: Constraint | None = None
    #: The LoRA adapters it is generated with; empty: the base model.
    adapters: Adapters = ()
    #: Token ids, then None at the end, or the exception that failed the batch.
    tokens: queue.Queue[int | BaseException | None] = field(default_factory=queue.Queue)
    arrived: float = field(default_factory=time.monotonic)
    #: Set by the caller: it wants no more tokens (a stop sequence appeared, or it left).
    finished: bool = False
    # Kept by the compute thread.
    produced: int = 0
    ended: bool = False

    @property
    def key(self) -> Hashable:
        """Generations with equal keys can share a batch."""
        if self.options.get("do_sample") and self.seed is not None:
            return id(self)  # ids are unique among the generations alive together
        key: tuple[Any, ...] = tuple(sorted(self.options.items()))
        if "repetition_penalty" in self.options:
            # The penalty would fall on a shorter prompt's padding too: batch only prompts of
            # one length, which need none.
            key += (len(self.prompt),)
        return key

    def next_token(self) -> int | None:
        """The caller's next token; None at the end or once cancelled."""
        while True:
            try:
                item = self.tokens.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self.cancelled.is_set():
                    return None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    # On the compute thread ---------------------------------------------------------------------

    def take(self, token: int, end_tokens: set[int]) -> None:
        """This row's next token from the model."""
        if self.ended:
            return  # padding after its end
        if token in end_tokens:
            self.end()
            return
        if self.constraint is not None:
            failure = self.constraint.take(token)
            if failure is not None:
                self.end(failure)
                return
        self.produced += 1
        self.tokens.put(token)
        if self.produced >= self.budget or self.complete:
            self.end()

    @property
    def complete(self) -> bool:
        """Its constraint is satisfied and allows no more tokens."""
        return self.constraint is not None and self.constraint.complete

    def end(self, failure: BaseException | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.tokens.put(failure)

    def unwanted(self) -> bool:
        return self.finished or self.cancelled.is_set()


class GenerationBatcher:
    """Runs queued generations in batches of up to `parallel` on one compute thread."""

    def __init__(
        self,
        model: Any,
        compute: ThreadPoolExecutor,
        *,
        parallel: int,
        window_seconds: float,
        pad_token_id: int,
        end_tokens: set[int],
        follow_threads: Callable[[], None],
        adapters: LoraAdapters,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.compute = compute
        self.parallel = parallel
        self.window_seconds = window_seconds
        self.pad_token_id = pad_token_id
        self.end_tokens = end_tokens
        self.follow_threads = follow_threads
        self._lock = threading.Condition()
        self._pending: list[Generation] = []
        self._scheduled = False  # a dispatch is queued on the compute thread
        self._closed = False

    def submit(self, generation: Generation) -> None:
        """Queue a generation; its tokens arrive on `generation.tokens`."""
        with self._lock:
            if self._closed:
                raise model_unloaded()
            self._pending.append(generation)
            self._lock.notify_all()
            if not self._scheduled:
                self._scheduled = True
                self.compute.submit(self._dispatch)

    def release(self, generation: Generation) -> None:
        """The caller wants no more tokens: drop it from the queue, or end its row."""
        generation.finished = True
        with self._lock:
            if generation in self._pending:
                self._pending.remove(generation)
                self._lock.notify_all()

    def close(self) -> None:
        """Refuse what is queued and anything new; a batch computing runs to its end."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
            self._lock.notify_all()
        for generation in pending:
            generation.end(model_unloaded())

    def _dispatch(self) -> None:
        """On the compute thread: gather one batch and run it, then make way for the next."""
        try:
            with self._lock:
                batch = self._gather()
            try:
                self._run(batch)
            except Exception as exc:
                for generation in batch:
                    generation.end(exc)
            for generation in batch:
                generation.end()  # every row has ended by now; this is for safety
        finally:
            with self._lock:
                self._scheduled = bool(self._pending) and not self._closed
                if self._scheduled:
                    self.compute.submit(self._dispatch)

    def _gather(self) -> list[Generation]:
        """The oldest generation and those that can join it, once the batch is full or the
        oldest has waited its window (called with the lock held)."""
        while self._pending and not self._closed:
            first = self._pending[0]
            key = first.key
            batch = [g for g in self._pending if g.key == key][: self.parallel]
            wait = first.arrived + self.window_seconds - time.monotonic()
            if len(batch) >= self.parallel or wait <= 0:
                for generation in batch:
                    self._pending.remove(generation)
                return batch
            self._lock.wait(wait)
        return []

    def _run(self, batch: list[Generation]) -> None:
        import torch
        import transformers

        for generation in batch:
            if generation.unwanted():
                generation.end()
            elif generation.adapters:
                failure = self.adapters.load(generation.adapters)
                if failure is not None:
                    generation.end(failure)
        batch = [g for g in batch if not g.ended]
        if not batch:
            return
        end_tokens = self.end_tokens
        follow_threads = self.follow_threads
        steps = 0

        class Step(transformers.StoppingCriteria):
            """After each token: hand it to its caller; the rows that have ended."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                nonlocal steps
                steps += 1
                follow_threads()  # the gateway may have given this model more or fewer cores
                for generation, token in zip(batch, input_ids[:, -1].tolist(), strict=True):
                    generation.take(int(token), end_tokens)
                    if generation.unwanted():
                        generation.end()
                ended = [g.ended for g in batch]
                return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)

        class Masks(transformers.LogitsProcessor):
            """Before each token: a constrained row may take only what its grammar allows."""

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                for row, generation in enumerate(batch):
                    if generation.constraint is None or generation.ended:
                        continue
                    if not _forbid(generation.constraint, scores[row]):
                        # Nothing may follow: the row ends, with the reason.
                        generation.end(generation.constraint.failure())
                return scores

        constrained = any(g.constraint is not None for g in batch)
        processors = transformers.LogitsProcessorList([Masks()] if constrained else [])

        width = max(len(g.prompt) for g in batch)
        # Left padding: every row's next token comes at the end, where generate() reads it.
        input_ids = [[self.pad_token_id] * (width - len(g.prompt)) + g.prompt for g in batch]
        mask = [[0] * (width - len(g.prompt)) + [1] * len(g.prompt) for g in batch]
        first = batch[0]
        seed = first.seed if first.seed is not None else random.getrandbits(31)
        level = logging.INFO if len(batch) > 1 else logging.DEBUG
        adapted = sum(1 for g in batch if g.adapters)
        log.log(
            level,
            "generating %d prompts together (%s tokens long%s)",
            len(batch),
            ", ".join(str(len(g.prompt)) for g in batch),
            f"; {adapted} with LoRA adapters" if adapted else "",
        )
        follow_threads()
        torch.manual_seed(seed)
        with torch.inference_mode(), self.adapters.applied([g.adapters for g in batch]):
            self.model.generate(
                input_ids=torch.tensor(input_ids),
                attention_mask=torch.tensor(mask),
                max_new_tokens=max(g.budget for g in batch),
                stopping_criteria=transformers.StoppingCriteriaList([Step()]),
                logits_processor=processors,
                pad_token_id=self.pad_token_id,
                **first.options,
            )
        log.log(level, "batch of %d done after %d steps", len(batch), steps)


def model_unloaded() -> BackendError:
    """A generation asked for after the model was unloaded."""
    return BackendError(
        grpc.StatusCode.FAILED_PRECONDITION, Reason.MODEL_NOT_LOADED, "the model was unloaded"
    )


_NUMPY_FLOATS = frozenset({"torch.float32", "torch.float64", "torch.float16"})


def _forbid(constraint: Constraint, scores: Any) -> bool:
    """`Constraint.forbid` on one row of torch scores; False when no token may follow."""
    import torch

    if scores.device.type == "cpu" and str(scores.dtype) in _NUMPY_FLOATS:
        # numpy's one thread: torch's own masked_fill_ on a CPU its threads share with other
        # work waits for them, 10 ms a token and more.
        return constraint.forbid(scores.numpy())
    allowed = constraint.allowed()
    if allowed is None:
        return False
    banned = torch.from_numpy(~allowed[: scores.shape[-1]]).to(scores.device)
    scores.masked_fill_(banned, float("-inf"))
    return True
