"""The scheduler's configuration: limits, and what happens to the KV of a job whose device
blocks are needed (the KV policy)."""

from __future__ import annotations

from dataclasses import dataclass

# "recompute" drops a preempted job's KV (vLLM); "reactive" swaps it to the kvstore and back
# when a batch needs it; "proactive" also swaps out ahead of need to keep `reserve_blocks`
# free, and prefetches the jobs expected to run soonest (smallest ENST).
KV_POLICIES = ("proactive", "reactive", "recompute")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int  # device KV blocks per stage
    block_size: int  # tokens per block
    max_model_len: int  # longest prompt + output
    max_batch_size: int = 16  # jobs per iteration (the paper caps it at 16)
    max_batched_tokens: int = 2048  # tokens per iteration (prefill chunks + decodes)
    # A job that cannot get KV blocks is skipped and lower-priority jobs fill the batch
    # (backfill); False stops batch formation at it, as the paper's code does.
    backfill: bool = True
    kv_policy: str = "recompute"  # one of KV_POLICIES; swapping needs swap_enabled
    swap_enabled: bool = False  # the workers have a kvstore
    reserve_blocks: int = 0  # free blocks proactive management keeps for new arrivals
    block_bytes: int = 0  # bytes of one block on one stage (for swap costs)
    swap_cost_scale: float = 1.0  # 0: always swap rather than recompute (tests, benchmarks)
    # Share the KV of full blocks whose tokens (and everything before them) jobs have in
    # common; the salt names what else fixes a block's content (model, stage layout).
    prefix_caching: bool = False
    prefix_cache_salt: str = ""
    # Host tier: cached blocks evicted from the device kept in the kvstore (this many at most;
    # 0: off; needs swap_enabled) and read back for jobs whose prefix is there.
    host_cache_blocks: int = 0
    # Async decoding (one pipeline stage): a decoding job's next step is scheduled while its
    # current step runs; the worker feeds it the token it has just sampled (its chunk says
    # `from_last_sample`), so the next step starts without waiting for the scheduler.
    async_decode: bool = False

    def __post_init__(self) -> None:
        sizes = {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "max_model_len": self.max_model_len,
            "max_batch_size": self.max_batch_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_batched_tokens < self.max_batch_size:
            raise ValueError("max_batched_tokens must be >= max_batch_size")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}")
        if self.host_cache_blocks < 0:
            raise ValueError("host_cache_blocks must be >= 0")
        if not 0 <= self.reserve_blocks < self.num_blocks:
            raise ValueError("reserve_blocks must be in [0, num_blocks)")

    @property
    def swaps(self) -> bool:
        return self.swap_enabled and self.kv_policy != "recompute"

    @property
    def host_cache(self) -> bool:
        return self.prefix_caching and self.swap_enabled and self.host_cache_blocks > 0

    @property
    def proactive(self) -> bool:
        return self.swaps and self.kv_policy == "proactive"
