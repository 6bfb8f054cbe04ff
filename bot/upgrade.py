"""Renames the keys an earlier version wrote to the names this one reads, once per database.

Keys moved when the bot learned to run on a Redis Cluster, so that the keys one operation changes
together share a hash tag (docs/architecture.md):

- a channel's persona and its audit, ``persona:T:channel:C`` and ``persona:T:audit:C``, are now
  ``{T:persona:C}:channel`` and ``{T:persona:C}:audit``;
- usage, ``usage:T:PERIOD...``, is now ``{T:usage}:PERIOD...`` (the month, the day, budget notices);
- a joined thread's marker, ``{T:jobs}:joined:T:C:TS``, is now in its thread's job stream.

Only a single server can hold the old names (earlier versions did not run on a cluster), and there
RENAME moves a key whatever its slot. Where a key of the new name exists already (written by this
version meanwhile), it is kept and the old one dropped. ``{prefix}{T:schema}`` records that the
workspace's keys are upgraded, so later start-ups pay one GET. It runs as a process starts, before it
serves: off every reply's path.
"""

from __future__ import annotations

import logging

import redis.asyncio as redis

from bot.domain import ThreadKey
from bot.jobs import joined_key
from bot.personas import channel_key
from bot.redis_client import glob_escape, is_cluster, keys_matching, redis_errors
from bot.usage import usage_key

log = logging.getLogger(__name__)

SCHEMA = "2"


async def upgrade_keys(client: redis.Redis, prefix: str, team: str) -> int:
    """Rename every key of an earlier version of workspace ``team``; how many were renamed."""
    if is_cluster(client):
        return 0
    marker = f"{prefix}{{{team}:schema}}"
    with redis_errors("upgrading the workspace's keys"):
        if await client.get(marker) == SCHEMA:
            return 0
        renames: dict[str, str] = {}
        for kind in ("channel", "audit"):
            old_prefix = f"{prefix}persona:{team}:{kind}:"
            for old in await keys_matching(client, glob_escape(old_prefix) + "*"):
                renames[old] = channel_key(prefix, team, old[len(old_prefix) :], kind)
        old_prefix = f"{prefix}usage:{team}:"
        for old in await keys_matching(client, glob_escape(old_prefix) + "*"):
            renames[old] = usage_key(prefix, team, old[len(old_prefix) :])
        old_prefix = f"{prefix}{{{team}:jobs}}:joined:{team}:"
        for old in await keys_matching(client, glob_escape(old_prefix) + "*"):
            channel, _, thread_ts = old[len(old_prefix) :].partition(":")
            renames[old] = joined_key(prefix, team, ThreadKey(team, channel, thread_ts))
        renamed = 0
        for old, new in renames.items():
            if old == new:
                continue  # a joined marker whose thread's stream is stream 0, named as before
            if await client.renamenx(old, new):
                renamed += 1
            else:
                await client.delete(old)
        await client.set(marker, SCHEMA)
    if renamed:
        log.info("renamed %d keys of an earlier version to this version's names", renamed)
    return renamed
