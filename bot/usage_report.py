"""``/usage``: this month's tokens and estimated cost, for the channel and the person who asks, and how
helpful the channel found the answers (per persona and model); admins (``PERSONA_ADMINS``) also see the
workspace total, the top channels and users, the whole workspace's helpfulness and the newest
comments. Answered through the command's ``response_url``, like every command's answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from bot.errors import BotError
from bot.feedback import FeedbackStore, Helpfulness
from bot.persona_commands import Invocation, PersonaCommands
from bot.slack import SlackAdapter
from bot.usage import RedisUsage

log = logging.getLogger(__name__)

RECENT_COMMENTS = 5


def _figures(month: Mapping[str, int], scope: str) -> str:
    tokens = month.get(f"{scope}:prompt", 0) + month.get(f"{scope}:completion", 0)
    cost = month.get(f"{scope}:micro_usd", 0) / 1_000_000
    replies = month.get(f"{scope}:replies", 0)
    estimated = month.get(f"{scope}:estimated", 0)
    note = f", {estimated} estimated with tiktoken" if estimated else ""
    return f"{tokens:,} tokens in {replies:,} replies, about ${cost:,.2f}{note}"


def _helpful(row: Helpfulness) -> str:
    votes = row.up + row.down
    return f"• {row.persona} on {row.model}: {round(100 * row.up / votes)}% helpful ({row.up} of {votes})"


def _top(month: Mapping[str, int], kind: str, mention: str, count: int = 5) -> list[str]:
    totals: dict[str, int] = {}
    for field, value in month.items():
        parts = field.split(":")
        if parts[0] == kind and parts[-1] in ("prompt", "completion"):
            totals[":".join(parts[1:-1])] = totals.get(":".join(parts[1:-1]), 0) + value
    ranked = sorted(totals, key=lambda k: totals[k], reverse=True)[:count]
    return [f"• {mention.format(k)}: {_figures(month, f'{kind}:{k}')}" for k in ranked]


class UsageReport:
    """``/usage``: this month's tokens, estimated cost and helpfulness (see the module docstring)."""

    def __init__(
        self, slack: SlackAdapter, usage: RedisUsage, feedback: FeedbackStore, personas: PersonaCommands
    ) -> None:
        self._slack = slack
        self._usage = usage
        self._feedback = feedback
        self._personas = personas

    async def command(self, body: Mapping[str, Any]) -> None:
        """Answer one ``/usage`` (already acknowledged) to whoever used it."""
        call = Invocation.of(body)
        try:
            answer = await self._report(call.team, call.channel, call.user)
        except BotError as exc:
            log.warning("/usage failed: %s", exc)
            answer = exc.user_message
        await self._slack.respond(call.response_url, answer)

    async def _report(self, team: str, channel: str, user: str) -> str:
        month = await self._usage.month(team)
        lines = [
            "*This month*",
            f"This channel: {_figures(month, f'ch:{channel}')}",
            f"You: {_figures(month, f'u:{user}')}",
        ]
        admin = await self._personas.is_admin(user)
        if admin:
            lines += [f"Workspace: {_figures(month, 'all')}", "*Top channels*"]
            lines += [*_top(month, "ch", "<#{}>"), "*Top users*", *_top(month, "u", "<@{}>")]
        lines.append("_Costs are estimates from the price table._")
        this_month = time.strftime("%Y-%m", time.gmtime())
        rows = await self._feedback.helpfulness(team, this_month, None if admin else channel)
        lines.append("*Helpful answers this month*" + ("" if admin else " (this channel)"))
        lines += [_helpful(row) for row in rows] or ["No feedback yet."]
        if admin:
            comments = await self._feedback.recent_comments(team, RECENT_COMMENTS)
            if comments:
                lines.append("*Recent comments on unhelpful answers*")
                lines += [f"• <#{c.channel}>, {c.persona} on {c.model}: “{c.text}”" for c in comments]
        return "\n".join(lines)
