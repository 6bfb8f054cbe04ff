"""The chat parameters: every model setting a persona or the settings may set, defined once: the Chat
Completions parameters, and two the bot keeps to itself: ``vision`` (whether the model is shown images)
and ``suggested_prompts`` (what the assistant pane offers when a thread with the bot opens).

Each ``ChatParam`` gives a parameter's name (the ``Persona`` attribute and the personas-file key), its
type and range (a pydantic annotation), the setting that gives it to every reply, the editor's label
and kind of field, what users are told is allowed, and whether it goes into the request. The personas
file's schema, the persona editor, the request body and the settings' defaults are derived from
``PARAMS``; ``Persona`` and ``Settings`` declare the same fields with these annotations, for static
typing (a test keeps the three equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
ReplyTokens = Annotated[int, Field(ge=1)]
StopSequences = Annotated[list[str], Field(max_length=4)]
LogitBias = dict[str, Annotated[int, Field(ge=-100, le=100)]]


def _yaml_switch(value: Any) -> Any:
    # YAML reads an unquoted on/off as true/false; in the personas file they mean what they say.
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


# The prompts the assistant pane suggests when someone opens a thread with the bot (Slack shows 4).
SuggestedPrompts = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=200)]], Field(min_length=1, max_length=4)
]

# Whether the model is shown images: by its name (auto), always, or never.
Vision = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]

# How the editor asks for a value: one line of text, a number, a whole number, one item per line,
# JSON, or the endpoint's model list.
Widget = Literal["text", "number", "integer", "lines", "json", "model"]


@dataclass(frozen=True, slots=True)
class ChatParam:
    """One Chat Completions parameter."""

    name: str
    annotation: Any
    setting: str  # the Settings field (its environment variable, upper-cased)
    label: str
    widget: Widget
    allowed: str  # completes "Must be …" when a value is refused
    sent: bool = True  # a request parameter (else the bot's own)


PARAMS: tuple[ChatParam, ...] = (
    ChatParam("model", str, "openai_model", "Model", "model", "a model name"),
    ChatParam(
        "temperature", Temperature, "temperature", "Temperature (0 to 2)", "number", "a number from 0 to 2"
    ),
    ChatParam("top_p", TopP, "top_p", "Top p (0 to 1)", "number", "a number from 0 to 1"),
    ChatParam(
        "max_tokens",
        ReplyTokens,
        "max_reply_tokens",
        "Max reply tokens",
        "integer",
        "a whole number of at least 1",
    ),
    ChatParam(
        "presence_penalty",
        Penalty,
        "presence_penalty",
        "Presence penalty (-2 to 2)",
        "number",
        "a number from -2 to 2",
    ),
    ChatParam(
        "frequency_penalty",
        Penalty,
        "frequency_penalty",
        "Frequency penalty (-2 to 2)",
        "number",
        "a number from -2 to 2",
    ),
    ChatParam(
        "stop",
        StopSequences,
        "stop",
        "Stop sequences (one per line, at most 4)",
        "lines",
        "at most 4 stop sequences",
    ),
    ChatParam(
        "logit_bias",
        LogitBias,
        "logit_bias",
        'Logit bias (JSON, e.g. {"1234": -100})',
        "json",
        "a JSON object of token ids mapped to numbers from -100 to 100",
    ),
    ChatParam("seed", int, "seed", "Seed", "integer", "a whole number"),
    ChatParam(
        "reasoning_effort",
        str,
        "reasoning_effort",
        "Reasoning effort (e.g. low, medium, high)",
        "text",
        "a reasoning effort the model knows (e.g. low, medium, high)",
    ),
    ChatParam(
        "service_tier",
        str,
        "service_tier",
        "Service tier (e.g. auto, default, flex)",
        "text",
        "a service tier (e.g. auto, default, flex, priority)",
    ),
    ChatParam(
        "vision",
        Vision,
        "vision",
        "Show the model images (auto, on or off)",
        "text",
        "auto (by the model's name), on or off",
        sent=False,
    ),
    ChatParam(
        "suggested_prompts",
        SuggestedPrompts,
        "suggested_prompts",
        "Prompts suggested in the assistant pane (one per line, at most 4)",
        "lines",
        "one to four prompts of at most 200 characters",
        sent=False,
    ),
)


def persona_value(value: Any) -> Any:
    """A validated value as a ``Persona`` holds it: lists become tuples (personas are immutable)."""
    return tuple(value) if isinstance(value, list) else value


def request_value(value: Any) -> Any:
    """A ``Persona`` value as the request body carries it: tuples become lists."""
    return list(value) if isinstance(value, tuple) else value
