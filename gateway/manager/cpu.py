"""CPU: the cores are divided among the backends that are computing, as that set changes.

llama.cpp's worker threads (and OpenMP's, under torch and CTranslate2) spin while they wait for
each other, so two models computing at once with a thread per core each starve one another
(measured: 0.01x the throughput of one). Instead, whenever a request starts or ends, the
gateway divides the cores among the backends with requests in flight and tells each its share
(Lifecycle.SetThreads); engines apply it at their next step. A model computing alone gets every
core (up to its YAML `threads`); two get half each. Engines whose thread count is fixed at load
(CTranslate2) keep it, and the others share what is left.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    """One computing backend: the most threads it can use, and whether that can change."""

    ceiling: int
    adjustable: bool


def divide(cores: int, demands: list[Demand]) -> list[int]:
    """Threads for each demand: fixed ones keep theirs, adjustable ones share the rest evenly.

    Every adjustable backend gets at least one thread (a core is time-shared then, which costs
    little for single-threaded work); none gets more than its ceiling, and what a capped one
    leaves goes to the others.
    """
    shares = [d.ceiling if not d.adjustable else 0 for d in demands]
    left = max(0, cores - sum(shares))
    open_ = [i for i, d in enumerate(demands) if d.adjustable]
    while open_:
        each, extra = divmod(left, len(open_))
        capped = [i for i in open_ if demands[i].ceiling <= each]
        if not capped:
            for rank, i in enumerate(open_):
                shares[i] = max(1, each + (1 if rank < extra else 0))
            break
        for i in capped:
            shares[i] = max(1, demands[i].ceiling)
            left -= demands[i].ceiling
        left = max(0, left)
        open_ = [i for i in open_ if i not in capped]
    return shares
