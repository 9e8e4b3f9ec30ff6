"""What model requests cost and whether a budget allows another one. Pure: no I/O, no clock.

Before a request goes upstream, its body (`read_request`) says the most it may cost: its model, an estimate of its
input and its `max_tokens`; the gateway reserves that much. Usage then comes from the Messages API's own responses
(`message_start` and `message_delta` of a stream, or a whole JSON message), read by the gateway as it passes them
through; a stream that does not finish counts what was streamed (`StreamUsage.cut`). It is priced with the
config's table in integer nano-USD (1e-9 USD: one token at $0.08 per million is 80 nano-USD, so sums are exact):
1-hour cache writes at twice the input price, server-side web searches per search. A budget's day starts at
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
# Anthropic's price of a server-side web search: $10 per 1,000 searches, on top of the tokens (2025).
WEB_SEARCH_NANO = 10 * NANO_PER_USD // 1000
MAX_TOKENS = 2**24  # a max_tokens past any model's (128k today) is refused, not reserved: sums stay in SQLite's range
IMAGE_TOKENS = 1600  # an image's input tokens at most (the API scales a larger one down to about 1.15 megapixels)
BYTES_PER_TOKEN = 3  # an estimate on the high side: English takes about 4 bytes a token, Chinese 3
STORED_COUNTS = ("input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens")  # the store's columns
_EVENTS = (b"message_start", b"message_delta", b"message_stop", b"content_block_delta")  # those parsed
_DELTA_TEXT = ("text", "partial_json", "thinking")  # what a content_block_delta streams, billed as output
_SCOPES = ("chat", "user", "instance")


# ---- prices ----

def price_for(prices: Mapping[str, Price], model: str) -> Price:
    """The price of the longest key `model` starts with; `default` when none does."""
    keys = [key for key in prices if key != "default" and model.startswith(key)]
    return prices[max(keys, key=len)] if keys else prices["default"]


def cost_nano(price: Price, input: int, output: int, cache_write: int, cache_read: int, cache_write_1h: int = 0) -> int:
    """nano-USD for these token counts: tokens × USD per million × 1000, exact, rounded half up. `cache_write` is
    5-minute cache writes; `cache_write_1h` are 1-hour ones, at twice the input price (Anthropic's pricing)."""
    total = (input * price.input + output * price.output + cache_write * price.cache_write
             + cache_read * price.cache_read + cache_write_1h * 2 * price.input) * 1000
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

_FIELDS = {"input_tokens": "input_tokens", "output_tokens": "output_tokens",
           "cache_creation_input_tokens": "cache_write_tokens", "cache_read_input_tokens": "cache_read_tokens"}
_NESTED_FIELDS = {("cache_creation", "ephemeral_1h_input_tokens"): "cache_write_1h_tokens",
                  ("server_tool_use", "web_search_requests"): "web_searches"}


@dataclass(frozen=True)
class Usage:
    """A response's token counts. The names of STORED_COUNTS are the store's columns; the others are priced only."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0  # all cache writes, 5-minute and 1-hour
    cache_read_tokens: int = 0
    cache_write_1h_tokens: int = 0  # of the cache writes, the 1-hour ones
    web_searches: int = 0  # server-side web searches

    def merged(self, usage: object) -> Usage:
        """These counts with those an API `usage` object gives (a message_delta's are cumulative: they replace)."""
        if not isinstance(usage, dict):
            return self
        given = {ours: usage[theirs] for theirs, ours in _FIELDS.items() if _count(usage.get(theirs))}
        for (outer, inner), ours in _NESTED_FIELDS.items():
            part = usage.get(outer)
            if isinstance(part, dict) and _count(part.get(inner)):
                given[ours] = part[inner]
        return dataclasses.replace(self, **given)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in STORED_COUNTS}

    def cost(self, prices: Mapping[str, Price]) -> int:
        hour = min(self.cache_write_1h_tokens, self.cache_write_tokens)
        return (cost_nano(price_for(prices, self.model), self.input_tokens, self.output_tokens,
                          self.cache_write_tokens - hour, self.cache_read_tokens, hour)
                + self.web_searches * WEB_SEARCH_NANO)


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
    the chunk changed it (a message_start, a message_delta, or the message_stop that makes it `complete`), and
    counts the bytes of the text and JSON that content_block_delta events stream (`cut` bills them if the stream
    does not finish). Holds at most one line of MAX_LINE_BYTES: a longer line is dropped whole, and only the data
    of those events is parsed as JSON."""

    def __init__(self) -> None:
        self.usage: Usage | None = None  # None until message_start
        self.final = False  # message_delta seen: its output count is the answer's
        self.complete = False  # message_stop seen
        self.streamed_bytes = 0  # of text, tool input JSON and thinking
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
            if self._data and (not self._event or self._event in _EVENTS):
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
            self.final = True
        elif kind == "message_stop" and self.usage is not None:
            self.complete = True
        elif kind == "content_block_delta" and isinstance(delta := event.get("delta"), dict):
            self.streamed_bytes += sum(len(text.encode(errors="replace")) for name in _DELTA_TEXT
                                       if isinstance(text := delta.get(name), str))

    def so_far(self, max_tokens: int) -> Usage:
        """What the stream is billed while it goes on: message_start's input, and until message_delta gives the
        output's count, max_tokens of it (the reservation: a gateway killed mid-stream leaves that counted)."""
        assert self.usage is not None
        if self.final:
            return self.usage
        return dataclasses.replace(self.usage, output_tokens=max(self.usage.output_tokens, max_tokens))

    def cut(self, reserved: Usage, max_tokens: int) -> Usage:
        """What a stream that did not finish is billed: message_start's input (the reservation's estimate before
        it), and the output streamed, a token per BYTES_PER_TOKEN bytes of it, at least what message_start
        said and at most max_tokens (message_delta's count once it came)."""
        usage = self.usage or dataclasses.replace(reserved, output_tokens=0)
        if self.final:
            return usage
        streamed = min(self.streamed_bytes // BYTES_PER_TOKEN, max_tokens)
        return dataclasses.replace(usage, output_tokens=max(usage.output_tokens, streamed))


# ---- what a request may cost ----

@dataclass(frozen=True)
class Request:
    """A Messages request, as its body gives it: the most it may cost, and what it asks the API's servers to do."""

    model: str
    max_tokens: int
    input_tokens: int  # an estimate: a token per BYTES_PER_TOKEN bytes of the body, IMAGE_TOKENS an image
    stream: bool
    fields: frozenset[str]  # the body's top-level fields
    tool_types: tuple[str, ...]  # the `type` of each of its tools that has one (client tools need none)

    def reservation(self) -> Usage:
        return Usage(self.model, self.input_tokens, self.max_tokens)


def read_request(body: bytes | bytearray) -> Request:
    """The request a Messages API body makes. ValueError, saying why, for a body that is not a JSON object with
    a whole max_tokens from 1 to MAX_TOKENS, or that repeats a key in an object (the API might read the other
    of the two)."""
    try:
        message = json.loads(body, object_pairs_hook=_unique)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request body is not JSON") from None
    except RecursionError:
        raise ValueError("the request body is nested too deeply") from None
    if not isinstance(message, dict):
        raise ValueError("the request body is not a JSON object")
    max_tokens = message.get("max_tokens")
    if not _count(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"the request must give max_tokens, a whole number from 1 to {MAX_TOKENS}")
    tools = message.get("tools")
    images, image_bytes = _images(message.get("messages"))
    return Request(model=_model(message), max_tokens=max_tokens,
                   input_tokens=(len(body) - image_bytes) // BYTES_PER_TOKEN + images * IMAGE_TOKENS,
                   stream=message.get("stream") is True, fields=frozenset(message),
                   tool_types=tuple(tool["type"] for tool in tools if isinstance(tool, dict)
                                    and isinstance(tool.get("type"), str)) if isinstance(tools, list) else ())


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("the request body repeats a key in an object")
    return value


def _images(messages: object) -> tuple[int, int]:
    """How many base64 images the messages hold (in their content, and in their tool results'), and the bytes
    of their data: an image is billed by its pixels, not by its size."""
    blocks = [block for message in (messages if isinstance(messages, list) else ()) if isinstance(message, dict)
              for block in _blocks(message)]
    blocks += [inner for block in blocks if block.get("type") == "tool_result" for inner in _blocks(block)]
    data = [block["source"]["data"] for block in blocks if block.get("type") == "image"
            and isinstance(block.get("source"), dict) and isinstance(block["source"].get("data"), str)]
    return len(data), sum(map(len, data))


def _blocks(holder: dict[str, Any]) -> list[dict[str, Any]]:
    content = holder.get("content")
    return [block for block in content if isinstance(block, dict)] if isinstance(content, list) else []


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
        return (f"{who} spent {usd(self.spent_nano)} of {whose} {budget} budget of {usd(nano(self.limit))}; "
                f"it resets at {when(self.resets_at)} {self.timezone}.")


def when(moment: datetime) -> str:
    """A budget period's start for people: to the minute, or to the second when reset_at has seconds."""
    return moment.strftime("%Y-%m-%d %H:%M" + (":%S" if moment.second else ""))


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
