"""What model requests cost and whether a budget allows another one. Pure: no I/O, no clock.

Usage comes from the Messages API's own responses (`message_start` and `message_delta` of a stream, or a whole
JSON message), read by the gateway as it passes them through; it is priced with the config's table in integer
nano-USD (1e-9 USD: one token at $0.08 per million is 80 nano-USD, so sums are exact). A budget's day starts at
`budgets.reset_at` in `budgets.timezone`, its month on the 1st at that time.

Amounts for people (`usd`): to the cent ("$5.02", "$0.04"), and to a hundredth of a cent below half a cent
("$0.0021"), so the cost of one small turn is not shown as $0.00; rounded half up.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from orchestrator.config import BudgetSettings, Price

NANO_PER_USD = 10**9
MAX_LINE_BYTES = 1024**2  # an SSE line longer than this is dropped (the API's usage events are a few hundred bytes)
_USAGE_EVENTS = (b"message_start", b"message_delta", b"message_stop")
_SCOPES = ("chat", "user", "instance")


# ---- prices ----

def price_for(prices: Mapping[str, Price], model: str) -> Price:
    """The price of the longest key `model` starts with; `default` when none does."""
    keys = [key for key in prices if key != "default" and model.startswith(key)]
    return prices[max(keys, key=len)] if keys else prices["default"]


def cost_nano(price: Price, input: int, output: int, cache_write: int, cache_read: int) -> int:
    """nano-USD for these token counts: tokens × USD per million × 1000, exact, rounded half up."""
    total = (input * price.input + output * price.output + cache_write * price.cache_write
             + cache_read * price.cache_read) * 1000
    return int(total.to_integral_value(rounding=ROUND_HALF_UP))


def nano(amount: Decimal) -> int:
    """USD as nano-USD (a cap from the config)."""
    return int((amount * NANO_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def usd(nano_usd: int) -> str:
    """Dollars for people, to the cent ($5.02, $0.04), and to a hundredth of a cent below one ($0.0021)."""
    amount = Decimal(nano_usd) / NANO_PER_USD
    cents = amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    if cents or not amount:
        return f"${cents}"
    return f"${amount.quantize(Decimal('0.0001'), rounding=ROUND_HALF_UP)}"


# ---- usage ----

@dataclass(frozen=True)
class Usage:
    """A response's token counts. The field names are the store's columns."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0

    def merged(self, usage: object) -> Usage:
        """These counts with those an API `usage` object gives (a message_delta's are cumulative: they replace)."""
        if not isinstance(usage, dict):
            return self
        names = {"input_tokens": "input_tokens", "output_tokens": "output_tokens",
                 "cache_creation_input_tokens": "cache_write_tokens", "cache_read_input_tokens": "cache_read_tokens"}
        given = {ours: usage[theirs] for theirs, ours in names.items() if _count(usage.get(theirs))}
        return dataclasses.replace(self, **given)

    def counts(self) -> dict[str, int]:
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "model"}

    def cost(self, prices: Mapping[str, Price]) -> int:
        return cost_nano(price_for(prices, self.model), self.input_tokens, self.output_tokens,
                         self.cache_write_tokens, self.cache_read_tokens)


def _count(value: object) -> bool:
    """A token count the API could have sent (a hostile or broken upstream must not make the gateway raise)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40


def _model(message: object) -> str:
    model = message.get("model") if isinstance(message, dict) else None
    return model[:200] if isinstance(model, str) else ""


def usage_of_message(body: bytes) -> Usage | None:
    """The usage of a whole (non-streaming) JSON message; None when the body is not one."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    return Usage(model=_model(message)).merged(message.get("usage"))


class StreamUsage:
    """Follows a Messages API event stream (SSE) fed in chunks cut anywhere: `feed` returns the usage so far when
    the chunk changed it (a message_start, a message_delta, or the message_stop that makes it `complete`).
    Holds at most one line of MAX_LINE_BYTES: a longer line is dropped whole, and only the usage events' data
    is parsed as JSON."""

    def __init__(self) -> None:
        self.usage: Usage | None = None  # None until message_start
        self.complete = False  # message_stop seen
        self._line = bytearray()
        self._dropping = False  # inside a line that grew past MAX_LINE_BYTES
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> Usage | None:
        before = (self.usage, self.complete)
        for line in self._lines(chunk):
            self._take(line)
        return self.usage if (self.usage, self.complete) != before and self.usage is not None else None

    def _lines(self, chunk: bytes) -> Iterator[bytes]:
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            piece = chunk[start:end]
            start = end + 1
            if self._dropping:
                self._dropping = False
            elif len(self._line) + len(piece) <= MAX_LINE_BYTES:
                self._line += piece
                yield bytes(self._line).removesuffix(b"\r")
            self._line.clear()
        rest = chunk[start:]
        if not self._dropping and len(self._line) + len(rest) > MAX_LINE_BYTES:
            self._line.clear()
            self._dropping = True
        elif not self._dropping:
            self._line += rest

    def _take(self, line: bytes) -> None:
        if not line:  # the end of an event
            if self._data and (not self._event or self._event in _USAGE_EVENTS):
                self._dispatch(b"\n".join(self._data))
            self._event, self._data = b"", []
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()
        elif line.startswith(b"data:") and sum(map(len, self._data)) + len(line) <= MAX_LINE_BYTES:
            self._data.append(line[5:].removeprefix(b" "))

    def _dispatch(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            self.usage = Usage(model=_model(message)).merged(message.get("usage"))
        elif kind == "message_delta" and self.usage is not None:
            self.usage = self.usage.merged(event.get("usage"))
        elif kind == "message_stop" and self.usage is not None:
            self.complete = True


# ---- budgets ----

@dataclass(frozen=True)
class Windows:
    """The budget periods `now` falls in (aware datetimes in the budgets' time zone)."""

    day_start: datetime
    next_day: datetime
    month_start: datetime
    next_month: datetime


def _reset_time(budgets: BudgetSettings) -> time:
    return time(*(int(part) for part in budgets.reset_at.split(":")))


def windows(now: datetime, budgets: BudgetSettings) -> Windows:
    """The day and the month `now` (aware) is in: a day starts at reset_at local time, a month on the 1st at
    reset_at. In a zone with daylight saving a day can be 23 or 25 hours: it goes from wall clock to wall clock."""
    zone, reset = ZoneInfo(budgets.timezone), _reset_time(budgets)
    local = now.astimezone(zone)

    def at(day: date) -> datetime:
        return datetime.combine(day, reset, tzinfo=zone)

    today = local.date() if local >= at(local.date()) else local.date() - timedelta(days=1)
    month = today.replace(day=1)  # the month of the budget's day: before reset_at on the 1st, still the last one
    return Windows(day_start=at(today), next_day=at(today + timedelta(days=1)), month_start=at(month),
                   next_month=at(_next_month(month)))


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)



@dataclass(frozen=True)
class Spent:
    """nano-USD spent in the current day and month, by the chat, by the user, by the whole instance."""

    chat_day: int = 0
    chat_month: int = 0
    user_day: int = 0
    user_month: int = 0
    instance_day: int = 0
    instance_month: int = 0


@dataclass(frozen=True)
class Refusal:
    """A budget that is spent: whose (`scope`: chat, user or instance), which period, and the text to show."""

    scope: str
    period: str  # day or month
    spent_nano: int
    limit: Decimal
    resets_at: datetime
    timezone: str

    @property
    def text(self) -> str:
        who = {"chat": "This chat has", "user": "You have", "instance": "This bot has"}[self.scope]
        whose = "your" if self.scope == "user" else "its"
        budget = "daily" if self.period == "day" else "monthly"
        when = self.resets_at.strftime("%Y-%m-%d %H:%M" + (":%S" if self.resets_at.second else ""))
        return (f"{who} spent {usd(self.spent_nano)} of {whose} {budget} budget of {usd(nano(self.limit))}; "
                f"it resets at {when} {self.timezone}.")


def verdict(budgets: BudgetSettings, spent: Spent, periods: Windows) -> Refusal | None:
    """The budget that forbids another request, or None. A budget is spent when the spending reaches it (a cap of
    0 allows nothing). Months first: a spent month is what the user must wait for, whatever the day says."""
    for period, resets_at in (("month", periods.next_month), ("day", periods.next_day)):
        for scope in _SCOPES:
            limit = _limit(budgets, scope, period)
            used = getattr(spent, f"{scope}_{period}")
            if limit is not None and used >= nano(limit):
                return Refusal(scope, period, used, limit, resets_at, budgets.timezone)
    return None


def _limit(budgets: BudgetSettings, scope: str, period: str) -> Decimal | None:
    prefix = "instance" if scope == "instance" else f"per_{scope}"
    return getattr(budgets, f"{prefix}_{'daily' if period == 'day' else 'monthly'}_usd")


# What sums spending: (since, until, chat_id, user_id) → nano-USD, where None means any (Store.spent).
Total = Callable[..., int]


def measure(budgets: BudgetSettings, periods: Windows, chat_id: str, user_id: str, total: Total) -> Spent:
    """The spending the budgets need, summed by `total` only for the caps that are set (each sum is a query).
    A request that no user's message is running for (user_id "") is not held to a user's budget."""
    sums: dict[str, int] = {}
    for scope in _SCOPES:
        for period, start in (("day", periods.day_start), ("month", periods.month_start)):
            if _limit(budgets, scope, period) is None or (scope == "user" and not user_id):
                continue
            who: dict[str, Any] = {"chat": {"chat_id": chat_id}, "user": {"user_id": user_id}, "instance": {}}[scope]
            sums[f"{scope}_{period}"] = total(start.timestamp(), **who)
    return Spent(**sums)


def check(budgets: BudgetSettings, now: datetime, chat_id: str, user_id: str, total: Total) -> Refusal | None:
    """Whether the budgets allow the chat (and the user, when one is known) another request at `now`."""
    periods = windows(now, budgets)
    return verdict(budgets, measure(budgets, periods, chat_id, user_id, total), periods)
