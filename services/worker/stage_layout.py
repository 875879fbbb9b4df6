"""Which decoder layers each pipeline stage runs."""

from __future__ import annotations

from collections.abc import Sequence


def split_layers(
    num_layers: int, num_stages: int, counts: Sequence[int] | None = None
) -> list[range]:
    """The layer range of every stage: `counts` layers each when given (they must add up to
    `num_layers`), else an even split with the remainder on the first stages."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"num_stages ({num_stages}) exceeds the model's {num_layers} layers")
    if counts:
        if len(counts) != num_stages:
            raise ValueError(
                f"layer split {list(counts)} names {len(counts)} stages, not {num_stages}"
            )
        if min(counts) < 1 or sum(counts) != num_layers:
            raise ValueError(
                f"layer split {list(counts)}: every stage needs >= 1 layer and the counts must "
                f"add up to the model's {num_layers} layers"
            )
    else:
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if i < extra else 0) for i in range(num_stages)]
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def parse_layer_split(text: str) -> list[int] | None:
    """`"10,20"` -> [10, 20]; empty -> None (even split)."""
    if not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--layer-split must be comma-separated layer counts, got {text!r}"
        ) from None
