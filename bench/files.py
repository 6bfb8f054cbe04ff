"""Scenario 7, images in follow-ups: keep a scaled copy in Redis, or fetch the file from Slack again?

The real bot (``python -m bot run``) against the fakes, twice: with the image cache
(``IMAGE_CACHE_SECONDS`` at its default) and without it (0: every reply that shows the image downloads
and scales it again). In each, one thread per sample image: a mention with the image, then follow-ups
about it. Measured: the Redis bytes the cached copy takes (``MEMORY USAGE``), the downloads from Slack
per follow-up, and the follow-up's time from the event to the end of its reply.
"""

from __future__ import annotations

import io
import random
import statistics
from typing import Any

import redis.asyncio as redis
from PIL import Image, ImageDraw

from bench.live import LiveBot
from tests.fake_model import Reply
from tests.fake_slack import BOT_USER_ID, TEAM_ID


def screenshot() -> bytes:
    """A 1920 x 1080 PNG that looks like a screenshot of a terminal: lines of text on white."""
    picture = Image.new("RGB", (1920, 1080), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    rng = random.Random(7)
    words = ["Traceback", "File", "line", "error:", "KeyError", "self._run", "await", "return", "None"]
    for y in range(10, 1070, 18):
        draw.text((12, y), " ".join(rng.choice(words) for _ in range(rng.randint(3, 16))), fill=(20, 20, 20))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def photo() -> bytes:
    """A 4032 x 3024 JPEG with a phone photo's detail (noise over a gradient)."""
    rng = random.Random(8)
    noise = Image.frombytes("L", (4032, 3024), rng.randbytes(4032 * 3024)).convert("RGB")
    gradient = Image.linear_gradient("L").resize((4032, 3024)).convert("RGB")
    out = io.BytesIO()
    Image.blend(gradient, noise, 0.35).save(out, format="JPEG", quality=90)
    return out.getvalue()


SAMPLES = {
    "screenshot 1920x1080 PNG": ("error.png", "image/png", "png", screenshot),
    "photo 4032x3024 JPEG": ("rack.jpg", "image/jpeg", "jpg", photo),
}


async def _ask(
    bot: LiveBot, channel: str, text: str, thread_ts: str | None, files: list[dict[str, Any]] | None
) -> tuple[str, float, float]:
    """A question in ``channel`` (with ``files``); its ts, the downloads and the seconds its reply took."""
    ts = bot.slack.next_ts()
    text = f"<@{BOT_USER_ID}> {text}"
    downloads = len(bot.slack.downloads())
    bot.slack.add_message(channel, ts=ts, user="U1", text=text, thread_ts=thread_ts, files=files)
    event: dict[str, Any] = {"type": "app_mention", "user": "U1", "text": text, "ts": ts}
    event |= {"channel": channel, "team": TEAM_ID, "channel_type": "channel"}
    if thread_ts:
        event["thread_ts"] = thread_ts
    if files:
        event |= {"files": files, "subtype": "file_share"}
    replies = len(bot.slack.calls_to("chat.stopStream"))
    at = bot.slack.sent_at(await bot.slack.send_event(event))
    await bot.replies(replies + 1, 60)
    finished = bot.last_write(channel, at)
    assert finished is not None
    if thread_ts or files:  # the figures mean something only if the model was shown the image
        request = bot.model.requests[-1]
        shown = [p for m in request["messages"] if isinstance(m["content"], list) for p in m["content"]]
        if not any(part["type"] == "image_url" for part in shown):
            raise RuntimeError(f"the model was not shown the image: {bot.slack.thread(channel, ts)[-1]}")
    return ts, len(bot.slack.downloads()) - downloads, finished - at


async def _picture_bytes(redis_url: str, prefix: str, channel: str) -> list[int]:
    """The Redis bytes of each image kept for the threads of ``channel``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        match = f"{prefix}{{{TEAM_ID}:{channel}:*:picture:*"
        keys = [key async for key in client.scan_iter(match=match, count=1000)]
        return [int(await client.memory_usage(key, samples=0) or 0) for key in keys]
    finally:
        await client.aclose()


async def image_cache(redis_url: str, prefix: str, *, quick: bool) -> list[dict[str, Any]]:
    follow_ups = 3 if quick else 10
    contents = {case: make() for case, (_, _, _, make) in SAMPLES.items()}
    rows: list[dict[str, Any]] = []
    for cache_seconds in (86400, 0):
        run_prefix = f"{prefix}f{cache_seconds}:"
        async with LiveBot(redis_url, run_prefix, IMAGE_CACHE_SECONDS=str(cache_seconds)) as bot:
            bot.model.default_reply = Reply(text="It shows a KeyError in the worker.", chunk_size=20)
            await _ask(bot, "CWARM", "warm up", None, None)
            for number, (case, (name, mime, filetype, _)) in enumerate(SAMPLES.items()):
                content = contents[case]
                file = bot.slack.add_file(name, content, mime, filetype)
                channel = f"CIMG{number}"
                parent, first_downloads, first_seconds = await _ask(
                    bot, channel, "what does this show?", None, [file]
                )
                stored = await _picture_bytes(redis_url, run_prefix, channel)
                downloads, seconds = [], []
                for i in range(follow_ups):
                    _, got, took = await _ask(bot, channel, f"and what about line {i}?", parent, None)
                    downloads.append(got)
                    seconds.append(took)
                rows.append(
                    {
                        "scenario": "7. files",
                        "case": f"{case}, {'cached in Redis' if cache_seconds else 'fetched again'}",
                        "file_kb": round(len(content) / 1024, 1),
                        "redis_kb_per_image": round(sum(stored) / 1024, 1),
                        "first_reply_ms": round(first_seconds * 1000, 1),
                        "first_downloads": first_downloads,
                        "downloads_per_follow_up": round(statistics.mean(downloads), 2),
                        "follow_up_p50_ms": round(statistics.median(seconds) * 1000, 1),
                        "follow_up_max_ms": round(max(seconds) * 1000, 1),
                        "goal": "reported (decides IMAGE_CACHE_SECONDS's default)",
                        "met": None,
                    }
                )
    return rows
