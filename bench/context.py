"""Scenario 1 (context building vs. thread length) and the storage half of scenario 5, in-process.

The bot's way: ``RedisHistory.recent`` (newest-first pages, stored token counts) + ``build_context``.
The naive way, as most Slack GPT bots do it: load the whole thread, re-encode every message with
tiktoken, then drop the oldest until the rest fits. (A generous naive: it re-encodes each message once
and keeps a running total; re-counting the whole list after each drop would be quadratic.)
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import redis.asyncio as redis

from bench.corpus import answer, message
from bench.live import percentile
from bot.conversation import build_context, safety_margin
from bot.domain import REPLY_PRIMING_TOKENS, Role, ThreadKey, Turn
from bot.history import RedisHistory
from bot.tokens import TiktokenCounter

SYSTEM = "You are a helpful assistant in a Slack workspace. Answer clearly and concisely, in Markdown."


def make_turns(counter: TiktokenCounter, n: int, seed: int = 7) -> list[Turn]:
    rng = random.Random(seed)
    turns = []
    for i in range(n):
        role: Role = "user" if i % 2 == 0 else "assistant"
        text = message(rng) if role == "user" else answer(rng)
        name = rng.choice(["alice", "bob", "田中", "王芳"]) if role == "user" else ""
        content = f"{name}: {text}" if name else text
        turns.append(
            Turn(role, text, counter.message_tokens(role, content), counter.encoding_name, str(i), "U1", name)
        )
    return turns


def naive_context(
    raw: list[str], question: str, budget: int, counter: TiktokenCounter
) -> list[dict[str, str]]:
    """Whole thread loaded, every message re-encoded, oldest dropped until it fits."""
    messages = [{"role": "system", "content": SYSTEM}]
    for item in raw:
        data = json.loads(item)
        content = (
            f"{data['name']}: {data['text']}" if data["role"] == "user" and data["name"] else data["text"]
        )
        messages.append({"role": data["role"], "content": content})
    messages.append({"role": "user", "content": question})
    costs = [counter.count(m["role"]) + counter.count(m["content"]) + 3 for m in messages]
    total = sum(costs) + REPLY_PRIMING_TOKENS
    limit = budget - safety_margin(budget)
    while total > limit and len(messages) > 2:
        total -= costs.pop(1)
        messages.pop(1)
    return messages


def _ms(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(percentile(samples, 0.5) * 1000, 3),
        "p95_ms": round(percentile(samples, 0.95) * 1000, 3),
    }


async def run(
    client: redis.Redis, counter: TiktokenCounter, prefix: str, *, quick: bool
) -> list[dict[str, Any]]:
    history = RedisHistory(client, counter, prefix=prefix, max_turns=20_000)
    lengths = [10, 100, 1000] if quick else [10, 100, 1000, 10_000]
    rows: list[dict[str, Any]] = []
    question_text = "alice: " + message(random.Random(1))
    question = Turn(
        "user", question_text, counter.message_tokens("user", question_text), counter.encoding_name
    )
    for n in lengths:
        key = ThreadKey("TBENCH", "CBENCH", f"{n}.0")
        turns = make_turns(counter, n)
        for start in range(0, n, 1000):
            await history.seed(key, turns[start : start + 1000])
        raw_key = f"{prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:turns"
        for budget in (4000, 16000):
            bot_samples, naive_samples = [], []
            for _ in range(20 if quick else 200):
                started = time.perf_counter()
                recall = await history.recall(key, budget)
                context = build_context(SYSTEM, recall.turns, question, budget, counter, first=recall.first)
                messages = context.messages  # rendered on demand: part of the work
                bot_samples.append(time.perf_counter() - started)
            for _ in range(3 if quick else (5 if n >= 10_000 else 30)):
                started = time.perf_counter()
                naive = naive_context(await client.lrange(raw_key, 0, -1), question_text, budget, counter)
                naive_samples.append(time.perf_counter() - started)
            bot, slow = _ms(bot_samples), _ms(naive_samples)
            rows.append(
                {
                    "scenario": "1. context building",
                    "case": f"{n} messages, budget {budget}",
                    "bot_median_ms": bot["median_ms"],
                    "bot_p95_ms": bot["p95_ms"],
                    "naive_median_ms": slow["median_ms"],
                    "naive_over_bot": round(slow["median_ms"] / max(bot["median_ms"], 1e-6), 1),
                    "kept_messages": len(messages),
                    "naive_kept_messages": len(naive),
                    "goal": "bot median <= 2 ms at 10,000 messages, 16,000 tokens",
                    "met": bot["median_ms"] <= 2.0 if (n == 10_000 and budget == 16000) else None,
                }
            )
        if n == lengths[-1]:
            used = await client.memory_usage(raw_key) or 0
            chars = sum(len(t.text) for t in turns)
            rows.append(
                {
                    "scenario": "5. storage",
                    "case": f"Redis bytes per stored message ({n} messages)",
                    "bytes_per_message": round(used / n, 1),
                    "chars_per_message": round(chars / n, 1),
                    "goal": "reported",
                    "met": None,
                }
            )
    return rows
