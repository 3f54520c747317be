"""What a response_format JSON schema may ask of llama.cpp's grammar code.

llama-cpp-python turns a JSON schema into a GBNF grammar in Python and writes every bounded
repetition out: `maxItems: 1000` becomes 1000 parenthesised groups, each inside the one before.
llama.cpp parses that text recursively, a pair of C++ frames per parenthesis, and some thousands of
levels overflow the engine thread's stack (SIGSEGV). A grammar llama.cpp refuses instead (a group
repeated into 2000 rules or more, a rule that starts with itself) comes back as a NULL sampler,
which llama-cpp-python hands on unchecked: the first sample crashes. And a small schema can make a
grammar so wide or so ambiguous that checking the vocabulary against it takes seconds to minutes
per token, with the model held all that time.

So the backend checks a schema before anything reaches llama.cpp: its bounds before the Python
port writes them out (a bound of 10**9 would be a string of gigabytes), then the grammar, read the
way llama.cpp reads it and measured, then whether llama.cpp accepts it. The limits come from
`bench/fuzz_schemas.py`, with a margin below where it found crashes and slow tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from backends.runtime.errors import BackendError, invalid
from protos.hearth.backend.v1.contract import Reason

#: The largest gap between a lower and an upper bound (minItems and maxItems, minLength and
#: maxLength, m and n in a pattern's {m,n}): the Python port nests one group in the next for each
#: repetition in it.
MAX_REPETITIONS = 500
#: The largest lower bound: the Python port writes the item out that many times.
MAX_WRITTEN_OUT = 20_000
#: Parentheses inside parentheses: llama.cpp's parser recurses into each.
MAX_NESTING = 512
#: The grammar text as a whole.
MAX_GRAMMAR_BYTES = 1024 * 1024
#: Grammar positions open at once (enum values, anyOf branches) times the vocabulary: for every
#: token, llama.cpp checks each such position against every token of the vocabulary. On SmolLM2
#: (49152 tokens) that is about 1000 positions, 0.15 s a token for enum values, 0.7 s for anyOf
#: branches that are objects; the fuzzer saw 2 s at 14000 and at 4400 (2200 branches).
MAX_POSITION_CHECKS = 50_000_000
#: Optional parts in a row that could take the same text (`(a?){16}` in a pattern): llama.cpp
#: tries every way of sharing a token's characters among them.
MAX_OPTIONAL_RUN = 8

#: GBNF as llama.cpp's parser reads it (llama-grammar.cpp, parse_sequence).
_TOKEN = re.compile(
    r"""
    (?P<space>(?:\s|\#[^\r\n]*)+)
    | (?P<text>"(?:\\.|[^"\\])*" | \[(?:\\.|[^\]\\])*\] | !?<[^>]*> | \.)
    | (?P<defines>::=)
    | (?P<name>[a-zA-Z0-9-]+)
    | (?P<repeat>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
    | (?P<symbol>[()|*+?])
    """,
    re.VERBOSE,
)
_REPEAT_BOUNDS = re.compile(r"\d+|,")
#: llama.cpp refuses `{m,n}` with m above this, and reads an n above it as unbounded.
_LLAMA_REPETITION_THRESHOLD = 2000
#: Counts are capped here, so that a grammar built to explode stays a small integer.
_CAP = 1 << 40

_BOUND_PAIRS = (("minItems", "maxItems"), ("minLength", "maxLength"))
#: Keywords whose value maps names to schemas.
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
#: Keywords whose value is data, not schema.
_DATA = frozenset({"enum", "const", "default", "examples"})
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:(,)\s*(\d*)\s*)?\}")

#: A rule: its alternatives, each a list of items: a rule id (>= 0) or a piece of text (< 0,
#: one number per distinct literal or character class).
Rules = list[list[list[int]]]


@dataclass(frozen=True)
class GrammarShape:
    """What in a grammar costs llama.cpp stack or time."""

    size: int
    rules: int
    nesting: int
    positions: int
    optional_run: int
    left_recursive: bool


def too_complex(message: str) -> BackendError:
    """The 400 for a schema whose grammar llama.cpp cannot take."""
    return BackendError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.SCHEMA_TOO_COMPLEX,
        message,
        param="response_format",
    )


def grammar_for_schema(schema_text: str, vocabulary: int) -> str:
    """The GBNF grammar for a JSON schema, checked for a model with this many tokens."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        schema = json.loads(schema_text)
    except (ValueError, RecursionError) as exc:
        raise _not_convertible(exc) from None
    check_bounds(schema)
    try:
        grammar = json_schema_to_gbnf(schema_text)
    except Exception as exc:  # the port asserts, and recurses per level (RecursionError)
        raise _not_convertible(exc) from None
    check_grammar(grammar, vocabulary)
    return grammar


def _not_convertible(exc: BaseException) -> BackendError:
    return invalid(
        "invalid_json_schema",
        f"cannot turn this JSON schema into a grammar: {str(exc) or type(exc).__name__}",
        param="response_format",
    )


def check_bounds(schema: object) -> None:
    """Refuse a bound the Python port would write out too many times, before it does."""
    todo: list[tuple[object, str, bool]] = [(schema, "", False)]
    while todo:
        node, where, is_map = todo.pop()
        if isinstance(node, list):
            todo.extend((item, f"{where}/{i}", False) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        if not is_map:
            at = f" at {where}" if where else ""
            for low, high in _BOUND_PAIRS:
                least, most = node.get(low, 0), node.get(high)
                _check_repetition(least, most, f"{low} {least}{at}", f"{high} {most}{at}")
            pattern = node.get("pattern")
            for match in _QUANTIFIER.finditer(pattern if isinstance(pattern, str) else ""):
                least, comma, most = match.groups()
                text = f"{match.group()} in the pattern{at}"
                _check_repetition(least, most or (None if comma else least), text, text)
        for key, value in node.items():
            if is_map or key not in _DATA:
                todo.append((value, f"{where}/{key}", not is_map and key in _SCHEMA_MAPS))


def _check_repetition(least: object, most: object, low: str, high: str) -> None:
    """A lower bound, written out that often, and an upper one, nested as deep above it."""
    if _number(least) > MAX_WRITTEN_OUT:
        raise too_complex(
            f"{low} would spell its item out that many times in llama.cpp's grammar (limit "
            f"{MAX_WRITTEN_OUT}); lower it or drop the bound"
        )
    if most is not None and _number(most) - _number(least) > MAX_REPETITIONS:
        raise too_complex(
            f"{high} makes a grammar too deep for llama.cpp (limit {MAX_REPETITIONS} nested "
            "repetitions above the lower bound); lower it or drop the bound"
        )


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return 0
    try:
        return float(value)
    except ValueError:
        return 0


def check_grammar(grammar: str, vocabulary: int) -> GrammarShape:
    """Refuse a grammar llama.cpp would crash on or be too slow with; its shape if not."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise too_complex(
            f"this schema makes a grammar of {len(grammar)} bytes, too large for llama.cpp "
            f"(limit {MAX_GRAMMAR_BYTES}); use fewer properties, enum values or bounds"
        )
    try:
        shape = measure(grammar)
    except ValueError as exc:
        raise too_complex(f"llama.cpp could not read the grammar of this schema: {exc}") from None
    if shape.nesting > MAX_NESTING:
        raise too_complex(
            f"this schema makes a grammar nested {shape.nesting} levels deep, too deep for "
            f"llama.cpp (limit {MAX_NESTING}); lower its largest maxItems, maxLength or "
            "{m,n} bound, or drop it"
        )
    if shape.left_recursive:
        raise invalid(
            "invalid_json_schema",
            "this schema refers to itself ($ref) before any text, which llama.cpp's grammars "
            "cannot express",
            param="response_format",
        )
    if shape.optional_run > MAX_OPTIONAL_RUN:
        raise too_complex(
            f"a pattern in this schema has {shape.optional_run} optional parts in a row that "
            f"could each match the same text (limit {MAX_OPTIONAL_RUN}): too ambiguous for "
            "llama.cpp to sample from in time; bound the repetition instead, e.g. a{0,16} "
            "rather than (a?){16}"
        )
    positions = max(1, MAX_POSITION_CHECKS // max(1, vocabulary))
    if shape.positions > positions:
        raise too_complex(
            f"this schema leaves llama.cpp {shape.positions} alternatives open at once, too "
            f"many to check this model's {vocabulary} tokens against in time (limit "
            f"{positions}); use fewer enum values or anyOf branches"
        )
    return shape


def llama_grammar(vocab: Any, grammar: str) -> Any:
    """llama.cpp's grammar sampler for a checked grammar; the caller owns it (a sampler chain
    takes it over, or `llama_sampler_free`).

    llama.cpp answers a grammar it refuses with NULL: put in a sampler chain, that would crash
    the process at the first sample.
    """
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise too_complex(
            "llama.cpp refuses the grammar made from this schema (most often: a part repeated "
            "into 2000 rules or more); lower its bounds or simplify it"
        )
    return sampler


# Measuring a grammar ---------------------------------------------------------------------------


def measure(grammar: str) -> GrammarShape:
    """Read GBNF into the rules llama.cpp makes of it (a group or a repetition is a rule of its
    own), and measure them. Nothing here recurses: deep grammars are the point. ValueError if
    the text is not GBNF."""
    rules, nesting = _parse(grammar)
    nullable = _nullable(rules)
    # llama.cpp's left-recursion check counts a rule as possibly empty only when one of its
    # alternatives is empty as written.
    empty = [any(not items for items in alternatives) for alternatives in rules]
    _, left_recursive = _post_order(len(rules), lambda rule: _leading(rules[rule], empty))
    # Rules after those they start with; and after every rule they refer to.
    order, _ = _post_order(len(rules), lambda rule: _leading(rules[rule], nullable))
    everything, _ = _post_order(
        len(rules), lambda rule: (i for a in rules[rule] for i in a if i >= 0)
    )
    starts = _starts(rules, nullable, order)
    return GrammarShape(
        size=len(grammar),
        rules=len(rules),
        nesting=nesting,
        positions=max(
            _widest_point(rules, nullable, starts),
            _widest_union(rules, nullable, starts, everything),
        ),
        optional_run=_optional_run(rules, nullable, order, _same_content(rules, everything)),
        left_recursive=left_recursive,
    )


def _parse(grammar: str) -> tuple[Rules, int]:
    """The rules, and how deep the parentheses nest."""
    rules: Rules = []
    names: dict[str, int] = {}
    texts: dict[str, int] = {}

    def named(name: str) -> int:
        if name not in names:
            names[name] = len(rules)
            rules.append([])
        return names[name]

    tokens = []
    pos = 0
    while pos < len(grammar):
        match = _TOKEN.match(grammar, pos)
        if match is None:
            raise ValueError(f"unexpected {grammar[pos : pos + 20]!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()

    groups: list[list[list[int]]] = []  # the alternatives being read, innermost last
    nesting = 0
    for i, (kind, text) in enumerate(tokens):
        if kind == "name" and i + 1 < len(tokens) and tokens[i + 1][0] == "defines":
            if len(groups) > 1:
                raise ValueError(f"unclosed '(' before {text}")
            groups = [[[]]]
            rules[named(text)] = groups[0]
        elif kind == "defines":
            continue
        elif not groups:
            raise ValueError(f"expecting a rule name at {text!r}")
        elif kind == "name":
            groups[-1][-1].append(named(text))
        elif kind == "text":
            groups[-1][-1].append(-texts.setdefault(text, len(texts) + 1))
        elif text == "(":
            groups.append([[]])
            nesting = max(nesting, len(groups) - 1)
        elif text == ")":
            if len(groups) < 2:
                raise ValueError("unbalanced ')'")
            rules.append(groups.pop())
            groups[-1][-1].append(len(rules) - 1)
        elif text == "|":
            groups[-1].append([])
        else:
            _repeat(rules, groups[-1][-1], text)
    if len(groups) > 1:
        raise ValueError("unbalanced '('")
    return rules, nesting


def _repeat(rules: Rules, sequence: list[int], operator: str) -> None:
    """Rewrite the last item of a sequence for a repetition, into rules as llama.cpp does."""
    if not sequence:
        raise ValueError(f"nothing to repeat before {operator!r}")
    high: int | None
    if operator in "?*+":
        low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[operator]
    else:
        bounds = _REPEAT_BOUNDS.findall(operator)
        low = int(bounds[0])
        high = low if len(bounds) == 1 else int(bounds[2]) if len(bounds) == 3 else None
        if low > _LLAMA_REPETITION_THRESHOLD:
            raise ValueError(f"{operator} repeats more than llama.cpp allows")
        if high is not None and high > _LLAMA_REPETITION_THRESHOLD:
            high = None
    item = sequence.pop()
    sequence.extend([item] * low)
    if high is None:  # S' ::= S S' | (nothing)
        rules.append([[item, len(rules)], []])
        sequence.append(len(rules) - 1)
        return
    for n in range(high - low):  # S'(n) ::= S S'(n - 1) | (nothing)
        rules.append([[item, len(rules) - 1] if n else [item], []])
    if high > low:
        sequence.append(len(rules) - 1)


def _nullable(rules: Rules) -> list[bool]:
    """Which rules can match no text at all (a worklist: linear in the grammar's size)."""
    nullable = [False] * len(rules)
    users: list[list[tuple[int, int]]] = [[] for _ in rules]  # rule -> (rule, alternative)
    missing: dict[tuple[int, int], int] = {}
    found = []
    for rule, alternatives in enumerate(rules):
        for index, items in enumerate(alternatives):
            if any(item < 0 for item in items):
                continue
            missing[rule, index] = len(items)
            for item in items:
                users[item].append((rule, index))
            if not items and not nullable[rule]:
                nullable[rule] = True
                found.append(rule)
    while found:
        rule = found.pop()
        for user, index in users[rule]:
            missing[user, index] -= 1
            if missing[user, index] == 0 and not nullable[user]:
                nullable[user] = True
                found.append(user)
    return nullable


def _leading(alternatives: list[list[int]], empty: list[bool]) -> Iterable[int]:
    """The rules a rule can start with, given which rules can be skipped."""
    for items in alternatives:
        for item in items:
            if item < 0:
                break
            yield item
            if not empty[item]:
                break


def _post_order(size: int, children: Callable[[int], Iterable[int]]) -> tuple[list[int], bool]:
    """Every rule after its children, and whether a rule is its own descendant."""
    state = [0] * size  # 0: not seen, 1: on the path, 2: done
    order: list[int] = []
    cyclic = False
    for root in range(size):
        if state[root]:
            continue
        state[root] = 1
        path = [(root, iter(children(root)))]
        while path:
            node, pending = path[-1]
            for child in pending:
                if state[child] == 0:
                    state[child] = 1
                    path.append((child, iter(children(child))))
                    break
                cyclic = cyclic or state[child] == 1
            else:
                path.pop()
                state[node] = 2
                order.append(node)
    return order, cyclic


def _starts(rules: Rules, nullable: list[bool], order: list[int]) -> list[int]:
    """For each rule, the grammar positions llama.cpp opens when it enters it."""
    starts = [0] * len(rules)
    for rule in order:
        starts[rule] = min(_CAP, sum(_open(items, starts, nullable)[0] for items in rules[rule]))
    return starts


def _widest_point(rules: Rules, nullable: list[bool], starts: list[int]) -> int:
    """The most positions open at one point of one rule: at an item, those it can start with,
    and those after it when it can match nothing (an enum's values, an object's keys)."""
    inside = (max(_open(items, starts, nullable)) for alts in rules for items in alts)
    return max(max(starts, default=1), max(inside, default=1))


def _widest_union(rules: Rules, nullable: list[bool], starts: list[int], order: list[int]) -> int:
    """The most positions open together after alternatives that start with the same text:
    anyOf branches that are all objects are all still open after their `{`."""
    first: list[int | None] = [None] * len(
        rules
    )  # the text all of a rule's alternatives start with
    after = [0] * len(rules)  # and the positions open right after it
    widest = 1
    key: int | None
    for rule in order:
        together: dict[int | None, int] = {}
        for items in rules[rule]:
            head = items[0] if items else 0
            if not items or (head >= 0 and (first[head] is None or nullable[head])):
                together[None] = 0  # no text it must start with
                continue
            if head < 0:
                key, following = head, _open(items, starts, nullable)[1] if len(items) > 1 else 1
            else:
                key, following = first[head], after[head]
            together[key] = min(_CAP, together.get(key, 0) + following)
        widest = max(widest, *together.values()) if together else widest
        if len(together) == 1 and None not in together:
            [(first[rule], after[rule])] = together.items()
    return widest


def _open(items: list[int], starts: list[int], nullable: list[bool]) -> list[int]:
    """For each item of a sequence, the positions open there."""
    open_here = [0] * len(items)
    after = 0
    for i in range(len(items) - 1, -1, -1):
        item = items[i]
        # Text is one position; a rule its own first ones, and what follows if it can be empty.
        after = 1 if item < 0 else min(_CAP, starts[item] + (after if nullable[item] else 0))
        open_here[i] = after
    return open_here or [0]


def _optional_run(rules: Rules, nullable: list[bool], order: list[int], kinds: list[int]) -> int:
    """The most optional parts in a row that could match the same text.

    A run of skippable items counts the optional parts inside them by what they are made of:
    `(a?){16}` is 16 of the same part, `((a?){2}){8}` is 16 too, while an object's optional
    properties are all different, so 1 each.
    """
    # For a rule that can match nothing: which part it repeats most, and how often.
    parts: list[tuple[int, int]] = [(kinds[rule], 1) for rule in range(len(rules))]
    for rule in order:
        if not nullable[rule]:
            continue
        # A rule that only wraps optional parts is those parts; otherwise it is one itself.
        inner = [
            _most_repeated(parts[item] for item in items)
            for items in rules[rule]
            if items and all(item >= 0 and nullable[item] for item in items)
        ]
        if inner:
            parts[rule] = max(inner, key=_count)
    longest = 0
    for alternatives in rules:
        for items in alternatives:
            run: list[tuple[int, int]] = []
            for item in [*items, -1]:
                if item >= 0 and nullable[item]:
                    run.append(parts[item])
                elif run:
                    longest = max(longest, _count(_most_repeated(run)))
                    run = []
    return longest


def _count(part: tuple[int, int]) -> int:
    return part[1]


def _most_repeated(parts: Iterable[tuple[int, int]]) -> tuple[int, int]:
    totals: dict[int, int] = {}
    for kind, count in parts:
        totals[kind] = min(_CAP, totals.get(kind, 0) + count)
    return max(totals.items(), key=_count)


def _same_content(rules: Rules, order: list[int]) -> list[int]:
    """A number per rule, the same for rules written alike (`"a"?` twice is two rules); `order`
    has every rule after those it refers to."""
    kinds = [-1] * len(rules)
    seen: dict[tuple[tuple[int, ...], ...], int] = {}
    for rule in order:
        content = tuple(
            tuple(
                item if item < 0 else kinds[item] if kinds[item] >= 0 else -(10**12) - item
                for item in items
            )
            for items in rules[rule]
        )
        kinds[rule] = seen.setdefault(content, len(seen))
    return kinds
