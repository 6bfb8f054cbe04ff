"""What the persona commands show: the editor modal, the App Home tab, and personas described in words.

Pure Block Kit and text, no I/O. The editor has a field for the system prompt and one for every chat
parameter in ``bot.params`` (its label and kind of field come from there), plus "save as"; a submitted
editor is read back into persona fields with ``parse_editor``, which reports a value it cannot read as
the error of its own field, in the words of what is allowed.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from bot.domain import Persona, Rated
from bot.params import PARAMS, ChatParam, persona_value
from bot.personas import ALLOWED, NAME_PATTERN, NAME_RULE, Assignment, Change

EDITOR_CALLBACK = "persona_editor"
EDIT_ACTION = "persona_edit"
PROMPT_LABEL = "System prompt"
MENU_LIMIT = 100  # Slack shows at most 100 options in a menu


def count(n: int, one: str, many: str) -> str:
    """``n`` things in words: "1 thread", "3 threads"."""
    return f"{n} {one if n == 1 else many}"


def describe_duration(seconds: int) -> str:
    """Whole days, else hours: "30 days", "12 hours"."""
    if seconds % 86400 == 0:
        return count(seconds // 86400, "day", "days")
    return count(seconds // 3600, "hour", "hours")


def when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe(persona: Persona, lines: int = 3) -> str:
    """A persona in a few lines: name, the start of its prompt, the parameters it sets."""
    prompt = "\n".join(f"> {line}" for line in persona.system_prompt.splitlines()[:lines] if line.strip())
    params = [
        f"{p.name} {getattr(persona, p.name)!r}" for p in PARAMS if getattr(persona, p.name) is not None
    ]
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
    who = f"<@{change.by}>" if change.by else "someone"
    return f"{when(change.at)}: {who} {change.action}: *{before}* → *{after}*"


def _shown(value: Any) -> str:
    """A persona's value as the editor shows it."""
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return "\n".join(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _model_menu(models: Sequence[str], current: str | None) -> dict[str, Any]:
    # The one in use stays selectable even past Slack's limit.
    names = list(models[: MENU_LIMIT - 1]) + (
        [current] if current and current not in models[: MENU_LIMIT - 1] else []
    )
    options = [{"text": {"type": "plain_text", "text": m[:75]}, "value": m} for m in names]
    element: dict[str, Any] = {"type": "static_select", "action_id": "value", "options": options}
    if current:
        element["initial_option"] = options[names.index(current)]
    return element


def _input(block_id: str, label: str, value: str, *, multiline: bool, optional: bool) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": "value", "multiline": multiline}
    if value:
        element["initial_value"] = value
    return {
        "type": "input",
        "block_id": block_id,
        "optional": optional,
        "label": {"type": "plain_text", "text": label},
        "element": element,
    }


def _param_block(param: ChatParam, persona: Persona, models: Sequence[str]) -> dict[str, Any]:
    current = getattr(persona, param.name)
    multiline = param.widget in ("lines", "json")
    block = _input(param.name, param.label, _shown(current), multiline=multiline, optional=True)
    if param.widget == "model" and models:
        block["element"] = _model_menu(models, current)
    return block


def editor_view(
    channel: str, persona: Persona, save_as: str = "", models: Sequence[str] = ()
) -> dict[str, Any]:
    """The modal that edits a channel's persona (or creates a named one); ``models`` offers a menu."""
    blocks = [_input("system_prompt", PROMPT_LABEL, persona.system_prompt, multiline=True, optional=False)]
    blocks += [_param_block(param, persona, models) for param in PARAMS]
    save = _input("save_as", "Save as named persona", save_as, multiline=False, optional=True)
    save["hint"] = {"type": "plain_text", "text": f"Optional. {NAME_RULE}."}
    blocks.append(save)
    return {
        "type": "modal",
        "callback_id": EDITOR_CALLBACK,
        "private_metadata": orjson.dumps({"channel": channel}).decode(),
        "title": {"type": "plain_text", "text": "Edit persona"},
        "submit": {"type": "plain_text", "text": "Save"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }


def _read(param: ChatParam, raw: str) -> Any:
    """A field's text as the value the parameter takes (ValueError when it cannot be one)."""
    text = raw.strip()
    if param.widget == "number":
        return float(text)
    if param.widget == "integer":
        return int(text)
    if param.widget == "lines":
        return [line for line in raw.splitlines() if line]
    if param.widget == "json":
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    return text


def parse_editor(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """A submitted editor's state -> (persona fields, errors by block id, save-as name)."""

    def raw(block: str) -> str | None:
        state = (values.get(block) or {}).get("value") or {}
        found = (state.get("selected_option") or {}).get("value") or state.get("value")
        return None if found is None or not str(found).strip() else str(found)

    fields: dict[str, Any] = {}
    errors: dict[str, str] = {}
    prompt = raw("system_prompt")
    if prompt is not None:
        fields["system_prompt"] = prompt
    for param in PARAMS:
        text = raw(param.name)
        if text is None:
            continue
        try:
            fields[param.name] = _read(param, text)
        except ValueError:
            errors[param.name] = f"Must be {ALLOWED[param.name]}."
    save_as = (raw("save_as") or "").strip()
    if save_as and not NAME_PATTERN.match(save_as):
        errors["save_as"] = f"A name is {NAME_RULE}."
    return fields, errors, save_as


def persona_from_editor(fields: Mapping[str, Any], name: str) -> Persona:
    """The persona a valid editor describes."""
    return Persona(name=name, **{key: persona_value(value) for key, value in fields.items()})


def privacy_summary(history_ttl_seconds: int) -> str:
    """What the bot keeps, in a few lines for App Home and ``/persona help`` (PRIVACY.md in full)."""
    return (
        f"*What I keep*: the messages of threads I take part in, for {describe_duration(history_ttl_seconds)}"
        " after their last activity, in this workspace's Redis; usage and feedback counts for reports."
        " Edit or delete a message and my copy changes or goes; delete a thread's first message and I"
        " forget the thread. Nothing is used to train models, and message text is never logged."
        " The bot's PRIVACY.md says it all."
    )


def home_view(
    rows: Sequence[tuple[str, str, Persona]],
    named: Mapping[str, tuple[Persona, str]],
    privacy: str,
) -> dict[str, Any]:
    """The App Home tab: a row per conversation (id, label, persona in force) with its Edit button, then
    the named personas and where each comes from, then what the bot keeps."""
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": "Personas"}}]
    for channel, label, persona in rows:
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
    listing = "\n".join(f"• *{name}* ({origin})" for name, (_, origin) in named.items()) or "None yet."
    blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Named personas*\n{listing}"}})
    blocks.append({"type": "divider"})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": privacy}]})
    return {"type": "home", "blocks": blocks}


# Feedback --------------------------------------------------------------------------------------------

FEEDBACK_ACTION = "answer_feedback"
FEEDBACK_COMMENT_CALLBACK = "feedback_comment"
COMMENT_BLOCK = "comment"
COMMENT_INPUT = "text"
COMMENT_MAX_CHARS = 300


def feedback_value(rated: Rated, vote: str) -> str:
    """What a feedback button carries: the vote, and the persona, model and day of the answer."""
    return json.dumps({"v": vote, "p": rated.persona, "m": rated.model[:200], "d": rated.day})


def feedback_blocks(rated: Rated) -> list[dict[str, Any]]:
    """The thumbs-up/down buttons under a finished answer (Slack's ``feedback_buttons``)."""

    def button(text: str, vote: str, label: str) -> dict[str, Any]:
        plain = {"type": "plain_text", "text": text}
        return {"text": plain, "value": feedback_value(rated, vote), "accessibility_label": label}

    buttons = {
        "type": "feedback_buttons",
        "action_id": FEEDBACK_ACTION,
        "positive_button": button("Good answer", "up", "Mark this answer as helpful"),
        "negative_button": button("Bad answer", "down", "Mark this answer as not helpful"),
    }
    return [{"type": "context_actions", "elements": [buttons]}]


def feedback_comment_view(private_metadata: str) -> dict[str, Any]:
    """The optional one-line comment after a thumbs-down."""
    return {
        "type": "modal",
        "callback_id": FEEDBACK_COMMENT_CALLBACK,
        "private_metadata": private_metadata,
        "title": {"type": "plain_text", "text": "What went wrong?"},
        "submit": {"type": "plain_text", "text": "Send"},
        "close": {"type": "plain_text", "text": "Skip"},
        "blocks": [
            {
                "type": "input",
                "block_id": COMMENT_BLOCK,
                "optional": True,
                "label": {"type": "plain_text", "text": "One line for whoever runs the bot (optional)"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": COMMENT_INPUT,
                    "max_length": COMMENT_MAX_CHARS,
                },
            }
        ],
    }


# The message shortcuts (manifest.yaml declares the same callback ids) and the modal of two of them.
ASK_SHORTCUT = "ask_about_message"
SUMMARIZE_SHORTCUT = "summarize_thread"
TRANSLATE_SHORTCUT = "translate_message"
START_OVER_SHORTCUT = "start_thread_over"
SHORTCUT_CALLBACK = "shortcut_request"
QUESTION_BLOCK = "question"
QUESTION_INPUT = "text"
QUESTION_MAX_CHARS = 2000
ONLY_ME_BLOCK = "only_me"
ONLY_ME_INPUT = "choice"
ONLY_ME = "only_me"
PREVIEW_CHARS = 300


def shortcut_view(kind: str, shortcut_id: str, author: str, text: str) -> dict[str, Any]:
    """The modal of "Ask about this message" (a question, and whether only the asker sees the answer)
    and of "Summarize thread" (only the choice); ``shortcut_id`` names the shortcut held meanwhile."""
    # A modal notifies no one, so the message's own markup can be shown as it is.
    preview = (text[:PREVIEW_CHARS] + ("…" if len(text) > PREVIEW_CHARS else "")) or "(no text)"
    asking = kind == "ask"
    blocks: list[dict[str, Any]] = [
        {
            "type": "context",
            "elements": [
                {"type": "mrkdwn", "text": f"*{author or 'A message'}:* {preview}"}
                if asking
                else {"type": "mrkdwn", "text": "A summary of the thread this message belongs to."}
            ],
        }
    ]
    if asking:
        blocks.append(
            {
                "type": "input",
                "block_id": QUESTION_BLOCK,
                "label": {"type": "plain_text", "text": "Your question about this message"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": QUESTION_INPUT,
                    "multiline": True,
                    "max_length": QUESTION_MAX_CHARS,
                },
            }
        )
    blocks.append(
        {
            "type": "input",
            "block_id": ONLY_ME_BLOCK,
            "optional": True,
            "label": {"type": "plain_text", "text": "Who sees the answer"},
            "element": {
                "type": "checkboxes",
                "action_id": ONLY_ME_INPUT,
                "options": [
                    {
                        "text": {"type": "plain_text", "text": "Only me"},
                        "description": {"type": "plain_text", "text": "Otherwise it is posted in the thread"},
                        "value": ONLY_ME,
                    }
                ],
            },
        }
    )
    return {
        "type": "modal",
        "callback_id": SHORTCUT_CALLBACK,
        "private_metadata": shortcut_id,
        "title": {"type": "plain_text", "text": "Ask about this message" if asking else "Summarize thread"},
        "submit": {"type": "plain_text", "text": "Ask" if asking else "Summarize"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": blocks,
    }
