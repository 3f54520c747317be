"""What a JSON schema would cost llguidance, checked before it is compiled.

llguidance bounds the work of each token (`LLParserLimits`), but not everything a schema can
ask of it (measured by bench/fuzz_schemas.py on llguidance 1.9.1, SmolLM2's 49k vocabulary):

- a chain of about 900 `$ref`s, each one level deeper, overflows the stack of the thread that
  compiles it (SIGSEGV: the backend process dies); so does a shorter chain of deeper definitions;
- an integer `multipleOf` can cost seconds to minutes: 99,999 took 0.5 s, 3 x 2^20 7.3 s, 2^31
  over 40 s and 2.7 GB; up to 10,000, or up to 100 followed by zeros, at most 0.16 s;
- an `allOf` of a few hundred patterns takes seconds and gigabytes before it is refused;
- a literal (`const`, an enum value, a property name, a pattern) costs about 1 µs a character
  on every token while it can come next, on the engine thread that every sequence shares
  (64,000 characters: 81 ms a token);
- compiling grows with the schema: 2838 optional properties took 0.5 s, 16,384 took 6.8 s.

`check` refuses such a schema with a 400 `schema_too_complex` that names what is over which
limit. The limits sit well inside what was measured harmless, and well above what a schema for
a chat answer or a tool's arguments holds.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

from backends.runtime.errors import invalid
from protos.hearth.backend.v1.contract import Reason

#: Nesting of schemas, counted through `$ref`s (a crash from about 900 levels of $ref chain).
MAX_DEPTH = 256
#: Characters in one literal: about 2 ms a token on the engine thread while it can come next.
MAX_LITERAL = 2048
#: Properties in the whole schema, each definition counted once.
MAX_PROPERTIES = 2000
#: Enum values and `anyOf`/`oneOf` branches in the whole schema.
MAX_ALTERNATIVES = 20_000
#: Patterns one `allOf` intersects.
MAX_INTERSECTED_PATTERNS = 32
#: The digits of a `multipleOf` (its numerator: 0.25 is 25), unless they are up to 100 followed
#: by zeros.
MAX_MULTIPLE = 10_000
#: The schema as JSON text.
MAX_TEXT = 256 * 1024

#: Keywords whose value is a schema, a list of schemas, or a name -> schema map (closed() in
#: constrain.py walks the same ones).
ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames")
MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def check(schema: Any, param: str) -> None:
    """Refuse (a 400 naming `param`) a schema past any of the limits above."""
    try:
        size = len(json.dumps(schema))
    except (RecursionError, ValueError):
        _refuse(f"it is nested more than {MAX_DEPTH} levels deep", param)
    if size > MAX_TEXT:
        _refuse(f"it is {size} characters of JSON; the most is {MAX_TEXT}", param)
    _Walk(schema, param).run()


def _refuse(why: str, param: str) -> Any:
    what = "the tools' parameters are" if param == "tools" else "this JSON schema is"
    raise invalid(Reason.SCHEMA_TOO_COMPLEX, f"{what} too costly to follow: {why}", param=param)


class _Walk:
    """One pass over a schema, each `$ref` target walked once; its height (nesting, through
    references) and totals checked as it goes."""

    def __init__(self, root: Any, param: str) -> None:
        self.root = root
        self.param = param
        self.heights: dict[str, int] = {}
        self.walking: set[str] = set()
        self.properties = 0
        self.alternatives = 0

    def run(self) -> None:
        self.height(self.root, 1)

    def refuse(self, why: str) -> None:
        _refuse(why, self.param)

    def height(self, node: Any, level: int) -> int:
        """How many schema levels `node` holds, `$ref`s followed (a reference back into a
        definition still being walked counts as none: recursion is the grammar's business)."""
        if not isinstance(node, dict):
            return 0
        if level > MAX_DEPTH:
            self.refuse(f"its schemas nest, through $ref, more than {MAX_DEPTH} levels deep")
        self.literals(node)
        children: list[Any] = []
        for key in ONE:
            if isinstance(node.get(key), dict):
                children.append(node[key])
        for key in MANY:
            members = node.get(key)
            if isinstance(members, list):
                children.extend(members)
                if key in ("anyOf", "oneOf"):
                    self.count_alternatives(len(members))
                if key == "allOf":
                    self.intersected_patterns(members)
        for key in NAMED:
            named = node.get(key)
            if isinstance(named, dict):
                children.extend(named.values())
                if key == "properties":
                    self.count_properties(len(named))
        deepest = 0
        for child in children:  # a loop, not max(...): one Python frame a level
            deepest = max(deepest, self.height(child, level + 1))
        reference = node.get("$ref")
        if isinstance(reference, str):
            deepest = max(deepest, self.follow(reference, level))
        return 1 + deepest

    def follow(self, reference: str, level: int) -> int:
        if reference in self.heights:
            return self.heights[reference]
        if reference in self.walking:
            return 0
        target = self.resolve(reference)
        if target is None:
            return 0  # not ours to find: llguidance refuses it with its own message
        self.walking.add(reference)
        height = self.height(target, level + 1)
        self.walking.discard(reference)
        self.heights[reference] = height
        return height

    def resolve(self, reference: str) -> Any:
        """A reference within this schema (`#`, `#/$defs/name`, any JSON pointer)."""
        if not reference.startswith("#"):
            return None
        node = self.root
        for part in filter(None, reference[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def literals(self, node: dict[str, Any]) -> None:
        texts: list[Any] = [node.get("pattern"), node.get("const")]
        if isinstance(node.get("enum"), list):
            texts.extend(node["enum"])
            self.count_alternatives(len(node["enum"]))
        for key in ("properties", "patternProperties"):
            if isinstance(node.get(key), dict):
                texts.extend(node[key])
        for text in texts:
            if isinstance(text, str) and len(text) > MAX_LITERAL:
                self.refuse(
                    f"it holds a string of {len(text)} characters (a const, an enum value, a "
                    f"property name or a pattern); the most is {MAX_LITERAL}"
                )
        multiple = node.get("multipleOf")
        if isinstance(multiple, (int, float)) and not isinstance(multiple, bool) and multiple:
            self.multiple_of(multiple)

    def multiple_of(self, multiple: float) -> None:
        try:
            digits = abs(Fraction(str(multiple)).numerator)
        except (ValueError, OverflowError):
            return  # inf or nan: llguidance refuses it
        lead = digits
        while lead and lead % 10 == 0:
            lead //= 10
        if digits > MAX_MULTIPLE and lead > 100:
            self.refuse(
                f"multipleOf {multiple} is too costly to enforce (its digits {digits} are over "
                f"{MAX_MULTIPLE}, and not a number up to 100 followed by zeros)"
            )

    def intersected_patterns(self, members: list[Any]) -> None:
        patterns = sum(1 for m in members if isinstance(m, dict) and "pattern" in m)
        if patterns > MAX_INTERSECTED_PATTERNS:
            self.refuse(
                f"an allOf intersects {patterns} patterns; the most is {MAX_INTERSECTED_PATTERNS}"
            )

    def count_properties(self, count: int) -> None:
        self.properties += count
        if self.properties > MAX_PROPERTIES:
            self.refuse(f"it has over {MAX_PROPERTIES} properties")

    def count_alternatives(self, count: int) -> None:
        self.alternatives += count
        if self.alternatives > MAX_ALTERNATIVES:
            self.refuse(f"it has over {MAX_ALTERNATIVES} enum values and anyOf/oneOf branches")
