"""Builds a Prometheus metric family from (labels, value) samples: how the scheduler's stats
table reaches both its own /metrics port and, through the Stats RPC, the frontends'."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

Samples = list[tuple[dict[str, str], float]]


def metric_family(name: str, kind: str, help: str, samples: Samples) -> Metric:
    """`kind` is "counter" or "gauge"; every sample has the same label names."""
    family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    label_names = list(samples[0][0]) if samples else []
    family = family_type(name, help, labels=label_names)
    for labels, value in samples:
        family.add_metric([labels[key] for key in label_names], value)
    return family
