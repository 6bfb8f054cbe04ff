"""Scenario 9, load: the CPU one reply costs a worker process, where that CPU goes, and a burst.

- CPU per reply: a worker process of its own (``run --workers 1``) answers mentions with an instant
  model; its CPU time over the replies it gave, and replies/s. While it runs, py-spy (when installed)
  samples the worker while it holds the GIL, and the share of its own time in each package is reported
  beside the figure (sampling costs the worker a little: the CPU figure of that run is a bit higher).
- Burst: 2,500 mentions arrive at the same instant; every one must be answered, with no warning or
  error in the bot's log (a Redis pool timing out, a thread lock not renewed): the job queue, not
  failures, absorbs the burst, so the figure that grows is the queue wait.

With ``before`` (another checkout of the bot), each case also runs that one, side by side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.jobs import queue_waits
from bench.live import LiveBot, Throughput, percentile, replies_per_second
from tests.fake_model import Reply

CPU_GOAL_MS = 3.0
RATE_GOAL = 250.0
_FRAME_FILE = re.compile(r"\(([^():]+):\d+\)$")


def package_of(frame: str) -> str:
    """The package (or the standard library's module) a py-spy frame ``function (path:line)`` is in."""
    match = _FRAME_FILE.search(frame)
    path = match.group(1) if match else frame
    if path.startswith("bot/"):
        return "bot (its own code)"
    top = path.split("/", 1)[0].removesuffix(".py")
    return top or "(native)"


def own_time_by_package(raw: str, top: int = 8) -> str:
    """py-spy's raw output (``frame;frame;... count`` per line) as "package share%, ..." of own time."""
    own: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            own[package_of(stack.rsplit(";", 1)[-1])] += int(count)
    total = sum(own.values())
    if not total:
        return "no samples"
    return ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in own.most_common(top))


@contextlib.asynccontextmanager
async def profiled(pid: int, seconds: int, into: dict[str, str]):  # type: ignore[no-untyped-def]
    """py-spy samples ``pid`` for up to ``seconds`` meanwhile; ``into["profile"]`` gets the summary."""
    spy_binary = shutil.which("py-spy")
    if spy_binary is None:
        into["profile"] = "py-spy not installed"
        yield
        return
    out = Path(tempfile.mkdtemp(prefix="sgb-bench-spy-")) / "raw.txt"
    options = ["-f", "raw", "-o", str(out), "-r", "200", "-d", str(seconds), "--gil"]
    spy = await asyncio.create_subprocess_exec(
        spy_binary, "record", "-p", str(pid), *options, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    await asyncio.sleep(1)  # it attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy stops and writes what it has
        _, err = await spy.communicate()
        into["profile"] = (
            own_time_by_package(out.read_text()) if out.exists() else f"py-spy failed: {err.decode()[-200:]}"
        )


async def cpu_per_reply(
    redis_url: str, prefix: str, *, quick: bool, before: Path | None
) -> list[dict[str, Any]]:
    """``runs`` rounds of ``count`` replies per bot (the median and the range of each figure), then one
    more per bot with py-spy sampling, for where the time goes (sampling slows the worker, so that run
    gives no figure).

    With ``before``, both bots run at once (the one not measured sits idle) and the rounds alternate
    which goes first: this machine drifts by tens of percent over minutes, and the second of two runs
    in a row came out faster in my runs, so runs of one bot after all of the other's favoured one side.
    """
    count, runs = (100, 1) if quick else (1000, 4)
    sides = [("", None), *([(" (before)", before)] if before is not None else [])]
    results: list[list[Throughput]] = [[] for _ in sides]
    profiles: list[dict[str, str]] = [{"profile": "not profiled in a quick run"} for _ in sides]
    async with contextlib.AsyncExitStack() as stack:
        bots = [
            await stack.enter_async_context(
                LiveBot(redis_url, f"{prefix}c{number}:", "--workers", "1", source=source)
            )
            for number, (_, source) in enumerate(sides)
        ]
        for bot in bots:
            await replies_per_second(bot, 100)  # warm: connections open, code paths taken
        for round_number in range(runs):
            order = list(range(len(bots)))
            for side in order if round_number % 2 == 0 else order[::-1]:
                results[side].append(await replies_per_second(bots[side], count))
        if not quick:
            for bot, found in zip(bots, profiles, strict=True):
                (worker,) = bot._worker_pids()
                async with profiled(worker, 60, found):
                    await replies_per_second(bot, count)
        commands = [await redis_commands_per_reply(bot, 200) for bot in bots]
    rows = []
    for (label, _), measured, found, sent in zip(sides, results, profiles, commands, strict=True):
        cpu = sorted(r.cpu_ms_workers for r in measured)
        rate = sorted(r.replies_per_s for r in measured)
        median_cpu, median_rate = statistics.median(cpu), statistics.median(rate)
        met = median_cpu <= CPU_GOAL_MS and median_rate >= RATE_GOAL
        rows.append(
            {
                "scenario": "9. load",
                "case": f"CPU per reply, one worker process, instant model, {runs} x {count} replies{label}",
                "cpu_ms_per_reply_worker": round(median_cpu, 2),
                "cpu_ms_range": f"{cpu[0]}-{cpu[-1]}",
                "replies_per_s": round(median_rate, 1),
                "replies_per_s_range": f"{rate[0]:.0f}-{rate[-1]:.0f}",
                "cpu_ms_per_reply_ingress": round(statistics.median(r.cpu_ms_bot for r in measured), 3),
                "worker_own_time_by_package": found["profile"],
                "redis_commands_per_reply": sent,
                "goal": f"<= {CPU_GOAL_MS:.0f} ms of CPU per reply; >= {RATE_GOAL:.0f} replies/s per worker",
                "met": met if not quick and not label else None,
            }
        )
    return rows


async def redis_commands_per_reply(bot: LiveBot, count: int) -> str:
    """The Redis commands the bot sends per reply over ``count`` replies, by name, the most frequent
    first: those naming one of its keys (so neither MULTI and EXEC, nor a script's own commands) and
    each command of a pipeline; a worker's readers blocking on their streams in between count too.
    Counted with MONITOR, which slows Redis: the run gives no other figure.
    Unlike CPU time, the count does not drift with the machine."""
    client = bot.redis()
    sent: collections.Counter[str] = collections.Counter()

    async def watch(monitor: Any) -> None:
        while True:
            seen = await monitor.next_command()
            if seen["client_type"] != "lua" and bot.prefix in seen["command"]:
                sent[seen["command"].split(" ", 1)[0].upper()] += 1

    try:
        async with client.monitor() as monitor:
            watching = asyncio.create_task(watch(monitor))
            await asyncio.sleep(0.2)  # MONITOR is on before the first reply
            sent.clear()  # the warm-up's and idle readers' commands so far are not the replies'
            await replies_per_second(bot, count)
            await bot.idle()  # every job acknowledged, not only answered
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    finally:
        await client.aclose()
    # replies_per_second also sends a warm-up of ten mentions
    per_reply = {name: calls / (count + 10) for name, calls in sent.most_common()}
    total = sum(per_reply.values())
    named = ", ".join(f"{name} {calls:.1f}" for name, calls in per_reply.items() if calls >= 0.05)
    return f"{total:.1f}: {named}"


def _problems(log: str) -> list[str]:
    """The bot's warnings and errors, from its JSON log."""
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [r.get("message", "") for r in records if r.get("level") in ("WARNING", "ERROR", "CRITICAL")]


async def burst(redis_url: str, prefix: str, *, quick: bool, before: Path | None) -> list[dict[str, Any]]:
    count = 250 if quick else 2500
    rows = []
    shapes: list[tuple[str, tuple[str, ...], Path | None]] = [
        ("one process", (), None),
        ("ingress + 1 worker process", ("--workers", "1"), None),
    ]
    if before is not None:
        shapes.append(("one process (before)", (), before))
    for number, (shape, args, source) in enumerate(shapes):
        async with LiveBot(redis_url, f"{prefix}b{number}:", *args, source=source, LOG_FORMAT="json") as bot:
            await bot.send("CWARM", "warm up")  # the worker process is up and reading the queue
            await bot.replies(1, 30)
            bot.model.default_reply = Reply(text="An answer.", chunk_size=20, first_token_delay=0.05)
            envelopes = await asyncio.gather(*(bot.send(f"CB{i}", "a question") for i in range(count)))
            acks = [await bot.slack.wait_ack(envelope, 60) for envelope, _ in envelopes]
            answered = True
            try:
                await bot.replies(count + 1, 600)
            except AssertionError:
                answered = False
            last = max((c.at for c in bot.slack.calls_to("chat.stopStream")), default=0.0)
            log = bot.log_path.read_text()
            problems = _problems(log)
            waits = queue_waits(log)
            rows.append(
                {
                    "scenario": "9. load",
                    "case": f"burst of {count} mentions at once, 50 ms model, {shape}",
                    "answered": len(bot.slack.calls_to("chat.stopStream")) - 1,
                    "warnings_or_errors": len(problems),
                    "first_problem": (problems[0][:160] if problems else ""),
                    "max_ack_ms": round(max(acks) * 1000, 1),
                    "queue_wait_p50_ms": round(percentile(waits, 0.5) * 1000, 1) if waits else None,
                    "queue_wait_max_ms": round(max(waits) * 1000, 1) if waits else None,
                    "all_done_s": round(last - min(at for _, at in envelopes), 2),
                    "peak_rss_mb": bot.peak_rss_mb(),
                    "goal": "every one answered, no warning, no error",
                    "met": (answered and not problems) if not quick and source is None else None,
                }
            )
    return rows


async def run(redis_url: str, prefix: str, *, quick: bool, before: Path | None) -> list[dict[str, Any]]:
    return [
        *await cpu_per_reply(redis_url, prefix + "l:", quick=quick, before=before),
        *await burst(redis_url, prefix + "l:", quick=quick, before=before),
    ]
