"""The ingress: Slack's requests in, jobs out. The only module that imports ``slack_bolt``.

A message event (or a change: a message people edited, a message or a file they deleted) is parsed,
then checked (is it for the bot at all?), deduplicated and queued as a job in one step
(``JobQueue.accept``, one Redis call), before Slack is acknowledged: Bolt runs with
``process_before_response``, so the acknowledgement goes out only once the listener has returned. If
Redis cannot take the job, the listener raises, Bolt answers 500, and the event is left
unacknowledged (Socket Mode) or refused (HTTP): Slack delivers it again later. Nothing here posts to
Slack, so an outage never produces a message. No Slack call precedes an acknowledgement: Bolt's
authorisation is answered from the identity fetched at start-up.

Slash commands, the persona editor and App Home are acknowledged at once and do their work right
after (Bolt's lazy listeners), in this process: they answer the person who asked, within Slack's few
seconds for opening a modal. Message shortcuts (``shortcuts``) are queued, or held for their modal,
before their acknowledgement, and their modals opened after it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext
from slack_bolt.authorization import AuthorizeResult
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.assistant import AssistantPane
from bot.erasure import Erasure, ForgetRequests
from bot.errors import HistoryError, SlackError, StartupError
from bot.feedback import Feedback
from bot.jobs import JobQueue
from bot.llm import list_models
from bot.observability import (
    EVENTS_ACKED,
    EVENTS_DUPLICATE,
    EVENTS_RECEIVED,
    EVENTS_REFUSED,
    JOBS_QUEUED,
    ReadinessCheck,
    health_routes,
    listen,
)
from bot.persona_commands import ModelList, PersonaCommands
from bot.services import Services
from bot.settings import secret_value
from bot.shortcuts import KINDS, Shortcuts
from bot.slack import BotIdentity, check_app_token, is_slack_id, parse_change, parse_event
from bot.usage_report import UsageReport
from bot.views import (
    EDIT_ACTION,
    EDITOR_CALLBACK,
    FEEDBACK_ACTION,
    FEEDBACK_COMMENT_CALLBACK,
    SHORTCUT_CALLBACK,
    START_OVER_SHORTCUT,
    privacy_summary,
)

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"  # where HTTP mode serves the Events API, commands and interactivity


class Ingress:
    """Turns message events into jobs."""

    def __init__(self, queue: JobQueue, identity: BotIdentity) -> None:
        self._queue = queue
        self._identity = identity

    async def accept(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        """Queue the event's message if it is for the bot, or the edit or deletion it tells of; raises
        ``HistoryError`` when Redis cannot take it, so that Slack is not acknowledged and delivers it
        again."""
        EVENTS_RECEIVED.inc()
        team = body.get("team_id") or self._identity.team_id
        work = parse_event(event, team=team, bot_user_id=self._identity.user_id) or parse_change(
            event, team=team
        )
        if work is not None:
            try:
                acceptance = await self._queue.accept(work)
            except HistoryError:
                EVENTS_REFUSED.inc()
                raise
            if acceptance.outcome == "queued":
                JOBS_QUEUED.inc()
            elif acceptance.outcome == "duplicate":
                EVENTS_DUPLICATE.inc()
        EVENTS_ACKED.inc()


def _drop_token_unused_warning(record: logging.LogRecord) -> bool:
    # Bolt reads SLACK_BOT_TOKEN from the environment itself, then warns that the client we pass wins.
    # That is the intent here (the client carries SLACK_API_URL), so the warning would only mislead.
    return "`token` will be unused" not in record.getMessage()


def bolt_app(services: Services) -> AsyncApp:
    """The Bolt app: message events queued before their ack; commands, editor and App Home after it."""
    settings = services.settings
    slack = services.require_slack()
    identity = slack.identity
    bot_token = slack.web.token
    logging.getLogger("slack_bolt.AsyncApp").addFilter(_drop_token_unused_warning)

    async def authorize(**_: Any) -> AuthorizeResult:
        # auth.test was called once at start-up; answering from it keeps Slack calls out of the ack path.
        return AuthorizeResult(
            enterprise_id=None,
            team_id=identity.team_id,
            bot_user_id=identity.user_id,
            bot_id=identity.bot_id,
            bot_token=bot_token,
        )

    app = AsyncApp(
        client=AsyncWebClient(base_url=settings.slack_api_url),
        authorize=authorize,
        signing_secret=secret_value(settings.slack_signing_secret),
        process_before_response=True,
    )
    ingress = Ingress(slack.queue, identity)
    # A mention in a channel arrives twice (app_mention and message); it is queued once.
    app.event("app_mention")(ingress.accept)
    app.event("message")(ingress.accept)
    app.event("file_deleted")(ingress.accept)  # a file the bot read leaves its memory

    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        if isinstance(error, HistoryError):
            log.warning("a Slack request was not acknowledged, Slack will send it again: %s", error)
        else:
            log.error("a Slack request failed", exc_info=error)

    app.error(on_error)
    commands = PersonaCommands(
        slack.adapter,
        services.personas,
        services.counter,
        settings.persona_admin_ids,
        services.retention,
        ModelList(lambda: list_models(services.openai)),
        privacy_summary(settings.history_ttl_seconds),
    )
    _manage_personas(app, commands)
    _report_usage(app, UsageReport(slack.adapter, services.usage, services.feedback, commands))
    _take_feedback(app, Feedback(services.feedback, slack.adapter))
    _follow_the_assistant_pane(app, slack.pane)
    _offer_shortcuts(app, Shortcuts(slack.queue, slack.adapter))
    erasure = Erasure(
        services.redis,
        settings.redis_prefix,
        services.history,
        slack.files,
        slack.forgetting,
        services.personas,
        services.feedback,
        services.usage,
        slack.queue,
    )
    _erase_on_request(
        app, erasure, ForgetRequests(erasure, slack.adapter, commands.is_admin), identity.team_id
    )
    _acknowledge_the_rest(app)  # last: Bolt tries listeners in the order they were added
    return app


def _acknowledge_the_rest(app: AsyncApp) -> None:
    """Everything else Slack sends is acknowledged too: an unacknowledged request is sent again and
    again."""
    anything = re.compile(".*")

    async def ignore() -> None:
        pass  # an event: Bolt acknowledges it

    app.event(anything)(ignore)
    for kind in (app.command, app.action, app.view, app.shortcut, app.options):
        kind(anything)(_ack_now)


LazyWork = Callable[[dict[str, Any], AsyncBoltContext], Awaitable[None]]


def _after_ack(what: str, work: LazyWork) -> Callable[..., Awaitable[None]]:
    """A lazy listener: runs after the ack; the last resort for what goes wrong in it (logged with its
    traceback; whoever asked was answered by ``work`` if it could)."""

    async def lazily(body: dict[str, Any], context: AsyncBoltContext) -> None:
        try:
            await work(body, context)
        except Exception:
            log.exception("%s failed", what)

    return lazily


def _body_only(work: Callable[[dict[str, Any]], Awaitable[None]]) -> LazyWork:
    return lambda body, _: work(body)


async def _ack_now(ack: AsyncAck) -> None:
    await ack()


def _manage_personas(app: AsyncApp, commands: PersonaCommands) -> None:
    """``/persona``, its editor and App Home: acknowledged first, their work done after."""

    async def check_editor(ack: AsyncAck, body: dict[str, Any], context: AsyncBoltContext) -> None:
        errors = await commands.check_editor(body)  # a refusal must travel in the acknowledgement
        context["editor_accepted"] = errors is None  # the lazy listener gets a copy of this context
        await (ack(**errors) if errors else ack())

    async def save_editor(body: dict[str, Any], context: AsyncBoltContext) -> None:
        if context.get("editor_accepted"):
            await commands.save_editor(body)

    async def publish_home(body: dict[str, Any], _: AsyncBoltContext) -> None:
        if body["event"].get("tab") == "home" and is_slack_id(body["event"].get("user")):
            await commands.publish_home(body["team_id"], body["event"]["user"])

    async def home_opened() -> None:
        pass  # events are acknowledged by Bolt itself

    app.command("/persona")(ack=_ack_now, lazy=[_after_ack("/persona", _body_only(commands.command))])
    app.view(EDITOR_CALLBACK)(ack=check_editor, lazy=[_after_ack("saving the persona editor", save_editor)])
    app.action(EDIT_ACTION)(
        ack=_ack_now,
        lazy=[_after_ack("opening the persona editor", _body_only(commands.open_editor_from_home))],
    )
    app.event("app_home_opened")(ack=home_opened, lazy=[_after_ack("publishing App Home", publish_home)])


def _erase_on_request(app: AsyncApp, erasure: Erasure, forget: ForgetRequests, team: str) -> None:
    """``/forget`` and "Start thread over" after their ack; the workspace's data deleted before the ack
    of ``app_uninstalled`` or of ``tokens_revoked`` for the bot token (if Redis fails, Slack sends the
    event again)."""

    async def uninstalled(body: dict[str, Any]) -> None:
        event = body.get("event") or {}
        revoked = event.get("type") != "tokens_revoked" or bool((event.get("tokens") or {}).get("bot"))
        if body.get("team_id") == team and revoked:
            await erasure.workspace(team)

    app.command("/forget")(ack=_ack_now, lazy=[_after_ack("/forget", _body_only(forget.command))])
    app.message_shortcut(START_OVER_SHORTCUT)(
        ack=_ack_now, lazy=[_after_ack("starting a thread over", _body_only(forget.start_over))]
    )
    app.event("app_uninstalled")(uninstalled)
    app.event("tokens_revoked")(uninstalled)


def _report_usage(app: AsyncApp, report: UsageReport) -> None:
    app.command("/usage")(ack=_ack_now, lazy=[_after_ack("/usage", _body_only(report.command))])


def _follow_the_assistant_pane(app: AsyncApp, pane: AssistantPane) -> None:
    """A new thread in the assistant pane is greeted, and the channel beside it remembered, after the
    ack."""

    async def acknowledged() -> None:
        pass  # events are acknowledged by Bolt itself

    app.event("assistant_thread_started")(
        ack=acknowledged,
        lazy=[_after_ack("greeting an assistant thread", _body_only(pane.thread_started))],
    )
    app.event("assistant_thread_context_changed")(
        ack=acknowledged,
        lazy=[_after_ack("following the assistant pane", _body_only(pane.context_changed))],
    )


def _before_and_after_ack(
    what: str, before: Callable[[dict[str, Any]], Awaitable[Any]], after: Callable[[Any], Awaitable[None]]
) -> dict[str, Any]:
    """A listener's ``ack`` and ``lazy`` arguments: ``before`` runs before the acknowledgement, and
    what it returns (unless None) is handed to ``after`` right after it."""
    slot = f"before_ack:{what}"

    async def first(ack: AsyncAck, body: dict[str, Any], context: AsyncBoltContext) -> None:
        context[slot] = await before(body)  # the lazy listener gets a copy of this context
        await ack()

    async def then(_: dict[str, Any], context: AsyncBoltContext) -> None:
        if (done := context.get(slot)) is not None:
            await after(done)

    return {"ack": first, "lazy": [_after_ack(what, then)]}


def _answered_in_ack(
    check: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]],
) -> Callable[..., Awaitable[None]]:
    """A modal's submission, done before its acknowledgement, which carries the modal's errors."""

    async def submit(ack: AsyncAck, body: dict[str, Any]) -> None:
        errors = await check(body)
        await (ack(**errors) if errors else ack())

    return submit


def _take_feedback(app: AsyncApp, feedback: Feedback) -> None:
    """The feedback buttons under answers, and the comment modal after a thumbs-down: each counted
    before its acknowledgement (one Redis call), the modal opened after it."""
    app.action(FEEDBACK_ACTION)(
        **_before_and_after_ack("following up on feedback", feedback.count, feedback.follow_up)
    )
    app.view(FEEDBACK_COMMENT_CALLBACK)(_answered_in_ack(feedback.keep_comment))


def _offer_shortcuts(app: AsyncApp, shortcuts: Shortcuts) -> None:
    """The message shortcuts: a translation queued, or the shortcut held for its modal, before the
    acknowledgement; the modal opened after it; its submission queued before its own."""
    for callback_id in KINDS:
        app.message_shortcut(callback_id)(
            **_before_and_after_ack("following up a shortcut", shortcuts.use, shortcuts.follow_up)
        )
    app.view(SHORTCUT_CALLBACK)(_answered_in_ack(shortcuts.submit))


class SocketModeIngress:
    """Receives Slack's requests over Socket Mode."""

    def __init__(self, app: AsyncApp, app_token: str) -> None:
        self._app = app
        self._app_token = app_token
        self._handler: AsyncSocketModeHandler | None = None

    async def start(self) -> None:
        # slack_sdk retries a refused app token forever; checking it once makes start-up fail clearly.
        try:
            await check_app_token(self._app.client, self._app_token)
        except SlackError as exc:
            if exc.transient:
                raise StartupError(
                    f"cannot reach Slack for Socket Mode: {exc.error}; check the network"
                ) from exc
            raise StartupError(
                f"Slack refused SLACK_APP_TOKEN ({exc.error}): create an app-level token with "
                "connections:write under 'Basic Information', or run with --http"
            ) from exc
        self._handler = AsyncSocketModeHandler(self._app, self._app_token)
        await self._handler.connect_async()  # type: ignore[no-untyped-call]
        log.info("connected to Slack in Socket Mode")

    async def connected(self) -> bool:
        return self._handler is not None and bool(await self._handler.client.is_connected())

    async def close(self) -> None:
        if self._handler is not None:
            await self._handler.close_async()  # type: ignore[no-untyped-call]


def _well_formed(body: str, content_type: str) -> bool:
    """True when Bolt can read the body: a JSON object, or a form whose ``payload`` (if any) is one."""
    try:
        if content_type == "application/json":
            return isinstance(json.loads(body), dict)
        payload = parse_qs(body).get("payload")
        return payload is None or isinstance(json.loads(payload[0]), dict)
    except ValueError:
        return False


def _refuse_malformed(signing_secret: str) -> Middleware:
    """A signed request Bolt cannot read is answered 400 (Bolt would fail with a 500, and Slack would
    send it again); an unsigned one 401, as Bolt answers it."""
    verifier = SignatureVerifier(signing_secret)

    @web.middleware
    async def refuse(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == EVENTS_PATH and request.method == "POST":
            body = await request.text()
            if not _well_formed(body, request.content_type):
                if not verifier.is_valid_request(body, dict(request.headers)):
                    return web.json_response({"error": "invalid request"}, status=401)
                log.warning("refused a signed Slack request whose body is not readable")
                return web.json_response({"error": "malformed body"}, status=400)
        return await handler(request)

    return refuse


async def serve_http(
    app: AsyncApp, checks: Mapping[str, ReadinessCheck], *, host: str, port: int, signing_secret: str
) -> web.AppRunner:
    """Serve the Events API at ``/slack/events`` (signatures verified by Bolt), with the health and
    metrics endpoints beside it; the caller cleans the runner up."""
    web_app = app.web_app(path=EVENTS_PATH, port=port)
    web_app.middlewares.append(_refuse_malformed(signing_secret))
    health_routes(web_app, checks)
    runner = await listen(web_app, host=host, port=port, option="--port")
    log.info("serving Slack events over HTTP on %s:%d%s", host, port, EVENTS_PATH)
    return runner
