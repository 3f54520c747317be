"""Responses API requests to chat requests, and backend answers to Response objects and events.

A Responses request becomes the ChatCompletionRequest it means (instructions first, as a system
message; items as messages, calls and their results), so the backend gets the very
GenerateRequest /v1/chat/completions would build. The server is stateless: whatever would need a
response or conversation kept between requests is refused by name.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from gateway.config import ModelConfig
from gateway.errors import OpenAIError, invalid_request
from gateway.schemas.chat import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    JSONSchema,
    ResponseFormat,
    Tool,
    ToolCall,
)
from gateway.schemas.responses import (
    EchoedTool,
    EchoedToolChoice,
    FunctionCallItem,
    IncompleteDetails,
    InputContent,
    InputItem,
    InputTokensDetails,
    ItemStatus,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseCreateRequest,
    ResponseError,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    TextConfig,
    TextFormat,
)
from gateway.translate.text import token_logprobs
from protos.hearth.backend.v1 import backend_pb2 as pb

#: `include` values OpenAI knows. Each names output this server never makes (hosted tools'
#: results, images, reasoning), so asking for it changes nothing, except logprobs (refused).
INCLUDABLE = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
)
_TEXT_PARTS = ("input_text", "output_text")
#: Chat's names for a field, in errors the backend raises, → the Responses API's.
_PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
}


def new_item_id(prefix: str) -> str:
    """An id as OpenAI spells the Responses API's: `resp_…`, `msg_…`, `fc_…`."""
    return f"{prefix}_{secrets.token_hex(24)}"


def _unsupported(message: str, param: str) -> OpenAIError:
    return invalid_request(message, param=param, code="unsupported_parameter")


def chat_request(body: ResponseCreateRequest) -> ChatCompletionRequest:
    """The chat completion request a Responses request means; a 400 naming the field for
    anything this server cannot do."""
    _refuse_stateful(body)
    _check_include(body.include)
    messages = []
    if body.instructions is not None:
        messages.append(ChatMessage(role="system", content=body.instructions))
    messages += _messages(body.input)
    return ChatCompletionRequest(
        model=body.model,
        messages=messages,
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body.text),
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        seed=body.seed,
        keep_alive=body.keep_alive,
        logprobs=LOGPROBS in (body.include or ()) or None,
        top_logprobs=body.top_logprobs if LOGPROBS in (body.include or ()) else None,
    )


def _refuse_stateful(body: ResponseCreateRequest) -> None:
    stateless = (
        "this server is stateless and keeps no responses or conversations: send the whole "
        "conversation in `input` each time (the earlier output items, then the new ones)"
    )
    if body.previous_response_id is not None:
        raise _unsupported(
            f"previous_response_id is not supported: {stateless}", "previous_response_id"
        )
    if body.conversation is not None:
        raise _unsupported(f"conversation is not supported: {stateless}", "conversation")
    if body.background:
        raise _unsupported(
            "background responses are not supported: this server keeps no responses to poll; "
            "use stream: true to see the answer as it is made",
            "background",
        )
    if body.prompt is not None:
        raise _unsupported(
            "prompt (a stored prompt template) is not supported: this server keeps no prompts; "
            "send instructions and input instead",
            "prompt",
        )


def _check_include(include: list[str] | None) -> None:
    for value in include or []:
        if value not in INCLUDABLE:
            raise invalid_request(
                f"Invalid value: '{value}'. Supported values are: "
                + ", ".join(f"'{v}'" for v in INCLUDABLE)
                + ".",
                param="include",
            )


def _messages(given: str | list[InputItem]) -> list[ChatMessage]:
    if isinstance(given, str):
        return [ChatMessage(role="user", content=given)]
    if not given:
        raise invalid_request("input must not be empty", param="input")
    messages: list[ChatMessage] = []
    calls: set[str] = set()
    for index, item in enumerate(given):
        where = f"input[{index}]"
        kind = item.type or ("message" if item.role is not None else None)
        if kind == "message":
            if item.role is None:
                raise invalid_request(f"{where}: a message needs a role", param=f"{where}.role")
            content = _text(item.content, f"{where}.content")
            messages.append(ChatMessage(role=item.role, content=content))
        elif kind == "function_call":
            call_id = _required(item.call_id, f"{where}.call_id")
            call = ToolCall(
                id=call_id,
                function=FunctionCall(
                    name=_required(item.name, f"{where}.name"),
                    arguments=_required(item.arguments, f"{where}.arguments"),
                ),
            )
            calls.add(call_id)
            last = messages[-1] if messages else None
            # The calls of one turn, and any text before them, are one assistant message.
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif kind == "function_call_output":
            call_id = _required(item.call_id, f"{where}.call_id")
            if call_id not in calls:
                raise invalid_request(
                    f"No tool call found for function call output with call_id {call_id}: "
                    "send the function_call item before its output",
                    param=f"{where}.call_id",
                )
            output = _text(item.output, f"{where}.output")
            messages.append(ChatMessage(role="tool", tool_call_id=call_id, content=output))
        elif kind == "reasoning":
            # A reasoning model's item sent back with its answer. This server makes none, and
            # no model here can read another's (encrypted) reasoning: it is passed over.
            continue
        elif kind == "item_reference":
            raise _unsupported(
                f"{where}: item_reference is not supported: this server is stateless and keeps "
                "no items; send the item itself",
                where,
            )
        else:
            raise invalid_request(
                f"{where}: input items of type '{kind}' are not supported; send messages, "
                "function_call and function_call_output items",
                param=f"{where}.type",
                code="unsupported_value",
            )
    return messages


def _required(value: str | None, param: str) -> str:
    if value is None:
        raise invalid_request(f"Missing required parameter: '{param}'.", param=param)
    return value


def _text(content: str | list[InputContent] | None, param: str) -> str:
    """A message's content (or a call's output) as text: a string, or text parts joined."""
    if content is None:
        raise invalid_request(f"Missing required parameter: '{param}'.", param=param)
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if part.type not in _TEXT_PARTS or part.text is None:
            raise invalid_request(
                f"{param}[{index}]: content of type '{part.type}' is not supported; this "
                "server reads text (input_text)",
                param=f"{param}[{index}].type",
                code="unsupported_value",
            )
        texts.append(part.text)
    return "".join(texts)


def _tools(body: ResponseCreateRequest) -> list[Tool] | None:
    if body.tools is None:
        return None
    others = [(i, t.type) for i, t in enumerate(body.tools) if t.type != "function"]
    if others:
        named = ", ".join(f"'{kind}'" for _, kind in others)
        raise invalid_request(
            f"tools of type {named} are not supported: this server runs no hosted tools; "
            "give function tools (type: function), which your code runs",
            param=f"tools[{others[0][0]}].type",
            code="unsupported_value",
        )
    tools = []
    for index, tool in enumerate(body.tools):
        name = _required(tool.name, f"tools[{index}].name")
        function = FunctionDefinition(
            name=name,
            description=tool.description,
            parameters=tool.parameters,
            strict=tool.strict,
        )
        tools.append(Tool(function=function))
    return tools


def _tool_choice(body: ResponseCreateRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function":
        raise invalid_request(
            f"tool_choice of type '{choice.type}' is not supported; send 'none', 'auto', "
            "'required' or {type: function, name}",
            param="tool_choice.type",
            code="unsupported_value",
        )
    name = _required(choice.name, "tool_choice.name")
    return {"type": "function", "function": {"name": name}}


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    given = text.format if text is not None else None
    if given is None or given.type == "text":
        return None
    if given.type == "json_object":
        return ResponseFormat(type="json_object")
    name = _required(given.name, "text.format.name")
    if given.schema is None:
        raise invalid_request(
            "Missing required parameter: 'text.format.schema'.", "text.format.schema"
        )
    schema = JSONSchema(
        name=name, schema=given.schema, description=given.description, strict=given.strict
    )
    return ResponseFormat(type="json_schema", json_schema=schema)


def for_responses(error: OpenAIError) -> OpenAIError:
    """`error` with the field it names spelled as the Responses API spells it (a backend
    names chat's `messages`, `response_format`, `max_tokens`)."""
    if error.param is None:
        return error
    root = re.split(r"[.\[]", error.param, maxsplit=1)[0]
    if root not in _PARAMS:
        return error
    return OpenAIError(
        error.status,
        error.message,
        param=_PARAMS[root],
        code=error.code,
        type=error.type,
        retry_after=error.retry_after,
        retry=error.retry,
    )


# The Response object ----------------------------------------------------------------------------


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def skeleton(
    body: ResponseCreateRequest, config: ModelConfig, *, id: str, created: int
) -> Response:
    """The response before any output: in progress, with the request's settings echoed (the
    model YAML's defaults where the request gave none)."""
    given = body.text or TextConfig()
    tools = [
        EchoedTool(
            name=t.name or "", description=t.description, parameters=t.parameters, strict=t.strict
        )
        for t in body.tools or []
    ]
    choice = body.tool_choice
    return Response(
        id=id,
        created_at=created,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=body.model,
        output=[],
        parallel_tool_calls=_first(body.parallel_tool_calls, True),
        temperature=_first(body.temperature, config.parameters.temperature),
        text=TextConfig(
            format=given.format or TextFormat(type="text"), verbosity=given.verbosity or "medium"
        ),
        tool_choice=(
            EchoedToolChoice(name=choice.name or "")
            if choice is not None and not isinstance(choice, str)
            else choice or "auto"
        ),
        tools=tools,
        top_p=_first(body.top_p, config.parameters.top_p),
        # Nothing is dropped to fit the context: a conversation too long is a 400.
        truncation="disabled",
        user=body.user,
        metadata=body.metadata or {},
    )


def usage(value: pb.Usage) -> ResponseUsage:
    """A backend's token counts as the Responses API spells them (no reasoning tokens)."""
    return ResponseUsage(
        input_tokens=value.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=value.cached_prompt_tokens),
        output_tokens=value.completion_tokens,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=value.prompt_tokens + value.completion_tokens,
    )


#: The `include` value that asks for token log-probabilities.
LOGPROBS = "message.output_text.logprobs"


def logprobs(items: Iterable[pb.TokenLogprob]) -> list[Any]:
    """Token log-probabilities as output_text's `logprobs` (chat's shape)."""
    return list(token_logprobs(items))


def _message(
    id: str, text: str, status: ItemStatus, scored: list[Any] | None = None
) -> OutputMessage:
    return OutputMessage(
        id=id, status=status, content=[OutputText(text=text, logprobs=scored or [])]
    )


def _function_call(
    id: str, call: pb.ToolCall, arguments: str, status: ItemStatus
) -> FunctionCallItem:
    return FunctionCallItem(
        id=id, call_id=call.id, name=call.function.name, arguments=arguments, status=status
    )


def _finished(
    skeleton: Response, output: list[OutputItem], total: pb.Usage, finish: int
) -> Response:
    if finish == pb.FINISH_REASON_LENGTH:
        return msgspec.structs.replace(
            skeleton,
            status="incomplete",
            incomplete_details=IncompleteDetails(reason="max_output_tokens"),
            output=output,
            usage=usage(total),
        )
    return msgspec.structs.replace(
        skeleton,
        status="completed",
        completed_at=int(time.time()),
        output=output,
        usage=usage(total),
    )


def response(answer: pb.GenerateResponse, skeleton: Response) -> Response:
    """A whole answer as the Response: a message with its text (left out when the answer is
    only calls), then one function_call item per call."""
    incomplete = answer.finish_reason == pb.FINISH_REASON_LENGTH
    status: ItemStatus = "incomplete" if incomplete else "completed"
    output: list[OutputItem] = []
    if answer.text or not answer.tool_calls:
        output.append(_message(new_item_id("msg"), answer.text, status, logprobs(answer.logprobs)))
    for call in answer.tool_calls:
        output.append(_function_call(new_item_id("fc"), call, call.function.arguments, "completed"))
    return _finished(skeleton, output, answer.usage, answer.finish_reason)


def _failed_code(error: OpenAIError) -> str:
    """An error as one of the codes OpenAI gives a failed response."""
    if error.status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if error.status < 500 else "server_error"


class ResponseEvents:
    """Builds the events of one streamed response (a ChunkBuilder for routes.common's
    stream_text): each output item is added, filled and done in turn, and the last event
    carries the whole response."""

    def __init__(self, skeleton: Response) -> None:
        self.skeleton = skeleton
        #: Items done so far; an open message is the next.
        self.output: list[OutputItem] = []
        self.message_id: str | None = None
        self.text = ""
        #: The open message's token log-probabilities (where asked for).
        self.scored: list[Any] = []
        self.finish = pb.FINISH_REASON_UNSPECIFIED
        self.sequence = 0
        #: Calls being written (their arguments streamed), by the backend's call index: their
        #: item's id, output index and call.
        self.writing: dict[int, tuple[str, int, pb.ToolCall]] = {}

    def _numbered(self, events: list[ResponseStreamEvent]) -> list[ResponseStreamEvent]:
        for event in events:
            event.sequence_number = self.sequence
            self.sequence += 1
        return events

    def opening(self, n: int) -> list[ResponseStreamEvent]:
        started = msgspec.structs.replace(self.skeleton, output=[])
        return self._numbered(
            [ResponseCreatedEvent(response=started), ResponseInProgressEvent(response=started)]
        )

    def piece(self, item: pb.GenerateStreamResponse, index: int = 0) -> list[ResponseStreamEvent]:
        events: list[ResponseStreamEvent] = []
        scored = logprobs(item.logprobs)
        if item.text or (scored and self.message_id is not None):
            if self.message_id is None:
                events += self._open_message()
            assert self.message_id is not None
            self.text += item.text
            self.scored += scored
            events.append(
                ResponseTextDeltaEvent(
                    item_id=self.message_id,
                    output_index=len(self.output),
                    content_index=0,
                    delta=item.text,
                    logprobs=scored,
                )
            )
        for delta in item.tool_call_deltas:
            events += self._call_delta(delta)
        if item.tool_calls:
            events += self._close_message("completed")
            for call in item.tool_calls:
                events += self._call(call)
        if item.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish = item.finish_reason
            incomplete = item.finish_reason == pb.FINISH_REASON_LENGTH
            if self.message_id is None and not self.output:
                events += self._open_message()  # no output at all: one empty message
            events += self._close_message("incomplete" if incomplete else "completed")
        return self._numbered(events)

    def closing(self, total: pb.Usage) -> list[ResponseStreamEvent]:
        final = _finished(self.skeleton, list(self.output), total, self.finish)
        if final.status == "incomplete":
            return self._numbered([ResponseIncompleteEvent(response=final)])
        return self._numbered([ResponseCompletedEvent(response=final)])

    def failure(self, error: OpenAIError) -> list[ResponseStreamEvent]:
        """A failure after the stream began: an `error` event, then the response as failed,
        with the output made so far."""
        error = for_responses(error)
        output = list(self.output)
        if self.message_id is not None:
            output.append(_message(self.message_id, self.text, "incomplete", self.scored))
        failed = msgspec.structs.replace(
            self.skeleton,
            status="failed",
            error=ResponseError(code=_failed_code(error), message=error.message),
            output=output,
        )
        return self._numbered(
            [
                ResponseErrorEvent(code=error.code, message=error.message, param=error.param),
                ResponseFailedEvent(response=failed),
            ]
        )

    def _open_message(self) -> list[ResponseStreamEvent]:
        self.message_id, self.text, self.scored = new_item_id("msg"), "", []
        at = len(self.output)
        return [
            ResponseOutputItemAddedEvent(
                output_index=at,
                item=OutputMessage(id=self.message_id, status="in_progress", content=[]),
            ),
            ResponseContentPartAddedEvent(
                item_id=self.message_id, output_index=at, content_index=0, part=OutputText(text="")
            ),
        ]

    def _close_message(self, status: ItemStatus) -> list[ResponseStreamEvent]:
        if self.message_id is None:
            return []
        id_, text, at, scored = self.message_id, self.text, len(self.output), self.scored
        message = _message(id_, text, status, scored)
        self.output.append(message)
        self.message_id, self.text, self.scored = None, "", []
        return [
            ResponseTextDoneEvent(
                item_id=id_, output_index=at, content_index=0, text=text, logprobs=scored
            ),
            ResponseContentPartDoneEvent(
                item_id=id_,
                output_index=at,
                content_index=0,
                part=OutputText(text=text, logprobs=scored),
            ),
            ResponseOutputItemDoneEvent(output_index=at, item=message),
        ]

    def _call_delta(self, delta: pb.ToolCallDelta) -> list[ResponseStreamEvent]:
        """A call being written: its item added when it begins, then its arguments' deltas."""
        events: list[ResponseStreamEvent] = []
        if delta.id:
            events += self._close_message("completed")
            call = pb.ToolCall(id=delta.id, function=pb.FunctionCall(name=delta.name))
            id_, at = new_item_id("fc"), len(self.output)
            self.writing[delta.index] = (id_, at, call)
            events.append(
                ResponseOutputItemAddedEvent(
                    output_index=at, item=_function_call(id_, call, "", "in_progress")
                )
            )
        writing = self.writing.get(delta.index)
        if writing is not None and delta.arguments:
            id_, at, _ = writing
            events.append(
                ResponseFunctionCallArgumentsDeltaEvent(
                    item_id=id_, output_index=at, delta=delta.arguments
                )
            )
        return events

    def _call(self, call: pb.ToolCall) -> list[ResponseStreamEvent]:
        arguments = call.function.arguments
        streamed = next((i for i, w in self.writing.items() if w[2].id == call.id), None)
        events: list[ResponseStreamEvent] = []
        if streamed is not None:  # its item and arguments were sent as it was written
            id_, at, _ = self.writing.pop(streamed)
        else:
            id_, at = new_item_id("fc"), len(self.output)
            events += [
                ResponseOutputItemAddedEvent(
                    output_index=at, item=_function_call(id_, call, "", "in_progress")
                ),
                ResponseFunctionCallArgumentsDeltaEvent(
                    item_id=id_, output_index=at, delta=arguments
                ),
            ]
        done = _function_call(id_, call, arguments, "completed")
        self.output.append(done)
        return [
            *events,
            ResponseFunctionCallArgumentsDoneEvent(
                item_id=id_, output_index=at, name=call.function.name, arguments=arguments
            ),
            ResponseOutputItemDoneEvent(output_index=at, item=done),
        ]
