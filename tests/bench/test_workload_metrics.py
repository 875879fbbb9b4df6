"""The benchmark's pure parts: workload shapes and metric arithmetic. No processes."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench import workload
from bench.metrics import (
    RequestRecord,
    knee_rate,
    percentile,
    span_seconds,
    summarize,
    throughput_at_slo,
)
from bench.workload import DATASETS, make_workload, sample_lengths, unit_gaps


def make_record(
    arrival_s: float, end_s: float, output_tokens: int, first_token_s: float | None = None, **kw
) -> RequestRecord:
    first = arrival_s + 0.1 if first_token_s is None else first_token_s
    return RequestRecord(
        index=kw.pop("index", 0),
        arrival_s=arrival_s,
        requested_output_tokens=kw.pop("requested", output_tokens),
        sent_s=arrival_s,
        first_token_s=first,
        end_s=end_s,
        output_tokens=output_tokens,
        finish_reason="length",
        **kw,
    )


# -- workload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_length_means_match_the_published_averages(name):
    dataset = DATASETS[name]
    pairs = sample_lengths(40_000, dataset, random.Random(1))
    mean_prompt = statistics.fmean(p for p, _ in pairs)
    mean_output = statistics.fmean(o for _, o in pairs)
    assert mean_prompt == pytest.approx(dataset.mean_prompt_tokens, rel=0.05)
    assert mean_output == pytest.approx(dataset.mean_output_tokens, rel=0.05)


def test_lengths_are_long_tailed():
    outputs = sorted(o for _, o in sample_lengths(20_000, DATASETS["sharegpt"], random.Random(2)))
    median, p99 = outputs[len(outputs) // 2], outputs[int(0.99 * len(outputs))]
    assert p99 > 4 * median


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_lengths_are_filtered_as_the_artifact_does(name):
    pairs = sample_lengths(20_000, DATASETS[name], random.Random(3))
    assert all(workload.MIN_TOKENS <= p <= workload.MAX_PROMPT_TOKENS for p, _ in pairs)
    assert all(o >= workload.MIN_TOKENS for _, o in pairs)
    assert all(p + o <= workload.MAX_TOTAL_TOKENS for p, o in pairs)


def test_scale_shrinks_and_max_context_clips():
    rng = random.Random(4)
    full = sample_lengths(5_000, DATASETS["sharegpt"], random.Random(4))
    scaled = sample_lengths(5_000, DATASETS["sharegpt"], random.Random(4), scale=0.25)
    assert statistics.fmean(o for _, o in scaled) == pytest.approx(
        0.25 * statistics.fmean(o for _, o in full), rel=0.01
    )
    clipped = sample_lengths(5_000, DATASETS["sharegpt"], rng, max_context_tokens=300)
    assert all(p >= 1 and o >= 1 and p + o <= 300 for p, o in clipped)
    assert max(p + o for p, o in clipped) == 300


def test_same_seed_same_workload_and_rates_only_compress_time():
    a = make_workload(50, 2.0, seed=7)
    assert a == make_workload(50, 2.0, seed=7)
    assert a != make_workload(50, 2.0, seed=8)
    fast = make_workload(50, 8.0, seed=7)
    assert [r.prompt for r in fast] == [r.prompt for r in a]
    assert [r.output_tokens for r in fast] == [r.output_tokens for r in a]
    assert [4 * r.arrival_s for r in fast] == pytest.approx([r.arrival_s for r in a])
    gamma = make_workload(50, 2.0, arrival="gamma", cv=3.0, seed=7)
    assert [r.prompt for r in gamma] == [r.prompt for r in a]


def test_arrivals_increase_at_the_requested_rate():
    requests = make_workload(20_000, 5.0, dataset="alpaca", seed=1)
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert len(arrivals) / arrivals[-1] == pytest.approx(5.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_cv(cv):
    gaps = unit_gaps(100_000, random.Random(5), arrival="gamma", cv=cv)
    assert statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.07)


def test_poisson_gaps_have_cv_one():
    gaps = unit_gaps(100_000, random.Random(6))
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.03)


def test_prompts_have_about_the_intended_token_count():
    requests = make_workload(4_000, 1.0, seed=2)
    mean_words = statistics.fmean(r.num_prompt_words for r in requests)
    assert mean_words == pytest.approx(DATASETS["sharegpt"].mean_prompt_tokens, rel=0.08)
    assert all(word in workload.WORDS for word in requests[0].prompt.split())
    assert len(set(workload.WORDS)) == len(workload.WORDS) > 50


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dataset"):
        make_workload(1, 1.0, dataset="nope")
    with pytest.raises(ValueError, match="arrival"):
        make_workload(1, 1.0, arrival="uniform")
    with pytest.raises(ValueError, match="rate"):
        make_workload(1, 0.0)
    with pytest.raises(ValueError, match="cv"):
        make_workload(1, 1.0, arrival="gamma", cv=0)


# -- metrics ----------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 95) == pytest.approx(4.8)  # rank 3.8: 4 + 0.8 * (5 - 4)
    assert percentile(list(range(1, 21)), 95) == pytest.approx(19.05)  # rank 18.05
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


def test_summarize_computes_the_papers_metrics():
    records = [
        # per-token latency 1.0 / 10 = 0.1 s; TTFT 0.1; TPOT (1.0 - 0.1) / 9 = 0.1
        make_record(0.0, 1.0, 10, index=0),
        # per-token 2.0 / 4 = 0.5; TTFT 0.1; TPOT (3.0 - 1.1) / 3
        make_record(1.0, 3.0, 4, index=1),
        # per-token 3.0 / 20 = 0.15; ends last, at 5.0
        make_record(2.0, 5.0, 20, index=2, num_preemptions=2),
        RequestRecord(3, 2.5, 8, error="UnavailableError: gone", end_s=2.6, num_preemptions=1),
    ]
    m = summarize(records, rate_rps=0.8, slo_s=0.2, short_max_output_tokens=10)
    assert m.num_requests == 4 and m.num_errors == 1
    assert m.mean_per_token_latency_s == pytest.approx((0.1 + 0.5 + 0.15) / 3)
    assert m.p95_per_token_latency_s == pytest.approx(0.15 + 0.9 * (0.5 - 0.15))
    assert m.mean_ttft_s == pytest.approx(0.1)
    assert m.mean_tpot_s == pytest.approx((0.1 + 1.9 / 3 + 2.9 / 19) / 3)
    # Span: first arrival 0.0 to last finish 5.0.
    assert m.throughput_rps == pytest.approx(3 / 5)
    assert m.throughput_tokens_per_s == pytest.approx(34 / 5)
    assert m.goodput_rps == pytest.approx(2 / 5)  # 0.1 and 0.15 meet 0.2; 0.5 does not
    assert m.num_preemptions == 3
    assert m.short_mean_per_token_latency_s == pytest.approx((0.1 + 0.5) / 2)
    assert m.p99_send_lag_s == 0.0


def test_send_lag_is_the_p99_delay_between_arrival_and_send():
    records = [make_record(1.0, 2.0, 5), make_record(2.0, 3.0, 5)]
    records[1].sent_s = 2.25
    assert summarize(records, 1.0, 1.0).p99_send_lag_s == pytest.approx(0.99 * 0.25)


def test_summarize_without_successes_is_nan_not_an_error():
    m = summarize([RequestRecord(0, 0.0, 5, error="boom", end_s=1.0)], 1.0, 0.1)
    assert m.num_errors == 1 and math.isnan(m.mean_per_token_latency_s)
    assert math.isnan(m.throughput_rps) and math.isnan(m.short_mean_per_token_latency_s)
    assert span_seconds([]) == 0.0


def test_a_stream_without_usage_is_not_ok():
    record = make_record(0.0, 1.0, 0)
    assert not record.ok


def test_throughput_at_slo_is_the_highest_rate_meeting_it():
    points = [(1.0, 0.05), (2.0, 0.08), (3.0, 0.30), (4.0, 0.09), (5.0, 0.9)]
    assert throughput_at_slo(points, 0.1) == 4.0
    assert throughput_at_slo(points, 0.08) == 2.0
    assert throughput_at_slo(points, 0.01) is None
    assert throughput_at_slo([(1.0, math.nan), (2.0, 0.05)], 0.1) == 2.0


def test_knee_rate_is_the_lowest_rate_reaching_the_threshold():
    points = [(3.0, 0.6), (1.0, 0.1), (2.0, 0.5)]
    assert knee_rate(points, 0.5) == 2.0
    assert knee_rate(points, 0.7) is None


# -- policy specs -----------------------------------------------------------------------------


def test_policy_specs_become_up_flags():
    from bench.variants import parse_variant

    paper = parse_variant("sj-paper=skip-join-mlfq:charge=whole,backfill=off,starvation=paper")
    assert paper.label == "sj-paper" and paper.policy == "skip-join-mlfq"
    assert paper.flags() == [
        "--policy", "skip-join-mlfq",
        "--policy-option", "charge=whole",
        "--policy-option", "backfill=off",
        "--policy-option", "starvation=paper",
    ]  # fmt: skip
    assert parse_variant("skip-join-mlfq:charge=whole").label == "sj-mlfq/charge=whole"
    assert parse_variant("a/b=c=mlfq").label == "a/b=c"
    fcfs = parse_variant("fcfs")
    assert fcfs.label == "fcfs" and fcfs.is_plain_fcfs and fcfs.flags() == ["--policy", "fcfs"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_variant("mlfq:charge")


def test_a_policy_spec_may_set_its_own_kv_policy():
    from bench.variants import parse_variant

    vllm = parse_variant("fcfs@recompute")
    assert vllm.label == "fcfs@recompute" and vllm.is_plain_fcfs
    assert vllm.flags() == ["--policy", "fcfs", "--kv-policy", "recompute"]
    tuned = parse_variant("skip-join-mlfq:starvation_s=20@proactive")
    assert tuned.label == "sj-mlfq/starvation_s=20@proactive"
    assert tuned.options == (("starvation_s", "20"),) and tuned.kv_policy == "proactive"
    assert parse_variant("fs=skip-join-mlfq@reactive").label == "fs"
    with pytest.raises(ValueError, match="kv policy 'swap'"):
        parse_variant("fcfs@swap")


def test_the_sweeps_kv_policy_comes_before_each_variants_own():
    import argparse

    from bench.policies import parse_args, up_flags
    from services.launcher import add_arguments

    up = argparse.ArgumentParser()
    add_arguments(up)

    args = parse_args(["--kv-policy", "reactive", "--policies", "mlfq", "fcfs@recompute"])
    assert [v.label for v in args.variants] == ["fcfs@recompute", "mlfq"]  # baseline first
    fcfs, mlfq = args.variants
    assert up.parse_args(up_flags(args, fcfs)).kv_policy == "recompute"
    assert up.parse_args(up_flags(args, mlfq)).kv_policy == "reactive"


def test_only_the_first_plain_fcfs_moves_to_the_front():
    """It shares the calibration stack; a second one listed last runs last, to show drift."""
    from bench.policies import parse_args

    specs = ["skip-join-mlfq", "fcfs@recompute", "mlfq", "again=fcfs@recompute"]
    args = parse_args(["--policies", *specs])
    labels = [v.label for v in args.variants]
    assert labels == ["fcfs@recompute", "skip-join-mlfq", "mlfq", "again"]
