"""Automatic prefix caching end to end: prompts that share 0, 1, many and all-but-one blocks,
arriving one after another and together, give transformers' greedy output and the output of a
stack without the cache; usage reports the cached prompt tokens (OpenAI, streamed, gRPC); and the
same holds under preemption with swapping, across two pipeline stages, and when the worker dies
(its cache dies with it: jobs recompute)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastserve_client import Client
from services.frontend.tokenizer import encode_prompt
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.stack import Stack

pytestmark = [pytest.mark.e2e]

BLOCK = 16  # the worker's default block size
MAX_TOKENS = 6
WORDS = ["the", "sea", "is", "wide", "and", "deep", "under", "a", "grey", "sky", "where", "birds"]
WARM = " ".join(f"{WORDS[k % len(WORDS)]} {k}" for k in range(60))  # some six blocks


def shared_blocks(a: list[int], b: list[int]) -> int:
    """Full blocks two prompts have in common from the start."""
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common // BLOCK


def cases(tokenizer) -> dict[str, tuple[str, int]]:
    """Prompts that share 0, 1, many and all-but-one blocks with WARM, and the prompt tokens
    each should find cached once WARM ran (at least its last token is computed)."""
    warm = encode_prompt(tokenizer, WARM)
    words = WARM.split()

    def cut(num_blocks: int) -> str:  # WARM's first words, sharing exactly num_blocks blocks
        for n in range(len(words)):
            text = " ".join(words[:n]) + " and then something else entirely"
            if shared_blocks(encode_prompt(tokenizer, text), warm) == num_blocks:
                return text
        raise AssertionError(f"no prefix of WARM shares {num_blocks} blocks")

    found = {
        "none": "an unrelated question about mountains and rivers " * 3,
        "one block": cut(1),
        "many blocks": cut(4),
        "all but one block": WARM,
    }
    result = {}
    for name, text in found.items():
        ids = encode_prompt(tokenizer, text)
        cached = min(shared_blocks(ids, warm), (len(ids) - 1) // BLOCK) * BLOCK
        result[name] = (text, cached)
    assert [c for _, c in result.values()][:2] == [0, BLOCK]
    assert result["many blocks"][1] == 4 * BLOCK
    assert result["all but one block"][1] == (len(warm) - 1) // BLOCK * BLOCK >= 4 * BLOCK
    return result


def http_address(stack: Stack) -> str:
    for line in stack.output:
        if match := re.search(r"HTTP http://(\S+)", line):
            return match.group(1)
    raise AssertionError("no HTTP address in the ready line")


def complete_http(stack: Stack, text: str, stream: bool = False) -> tuple[str, dict]:
    """Text and usage of one greedy OpenAI completion (streamed with usage, or not)."""
    body = {"model": stack.model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        f"http://{stack.http}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read().decode()
    if not stream:
        answer = json.loads(raw)
        return answer["choices"][0]["text"], answer["usage"]
    text, usage = "", None
    for line in raw.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            text += "".join(choice["text"] for choice in chunk["choices"])
            usage = chunk.get("usage") or usage
    return text, usage


def complete(stack: Stack, text: str, max_tokens: int = MAX_TOKENS):
    with Client(stack.address, timeout=120) as client:
        return client.complete(text, max_tokens=max_tokens, temperature=0, ignore_eos=True)


def start(model_dir: Path, *flags: str) -> Stack:
    stack = Stack.start(model_dir, "--http-port", "0", *flags)
    stack.http = http_address(stack)
    stack.model = model_dir.name
    return stack


def check_exact(model, tokenizer, outputs: dict[str, list[int]], texts: dict[str, str]) -> None:
    for name, tokens in outputs.items():
        prompt_ids = encode_prompt(tokenizer, texts[name])
        assert_greedy_matches(model, prompt_ids, tokens, hf_greedy(model, prompt_ids, len(tokens)))


def test_shared_prefixes_are_exact_reported_and_counted(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer
):
    expected = cases(tiny_tokenizer)
    texts = {name: text for name, (text, _) in expected.items()}
    together = {f"t{i}": WARM + f" and question {i}" for i in range(4)}
    stack = start(tiny_model_dir)
    try:
        warm = complete(stack, WARM + " first")
        apart = {name: complete(stack, text) for name, text in texts.items()}
        with ThreadPoolExecutor(4) as pool:
            replies = pool.map(lambda t: complete(stack, t), together.values())
            at_once = dict(zip(together, replies, strict=True))
        http_text, http_usage = complete_http(stack, WARM)
        streamed_text, streamed_usage = complete_http(stack, WARM, stream=True)
        with urllib.request.urlopen(f"http://{stack.http}/metrics", timeout=30) as response:
            metrics = response.read().decode()
    finally:
        assert stack.stop() == 0
    plain = start(tiny_model_dir, "--no-prefix-cache")
    try:
        complete(plain, WARM + " first")
        uncached = {name: complete(plain, text) for name, text in texts.items()}
    finally:
        assert plain.stop() == 0

    assert warm.usage.cached_prompt_tokens == 0
    for name, (_, cached) in expected.items():
        assert apart[name].usage.cached_prompt_tokens == cached, name
        assert uncached[name].usage.cached_prompt_tokens == 0, name
        assert apart[name].token_ids == uncached[name].token_ids, name
    check_exact(tiny_hf_model, tiny_tokenizer, {n: r.token_ids for n, r in apart.items()}, texts)
    check_exact(
        tiny_hf_model, tiny_tokenizer, {n: r.token_ids for n, r in at_once.items()}, together
    )
    assert all(r.usage.cached_prompt_tokens >= 4 * BLOCK for r in at_once.values())
    all_but_one = expected["all but one block"][1]
    assert http_usage["prompt_tokens_details"]["cached_tokens"] == all_but_one
    assert streamed_usage["prompt_tokens_details"]["cached_tokens"] == all_but_one
    assert http_text == streamed_text == apart["all but one block"].text
    hits = re.search(
        r'fastserve_scheduler_prefix_cache_hit_tokens_total\{tier="device"\} (\S+)', metrics
    )
    assert hits and float(hits.group(1)) >= sum(c for _, c in expected.values())


def run_concurrently(
    stack: Stack, texts: list[str], pause=None, max_tokens: int = MAX_TOKENS
) -> list[list[int]]:
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = [pool.submit(complete, stack, t, max_tokens) for t in texts]
        if pause is not None:
            pause()
        return [f.result().token_ids for f in futures]


PRESSURE = ("--kv-blocks", "20", "--max-batch-size", "3", "--swap-cost-scale", "0",
            "--reserve-blocks", "2")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["swapping", "two stages", "worker restart"])
def test_shared_prefixes_stay_exact_under_pressure(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer, setting
):
    words = WARM.split()
    own = [" ".join(f"case {i} item {k}" for k in range(20)) for i in range(9)]
    texts = [" ".join(words[: 20 + 12 * (i % 4)]) + " " + own[i] for i in range(9)]
    flags = {"swapping": PRESSURE, "two stages": (*PRESSURE, "--stages", "2")}.get(setting, ())
    stack = start(tiny_model_dir, *flags)
    pause = None
    if setting == "worker restart":

        def pause() -> None:
            def worker_pid() -> int:
                for pid in stack.child_pids():
                    if "worker" in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
                        return pid
                raise AssertionError("no worker")

            # Once the rush runs (they take 40 tokens each: long enough to be killed mid-way).
            stack.wait_for_stats(lambda s: s["running_jobs"] > 0, timeout_s=60)
            os.kill(worker_pid(), signal.SIGKILL)

    try:
        complete(stack, WARM)  # the shared prefix is cached before the rush
        max_tokens = 40 if setting == "worker restart" else MAX_TOKENS
        outputs = run_concurrently(stack, texts, pause, max_tokens)
        stats = stack.wait_until_idle()
    finally:
        assert stack.stop() == 0
    check_exact(
        tiny_hf_model,
        tiny_tokenizer,
        {str(i): tokens for i, tokens in enumerate(outputs)},
        {str(i): text for i, text in enumerate(texts)},
    )
    assert stats.samples("prefix_cache_hit_tokens")[0][1] > 0
    if setting == "worker restart":
        assert stats["recomputed_jobs"] > 0
    else:
        assert stats["swapped_out_jobs"] > 0 or stats["recomputed_jobs"] > 0  # under pressure


def host_hits(stats) -> float:
    return sum(
        v for labels, v in stats.samples("prefix_cache_hit_tokens") if labels["tier"] == "host"
    )


def child_pid(stack: Stack, role: str) -> int:
    for pid in stack.child_pids():
        if role in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
            return pid
    raise AssertionError(f"no {role}")


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_an_evicted_prefix_comes_back_from_the_kvstore_or_is_recomputed(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer, stages
):
    """WARM's blocks, pushed off the device by a prompt that needs the whole pool, are kept in
    the kvstore and read back for the next prompt that starts with WARM; after the kvstore
    restarts, the same is recomputed, exactly, and nothing fails."""
    words = []
    while len(encode_prompt(tiny_tokenizer, " ".join(words))) < 270:  # of a 320-token pool
        words.append(f"filler{len(words)}")
    filler = " ".join(words)
    texts = {"again": WARM + " once more", "after restart": WARM + " and after the restart"}
    flags = ("--kv-blocks", "20", "--swap-cost-scale", "0", "--stages", str(stages))
    stack = start(tiny_model_dir, *flags)
    try:
        complete(stack, WARM)
        complete(stack, filler)
        stats = stack.wait_for_stats(lambda s: s["kv_blocks_host_cached"] > 0, timeout_s=30)
        assert stats["kv_blocks_host_cached"] > 0
        again = complete(stack, texts["again"])
        loaded = host_hits(stack.wait_until_idle())
        complete(stack, filler + " again")  # WARM's blocks go to the kvstore once more
        stack.wait_for_stats(lambda s: s["swaps_in_flight"] == 0, timeout_s=30)
        os.kill(child_pid(stack, "kvstore"), signal.SIGKILL)  # the launcher starts a new one
        time.sleep(2)
        after = complete(stack, texts["after restart"])
        final = stack.wait_until_idle()
    finally:
        assert stack.stop() == 0
    assert loaded >= 4 * BLOCK
    assert again.usage.cached_prompt_tokens >= loaded
    check_exact(
        tiny_hf_model,
        tiny_tokenizer,
        {"again": again.token_ids, "after restart": after.token_ids},
        texts,
    )
    # After the restart WARM's copies were gone: the load failed and the job computed them.
    assert final["swap_failures"] > 0
    assert host_hits(final) >= loaded  # a failed load is not counted as a hit
