import asyncio
import random

from orchestrator.ratelimit import Limiter, SlidingWindow


def test_window_admits_limit_calls_then_waits_for_the_oldest_to_age_out() -> None:
    window = SlidingWindow(limit=3, window=1.0)
    for t in (0.0, 0.1, 0.2):
        assert window.delay(t) == 0
        window.record(t)
    assert window.delay(0.5) == 0.5  # the call at 0.0 leaves the window at 1.0
    assert window.delay(1.0) == 0
    window.record(1.0)
    assert round(window.delay(1.0), 6) == 0.1


def test_no_window_of_a_long_random_run_holds_more_than_the_limit() -> None:
    rng = random.Random(7)
    window = SlidingWindow(limit=5, window=1.0)
    admitted, now = [], 0.0
    for _ in range(2000):
        now += rng.expovariate(20)  # callers arrive four times faster than the limit
        while (delay := window.delay(now)) > 0:
            now += delay
        window.record(now)
        admitted.append(now)
    assert max(sum(1 for t in admitted[i:i + 6] if t - admitted[i] < 1.0 - 1e-9) for i in range(len(admitted))) == 5


def test_limiter_paces_one_chat_and_shares_the_app_window() -> None:
    async def run() -> tuple[list[float], list[float]]:
        loop = asyncio.get_running_loop()
        limiter = Limiter(app_windows=[(6, 0.5)], scopes={"chat": (2, 0.5)})
        start = loop.time()
        stamps: list[float] = []

        async def send(chat: str) -> float:
            waited = await limiter.acquire("chat", chat)
            stamps.append(loop.time() - start)
            return waited

        waits = await asyncio.gather(*(send(chat) for chat in ["a"] * 4 + ["b"] * 2 + ["c"] * 2))
        return stamps, waits

    stamps, waits = asyncio.run(run())
    assert len(stamps) == 8
    assert waits[0] == 0 and max(waits) > 0
    # four calls of chat "a" at two per half second need at least one more half second
    assert max(stamps) >= 0.45


def test_scopes_have_their_own_windows_and_idle_ones_are_forgotten() -> None:
    now = [0.0]
    limiter = Limiter(app_windows=[], scopes={"card": (1, 1.0)}, clock=lambda: now[0])

    async def run() -> list[float]:
        waits = [await limiter.acquire("card", f"c{n}") for n in range(1000)]
        now[0] = 5.0
        waits.append(await limiter.acquire("card", "fresh"))
        return waits

    assert set(asyncio.run(run())) == {0.0}  # a thousand cards, one call each: nobody waits
    assert list(limiter._keyed) == [("card", "fresh")]
