"""The bootstrap: every core service, built from ``Settings`` in one place, with no Bolt in it.

``open_services`` connects Redis (or starts the embedded server), loads the tokenizer offline, and
builds the thread history, personas, usage and budgets, the model client, and, when the process talks
to Slack, the Web API client, the bot's identity, the Slack adapter, the job queue and the file
reader. Every entry point uses it: the ingress (Socket Mode or HTTP), the worker, the terminal chat;
``check`` and ``models`` use the same builders one by one, so that each problem is reported on its own
line. Entry points stay thin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import redis.asyncio as redis
from openai import AsyncOpenAI
from slack_sdk.web.async_client import AsyncWebClient

from bot.assistant import AssistantPane
from bot.conversation import Responder
from bot.domain import ChatModel, FileReader, PaneContext, Persona, ShortcutSlack, SlackPort
from bot.errors import HistoryError, SlackError, StartupError
from bot.feedback import FeedbackStore
from bot.files import FileLimits, SlackFiles
from bot.forgetting import Forgetting
from bot.history import RedisHistory
from bot.jobs import JobQueue
from bot.llm import OpenAIChat, make_client
from bot.params import PARAMS, persona_value
from bot.personas import FilePersonas, PersonaStore
from bot.redis_client import open_redis
from bot.retention import ChannelRetention
from bot.settings import Settings, secret_value
from bot.slack import REQUIRED_SCOPES, BotIdentity, SlackAdapter, fetch_identity, http_session, web_client
from bot.summaries import Summarizer
from bot.tokens import TiktokenCounter, encoding_name_for, load_encoding
from bot.upgrade import upgrade_keys
from bot.usage import Budgets, RedisUsage, load_prices
from bot.views import feedback_blocks

log = logging.getLogger(__name__)


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
    values = {param.name: persona_value(getattr(settings, param.setting)) for param in PARAMS}
    return Persona(name="settings", system_prompt=settings.system_prompt, **values)


def budgets(settings: Settings) -> Budgets:
    return Budgets(
        workspace_tokens=settings.budget_workspace_tokens,
        channel_tokens=settings.budget_channel_tokens,
        user_tokens=settings.budget_user_tokens,
        workspace_usd=settings.budget_workspace_usd,
        channel_usd=settings.budget_channel_usd,
        user_usd=settings.budget_user_usd,
    )


def slack_client(settings: Settings, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    return web_client(secret_value(settings.slack_bot_token), settings.slack_api_url, session)


async def token_counter(settings: Settings) -> TiktokenCounter:
    """The tokenizer for the configured model, loaded offline (off the event loop: it reads files)."""
    encoding = encoding_name_for(settings.openai_model, settings.token_encoding)
    return TiktokenCounter(await asyncio.to_thread(load_encoding, encoding, settings.tiktoken_cache_dir))


def redacted(url: str) -> str:
    """``url`` without the password it may carry (``redis://:secret@host``), for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def _identity(settings: Settings, web: AsyncWebClient) -> BotIdentity:
    """Who the bot is, or a ``StartupError`` saying why Slack would not say: unreachable, the token
    refused, or a scope the bot needs missing."""
    try:
        identity = await fetch_identity(web)
    except SlackError as exc:
        if exc.transient:
            raise StartupError(
                f"cannot reach Slack at SLACK_API_URL {settings.slack_api_url}: {exc.error}; "
                "check the URL and this machine's network"
            ) from exc
        raise StartupError(
            f"Slack refused SLACK_BOT_TOKEN ({exc.error}): copy the Bot User OAuth Token again from your "
            "app's 'OAuth & Permissions' page, or reinstall the app"
        ) from exc
    missing = sorted(set(REQUIRED_SCOPES) - identity.scopes)
    if identity.scopes and missing:
        raise StartupError(
            f"the bot token lacks the scopes {', '.join(missing)}: add them under 'OAuth & Permissions' "
            "(manifest.yaml lists them all) and reinstall the app"
        )
    return identity


@dataclass
class SlackServices:
    """What a process that talks to Slack has besides the core."""

    web: AsyncWebClient
    identity: BotIdentity
    adapter: SlackAdapter
    queue: JobQueue
    files: SlackFiles
    pane: AssistantPane
    forgetting: Forgetting


@dataclass
class Services:
    """The core services of one process."""

    settings: Settings
    redis: redis.Redis
    redis_url: str  # REDIS_URL, or where the embedded server listens
    counter: TiktokenCounter
    history: RedisHistory
    retention: ChannelRetention
    personas: PersonaStore
    usage: RedisUsage
    feedback: FeedbackStore
    openai: AsyncOpenAI
    model: OpenAIChat
    slack: SlackServices | None

    def responder(
        self,
        slack: SlackPort,
        model: ChatModel | None = None,
        files: FileReader | None = None,
        pane: PaneContext | None = None,
        shortcut_slack: ShortcutSlack | None = None,
    ) -> Responder:
        """The pipeline, writing to ``slack`` (Slack itself, or the terminal), reading ``files`` and
        what the assistant ``pane`` knows; answering shortcuts through ``shortcut_slack``."""
        return Responder(
            history=self.history,
            model=model or self.model,
            slack=slack,
            personas=self.personas,
            counter=self.counter,
            max_prompt_tokens=self.settings.max_prompt_tokens,
            usage=self.usage,
            files=files,
            pane=pane,
            shortcut_slack=shortcut_slack,
            summaries=self._summarizer(model or self.model),
        )

    def _summarizer(self, model: ChatModel) -> Summarizer | None:
        if not self.settings.summaries:
            return None
        return Summarizer(
            self.history,
            model,
            self.counter,
            max_prompt_tokens=self.settings.max_prompt_tokens,
            max_tokens=self.settings.summary_max_tokens,
            model_name=self.settings.summary_model,
            usage=self.usage,
        )

    def require_slack(self) -> SlackServices:
        if self.slack is None:
            raise RuntimeError("these services were opened without Slack")
        return self.slack


@asynccontextmanager
async def open_services(settings: Settings, *, slack: bool = True) -> AsyncIterator[Services]:
    """Every core service, connected and checked; ``slack=False`` for the terminal chat (no tokens)."""
    counter = await token_counter(settings)
    files = FilePersonas.load(settings.system_prompt, settings.personas_file)
    prices = load_prices(settings.prices_file)
    async with AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                open_redis(settings.redis_url, settings.data_dir, cluster=settings.redis_cluster)
            )
        except HistoryError as exc:
            where = (
                f"REDIS_URL {redacted(settings.redis_url)}" if settings.redis_url else "the embedded Redis"
            )
            raise StartupError(f"cannot reach {where} ({exc}): start it, or fix REDIS_URL") from exc
        openai_client = model_client(settings)
        stack.push_async_callback(openai_client.close)
        retention = ChannelRetention(
            client, prefix=settings.redis_prefix, default_seconds=settings.history_ttl_seconds
        )
        history = RedisHistory(
            client,
            counter,
            prefix=settings.redis_prefix,
            ttl_seconds=settings.history_ttl_seconds,
            max_turns=settings.history_max_messages,
            lock_lease_seconds=settings.job_lease_seconds,
            retention=retention.seconds,
        )
        services = Services(
            settings=settings,
            redis=client,
            redis_url=settings.redis_url or f"unix://{client.connection_pool.connection_kwargs['path']}",
            counter=counter,
            history=history,
            retention=retention,
            personas=PersonaStore(
                client, files, prefix=settings.redis_prefix, thread_ttl_seconds=settings.history_ttl_seconds
            ),
            usage=RedisUsage(client, prefix=settings.redis_prefix, prices=prices, budgets=budgets(settings)),
            feedback=FeedbackStore(
                client, prefix=settings.redis_prefix, votes_seconds=settings.history_ttl_seconds
            ),
            openai=openai_client,
            model=OpenAIChat(
                openai_client,
                defaults=model_defaults(settings),
                max_tokens_param=settings.max_tokens_param,
                user_id_param=settings.user_id_param if settings.send_user_id else None,
                user_id_key=settings.user_id_key,
            ),
            slack=None,
        )
        if slack:
            session = await stack.enter_async_context(http_session())
            web = slack_client(settings, session)
            identity = await _identity(settings, web)
            try:
                await upgrade_keys(client, settings.redis_prefix, identity.team_id)
            except HistoryError as exc:
                raise StartupError(f"cannot upgrade an earlier version's keys ({exc})") from exc
            adapter = SlackAdapter(
                web,
                history,
                bot_user_id=identity.user_id,
                bot_id=identity.bot_id,
                stream_mode=settings.stream_mode,
                answer_blocks=feedback_blocks if settings.feedback else None,
            )
            queue = JobQueue(
                client,
                prefix=settings.redis_prefix,
                team=identity.team_id,
                lease_seconds=settings.job_lease_seconds,
                max_attempts=settings.job_max_attempts,
                joined_seconds=settings.history_ttl_seconds,
            )
            file_reader = SlackFiles(
                client,
                adapter,
                counter,
                FileLimits(
                    max_bytes=settings.max_file_bytes,
                    max_tokens=settings.file_max_tokens,
                    timeout_seconds=settings.file_timeout_seconds,
                    picture_cache_seconds=settings.image_cache_seconds,
                    thread_ttl_seconds=settings.history_ttl_seconds,
                ),
                prefix=settings.redis_prefix,
                model=settings.openai_model,
                openai=openai_client,
                transcribe_model=settings.transcribe_model,
            )
            pane = AssistantPane(
                adapter,
                services.personas,
                client,
                counter,
                prefix=settings.redis_prefix,
                ttl_seconds=settings.history_ttl_seconds,
                max_tokens=settings.file_max_tokens,
                default_prompts=settings.suggested_prompts,
            )
            forgetting = Forgetting(services.history, file_reader, services.personas, queue, adapter.readable)
            services.slack = SlackServices(web, identity, adapter, queue, file_reader, pane, forgetting)
            log.info(
                "connected: team %s, bot user %s, encoding %s",
                identity.team_id,
                identity.user_id,
                counter.encoding_name,
            )
        yield services
