"""bench/multiturn.py: the chat workload, how turns are classified and reported, and a whole
run against FastServe with and without its prefix cache on the tiny model."""

from __future__ import annotations

import argparse

import pytest

from bench import multiturn, peers, policies
from bench.multiturn import ServerResult, Turn


def test_every_conversation_shares_the_system_prompt_and_the_workload_is_seeded():
    chats = multiturn.make_chat_workload(3, 4, system_tokens=50, user_tokens=5, seed=1)
    assert len(chats.conversations) == 3
    assert all(len(c.user_turns) == 4 for c in chats.conversations)
    assert len(chats.system.split()) >= 50
    assert len({t for c in chats.conversations for t in c.user_turns}) == 12  # all distinct
    assert chats == multiturn.make_chat_workload(3, 4, system_tokens=50, user_tokens=5, seed=1)
    assert chats != multiturn.make_chat_workload(3, 4, system_tokens=50, user_tokens=5, seed=2)


def turn(conversation: int, index: int, ttft_s: float, cached: int | None = 0) -> Turn:
    return Turn(conversation, index, sent_s=1.0, first_token_s=1.0 + ttft_s, end_s=2.0 + ttft_s,
                prompt_tokens=100, cached_tokens=cached)  # fmt: skip


def test_turns_are_cold_system_cached_or_history_cached():
    assert multiturn.kind(turn(0, 0, 1)) == "cold"
    assert multiturn.kind(turn(2, 0, 1)) == "system cached"
    assert multiturn.kind(turn(0, 1, 1)) == "history cached"


def test_the_report_gives_ttft_by_kind_and_the_ratios():
    hit = ServerResult("fastserve", [turn(0, 0, 1.0), turn(1, 0, 0.2, 80), turn(1, 1, 0.1, 90)])
    miss = ServerResult("fastserve-no-cache", [turn(0, 0, 1.0), turn(1, 0, 1.0), turn(1, 1, 1.0)])
    peer = ServerResult("vllm", [turn(0, 0, 2.0, None), turn(1, 0, 0.4, None), turn(1, 1, 0.5)])
    args = argparse.Namespace(
        model_label="m", argv=[], conversations=2, turns=2, concurrency=1, system_tokens=10,
        user_tokens=2, max_tokens=3, peer_label="vllm",
    )  # fmt: skip
    text = multiturn.report([hit, miss, peer], args)
    assert "| fastserve | 1000 | 200 | 100 | 90% | 0 |" in text
    assert "| vllm | 2000 | 400 | 500 | 0% | 0 |" in text
    assert "| fastserve | 0.20x | 0.10x |" in text  # over the same turns without the cache
    assert "cold 0.50x, system cached 0.50x, history cached 0.20x" in text
    peer.turns[2].cached_tokens = None  # a server that does not report cached tokens
    assert "| vllm | 2000 | 400 | 500 | not reported | 0 |" in multiturn.report([peer], args)


def test_peers_and_policies_hand_the_multiturn_workload_over_and_refuse_others(monkeypatch):
    assert peers.main(["--workload", "sharegpt"]) == 2
    with pytest.raises(SystemExit) as exited:
        policies.main(["--workload", "sharegpt"])
    assert exited.value.code == 2
    handed = []
    monkeypatch.setattr(multiturn, "main", lambda argv: handed.append(argv) or 0)
    assert peers.main(["--workload", "multiturn", "--turns", "2"]) == 0
    policies.main(["--turns", "3", "--workload", "multiturn"])
    assert handed == [["--turns", "2", "--peer", "vllm"], ["--turns", "3", "--peer", "none"]]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_finds_the_prefix_cached_only_where_it_is_on(tmp_path):
    argv = ["--model", "tiny", "--peer", "none", "--conversations", "3", "--turns", "3",
            "--system-tokens", "120", "--user-tokens", "10", "--max-tokens", "4",
            "--out", str(tmp_path), "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    assert multiturn.main(argv) == 0
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in (tmp_path / "multiturn-tiny.md").read_text().splitlines()
        if line.startswith("| fastserve")
    ]
    cached_share = {cells[0]: cells[4] for cells in rows if len(cells) == 6}  # the TTFT table
    assert cached_share["fastserve-no-cache"] == "0%"
    assert int(cached_share["fastserve"].rstrip("%")) > 50
