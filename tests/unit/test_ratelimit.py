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


class FakeTime:
    """The limiter's clock and sleep: time moves only when it sleeps, and each sleep yields to the event loop as the
    real one does. A limiter that reads the clock over and over without sleeping (a busy wait, which would block the
    loop) fails the test rather than hanging it."""

    def __init__(self, early: float = 0.0) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._reads = 0
        self._early = early  # seconds the first sleep ends early (the loop's clock is not exact)

    def clock(self) -> float:
        self._reads += 1
        assert self._reads < 1000, "the limiter waits without sleeping"
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._reads = 0
        self.now += seconds - self._early
        self._early = 0.0
        await asyncio.sleep(0)

    def limiter(self, app_windows: list[tuple[int, float]], **scopes: tuple[int, float]) -> Limiter:
        return Limiter(app_windows, scopes, clock=self.clock, sleep=self.sleep)


def admitted(fake: FakeTime, limiter: Limiter, calls: list[tuple[str | None, str]]) -> list[float]:
    """When each call (scope, key), made one after another, was let through."""
    async def run() -> list[float]:
        stamps = []
        for scope, key in calls:
            await limiter.acquire(scope, key)
            stamps.append(fake.now)
        return stamps

    return asyncio.run(asyncio.wait_for(run(), 10))  # a limiter that slept for real would never see the time pass


def test_each_chat_is_paced_by_its_own_window() -> None:
    fake = FakeTime()
    limiter = fake.limiter([(100, 1.0)], chat=(2, 1.0))
    calls = [("chat", "a"), ("chat", "a"), ("chat", "b"), ("chat", "b"), ("chat", "a"), ("chat", "b"), ("chat", "a")]
    # a and b each send two at once; a third waits for the window of its own chat, not for the other's calls
    assert admitted(fake, limiter, calls) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert fake.sleeps == [1.0]


def test_each_card_is_paced_by_its_own_window_beside_the_chats() -> None:
    fake = FakeTime()
    limiter = fake.limiter([], chat=(5, 1.0), card=(2, 0.5))
    calls = [("card", "c1"), ("card", "c1"), ("card", "c2"), ("chat", "c1"), ("card", "c1"), ("card", "c2")]
    assert admitted(fake, limiter, calls) == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]


def test_every_call_counts_in_each_app_window() -> None:
    fake = FakeTime()
    limiter = fake.limiter([(3, 1.0), (5, 10.0)], chat=(100, 1.0))
    calls = [(None, ""), ("chat", "a"), ("chat", "b"), (None, ""), ("chat", "c"), ("chat", "d"), (None, ""),
             (None, ""), ("chat", "e")]
    # three a second; and five in ten seconds, so the sixth waits until the first leaves the long window at 10 s
    assert admitted(fake, limiter, calls) == [0.0, 0.0, 0.0, 1.0, 1.0, 10.0, 10.0, 10.0, 11.0]


def test_a_sleep_that_ends_early_is_slept_again_and_counted() -> None:
    fake = FakeTime(early=0.25)
    limiter = fake.limiter([], chat=(1, 1.0))

    async def run() -> list[float]:
        return [await limiter.acquire("chat", "a") for _ in range(2)]

    assert asyncio.run(run()) == [0.0, 1.25]
    assert fake.sleeps == [1.0, 0.25] and fake.now == 1.0  # woken at 0.75, it sleeps the rest rather than go early


def test_waiting_callers_go_in_order_each_told_the_seconds_it_slept() -> None:
    async def run() -> tuple[list[float], list[tuple[str, float]]]:
        fake = FakeTime()
        limiter = fake.limiter([], chat=(1, 2.0))
        order: list[tuple[str, float]] = []

        async def send(name: str) -> float:
            waited = await limiter.acquire("chat", "a")
            order.append((name, fake.now))
            return waited

        waits = await asyncio.gather(*(send(name) for name in ("first", "second", "third")))
        return waits, order

    waits, order = asyncio.run(run())
    assert order == [("first", 0.0), ("second", 2.0), ("third", 4.0)]
    assert waits == [0.0, 2.0, 2.0]  # the third slept 2 s once the second was through (the metric's wait)


def test_a_waiting_caller_lets_the_event_loop_run_other_tasks() -> None:
    """A limiter that blocked the loop while it waited would stop every chat, the acks to Feishu included."""
    async def run() -> None:
        fake = FakeTime()
        woken = asyncio.Event()

        async def sleep(seconds: float) -> None:  # returns only once another task has run
            fake.sleeps.append(seconds)
            await woken.wait()
            fake.now += seconds

        limiter = Limiter([], {"chat": (1, 1.0)}, clock=fake.clock, sleep=sleep)
        await limiter.acquire("chat", "a")
        waiting = asyncio.create_task(limiter.acquire("chat", "a"))
        for _ in range(100):
            if fake.sleeps or waiting.done():
                break
            await asyncio.sleep(0)
        assert fake.sleeps == [1.0] and not waiting.done()
        woken.set()  # this task ran while the other waited
        assert await waiting == 1.0

    asyncio.run(run())


def test_the_real_clock_and_sleep_pace_and_yield() -> None:
    async def run() -> tuple[float, int]:
        limiter = Limiter([], {"chat": (1, 0.05)})
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await limiter.acquire("chat", "a")
        before = ticks
        waited = await limiter.acquire("chat", "a")
        ticker.cancel()
        return waited, ticks - before

    waited, ticks = asyncio.run(run())
    assert waited > 0 and ticks > 0


def test_a_window_is_busy_until_its_last_call_is_a_whole_window_old() -> None:
    window = SlidingWindow(limit=1, window=1.0)
    assert not window.busy(0.0)
    window.record(2.0)
    assert window.busy(2.0) and window.busy(2.999)
    assert not window.busy(3.0)


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


def test_a_limiter_without_windows_never_waits() -> None:
    async def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s with no window to wait for")

    limiter = Limiter([], {}, clock=lambda: 0.0, sleep=no_sleep)

    async def run() -> list[float]:
        return [await limiter.acquire() for _ in range(3)]

    assert asyncio.run(run()) == [0.0, 0.0, 0.0]
