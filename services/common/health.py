"""Client side of health checks: wait until a service reports SERVING."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, service: str = "", timeout_s: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_until_serving(address: str, timeout_s: float, service: str = "") -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_serving(address, service):
            return True
        time.sleep(0.1)
    return False
