"""Tool calls in a model's text: which format a model writes them in, and parsing them as the text
streams.

Models trained for tools write a call in their family's format, and the chat template says which:

- `hermes` (Hermes, Qwen 2/2.5/3, SmolLM3 and most fine-tunes): `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`, one block per call, text around them.
- `llama3` (Llama 3.1+): the whole answer is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`; several calls separated by `;`.
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}`.

A template that renders no tools at all gets them described in a system message instead (see
`fallback_system_message`), asking for the hermes format, which any instruct model can follow.
The parser hands on text that cannot be part of a call at once, holds back what might still
become one, and gives each call whole (OpenAI's streamed deltas allow a call in one delta). Text
that looked like a call and does not parse as one is given back as text, never lost.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from backends.runtime.errors import invalid
from backends.runtime.text import template_inputs
from protos.hearth.backend.v1 import backend_pb2 as pb

FAMILIES = ("hermes", "llama3", "mistral")


def family_of_template(template: str) -> str | None:
    """The tool-call format a chat template asks for; None if it renders no tools."""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    if "tools" in template:
        return "hermes"
    return None


def fallback_system_message(tools: list[dict[str, Any]], choice: str) -> str:
    """Tools described in words, for a model whose template has no place for them."""
    described = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    must = _MUST.get(choice, _NAMED.format(choice))
    return (
        "You can call functions. Their JSON descriptions:\n"
        f"{described}\n{must} To call one, write exactly\n"
        '<tool_call>{"name": "<function name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
        "with one such block per call."
    )


def forced_call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The JSON schema of one call to `name` (or to any of the tools)."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise invalid(
            "invalid_tool_choice",
            f"tool_choice names '{name}', which is not among the tools",
            param="tool_choice",
        )
    calls = []
    definitions: dict[str, Any] = {}
    for function in chosen:
        parameters = dict(function.get("parameters") or {"type": "object"})
        # References (`#/$defs/...`, as pydantic writes nested models) resolve from the root:
        # the definitions move there.
        for key in ("$defs", "definitions"):
            if isinstance(parameters.get(key), dict):
                definitions.setdefault(key, {}).update(parameters.pop(key))
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                # Nothing but the two: a weak model would go on adding keys.
                "additionalProperties": False,
            }
        )
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, **definitions}


def choice_of(chat: pb.ChatInput) -> tuple[str, str | None]:
    """`tool_choice` as ("none" | "auto" | "required" | "named", the named function)."""
    raw = chat.tool_choice or "auto"
    if raw in ("none", "auto", "required"):
        return raw, None
    try:
        named = json.loads(raw)
        name = named["function"]["name"]
    except (ValueError, KeyError, TypeError):
        raise invalid(
            "invalid_tool_choice",
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            '"function": {"name": ...}}',
            param="tool_choice",
        ) from None
    return "named", str(name)


def _call(name: Any, arguments: Any, names: frozenset[str]) -> pb.ToolCall | None:
    """A call to one of `names` with an object of arguments (given as one, or as its JSON
    text); None if it is not that."""
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return pb.ToolCall(
        id=_call_id(),
        type="function",
        function=pb.FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)),
    )


def _from_json(text: str, names: frozenset[str]) -> list[pb.ToolCall] | None:
    """Calls in a JSON text (an object, or a list of them); None if it is not that."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not ("arguments" in item or "parameters" in item):
            return None
        call = _call(item.get("name"), item.get("arguments", item.get("parameters")), names)
        if call is None:
            return None
        calls.append(call)
    return calls or None


#: The start of a hermes call's JSON, up to its arguments object: `{"name": "...", "arguments": `.
_HERMES_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)'
)


@dataclass
class _OpenCall:
    """A call whose arguments are being streamed."""

    id: str
    name: str
    index: int
    #: Where its arguments begin, in the block's text.
    at: int
    #: Characters of its arguments sent so far.
    sent: int = 0


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _value_end(text: str) -> int | None:
    """Where the JSON object or array that begins `text` ends (just after it); None while it
    is not complete."""
    depth = 0
    for index, char, inside in _json_characters(text):
        if inside:
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


class ToolCallParser:
    """Splits a model's streamed text into text to show and tool calls."""

    def __init__(self, family: str, names: Iterable[str], *, most: int | None = None) -> None:
        if family not in FAMILIES:
            raise invalid(
                "invalid_option",
                f"tool_parser must be one of {', '.join(FAMILIES)}, not {family!r}",
            )
        self.family = family
        #: The functions the request offers: a call to anything else is text.
        self.names = frozenset(names)
        #: The most calls returned (1 with parallel_tool_calls false); None: all.
        self.most = most
        self.buffer = ""
        self.calls = 0
        #: The answer so far was all whitespace (llama3 and mistral calls begin the answer).
        self._at_start = True
        #: A hermes call being written, its arguments streamed as they come.
        self._open: _OpenCall | None = None
        #: Deltas of calls being written, since `take_deltas` last took them.
        self._deltas: list[pb.ToolCallDelta] = []

    def take_deltas(self) -> list[pb.ToolCallDelta]:
        """The deltas of calls being written made by the last `feed`s (each once)."""
        deltas, self._deltas = self._deltas, []
        return deltas

    def feed(self, piece: str) -> tuple[str, list[pb.ToolCall]]:
        """Add text; return the text safe to show now and the calls completed."""
        self.buffer += piece
        return self._limited(*self._parse(final=False))

    def finish(self) -> tuple[str, list[pb.ToolCall]]:
        """At the end of the answer: everything held back, as text or calls."""
        return self._limited(*self._parse(final=True))

    def _parse(self, *, final: bool) -> tuple[str, list[pb.ToolCall]]:
        if self.family == "hermes":
            return self._hermes(final=final)
        return self._whole_answer(final=final)

    def _limited(self, shown: str, calls: list[pb.ToolCall]) -> tuple[str, list[pb.ToolCall]]:
        if self.most is not None:
            before = self.calls - len(calls)  # `calls` were counted already
            calls = calls[: max(0, self.most - before)]
        return shown, calls

    # hermes: blocks anywhere in the text ------------------------------------------------------

    _OPEN, _CLOSE = "<tool_call>", "</tool_call>"

    def _hermes(self, *, final: bool) -> tuple[str, list[pb.ToolCall]]:
        shown = ""
        calls: list[pb.ToolCall] = []
        while True:
            start = self.buffer.find(self._OPEN)
            if start < 0:
                if final:  # all of it is text, but for whitespace after calls
                    rest, self.buffer = self.buffer, ""
                    if rest.strip() or not (self.calls or calls):
                        shown += rest
                    break
                # Held back: what may begin a block, and whitespace that may only lead to one.
                keep = _partial_suffix(self.buffer, self._OPEN)
                safe = self.buffer[: len(self.buffer) - keep].rstrip()
                shown += safe
                self.buffer = self.buffer[len(safe) :]
                break
            before = self.buffer[:start]
            if before.strip() or not (self.calls or calls):  # not the space between calls
                shown += before
            end, found = self._block(start)
            if end < 0:
                if final:  # an unclosed block: a call if it parses, else text
                    found = _from_json(self.buffer[start + len(self._OPEN) :].strip(), self.names)
                    found = self._streamed(found, start, len(self.buffer))
                    if found:
                        calls.extend(found)
                    else:
                        shown += self.buffer[start:]
                    self.buffer = ""
                else:
                    self.buffer = self.buffer[start:]
                    self._stream(0, self.calls + len(calls))
                break
            found = self._streamed(found, start, end)
            if found:
                calls.extend(found)
            else:
                shown += self.buffer[start : end + len(self._CLOSE)]
            self.buffer = self.buffer[end + len(self._CLOSE) :]
        self.calls += len(calls)
        if calls and not shown.strip():
            shown = ""
        return shown, calls

    def _stream(self, start: int, index: int) -> None:
        """The open block at `start`: once it names one of the offered functions and its
        arguments begin, a delta with the call's id and name, then its arguments' text as it
        comes (up to where their JSON value ends)."""
        inside = self.buffer[start + len(self._OPEN) :]
        if self._open is None:
            if self.most is not None and index >= self.most:
                return
            head = _HERMES_HEAD.match(inside)
            if head is None:
                return
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return
            if name not in self.names:
                return
            self._open = _OpenCall(_call_id(), name, index, head.end())
            self._deltas.append(pb.ToolCallDelta(index=index, id=self._open.id, name=name))
        ready, _ = self._arguments(inside[self._open.at :])
        if len(ready) > self._open.sent:
            fragment = ready[self._open.sent :]
            self._open.sent = len(ready)
            self._deltas.append(pb.ToolCallDelta(index=self._open.index, arguments=fragment))

    def _arguments(self, text: str) -> tuple[str, bool]:
        """The arguments' text at the start of `text` (what follows `"arguments": `), and
        whether it is complete: up to where their JSON value ends, or where the block closes
        without it ending (a model that broke off), holding back what may begin the closing
        tag."""
        end = _value_end(text)
        if end is not None:
            return text[:end], True
        close = text.find(self._CLOSE)
        if close >= 0:
            return text[:close], True
        return text[: len(text) - _partial_suffix(text, self._CLOSE)], False

    def _streamed(
        self, found: list[pb.ToolCall] | None, start: int, end: int
    ) -> list[pb.ToolCall] | None:
        """The calls of the block between `start` and `end`, made to agree with what was
        streamed of it: the same id, its arguments as their streamed text; a block whose
        arguments were streamed is a call even if its JSON ends broken (its deltas were)."""
        opened, self._open = self._open, None
        if opened is None:
            return found
        inside = self.buffer[start + len(self._OPEN) : end]
        text, _ = self._arguments(inside[opened.at :])
        text = text.rstrip()
        if len(text) > opened.sent:  # the rest, not yet streamed
            rest = text[opened.sent :]
            self._deltas.append(pb.ToolCallDelta(index=opened.index, arguments=rest))
        call = pb.ToolCall(
            id=opened.id,
            type="function",
            function=pb.FunctionCall(name=opened.name, arguments=text),
        )
        return [call]

    def _block(self, start: int) -> tuple[int, list[pb.ToolCall] | None]:
        """Where the block opened at `start` closes (-1: not yet), and its calls. A closing
        tag inside the JSON's strings or brackets does not close it."""
        end = self.buffer.find(self._CLOSE, start)
        while end >= 0:
            inside = self.buffer[start + len(self._OPEN) : end].strip()
            if _balanced(inside):
                return end, _from_json(inside, self.names)
            end = self.buffer.find(self._CLOSE, end + 1)
        return -1, None

    # llama3, mistral: the answer is the call ----------------------------------------------------

    def _whole_answer(self, *, final: bool) -> tuple[str, list[pb.ToolCall]]:
        if self._at_start:
            stripped = self.buffer.lstrip()
            if not stripped and not final:
                return "", []
            if not self._may_be_call(stripped):
                self._at_start = False
                shown, self.buffer = self.buffer, ""
                return shown, []
        else:
            shown, self.buffer = self.buffer, ""
            return shown, []
        if not final:
            return "", []  # a call is read whole, at the end
        calls = self._parse_answer(self.buffer.strip())
        if calls is None:
            shown, self.buffer = self.buffer, ""
            return shown, []
        self.buffer = ""
        self.calls += len(calls)
        return "", calls

    def _may_be_call(self, text: str) -> bool:
        marks = {"llama3": ("{", "<|python_tag|>"), "mistral": ("[TOOL_CALLS]", "[")}
        return any(text.startswith(m) or m.startswith(text) for m in marks.get(self.family, ("{",)))

    def _parse_answer(self, text: str) -> list[pb.ToolCall] | None:
        if self.family == "llama3":
            text = text.removeprefix("<|python_tag|>").strip()
            calls: list[pb.ToolCall] = []
            for part in _split_top_level(text, ";"):
                found = _from_json(part, self.names)
                if found is None:
                    return None
                calls.extend(found)
            return calls or None
        text = text.removeprefix("[TOOL_CALLS]").strip()
        if text.startswith("["):
            return _from_json(text, self.names)
        # The newer form: name[ARGS]{...}, repeated, and nothing else.
        calls = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(text):
            match = _MISTRAL_CALL.match(text, position)
            if match is None:
                return None
            try:
                arguments, position = decoder.raw_decode(text, match.end())
            except ValueError:
                return None
            call = _call(match.group(1), arguments, self.names)
            if call is None:
                return None
            calls.append(call)
            position = len(text) - len(text[position:].lstrip().removeprefix("[TOOL_CALLS]"))
        return calls or None


_MISTRAL_CALL = re.compile(r"\s*([\w.-]+)\[ARGS\]\s*")


def _partial_suffix(text: str, mark: str) -> int:
    """Length of the longest end of `text` that begins `mark`."""
    for size in range(min(len(mark) - 1, len(text)), 0, -1):
        if text.endswith(mark[:size]):
            return size
    return 0


def _balanced(text: str) -> bool:
    """`text` ends outside any JSON string, object or array it opened."""
    depth, opened = 0, False
    for _, char, inside in _json_characters(text):
        if char == '"' and not inside:
            opened = not opened  # an opening quote, then its closing one
        elif not inside:
            depth += (char in "{[") - (char in "}]")
    return depth <= 0 and not opened


def _json_characters(text: str) -> Iterator[tuple[int, str, bool]]:
    """Each character of `text` with whether it lies inside a JSON string (the quotes that
    open and close one do not)."""
    quoted = escaped = False
    for index, char in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
                yield index, char, False
                continue
            yield index, char, True
            continue
        quoted = char == '"'
        yield index, char, False


def _split_top_level(text: str, separator: str) -> Iterator[str]:
    """`text` split at `separator` outside JSON strings and brackets."""
    depth, start = 0, 0
    for index, char, inside in _json_characters(text):
        if inside:
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == separator and depth == 0:
            yield text[start:index].strip()
            start = index + 1
    if text[start:].strip():
        yield text[start:].strip()


def with_tool_calls(
    stream: Iterator[pb.GenerateStreamResponse], parser: ToolCallParser
) -> Iterator[pb.GenerateStreamResponse]:
    """A backend's stream with the tool calls in its text parsed out. Token log-probabilities
    go out with the next message (the text of a call is not shown, its tokens' are still
    reported)."""
    logprobs: list[pb.TokenLogprob] = []
    for item in stream:
        final = item.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        shown, calls = parser.feed(item.text)
        if final:
            rest, more = parser.finish()
            shown, calls = shown + rest, calls + more
        logprobs.extend(item.logprobs)
        out = pb.GenerateStreamResponse(
            text=shown,
            tool_calls=[*item.tool_calls, *calls],
            tool_call_deltas=[*item.tool_call_deltas, *parser.take_deltas()],
        )
        if final:
            out.usage.CopyFrom(item.usage)
            stopped = item.finish_reason == pb.FINISH_REASON_STOP
            out.finish_reason = (
                pb.FINISH_REASON_TOOL_CALLS if parser.calls and stopped else item.finish_reason
            )
        if out.text or out.tool_calls or out.tool_call_deltas or final:
            out.logprobs.extend(logprobs)
            logprobs.clear()
            yield out


@dataclass
class ToolPlan:
    """How one chat request's tools reach the model and come back."""

    #: The messages and tools to render with the chat template.
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    #: Parses the answer's calls (None: the request has no tools, or tool_choice is none).
    parser: ToolCallParser | None = None
    #: The JSON schema of the call the answer must be (tool_choice required or named): a
    #: backend that constrains output writes it in `parser.family`'s format.
    forced: dict[str, Any] | None = None


def plan_tools(chat: pb.ChatInput, family: str | None, *, constrained: bool) -> ToolPlan:
    """The plan for a chat, on a model whose template writes calls in `family` (None: its
    template renders no tools, so they are described in a system message, hermes-style).
    `constrained`: the backend forces a required or named call with a grammar; else it is
    asked for in words."""
    messages, tools = template_inputs(chat)
    choice, name = choice_of(chat)
    if not tools or choice == "none":
        return ToolPlan(messages, None)
    forced = forced_call_schema(tools, name) if choice in ("required", "named") else None
    if name is not None and forced is not None:
        tools = [t for t in tools if t["function"]["name"] == name]
    names = [t["function"]["name"] for t in tools]
    most = 1 if chat.HasField("parallel_tool_calls") and not chat.parallel_tool_calls else None
    if family is None:
        family, messages = "hermes", _described(messages, tools, name or choice)
        tools = None
    elif forced is not None and not constrained:
        messages = _with_system(messages, _MUST.get(choice, _NAMED.format(name)))
    return ToolPlan(messages, tools, ToolCallParser(family, names, most=most), forced)


_MUST = {
    "required": "You must call one or more of the functions.",
    "auto": "Call a function when it helps to answer; otherwise answer normally.",
}
_NAMED = "You must call the function {}."


def _with_system(messages: list[dict[str, Any]], words: str) -> list[dict[str, Any]]:
    """`words` added to the system message (a new one first where there is none)."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{words}"}, *messages[1:]]
    return [{"role": "system", "content": words}, *messages]


def _described(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], choice: str
) -> list[dict[str, Any]]:
    """Messages for a template without tools: the tools in the system message, earlier calls
    and their results written out as text."""
    words = fallback_system_message(tools, choice)
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            blocks = [
                "<tool_call>"
                + json.dumps(
                    {
                        "name": c.get("function", {}).get("name"),
                        "arguments": c.get("function", {}).get("arguments"),
                    },
                    ensure_ascii=False,
                )
                + "</tool_call>"
                for c in message["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join([content, *blocks]).strip()})
        elif role == "tool":
            response = f"<tool_response>{content}</tool_response>"
            if out and out[-1].get("tool_results"):  # results in a row: one turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for message in out:
        message.pop("tool_results", None)
    return _with_system(out, words)


def generate_with_tools(
    request: pb.GenerateRequest,
    family: str | None,
    generate: Callable[[ToolPlan | None], Iterator[pb.GenerateStreamResponse]],
    *,
    constrained: bool,
    infill: bool = False,
) -> Iterator[pb.GenerateStreamResponse]:
    """A text backend's stream for `request`: `generate(plan)` (None for a raw prompt), with
    the calls parsed out of its text where the request offers tools. `infill`: the backend
    can fill in the middle (a `suffix`); else a suffix is the client's 400."""
    if request.suffix and not infill:
        raise invalid(
            "infill_unsupported",
            "this backend cannot fill in the middle (suffix); use a llama (GGUF) code model",
            param="suffix",
        )
    plan = None
    if request.WhichOneof("input") == "chat":
        plan = plan_tools(request.chat, family, constrained=constrained)
    stream = generate(plan)
    if plan is not None and plan.parser is not None:
        return with_tool_calls(stream, plan.parser)
    return stream
