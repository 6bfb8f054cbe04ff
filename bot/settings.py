"""The bot's one settings object, read from the environment and an optional ``.env`` file.

``load_settings`` is the only way in: it validates everything at once and turns every problem into a
single ``ConfigError`` that lists them all with a hint each, so a bad setting stops start-up with one
message instead of a traceback. Secrets are ``SecretStr`` so they never show up in a log or repr.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.errors import ConfigError
from bot.params import (
    PARAMS,
    LogitBias,
    Penalty,
    ReplyTokens,
    StopSequences,
    SuggestedPrompts,
    Temperature,
    TopP,
    Vision,
)
from bot.places import ChannelSet, channel_list_problems

StreamMode = Literal["auto", "native", "update", "off"]
# What a process does, which decides the settings it needs: Slack ingress over Socket Mode or HTTP (with
# or without workers), a worker only, or just the model (chat, models).
Serving = Literal["socket", "http", "worker", "model"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant in a Slack workspace. Answer clearly and concisely, in Markdown. "
    "Messages from people start with the speaker's name."
)

_AS_JSON = {"lines": ', as JSON, e.g. ["END"]', "json": ', e.g. {"1234": -100}'}
# How to fix each setting, shown next to its problem.
_HINTS: dict[str, str] = {
    "SLACK_BOT_TOKEN": "the Bot User OAuth Token (xoxb-...) from your Slack app's 'OAuth & Permissions' page",
    "SLACK_APP_TOKEN": "an app-level token (xapp-...) with connections:write, from 'Basic Information'",
    "SLACK_SIGNING_SECRET": "the Signing Secret from your Slack app's 'Basic Information' page",
    "OPENAI_API_KEY": "an API key for the model endpoint (may be empty when OPENAI_BASE_URL is set)",
    "MAX_PROMPT_TOKENS": "a whole number of tokens, at least 256",
    "MAX_REPLY_TOKENS": "a whole number of tokens, at least 1, or unset",
    "HISTORY_TTL_SECONDS": "a whole number of seconds, at least 60",
    "HISTORY_MAX_MESSAGES": "a whole number, at least 2",
    "STREAM_MODE": "one of auto, native, update, off",
    "LOG_LEVEL": "one of DEBUG, INFO, WARNING, ERROR",
    "REDIS_URL": "a redis://, rediss:// or unix:// URL, or unset for the embedded server",
    "REDIS_CLUSTER": "true for a Redis Cluster (REDIS_URL then names any of its nodes), else false",
    "JOB_LEASE_SECONDS": "a number of seconds from 2 to 300",
    "JOB_MAX_ATTEMPTS": "a whole number from 1 to 20",
    "WORKER_CONCURRENCY": "a whole number from 1 to 10000",
    "LOG_FORMAT": "text or json",
    "MAX_FILE_BYTES": "a whole number of bytes, at least 1 (default 20 MB)",
    "FILE_MAX_TOKENS": "a whole number of tokens, at least 100",
    "FILE_TIMEOUT_SECONDS": "a number of seconds above 0",
    "IMAGE_CACHE_SECONDS": "a whole number of seconds, 0 or more (0: fetch images again for every reply)",
    "SUMMARIES": "on or off",
    "ALLOWED_CHANNELS": "channel ids (C…) or names (#general), comma-separated",
    "DENIED_CHANNELS": "channel ids (C…) or names (#general), comma-separated",
    "ALLOW_DMS": "true or false",
    "SUMMARY_MAX_TOKENS": "a whole number of tokens from 50 to 4000",
} | {param.setting.upper(): param.allowed + _AS_JSON.get(param.widget, "") for param in PARAMS}


class Settings(BaseSettings):
    """Every setting the bot reads, validated; field names are the environment variables, lower-cased."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_org_id: str | None = None
    openai_project_id: str | None = None
    openai_model: str = "gpt-4o-mini"
    azure_openai_endpoint: str | None = None
    azure_openai_api_key: SecretStr | None = None
    openai_api_version: str | None = None
    openai_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    openai_max_retries: Annotated[int, Field(ge=0, le=10)] = 2

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    personas_file: Path | None = None
    # Who may change personas: user ids (U...) and/or user group ids (S...), comma-separated.
    # Unset: any member of the channel.
    persona_admins: str = ""
    # Where the bot answers (bot.places): channel ids or names, comma-separated; unset: everywhere.
    allowed_channels: str = ""
    denied_channels: str = ""
    allow_dms: bool = True

    max_prompt_tokens: Annotated[int, Field(ge=256)] = 16000
    # Chat Completions parameters (bot.params: every one, with its range) for every reply; a persona's
    # own values win. Unset: not sent.
    max_reply_tokens: ReplyTokens | None = None
    max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: StopSequences | None = None
    logit_bias: LogitBias | None = None
    seed: int | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    vision: Vision | None = None  # unset: auto
    suggested_prompts: SuggestedPrompts | None = None  # unset: the bot's own (bot.assistant)
    # Usage and cost: a price table over the default one, and monthly budgets (unset: no cap).
    prices_file: Path | None = None
    budget_workspace_tokens: Annotated[int, Field(ge=0)] | None = None
    budget_channel_tokens: Annotated[int, Field(ge=0)] | None = None
    budget_user_tokens: Annotated[int, Field(ge=0)] | None = None
    budget_workspace_usd: Annotated[float, Field(ge=0)] | None = None
    budget_channel_usd: Annotated[float, Field(ge=0)] | None = None
    budget_user_usd: Annotated[float, Field(ge=0)] | None = None
    # The end user, hashed with a key, for the provider's abuse monitoring.
    send_user_id: bool = True
    user_id_param: Literal["safety_identifier", "user"] = "safety_identifier"
    user_id_salt: SecretStr | None = None
    token_encoding: str | None = None
    tiktoken_cache_dir: Path = Field(
        # tiktoken's own rule for where it caches encoding files; we seed that cache from the bundled copy.
        default=Path(tempfile.gettempdir()) / "data-gym-cache",
        validation_alias=AliasChoices("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"),
    )

    # Files people share: the largest the bot downloads, how much of a document's text it reads, how
    # long it may take over one file, how long a scaled image stays cached for follow-ups, and the model
    # that transcribes voice clips (unset: voice clips are not read).
    max_file_bytes: Annotated[int, Field(ge=1)] = 20 * 1024 * 1024
    file_max_tokens: Annotated[int, Field(ge=100)] = 8000
    file_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    image_cache_seconds: Annotated[int, Field(ge=0)] = 24 * 3600
    transcribe_model: str | None = None

    stream_mode: StreamMode = "auto"
    feedback: bool = True  # thumbs-up/down buttons under every finished answer
    history_ttl_seconds: Annotated[int, Field(ge=60)] = 30 * 24 * 3600
    history_max_messages: Annotated[int, Field(ge=2)] = 10000
    # Long threads: the turns a context leaves out are summarized after the reply (by SUMMARY_MODEL,
    # unset: the persona's model), and the summary, at most SUMMARY_MAX_TOKENS, goes with the next ones.
    summaries: bool = True
    summary_model: str | None = None
    summary_max_tokens: Annotated[int, Field(ge=50, le=4000)] = 600

    redis_url: str | None = None
    # REDIS_URL names one node of a Redis Cluster: the bot finds the others and routes each key to its slot.
    redis_cluster: bool = False
    redis_prefix: str = "sgb:"
    data_dir: Path = Path("data")
    # Jobs: how long a worker may go silent before its job (and thread lock) pass to another, how
    # often a job is tried before it is dead-lettered, and how many jobs one worker runs at once.
    job_lease_seconds: Annotated[float, Field(ge=2, le=300)] = 10.0
    job_max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    worker_concurrency: Annotated[int, Field(ge=1, le=10000)] = 256
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @property
    def persona_admin_ids(self) -> frozenset[str]:
        """``PERSONA_ADMINS`` as a set of user and user group ids."""
        return frozenset(part.strip() for part in self.persona_admins.split(",") if part.strip())

    @property
    def user_id_key(self) -> bytes:
        """The key that hashes user ids: ``USER_ID_SALT``, else one derived from the bot token."""
        salt = secret_value(self.user_id_salt)
        return (
            salt.encode()
            if salt
            else hashlib.sha256(b"user ids:" + secret_value(self.slack_bot_token).encode()).digest()
        )

    @property
    def places(self) -> tuple[ChannelSet, ChannelSet]:
        """``ALLOWED_CHANNELS`` and ``DENIED_CHANNELS``."""
        return ChannelSet.parse(self.allowed_channels), ChannelSet.parse(self.denied_channels)

    @field_validator("allowed_channels", "denied_channels")
    @classmethod
    def _channels(cls, value: str) -> str:
        if problems := channel_list_problems(value):
            raise ValueError("; ".join(problems))
        return value

    @field_validator("slack_api_url")
    @classmethod
    def _trailing_slash(cls, value: str) -> str:
        # slack_sdk joins method names onto the base URL, so it must end with a slash.
        return value if value.endswith("/") else value + "/"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        # `KEY=` (as .env.example has it) means "not set": the setting's default, whatever it is.
        if value == "" and info.field_name is not None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value


def secret_value(value: SecretStr | None) -> str:
    """The secret itself, or "" when unset; for handing to a client, never to a log."""
    return value.get_secret_value() if value is not None else ""


def _placeholder(secret: str) -> bool:
    """True for a value like .env.example's ``xoxb-...``: a prefix and three dots, never a real one."""
    return secret.endswith("...")


def _still_placeholder(name: str) -> str:
    return f"{name} is still .env.example's placeholder: set it to {_HINTS[name]}"


def _problems_for_run(settings: Settings, serving: Serving) -> list[str]:
    """Settings that are each optional but required together for what this process does."""
    problems: list[str] = []
    if serving == "model":
        return _model_problems(settings, problems)
    if settings.redis_cluster and not (settings.redis_url or "").startswith(("redis://", "rediss://")):
        problems.append(
            "REDIS_CLUSTER is true but REDIS_URL is not a redis:// or rediss:// address: set it to any node "
            "of the cluster (the bot finds the others), or set REDIS_CLUSTER=false"
        )
    token = secret_value(settings.slack_bot_token)
    if not token:
        problems.append(f"SLACK_BOT_TOKEN is missing: set it to {_HINTS['SLACK_BOT_TOKEN']}")
    elif _placeholder(token):
        problems.append(
            f"SLACK_BOT_TOKEN is still .env.example's placeholder: set it to {_HINTS['SLACK_BOT_TOKEN']}"
        )
    elif not token.startswith("xoxb-"):
        problems.append(f"SLACK_BOT_TOKEN must start with xoxb-: use {_HINTS['SLACK_BOT_TOKEN']}")
    if serving == "http" and not secret_value(settings.slack_signing_secret):
        problems.append(
            "SLACK_SIGNING_SECRET is missing (needed with --http): "
            f"set it to {_HINTS['SLACK_SIGNING_SECRET']}"
        )
    if serving == "socket":
        app_token = secret_value(settings.slack_app_token)
        if not app_token:
            problems.append(
                f"SLACK_APP_TOKEN is missing (needed for Socket Mode; or run with --http): "
                f"set it to {_HINTS['SLACK_APP_TOKEN']}"
            )
        elif _placeholder(app_token):
            problems.append(_still_placeholder("SLACK_APP_TOKEN"))
        elif not app_token.startswith("xapp-"):
            problems.append(f"SLACK_APP_TOKEN must start with xapp-: use {_HINTS['SLACK_APP_TOKEN']}")
    if serving == "worker" and not settings.redis_url:
        # An embedded server lives and dies with one process; a separate worker must share the ingress's.
        problems.append("REDIS_URL is missing (a separate worker needs the Redis its ingress uses)")
    return _model_problems(settings, problems)


def _model_problems(settings: Settings, problems: list[str]) -> list[str]:
    """Settings needed to reach the model endpoint, added to ``problems``."""
    if settings.azure_openai_endpoint:
        if not secret_value(settings.azure_openai_api_key):
            problems.append(
                "AZURE_OPENAI_API_KEY is missing: set it to the key of your Azure OpenAI resource"
            )
        if not settings.openai_api_version:
            problems.append(
                "OPENAI_API_VERSION is missing: set it to an Azure OpenAI API version, e.g. 2024-10-21"
            )
    elif not secret_value(settings.openai_api_key) and not settings.openai_base_url:
        problems.append(f"OPENAI_API_KEY is missing: set it to {_HINTS['OPENAI_API_KEY']}")
    elif _placeholder(secret_value(settings.openai_api_key)):
        problems.append(
            f"OPENAI_API_KEY is still .env.example's placeholder: set it to {_HINTS['OPENAI_API_KEY']}"
        )
    if settings.personas_file is not None and not settings.personas_file.is_file():
        problems.append(f"PERSONAS_FILE {settings.personas_file} does not exist: point it at a YAML file")
    return problems


def load_settings(*, serving: Serving = "socket", env_file: str | None = ".env") -> Settings:
    """Read and validate the settings for what this process does (``serving``); every problem in one
    ``ConfigError``."""
    problems: list[str] = []
    try:
        settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as exc:
        invalid: dict[str, Any] = {}
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            hint = _HINTS.get(field.upper())
            problems.append(f"{field.upper()}: {error['msg']}" + (f"; expected {hint}" if hint else ""))
            if field in Settings.model_fields:
                invalid[field] = Settings.model_fields[field].get_default(call_default_factory=True)
        # Build again with the bad values at their defaults, so the checks below still report the rest.
        settings = Settings(_env_file=env_file, **invalid)  # type: ignore[call-arg]
    problems += _problems_for_run(settings, serving)
    if problems:
        raise ConfigError(problems)
    return settings
