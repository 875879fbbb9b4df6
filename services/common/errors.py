"""Errors that map to gRPC status codes at a service edge (see grpc_server.ErrorInterceptor)."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error a caller should see with a specific status code and message."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ServiceError):
    """Bad input; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
