"""The bot's errors, and who sees each of them.

Adapters translate their library's exceptions into these at the boundary, so the pipeline and the
last-resort handlers (the worker's, the ingress's) only ever deal with this tree:

    BotError                 base; ``user_message`` is what a Slack user may be shown
    ├── ConfigError          bad or missing settings; the operator sees it at start-up, users never do
    ├── StartupError         Slack, Redis or a token refused the bot at start-up: one line for the operator
    ├── HistoryError         Redis failed; the job is tried again later, users are told nothing yet
    │   └── ThreadBusy       the thread stayed locked by an earlier reply for too long
    ├── ModelError           the model endpoint failed; ``kind`` names the problem users are told about
    └── SlackError           a Slack Web API call failed; logged, users may not be reachable at all

Nothing here carries a traceback or raw exception text to users: ``user_message`` is always one of
the fixed sentences below.
"""

from __future__ import annotations

from typing import Literal

ModelErrorKind = Literal[
    "auth",
    "rate_limit",
    "timeout",
    "unavailable",
    "context_length",
    "model_not_found",
    "bad_request",
    "images_refused",
    "unknown",
]

_MODEL_MESSAGES: dict[ModelErrorKind, str] = {
    "auth": "I couldn't reach the model: the API key was refused. Please ask an admin to check it.",
    "rate_limit": "The model is rate-limiting me right now. Please try again in a minute.",
    "timeout": "The model took too long to answer. Please try again.",
    "unavailable": "The model service is unavailable at the moment. Please try again shortly.",
    "context_length": "This thread is too long for the model even after trimming. Please start a new one.",
    "model_not_found": "The configured model doesn't exist on the endpoint. Please ask an admin to check it.",
    "bad_request": "The model rejected the request. Please ask an admin to check the bot's model settings.",
    "images_refused": "The model at this endpoint doesn't accept images. Please ask without them.",
    "unknown": "Something went wrong while talking to the model. Please try again.",
}

GENERIC_USER_MESSAGE = "Sorry, something went wrong on my side and I couldn't answer. Please try again."


class BotError(Exception):
    """Base of every error the bot raises on purpose."""

    @property
    def user_message(self) -> str:
        """The sentence a Slack user may be shown for this error."""
        return GENERIC_USER_MESSAGE


class ConfigError(BotError):
    """Settings are missing or malformed; stops start-up with every problem listed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"The bot cannot start; fix these settings (environment or .env):\n{lines}")


class StartupError(BotError):
    """Something outside the bot stops it at start-up (Slack or Redis unreachable, a token refused, a
    scope missing); the message is one line that names the setting or URL and says what to do."""


class HistoryError(BotError):
    """The history store (Redis) failed or is unreachable."""

    @property
    def user_message(self) -> str:
        return "I can't reach my memory store right now, so I can't answer. Please try again shortly."


class ThreadBusy(HistoryError):
    """Another reply held the thread's lock for longer than the bot is willing to wait."""

    @property
    def user_message(self) -> str:
        return "I'm still busy with an earlier message in this thread. Please ask again in a moment."


class ModelError(BotError):
    """The model endpoint failed; ``kind`` says how, ``detail`` is for the log only."""

    def __init__(self, kind: ModelErrorKind, detail: str = "") -> None:
        self.kind: ModelErrorKind = kind
        self.detail = detail
        super().__init__(f"model error ({kind}): {detail}" if detail else f"model error ({kind})")

    @property
    def user_message(self) -> str:
        return _MODEL_MESSAGES[self.kind]


class SlackError(BotError):
    """A Slack Web API call failed; ``error`` is Slack's error string. ``transient``: Slack was
    unreachable or failing (5xx, connection errors) even after retries, so trying later may work."""

    def __init__(self, method: str, error: str, *, transient: bool = False) -> None:
        self.method = method
        self.error = error
        self.transient = transient
        super().__init__(f"Slack {method} failed: {error}")
