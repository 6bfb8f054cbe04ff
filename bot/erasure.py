"""Erasure on request: ``/forget me``, ``/forget channel``, and the app's uninstallation.

- ``/forget me``: everything kept about the caller goes: their turns in every thread (a summary that
  covered them is built again without them), their direct-message threads whole, their cached name,
  their DM persona (and the persona changes they made elsewhere no longer name them), their feedback
  votes and comments, their own usage figures (the totals stay, naming nobody), their dead-lettered
  jobs and waiting shortcuts. The answer says what went.
- ``/forget channel`` (``PERSONA_ADMINS`` only): every thread the bot keeps in the channel, its persona
  and that persona's history, the feedback votes on its answers.
- ``app_uninstalled`` or the bot token revoked (``tokens_revoked``): every key of the workspace.

Keys are found by SCAN (``redis_client.keys_matching``), never KEYS; every key carries the workspace id
(and a thread's carries its channel), so a pattern finds them all. The owners delete their own keys; a
thread is changed under its lock, so no reply writes it meanwhile. What was said in Slack stays there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from bot.domain import ThreadKey
from bot.errors import BotError
from bot.feedback import FeedbackStore
from bot.files import SlackFiles, file_ids
from bot.forgetting import Forgetting
from bot.history import RedisHistory
from bot.jobs import JobQueue
from bot.persona_commands import Invocation
from bot.personas import PersonaStore
from bot.redis_client import glob_escape, keys_matching, redis_errors
from bot.slack import SlackAdapter, parse_message_shortcut
from bot.usage import RedisUsage
from bot.views import count

log = logging.getLogger(__name__)

USAGE = (
    "*/forget me*: delete everything I keep about you (your messages in my memory of every thread, our "
    "direct-message threads, your name, your persona, your feedback, your usage figures). "
    "*/forget channel*: delete what I keep of this channel (admins only). "
    "What was said in Slack stays there."
)


@dataclass(frozen=True, slots=True)
class PersonErased:
    """What ``/forget me`` deleted, counted."""

    messages: int = 0
    threads: int = 0
    dm_threads: int = 0
    dm_persona: bool = False
    persona_changes: int = 0
    name: bool = False
    votes: int = 0
    comments: int = 0
    usage_periods: int = 0
    jobs: int = 0

    def describe(self) -> str:
        parts = []
        if self.messages:
            where = count(self.threads, "thread", "threads")
            parts.append(f"{count(self.messages, 'message', 'messages')} of yours in {where}")
        if self.dm_threads:
            parts.append(
                count(self.dm_threads, "thread of our direct messages", "threads of our direct messages")
            )
        if self.dm_persona:
            parts.append("your persona for our direct messages")
        if self.persona_changes:
            parts.append(f"your name on {count(self.persona_changes, 'persona change', 'persona changes')}")
        if self.name:
            parts.append("your display name")
        if self.votes or self.comments:
            parts.append(
                f"{count(self.votes, 'feedback vote', 'feedback votes')} and "
                f"{count(self.comments, 'comment', 'comments')}"
            )
        if self.usage_periods:
            parts.append("your usage figures (the totals stay, naming nobody)")
        if self.jobs:
            parts.append(count(self.jobs, "question that had failed", "questions that had failed"))
        if not parts:
            return "I kept nothing about you. What was said in Slack stays there."
        return "Deleted what I kept about you: " + "; ".join(parts) + ". What was said in Slack stays there."


class Erasure:
    """Deletes a person's, a channel's or the whole workspace's data."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        history: RedisHistory,
        files: SlackFiles,
        forgetting: Forgetting,
        personas: PersonaStore,
        feedback: FeedbackStore,
        usage: RedisUsage,
        queue: JobQueue,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._history = history
        self._files = files
        self._forgetting = forgetting
        self._personas = personas
        self._feedback = feedback
        self._usage = usage
        self._queue = queue

    async def person(self, team: str, user: str, dm: str) -> PersonErased:
        """``/forget me`` for ``user``, whose direct messages with the bot are ``dm``."""
        messages = threads = 0
        for key in await self._history.threads(team):
            if key.channel == dm:
                continue  # all of it goes below
            async with self._history.lock(key):
                gone = await self._history.forget_speaker(key, user)
            if gone:
                await self._files.forget(key, file_ids(gone))
                messages, threads = messages + len(gone), threads + 1
        dm_threads = await self._forget_threads(team, dm)
        dm_persona, persona_changes = await self._personas.forget_person(team, user, dm)
        votes, comments = await self._feedback.forget_person(team, user)
        erased = PersonErased(
            messages=messages,
            threads=threads,
            dm_threads=dm_threads,
            dm_persona=dm_persona,
            persona_changes=persona_changes,
            name=await self._history.forget_name(team, user),
            votes=votes,
            comments=comments,
            usage_periods=await self._usage.forget_person(team, user),
            jobs=await self._queue.forget_person(user),
        )
        log.info("/forget me: %d messages in %d threads, %d DM threads", messages, threads, dm_threads)
        return erased

    async def start_over(self, key: ThreadKey) -> int:
        """The thread's earlier messages forgotten (its summary and images too): the next question
        starts it afresh, and is its first message. How many were forgotten."""
        async with self._history.lock(key):
            gone = await self._history.start_over(key)
        await self._files.forget(key, file_ids(gone))
        log.info("a thread started over (%d messages forgotten)", len(gone))
        return len(gone)

    async def channel(self, team: str, channel: str) -> int:
        """``/forget channel``: the channel's threads, persona and votes; how many threads went."""
        threads = await self._forget_threads(team, channel)
        await self._personas.forget_channel(team, channel)
        await self._delete(
            [
                glob_escape(f"{self._prefix}{{{team}:feedback}}:votes:{channel}:") + "*",
                glob_escape(f"{self._prefix}{{{team}:jobs}}:refused:{channel}"),
            ]
        )
        log.info("/forget channel: %d threads", threads)
        return threads

    async def workspace(self, team: str) -> int:
        """Every key of the workspace (the app was uninstalled); how many went. The job stream is
        emptied rather than deleted, so running workers keep their consumer group."""
        prefix = glob_escape(self._prefix)
        deleted = await self._delete(
            [f"{prefix}{{{glob_escape(team)}:*", f"{prefix}*:{glob_escape(team)}:*"],
            keep=set(self._queue.queue_keys),
        )
        with redis_errors("emptying the job queue"):
            for queue in self._queue.queue_keys:
                await self._redis.xtrim(queue, maxlen=0, approximate=False)
        log.info("the workspace's data was deleted (%d keys)", deleted)
        return deleted

    async def _forget_threads(self, team: str, channel: str) -> int:
        """Every thread of ``channel``, each under its lock, with all its keys; how many."""
        pattern = glob_escape(f"{self._prefix}{{{team}:{channel}:") + "*"
        keys = await keys_matching(self._redis, pattern)
        tags: dict[str, list[str]] = {}
        for name in keys:
            tags.setdefault(name[len(self._prefix) :].partition("}")[0], []).append(name)
        for tag, names in tags.items():
            thread = ThreadKey(team, channel, tag.rsplit(":", 1)[1])
            await self._forgetting.forget_thread(thread)
            async with self._history.lock(thread):  # the rest: pictures, a job's progress, the pane's
                if rest := [n for n in names if not n.endswith(":lock")]:
                    with redis_errors("forgetting a thread's keys"):
                        await self._redis.delete(*rest)
        return len(tags)

    async def _delete(self, patterns: list[str], keep: set[str] | frozenset[str] = frozenset()) -> int:
        # UNLINK in batches: the cluster client splits a batch by slot, so it is no CROSSSLOT step.
        deleted = 0
        for pattern in patterns:
            keys = [k for k in await keys_matching(self._redis, pattern) if k not in keep]
            with redis_errors("deleting keys"):
                for start in range(0, len(keys), 500):
                    deleted += await self._redis.unlink(*keys[start : start + 500])
        return deleted


class ForgetRequests:
    """``/forget`` and the "Start thread over" message shortcut: run after their acknowledgement; they
    answer whoever used them, through the response URL."""

    def __init__(
        self, erasure: Erasure, slack: SlackAdapter, is_admin: Callable[[str], Awaitable[bool]]
    ) -> None:
        self._erasure = erasure
        self._slack = slack
        self._is_admin = is_admin  # PERSONA_ADMINS, by id or through a user group

    async def command(self, body: Mapping[str, Any]) -> None:
        call = Invocation.of(body)  # its ids checked
        verb = call.text.strip().lower()
        try:
            if verb == "me":
                dm = await self._slack.dm_channel(call.user)
                answer = (await self._erasure.person(call.team, call.user, dm)).describe()
            elif verb == "channel" and not await self._is_admin(call.user):
                answer = "Sorry, only PERSONA_ADMINS may use `/forget channel`."
            elif verb == "channel":
                threads = await self._erasure.channel(call.team, call.channel)
                answer = (
                    f"Deleted what I kept of this channel: {count(threads, 'thread', 'threads')}, "
                    "its persona and that persona's history, the feedback votes on my answers here. "
                    "What was said in Slack stays there."
                )
            else:
                answer = USAGE if verb in ("", "help") else f"I don't know `/forget {verb}`.\n{USAGE}"
        except BotError as exc:
            log.warning("/forget %s failed: %s", verb, exc)
            answer = (
                f"I couldn't finish deleting (my memory store or Slack failed). Run `/forget {verb}` "
                "again in a little while: what is already deleted stays deleted."
            )
        await self._slack.respond(call.response_url, answer)

    async def start_over(self, body: Mapping[str, Any]) -> None:
        """ "Start thread over", used on any message of a thread."""
        parsed = parse_message_shortcut(body, "start_over")
        if parsed is None:
            return  # malformed: logged by the parser; nobody to answer
        shortcut = parsed[0]
        try:
            forgotten = await self._erasure.start_over(shortcut.key)
        except BotError as exc:
            log.warning("starting a thread over failed: %s", exc)
            answer = "I couldn't start this thread over just now (my memory store failed). Try again shortly."
        else:
            answer = (
                f"I forgot the {count(forgotten, 'earlier message', 'earlier messages')} of this thread I "
                "kept: I'll answer what comes next afresh. Nothing in Slack was deleted."
                if forgotten
                else "I keep nothing of this thread, so there is nothing to forget."
            )
        await self._slack.respond(shortcut.response_url, answer)
