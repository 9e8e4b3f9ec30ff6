"""Sliding-window rate limits: at most `limit` calls in any `window` seconds.

Feishu counts per second and per minute, and the tests measure the same way, so a window that holds
exactly (rather than a token bucket, which lets through up to twice its rate across a window edge)
is what keeps every send inside the limit. Hand-written: the libraries at hand are buckets.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping


class SlidingWindow:
    """Pure: the caller passes the time."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._calls: deque[float] = deque()

    def delay(self, now: float) -> float:
        """Seconds until one more call fits; 0 when it fits now."""
        while self._calls and self._calls[0] <= now - self.window:
            self._calls.popleft()
        if len(self._calls) < self.limit:
            return 0.0
        return self._calls[0] + self.window - now

    def record(self, now: float) -> None:
        self._calls.append(now)

    def busy(self, now: float) -> bool:
        """Whether any call is still inside the window."""
        return bool(self._calls) and self._calls[-1] > now - self.window


class Limiter:
    """App-wide windows that every call shares, plus a window per key of a scope (one chat, one card).
    Callers wait their turn in order. `clock` and `sleep` go together (the tests pass a fake pair): `sleep` must
    let the event loop run others while one caller waits."""

    def __init__(self, app_windows: list[tuple[int, float]], scopes: Mapping[str, tuple[int, float]],
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._app = [SlidingWindow(limit, window) for limit, window in app_windows]
        self._scopes = scopes
        self._keyed: dict[tuple[str, str], SlidingWindow] = {}
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()

    async def acquire(self, scope: str | None = None, key: str = "") -> float:
        """Wait until one more call fits the app's windows and the (scope, key) one; the seconds waited."""
        windows = list(self._app)
        if scope is not None:
            window = self._keyed.get((scope, key))
            if window is None:
                self._forget_idle()
                window = self._keyed[(scope, key)] = SlidingWindow(*self._scopes[scope])
            windows.append(window)
        waited = 0.0
        async with self._lock:
            while (delay := max((w.delay(self._clock()) for w in windows), default=0.0)) > 0:
                waited += delay
                await self._sleep(delay)
            now = self._clock()
            for window in windows:
                window.record(now)
        return waited

    def _forget_idle(self) -> None:
        """Cards come and go: drop the windows that hold no recent call, now and then."""
        if len(self._keyed) >= 1000:
            now = self._clock()
            self._keyed = {k: w for k, w in self._keyed.items() if w.busy(now)}
