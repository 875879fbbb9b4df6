"""`fastserve generate PROMPT`: stream one completion from a running deployment to stdout.

The prompt goes as a chat user message when the model has a chat template (learned from
ListModels), else as raw text; `--raw` always sends it as is.
"""

from __future__ import annotations

import argparse
import sys

from fastserve_client import DEFAULT_ADDRESS, Chunk, Client, FastServeError
from services.common.flags import add_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `generate` subcommand's arguments to `parser`."""
    parser.add_argument("prompt", metavar="PROMPT", help="text to complete")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy"
    )
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--model", default="", help="model name; empty selects the served model")
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as is, never as a chat message"
    )
    parser.add_argument(
        "--show-events",
        action="store_true",
        help="print queued / preempted / resumed events to stderr",
    )
    add_flag(parser, "--address", default=DEFAULT_ADDRESS, help="frontend gRPC address")
    add_flag(parser, "--api-key", default=None, help="API key, if the deployment requires one")


def run(args: argparse.Namespace) -> int:
    """Streams the completion of `args.prompt` to stdout; returns the process exit code."""
    printed_any = False
    try:
        with Client(args.address, api_key=args.api_key) as client:
            params = dict(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
                model=args.model,
            )
            if not args.raw and _has_chat_template(client, args.model):
                chunks = client.chat([{"role": "user", "content": args.prompt}], **params)
            else:
                chunks = client.generate(args.prompt, **params)
            for chunk in chunks:
                if args.show_events:
                    _print_event(chunk)
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    printed_any = True
    except FastServeError as error:
        if printed_any:
            print()
        print(f"error: {error.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Leaving the `with` block cancelled the call, so the server has freed the job.
        print()
        return 130
    print()
    return 0


def _has_chat_template(client: Client, model: str) -> bool:
    """Whether `model` (empty: the served model) takes chat input; an unknown one does not."""
    models = client.list_models()
    if not model:
        return bool(models) and models[0].has_chat_template
    return any(m.name == model and m.has_chat_template for m in models)


def _print_event(chunk: Chunk) -> None:
    if chunk.state == "queued":
        event = f"queued at level {chunk.queue_level}"
    elif chunk.state == "preempted":
        event = "preempted"
    elif chunk.state == "running":
        event = "resumed"
    else:
        return
    print(f"[{event}]", file=sys.stderr, flush=True)
