"""Feedback on answers: the thumbs-up/down buttons under each answer, the optional comment after a
thumbs-down, and the figures ``/usage`` shows.

A click is counted once per person and answer: their last click is the one that counts (the other thumb
moves their vote; the same one again changes nothing). Counts are kept per workspace, by day and by
month, per channel, persona and model, for the day the answer was written (the button carries it).

Keys (docs/architecture.md), built here only, all with the workspace's feedback tag ``{T:feedback}`` so
that a click's writes are one slot:

- ``{prefix}{T:feedback}:votes:C:TS``: hash, person -> "up" or "down", for the answer message TS in
  channel C; kept as long as a thread's history;
- ``{prefix}{T:feedback}:day:YYYY-MM-DD`` and ``...:month:YYYY-MM``: hashes of counts, fields
  ``<channel>|<persona>|<model>|up`` (and ``down``); kept 400 days;
- ``{prefix}{T:feedback}:comments``: list, the newest 200 comments as JSON (who, where, the answer's
  thread, persona, model, text, when).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from bot.domain import Rated, valid_text
from bot.errors import BotError
from bot.redis_client import glob_escape, keys_matching, redis_errors
from bot.slack import ButtonClick, SlackAdapter, SlackId, SlackTs, is_slack_id, parse_button_click
from bot.views import COMMENT_BLOCK, COMMENT_INPUT, COMMENT_MAX_CHARS, feedback_comment_view

log = logging.getLogger(__name__)

KEEP_SECONDS = 400 * 24 * 3600
COMMENTS_KEPT = 200
Vote = Literal["up", "down"]

# KEYS: the answer's votes, the day's counts, the month's counts. ARGV: the person, the vote, the counts'
# field prefix, the votes' lifetime, the counts' lifetime. A vote that repeats the person's last one
# changes nothing (0); another moves their count from the old thumb to the new (1).
_VOTE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
for i = 2, 3 do
  if old then redis.call('HINCRBY', KEYS[i], ARGV[3] .. old, -1) end
  redis.call('HINCRBY', KEYS[i], ARGV[3] .. ARGV[2], 1)
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
return 1
"""


class _Value(BaseModel):
    """What a feedback button carries (``views.feedback_value``)."""

    model_config = ConfigDict(extra="forbid")

    v: Vote
    p: Annotated[StrictStr, Field(pattern=r"^[^|]{1,100}$")]
    m: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    d: Annotated[StrictStr, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]


@dataclass(frozen=True, slots=True)
class Helpfulness:
    """One month's votes for one persona and model."""

    persona: str
    model: str
    up: int
    down: int


@dataclass(frozen=True, slots=True)
class Comment:
    """A thumbs-down's comment, with where the answer was and what wrote it."""

    user: str
    channel: str
    thread_ts: str
    message_ts: str
    persona: str
    model: str
    text: str
    at: float


class FeedbackStore:
    """Votes, their counts and the comments, in Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str, votes_seconds: int) -> None:
        self._redis = client
        self._prefix = prefix
        self._votes_seconds = votes_seconds
        self._vote = client.register_script(_VOTE)

    def _key(self, team: str, rest: str) -> str:
        return f"{self._prefix}{{{team}:feedback}}:{rest}"

    async def vote(
        self, team: str, channel: str, message_ts: str, user: str, vote: Vote, rated: Rated
    ) -> bool:
        """Count a click; False when it repeats the person's last vote on that answer."""
        with redis_errors("recording feedback"):
            changed = await self._vote(
                keys=[
                    self._key(team, f"votes:{channel}:{message_ts}"),
                    self._key(team, f"day:{rated.day}"),
                    self._key(team, f"month:{rated.day[:7]}"),
                ],
                args=[
                    user,
                    vote,
                    f"{channel}|{rated.persona}|{rated.model}|",
                    self._votes_seconds,
                    KEEP_SECONDS,
                ],
            )
        return bool(changed)

    async def comment(self, team: str, comment: Comment) -> None:
        key = self._key(team, "comments")
        with redis_errors("recording a feedback comment"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, json.dumps(dataclasses.asdict(comment)))
                pipe.ltrim(key, 0, COMMENTS_KEPT - 1)
                await pipe.execute()

    async def forget_person(self, team: str, user: str) -> tuple[int, int]:
        """``/forget me``: who clicked what goes (the day's and month's counts stay, naming nobody), and
        their comments. How many votes and comments were deleted."""
        votes = comments = 0
        with redis_errors("forgetting a person's feedback"):
            for key in await keys_matching(self._redis, glob_escape(self._key(team, "votes:")) + "*"):
                votes += await self._redis.hdel(key, user)
            key = self._key(team, "comments")
            for raw in await self._redis.lrange(key, 0, -1):
                if json.loads(raw).get("user") == user:
                    comments += await self._redis.lrem(key, 0, str(raw))
        return votes, comments

    async def helpfulness(self, team: str, month: str, channel: str | None = None) -> list[Helpfulness]:
        """The month's votes per persona and model (in ``channel`` only, when given), most votes first."""
        with redis_errors("reading feedback"):
            counts = await self._redis.hgetall(self._key(team, f"month:{month}"))
        totals: dict[tuple[str, str], list[int]] = {}
        for field, value in counts.items():
            where, persona, rest = str(field).split("|", 2)
            model, vote = rest.rsplit("|", 1)
            if channel is None or where == channel:
                pair = totals.setdefault((persona, model), [0, 0])
                pair[0 if vote == "up" else 1] += int(value)
        rows = [Helpfulness(p, m, up, down) for (p, m), (up, down) in totals.items() if up + down > 0]
        return sorted(rows, key=lambda row: row.up + row.down, reverse=True)

    async def recent_comments(self, team: str, count: int) -> list[Comment]:
        with redis_errors("reading feedback comments"):
            raws = await self._redis.lrange(self._key(team, "comments"), 0, count - 1)
        return [Comment(**json.loads(raw)) for raw in raws]


class _CommentContext(BaseModel):
    """The comment modal's private metadata: the answer the comment is about."""

    model_config = ConfigDict(extra="forbid")

    c: SlackId
    t: SlackTs
    m: SlackTs
    p: StrictStr
    o: StrictStr


@dataclass(frozen=True, slots=True)
class Counted:
    """A click, counted (or not) before its acknowledgement: what is left to do after it."""

    click: ButtonClick
    rated: Rated
    ask_for_comment: bool  # a first thumbs-down from this person on this answer
    problem: str = ""  # what to tell the person when the click could not be counted


class Feedback:
    """The clicks on feedback buttons and the comment modal after a thumbs-down. Each is stored before
    it is acknowledged (one Redis call), so a click is counted when Slack hears back and a comment that
    could not be kept is said in the modal itself."""

    def __init__(self, store: FeedbackStore, slack: SlackAdapter) -> None:
        self._store = store
        self._slack = slack

    async def count(self, body: Mapping[str, Any]) -> Counted | None:
        """Count one click; None for a malformed one (logged, dropped)."""
        click = parse_button_click(body)
        if click is None:
            return None
        try:
            value = _Value.model_validate_json(click.value)
        except ValidationError:
            log.warning("dropped a feedback click with a malformed value")
            return None
        rated = Rated(value.p, value.m, value.d)
        try:
            changed = await self._store.vote(
                click.team, click.channel, click.message_ts, click.user, value.v, rated
            )
        except BotError as exc:
            log.warning("could not record feedback: %s", exc)
            return Counted(click, rated, ask_for_comment=False, problem=exc.user_message)
        log.info("feedback %s recorded%s", value.v, "" if changed else " (unchanged)")
        return Counted(click, rated, ask_for_comment=value.v == "down" and changed)

    async def follow_up(self, counted: Counted) -> None:
        """After the acknowledgement: say why a click was not counted, or ask a thumbs-down for a
        comment (a modal, opened with the click's trigger within Slack's few seconds)."""
        click = counted.click
        if counted.problem:
            await self._slack.tell(click.user, click.channel, counted.problem)
        elif counted.ask_for_comment and click.trigger_id:
            view = feedback_comment_view(_comment_context(click, counted.rated))
            await self._slack.open_view(click.trigger_id, view)

    async def keep_comment(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Keep the comment submitted in the modal; the modal's errors when it could not be kept."""
        team = (body.get("team") or {}).get("id")
        user = (body.get("user") or {}).get("id")
        view = body.get("view") or {}
        try:
            where = _CommentContext.model_validate_json(view.get("private_metadata") or "")
        except ValidationError:
            log.warning("dropped a feedback comment with malformed metadata")
            return None
        if not (is_slack_id(team) and is_slack_id(user)):
            log.warning("dropped a feedback comment with malformed ids")
            return None
        values = (view.get("state") or {}).get("values") or {}
        text = ((values.get(COMMENT_BLOCK) or {}).get(COMMENT_INPUT) or {}).get("value")
        if not isinstance(text, str) or not text.strip():
            return None  # the comment is optional
        kept = valid_text(text.strip())[:COMMENT_MAX_CHARS]
        comment = Comment(str(user), where.c, where.t, where.m, where.p, where.o, kept, time.time())
        try:
            await self._store.comment(str(team), comment)
        except BotError as exc:
            log.warning("could not record a feedback comment: %s", exc)
            return {"response_action": "errors", "errors": {COMMENT_BLOCK: exc.user_message}}
        return None


def _comment_context(click: ButtonClick, rated: Rated) -> str:
    return json.dumps(
        {
            "c": click.channel,
            "t": click.thread_ts,
            "m": click.message_ts,
            "p": rated.persona,
            "o": rated.model,
        }
    )
