"""Usage, cost and budgets: what every reply used, what it cost, and whether the next one may run.

Each reply adds its usage to two Redis hashes per workspace, one for the month (``sgb:{T:usage}:YYYY-MM``)
and one for the day (``...:YYYY-MM-DD``), in one round trip. Fields are ``<scope>:<figure>``: scope
``all``, ``ch:<channel>``, ``u:<user>`` or ``m:<model>``; figure ``prompt``, ``completion``,
``reasoning``, ``replies``, ``trimmed``, ``estimated`` (replies counted with tiktoken because the
endpoint sent no usage) and ``micro_usd`` (cost estimate from the price table, in millionths of a
dollar).

Budgets are monthly caps in tokens and/or USD per workspace, channel and user. Before a model call the
bot reserves the reply's worst case (prompt plus maximum reply) in a Lua script that checks every cap
and reserves in one step, so concurrent requests at the edge cannot overshoot by more than one reply.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as redis
import yaml

from bot.domain import BudgetCheck, ThreadKey, Usage
from bot.errors import ConfigError
from bot.observability import BUDGET_REFUSALS, TOKENS
from bot.redis_client import glob_escape, keys_matching, redis_errors

# USD per million input and output tokens; PRICES_FILE adds to or overrides these.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}
KEEP_SECONDS = 400 * 24 * 3600
NOTICE_AT = 0.8
SCOPE_NAMES = {"all": "workspace", "ch": "channel", "u": "user"}

# KEYS[1]: the month hash. ARGV: tokens, micro_usd, then per cap (field prefix, cap tokens or -1, cap
# micro_usd or -1), then the notice ratio. Returns {denied prefix or "", "tokens"/"USD", warned prefix or "",
# why denied: "spent" (used up) or "reserved" (what is left is held by replies in progress)}.
_RESERVE = """
local tokens, micro = tonumber(ARGV[1]), tonumber(ARGV[2])
local warned = ''
for i = 3, #ARGV - 1, 3 do
  local scope, cap_tokens, cap_micro = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local used = (tonumber(redis.call('HGET', KEYS[1], scope .. ':prompt')) or 0)
             + (tonumber(redis.call('HGET', KEYS[1], scope .. ':completion')) or 0)
  local pending = tonumber(redis.call('HGET', KEYS[1], 'pending:' .. scope .. ':tokens')) or 0
  local spent = tonumber(redis.call('HGET', KEYS[1], scope .. ':micro_usd')) or 0
  local pending_micro = tonumber(redis.call('HGET', KEYS[1], 'pending:' .. scope .. ':micro_usd')) or 0
  if cap_tokens >= 0 and used >= cap_tokens then return {scope, 'tokens', '', 'spent'} end
  if cap_micro >= 0 and spent >= cap_micro then return {scope, 'USD', '', 'spent'} end
  if cap_tokens >= 0 and used + pending >= cap_tokens then return {scope, 'tokens', '', 'reserved'} end
  if cap_micro >= 0 and spent + pending_micro >= cap_micro then return {scope, 'USD', '', 'reserved'} end
  if warned == '' and ((cap_tokens > 0 and used >= cap_tokens * tonumber(ARGV[#ARGV])) or
                       (cap_micro > 0 and spent >= cap_micro * tonumber(ARGV[#ARGV]))) then
    warned = scope
  end
end
for i = 3, #ARGV - 1, 3 do
  redis.call('HINCRBY', KEYS[1], 'pending:' .. ARGV[i] .. ':tokens', tokens)
  redis.call('HINCRBY', KEYS[1], 'pending:' .. ARGV[i] .. ':micro_usd', micro)
end
return {'', '', warned, ''}
"""


# KEYS: the month and day hashes. ARGV: seconds to keep them, then field, increment, field, increment...
_RECORD = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
"""


def load_prices(path: Path | None) -> dict[str, tuple[float, float]]:
    """The default price table with ``PRICES_FILE`` (``model: {input: 2.5, output: 10}``) over it."""
    prices = dict(DEFAULT_PRICES)
    if path is None:
        return prices
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for model, price in data.items():
            prices[str(model)] = (float(price["input"]), float(price["output"]))
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError, AttributeError) as exc:
        rule = "model names mapped to {input: USD, output: USD} per million tokens"
        raise ConfigError([f"PRICES_FILE {path} must hold {rule} ({exc})"]) from None
    return prices


def price_of(prices: Mapping[str, tuple[float, float]], model: str) -> tuple[float, float] | None:
    """The price of ``model``, matching the longest listed prefix (``gpt-4o-2024-08-06`` -> ``gpt-4o``)."""
    matches = [name for name in prices if model == name or model.startswith(name + "-")]
    return prices[max(matches, key=len)] if matches else None


def micro_usd(prices: Mapping[str, tuple[float, float]], model: str, prompt: int, completion: int) -> int:
    price = price_of(prices, model)
    return 0 if price is None else round(prompt * price[0] + completion * price[1])


@dataclass(frozen=True, slots=True)
class Budgets:
    """Monthly caps; None means no cap."""

    workspace_tokens: int | None = None
    channel_tokens: int | None = None
    user_tokens: int | None = None
    workspace_usd: float | None = None
    channel_usd: float | None = None
    user_usd: float | None = None

    def caps(self, channel: str, user: str) -> list[tuple[str, int, int]]:
        """(field prefix, token cap or -1, micro-USD cap or -1) for every scope that has a cap."""
        scopes = [
            ("all", self.workspace_tokens, self.workspace_usd),
            (f"ch:{channel}", self.channel_tokens, self.channel_usd),
            (f"u:{user}", self.user_tokens, self.user_usd),
        ]
        return [
            (prefix, -1 if tokens is None else tokens, -1 if usd is None else round(usd * 1_000_000))
            for prefix, tokens, usd in scopes
            if tokens is not None or usd is not None
        ]


def month_of(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m")


def next_month(now: datetime.datetime) -> str:
    first = (now.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
    return first.strftime("%Y-%m-%d")


def usage_key(prefix: str, team: str, period: str) -> str:
    """Where workspace ``team``'s usage of ``period`` (a month, a day, a notice marker) lives."""
    # Every period's hash (and budget notice marker) carries the tag {T:usage}: the script that
    # records a reply in the month and the day touches one Redis Cluster slot.
    return f"{prefix}{{{team}:usage}}:{period}"


class RedisUsage:
    """Implements ``domain.UsageLedger``: usage and cost per workspace, channel, user, model and day."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, prices: Mapping[str, tuple[float, float]], budgets: Budgets
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self.prices = prices
        self._budgets = budgets
        self._reserve = client.register_script(_RESERVE)
        self._record = client.register_script(_RECORD)

    def key(self, team: str, period: str) -> str:
        return usage_key(self._prefix, team, period)

    async def reserve(self, key: ThreadKey, user: str, model: str, tokens: int) -> BudgetCheck:
        """May a reply of up to ``tokens`` run? Reserves them when it may."""
        caps = self._budgets.caps(key.channel, user)
        if not caps:
            return BudgetCheck(True)
        now = datetime.datetime.now(datetime.UTC)
        cost = micro_usd(self.prices, model, tokens, 0)
        args: list[str | int | float] = [tokens, cost]
        for cap in caps:
            args += list(cap)
        args.append(NOTICE_AT)
        month = self.key(key.team, month_of(now))
        with redis_errors("checking budgets"):
            denied, kind, warned, why = await self._reserve(keys=[month], args=args)
            told = f"{month}:notice:{key.channel}:{key.thread_ts}"
            first_notice = bool(warned) and bool(await self._redis.set(told, 1, nx=True, ex=32 * 24 * 3600))
        if denied:
            BUDGET_REFUSALS.inc()
            scope = SCOPE_NAMES[str(denied).split(":")[0]]
            if why == "reserved":
                return BudgetCheck(
                    False,
                    f"What is left of this {scope}'s monthly {kind} budget is held by answers in progress, "
                    "so I can't start another one now. Please ask again in a minute.",
                )
            return BudgetCheck(
                False,
                f"The monthly {kind} budget for this {scope} is used up, so I can't answer now. "
                f"It resets on {next_month(now)}.",
            )
        notice = None
        if first_notice:  # once per thread
            scope = SCOPE_NAMES[str(warned).split(":")[0]]
            notice = f"_Note: this {scope} has used over {NOTICE_AT:.0%} of its monthly budget._"
        return BudgetCheck(True, notice=notice, reserved=tokens, reserved_micro_usd=cost)

    async def settle(
        self,
        key: ThreadKey,
        user: str,
        model: str,
        usage: Usage,
        trimmed: int,
        check: BudgetCheck,
        *,
        counted: str = "replies",
    ) -> None:
        """Record a reply's usage (or a summary's: ``counted`` names what is counted) and release its
        reservation."""
        TOKENS.labels("prompt").inc(usage.prompt_tokens)
        TOKENS.labels("completion").inc(usage.completion_tokens)
        now = datetime.datetime.now(datetime.UTC)
        figures = {
            "prompt": usage.prompt_tokens,
            "completion": usage.completion_tokens,
            "reasoning": usage.reasoning_tokens,
            counted: 1,
            "trimmed": trimmed,
            "estimated": int(usage.estimated),
            "micro_usd": micro_usd(self.prices, model, usage.prompt_tokens, usage.completion_tokens),
        }
        scopes = ["all", f"ch:{key.channel}", f"u:{user}", f"m:{model}"]
        # One script call for all the increments: far cheaper than dozens of pipelined commands.
        args: list[str | int] = [KEEP_SECONDS]
        for scope in scopes:
            for figure, value in figures.items():
                if value:
                    args += [f"{scope}:{figure}", value]
        month, day = self.key(key.team, month_of(now)), self.key(key.team, now.strftime("%Y-%m-%d"))
        with redis_errors("recording usage"):
            await self._record(keys=[month, day], args=args)
        if check.reserved:
            await self.release(key, user, check)

    async def release(self, key: ThreadKey, user: str, check: BudgetCheck) -> None:
        """Give back a reply's reservation (after it ran, or when it never did)."""
        if not check.reserved:
            return
        month = self.key(key.team, month_of(datetime.datetime.now(datetime.UTC)))
        with redis_errors("releasing a budget reservation"):
            async with self._redis.pipeline(transaction=True) as pipe:
                for prefix, _, _ in self._budgets.caps(key.channel, user):
                    pipe.hincrby(month, f"pending:{prefix}:tokens", -check.reserved)
                    pipe.hincrby(month, f"pending:{prefix}:micro_usd", -check.reserved_micro_usd)
                await pipe.execute()

    async def forget_person(self, team: str, user: str) -> int:
        """``/forget me``: a person's own figures go; the workspace's, channels' and models' totals keep
        what they spent, naming nobody. How many periods held their figures."""
        mine = (f"u:{user}:", f"pending:u:{user}:")
        periods = 0
        with redis_errors("forgetting a person's usage"):
            for key in await keys_matching(self._redis, glob_escape(self.key(team, "")) + "*"):
                if await self._redis.type(key) != "hash":
                    continue
                fields = [f for f in await self._redis.hkeys(key) if str(f).startswith(mine)]
                if fields:
                    await self._redis.hdel(key, *fields)
                    periods += 1
        return periods

    async def month(self, team: str) -> dict[str, int]:
        """This month's figures for the workspace, by field."""
        now = datetime.datetime.now(datetime.UTC)
        with redis_errors("reading usage"):
            raw = await self._redis.hgetall(self.key(team, month_of(now)))
        return {str(k): int(v) for k, v in raw.items()}
