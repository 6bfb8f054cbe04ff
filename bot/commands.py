"""Personas managed from Slack: the ``/persona`` command, the editor modal and the App Home tab.

Every entry point acknowledges Slack first (``ingress.py`` acks before calling in) and answers after:
ephemeral replies go through ``chat.postEphemeral``, a change is announced in the channel in one line.
Only these commands and the modal change stored configuration; nothing said in a conversation does.

Who may change a channel's persona: members of ``PERSONA_ADMINS`` (user ids or user group ids) when it
is set, otherwise any member of the channel; everybody may look. A DM's persona belongs to its user.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.domain import Persona, TokenCounter
from bot.errors import BotError
from bot.history import redis_errors
from bot.personas import (
    ALLOWED,
    CUSTOM_NAME,
    NAME_PATTERN,
    NAME_RULE,
    Assignment,
    Change,
    PersonaStore,
    persona_errors,
)
from bot.usage import RedisUsage

log = logging.getLogger(__name__)

EDITOR_CALLBACK = "persona_editor"
EDIT_ACTION = "persona_edit"
USAGE = (
    "*/persona* shows this channel's persona. Also:\n"
    "• `/persona list`: the named personas\n"
    "• `/persona use NAME`, `/persona set <prompt>`, `/persona reset`: change this channel's persona\n"
    "• `/persona edit`: edit the prompt and model parameters\n"
    "• `/persona create NAME [prompt]`, `/persona delete NAME`: manage named personas\n"
    "• `/persona history`, `/persona undo`: the last changes here, and taking the latest back\n"
    "Start a thread with `persona:NAME` to use another persona in that thread only."
)
# The editor's fields, in order: block id -> (label, parse as, multiline).
FIELDS: dict[str, tuple[str, type, bool]] = {
    "system_prompt": ("System prompt", str, True),
    "model": ("Model", str, False),
    "temperature": ("Temperature (0 to 2)", float, False),
    "top_p": ("Top p (0 to 1)", float, False),
    "max_tokens": ("Max reply tokens", int, False),
    "presence_penalty": ("Presence penalty (-2 to 2)", float, False),
    "frequency_penalty": ("Frequency penalty (-2 to 2)", float, False),
    "stop": ("Stop sequences (one per line, at most 4)", list, True),
}


def when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe(persona: Persona, lines: int = 3) -> str:
    """A persona in a few lines: name, the start of its prompt, the parameters it sets."""
    prompt = "\n".join(f"> {line}" for line in persona.system_prompt.splitlines()[:lines] if line.strip())
    params = [f"{f} {getattr(persona, f)!r}" for f in FIELDS if f != "system_prompt" and getattr(persona, f)]
    return f"*{persona.name}*\n{prompt}" + (f"\n{' · '.join(params)}" if params else "")


def describe_assignment(assignment: Assignment) -> str:
    origin = {
        "slack": f"set by <@{assignment.by}> on {when(assignment.at)}" if assignment.by else "set in Slack",
        "file": "set in PERSONAS_FILE",
        "default": "the default persona",
    }[assignment.source]
    if assignment.source == "default" and assignment.by:
        origin = f"reset to the default by <@{assignment.by}> on {when(assignment.at)}"
    return f"Persona in force here ({origin}):\n{describe(assignment.persona)}"


def describe_change(change: Change) -> str:
    before = change.before.name if change.before else "default"
    after = change.after.name if change.after else "default"
    return f"{when(change.at)}: <@{change.by}> {change.action}: *{before}* → *{after}*"


MODEL_LIST_SECONDS = 300.0


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


def parse_editor(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """A submitted editor's state -> (persona fields, errors by block id, save-as name)."""
    fields: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for block, (_, kind, _) in FIELDS.items():
        state = (values.get(block) or {}).get("value") or {}
        raw = (state.get("selected_option") or {}).get("value") or state.get("value")
        if raw is None or not str(raw).strip():
            continue
        text = str(raw).strip()
        try:
            if kind is list:
                fields[block] = [line for line in str(raw).splitlines() if line]
            elif kind is str:
                fields[block] = text if block == "model" else str(raw)
            else:
                fields[block] = kind(text)
        except ValueError:
            errors[block] = f"Must be {ALLOWED[block]}."
    save_as = str(((values.get("save_as") or {}).get("value") or {}).get("value") or "").strip()
    if save_as and not NAME_PATTERN.match(save_as):
        errors["save_as"] = f"A name is {NAME_RULE}."
    return fields, errors, save_as


def _model_menu(models: list[str], current: str | None) -> dict[str, Any]:
    # Slack shows at most 100 options; the one in use stays selectable even past that.
    names = models[:99] + ([current] if current and current not in models[:99] else [])
    options = [{"text": {"type": "plain_text", "text": m[:75]}, "value": m} for m in names]
    element: dict[str, Any] = {"type": "static_select", "action_id": "value", "options": options}
    if current:
        element["initial_option"] = options[names.index(current)]
    return element


def editor_view(
    channel: str, persona: Persona, save_as: str = "", models: list[str] | None = None
) -> dict[str, Any]:
    """The modal that edits a channel's persona (or creates a named one); ``models`` offers a menu."""
    blocks: list[dict[str, Any]] = []
    for block, (label, kind, multiline) in FIELDS.items():
        current = getattr(persona, block)
        initial = (
            "\n".join(current) if kind is list and current else ("" if current is None else str(current))
        )
        element: dict[str, Any] = {"type": "plain_text_input", "action_id": "value", "multiline": multiline}
        if block == "model" and models:
            element = _model_menu(models, current)
        elif initial:
            element["initial_value"] = initial
        blocks.append(
            {
                "type": "input",
                "block_id": block,
                "optional": block != "system_prompt",
                "label": {"type": "plain_text", "text": label},
                "element": element,
            }
        )
    save_element: dict[str, Any] = {"type": "plain_text_input", "action_id": "value"}
    if save_as:
        save_element["initial_value"] = save_as
    blocks.append(
        {
            "type": "input",
            "block_id": "save_as",
            "optional": True,
            "label": {"type": "plain_text", "text": "Save as named persona"},
            "hint": {"type": "plain_text", "text": f"Optional. {NAME_RULE}."},
            "element": save_element,
        }
    )
    return {
        "type": "modal",
        "callback_id": EDITOR_CALLBACK,
        "private_metadata": orjson.dumps({"channel": channel}).decode(),
        "title": {"type": "plain_text", "text": "Edit persona"},
        "submit": {"type": "plain_text", "text": "Save"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }


class PersonaCommands:
    """The ``/persona`` command, the editor and App Home, over one Web API client and the store."""

    def __init__(
        self,
        client: AsyncWebClient,
        store: PersonaStore,
        counter: TokenCounter,
        admins: frozenset[str],
        models: ModelList | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._counter = counter
        self._admins = admins
        self._models = models

    async def _editor(self, channel: str, persona: Persona, save_as: str = "") -> dict[str, Any]:
        models = await self._models.get() if self._models else []
        return editor_view(channel, persona, save_as, models)

    async def is_admin(self, user: str) -> bool:
        """True when ``user`` is in ``PERSONA_ADMINS``, by id or through a user group."""
        if user in self._admins:
            return True
        for group in (a for a in self._admins if a.startswith("S")):
            response = await self._client.usergroups_users_list(usergroup=group)
            if user in response.get("users", []):
                return True
        return False

    async def may_change(self, team: str, channel: str, user: str) -> bool:
        """The permission rule in the module docstring."""
        if self._admins:
            return await self.is_admin(user)
        if channel.startswith("D"):
            return True
        cursor = None
        while True:
            page = await self._client.conversations_members(channel=channel, cursor=cursor, limit=1000)
            if user in page.get("members", []):
                return True
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return False

    async def command(self, body: Mapping[str, Any]) -> None:
        """Handle one ``/persona`` invocation (already acked)."""
        team, channel, user = body["team_id"], body["channel_id"], body["user_id"]
        verb, _, rest = str(body.get("text") or "").strip().partition(" ")
        verb, rest = verb.lower(), rest.strip()
        try:
            with redis_errors(f"running /persona {verb}"):
                answer = await self._dispatch(
                    team, channel, user, verb, rest, str(body.get("trigger_id", ""))
                )
        except SlackApiError as exc:
            log.warning("/persona %s failed on Slack: %s", verb, exc.response.get("error"))
            answer = "Sorry, Slack refused part of that. Please try again."
        except BotError as exc:
            log.warning("/persona %s failed: %s", verb, exc)
            answer = exc.user_message
        if answer:
            await self.tell(channel, user, answer)

    async def _dispatch(self, team: str, channel: str, user: str, verb: str, rest: str, trigger: str) -> str:
        store = self._store
        if verb in ("", "show"):
            return describe_assignment(await store.assignment(team, channel))
        if verb == "list":
            named = await store.named(team)
            if not named:
                return "There are no named personas yet. Create one with `/persona create NAME <prompt>`."
            return "Named personas:\n" + "\n".join(
                f"• *{name}* ({origin}): {persona.system_prompt.splitlines()[0][:80]}"
                for name, (persona, origin) in named.items()
            )
        if verb == "history":
            changes = await store.history(team, channel)
            return "\n".join(map(describe_change, changes)) if changes else "No persona changes here yet."
        if verb in ("help", "?"):
            return USAGE
        if verb not in ("use", "set", "reset", "edit", "create", "delete", "undo"):
            return f"I don't know `/persona {verb}`.\n{USAGE}"
        if not await self.may_change(team, channel, user):
            return "Sorry, you may not change personas here." + (
                " Only PERSONA_ADMINS may." if self._admins else " Only members of this channel may."
            )
        return await self._change(team, channel, user, verb, rest, trigger)

    async def _change(self, team: str, channel: str, user: str, verb: str, rest: str, trigger: str) -> str:
        store = self._store
        if verb == "use":
            persona = await store.find(team, rest) if rest else None
            if persona is None:
                names = ", ".join(await store.named(team)) or "none yet"
                return f"There is no persona named `{rest}`. Named personas: {names}."
            await self._apply(team, channel, user, persona, "use")
            return ""
        if verb == "set":
            errors = persona_errors({"system_prompt": rest}, self._counter)
            if errors:
                return f"`/persona set <prompt>` needs {ALLOWED['system_prompt']}."
            await self._apply(team, channel, user, Persona(CUSTOM_NAME, rest), "set")
            return ""
        if verb == "reset":
            await self._apply(team, channel, user, None, "reset")
            return ""
        if verb == "undo":
            change = await store.undo(team, channel, by=user)
            if change is None:
                return "There is nothing to undo here."
            await self.announce(channel, user, change.after or store.default)
            return ""
        if verb == "edit":
            current = (await store.assignment(team, channel)).persona
            await self._client.views_open(trigger_id=trigger, view=await self._editor(channel, current))
            return ""
        name, _, prompt = rest.partition(" ")
        if not NAME_PATTERN.match(name):
            return f"`/persona {verb} NAME`: a name is {NAME_RULE}."
        if verb == "delete":
            if await store.delete_named(team, name):
                shadowed = (
                    " The persona of that name in PERSONAS_FILE applies again."
                    if name in store.files.named
                    else ""
                )
                return f"Deleted the persona *{name}*.{shadowed}"
            if name in store.files.named:
                return (
                    f"*{name}* is defined in PERSONAS_FILE and cannot be deleted here; "
                    "create one of the same name to shadow it."
                )
            return f"There is no persona named `{name}` made in Slack."
        if not prompt.strip():  # create NAME: open the editor to fill it in
            await self._client.views_open(
                trigger_id=trigger, view=await self._editor(channel, replace(store.default, name=name), name)
            )
            return ""
        if persona_errors({"system_prompt": prompt}, self._counter):
            return f"`/persona create NAME <prompt>` needs {ALLOWED['system_prompt']}."
        await store.save_named(team, Persona(name, prompt.strip()))
        return f"Created the persona *{name}*. Use it here with `/persona use {name}`."

    async def _apply(self, team: str, channel: str, user: str, persona: Persona | None, action: str) -> None:
        await self._store.assign(team, channel, persona, by=user, action=action)
        await self.announce(channel, user, persona or self._store.default)

    async def submit_editor(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Validate a submitted editor: the ack payload with errors by field, or None when it is valid."""
        view = body["view"]
        fields, errors, _ = parse_editor(view["state"]["values"])
        errors = {**persona_errors(fields, self._counter), **errors}
        if errors:
            return {"response_action": "errors", "errors": errors}
        return None

    async def save_editor(self, body: Mapping[str, Any]) -> None:
        """Store a valid submitted editor (already acked): the channel's persona, or a named one."""
        team, user = body["team"]["id"], body["user"]["id"]
        view = body["view"]
        channel = orjson.loads(view["private_metadata"])["channel"]
        fields, _, save_as = parse_editor(view["state"]["values"])
        if not await self.may_change(team, channel, user):
            await self.tell(channel, user, "Sorry, you may not change personas here; nothing was saved.")
            return
        stop = fields.pop("stop", None)
        persona = Persona(name=save_as or CUSTOM_NAME, stop=tuple(stop) if stop else None, **fields)
        if save_as:
            await self._store.save_named(team, persona)
        await self._apply(team, channel, user, persona, "edit")

    async def open_editor_from_home(self, body: Mapping[str, Any]) -> None:
        """An App Home "Edit" button: the editor for that channel."""
        team = body["team"]["id"]
        channel = body["actions"][0]["value"]
        current = (await self._store.assignment(team, channel)).persona
        await self._client.views_open(
            trigger_id=body["trigger_id"], view=await self._editor(channel, current)
        )

    async def publish_home(self, team: str, user: str) -> None:
        """The App Home tab: the user's DM persona, the named personas, the bot's channels."""
        dm = (await self._client.conversations_open(users=user))["channel"]["id"]
        rows = [(dm, "Your direct messages with me")]
        channels = await self._client.users_conversations(types="public_channel,private_channel", limit=200)
        joined: list[dict[str, Any]] = channels.get("channels", [])
        rows += [(c["id"], f"#{c.get('name', c['id'])}") for c in joined]
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": "Personas"}}
        ]
        for channel, label in rows:
            persona = (await self._store.assignment(team, channel)).persona
            blocks.append(
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": f"{label}: *{persona.name}*"},
                    "accessory": {
                        "type": "button",
                        "action_id": EDIT_ACTION,
                        "value": channel,
                        "text": {"type": "plain_text", "text": "Edit"},
                    },
                }
            )
        named = await self._store.named(team)
        listing = "\n".join(f"• *{n}* ({origin})" for n, (_, origin) in named.items()) or "None yet."
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Named personas*\n{listing}"}})
        await self._client.views_publish(user_id=user, view={"type": "home", "blocks": blocks})

    async def tell(self, channel: str, user: str, text: str) -> None:
        """An ephemeral answer only ``user`` sees."""
        await self._client.chat_postEphemeral(channel=channel, user=user, text=text)

    async def announce(self, channel: str, user: str, persona: Persona) -> None:
        """One line in the channel, so members know the bot's behaviour changed (not in DMs)."""
        if channel.startswith("D"):
            await self.tell(channel, user, f"Persona for our conversations is now *{persona.name}*.")
            return
        await self._client.chat_postMessage(
            channel=channel,
            text=f":performing_arts: <@{user}> set this channel's persona to *{persona.name}*.",
        )


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

    def __init__(self, client: AsyncWebClient, usage: RedisUsage, personas: PersonaCommands) -> None:
        self._client = client
        self._usage = usage
        self._personas = personas

    async def command(self, body: Mapping[str, Any]) -> None:
        team, channel, user = body["team_id"], body["channel_id"], body["user_id"]
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
        await self._personas.tell(channel, user, "\n".join(lines))
