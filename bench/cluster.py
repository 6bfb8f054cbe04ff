"""Scenario 10: the bot on a Redis Cluster beside a single server, in one run.

The cluster is the tests' (``tests/procs.py``: three primaries on loopback, no replicas), on the same
two cores as everything else. For each Redis: replies per second for 1,000 mentions with an instant
model, and the overhead of 100 steady conversations with a 1-second model (event to last write, minus
the model's time), as scenarios 3 and 2 measure them.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from bench.corpus import answer
from bench.live import Conversations, LiveBot, model_beyond_nominal, overheads, percentile, replies_per_second
from bot.tokens import TiktokenCounter
from tests.fake_model import Reply
from tests.procs import PrivateRedisCluster

STEADY = Reply(text=answer(random.Random(5)), chunk_size=40, first_token_delay=1.0)


async def run(redis_url: str, prefix: str, counter: TiktokenCounter, *, quick: bool) -> list[dict[str, Any]]:
    cluster = PrivateRedisCluster(Path(tempfile.mkdtemp(prefix="sgb-bench-cluster-")))
    cluster.start()
    rows = []
    count, concurrency, turns = (100, 10, 3) if quick else (1000, 100, 6)
    try:
        for n, (kind, url, env) in enumerate(
            [
                ("single server", redis_url, {}),
                ("cluster of 3 primaries", cluster.url, {"REDIS_CLUSTER": "true"}),
            ]
        ):
            async with LiveBot(url, f"{prefix}k{n}:", **env) as bot:
                rate = await replies_per_second(bot, count)
                bot.model.default_reply = Reply(
                    text=answer(random.Random(5)), chunk_size=40, first_token_delay=1.0
                )
                replies = await Conversations(bot).steady(counter, "CK", concurrency, turns, 1.0)
            samples = overheads(replies)
            rows.append(
                {
                    "scenario": "10. redis cluster",
                    "case": kind,
                    "replies_per_s": round(rate.replies_per_s, 1),
                    "cpu_ms_bot": rate.cpu_ms_bot,
                    "cpu_ms_redis": rate.cpu_ms_redis,
                    f"overhead_p50_ms_{concurrency}_steady": round(percentile(samples, 0.5) * 1000, 2),
                    f"overhead_p99_ms_{concurrency}_steady": round(percentile(samples, 0.99) * 1000, 2),
                    **model_beyond_nominal(replies),
                    "goal": "reported beside each other",
                    "met": None,
                }
            )
    finally:
        cluster.stop()
    return rows
