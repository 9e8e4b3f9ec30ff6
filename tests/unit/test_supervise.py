"""The supervision helper: loops that survive their errors, log each distinct one once, and back off."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from loguru import logger

from orchestrator import supervise
from orchestrator.supervise import Liveness, Streak, repeat, retry


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), format="{message}")
    yield lines
    logger.remove(sink)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff delays asked for; the sleeps themselves only yield, so the tests take no time."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(supervise.asyncio, "sleep", sleep)
    return delays


def test_each_distinct_error_is_logged_once_then_counted_and_the_recovery_logged(logged: list[str]) -> None:
    streak = Streak("outbox")
    for _ in range(5):
        streak.failed(OSError("database is locked"))
    streak.failed(ValueError("disk full"))
    streak.failed(ValueError("disk full"))
    assert logged == [
        "outbox failed: OSError: database is locked; trying again with backoff (logged again only if it changes)",
        "outbox: the previous error happened 5 times in a row",
        "outbox failed: ValueError: disk full; trying again with backoff (logged again only if it changes)",
    ]
    streak.ok()
    assert logged[-1].startswith("outbox recovered after 7 failure(s) in ")
    streak.ok()
    assert len(logged) == 4  # nothing to say while it works


def test_backoff_doubles_up_to_30_seconds_and_starts_over_after_a_success() -> None:
    streak = Streak("housekeeping.prune")
    assert [streak.failed(RuntimeError("x")) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    streak.ok()
    assert streak.failed(RuntimeError("x")) == 1


def test_the_problem_says_since_when_how_often_and_what(logged: list[str]) -> None:
    liveness = Liveness()
    streak = liveness.streak("outbox")
    assert liveness.checks() == {"outbox": None}
    streak.failed(OSError("database is locked"))
    streak.failed(OSError("database is locked"))
    problem = liveness.checks()["outbox"]
    assert problem is not None and problem.startswith("failing since 20")
    assert problem.endswith("(2 failures): OSError: database is locked")
    streak.ok()
    assert liveness.checks() == {"outbox": None}
    assert liveness.streak("outbox") is streak
    streak.died("RuntimeError: gone")
    assert liveness.checks() == {"outbox": "died: RuntimeError: gone"}


def test_retry_tries_again_with_backoff_until_the_attempt_succeeds(slept: list[float], logged: list[str]) -> None:
    outcomes: list[Exception | str] = [OSError("locked"), OSError("locked"), OSError("locked"), "done"]

    async def attempt() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert asyncio.run(retry(Streak("handling the message"), attempt)) == "done"
    assert slept == [1, 2, 4]
    assert sum("failed: OSError: locked" in line for line in logged) == 1
    assert logged[-1].startswith("handling the message recovered after 3 failure(s)")


def test_a_repeated_step_survives_any_exception_and_keeps_going(slept: list[float], logged: list[str]) -> None:
    liveness = Liveness()
    streak = liveness.streak("housekeeping.prune")
    seen: list[str | None] = []
    errors = iter([FileNotFoundError("turns/7"), PermissionError("turns"), KeyError("x"), None, None])

    async def step() -> None:
        error = next(errors)
        if error is not None:
            raise error

    async def pause() -> None:
        seen.append(liveness.checks()["housekeeping.prune"])
        if len(seen) == 3:
            raise asyncio.CancelledError  # how the service ends the loop

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(repeat(streak, step, pause))
    assert seen[0] is None and seen[1] is None and seen[2] is None  # the pause comes after a success
    assert slept == [1, 2, 4]
    assert [line.split(":")[1].strip() for line in logged if " failed: " in line] == \
        ["FileNotFoundError", "PermissionError", "KeyError"]


def test_a_base_exception_ends_the_loop_for_the_caller_to_report(slept: list[float]) -> None:
    async def step() -> None:
        raise SystemExit(3)

    async def pause() -> None:
        pass

    with pytest.raises(SystemExit):
        asyncio.run(repeat(Streak("outbox"), step, pause))
    assert slept == []
