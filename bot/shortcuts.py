"""The message shortcuts, on the ingress side: "Ask about this message", "Summarize thread" and
"Translate", from the moment someone uses one until its job is queued.

Translate is queued before its acknowledgement (one Redis call), like a message. Ask and Summarize
need a modal first: the shortcut (the message, its files, where to answer) is held in Redis under an
id before the acknowledgement, the modal is opened right after it (within Slack's three seconds of
the trigger) with that id as its private metadata, and the submission queues the job before its own
acknowledgement, so a problem (a question too long, the shortcut expired, Redis unreachable) is shown
in the modal. A shortcut that cannot be taken is explained to its user through its response URL. The
answer itself is a worker's job (``Responder.respond_to_shortcut``), with budgets and usage applied.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.domain import Shortcut, ShortcutKind, valid_text
from bot.errors import BotError
from bot.jobs import JobQueue
from bot.observability import JOBS_QUEUED
from bot.slack import SlackAdapter, is_slack_id, parse_message_shortcut
from bot.views import (
    ASK_SHORTCUT,
    ONLY_ME,
    ONLY_ME_BLOCK,
    ONLY_ME_INPUT,
    QUESTION_BLOCK,
    QUESTION_INPUT,
    QUESTION_MAX_CHARS,
    SUMMARIZE_SHORTCUT,
    TRANSLATE_SHORTCUT,
    shortcut_view,
)

log = logging.getLogger(__name__)

KINDS: Mapping[str, ShortcutKind] = {
    ASK_SHORTCUT: "ask",
    SUMMARIZE_SHORTCUT: "summarize",
    TRANSLATE_SHORTCUT: "translate",
}
EXPIRED = "This shortcut has expired (they last 30 minutes). Use it on the message again."
NO_TEXT = "This message has no text to translate."
NO_QUESTION = "Write a question about the message."


@dataclass(frozen=True, slots=True)
class Used:
    """A shortcut taken before its acknowledgement: what is left to do after it (open the modal, or
    say why it could not be taken)."""

    shortcut: Shortcut
    trigger_id: str
    modal: bool
    problem: str = ""


class Shortcuts:
    """The shortcuts from their use to their queued job."""

    def __init__(self, queue: JobQueue, slack: SlackAdapter) -> None:
        self._queue = queue
        self._slack = slack

    async def use(self, body: Mapping[str, Any]) -> Used | None:
        """Before the acknowledgement: queue a translation, or hold the shortcut for its modal. None for
        a malformed payload (logged, dropped)."""
        kind = KINDS.get(str(body.get("callback_id")))
        parsed = parse_message_shortcut(body, kind) if kind else None
        if parsed is None:
            return None
        shortcut, trigger_id = parsed
        modal = shortcut.kind != "translate"
        if not modal and not shortcut.text.strip():
            return Used(shortcut, trigger_id, modal, NO_TEXT)
        try:
            await (self._queue.hold(shortcut) if modal else self._queue_job(shortcut))
        except BotError as exc:
            log.warning("could not take a %s shortcut: %s", shortcut.kind, exc)
            return Used(shortcut, trigger_id, modal, exc.user_message)
        log.info("%s shortcut %s", shortcut.kind, "held for its modal" if modal else "queued")
        return Used(shortcut, trigger_id, modal)

    async def follow_up(self, used: Used) -> None:
        """After the acknowledgement: open the modal, or tell the person why nothing will come."""
        shortcut = used.shortcut
        if used.problem:
            await self._slack.respond(shortcut.response_url, f":warning: {used.problem}")
        elif used.modal:
            author = f"<@{shortcut.author}>" if shortcut.author.startswith(("U", "W")) else ""
            view = shortcut_view(shortcut.kind, shortcut.id, author, shortcut.text)
            await self._slack.open_view(used.trigger_id, view)

    async def submit(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The modal submitted: queue the job; the modal's errors when it cannot be."""
        view = body.get("view") or {}
        shortcut_id = view.get("private_metadata")
        user = (body.get("user") or {}).get("id")
        if not (isinstance(shortcut_id, str) and shortcut_id.isalnum() and is_slack_id(user)):
            log.warning("dropped a shortcut submission with malformed metadata")
            return None
        values = (view.get("state") or {}).get("values") or {}
        chosen = ((values.get(ONLY_ME_BLOCK) or {}).get(ONLY_ME_INPUT) or {}).get("selected_options") or []
        only_me = any(isinstance(o, dict) and o.get("value") == ONLY_ME for o in chosen)
        question = ((values.get(QUESTION_BLOCK) or {}).get(QUESTION_INPUT) or {}).get("value")
        question = valid_text(question.strip()) if isinstance(question, str) else ""
        try:
            held = await self._queue.held(shortcut_id)
            if held is None or held.user_id != user:
                return _errors(held, EXPIRED)
            if held.kind == "ask" and not question:
                return _errors(held, NO_QUESTION)
            if len(question) > QUESTION_MAX_CHARS:
                return _errors(held, f"Keep the question within {QUESTION_MAX_CHARS} characters.")
            await self._queue_job(dataclasses.replace(held, question=question, only_me=only_me))
        except BotError as exc:
            log.warning("could not queue a shortcut: %s", exc)
            return {"response_action": "errors", "errors": {ONLY_ME_BLOCK: exc.user_message}}
        return None

    async def _queue_job(self, shortcut: Shortcut) -> None:
        acceptance = await self._queue.accept(shortcut)
        if acceptance.outcome == "queued":
            JOBS_QUEUED.inc()


def _errors(held: Shortcut | None, message: str) -> dict[str, Any]:
    """The modal's answer showing ``message`` under its first field."""
    block = QUESTION_BLOCK if held is not None and held.kind == "ask" else ONLY_ME_BLOCK
    return {"response_action": "errors", "errors": {block: message}}
