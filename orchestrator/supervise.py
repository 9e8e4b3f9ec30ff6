"""Forever-loops that survive their errors, and what /healthz says about each of them.

A step of a loop may fail on anything: a store another process holds locked, a full disk, a folder an agent
deleted meanwhile, a bug. The loop then logs the first of each distinct error (with its traceback), only
counts the repeats, backs off (1 s doubling to 30 s), tries again, and logs when it recovers. `LIVENESS`
holds each loop's state for /healthz; a loop that ends anyway is reported there as dead, and the service
stops with a non-zero exit code so that its supervisor starts it again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger

FIRST_DELAY = 1.0
MAX_DELAY = 30.0

T = TypeVar("T")


def describe(error: BaseException) -> str:
    """`Type: message`, as operators see it in logs and /healthz (never sent to a chat)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Streak:
    """One loop's run of failures. Thread-safe: /healthz reads it from the metrics server's thread."""

    def __init__(self, name: str, log: Logger | None = None) -> None:
        self.name = name
        self._log = log or logger
        self._lock = threading.Lock()
        self._error: str | None = None  # the latest distinct error
        self._repeats = 0  # how often it happened in a row
        self._failures = 0  # failures since the last success
        self._since: float | None = None  # wall time of the first of them
        self._delay = FIRST_DELAY
        self._death: str | None = None

    def failed(self, error: BaseException) -> float:
        """Count a failure, logging it if it differs from the one before; how long to wait before trying again."""
        text = describe(error)
        with self._lock:
            if text != self._error:
                if self._repeats > 1:
                    self._log.warning(f"{self.name}: the previous error happened {self._repeats} times in a row")
                self._log.opt(exception=error).error(
                    f"{self.name} failed: {text}; trying again with backoff (logged again only if it changes)")
                self._error, self._repeats = text, 0
            self._repeats += 1
            self._failures += 1
            self._since = self._since or time.time()
            delay, self._delay = self._delay, min(MAX_DELAY, self._delay * 2)
            return delay

    def ok(self) -> None:
        """A success: log the recovery if there were failures, and start the backoff over."""
        with self._lock:
            if self._since is not None:
                self._log.info(f"{self.name} recovered after {self._failures} failure(s) in "
                               f"{time.time() - self._since:.1f} s")
            self._error, self._repeats, self._failures, self._since = None, 0, 0, None
            self._delay = FIRST_DELAY

    def died(self, reason: str) -> None:
        with self._lock:
            self._death = reason

    def problem(self) -> str | None:
        """None while it works; otherwise what is wrong and since when."""
        with self._lock:
            if self._death is not None:
                return f"died: {self._death}"
            if self._since is None:
                return None
            since = datetime.fromtimestamp(self._since, UTC).isoformat(timespec="seconds")
            return f"failing since {since} ({self._failures} failures): {self._error}"


class Liveness:
    """The process's forever-loops by name (as `metrics.REGISTRY` holds its metrics). Thread-safe."""

    def __init__(self) -> None:
        self._streaks: dict[str, Streak] = {}
        self._lock = threading.Lock()

    def streak(self, name: str) -> Streak:
        """The loop's streak, registered (and shown in /healthz) from now on."""
        with self._lock:
            return self._streaks.setdefault(name, Streak(name))

    def checks(self) -> dict[str, str | None]:
        with self._lock:
            streaks = list(self._streaks.values())
        return {streak.name: streak.problem() for streak in streaks}


LIVENESS = Liveness()


async def retry(streak: Streak, attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()` until it does not raise, backing off between tries."""
    while True:
        try:
            result = await attempt()
        except Exception as error:
            await asyncio.sleep(streak.failed(error))
        else:
            streak.ok()
            return result


async def repeat(streak: Streak, step: Callable[[], Awaitable[object]], pause: Callable[[], Awaitable[object]]
                 ) -> None:
    """Forever: `pause()`, then `step()` until it succeeds. Returns never; only a BaseException (or a failing
    `pause`) ends it, which the caller reports as the loop's death."""
    while True:
        await pause()
        await retry(streak, step)
