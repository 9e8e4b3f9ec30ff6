"""The outbox sender: what the store holds to say is sent, in order per chat, chats in parallel.

A send that fails stays in the outbox and is tried again with backoff (or when Feishu says), so neither
an outage nor a restart loses it. Items come from this process and from `orchestrator notify` in others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from loguru import logger

from orchestrator import metrics
from orchestrator.channels import Channel, DeliveryFailed, Outgoing
from orchestrator.store import OutboxRecord, Store

POLL_SECONDS = 0.5  # other processes add to the outbox too
MAX_RETRY_DELAY = 60.0


class Deliverer:
    def __init__(self, store: Store, channel: Channel) -> None:
        self.store = store
        self.channel = channel
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self.deliver_due()
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)

    async def deliver_due(self) -> None:
        by_chat: dict[str, list[OutboxRecord]] = defaultdict(list)
        for item in self.store.due_outbox():
            by_chat[item.chat_id].append(item)
        await asyncio.gather(*(self._deliver_chat(items) for items in by_chat.values()))

    async def flush(self, timeout: float) -> bool:
        """Deliver what is pending, for at most `timeout` seconds; whether everything went out."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.store.pending_outbox() and asyncio.get_running_loop().time() < deadline:
            await self.deliver_due()
            await asyncio.sleep(0.1)
        return not self.store.pending_outbox()

    async def _deliver_chat(self, items: list[OutboxRecord]) -> None:
        for item in items:
            log = logger.bind(chat_id=item.chat_id, message_id=item.reply_to or "-")
            try:
                await self.channel.deliver(Outgoing(item.chat_id, item.text, item.key, item.reply_to, item.card))
            except Exception as exc:  # a channel bug must not stop delivery: treat what it raised as a failure
                if not isinstance(exc, DeliveryFailed):
                    log.opt(exception=exc).error(f"unexpected error delivering outbox item {item.id}")
                    exc = DeliveryFailed(f"{exc.__class__.__name__}: {exc}")
                if exc.permanent:
                    log.error(f"giving up on outbox item {item.id}: {exc}")
                    self.store.mark_dead(item, str(exc))
                    metrics.DELIVERIES.labels("dead").inc()
                    continue
                delay = exc.retry_after or min(MAX_RETRY_DELAY, 2.0 ** (item.attempts + 1))
                log.warning(f"delivery of outbox item {item.id} failed ({exc}); retrying in {delay:.1f} s")
                self.store.mark_retry(item, str(exc), delay)
                metrics.DELIVERIES.labels("retry").inc()
                return  # this chat's later items wait, so the chat sees them in order
            self.store.mark_sent(item)
            metrics.DELIVERIES.labels("sent").inc()
            log.info(f"delivered outbox item {item.id}" + (" (answer)" if item.message_id else ""))
