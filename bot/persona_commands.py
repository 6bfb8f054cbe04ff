"""Personas managed from Slack: the ``/persona`` verbs, the editor's submission, the App Home tab.

The ingress acknowledges Slack first and calls in after (``ingress.py``); every Slack call goes through
the Slack adapter. Answers to a command reach the person who used it through the command's
``response_url``, which works in private channels and DMs the bot is not in; a change is announced in
the channel in one line. Only these commands and the editor change stored personas; nothing said in a
conversation does.

Who may change a channel's persona: members of ``PERSONA_ADMINS`` (user ids or user group ids) when it
is set, otherwise any member of the channel; everybody may look. A DM's persona belongs to its user,
who may always change it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from bot.domain import Persona, TokenCounter
from bot.errors import BotError
from bot.personas import ALLOWED, CUSTOM_NAME, NAME_PATTERN, NAME_RULE, PersonaStore, persona_errors
from bot.retention import MIN_SECONDS as RETENTION_MIN_SECONDS
from bot.retention import ChannelRetention, parse_duration
from bot.slack import SlackAdapter, is_slack_id
from bot.views import (
    describe_assignment,
    describe_change,
    describe_duration,
    editor_view,
    home_view,
    parse_editor,
    persona_from_editor,
)

log = logging.getLogger(__name__)

USAGE = (
    "*/persona* shows this channel's persona. Also:\n"
    "• `/persona list`: the named personas\n"
    "• `/persona use NAME`, `/persona set <prompt>`, `/persona reset`: change this channel's persona\n"
    "• `/persona edit`: edit the prompt and every model parameter\n"
    "• `/persona create NAME [prompt]`, `/persona delete NAME`: manage named personas\n"
    "• `/persona history`, `/persona undo`: the last changes here, and taking the latest back\n"
    "• `/persona retention [12h | 7d | default]`: how long I keep this channel's threads\n"
    "Start a thread with `persona:NAME` to use another persona in that thread only. "
    "In a DM with me, the same commands set your own persona."
)
MODEL_LIST_SECONDS = 300.0
# The editor's submission must be answered within Slack's three seconds, permission check included.
PERMISSION_CHECK_SECONDS = 2.0


class ModelList:
    """The endpoint's model ids for the editor, fetched at most every few minutes; empty when the
    endpoint has no list (the editor then takes a typed name)."""

    def __init__(self, fetch: Callable[[], Awaitable[list[str]]]) -> None:
        self._fetch = fetch
        self._models: list[str] = []
        self._fetched_at = float("-inf")

    async def get(self) -> list[str]:
        if time.monotonic() - self._fetched_at >= MODEL_LIST_SECONDS:
            try:
                self._models = await self._fetch()
            except BotError as exc:
                log.info("no model list from the endpoint: %s", exc)
                self._models = []
            self._fetched_at = time.monotonic()
        return self._models


@dataclass(frozen=True, slots=True)
class Invocation:
    """One use of a slash command: who, where, what was typed, and how to answer."""

    team: str
    channel: str
    user: str
    text: str
    trigger_id: str
    response_url: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Invocation:
        team, channel, user = body.get("team_id"), body.get("channel_id"), body.get("user_id")
        if not (is_slack_id(team) and is_slack_id(channel) and is_slack_id(user)):
            raise BotError("a slash command with malformed ids")
        return cls(
            team=str(team),
            channel=str(channel),
            user=str(user),
            text=str(body.get("text") or ""),
            trigger_id=str(body.get("trigger_id") or ""),
            response_url=str(body.get("response_url") or ""),
        )


Verb = Callable[[Invocation, str], Awaitable[str]]


class PersonaCommands:
    """The ``/persona`` verbs, the editor and App Home, over the Slack adapter and the persona store."""

    def __init__(
        self,
        slack: SlackAdapter,
        store: PersonaStore,
        counter: TokenCounter,
        admins: frozenset[str],
        retention: ChannelRetention,
        models: ModelList | None = None,
        privacy: str = "",
    ) -> None:
        self._slack = slack
        self._retention = retention
        self._privacy = privacy  # what the bot keeps, for help and App Home
        self._store = store
        self._counter = counter
        self._admins = admins
        self._models = models
        # verb -> (what it does, whether it changes anything: only those check permission)
        self._verbs: dict[str, tuple[Verb, bool]] = {
            "": (self._show, False),
            "show": (self._show, False),
            "list": (self._list, False),
            "history": (self._history, False),
            "retention": (self._retention_verb, False),  # shows; a change checks permission itself
            "help": (self._help, False),
            "?": (self._help, False),
            "use": (self._use, True),
            "set": (self._set, True),
            "reset": (self._reset, True),
            "undo": (self._undo, True),
            "edit": (self._edit, True),
            "create": (self._create, True),
            "delete": (self._delete, True),
        }

    async def command(self, body: Mapping[str, Any]) -> None:
        """Run one ``/persona`` (already acknowledged) and answer whoever used it."""
        call = Invocation.of(body)
        verb, _, rest = call.text.strip().partition(" ")
        run, changes = self._verbs.get(verb.lower(), (self._unknown, False))
        try:
            if changes and not await self.may_change(call.channel, call.user):
                answer = self._refusal()
            else:
                answer = await run(call, rest.strip())
        except BotError as exc:
            log.warning("/persona %s failed: %s", verb.lower(), exc)
            answer = exc.user_message
        if answer:
            await self._slack.respond(call.response_url, answer)

    async def is_admin(self, user: str) -> bool:
        """True when ``user`` is in ``PERSONA_ADMINS``, by id or through a user group."""
        if user in self._admins:
            return True
        for group in (a for a in self._admins if a.startswith("S")):
            if await self._slack.in_group(group, user):
                return True
        return False

    async def may_change(self, channel: str, user: str) -> bool:
        """The permission rule in the module docstring."""
        if channel.startswith("D"):
            return True
        if self._admins:
            return await self.is_admin(user)
        return await self._slack.is_member(channel, user)

    def _refusal(self) -> str:
        who = "PERSONA_ADMINS" if self._admins else "members of this channel"
        return f"Sorry, you may not change the persona here: only {who} may."

    # The verbs: each returns the answer for the person who used it ("" when a change was announced).

    async def _show(self, call: Invocation, rest: str) -> str:
        shown = describe_assignment(await self._store.assignment(call.team, call.channel))
        return f"{shown}\n{await self._kept_for(call)}"

    async def _kept_for(self, call: Invocation) -> str:
        own = await self._retention.of(call.team, call.channel)
        seconds = await self._retention.lifetime(call.team, call.channel)
        whose = "this channel's retention" if own else "the default; `/persona retention` sets a shorter one"
        return f"Threads here are kept {describe_duration(seconds)} after their last activity ({whose})."

    async def _retention_verb(self, call: Invocation, rest: str) -> str:
        if not rest:
            return await self._kept_for(call)
        reset = rest.lower() in ("default", "reset")
        seconds = None if reset else parse_duration(rest)
        longest = self._retention.default_seconds
        if not reset and (seconds is None or not RETENTION_MIN_SECONDS <= seconds <= longest):
            return (
                f"`/persona retention` takes a duration from 1h to {describe_duration(longest)} "
                "(like `12h` or `7d`), or `default`."
            )
        if not await self.may_change(call.channel, call.user):
            return self._refusal()
        shortened = await self._retention.set(call.team, call.channel, seconds)
        kept = await self._kept_for(call)
        return f"{kept} Existing threads shortened to it: {shortened}." if shortened else kept

    async def _list(self, call: Invocation, rest: str) -> str:
        named = await self._store.named(call.team)
        if not named:
            return "There are no named personas yet. Create one with `/persona create NAME <prompt>`."
        return "Named personas:\n" + "\n".join(
            f"• *{name}* ({origin}): {persona.system_prompt.splitlines()[0][:80]}"
            for name, (persona, origin) in named.items()
        )

    async def _history(self, call: Invocation, rest: str) -> str:
        changes = await self._store.history(call.team, call.channel)
        return "\n".join(map(describe_change, changes)) if changes else "No persona changes here yet."

    async def _help(self, call: Invocation, rest: str) -> str:
        return f"{USAGE}\n{self._privacy}" if self._privacy else USAGE

    async def _unknown(self, call: Invocation, rest: str) -> str:
        verb = call.text.strip().partition(" ")[0]
        return f"I don't know `/persona {verb}`.\n{USAGE}"

    async def _use(self, call: Invocation, name: str) -> str:
        persona = await self._store.find(call.team, name) if name else None
        if persona is None:
            names = ", ".join(await self._store.named(call.team)) or "none yet"
            return f"There is no persona named `{name}`. Named personas: {names}."
        return await self._apply(call, persona, "use")

    async def _set(self, call: Invocation, prompt: str) -> str:
        if persona_errors({"system_prompt": prompt}, self._counter):
            return f"`/persona set <prompt>` needs {ALLOWED['system_prompt']}."
        return await self._apply(call, Persona(CUSTOM_NAME, prompt), "set")

    async def _reset(self, call: Invocation, rest: str) -> str:
        return await self._apply(call, None, "reset")

    async def _undo(self, call: Invocation, rest: str) -> str:
        change = await self._store.undo(call.team, call.channel, by=call.user)
        if change is None:
            return "There is nothing to undo here."
        return await self._announce(call, change.after or self._store.default)

    async def _edit(self, call: Invocation, rest: str) -> str:
        current = (await self._store.assignment(call.team, call.channel)).persona
        await self._slack.open_view(call.trigger_id, await self._editor(call.channel, current))
        return ""

    async def _create(self, call: Invocation, rest: str) -> str:
        name, _, prompt = rest.partition(" ")
        if not NAME_PATTERN.match(name):
            return f"`/persona create NAME [prompt]`: a name is {NAME_RULE}."
        if not prompt.strip():  # create NAME: the editor fills it in
            editor = await self._editor(call.channel, replace(self._store.default, name=name), name)
            await self._slack.open_view(call.trigger_id, editor)
            return ""
        if persona_errors({"system_prompt": prompt}, self._counter):
            return f"`/persona create NAME <prompt>` needs {ALLOWED['system_prompt']}."
        await self._store.save_named(call.team, Persona(name, prompt.strip()))
        return f"Created the persona *{name}*. Use it here with `/persona use {name}`."

    async def _delete(self, call: Invocation, name: str) -> str:
        if not NAME_PATTERN.match(name):
            return f"`/persona delete NAME`: a name is {NAME_RULE}."
        in_file = name in self._store.files.named
        if await self._store.delete_named(call.team, name):
            again = " The persona of that name in PERSONAS_FILE applies again." if in_file else ""
            return f"Deleted the persona *{name}*.{again}"
        if in_file:
            return (
                f"*{name}* is defined in PERSONAS_FILE and cannot be deleted here; "
                "create one of the same name to shadow it."
            )
        return f"There is no persona named `{name}` made in Slack."

    async def _apply(self, call: Invocation, persona: Persona | None, action: str) -> str:
        await self._store.assign(call.team, call.channel, persona, by=call.user, action=action)
        return await self._announce(call, persona or self._store.default)

    async def _announce(self, call: Invocation, persona: Persona) -> str:
        """A channel hears of a change in one line; in a DM the change is only the user's own business."""
        if call.channel.startswith("D"):
            return f"Persona for our conversations is now *{persona.name}*."
        await self._slack.announce(
            call.channel, f":performing_arts: <@{call.user}> set this channel's persona to *{persona.name}*."
        )
        return ""

    async def _editor(self, channel: str, persona: Persona, save_as: str = "") -> dict[str, Any]:
        models = await self._models.get() if self._models else []
        return editor_view(channel, persona, save_as, models)

    # The editor: checked before its acknowledgement (errors must travel in it), saved after.

    async def check_editor(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The acknowledgement's errors for a submitted editor, field by field (a value out of its
        range, or no permission to change the channel), or None when it may be saved."""
        fields, errors, _ = parse_editor(body["view"]["state"]["values"])
        errors = {**persona_errors(fields, self._counter), **errors}
        if not errors and not await self._may_save(body):
            errors["system_prompt"] = f"{self._refusal()} Nothing was saved."
        return {"response_action": "errors", "errors": errors} if errors else None

    async def _may_save(self, body: Mapping[str, Any]) -> bool:
        channel = _editor_channel(body)
        try:
            async with asyncio.timeout(PERMISSION_CHECK_SECONDS):
                return await self.may_change(channel, body["user"]["id"])
        except (TimeoutError, BotError) as exc:
            log.warning("could not check who may change a persona: %s", type(exc).__name__)
            return False

    async def save_editor(self, body: Mapping[str, Any]) -> None:
        """Store a submitted editor that ``check_editor`` let through: the channel's persona, and the
        named persona when it was given a name."""
        team, user = body["team"]["id"], body["user"]["id"]
        channel = _editor_channel(body)
        fields, _, save_as = parse_editor(body["view"]["state"]["values"])
        persona = persona_from_editor(fields, save_as or CUSTOM_NAME)
        try:
            if save_as:
                await self._store.save_named(team, persona)
            await self._store.assign(team, channel, persona, by=user, action="edit")
        except BotError as exc:  # the editor has closed: the one who saved must hear of it elsewhere
            log.warning("saving the persona editor failed: %s", exc)
            await self._slack.tell(user, channel, f"Your persona was not saved. {exc.user_message}")
            return
        if channel.startswith("D"):
            await self._slack.tell(user, channel, f"Persona for our conversations is now *{persona.name}*.")
        else:
            await self._slack.announce(
                channel, f":performing_arts: <@{user}> set this channel's persona to *{persona.name}*."
            )

    async def open_editor_from_home(self, body: Mapping[str, Any]) -> None:
        """An App Home "Edit" button: the editor for that channel."""
        channel = str(body["actions"][0]["value"])
        try:
            current = (await self._store.assignment(body["team"]["id"], channel)).persona
            await self._slack.open_view(body["trigger_id"], await self._editor(channel, current))
        except BotError as exc:
            log.warning("opening the persona editor failed: %s", exc)
            await self._slack.tell(
                body["user"]["id"], channel, f"I couldn't open the editor. {exc.user_message}"
            )

    async def publish_home(self, team: str, user: str) -> None:
        """The App Home tab: the user's DM persona, the bot's channels, the named personas."""
        conversations = [(await self._slack.dm_channel(user), "Your direct messages with me")]
        conversations += [(channel, f"#{name}") for channel, name in await self._slack.bot_channels()]
        rows = [
            (channel, label, (await self._store.assignment(team, channel)).persona)
            for channel, label in conversations
        ]
        await self._slack.publish_home(user, home_view(rows, await self._store.named(team), self._privacy))


def _editor_channel(body: Mapping[str, Any]) -> str:
    channel = orjson.loads(body["view"]["private_metadata"])["channel"]
    if not is_slack_id(channel):
        raise BotError("an editor for a malformed channel id")
    return str(channel)
