"""The start-up profiler against a real worker process, and its disk cache."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from services.scheduler import profiler
from services.scheduler.pipeline import Pipeline
from services.scheduler.worker_link import WorkerLink
from testing.stack import ROOT

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "worker", "--model", str(tiny_model_dir),
         "--port", "0", "--num-blocks", "128", "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    ready = process.stdout.readline()  # "worker ready on HOST:PORT", or "" if it died
    assert "worker ready on" in ready, f"the worker did not start: {ready!r}"
    link = Pipeline([ready.split()[-1]])
    try:
        info = link.wait_for_info(120)
        link.open()
        yield link, info
    finally:
        link.close()
        process.terminate()
        process.wait(timeout=30)


def test_profile_is_measured_on_the_worker_then_reused_from_disk(worker, tmp_path, monkeypatch):
    link, info = worker
    profile = profiler.load_or_measure(
        link, info, max_batch_size=8, max_batched_tokens=2048, cache_dir=tmp_path
    )
    lengths = [n for n, _ in profile.prefill_s]
    assert lengths[0] == 1 and lengths[-1] == 256  # up to the context (512) the pool allows
    assert [b for b, _ in profile.decode_s] == [1, 2, 4, 8]
    # Longer prompts take longer (allowing noise between neighbours, not across the range).
    assert profile.prefill_time(256) > profile.prefill_time(1)
    assert all(t > 0 for _, t in profile.prefill_s + profile.decode_s)
    (cached,) = tmp_path.glob("*.json")
    data = json.loads(cached.read_text())
    assert data["key"]["model"] == info.model_name and data["key"]["max_batch_size"] == 8

    def must_not_measure(*args, **kwargs):
        raise AssertionError("the cached profile should have been reused")

    monkeypatch.setattr(profiler, "measure", must_not_measure)
    again = profiler.load_or_measure(
        link, info, max_batch_size=8, max_batched_tokens=2048, cache_dir=tmp_path
    )
    assert again == profile
    # A different stage layout or batch cap is a different key: measured anew.
    with pytest.raises(AssertionError, match="reused"):
        profiler.load_or_measure(
            link, info, max_batch_size=4, max_batched_tokens=2048, cache_dir=tmp_path
        )
    # So is a KV pool too small for the largest batch, whose profile stops short of it: such a
    # profile must not be reused by a stack with a full pool, nor the other way round.
    small_pool = dataclasses.replace(info, num_blocks=6)
    assert profiler.profile_key(small_pool, 8, 2048)["largest_batch"] == 2  # 3 blocks a job
    with pytest.raises(AssertionError, match="reused"):
        profiler.load_or_measure(
            link, small_pool, max_batch_size=8, max_batched_tokens=2048, cache_dir=tmp_path
        )


def test_profiling_leaves_the_worker_with_no_blocks_held(worker, tmp_path):
    from services.scheduler.core import Decision

    link, info = worker
    profiler.measure(link, info, max_batch_size=4, max_batched_tokens=512)
    result = link.execute(Decision(iteration_id=1, chunks=[], free_job_ids=[]))
    assert result.num_used_blocks == 0


def test_worker_link_follows_a_moved_worker(worker):
    """Discovery reports a replaced worker pod at a new address: the link reconnects there."""
    from services.scheduler.discovery import StaticDiscovery

    _, info = worker
    real_address = worker[0].addresses[0]
    link = WorkerLink("127.0.0.1:1")  # where the old pod was: nothing listens
    discovery = StaticDiscovery([real_address], None)
    discovery.subscribe(lambda found: link.retarget(found.worker_addresses.get(0)))
    link.retarget(discovery.worker_addresses()[0])
    link.open()
    assert link.address == real_address
    assert link.wait_for_info(10).num_blocks == info.num_blocks
    link.close()


def test_a_point_slower_than_a_larger_one_is_lowered_to_it():
    """Noise (another process on the cores) must not make a short prompt look dearer than a
    long one; real growth is kept."""
    measured = [(1, 0.029), (16, 0.019), (64, 0.015), (256, 0.026)]
    assert profiler.non_decreasing(measured) == ((1, 0.015), (16, 0.015), (64, 0.015), (256, 0.026))
    growing = [(1, 0.01), (2, 0.02), (4, 0.03)]
    assert profiler.non_decreasing(growing) == tuple(growing)
