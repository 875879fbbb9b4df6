"""Typed exceptions for gRPC status codes, so callers catch what they can act on."""

from __future__ import annotations

import grpc


class FastServeError(Exception):
    """Any error from a FastServe call; `code` is the gRPC status, `details` the server's text,
    `retry_after_s` the seconds the server asked the client to wait before retrying (its
    `retry-after` trailing metadata: a full queue, a draining frontend), or None."""

    def __init__(
        self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s


class InvalidArgumentError(FastServeError):
    """The request was rejected; `details` names the bad field."""


class ResourceExhaustedError(FastServeError):
    """The server is overloaded (its queue is full); try again later (`retry_after_s`)."""


class UnavailableError(FastServeError):
    """The server could not be reached, after retrying."""


class DeadlineExceededError(FastServeError):
    """The call's timeout passed before it finished."""


class NotFoundError(FastServeError):
    """The named model (or other resource) does not exist."""


class CancelledError(FastServeError):
    """The call was cancelled."""


class AuthenticationError(FastServeError):
    """The API key is missing, wrong, or not allowed to do this."""


_BY_CODE: dict[grpc.StatusCode, type[FastServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}


def from_rpc_error(error: grpc.RpcError) -> FastServeError:
    """The typed exception for a failed gRPC call (sync or asyncio)."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = (code_fn() if callable(code_fn) else None) or grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or str(error)
    return _BY_CODE.get(code, FastServeError)(code, details, _retry_after_s(error))


def _retry_after_s(error: grpc.RpcError) -> float | None:
    metadata_fn = getattr(error, "trailing_metadata", None)
    metadata = (metadata_fn() if callable(metadata_fn) else None) or ()
    for key, value in metadata:
        if key == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None
