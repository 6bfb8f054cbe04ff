"""Personas: which system prompt and model parameters apply to a thread.

Resolution order is channel mapping, else the default persona (``SYSTEM_PROMPT``). Named personas and
channel mappings come from ``PERSONAS_FILE``, a YAML file validated at start-up: every problem in it
is reported at once as a ``ConfigError``.

    personas:
      pirate:
        system_prompt: "You are a pirate. Answer like one."
        model: gpt-4o
        temperature: 0.9
    channels:
      C0123456789: pirate
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.domain import Persona, ThreadKey
from bot.errors import ConfigError

DEFAULT_NAME = "default"


class _PersonaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system_prompt: Annotated[str, Field(min_length=1)]
    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stop: Annotated[list[str], Field(max_length=4)] | None = None


class _PersonasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personas: dict[str, _PersonaSpec] = {}
    channels: dict[str, str] = {}


def parse_personas(text: str, source: str = "PERSONAS_FILE") -> tuple[dict[str, Persona], dict[str, str]]:
    """Named personas and the channel -> persona-name mapping from YAML text."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source} is not valid YAML: {exc}"]) from None
    problems = []
    try:
        parsed = _PersonasFile.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{source}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
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
        name: Persona(name=name, **{**spec.model_dump(), "stop": tuple(spec.stop) if spec.stop else None})
        for name, spec in parsed.personas.items()
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

    async def resolve(self, key: ThreadKey) -> Persona:
        name = self.channels.get(key.channel)
        return self.named[name] if name else self.default
