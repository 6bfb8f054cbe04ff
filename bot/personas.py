"""Personas: which system prompt and model parameters apply to a thread, and where they are kept.

Resolution: the persona pinned to the thread (a thread keeps the one it started with), else the one
its first message asked for (``persona:NAME``), else the channel's (set from Slack), else the channel's
mapping in ``PERSONAS_FILE``, else the default (``SYSTEM_PROMPT``).

``PERSONAS_FILE`` is YAML, validated at start-up; every problem in it is reported at once as a
``ConfigError``. Personas made in Slack live in Redis per workspace: named personas
(``sgb:persona:T:named``; they shadow a file persona of the same name), and each channel's assignment
with who set it and when, beside an audit list that ``/persona history`` and ``/persona undo`` read
(``sgb:{T:persona:C}:channel`` and ``:audit``, one hash tag: one Redis Cluster slot). Nothing is
cached in-process, so every replica sees a change at once.

    personas:
      pirate:
        system_prompt: "You are a pirate. Answer like one."
        model: gpt-4o
        temperature: 0.9
    channels:
      C0123456789: pirate
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import redis.asyncio as redis
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from bot.domain import Persona, ThreadKey, TokenCounter
from bot.errors import ConfigError
from bot.params import PARAMS, persona_value
from bot.redis_client import glob_escape, keys_matching, redis_errors

DEFAULT_NAME = "default"
CUSTOM_NAME = "custom"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
NAME_RULE = "1-40 characters: letters, digits, - and _"
MAX_PROMPT_TOKENS = 8000
AUDIT_KEPT = 50
# What each field allows, in the words users see when a value is refused.
ALLOWED = {"system_prompt": f"a prompt of 1 to {MAX_PROMPT_TOKENS:,} tokens"} | {
    param.name: param.allowed for param in PARAMS
}

# A persona as the file and the editor give it: a prompt, and any chat parameter within its range.
_SPEC_FIELDS: dict[str, Any] = {"system_prompt": (Annotated[str, Field(min_length=1)], ...)} | {
    param.name: (param.annotation | None, None) for param in PARAMS
}
_PersonaSpec: type[BaseModel] = create_model(
    "_PersonaSpec", __config__=ConfigDict(extra="forbid"), **_SPEC_FIELDS
)


class _PersonasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personas: dict[str, dict[str, Any]] = {}
    channels: dict[str, str] = {}


def _problems(exc: ValidationError, source: str, *within: str) -> list[str]:
    return [f"{source}: {'.'.join([*within, *map(str, e['loc'])])}: {e['msg']}" for e in exc.errors()]


def parse_personas(text: str, source: str = "PERSONAS_FILE") -> tuple[dict[str, Persona], dict[str, str]]:
    """Named personas and the channel -> persona-name mapping from YAML text."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source} is not valid YAML: {exc}"]) from None
    problems = []
    parsed = _PersonasFile()
    try:
        parsed = _PersonasFile.model_validate(raw)
    except ValidationError as exc:
        problems = _problems(exc, source)
    specs = {}
    for name, spec in parsed.personas.items():
        try:
            specs[name] = _PersonaSpec.model_validate(spec).model_dump()
        except ValidationError as exc:
            problems += _problems(exc, source, "personas", name)
    names = raw.get("personas") if isinstance(raw, dict) else None
    channels = raw.get("channels") if isinstance(raw, dict) else None
    if isinstance(channels, dict):
        known = set(names) if isinstance(names, dict) else set()
        problems += [
            f"{source}: channel {c} maps to unknown persona {n!r}"
            for c, n in channels.items()
            if n not in known
        ]
    if problems:
        raise ConfigError(problems)
    personas = {
        name: Persona(name=name, **{key: persona_value(value) for key, value in spec.items()})
        for name, spec in specs.items()
    }
    return personas, dict(parsed.channels)


class FilePersonas:
    """Implements ``domain.PersonaSource`` from the default prompt and an optional personas file."""

    def __init__(self, default: Persona, named: Mapping[str, Persona], channels: Mapping[str, str]) -> None:
        self.default = default
        self.named = dict(named)
        self.channels = dict(channels)

    @classmethod
    def load(cls, system_prompt: str, path: Path | None) -> FilePersonas:
        """Read ``path`` (if any) once, at start-up."""
        default = Persona(name=DEFAULT_NAME, system_prompt=system_prompt)
        if path is None:
            return cls(default, {}, {})
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"PERSONAS_FILE {path} cannot be read: {exc.strerror}"]) from None
        named, channels = parse_personas(text, f"PERSONAS_FILE {path}")
        return cls(default, named, channels)


def persona_errors(fields: Mapping[str, Any], counter: TokenCounter) -> dict[str, str]:
    """Field -> what is allowed, for every field of a persona that breaks a rule; empty when valid."""
    errors: dict[str, str] = {}
    try:
        _PersonaSpec.model_validate(fields)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "system_prompt"
            errors[field] = f"Must be {ALLOWED.get(field, 'valid')}."
    prompt = fields.get("system_prompt")
    if isinstance(prompt, str) and counter.message_tokens("system", prompt) > MAX_PROMPT_TOKENS:
        errors["system_prompt"] = f"Too long: must be {ALLOWED['system_prompt']}."
    return errors


def _dump(persona: Persona | None) -> dict[str, Any] | None:
    return None if persona is None else {k: v for k, v in asdict(persona).items() if v is not None}


def _load(data: Mapping[str, Any] | None) -> Persona | None:
    if not data:
        return None
    return Persona(**{key: persona_value(value) for key, value in data.items()})


@dataclass(frozen=True, slots=True)
class Assignment:
    """The persona in force in a channel, and where it came from."""

    persona: Persona
    source: str  # "slack", "file" or "default"
    by: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a channel's persona history."""

    by: str
    at: float
    before: Persona | None
    after: Persona | None
    action: str  # "use", "set", "edit", "reset", "undo"


def channel_key(prefix: str, team: str, channel: str, kind: str) -> str:
    """Where a channel's persona (``kind`` "channel") or its audit ("audit") lives."""
    # The two share the tag {T:persona:C}: one Redis Cluster slot, so the MULTI that changes the one
    # and records it in the other is legal there.
    return f"{prefix}{{{team}:persona:{channel}}}:{kind}"


class PersonaStore:
    """Implements ``domain.PersonaSource``: file personas plus those made in Slack, kept in Redis."""

    def __init__(
        self, client: redis.Redis, files: FilePersonas, *, prefix: str, thread_ttl_seconds: int
    ) -> None:
        self._redis = client
        self.files = files
        self._prefix = prefix
        self._thread_ttl = thread_ttl_seconds

    @property
    def default(self) -> Persona:
        return self.files.default

    def _key(self, team: str, *parts: str) -> str:
        return ":".join([f"{self._prefix}persona", team, *parts])

    def _channel_key(self, team: str, channel: str, kind: str) -> str:
        return channel_key(self._prefix, team, channel, kind)

    async def named(self, team: str) -> dict[str, tuple[Persona, str]]:
        """Every named persona -> (persona, "file" or "slack"); a Slack one shadows a file one."""
        found = {name: (persona, "file") for name, persona in self.files.named.items()}
        with redis_errors("reading the named personas"):
            stored = await self._redis.hgetall(self._key(team, "named"))
        for name, raw in stored.items():
            persona = _load(orjson.loads(raw))
            if persona is not None:
                found[str(name)] = (persona, "slack")
        return dict(sorted(found.items()))

    async def find(self, team: str, name: str) -> Persona | None:
        with redis_errors("reading a persona"):
            raw = await self._redis.hget(self._key(team, "named"), name)
        return _load(orjson.loads(raw)) if raw else self.files.named.get(name)

    async def save_named(self, team: str, persona: Persona) -> None:
        with redis_errors("saving a persona"):
            await self._redis.hset(
                self._key(team, "named"), persona.name, orjson.dumps(_dump(persona)).decode()
            )

    async def delete_named(self, team: str, name: str) -> bool:
        """Delete a persona made in Slack; False when there is none (file personas cannot be deleted)."""
        with redis_errors("deleting a persona"):
            return bool(await self._redis.hdel(self._key(team, "named"), name))

    async def assignment(self, team: str, channel: str) -> Assignment:
        """The channel's persona as set in Slack, else by the file, else the default."""
        with redis_errors("reading a channel's persona"):
            raw = await self._redis.get(self._channel_key(team, channel, "channel"))
        return self._assignment(channel, raw)

    def _assignment(self, channel: str, raw: str | bytes | None) -> Assignment:
        if raw:
            data = orjson.loads(raw)
            persona = _load(data["persona"])
            if persona is not None:
                return Assignment(persona, "slack", data["by"], data["at"])
            return Assignment(self.default, "default", data["by"], data["at"])
        mapped = self.files.channels.get(channel)
        if mapped:
            return Assignment(self.files.named[mapped], "file")
        return Assignment(self.default, "default")

    async def assign(
        self, team: str, channel: str, persona: Persona | None, *, by: str, action: str
    ) -> Change:
        """Make ``persona`` (None: the default) the channel's, and record the change."""
        before = await self.assignment(team, channel)
        now = time.time()
        change = Change(by, now, before.persona, persona or self.default, action)
        entry = {
            "by": by,
            "at": now,
            "before": _dump(change.before),
            "after": _dump(change.after),
            "action": action,
        }
        with redis_errors("changing a channel's persona"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(
                    self._channel_key(team, channel, "channel"),
                    orjson.dumps({"persona": _dump(persona), "by": by, "at": now}),
                )
                pipe.lpush(self._channel_key(team, channel, "audit"), orjson.dumps(entry))
                pipe.ltrim(self._channel_key(team, channel, "audit"), 0, AUDIT_KEPT - 1)
                await pipe.execute()
        return change

    async def history(self, team: str, channel: str, count: int = 10) -> list[Change]:
        """The channel's latest changes, newest first."""
        with redis_errors("reading a channel's persona history"):
            raws = await self._redis.lrange(self._channel_key(team, channel, "audit"), 0, count - 1)
        changes = []
        for raw in raws:
            data = orjson.loads(raw)
            changes.append(
                Change(data["by"], data["at"], _load(data["before"]), _load(data["after"]), data["action"])
            )
        return changes

    async def undo(self, team: str, channel: str, *, by: str) -> Change | None:
        """Restore the persona the channel had before its latest change."""
        latest = await self.history(team, channel, 1)
        if not latest:
            return None
        before = latest[0].before
        return await self.assign(
            team, channel, None if before == self.default else before, by=by, action="undo"
        )

    async def forget_person(self, team: str, user: str, dm: str) -> tuple[bool, int]:
        """``/forget me``: the persona of ``user``'s DMs (``dm``) and its history go, and the changes they
        made elsewhere no longer name them. Whether there was a DM persona, and how many changes were
        made anonymous."""
        channels = glob_escape(f"{self._prefix}{{{team}:persona:") + "*"
        anonymised = 0
        with redis_errors("forgetting a person's personas"):
            had_dm = bool(await self._redis.delete(self._channel_key(team, dm, "channel")))
            await self._redis.delete(self._channel_key(team, dm, "audit"))
            for key in await keys_matching(self._redis, f"{channels}}}:channel"):
                raw = await self._redis.get(key)
                if raw is not None and (data := orjson.loads(raw)).get("by") == user:
                    await self._redis.set(key, orjson.dumps(data | {"by": ""}), xx=True, keepttl=True)
            for key in await keys_matching(self._redis, f"{channels}}}:audit"):
                for index, raw in enumerate(await self._redis.lrange(key, 0, -1)):
                    if (entry := orjson.loads(raw)).get("by") == user:
                        await self._redis.lset(key, index, orjson.dumps(entry | {"by": ""}).decode())
                        anonymised += 1
        return had_dm, anonymised

    async def forget_channel(self, team: str, channel: str) -> None:
        """``/forget channel``: the channel's persona set in Slack and its history."""
        with redis_errors("forgetting a channel's persona"):
            await self._redis.delete(
                self._channel_key(team, channel, "channel"), self._channel_key(team, channel, "audit")
            )

    def _pin(self, key: ThreadKey) -> str:
        return f"{self._prefix}{{{key.team}:{key.channel}:{key.thread_ts}}}:persona"

    async def unpin(self, key: ThreadKey) -> None:
        """Forget the thread's pinned persona (the thread is gone)."""
        with redis_errors("forgetting a thread's persona"):
            await self._redis.delete(self._pin(key))

    async def resolve(self, key: ThreadKey, requested: str | None = None, *, pin: bool = True) -> Persona:
        """The thread's pinned persona; else the requested named one or the channel's, pinned from now on
        (unless not ``pin``: a shortcut's answer leaves the thread's choice to its next reply)."""
        key_of_pin = self._pin(key)
        with redis_errors("resolving a persona"):
            # The channel's persona is read with the pin, in the same round trip: a first reply in a
            # thread needs it, and a follow-up pays only a small read for it.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.getex(key_of_pin, ex=self._thread_ttl)
                pipe.get(self._channel_key(key.team, key.channel, "channel"))
                raw, channel_raw = await pipe.execute()
            if raw:
                pinned = _load(orjson.loads(raw))
                if pinned is not None:
                    return pinned
            persona = await self.find(key.team, requested) if requested else None
            if persona is None:
                persona = self._assignment(key.channel, channel_raw).persona
            if pin:
                await self._redis.set(key_of_pin, orjson.dumps(_dump(persona)), ex=self._thread_ttl, nx=True)
        return persona
