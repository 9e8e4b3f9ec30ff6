"""Prices, usage read from the Messages API's responses, budget periods and verdicts (orchestrator.spending: pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from orchestrator.config import DEFAULT_PRICES, BudgetSettings, Price
from orchestrator.spending import (
    IMAGE_TOKENS,
    MAX_LINE_BYTES,
    WEB_SEARCH_NANO,
    Refusal,
    Spent,
    StreamUsage,
    Usage,
    Windows,
    check,
    cost_nano,
    measure,
    nano,
    price_for,
    read_request,
    usage_of_message,
    usd,
    verdict,
    windows,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


def price(*values: str) -> Price:
    return Price(*map(Decimal, values))


# ---- prices ----

@pytest.mark.parametrize(("model", "key"), [
    ("claude-opus-4-5-20251101", "claude-opus-4-5"),  # the longer of two matching keys
    ("claude-opus-4-1-20250805", "claude-opus-4"),
    ("claude-sonnet-4-5", "claude-sonnet-4"),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
    ("gpt-5", "default"),
    ("", "default"),
])
def test_a_model_is_priced_by_the_longest_key_it_starts_with(model: str, key: str) -> None:
    assert price_for(DEFAULT_PRICES, model) is DEFAULT_PRICES[key]


def test_cost_is_exact_in_nano_usd_and_rounded_half_up() -> None:
    sonnet = price("3", "15", "3.75", "0.30")
    # 1000 in at $3/M = $0.003; 2000 out at $15/M = $0.03; 4000 written at $3.75/M = $0.015; 10000 read = $0.003
    assert cost_nano(sonnet, 1000, 2000, 4000, 10000) == 51_000_000
    assert cost_nano(sonnet, 1, 0, 0, 0) == 3000
    assert cost_nano(price("0.0005", "0", "0", "0"), 1, 0, 0, 0) == 1  # half a nano-USD: half up
    assert cost_nano(price("0.0004", "0", "0", "0"), 1, 0, 0, 0) == 0
    assert cost_nano(sonnet, 0, 0, 0, 0) == 0


@pytest.mark.parametrize(("nano_usd", "text"), [
    (0, "$0.00"),
    (100_000, "$0.0001"),
    (150_000, "$0.0002"),  # half up
    (4_999_999, "$0.0050"),  # under half a cent: to a hundredth of a cent
    (5_000_000, "$0.01"),  # half a cent: to the cent, half up
    (12_345_000, "$0.01"),
    (999_950_000, "$1.00"),
    (5_015_000_000, "$5.02"),
    (1234_567_000_000, "$1234.57"),
])
def test_dollars_for_people(nano_usd: int, text: str) -> None:
    assert usd(nano_usd) == text


def test_a_cap_in_nano_usd() -> None:
    assert nano(Decimal("5")) == 5 * 10**9
    assert nano(Decimal("0.03")) == 30_000_000


# ---- usage ----

def test_usage_of_a_whole_message() -> None:
    body = json.dumps({"type": "message", "model": "claude-sonnet-4-5", "usage": {
        "input_tokens": 12, "output_tokens": 34, "cache_creation_input_tokens": 56, "cache_read_input_tokens": 78}})
    assert usage_of_message(body.encode()) == Usage("claude-sonnet-4-5", 12, 34, 56, 78)
    assert usage_of_message(b'{"input_tokens": 10}') is None  # count_tokens' answer: nothing to bill
    assert usage_of_message(b"not json") is None
    assert usage_of_message(b"[" * 100_000) is None  # too deep for the parser: not a message
    nulls = json.dumps({"type": "message", "usage": {"input_tokens": 5, "cache_read_input_tokens": None,
                                                     "output_tokens": "7", "cache_creation_input_tokens": -1}})
    assert usage_of_message(nulls.encode()) == Usage("", 5, 0, 0, 0)  # what is not a count is left at 0


def sse(*events: dict) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


START = {"type": "message_start", "message": {"model": "claude-opus-4-5", "usage": {
    "input_tokens": 100, "output_tokens": 1, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30}}}
DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
END = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}}
STOP = {"type": "message_stop"}
STREAM = sse(START, DELTA, DELTA, END, STOP)
FINAL = Usage("claude-opus-4-5", 100, 42, 20, 30)


def test_a_stream_fed_whole() -> None:
    stream = StreamUsage()
    assert stream.feed(STREAM) == FINAL
    assert stream.complete


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_a_stream_cut_anywhere_gives_each_update_as_it_comes(size: int) -> None:
    stream, updates = StreamUsage(), []
    for at in range(0, len(STREAM), size):
        update = stream.feed(STREAM[at:at + size])
        if update is not None:
            updates.append((update, stream.complete))
    expected = [(Usage("claude-opus-4-5", 100, 1, 20, 30), False), (FINAL, False), (FINAL, True)]
    # Each change as the chunk that made it arrives (a chunk holding message_delta and message_stop gives one).
    assert updates[0] == expected[0] and updates[-1] == expected[-1] and set(updates) <= set(expected)
    assert len(updates) == 3 or size >= 64


def test_a_stream_with_crlf_and_without_event_lines() -> None:
    body = b"".join(f"data: {json.dumps(e)}\r\n\r\n".encode() for e in (START, DELTA, END, STOP))
    stream = StreamUsage()
    assert stream.feed(body) == FINAL and stream.complete


def test_a_delta_that_gives_every_count_replaces_the_starts() -> None:
    full = {"type": "message_delta", "usage": {"input_tokens": 7, "output_tokens": 9, "cache_creation_input_tokens": 0,
                                               "cache_read_input_tokens": 3}}
    stream = StreamUsage()
    assert stream.feed(sse(START, full)) == Usage("claude-opus-4-5", 7, 9, 0, 3)
    assert not stream.complete


def test_nothing_counts_before_message_start_and_other_events_change_nothing() -> None:
    stream = StreamUsage()
    assert stream.feed(sse(END, STOP)) is None
    assert stream.feed(b"event: ping\ndata: {\"type\": \"ping\"}\n\n") is None
    assert stream.feed(sse(START)) is not None
    assert stream.feed(sse(DELTA, DELTA)) is None
    assert stream.feed(b"event: message_delta\ndata: {broken\n\n") is None
    assert stream.feed(b"event: message_delta\ndata: [1, 2]\n\n") is None


def test_a_line_over_the_cap_is_dropped_without_growing_and_the_stream_goes_on() -> None:
    stream = StreamUsage()
    stream.feed(sse(START))
    huge = b"event: message_delta\ndata: " + b"x" * (MAX_LINE_BYTES + 10)
    for at in range(0, len(huge), 100_000):
        stream.feed(huge[at:at + 100_000])
        assert len(stream._line) <= MAX_LINE_BYTES
    assert stream.feed(b"\n\n" + sse(END, STOP)) == FINAL and stream.complete
    # A long line that ends inside one chunk is dropped too.
    stream = StreamUsage()
    assert stream.feed(b"data: " + b"y" * (MAX_LINE_BYTES + 1) + b"\n\n" + sse(START)) is not None


def test_one_hour_cache_writes_and_web_searches_are_priced() -> None:
    delta = {"type": "message_delta", "usage": {
        "input_tokens": 100, "output_tokens": 42, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
        "server_tool_use": {"web_search_requests": 3}}}
    stream = StreamUsage()
    usage = stream.feed(sse(START, delta))
    assert usage == Usage("claude-opus-4-5", 100, 42, 1000, 0, cache_write_1h_tokens=600, web_searches=3)
    assert usage.counts() == {"input_tokens": 100, "output_tokens": 42, "cache_write_tokens": 1000,
                              "cache_read_tokens": 0}  # the store's columns
    prices = {"default": price("2", "10", "2.5", "0.2")}
    # 100 in at $2/M, 42 out at $10/M, 400 written for 5 minutes at $2.50/M, 600 for an hour at twice $2/M:
    # 200 + 420 + 1000 + 2400 micro-USD; and 3 searches at $10 per 1000
    assert WEB_SEARCH_NANO == 10_000_000
    assert usage.cost(prices) == 4_020_000 + 3 * WEB_SEARCH_NANO
    odd = Usage(cache_write_tokens=10, cache_write_1h_tokens=50)  # more 1-hour writes than writes: no negative count
    assert odd.cost(prices) == cost_nano(prices["default"], 0, 0, 0, 0, 10) == 40_000


TEXT = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "é" * 300}}  # 600 bytes
TOOL = {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "x" * 90}}
THINKING = {"type": "content_block_delta", "index": 2, "delta": {"type": "thinking_delta", "thinking": "y" * 30}}


def test_a_stream_that_does_not_finish_counts_what_was_streamed() -> None:
    reserved = Usage("claude-opus-4-5", 5000, 8000)
    stream = StreamUsage()
    assert stream.cut(reserved, 8000) == Usage("claude-opus-4-5", 5000, 0)  # nothing came: the estimated input
    stream.feed(sse(START))
    assert stream.so_far(8000) == Usage("claude-opus-4-5", 100, 8000, 20, 30)  # the reservation's output
    assert stream.cut(reserved, 8000) == Usage("claude-opus-4-5", 100, 1, 20, 30)  # message_start's one token
    assert stream.feed(sse(TEXT, TOOL, THINKING)) is None  # not a change of usage: nothing to store
    assert stream.streamed_bytes == 720
    assert stream.cut(reserved, 8000) == Usage("claude-opus-4-5", 100, 240, 20, 30)  # a token for 3 bytes
    assert stream.cut(reserved, 200).output_tokens == 200  # never past max_tokens
    stream.feed(sse(END))
    assert stream.so_far(8000) == stream.cut(reserved, 8000) == FINAL  # message_delta's count is the answer's


def test_a_request_body_gives_its_model_max_tokens_and_an_input_estimate() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 300_000}}
    body = json.dumps({
        "model": "claude-opus-4-5", "max_tokens": 32000, "stream": True, "system": "s" * 3000,
        "tools": [{"name": "Bash", "input_schema": {}}, {"type": "web_search_20250305", "name": "web_search"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, image]},
                     {"role": "user", "content": [{"type": "tool_result", "content": [image]}]}]}).encode()
    request = read_request(body)
    assert (request.model, request.max_tokens, request.stream) == ("claude-opus-4-5", 32000, True)
    assert request.tool_types == ("web_search_20250305",)
    assert request.fields == {"model", "max_tokens", "stream", "system", "tools", "messages"}
    # the images by their pixels, the rest of the body a token for 3 bytes
    assert request.input_tokens == (len(body) - 600_000) // 3 + 2 * IMAGE_TOKENS
    assert request.reservation() == Usage("claude-opus-4-5", request.input_tokens, 32000)
    plain = read_request(bytearray(b'{"max_tokens": 5, "model": 7, "tools": "x"}'))
    assert (plain.model, plain.stream, plain.tool_types, plain.input_tokens) == ("", False, (), 14)


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"model": "m"}', "the request must give max_tokens, a whole number from 1 to 16777216"),
    (b'{"max_tokens": 0}', "must give max_tokens"),
    (b'{"max_tokens": 1.5}', "must give max_tokens"),
    (b'{"max_tokens": true}', "must give max_tokens"),
    (b'{"max_tokens": 16777217}', "must give max_tokens"),
    (b'[{"max_tokens": 1}]', "the request body is not a JSON object"),
    (b"\xff\xfe", "the request body is not JSON"),
    (b'{"max_tokens": 1', "the request body is not JSON"),
    (b"[" * 100_000, "the request body is nested too deeply"),
    (b'{"max_tokens": 1, "max_tokens": 9000}', "the request body repeats a key in an object"),
    (b'{"max_tokens": 1, "tools": [{"type": "a", "type": "web_fetch_20250910"}]}', "repeats a key"),
])
def test_a_body_that_cannot_be_priced_says_why(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        read_request(body)


# ---- periods ----

def budgets(**fields: object) -> BudgetSettings:
    return BudgetSettings(**fields)  # type: ignore[arg-type]


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_a_utc_day_and_month_from_midnight() -> None:
    assert windows(utc(2026, 12, 4, 15, 30), budgets()) == Windows(
        utc(2026, 12, 4), utc(2026, 12, 5), utc(2026, 12, 1), utc(2027, 1, 1))  # the end of a year
    assert windows(utc(2026, 12, 4), budgets()).day_start == utc(2026, 12, 4)  # a day starts at its reset
    assert windows(utc(2026, 12, 3, 23, 59, 59), budgets()).next_day == utc(2026, 12, 4)


def test_a_day_that_resets_at_a_time_with_seconds() -> None:
    settings = budgets(reset_at="06:30:15")
    before = windows(utc(2026, 3, 1, 6, 30, 14), settings)  # just before the 1st's reset: still February
    assert before == Windows(utc(2026, 2, 28, 6, 30, 15), utc(2026, 3, 1, 6, 30, 15), utc(2026, 2, 1, 6, 30, 15),
                             utc(2026, 3, 1, 6, 30, 15))
    after = windows(utc(2026, 3, 1, 6, 30, 15), settings)
    assert after.day_start == after.month_start == utc(2026, 3, 1, 6, 30, 15)
    assert after.next_month == utc(2026, 4, 1, 6, 30, 15)


def test_a_new_year_before_the_reset_is_still_the_old_month() -> None:
    periods = windows(utc(2027, 1, 1, 3), budgets(reset_at="04:00"))
    assert periods.month_start == utc(2026, 12, 1, 4) and periods.next_month == utc(2027, 1, 1, 4)
    assert periods.day_start == utc(2026, 12, 31, 4)


def test_shanghai_days_start_at_local_midnight() -> None:
    settings = budgets(timezone="Asia/Shanghai")
    # 2026-12-31 16:00 UTC is 2027-01-01 00:00 in Shanghai (UTC+8): a new day, month and year there.
    periods = windows(utc(2026, 12, 31, 16), settings)
    assert periods.day_start == datetime(2027, 1, 1, tzinfo=SHANGHAI) == utc(2026, 12, 31, 16)
    assert periods.month_start == periods.day_start and periods.next_month == datetime(2027, 2, 1, tzinfo=SHANGHAI)
    earlier = windows(utc(2026, 12, 31, 15, 59, 59), settings)
    assert earlier.day_start == datetime(2026, 12, 31, tzinfo=SHANGHAI)
    assert earlier.next_month == utc(2026, 12, 31, 16)


def test_a_day_with_a_clock_change_runs_from_wall_clock_to_wall_clock() -> None:
    periods = windows(utc(2026, 3, 8, 12), budgets(timezone="America/New_York"))  # spring forward that night
    assert periods.next_day.timestamp() - periods.day_start.timestamp() == timedelta(hours=23).total_seconds()


# ---- verdicts ----

NOON = utc(2026, 12, 4, 12)
PERIODS = windows(NOON, budgets())


def test_nothing_is_refused_without_caps_or_under_them() -> None:
    assert verdict(budgets(), Spent(chat_day=10**15), PERIODS) is None
    assert verdict(budgets(per_chat_daily_usd=Decimal(5)), Spent(chat_day=4_999_999_999), PERIODS) is None


def test_a_chats_daily_budget_is_spent_when_it_is_reached() -> None:
    refusal = verdict(budgets(per_chat_daily_usd=Decimal(5)), Spent(chat_day=5_015_000_000), PERIODS)
    assert refusal == Refusal("chat", "day", 5_015_000_000, Decimal(5), utc(2026, 12, 5), "UTC")
    assert refusal.text == ("This chat has spent $5.02 of its daily budget of $5.00; "
                            "it resets at 2026-12-05 00:00 UTC.")
    assert verdict(budgets(per_chat_daily_usd=Decimal(5)), Spent(chat_day=5 * 10**9), PERIODS) is not None
    assert verdict(budgets(per_chat_daily_usd=Decimal(0)), Spent(), PERIODS) is not None  # 0 allows nothing


def test_the_user_and_the_instance_are_named_and_a_month_comes_first() -> None:
    user = verdict(budgets(per_user_daily_usd=Decimal("0.5")), Spent(user_day=600_000_000), PERIODS)
    assert user is not None and user.text == ("You have spent $0.60 of your daily budget of $0.50; "
                                              "it resets at 2026-12-05 00:00 UTC.")
    both = budgets(instance_daily_usd=Decimal(1), instance_monthly_usd=Decimal(20))
    refusal = verdict(both, Spent(instance_day=2 * 10**9, instance_month=20 * 10**9), PERIODS)
    assert refusal is not None and refusal.text == ("This bot has spent $20.00 of its monthly budget of $20.00; "
                                                    "it resets at 2027-01-01 00:00 UTC.")


def test_a_reset_with_seconds_in_another_zone_is_shown_in_it() -> None:
    settings = budgets(per_chat_daily_usd=Decimal(1), timezone="Asia/Shanghai", reset_at="08:00:30")
    refusal = verdict(settings, Spent(chat_day=10**9), windows(NOON, settings))
    assert refusal is not None and refusal.text.endswith("it resets at 2026-12-05 08:00:30 Asia/Shanghai.")


def test_only_the_set_caps_are_summed_and_a_request_without_a_user_has_no_user_budget() -> None:
    calls = []

    def total(since: float, **who: str) -> int:
        calls.append((since, who))
        return 7

    settings = budgets(per_chat_daily_usd=Decimal(1), per_user_monthly_usd=Decimal(1), instance_monthly_usd=Decimal(1))
    assert measure(settings, PERIODS, "oc_a", "ou_1", total) == Spent(chat_day=7, user_month=7, instance_month=7)
    assert calls == [(PERIODS.day_start.timestamp(), {"chat_id": "oc_a"}),
                     (PERIODS.month_start.timestamp(), {"user_id": "ou_1"}),
                     (PERIODS.month_start.timestamp(), {})]
    calls.clear()
    assert measure(settings, PERIODS, "oc_a", "", total) == Spent(chat_day=7, instance_month=7)
    assert measure(budgets(), PERIODS, "oc_a", "ou_1", total) == Spent() and len(calls) == 2


def test_check_puts_it_together() -> None:
    settings = budgets(per_chat_daily_usd=Decimal("0.03"))
    spent = {"oc_a": 40_000_000, "oc_b": 20_000_000}
    assert check(settings, NOON, "oc_b", "", lambda since, chat_id=None, user_id=None: spent[chat_id]) is None
    refusal = check(settings, NOON, "oc_a", "", lambda since, chat_id=None, user_id=None: spent[chat_id])
    assert refusal is not None and refusal.scope == "chat" and refusal.spent_nano == 40_000_000
