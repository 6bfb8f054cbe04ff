"""The composition root: builds every client from ``Settings``, wires Bolt to the pipeline, serves Slack.

This is the only module that imports ``slack_bolt``. Bolt acknowledges each event before our listener
runs, so nothing here (or after it) delays the ack. It also holds the single last-resort handler: any
error that escapes the pipeline is logged with its traceback, and the user is told a fixed sentence,
never the exception's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from openai import AsyncOpenAI
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.commands import EDIT_ACTION, EDITOR_CALLBACK, ModelList, PersonaCommands, UsageReport
from bot.conversation import Responder
from bot.domain import Incoming, Persona
from bot.errors import GENERIC_USER_MESSAGE, BotError
from bot.history import RedisHistory, open_redis
from bot.llm import OpenAIChat, list_models, make_client
from bot.personas import FilePersonas, PersonaStore
from bot.settings import Settings, secret_value
from bot.slack import SlackAdapter, check_app_token, fetch_identity, parse_event
from bot.tokens import TiktokenCounter, encoding_name_for, load_encoding
from bot.usage import Budgets, RedisUsage, load_prices

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0


def model_client(settings: Settings, max_retries: int | None = None) -> AsyncOpenAI:
    """The model endpoint's client, as configured (Azure OpenAI when its endpoint is set)."""
    return make_client(
        api_key=secret_value(settings.azure_openai_api_key or settings.openai_api_key),
        base_url=settings.openai_base_url,
        organization=settings.openai_org_id,
        project=settings.openai_project_id,
        timeout_seconds=settings.openai_timeout_seconds,
        max_retries=settings.openai_max_retries if max_retries is None else max_retries,
        azure_endpoint=settings.azure_openai_endpoint,
        api_version=settings.openai_api_version,
    )


def model_defaults(settings: Settings) -> Persona:
    """The Chat Completions parameters the settings give every reply (a persona's own win)."""
    return Persona(
        name="settings",
        system_prompt=settings.system_prompt,
        model=settings.openai_model,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_reply_tokens,
        presence_penalty=settings.presence_penalty,
        frequency_penalty=settings.frequency_penalty,
        stop=tuple(settings.stop) if settings.stop else None,
        logit_bias=settings.logit_bias,
        seed=settings.seed,
        reasoning_effort=settings.reasoning_effort,
        service_tier=settings.service_tier,
    )


@dataclass
class Bot:
    """The running parts: the Bolt app and the pipeline behind it."""

    app: AsyncApp
    responder: Responder
    slack: SlackAdapter
    settings: Settings
    in_flight: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, incoming: Incoming) -> None:
        """Answer one message; the last resort for anything the pipeline did not handle."""
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            await self.responder.respond(incoming)
        except BotError as exc:
            log.warning("could not answer in %s: %s", incoming.key, exc)
            if incoming.addressed:
                await self._tell(incoming, exc.user_message)
        except Exception:
            log.exception("unexpected error while answering in %s", incoming.key)
            if incoming.addressed:
                await self._tell(incoming, GENERIC_USER_MESSAGE)
        finally:
            if task is not None:
                self.in_flight.discard(task)

    async def _tell(self, incoming: Incoming, text: str) -> None:
        try:
            await self.slack.post(incoming, f":warning: {text}")
        except Exception as exc:  # Slack itself may be what failed; the log is all that is left
            log.error("could not tell the user about the error either: %s", type(exc).__name__)

    async def drain(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Wait for answers in progress to finish, up to ``grace_seconds``."""
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=grace_seconds)


@contextlib.asynccontextmanager
async def build(settings: Settings) -> AsyncIterator[Bot]:
    """Every client the bot needs, connected and checked, and the Bolt app wired to the pipeline."""
    encoding = encoding_name_for(settings.openai_model, settings.token_encoding)
    counter = TiktokenCounter(await asyncio.to_thread(load_encoding, encoding, settings.tiktoken_cache_dir))
    files = FilePersonas.load(settings.system_prompt, settings.personas_file)
    openai_client = model_client(settings)
    async with (
        # One HTTP session for every Slack call; without it slack_sdk opens a new connection per call.
        aiohttp.ClientSession() as slack_session,
        open_redis(settings.redis_url, settings.data_dir) as redis_client,
    ):
        web_client = AsyncWebClient(
            token=secret_value(settings.slack_bot_token),
            base_url=settings.slack_api_url,
            session=slack_session,
            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
        )
        history = RedisHistory(
            redis_client,
            counter,
            prefix=settings.redis_prefix,
            ttl_seconds=settings.history_ttl_seconds,
            max_turns=settings.history_max_messages,
        )
        personas = PersonaStore(
            redis_client, files, prefix=settings.redis_prefix, thread_ttl_seconds=settings.history_ttl_seconds
        )
        identity = await fetch_identity(web_client)
        slack = SlackAdapter(
            web_client,
            history,
            bot_user_id=identity["user_id"],
            bot_id=identity["bot_id"],
            stream_mode=settings.stream_mode,
        )
        usage = RedisUsage(
            redis_client,
            prefix=settings.redis_prefix,
            prices=load_prices(settings.prices_file),
            budgets=Budgets(
                workspace_tokens=settings.budget_workspace_tokens,
                channel_tokens=settings.budget_channel_tokens,
                user_tokens=settings.budget_user_tokens,
                workspace_usd=settings.budget_workspace_usd,
                channel_usd=settings.budget_channel_usd,
                user_usd=settings.budget_user_usd,
            ),
        )
        responder = Responder(
            history=history,
            model=OpenAIChat(
                openai_client,
                defaults=model_defaults(settings),
                max_tokens_param=settings.max_tokens_param,
                user_id_param=settings.user_id_param if settings.send_user_id else None,
                user_id_key=settings.user_id_key,
            ),
            slack=slack,
            personas=personas,
            counter=counter,
            max_prompt_tokens=settings.max_prompt_tokens,
            usage=usage,
        )
        bot = Bot(_bolt_app(settings, web_client, identity), responder, slack, settings)
        _listen(bot, identity)
        models = ModelList(lambda: list_models(openai_client))
        commands = PersonaCommands(web_client, personas, counter, settings.persona_admin_ids, models)
        _manage_personas(bot.app, commands)
        _report_usage(bot.app, UsageReport(web_client, usage, commands))
        log.info(
            "ready: team %s, bot user %s, encoding %s", identity["team_id"], identity["user_id"], encoding
        )
        try:
            yield bot
        finally:
            await bot.drain()
            await openai_client.close()


def _drop_token_unused_warning(record: logging.LogRecord) -> bool:
    # Bolt reads SLACK_BOT_TOKEN from the environment itself, then warns that the client we pass wins.
    # That is the intent here (the client carries SLACK_API_URL), so the warning would only mislead.
    return "`token` will be unused" not in record.getMessage()


def _bolt_app(settings: Settings, web_client: AsyncWebClient, identity: dict[str, str]) -> AsyncApp:
    bot_token = web_client.token
    logging.getLogger("slack_bolt.AsyncApp").addFilter(_drop_token_unused_warning)

    async def authorize(**_: Any) -> AuthorizeResult:
        # auth.test was called once at start-up; answering from it keeps Slack calls out of the ack path.
        return AuthorizeResult(
            enterprise_id=None,
            team_id=identity["team_id"],
            bot_user_id=identity["user_id"],
            bot_id=identity["bot_id"],
            bot_token=bot_token,
        )

    return AsyncApp(
        client=AsyncWebClient(base_url=settings.slack_api_url),
        authorize=authorize,
        signing_secret=secret_value(settings.slack_signing_secret),
    )


def _listen(bot: Bot, identity: dict[str, str]) -> None:
    async def on_message(body: dict[str, Any], event: dict[str, Any]) -> None:
        team = body.get("team_id") or identity["team_id"]
        incoming = parse_event(event, team=team, bot_user_id=identity["user_id"])
        if incoming is not None:
            await bot.handle(incoming)

    # A mention in a channel arrives twice (app_mention and message); the pipeline answers it once.
    bot.app.event("app_mention")(on_message)
    bot.app.event("message")(on_message)


def _manage_personas(app: AsyncApp, commands: PersonaCommands) -> None:
    """``/persona``, its editor and App Home: ack first, then work (no Slack call before an ack)."""

    async def safely(what: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            log.exception("%s failed", what)

    async def on_command(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        await safely("/persona", commands.command(body))

    async def on_editor(ack: AsyncAck, body: dict[str, Any]) -> None:
        errors = await commands.submit_editor(body)  # no Slack call: errors must travel in the ack
        if errors:
            await ack(**errors)
            return
        await ack()
        await safely("saving the persona editor", commands.save_editor(body))

    async def on_edit_button(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        await safely("opening the persona editor", commands.open_editor_from_home(body))

    async def on_home(body: dict[str, Any], event: dict[str, Any]) -> None:
        if event.get("tab") == "home":
            await safely("publishing App Home", commands.publish_home(body["team_id"], event["user"]))

    app.command("/persona")(on_command)
    app.view(EDITOR_CALLBACK)(on_editor)
    app.action(EDIT_ACTION)(on_edit_button)
    app.event("app_home_opened")(on_home)


def _report_usage(app: AsyncApp, report: UsageReport) -> None:
    async def on_usage(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        try:
            await report.command(body)
        except Exception:
            log.exception("/usage failed")

    app.command("/usage")(on_usage)


async def serve_socket_mode(bot: Bot, stop: asyncio.Event) -> None:
    """Receive events over Socket Mode until ``stop`` is set."""
    app_token = secret_value(bot.settings.slack_app_token)
    # slack_sdk retries a refused app token forever; checking it once makes start-up fail clearly instead.
    await check_app_token(bot.app.client, app_token)
    handler = AsyncSocketModeHandler(bot.app, app_token)
    await handler.connect_async()  # type: ignore[no-untyped-call]
    log.info("connected to Slack in Socket Mode")
    try:
        await stop.wait()
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]


async def serve_http(bot: Bot, stop: asyncio.Event, *, host: str, port: int) -> None:
    """Serve the Events API at ``/slack/events`` (signatures verified by Bolt) until ``stop`` is set."""
    runner = web.AppRunner(bot.app.web_app(path="/slack/events", port=port))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("serving Slack events over HTTP on %s:%d/slack/events", host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def run(settings: Settings, *, http: bool, host: str, port: int, stop: asyncio.Event) -> None:
    """Start the bot and serve until ``stop`` is set, then let answers in progress finish."""
    async with build(settings) as bot:
        if http:
            await serve_http(bot, stop, host=host, port=port)
        else:
            await serve_socket_mode(bot, stop)
