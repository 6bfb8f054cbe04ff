"""``slack-gpt-bot check`` and ``models``: the whole set-up verified in one go, one line per item.

Each check uses the same adapters the bot runs with, so a green check means the bot can start: the
tokenizer files, Redis (reachable and writable), the Slack bot token and its scopes, Socket Mode or the
signing secret, the model endpoint, and that the configured model and every persona's model exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bot.errors import BotError
from bot.llm import list_models, model_exists
from bot.personas import FilePersonas, PersonaStore
from bot.redis_client import cluster_nodes, is_cluster, open_redis, redis_errors
from bot.services import model_client, redacted, slack_client, token_counter
from bot.settings import Settings, secret_value
from bot.slack import REQUIRED_SCOPES, check_app_token, fetch_identity


@dataclass(frozen=True, slots=True)
class Check:
    """One verified item."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


async def _attempt(name: str, check: Callable[[], Awaitable[str]]) -> Check:
    try:
        return Check(name, True, await check())
    except BotError as exc:
        return Check(name, False, str(exc))
    except Exception as exc:  # a check reports, it never crashes the report
        return Check(name, False, f"{type(exc).__name__}: {exc}")


async def run_checks(settings: Settings, *, http: bool) -> list[Check]:
    """Every item of the set-up, checked."""
    results: list[Check] = []

    async def tokenizer() -> str:
        return f"{(await token_counter(settings)).encoding_name} loads offline"

    results.append(await _attempt("tokenizer", tokenizer))

    team = ""
    web = slack_client(settings)

    async def slack_token() -> str:
        nonlocal team
        identity = await fetch_identity(web)
        team = identity.team_id
        missing = sorted(set(REQUIRED_SCOPES) - identity.scopes)
        if missing:
            raise BotError(f"missing scopes {', '.join(missing)}: reinstall the app from manifest.yaml")
        return f"team {team}, bot user {identity.user_id}, all {len(REQUIRED_SCOPES)} scopes granted"

    async def connection() -> str:
        if http:
            if not secret_value(settings.slack_signing_secret):
                raise BotError("SLACK_SIGNING_SECRET is not set")
            return "signing secret set for HTTP mode"
        await check_app_token(web, secret_value(settings.slack_app_token))
        return "app token accepted for Socket Mode"

    results.append(await _attempt("slack token", slack_token))
    results.append(await _attempt("slack mode", connection))

    personas = FilePersonas.load(settings.system_prompt, settings.personas_file)
    models = {settings.openai_model}
    redis_ok = False
    try:
        async with open_redis(
            settings.redis_url, settings.data_dir, cluster=settings.redis_cluster
        ) as client:

            async def redis_writable() -> str:
                # A cluster's nodes first: a write lands on one node only, and may hit the silent one.
                cluster = is_cluster(client)
                nodes = await cluster_nodes(client) if cluster else ""
                key = f"{settings.redis_prefix}check:{uuid.uuid4().hex}"
                with redis_errors("checking Redis"):
                    await client.set(key, "1", ex=10)
                    ok = await client.get(key) == "1"
                    await client.delete(key)
                if not ok:
                    raise BotError("wrote a key but could not read it back")
                where = redacted(settings.redis_url) if settings.redis_url else "the embedded server"
                if not cluster:
                    return f"a single server, {where}, is reachable and writable"
                return f"a cluster (from {where}): {nodes}; writable"

            results.append(await _attempt("redis", redis_writable))
            redis_ok = results[-1].ok
            if redis_ok and team:
                store = PersonaStore(client, personas, prefix=settings.redis_prefix, thread_ttl_seconds=60)
                models |= {p.model for p, _ in (await store.named(team)).values() if p.model}
    except BotError as exc:
        results.append(Check("redis", False, str(exc)))
    models |= {p.model for p in personas.named.values() if p.model}

    async with model_client(settings, max_retries=0) as openai_client:
        offered: list[str] = []

        async def endpoint() -> str:
            offered.extend(await list_models(openai_client))
            return f"reachable, {len(offered)} models offered"

        results.append(await _attempt("model endpoint", endpoint))
        for model in sorted(models):

            async def exists(model: str = model) -> str:
                # Listed is enough: some servers (vLLM) list their models but have no GET /models/{id}.
                # Azure deployments are not listed, so an unlisted model is looked up on its own.
                if model in offered:
                    return "offered"
                if not await model_exists(openai_client, model):
                    raise BotError("the endpoint does not have this model")
                return "exists"

            results.append(await _attempt(f"model {model}", exists))
    return results


async def models_lines(settings: Settings) -> list[str]:
    """The endpoint's models, one a line, the one in use marked."""
    async with model_client(settings, max_retries=0) as client:
        offered = await list_models(client)
    return [f"{'* ' if m == settings.openai_model else '  '}{m}" for m in offered]
