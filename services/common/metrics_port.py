"""A Prometheus /metrics port of its own, for the services without an HTTP port (scheduler, worker).

The bound port is logged, never printed: stdout carries only the `X ready on host:port` line. The
launcher cannot reserve this port for the child (prometheus_client does not set SO_REUSEPORT), so
`fastserve up --metrics` passes `--metrics-port 0` and the log line says which port was picked.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from services.common.flags import add_flag

log = logging.getLogger(__name__)

METRICS_OFF = -1


def add_metrics_port_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--metrics-port",
        type=int,
        default=METRICS_OFF,
        help="Prometheus /metrics port on --host (-1: off, 0: pick a free one, logged)",
    )


@dataclass(frozen=True, slots=True)
class MetricsServer:
    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, service: str
) -> MetricsServer | None:
    """Serves `registry` on host:port in a daemon thread; None when `port` is -1 (off)."""
    if port == METRICS_OFF:
        return None
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SystemExit(f"{service}: --metrics-port {port}: {exc}") from exc
    bound = int(server.server_port)
    shown = f"[{host}]" if ":" in host else host
    log.info("%s metrics on http://%s:%d/metrics", service, shown, bound)
    return MetricsServer(server, bound)
