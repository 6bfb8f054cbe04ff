"""Scenario 8: what rolling summaries cost in a long thread, and whether they slow replies.

The same thread, one follow-up at a time (each after the previous answer finished), to the bot as its
own process with ``SUMMARIES=on`` and then ``off``, under a small prompt budget so that older turns are
left out early. Reported: the summarizer's calls and tokens per 100 stored turns, and each reply's
latency (question sent -> answer finished) on and off.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from bench.corpus import answer, message
from bench.live import LiveBot, percentile
from bot.summaries import SUMMARIZER_PROMPT
from bot.tokens import TiktokenCounter
from tests.fake_model import Reply

PROMPT_BUDGET = "1500"
SUMMARIZER_OPENING = SUMMARIZER_PROMPT.split("{", 1)[0]


def _is_summarizer(request: dict[str, Any]) -> bool:
    messages = request.get("messages") or [{}]
    return str(messages[0].get("content", "")).startswith(SUMMARIZER_OPENING)


async def _thread(redis_url: str, prefix: str, summaries: str, follow_ups: int) -> tuple[list[float], Any]:
    """Latencies of each follow-up's answer (ms), and the bot's model requests."""
    rng = random.Random(11)
    async with LiveBot(
        redis_url, prefix, SUMMARIES=summaries, MAX_PROMPT_TOKENS=PROMPT_BUDGET, SUMMARY_MAX_TOKENS="300"
    ) as bot:
        bot.model.default_reply = Reply(text=answer(rng), chunk_size=40, first_token_delay=0.05)
        await bot.send("CLONG", "warm up")
        await bot.replies(1, 30)
        root = bot.slack.calls_to("chat.startStream")[0].args["thread_ts"]
        latencies = []
        for n in range(follow_ups):
            _, at = await bot.send("CLONG", message(rng), thread_ts=root, mention=False)
            await bot.replies(n + 2, 60)
            finished = bot.last_write("CLONG", at)
            assert finished is not None
            latencies.append((finished - at) * 1000)
        await asyncio.sleep(1.0)  # the last reply's summary, written after it
        return latencies, list(bot.model.requests)


async def run(redis_url: str, prefix: str, counter: TiktokenCounter, *, quick: bool) -> list[dict[str, Any]]:
    follow_ups = 20 if quick else 150
    on, requests = await _thread(redis_url, prefix + "s1:", "on", follow_ups)
    off, _ = await _thread(redis_url, prefix + "s0:", "off", follow_ups)
    summarizer = [r for r in requests if _is_summarizer(r)]
    prompt_tokens = sum(
        counter.message_tokens(m["role"], str(m["content"])) for r in summarizer for m in r["messages"]
    )
    turns = 2 * (follow_ups + 1)
    per_100 = 100 / turns
    p50_on, p50_off = percentile(on, 0.5), percentile(off, 0.5)
    return [
        {
            "scenario": "8. long threads",
            "case": f"summarizer cost, a {turns}-turn thread, MAX_PROMPT_TOKENS={PROMPT_BUDGET}",
            "calls_per_100_turns": round(len(summarizer) * per_100, 1),
            "prompt_tokens_per_100_turns": round(prompt_tokens * per_100),
            "summarizer_prompt_tokens_max": max(
                (
                    sum(counter.message_tokens(m["role"], str(m["content"])) for m in r["messages"])
                    for r in summarizer
                ),
                default=0,
            ),
            "goal": "reported",
            "met": None,
        },
        {
            "scenario": "8. long threads",
            "case": "reply latency, summaries on vs off (50 ms model)",
            "samples": len(on),
            "on_p50_ms": round(p50_on, 1),
            "off_p50_ms": round(p50_off, 1),
            "on_p95_ms": round(percentile(on, 0.95), 1),
            "off_p95_ms": round(percentile(off, 0.95), 1),
            "goal": "p50 on <= p50 off + 10%",
            "met": p50_on <= p50_off * 1.1 if not quick else None,
        },
    ]
