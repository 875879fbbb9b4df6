"""bench/peers.py: SLO interpolation, ratios with bounds, the greedy check and the peer-ready
model folder (pure or on small files), then the whole comparison against real servers: the tiny
model served by FastServe on both sides (the peer through --peer-url), and a FastServe with other
random weights (--load-format dummy), which the greedy check must refuse."""

from __future__ import annotations

import json
import math
import re

import pytest

from bench import peer_check, peer_report, peer_servers, peers
from bench.peer_check import GreedyAnswer, GreedyMismatch
from bench.peer_report import SloThroughput

EMBED = peer_servers.EMBED_KEY

# -- throughput at the SLO


def test_slo_crossing_interpolates_between_the_rates_around_it():
    points = [(2.0, 0.030), (1.0, 0.010), (3.0, 0.050)]  # unsorted on purpose
    assert peer_report.slo_crossing(points, 0.020) == SloThroughput(1.5, 1.5)
    assert peer_report.slo_crossing(points, 0.045).low == pytest.approx(2.75)
    # Exactly at the SLO still meets it.
    assert peer_report.slo_crossing(points, 0.030) == SloThroughput(2.0, 2.0)


def test_slo_crossing_uses_the_first_crossing_and_skips_failed_points():
    points = [(1.0, 0.010), (2.0, 0.030), (3.0, 0.015), (4.0, math.nan)]
    assert peer_report.slo_crossing(points, 0.020) == SloThroughput(1.5, 1.5)


def test_slo_never_crossed_or_crossed_below_the_lowest_rate():
    never = peer_report.slo_crossing([(1.0, 0.010), (2.0, 0.012)], 0.050)
    assert never == SloThroughput(2.0, math.inf)
    assert never.render() == "not reached, > 2"
    below = peer_report.slo_crossing([(1.0, 0.060), (2.0, 0.080)], 0.050)
    assert below == SloThroughput(0.0, 1.0)
    assert below.render() == "< 1"
    assert peer_report.slo_crossing([], 0.05).render() == "not reached, > 0"
    assert SloThroughput(1.234, 1.234).render() == "1.23"


def test_slo_ratio_gives_bounds_where_a_server_did_not_cross():
    exact = SloThroughput(3.0, 3.0)
    never = SloThroughput(4.0, math.inf)
    below = SloThroughput(0.0, 1.0)
    assert peer_report.slo_ratio(SloThroughput(6.0, 6.0), exact) == "2.00x"
    assert peer_report.slo_ratio(exact, never) == "<= 0.75x"  # the "at most 0.75x"
    assert peer_report.slo_ratio(never, exact) == ">= 1.33x"
    assert peer_report.slo_ratio(below, exact) == "<= 0.33x"
    assert peer_report.slo_ratio(exact, below) == ">= 3.00x"
    assert peer_report.slo_ratio(never, below) == ">= 4.00x"
    assert peer_report.slo_ratio(below, never) == "<= 0.25x"
    assert peer_report.slo_ratio(never, never) == "- (neither crossed it)"
    assert peer_report.slo_ratio(below, below) == "- (both past it at the lowest rate)"


# -- the greedy check


def answer(tokens: list[str]) -> GreedyAnswer:
    return GreedyAnswer("".join(tokens), tuple(tokens), len(tokens))


def test_agreed_tokens_counts_whole_reference_tokens_of_the_common_prefix():
    reference = answer([" Paris", ".", "\n", "The", " answer"])
    assert peer_check.agreed_tokens(reference, reference.text) == 5
    assert peer_check.agreed_tokens(reference, " Paris.\nA") == 3
    assert peer_check.agreed_tokens(reference, " Parisian") == 1
    assert peer_check.agreed_tokens(reference, " Par") == 0
    assert peer_check.agreed_tokens(reference, "") == 0


def test_check_greedy_allows_late_mismatches_only():
    reference = [answer(["a", " b", " c", " d", " e", " f"])]
    late = [answer(["a", " b", " c", " d", " x", " y"])]
    [comparison] = peer_check.check_greedy("peer", late, "fs", reference, ["p"], 6, min_agree=4)
    assert comparison.agreed_tokens == 4 and not comparison.identical
    early = [answer(["a", " b", " x", " d", " e", " f"])]
    with pytest.raises(GreedyMismatch, match="disagree at greedy token 3"):
        peer_check.check_greedy("peer", early, "fs", reference, ["p"], 6, min_agree=4)


def test_check_greedy_refuses_empty_text_and_a_wrong_length():
    reference = [answer(["a", " b", " c", " d"])]
    with pytest.raises(GreedyMismatch, match="empty or garbage"):
        peer_check.check_greedy("peer", [GreedyAnswer("  ", (), 4)], "fs", reference, ["p"], 4, 2)
    garbage = [GreedyAnswer("\ufffd" * 4, (), 4)]
    with pytest.raises(GreedyMismatch, match="empty or garbage"):
        peer_check.check_greedy("peer", garbage, "fs", reference, ["p"], 4, 2)
    short = [GreedyAnswer("a b", ("a", " b"), 2)]
    with pytest.raises(GreedyMismatch, match="ignore_eos"):
        peer_check.check_greedy("peer", short, "fs", reference, ["p"], 4, 2)


def test_variants_and_defaults():
    assert peers.parse_variant("fcfs:--policy fcfs") == peers.ServerSpec(
        "fcfs", "fastserve", ("--policy", "fcfs")
    )
    with pytest.raises(ValueError, match="LABEL:FLAGS"):
        peers.parse_variant("fcfs")
    args = peers.parse_args(["--fastserve-variant", "fcfs:--policy fcfs", "--kv-tokens", "400"])
    assert [s.label for s in args.servers] == ["fastserve", "fcfs", "vllm"]
    # The same KV room on both: whole vLLM blocks (128 tokens), 512 tokens = 32 FastServe blocks.
    assert args.kv_tokens == 512 and "--kv-blocks=32" in args.common_flags
    assert args.name == "peers-smollm2-135m-instruct-sharegpt-vllm-pressure"
    assert args.scale == 0.1 and args.max_model_len == 512  # no request needs more KV
    plain = peers.parse_args(["--peer-url", "http://127.0.0.1:1/v1", "--kv-tokens", "400"])
    assert "--kv-blocks=25" in plain.common_flags
    plain = peers.parse_args(["--peer-url", "http://127.0.0.1:1/v1"])
    assert [s.label for s in plain.servers] == ["fastserve", "peer"]
    assert plain.max_model_len == 2048 and plain.name == "peers-smollm2-135m-instruct-sharegpt-peer"


# -- the peer-ready copy of a model folder


def write_tied_folder(folder, *, with_embedding: bool = False):
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    (folder / "tokenizer.json").write_text("{}")
    head = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"lm_head.weight": head, "model.norm.weight": torch.ones(4)}
    if with_embedding:
        tensors["model.embed_tokens.weight"] = head.clone()
    # As safetensors' save_model writes a tied pair: one tensor, the alias in the metadata.
    metadata = {"format": "pt", "model.embed_tokens.weight": "lm_head.weight"}
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    return head


def test_peer_model_folder_adds_the_tied_embedding(tmp_path):
    from safetensors import safe_open

    source = tmp_path / "model"
    head = write_tied_folder(source)
    assert peer_servers.needs_embedding_copy(source)
    copy = peer_servers.peer_model_folder(source, cache=tmp_path / "cache")
    assert copy != source and not peer_servers.needs_embedding_copy(copy)
    assert (copy / "config.json").resolve() == (source / "config.json").resolve()
    assert (copy / "tokenizer.json").is_symlink()
    with safe_open(copy / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {"lm_head.weight", "model.norm.weight", EMBED}
        assert f.get_tensor(EMBED).equal(head)
        assert EMBED not in (f.metadata() or {})
    assert peer_servers.peer_model_folder(source, cache=tmp_path / "cache") == copy  # once


def test_a_folder_with_its_embedding_is_used_as_it_is(tmp_path):
    source = tmp_path / "model"
    write_tied_folder(source, with_embedding=True)
    assert peer_servers.peer_model_folder(source, cache=tmp_path / "cache") == source


# -- real servers: the tiny model on both sides


@pytest.fixture(scope="module")
def tiny_peer(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("peer-logs")
    flags = ["--max-batch-size", "4", "--policy", "fcfs"]
    server = peer_servers.start_fastserve("tiny-peer", tiny_model_dir, flags, logs)
    yield server
    server.stop()


@pytest.mark.e2e
def test_the_comparison_runs_end_to_end(tiny_peer, tmp_path):
    argv = ["--model", "tiny", "--peer-url", f"{tiny_peer.url}/v1", "--peer-label", "fs-peer"]
    argv += ["--max-batch-size", "4", "--num-requests", "6", "--rate-fractions", "0.5,2"]
    argv += ["--scale", "0.1", "--num-unloaded", "2", "--num-burst", "4", "--check-prompts", "2"]
    argv += ["--out", str(tmp_path), "--name", "t", "--log-dir", str(tmp_path / "logs")]
    assert peers.main(argv) == 0
    report = (tmp_path / "t.md").read_text()
    for suffix in ("per-token-latency", "p95", "throughput"):
        assert (tmp_path / f"t-{suffix}.png").stat().st_size > 1000
    assert "## FastServe / fs-peer" in report
    for row in (
        "unloaded per-token latency",
        "saturated output tokens/s",
        "throughput at the mean per-token SLO",
        "throughput at the P95 per-token SLO",
    ):
        # A ratio, a bound, or (the SLO is 5x unloaded: both may stay below it) a dash.
        assert re.search(rf"\| {row} \| ((>= |<= )?\d+\.\d\dx|- \(.+\)) \|", report), row
    assert re.search(r"\| mean per-token at [\d.]+ req/s \| \d+\.\d\dx \|", report)
    # The same weights on both sides: every greedy token agrees.
    assert report.count("| fs-peer | 'The capital of France is' | all | same |") == 1
    # Every request succeeded, and each stream's chunks were counted.
    results = section_rows(report, "## Results")
    assert len(results) == 4 and all(row[-1] == "0" for row in results)
    chunks = section_rows(report, "## SSE chunks per stream")
    assert [row[:3] for row in chunks if row[1] == "all"] == [
        ["fastserve", "all", "12"],
        ["fs-peer", "all", "12"],
    ]
    assert all(int(row[4]) > 0 for row in chunks)


def section_rows(report: str, title: str) -> list[list[str]]:
    """The cells of the table rows of one section (header and rule left out)."""
    text = report.split(title + "\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


@pytest.mark.e2e
def test_the_greedy_check_catches_a_peer_with_other_weights(tiny_model_dir, tiny_peer, tmp_path):
    flags = ["--max-batch-size", "4", "--policy", "fcfs", "--load-format", "dummy"]
    wrong = peer_servers.start_fastserve("dummy", tiny_model_dir, flags, tmp_path)
    try:
        model, _ = peer_servers.served_model(tiny_peer.url)
        prompts = peers.CHECK_PROMPTS[:2]
        good = [peer_check.greedy_answer(tiny_peer.url, model, p, 16) for p in prompts]
        bad = [peer_check.greedy_answer(wrong.url, model, p, 16) for p in prompts]
    finally:
        wrong.stop()
    assert wrong.process is None
    with pytest.raises(GreedyMismatch, match=r"disagree at greedy token|empty or garbage"):
        peer_check.check_greedy("dummy", bad, "fastserve", good, prompts, 16, min_agree=4)
