"""``/usage``: this month's tokens and estimated cost, for the channel and the person who asks; admins
(``PERSONA_ADMINS``) also see the workspace total and the top channels and users. Answered through the
command's ``response_url``, like every command's answer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bot.errors import BotError
from bot.persona_commands import Invocation, PersonaCommands
from bot.slack import SlackAdapter
from bot.usage import RedisUsage

log = logging.getLogger(__name__)


def _figures(month: Mapping[str, int], scope: str) -> str:
    tokens = month.get(f"{scope}:prompt", 0) + month.get(f"{scope}:completion", 0)
    cost = month.get(f"{scope}:micro_usd", 0) / 1_000_000
    replies = month.get(f"{scope}:replies", 0)
    estimated = month.get(f"{scope}:estimated", 0)
    note = f", {estimated} estimated with tiktoken" if estimated else ""
    return f"{tokens:,} tokens in {replies:,} replies, about ${cost:,.2f}{note}"


def _top(month: Mapping[str, int], kind: str, mention: str, count: int = 5) -> list[str]:
    totals: dict[str, int] = {}
    for field, value in month.items():
        parts = field.split(":")
        if parts[0] == kind and parts[-1] in ("prompt", "completion"):
            totals[":".join(parts[1:-1])] = totals.get(":".join(parts[1:-1]), 0) + value
    ranked = sorted(totals, key=lambda k: totals[k], reverse=True)[:count]
    return [f"• {mention.format(k)}: {_figures(month, f'{kind}:{k}')}" for k in ranked]


class UsageReport:
    """``/usage``: this month's tokens and estimated cost, for the channel and the caller; admins also
    get the workspace total and the top channels and users."""

    def __init__(self, slack: SlackAdapter, usage: RedisUsage, personas: PersonaCommands) -> None:
        self._slack = slack
        self._usage = usage
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
        if await self._personas.is_admin(user):
            lines += [f"Workspace: {_figures(month, 'all')}", "*Top channels*"]
            lines += [*_top(month, "ch", "<#{}>"), "*Top users*", *_top(month, "u", "<@{}>")]
        lines.append("_Costs are estimates from the price table._")
        return "\n".join(lines)
