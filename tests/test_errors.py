"""Every gRPC status a backend can fail with becomes the right HTTP status and OpenAI error."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from gateway.errors import OpenAIError, from_grpc

EXPECTED = {
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
    grpc.StatusCode.UNAUTHENTICATED: (502, "server_error"),
}


def rpc_error(code: grpc.StatusCode, details: str, **trailing: str) -> AioRpcError:
    metadata = Metadata(*((f"hearth-error-{k}", v) for k, v in trailing.items()))
    return AioRpcError(code, Metadata(), metadata, details=details)


def test_every_failure_status_is_covered() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_status_and_type(code: grpc.StatusCode) -> None:
    error = from_grpc(rpc_error(code, "it broke"), "m")
    assert (error.status, error.type) == EXPECTED[code]
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "it broke" in body["message"]


def test_reason_and_param_from_trailing_metadata() -> None:
    error = from_grpc(
        rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt too long",
            reason="context_length_exceeded",
            param="messages",
        ),
        "m",
    )
    assert error.body() == {
        "error": {
            "message": "prompt too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


def test_an_unreachable_backend_names_the_model() -> None:
    error = from_grpc(rpc_error(grpc.StatusCode.UNAVAILABLE, "socket closed"), "gemma")
    assert error.status == 503
    assert error.code == "backend_unavailable"
    assert "'gemma'" in error.message


def test_gateway_errors_pick_their_type_from_the_status() -> None:
    assert OpenAIError(401, "no").type == "authentication_error"
    assert OpenAIError(429, "busy").type == "rate_limit_error"
    assert OpenAIError(404, "gone").type == "invalid_request_error"
    assert OpenAIError(502, "bad").type == "server_error"
