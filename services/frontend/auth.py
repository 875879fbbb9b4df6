"""Optional API keys for both public surfaces.

Keys come from `--api-key` (repeatable), FASTSERVE_API_KEY (comma-separated) and
`--api-key-file` / FASTSERVE_API_KEY_FILE (one key a line, `#` comments). Both variables are read
by the parser, like every FASTSERVE_<FLAG>. With no key configured, nothing is checked.
A key may be followed by ` top-priority=K`: the highest priority class its callers may use
(services/frontend/priority.py); a key without it gets the deployment's --top-priority.
Clients send `authorization: Bearer <key>`: an HTTP header, or gRPC metadata (the SDK does).
Health, readiness, reflection and metrics stay open so probes and scrapers need no key.
"""

from __future__ import annotations

import argparse
import hmac
import os
from pathlib import Path

import grpc

from services.common.flags import add_flag

ENV_VAR = "FASTSERVE_API_KEY"
# gRPC methods anyone may call: health checks and reflection.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # FASTSERVE_API_KEY holds several keys, so it is this list's default rather than add_flag's
    # single value; `--api-key` adds to it (argparse appends to a copy).
    env_keys = [k.strip() for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]
    parser.add_argument(
        "--api-key",
        action="append",
        default=env_keys,
        help=f"a key clients must send as a bearer token (repeatable) [env {ENV_VAR}, "
        "comma-separated]",
    )
    add_flag(parser, "--api-key-file", default=None, help="a file of keys, one a line")


TOP_PRIORITY = "top-priority="


def parse_key(entry: str) -> tuple[str, int | None]:
    """`KEY` or `KEY top-priority=K` -> (key, K or None); ValueError names what is wrong."""
    key, *options = entry.split()
    top = None
    for option in options:
        if not option.startswith(TOP_PRIORITY):
            raise ValueError(f"API key entry: unknown option {option.split('=')[0]!r}")
        try:
            top = int(option[len(TOP_PRIORITY) :])
        except ValueError:
            raise ValueError("API key entry: top-priority must be an integer") from None
    return key, top


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        """`keys`: entries as parse_key reads them."""
        parsed = [parse_key(entry) for entry in keys if entry.strip()]
        self._keys = [key.encode() for key, _ in parsed]
        self.tops = [top for _, top in parsed]  # per key: its top-priority, or None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ApiKeys:
        keys = list(args.api_key or [])
        if args.api_key_file:
            for line in Path(args.api_key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` header / metadata value carries a valid key."""
        return not self._keys or self._match(authorization) is not None

    def top_priority(self, authorization: str | None) -> int | None:
        """The top-priority of the key `authorization` carries; None when it names none (or
        carries no valid key)."""
        index = self._match(authorization)
        return None if index is None else self.tops[index]

    def _match(self, authorization: str | None) -> int | None:
        if not authorization or not self._keys:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = token.strip().encode("utf-8", "replace")
        # Compare against every key in constant time so timing does not reveal which matched.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        return matches.index(True) if any(matches) else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key with UNAUTHENTICATED (health and reflection stay open)."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not self._keys.enabled or method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self._keys.allows(metadata.get("authorization")):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing(handler)


def _refusing(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        yield  # pragma: no cover (makes this an async generator)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream or handler.stream_stream:
        return handler._replace(
            unary_stream=stream if handler.unary_stream else None,
            stream_stream=stream if handler.stream_stream else None,
        )
    return handler._replace(
        unary_unary=unary if handler.unary_unary else None,
        stream_unary=unary if handler.stream_unary else None,
    )
