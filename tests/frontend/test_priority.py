"""Priority classes at the frontend: the class a request asks for, capped by what its API key
may use, reaches the scheduler in the Submit and is reported back (HTTP headers, gRPC fields on
the last message, the SDK's Completion)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from services.frontend.auth import ApiKeys, parse_key
from services.frontend.generation import GenerationCore
from services.frontend.priority import Granted, PriorityRules
from tests.frontend.holding_scheduler import holding_stack
from tests.frontend.test_token_streaming import ids_of

WORDS = ("Hello", " world")
GOLD, SILVER = "gold-key", "silver-key"
# Three classes; a request that asks for none runs in class 1; a key that names no
# top-priority (and anyone, when keys are off) may use class 1 at best.
SETTINGS = ("--priority-classes", "3", "--default-priority", "1", "--top-priority", "1")
KEYS = ("--api-key", f"{GOLD} top-priority=0", "--api-key", SILVER)


def test_the_class_is_what_was_asked_within_the_classes_and_the_callers_right():
    rules = PriorityRules(num_classes=3, default=1, top=1)
    assert rules.grant(None) == Granted(1, capped=False)  # the default
    assert rules.grant(2) == Granted(2, capped=False)  # a lower class: anyone may
    assert rules.grant(9) == Granted(2, capped=False)  # past the last class: the last
    assert rules.grant(0) == Granted(1, capped=True)  # above the right: capped, and said
    assert rules.grant(-5) == Granted(1, capped=True)
    assert rules.grant(0, key_top=0) == Granted(0, capped=False)  # a key with the right
    assert rules.grant(None, key_top=0) == Granted(1, capped=False)  # the default is not raised
    one = PriorityRules()  # the default deployment: one class, nothing changes
    assert {one.grant(p) for p in (None, 0, 1, 7)} == {Granted(0, capped=False)}


def test_settings_that_name_no_class_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="--default-priority"):
        PriorityRules(num_classes=2, default=2)
    with pytest.raises(ValueError, match="--top-priority"):
        PriorityRules(num_classes=2, top=-1)
    with pytest.raises(ValueError, match="--priority-classes"):
        PriorityRules(num_classes=17)
    with pytest.raises(ValueError, match="top-priority"):
        GenerationCore.check_settings(PriorityRules(num_classes=2), ApiKeys(["k top-priority=2"]))
    with pytest.raises(ValueError, match="unknown option"):
        parse_key("k priority=0")
    assert parse_key("k top-priority=3") == ("k", 3)
    assert ApiKeys([f"{GOLD} top-priority=0", SILVER]).top_priority(f"Bearer {GOLD}") == 0
    assert ApiKeys([f"{GOLD} top-priority=0", SILVER]).top_priority(f"Bearer {SILVER}") is None
    assert ApiKeys([f"{GOLD} top-priority=0"]).allows(f"Bearer {GOLD}")


def test_http_and_grpc_send_the_granted_class_and_say_when_it_was_capped(model):
    ids = ids_of(model, *WORDS)

    async def main() -> None:
        async with holding_stack(model, *SETTINGS, *KEYS) as (scheduler, _, http, channel):
            stub = generation_pb2_grpc.GenerationStub(channel)
            asks = [  # (key, priority asked for or None, class expected, capped)
                (GOLD, 0, 0, False),
                (SILVER, 0, 1, True),
                (SILVER, None, 1, False),
                (SILVER, 2, 2, False),
            ]
            for n, (key, asked, granted, capped) in enumerate(asks):
                headers = {"Authorization": f"Bearer {key}"}
                body = {"prompt": "Say:", "max_tokens": 2, "stream": n % 2 == 0}
                if asked is not None:
                    body["priority"] = asked
                response = asyncio.ensure_future(
                    http.post("/v1/completions", json=body, headers=headers)
                )
                (job_id, *_) = (await scheduler.wait_for_submits(2 * n + 1))[-1:]
                assert scheduler.submits[-1].priority == granted
                scheduler.release(job_id, ids)
                async with await response as reply:
                    assert reply.status == 200
                    assert reply.headers["X-FastServe-Priority"] == str(granted)
                    assert ("X-FastServe-Priority-Capped" in reply.headers) is capped
                    await reply.read()

                request = pb.GenerateRequest(prompt="Say:", max_tokens=2)
                if asked is not None:
                    request.priority = asked
                call = stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),))
                job_id = (await scheduler.wait_for_submits(2 * n + 2))[-1]
                assert scheduler.submits[-1].priority == granted
                scheduler.release(job_id, ids)
                last = [r async for r in call][-1]
                assert (last.priority, last.priority_capped) == (granted, capped)

            async with http.get("/metrics") as reply:
                text = await reply.text()
            counts = {
                (s.labels["priority"], s.labels["capped"]): s.value
                for family in text_string_to_metric_families(text)
                if family.name == "fastserve_priority_requests"
                for s in family.samples
                if s.name.endswith("_total")
            }
            # Two of each row of `asks`, one over HTTP, one over gRPC.
            assert counts == {
                ("0", "false"): 2,
                ("1", "true"): 2,
                ("1", "false"): 2,
                ("2", "false"): 2,
            }
            ttft = {
                s.labels["priority"]: s.value
                for family in text_string_to_metric_families(text)
                if family.name == "fastserve_priority_time_to_first_token_seconds"
                for s in family.samples
                if s.name.endswith("_count")
            }
            assert ttft == {"0": 2, "1": 4, "2": 2}

    asyncio.run(main())


def test_without_classes_a_priority_changes_nothing(model):
    ids = ids_of(model, *WORDS)

    async def main() -> None:
        async with holding_stack(model) as (scheduler, _, _http, channel):
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.Generate(pb.GenerateRequest(prompt="Say:", max_tokens=2, priority=5))
            job_id = (await scheduler.wait_for_submits(1))[0]
            assert scheduler.submits[0].priority == 0
            scheduler.release(job_id, ids)
            last = [r async for r in call][-1]
            assert (last.priority, last.priority_capped) == (0, False)

    asyncio.run(main())


def test_a_key_that_names_a_missing_class_stops_the_frontend_at_start(model):
    async def main() -> None:
        with pytest.raises(ValueError, match="top-priority"):
            async with holding_stack(model, "--api-key", "k top-priority=4"):
                pass

    asyncio.run(main())
