"""Per-channel retention: how long the bot keeps a channel's threads, when shorter than
``HISTORY_TTL_SECONDS``.

Set with ``/persona retention`` (by whoever may change the channel's persona: ``PERSONA_ADMINS`` when
set) and shown by ``/persona``. It is one key per channel; the history asks for it (``seconds``) each
time it writes a thread, answered from a copy in the process kept a minute, so a reply costs no extra
round trip; other processes follow a change within that minute. Setting a shorter retention also
shortens the life of the threads the channel already has (and the bot's part in them: a follow-up
there then needs a mention, and the thread is read from Slack again, as after ``HISTORY_TTL_SECONDS``).
"""

from __future__ import annotations

import re

import redis.asyncio as redis
from cachetools import TTLCache

from bot.domain import ThreadKey
from bot.jobs import joined_pattern
from bot.redis_client import glob_escape, keys_matching, redis_errors

CACHE_SECONDS = 60.0
CACHED = 10_000  # channels whose retention a process keeps at once
MIN_SECONDS = 3600
_UNITS = {"h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+)\s*(h|d)$")


def parse_duration(text: str) -> int | None:
    """``12h`` or ``7d`` in seconds; None for anything else."""
    match = _DURATION.match(text.strip().lower())
    return int(match.group(1)) * _UNITS[match.group(2)] if match else None


class ChannelRetention:
    """The retention of each channel (None: ``HISTORY_TTL_SECONDS``)."""

    def __init__(self, client: redis.Redis, *, prefix: str, default_seconds: int) -> None:
        self._redis = client
        self._prefix = prefix
        self.default_seconds = default_seconds
        self._cached: TTLCache[tuple[str, str], int | None] = TTLCache(maxsize=CACHED, ttl=CACHE_SECONDS)

    def _key(self, team: str, channel: str) -> str:
        return f"{self._prefix}retention:{team}:{channel}"

    async def of(self, team: str, channel: str) -> int | None:
        """The channel's own retention, read afresh."""
        with redis_errors("reading a channel's retention"):
            raw = await self._redis.get(self._key(team, channel))
        value = int(raw) if raw else None
        self._cached[(team, channel)] = value
        return value

    async def seconds(self, key: ThreadKey) -> int:
        """How long a write keeps the thread."""
        return await self.lifetime(key.team, key.channel)

    async def lifetime(self, team: str, channel: str) -> int:
        """How long the channel's threads are kept: its retention, else the default."""
        try:
            value = self._cached[(team, channel)]
        except KeyError:
            value = await self.of(team, channel)
        return min(value, self.default_seconds) if value else self.default_seconds

    async def set(self, team: str, channel: str, seconds: int | None) -> int:
        """Make ``seconds`` (None: the default) the channel's retention; the threads it already has
        that would outlive it are shortened to it. How many were."""
        with redis_errors("setting a channel's retention"):
            if seconds is None:
                await self._redis.delete(self._key(team, channel))
            else:
                await self._redis.set(self._key(team, channel), seconds)
        self._cached[(team, channel)] = seconds
        if seconds is None:
            return 0
        shortened = 0
        threads = glob_escape(f"{self._prefix}{{{team}:{channel}:") + "*"
        joined = joined_pattern(self._prefix, team, channel)
        with redis_errors("shortening a channel's threads"):
            for name in await keys_matching(self._redis, threads) + await keys_matching(self._redis, joined):
                if await self._redis.ttl(name) > seconds:
                    await self._redis.expire(name, seconds)
                    shortened += name.endswith(":turns")
        return shortened
