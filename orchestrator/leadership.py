"""Which of the orchestrators sharing a store runs the chats: the one holding the store's leader lock.

Every instance receives, stores and acks the events Feishu gives it; only the leader runs the chats' queues, the
outbox and housekeeping, and hands on what the others stored. A standby asks for the lock every POLL_SECONDS and,
once it has it, starts as a restarted orchestrator does (the running turns followed, not run again). The leader asks
its lock's connection as often whether it still holds it, and stops leading (the service exits at once, leaving the
containers and turns to the next leader) when it cannot tell within CHECK_SECONDS: the server lets a lock go when the
holder's connection closed (the holder sees that at its next check) or when it gave up on a silent holder after
about 10 s (store.LeaderLock), later than a cut-off holder gives up on it (3 to 4 s).

With a SQLite store there is no lock: one orchestrator on one host, which leads from its start.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from loguru import logger

# How often a standby asks for the lock, and the leader checks it holds it. A leader killed with SIGKILL lets the
# lock go at once: its standby leads within this and its own start (docs/SCALING.md: the failover bound).
POLL_SECONDS = 1.0
CHECK_SECONDS = 4.0  # at most this long for the leader's check (the server lets go of a silent holder after 10 s)


class Lock(Protocol):
    """store.LeaderLock's calls, blocking (they run on a thread)."""

    def try_take(self) -> bool: ...

    def held(self) -> bool: ...

    def release(self) -> None: ...


class Leadership:
    def __init__(self, lock: Lock | None, poll: float = POLL_SECONDS) -> None:
        self._lock = lock
        self._poll = poll
        self.leading = lock is None

    @property
    def shared(self) -> bool:
        """Whether other orchestrators may take over from this one (a lock decides who leads)."""
        return self._lock is not None

    async def take(self) -> None:
        """Return once this instance leads: at once without a lock; else when the lock is ours."""
        if self._lock is None:
            return
        waited = False
        while not await self._try_take():
            if not waited:
                logger.info("standing by: another orchestrator leads; storing what arrives here for it")
                waited = True
            await asyncio.sleep(self._poll)
        self.leading = True
        logger.info("leading: this orchestrator runs the chats now")

    async def _try_take(self) -> bool:
        assert self._lock is not None
        try:
            return await asyncio.to_thread(self._lock.try_take)
        except Exception as exc:
            logger.warning(f"cannot ask for the leader lock: {str(exc).strip()}")
            return False

    async def kept(self) -> None:
        """Return when this instance no longer leads (never without a lock)."""
        if self._lock is None:
            await asyncio.Event().wait()
        assert self._lock is not None
        while await self._still_held():
            await asyncio.sleep(self._poll)
        self.leading = False

    async def _still_held(self) -> bool:
        """The lock's check, given up after CHECK_SECONDS (the lock's connection gives up on a silent server after
        3 s: store.LEADER_USER_TIMEOUT_MS): not knowing is not leading."""
        assert self._lock is not None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that comes as the check returns, and
            # this loop then outlived the service's stop (seen in its unit tests, about 1 run in 3).
            async with asyncio.timeout(CHECK_SECONDS):
                return await asyncio.to_thread(self._lock.held)
        except TimeoutError:
            logger.error(f"the leader lock's check did not answer within {CHECK_SECONDS:.0f} s")
            return False

    def release(self) -> None:
        """Let another instance lead (at a stop)."""
        if self._lock is not None:
            self.leading = False
            self._lock.release()
