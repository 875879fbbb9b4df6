"""Multi-turn chat against OpenAI-compatible servers: does a shared prefix make a turn cheaper?

Every conversation starts with the same system prompt (about `--system-tokens` tokens) and
runs `--turns` turns; each turn sends the whole conversation so far (system, the user turns and
the server's own greedy answers) to `/v1/chat/completions`, streamed. Conversations run
`--concurrency` at a time, each turn after the previous one's answer (a closed loop, as a chat
client does). A server with prefix caching computes only what is new in a turn; one without it
prefills the whole history again. The report gives TTFT by kind of turn (the very first turn,
cold; the first turn of a later conversation, whose system prompt is cached; later turns,
whose history is cached) for each server, the cached prompt tokens the server reported, and
hit / miss ratios: TTFT of a turn with the cache over the same turn on FastServe without it.

    .venv/bin/python -m bench.multiturn [--model SmolLM2-135M-Instruct] [--peer vllm|none]
        [--conversations 6] [--turns 4] [--system-tokens 1000] [--concurrency 2]

Servers: FastServe (prefix cache on, its default), FastServe `--no-prefix-cache`, and vLLM's
CPU build with `--enable-prefix-caching` (installed as bench/peers.py does), one at a time.
`python -m bench.peers --workload multiturn` runs the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bench import peer_servers, workload

DEFAULT_OUT = Path("docs/results")


@dataclass(frozen=True, slots=True)
class Conversation:
    user_turns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    system: str  # the same for every conversation
    conversations: tuple[Conversation, ...]
    max_tokens: int  # per answer


def make_chat_workload(
    num_conversations: int,
    num_turns: int,
    *,
    system_tokens: int = 1000,
    user_tokens: int = 40,
    max_tokens: int = 32,
    seed: int = 0,
) -> ChatWorkload:
    """A shared system prompt and each conversation's user turns (lengths in words, about a
    token each for the models we serve)."""
    rng = random.Random(seed)
    system = "You are a helpful assistant. " + workload.make_prompt(system_tokens, rng)
    conversations = tuple(
        Conversation(
            tuple(
                f"Question {c}.{t}: " + workload.make_prompt(user_tokens, rng)
                for t in range(num_turns)
            )
        )
        for c in range(num_conversations)
    )
    return ChatWorkload(system, conversations, max_tokens)


@dataclass(slots=True)
class Turn:
    conversation: int
    index: int  # 0 for a conversation's first turn
    sent_s: float = 0.0
    first_token_s: float | None = None
    end_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int | None = None  # None: the server did not say
    text: str = ""
    error: str | None = None

    @property
    def ttft_s(self) -> float:
        return (self.first_token_s or self.end_s) - self.sent_s


async def _chat_turn(session, url: str, model: str, messages: list, turn: Turn, clock, max_tokens):
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    turn.sent_s = clock()
    parts = []
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise peer_servers.ServerError(f"HTTP {response.status}: {await response.text()}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if turn.first_token_s is None:
                            turn.first_token_s = clock()
                        parts.append(content)
                usage = chunk.get("usage")
                if usage:
                    turn.prompt_tokens = usage.get("prompt_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    turn.cached_tokens = details.get("cached_tokens")
    except Exception as error:  # recorded: one failure must not end the run
        turn.error = f"{type(error).__name__}: {error}"
    turn.end_s = clock()
    turn.text = "".join(parts)


async def run_chats(url: str, model: str, chats: ChatWorkload, concurrency: int) -> list[Turn]:
    """Every conversation, turn after turn, `concurrency` conversations at a time."""
    start = time.perf_counter()
    slots = asyncio.Semaphore(concurrency)
    turns: list[Turn] = []

    def clock() -> float:
        return time.perf_counter() - start

    async def converse(session, number: int, conversation: Conversation) -> None:
        async with slots:
            messages = [{"role": "system", "content": chats.system}]
            for index, user in enumerate(conversation.user_turns):
                messages.append({"role": "user", "content": user})
                turn = Turn(number, index)
                turns.append(turn)
                await _chat_turn(session, url, model, messages, turn, clock, chats.max_tokens)
                if turn.error:
                    return
                messages.append({"role": "assistant", "content": turn.text})

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # The first conversation's first turn goes alone: the one cold miss.
        await converse(session, 0, chats.conversations[0])
        await asyncio.gather(
            *(converse(session, n, c) for n, c in enumerate(chats.conversations) if n)
        )
    return turns


# -- what a run measured


KINDS = ("cold", "system cached", "history cached")


def kind(turn: Turn) -> str:
    if turn.index:
        return "history cached"
    return "cold" if turn.conversation == 0 else "system cached"


@dataclass(slots=True)
class ServerResult:
    label: str
    turns: list[Turn] = field(default_factory=list)

    def ok(self) -> list[Turn]:
        return [t for t in self.turns if t.error is None]

    def mean_ttft(self, which: str) -> float:
        values = [t.ttft_s for t in self.ok() if kind(t) == which]
        return statistics.fmean(values) if values else float("nan")

    def cached_share(self, which: str) -> float | None:
        turns = [t for t in self.ok() if kind(t) == which]
        if not turns or any(t.cached_tokens is None for t in turns):
            return None
        return sum(t.cached_tokens or 0 for t in turns) / max(
            1, sum(t.prompt_tokens for t in turns)
        )


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base and base == base and value == value else "-"


def report(results: list[ServerResult], args: argparse.Namespace) -> str:
    lines = [
        f"# Multi-turn chat: {args.model_label}",
        "",
        f"Generated by `python -m bench.multiturn {shlex.join(args.argv)}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- {args.conversations} conversations of {args.turns} turns, {args.concurrency} at a "
        f"time; a shared system prompt of about {args.system_tokens} words, user turns of about "
        f"{args.user_tokens}, greedy answers of up to {args.max_tokens} tokens.",
        "- TTFT: from sending a turn to its first streamed text. Cold: the first conversation's "
        "first turn; system cached: later conversations' first turns; history cached: turns 2+.",
        "",
        "| server | TTFT cold (ms) | TTFT system cached (ms) | TTFT history cached (ms) "
        "| prompt tokens cached, turns 2+ | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        share = r.cached_share("history cached")
        lines.append(
            f"| {r.label} | {1000 * r.mean_ttft('cold'):.0f} | "
            f"{1000 * r.mean_ttft('system cached'):.0f} | "
            f"{1000 * r.mean_ttft('history cached'):.0f} | "
            f"{'not reported' if share is None else f'{100 * share:.0f}%'} | "
            f"{len(r.turns) - len(r.ok())} |"
        )
    by_label = {r.label: r for r in results}
    miss = by_label.get("fastserve-no-cache")
    if miss is not None:
        lines += [
            "",
            "TTFT over FastServe without the prefix cache, the same turns (below 1x: faster):",
            "",
            "| server | system cached | history cached |",
            "| --- | --- | --- |",
        ]
        for r in results:
            if r is not miss:
                cells = [ratio(r.mean_ttft(k), miss.mean_ttft(k)) for k in KINDS[1:]]
                lines.append(f"| {r.label} | {' | '.join(cells)} |")
    if "fastserve" in by_label and args.peer_label in by_label:
        ours, peer = by_label["fastserve"], by_label[args.peer_label]
        cells = [f"{k} {ratio(ours.mean_ttft(k), peer.mean_ttft(k))}" for k in KINDS]
        lines += [
            "",
            f"FastServe / {args.peer_label}, both with prefix caching, TTFT (below 1x: FastServe "
            f"is faster): {', '.join(cells)}.",
        ]
    return "\n".join(lines) + "\n"


# -- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--peer", choices=["vllm", "none"], default="vllm")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--user-tokens", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=4096, help="vLLM's")
    parser.add_argument("--fastserve-flags", default="", help="extra `fastserve up` flags")
    parser.add_argument("--vllm-args", default="", help="extra vLLM server flags")
    parser.add_argument("--vllm-venv", type=Path, default=peer_servers.VLLM_VENV)
    parser.add_argument("--vllm-spec", default=peer_servers.VLLM_SPEC)
    parser.add_argument("--name", help="report name (default multiturn-<model>)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--log-dir", type=Path, default=peer_servers.CACHE / "logs")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.model_label = Path(args.model).name
    args.peer_label = "vllm"
    args.name = args.name or f"multiturn-{args.model_label.lower()}"
    return args


def model_path(name: str) -> str | Path:
    if name == "tiny":
        from testing.tiny_model import tiny_llama_dir

        return tiny_llama_dir()
    return name


def run(args: argparse.Namespace) -> list[ServerResult]:
    model = model_path(args.model)
    chats = make_chat_workload(
        args.conversations, args.turns, system_tokens=args.system_tokens,
        user_tokens=args.user_tokens, max_tokens=args.max_tokens, seed=args.seed,
    )  # fmt: skip
    common = shlex.split(args.fastserve_flags)
    servers: list[tuple[str, object]] = [
        (
            "fastserve",
            lambda: peer_servers.start_fastserve("fastserve", model, common, args.log_dir),
        ),
        (
            "fastserve-no-cache",
            lambda: peer_servers.start_fastserve(
                "fastserve-no-cache", model, [*common, "--no-prefix-cache"], args.log_dir
            ),
        ),
    ]
    if args.peer == "vllm":

        def start_vllm():
            peer_servers.ensure_vllm(args.vllm_venv, args.vllm_spec, say=print)
            folder = peer_servers.peer_model_folder(peer_servers.fastserve_model_folder(model))
            return peer_servers.start_vllm(
                "vllm", folder, served_name=peer_servers.served_model_name(model),
                max_model_len=args.max_model_len, max_num_seqs=16, max_batched_tokens=2048,
                kv_space_gib=1, threads_bind="auto", block_size=None, num_blocks=None,
                extra_args=["--enable-prefix-caching", *shlex.split(args.vllm_args)],
                log_dir=args.log_dir, venv=args.vllm_venv,
            )  # fmt: skip

        servers.append(("vllm", start_vllm))
    results = []
    for label, start in servers:
        print(f"{label}: starting", file=sys.stderr)
        server = start()  # type: ignore[operator]
        try:
            served, _ = peer_servers.served_model(server.url)
            # One short chat first: first-call costs (vLLM compiles) stay out of the data.
            warm = ChatWorkload("Hello.", (Conversation(("Say hi.",)),), 4)
            asyncio.run(run_chats(server.url, served, warm, 1))
            print(f"{label}: running", file=sys.stderr)
            turns = asyncio.run(run_chats(server.url, served, chats, args.concurrency))
        finally:
            server.stop()
        results.append(ServerResult(label, turns))
        errors = [t.error for t in turns if t.error]
        if errors:
            print(f"{label}: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return results


def handoff(argv: list[str], prog: str, peer: str) -> int | None:
    """Another benchmark given `--workload multiturn`: runs this one with the rest of its
    arguments (and `--peer peer` unless they name one); None without `--workload`."""
    if "--workload" not in argv:
        return None
    index = argv.index("--workload")
    if argv[index + 1 : index + 2] != ["multiturn"]:
        print(f"{prog}: --workload takes 'multiturn'", file=sys.stderr)
        return 2
    rest = argv[:index] + argv[index + 2 :]
    return main(rest if "--peer" in rest else [*rest, "--peer", peer])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    text = report(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.md"
    path.write_text(text)
    print(text)
    print(f"report: {path}", file=sys.stderr)
    return 0 if all(not r.turns or r.ok() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
