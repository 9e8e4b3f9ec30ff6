"""Spending as the chat sees it: the check before a turn, /cost, the answer's footer and its priced cost. Sums come
from the store's usage records (written and priced by the gateway), the rules from `spending` (pure), which the
gateway also applies to every model request of a running turn.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from orchestrator import spending
from orchestrator.config import Settings
from orchestrator.store import Store


def refusal(settings: Settings, store: Store, chat_id: str, user_id: str) -> spending.Refusal | None:
    """Why no turn may start now for this chat and user (a budget is spent), or None."""
    return spending.check(settings.budgets, datetime.now(UTC), chat_id, user_id, store.spent)


def cost_report(settings: Settings, store: Store, chat_id: str, user_id: str) -> str:
    """/cost: today's and this month's spending of the chat and of the one asking, with their budgets."""
    budgets = settings.budgets
    periods = spending.windows(datetime.now(UTC), budgets)
    day, month = periods.day_start.timestamp(), periods.month_start.timestamp()
    chat = (store.spent(day, chat_id=chat_id), store.spent(month, chat_id=chat_id))
    user = (store.spent(day, user_id=user_id), store.spent(month, user_id=user_id))
    return "\n".join([
        f"This chat: {spending.usd(chat[0])} today{_of(budgets.per_chat_daily_usd)}, {spending.usd(chat[1])} this "
        f"month{_of(budgets.per_chat_monthly_usd)}",
        f"You: {spending.usd(user[0])} today{_of(budgets.per_user_daily_usd)}, {spending.usd(user[1])} this "
        f"month{_of(budgets.per_user_monthly_usd)}",
        f"A new day starts at {spending.when(periods.next_day)} {budgets.timezone}.",
    ])


def footer(settings: Settings, store: Store, message_id: str, chat_id: str) -> str:
    """The answer's last line: what its turn cost and what the chat spent today."""
    return (f"Cost: {spending.usd(store.turn_spent(message_id))} this answer, "
            f"{spending.usd(_spent_today(settings, store, chat_id))} today in this chat"
            f"{_of(settings.budgets.per_chat_daily_usd)}")


def spent_by_chat(settings: Settings, store: Store) -> dict[str, dict[str, float]]:
    """USD by chat id, for the current day and month."""
    periods = spending.windows(datetime.now(UTC), settings.budgets)
    return {period: {chat_id: nano / spending.NANO_PER_USD for chat_id, nano in store.spent_by_chat(start).items()}
            for period, start in (("day", periods.day_start.timestamp()), ("month", periods.month_start.timestamp()))}


def spent_today_usd(settings: Settings, store: Store, chat_id: str) -> float:
    return _spent_today(settings, store, chat_id) / spending.NANO_PER_USD


def turn_cost_usd(store: Store, message_id: str) -> float:
    return store.turn_spent(message_id) / spending.NANO_PER_USD


def _spent_today(settings: Settings, store: Store, chat_id: str) -> int:
    periods = spending.windows(datetime.now(UTC), settings.budgets)
    return store.spent(periods.day_start.timestamp(), chat_id=chat_id)


def _of(cap: Decimal | None) -> str:
    return "" if cap is None else f" of a budget of {spending.usd(spending.nano(cap))}"
