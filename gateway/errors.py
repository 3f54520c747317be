"""Every failure ends here, as OpenAI's `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import grpc
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Send

from gateway import identity
from protos.hearth.backend.v1.contract import PARAM_KEY, REASON_KEY

log = logging.getLogger("hearth.gateway")

# gRPC status from a backend → (HTTP status, OpenAI error type).
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.CANCELLED: (503, "server_error"),
    grpc.StatusCode.UNKNOWN: (500, "server_error"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "server_error"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (400, "invalid_request_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DATA_LOSS: (500, "server_error"),
    # The backend refused the gateway (its token), not the client: a bad gateway.
    grpc.StatusCode.UNAUTHENTICATED: (502, "server_error"),
}

#: Key of a route's `opt` naming the setting that bounds its body (HEARTH_MAX_BODY_BYTES if none).
BODY_LIMIT_SETTING = "body_limit_setting"

# The OpenAI error type for an HTTP status the gateway itself answers with.
_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


class OpenAIError(Exception):
    """A failure a client sees: HTTP status plus OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
        retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        #: Seconds after which trying again makes sense (the Retry-After header).
        self.retry_after = retry_after
        #: Whether a client should send the same request again (`x-should-retry`, which
        #: OpenAI's SDKs obey); None leaves it to them (they retry 408, 409, 429 and 5xx).
        self.retry = retry

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BackendGone(OpenAIError):
    """The backend's process (or connection) was not there to answer.

    `reached`: whether the request got to the backend before it went. One that did not (the
    connection was refused, the channel already closed) can be sent to the backend's
    replacement; one that did may be what killed it, and is not sent again.
    """

    def __init__(self, model: str, detail: str, *, reached: bool) -> None:
        super().__init__(
            503,
            f"the backend for model '{model}' is unavailable: {detail}",
            code="backend_unavailable",
        )
        self.reached = reached


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{name}' does not exist. GET /v1/models lists the models this server has.",
        param="model",
        code="model_not_found",
    )


def from_grpc(error: grpc.aio.AioRpcError, model: str) -> OpenAIError:
    """A backend's failed call, in OpenAI's shape; the reason becomes the `code`."""
    status, kind = GRPC_TO_HTTP.get(error.code(), (500, "server_error"))
    trailing = dict(error.trailing_metadata() or ())
    reason = trailing.get(REASON_KEY)
    param = trailing.get(PARAM_KEY)
    message = error.details() or error.code().name.lower()
    if error.code() == grpc.StatusCode.UNAVAILABLE and reason is None:
        # gRPC says "failed to connect" when the call never left: nothing reached the backend.
        return BackendGone(model, message, reached=not message.startswith("failed to connect"))
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        # The backend refused the gateway, not the client: a 401 would send the client looking
        # at its own key, and sending the request again changes nothing.
        return OpenAIError(
            502,
            f"the remote backend for model '{model}' refused the gateway's token ({message}); "
            "check its token_file or token_env in backends.yaml",
            code="backend_unauthenticated",
            retry=False,
        )
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason is None:
        message = f"the backend for model '{model}' did not answer in time ({message})"
        reason = "timeout"
    return OpenAIError(
        status,
        message,
        param=str(param) if param else None,
        code=str(reason) if reason else None,
        type=kind,
    )


def error_response(error: OpenAIError) -> Response[dict[str, Any]]:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.retry is not None:
        headers["x-should-retry"] = "true" if error.retry else "false"
    return Response(content=error.body(), status_code=error.status, headers=headers)


async def send_error(send: Send, error: OpenAIError, *, close: bool = False) -> None:
    """`error` as a whole answer, straight on an ASGI `send` (for middleware, where no
    framework response exists); `close`: ask the client to close the connection after it."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": error.status,
        "headers": headers,
    }
    await send(start)
    whole: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(whole)


def handle_openai_error(
    request: Request[Any, Any, Any], exc: OpenAIError
) -> Response[dict[str, Any]]:
    manager = getattr(request.app.state, "manager", None)
    if manager is not None:
        exc = for_caller(exc, manager.settings.models_dir, manager.runtime_dir)
    return error_response(exc)


#: What separates an error's message from the backend's last output lines.
OUTPUT_HEADING = "\nlast backend output:\n"
_ABSOLUTE_PATH = re.compile(r"(?<![\w/.:>])/(?:[\w.@+-]+/)*[\w.@+-]+")


def for_caller(error: OpenAIError, models_dir: Path, runtime_dir: Path) -> OpenAIError:
    """`error` as the request's caller may see it: whole for an admin (or the local user of a
    server without keys); for anyone else without the backend's output lines, with the server's
    own folders named, not shown, and, in a server error, no other absolute path either."""
    if identity.caller.get().admin:
        return error
    message = error.message.split(OUTPUT_HEADING, 1)[0]
    for path, placeholder in private_paths(models_dir, runtime_dir).items():
        # Only where the path stands whole: a models dir at /models is not the end of the
        # route /v1/models, nor the start of /models2.
        # Before it: not a longer path's word or name (a URL's "unix:///run/..." still counts);
        # after it: not more of a name (a sentence's closing period still counts).
        whole = rf"(?<![\w.~-])(?<!\w/){re.escape(path)}(?![\w~-]|\.\w)"
        message = re.sub(whole, placeholder.replace("\\", "\\\\"), message)
    if error.status >= 500:
        message = _ABSOLUTE_PATH.sub("<path>", message)
    if message == error.message:
        return error
    return OpenAIError(
        error.status,
        message,
        param=error.param,
        code=error.code,
        type=error.type,
        retry_after=error.retry_after,
        retry=error.retry,
    )


def private_paths(models_dir: Path, runtime_dir: Path) -> dict[str, str]:
    """The server's own folders, longest first, and what messages call them instead."""
    paths = {
        str(models_dir.resolve()): "<models dir>",
        str(models_dir.absolute()): "<models dir>",
        str(runtime_dir): "<runtime dir>",
        str(Path(__file__).resolve().parent.parent): "<hearth>",
        sys.prefix: "<python>",
        str(Path.home()): "<home>",
    }
    ordered = sorted(paths.items(), key=lambda item: -len(item[0]))
    return {path: name for path, name in ordered if len(path) > 1}


def handle_http_exception(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[dict[str, Any]]:
    """Litestar's own errors (unknown route, wrong method, bad body) in OpenAI's shape."""
    message = exc.detail or "request failed"
    code = None
    if exc.status_code == 404:
        message = "Not found: this server has no such route."
    elif exc.status_code == 413:
        handler = request.scope.get("route_handler")
        setting = getattr(handler, "opt", {}).get(BODY_LIMIT_SETTING, "HEARTH_MAX_BODY_BYTES")
        message = f"The request is larger than this server accepts ({setting})."
        code = "request_too_large"
    response = error_response(OpenAIError(exc.status_code, message, code=code))
    if exc.headers:
        response.headers.update(exc.headers)
    # A path no route matched never passes RequestLifetime, which gives the others theirs.
    name, value = identity.request_id_header(request.scope)
    response.headers[name.decode()] = value.decode()
    return response


def handle_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """A bug of ours: log the traceback, tell the client as little as helps."""
    log.error("unhandled error", exc_info=exc)
    return error_response(OpenAIError(500, "internal server error", code="internal_error"))


EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    OpenAIError: handle_openai_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
