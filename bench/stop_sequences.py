"""What stop sequences cost a generation: none, the most the server accepts by default (16 of
1000 characters), and the 100,000 a hostile client once sent (which made a 40-token request 7x
slower before stop sequences were bounded).

Every text backend runs its pieces through the same `StopText` (backends/runtime/text.py), so
this times that on its own: 40 pieces of a real model's answer, fed one by one as a stream
would, with each set of stops, in turns. Prints the time per request and each set's ratio to no
stops at all. What a client within the limits can cost is the default bound's time per token,
next to the time a model takes to make one.

    .venv/bin/python bench/stop_sequences.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from harness import ROOT

sys.path.insert(0, str(ROOT))

from backends.runtime.text import StopText
from gateway.settings import Settings

PIECES = (
    "The capital of France is Paris . It is known for the Eiffel Tower , the Louvre , "
    "and its cafes . Paris has been the country 's capital since the tenth century and "
    "is home to more than two million people ."
).split()[:40]


def stop_sets() -> dict[str, list[str]]:
    settings = Settings()
    longest = settings.max_stop_length
    return {
        "no stops": [],
        "4 short stops": ["\n\n", "User:", "###", "</s>"],
        # The worst within the defaults: as many as allowed, as long as allowed, each sharing a
        # long prefix with the text so that every piece has to be held back and checked.
        f"{settings.max_stop_sequences} x {longest} chars (the default bound)": [
            ("Paris " * longest)[: longest - 1] + chr(0x4E00 + i)
            for i in range(settings.max_stop_sequences)
        ],
        "100,000 stops (refused now)": [f"stop-{i}" for i in range(100_000)],
    }


def one_request(stops: list[str]) -> float:
    started = time.perf_counter()
    text = StopText(stops)
    for piece in PIECES:
        text.feed(" " + piece)
    text.rest()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    sets = stop_sets()
    times: dict[str, list[float]] = {name: [] for name in sets}
    names = list(sets)
    for index in range(args.rounds):
        for name in names if index % 2 == 0 else reversed(names):
            times[name].append(one_request(sets[name]))
    base = statistics.median(times["no stops"])
    print(f"{len(PIECES)} pieces, {args.rounds} rounds, medians:")
    for name in names:
        median = statistics.median(times[name])
        per_piece = median / len(PIECES) * 1e3
        print(
            f"  {name:45s} {median * 1e3:9.3f} ms per request ({per_piece:.3f} ms a token)"
            f"  {median / base:9.1f}x no stops"
        )
    print("(for scale: SmolLM2-135M makes a token in about 9 ms here: bench/sharing.py)")


if __name__ == "__main__":
    main()
