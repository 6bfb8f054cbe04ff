"""End to end, what an operator relies on: health and readiness probes, Prometheus metrics, a burst far
larger than the pool, and ``run --workers N`` supervising its worker processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import Harness
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID
from tests.procs import BotProcess, PrivateRedis, free_port, probe, scrape, until_ready


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_probes_and_metrics_follow_the_bot(harness: Harness, tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    port = free_port()
    harness.model.script(Reply(text="hello", prompt_tokens=40, completion_tokens=2), Reply(status=500))
    try:
        async with harness.running(metrics_port=port, redis_url=server.url):
            assert await probe(port, "/healthz") == (200, {"status": "alive"})
            ready = await until_ready(port)
            assert ready["checks"] == {"redis": True, "worker": True, "slack": True}
            before = await scrape(port)
            harness.slack.fail_http("chat.startStream", 500)  # tried again, after looking for it
            ts = await harness.say("hi")
            await harness.say(f"<@{BOT_USER_ID}> hi", ts=ts, mention=False, event_type="message")  # its twin
            await harness.replies_done(1)
            await harness.say("again", thread_ts=ts)  # the model fails this one
            await harness.replies_done(2)
            await asyncio.sleep(0.2)
            after = await scrape(port)
            server.stop()
            status, unready = await probe(port, "/readyz")
            assert status == 503 and unready["checks"]["redis"] is False  # type: ignore[index]
            server.start()
    finally:
        server.stop()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sgb_events_received_total") == 3
    assert moved("sgb_events_acked_total") == 3
    assert moved("sgb_events_duplicate_total") == 1
    assert moved("sgb_jobs_queued_total") == 2
    assert moved("sgb_jobs_done_total") == 2
    assert moved("sgb_queue_wait_seconds_count") == 2
    assert moved("sgb_reply_duration_seconds_count") == 2
    assert moved("sgb_time_to_first_token_seconds_count") == 1
    assert moved("sgb_model_errors_total", kind="unavailable") == 1
    assert moved("sgb_slack_api_errors_total", method="chat.startStream") == 1
    assert moved("sgb_tokens_total", kind="prompt") == 40
    assert moved("sgb_tokens_total", kind="completion") == 2
    assert value(after, "sgb_jobs_in_flight") == value(after, "sgb_jobs_waiting") == 0


async def test_a_burst_far_larger_than_the_pool_is_answered_in_full(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    count = 2500
    harness.model.default_reply = Reply(text="ok")
    caplog.set_level(logging.WARNING, logger="bot")
    async with harness.running(stream_mode="off"):
        await asyncio.gather(*(harness.say(f"burst {i}", channel=f"CB{i}") for i in range(count)))
        await harness.slack.wait_for(
            lambda: len(harness.slack.calls_to("chat.postMessage")) >= count, 100, f"{count} answers"
        )
    posts = harness.slack.calls_to("chat.postMessage")
    assert len(posts) == count
    assert {p.args["text"] for p in posts} == {"ok"}  # each posted whole, its feedback buttons with it
    assert len(harness.slack.calls_to("chat.update")) == 0
    assert len({p.args["channel"] for p in posts}) == count
    assert [
        r.getMessage() for r in caplog.records if r.name.startswith("bot")
    ] == []  # no lock or pool trouble


async def test_run_with_workers_supervises_them_and_restarts_one_that_dies(
    harness: Harness, tmp_path: Path
) -> None:
    port = free_port(2)  # the ingress's metrics port, and its worker's after it
    harness.model.default_reply = Reply(text="answered")
    bot = await BotProcess(
        harness.env(), "run", "--workers", "1", "--metrics-port", str(port), cwd=tmp_path
    ).start()
    try:
        await harness.slack.wait_for(lambda: harness.slack.connected, 30, "the ingress")
        await harness.slack.wait_for(lambda: len(bot.children()) == 1, 30, "its worker")
        (first,) = bot.children()
        ts = await harness.say("one")
        await harness.slack.wait_for(lambda: harness.answers() == ["answered"], 30, "an answer")
        os.kill(first, signal.SIGKILL)
        await harness.slack.wait_for(lambda: bot.children() not in ([], [first]), 30, "a new worker")
        await harness.say("two", thread_ts=ts)
        await harness.slack.wait_for(lambda: harness.answers() == ["answered"] * 2, 30, "a second answer")
        ready = await until_ready(port)
        assert ready["checks"] == {"redis": True, "workers": True, "slack": True}
    finally:
        await bot.stop()
    assert bot.process is not None and bot.process.returncode == 0
    assert "exited with -9; starting it again" in bot.log()
