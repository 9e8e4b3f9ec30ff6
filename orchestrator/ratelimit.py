"""Sliding-window rate limits: at most `limit` calls in any `window` seconds.

Feishu counts per second and per minute, and the tests measure the same way, so a window that holds
exactly (rather than a token bucket, which lets through up to twice its rate across a window edge)
is what keeps every send inside the limit. Hand-written: the libraries at hand are buckets.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


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


class Limiter:
    """App-wide windows shared by every call, plus one window per chat. Callers wait their turn in order."""

    def __init__(self, app_windows: list[tuple[int, float]], per_chat: tuple[int, float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._app = [SlidingWindow(limit, window) for limit, window in app_windows]
        self._per_chat = per_chat
        self._chats: dict[str, SlidingWindow] = {}
        self._clock = clock
        self._lock = asyncio.Lock()

    async def acquire(self, chat_id: str) -> float:
        """Wait until a call for this chat fits every window; the seconds waited."""
        chat = self._chats.get(chat_id)
        if chat is None:
            chat = self._chats[chat_id] = SlidingWindow(*self._per_chat)
        windows = [*self._app, chat]
        waited = 0.0
        async with self._lock:
            while (delay := max(w.delay(self._clock()) for w in windows)) > 0:
                waited += delay
                await asyncio.sleep(delay)
            now = self._clock()
            for window in windows:
                window.record(now)
        return waited
