"""Scenario 6, jobs and workers: the queue hop, and replies/s and overhead with 1 and 2 worker processes.

Every configuration runs in the same bench run, side by side, against the same fakes and Redis: the bot
before (``--before REV``: a checkout of an earlier commit, when given), in one process and with one worker
process, the bot now in one process (ingress and worker), and the ingress with 1 and with 2 worker
processes (``run --workers N``).
The queue hop is read from the worker's own log: each job's "ms in the queue", from the ingress queueing
it (just before its ack) to a worker starting on it.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from bench.corpus import answer
from bench.live import (
    Conversations,
    LiveBot,
    model_beyond_nominal,
    overheads,
    percentile,
    replies_per_second,
)
from bot.tokens import TiktokenCounter
from tests.fake_model import Reply

OVERHEAD_GOAL = "overhead p50 <= 10 ms, p99 <= 40 ms at 100 steady threads (1 s model)"


def overhead_met(samples: list[float]) -> bool:
    return percentile(samples, 0.5) <= 0.010 and percentile(samples, 0.99) <= 0.040


_QUEUED = re.compile(r"job started: attempt 1, ([\d.]+) ms in the queue")


def queue_waits(log: str) -> list[float]:
    """Each job's time in the queue (seconds), from a bot's JSON log."""
    waits = []
    for line in log.splitlines():
        if line.startswith("{") and (match := _QUEUED.search(json.loads(line).get("message", ""))):
            waits.append(float(match.group(1)) / 1000)
    return waits


async def queue_hop(redis_url: str, prefix: str, *, quick: bool) -> list[dict[str, Any]]:
    """Mentions one after the other (an instant model), each in a worker process: queued -> started."""
    count, warm_up = (20, 5) if quick else (200, 5)
    async with LiveBot(redis_url, prefix + "h:", "--workers", "1", LOG_FORMAT="json") as bot:
        bot.model.default_reply = Reply(text="Short answer.", chunk_size=20)
        for i in range(warm_up + count):  # the first ones wait for the worker process to start
            await bot.send(f"CH{i}", "one at a time")
            await bot.replies(i + 1, 30)
        waits = queue_waits(bot.log_path.read_text())[warm_up:]
    p50 = percentile(waits, 0.5)
    return [
        {
            "scenario": "6. jobs",
            "case": "queue hop: queued (before the ack) -> a worker process starts on it",
            "samples": len(waits),
            "p50_ms": round(p50 * 1000, 2),
            "p99_ms": round(percentile(waits, 0.99) * 1000, 2),
            "goal": "p50 <= 2 ms",
            "met": p50 <= 0.002,
        }
    ]


async def scaling(
    redis_url: str, prefix: str, counter: TiktokenCounter, *, quick: bool, before: Path | None
) -> list[dict[str, Any]]:
    """Replies/s (instant model) and steady overhead at 100 threads (1 s model), per configuration."""
    one_worker, two_workers = ("--workers", "1"), ("--workers", "2")
    configs: list[tuple[str, tuple[str, ...], Path | None]] = []
    if before is not None:
        # With one worker process too: the goal's shape, so that this run's machine is judged beside it.
        configs += [
            ("before, one process", (), before),
            ("before, ingress + 1 worker process", one_worker, before),
        ]
    configs += [
        ("one process (ingress and worker)", (), None),
        ("ingress + 1 worker process", one_worker, None),
        ("ingress + 2 worker processes", two_workers, None),
    ]
    count, concurrency, turns = (100, 5, 1) if quick else (1000, 100, 6)
    rows, rates, spent = [], {}, {}
    for number, (name, args, source) in enumerate(configs):
        async with LiveBot(redis_url, f"{prefix}s{number}:", *args, source=source) as bot:
            throughput = await replies_per_second(bot, count)
            bot.model.default_reply = Reply(
                text=answer(random.Random(5)), chunk_size=40, first_token_delay=1.0
            )
            # Follow-ups mention the bot: the bot before the queue kept participation elsewhere.
            replies = await Conversations(bot, mention=True).steady(counter, "CS", concurrency, turns, 1.0)
        samples = overheads(replies)
        if source is None:  # the ratio and the ceiling below are this bot's, whatever ran before it
            rates[args] = throughput.replies_per_s
            spent[args] = throughput.cpu_ms_total
        rows.append(
            {
                "scenario": "6. jobs",
                "case": name,
                "replies_per_s": round(throughput.replies_per_s, 1),
                "cpu_ms_per_reply_bot": throughput.cpu_ms_bot,
                "cpu_ms_per_reply_workers": throughput.cpu_ms_workers,
                "cpu_ms_per_reply_fakes": throughput.cpu_ms_bench,
                "cpu_ms_per_reply_redis": throughput.cpu_ms_redis,
                f"overhead_p50_ms_at_{concurrency}": round(percentile(samples, 0.5) * 1000, 2),
                f"overhead_p99_ms_at_{concurrency}": round(percentile(samples, 0.99) * 1000, 2),
                **model_beyond_nominal(replies),
                "goal": OVERHEAD_GOAL if args else "reported",
                "met": overhead_met(samples) if args and source is None and not quick else None,
            }
        )
    ratio = rates[two_workers] / rates[one_worker]
    # What this machine allows: its cores divided by the CPU every process (bot, fakes, Redis) spent per
    # reply with two workers. Two cores hold the ingress, both workers, the fakes and Redis, so the
    # ratio cannot pass this, however well the workers share the queue.
    ceiling = (os.cpu_count() or 1) * 1000 / spent[two_workers] / rates[one_worker]
    rows.append(
        {
            "scenario": "6. jobs",
            "case": "2 worker processes over 1, replies/s",
            "ratio": round(ratio, 2),
            "machine_ceiling_ratio": round(ceiling, 2),
            "goal": ">= 1.7x",
            "met": ratio >= 1.7 if not quick else None,
        }
    )
    return rows
