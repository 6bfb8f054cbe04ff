"""Where the bot answers: ``ALLOWED_CHANNELS``, ``DENIED_CHANNELS`` and ``ALLOW_DMS``.

``Places.refusal`` says whether a conversation is one the bot answers in, and if not, what to tell the
person who asked there (where it can be used). The lists hold channel ids or names; a name is matched
against the channel's current name, looked up from Slack at most every few minutes per channel, so the
check is made in the worker, never before an acknowledgement. An id needs no lookup.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from cachetools import TTLCache

# A public or private channel's id, as Slack writes it; anything else in the lists is a name.
CHANNEL_ID = re.compile(r"^[CG][A-Z0-9]+$")
# Slack's channel names: lower-case letters, digits, hyphens and underscores, at most 80.
CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,79}$")
NAME_SECONDS = 600.0  # a renamed channel is known by its new name after this long
CACHED = 10_000  # channels whose names a process keeps at once


def channel_list_problems(value: str) -> list[str]:
    """What is wrong with the entries of a channel list setting (empty when nothing is)."""
    return [
        f"{entry!r} is neither a channel id (C…) nor a channel name"
        for entry in _entries(value)
        if not CHANNEL_ID.match(entry) and not CHANNEL_NAME.match(entry.lstrip("#").lower())
    ]


def _entries(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass(frozen=True, slots=True)
class ChannelSet:
    """Channels named in a setting, by id or by name (lower-case, without the ``#``)."""

    ids: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, value: str) -> ChannelSet:
        entries = _entries(value)
        ids = frozenset(e for e in entries if CHANNEL_ID.match(e))
        return cls(ids, frozenset(e.lstrip("#").lower() for e in entries if e not in ids))

    def __bool__(self) -> bool:
        return bool(self.ids or self.names)

    def holds(self, channel: str, name: str | None) -> bool:
        return channel in self.ids or (name is not None and name in self.names)

    def mentions(self) -> Iterable[str]:
        """The channels as Slack shows them in a message: links for ids, ``#name`` for names."""
        yield from (f"<#{channel}>" for channel in sorted(self.ids))
        yield from (f"#{name}" for name in sorted(self.names))


ChannelName = Callable[[str], Awaitable[str]]


class Places:
    """The conversations the bot answers in. ``channel_name`` looks a channel's name up in Slack."""

    def __init__(
        self,
        allowed: ChannelSet,
        denied: ChannelSet,
        allow_dms: bool,
        channel_name: ChannelName,
    ) -> None:
        self._allowed = allowed
        self._denied = denied
        self._allow_dms = allow_dms
        self._channel_name = channel_name
        self._names: TTLCache[str, str] = TTLCache(maxsize=CACHED, ttl=NAME_SECONDS)  # channel -> name

    async def refusal(self, channel: str) -> str | None:
        """None when the bot answers in ``channel``; else what to tell whoever asked there. Raises
        ``BotError`` when a name had to be looked up and Slack could not say (the job is tried again)."""
        channels = list(self._allowed.mentions())
        if channel.startswith("D"):
            refusal = "I don't answer direct messages here."
            return None if self._allow_dms else _ask_in(refusal, channels or ["a channel"])
        if not self._allowed and not self._denied:
            return None
        name = await self._name(channel) if (self._allowed.names or self._denied.names) else None
        if self._denied.holds(channel, name) or (self._allowed and not self._allowed.holds(channel, name)):
            dms = ["a direct message with me"] if self._allow_dms else []
            return _ask_in("I'm not used in this channel.", (channels or ["another channel"]) + dms)
        return None

    async def _name(self, channel: str) -> str:
        """The channel's name, cached a while."""
        name = self._names.get(channel)
        if name is None:
            name = self._names[channel] = (await self._channel_name(channel)).lower()
        return name


def _ask_in(refusal: str, places: list[str]) -> str:
    listed = ", ".join(places[:-1]) + " or " + places[-1] if len(places) > 1 else places[0]
    return f"{refusal} Ask me in {listed}."
