"""The outbox sender: what the store holds to say is sent, in order per chat, chats in parallel.

A send that fails stays in the outbox and is tried again with backoff (or when Feishu says), so neither
an outage nor a restart loses it. Items come from this process and from `orchestrator notify` in others.
A pass that fails on the store (held locked by another process, a full disk) is tried again with backoff
(`supervise`); an item sent whose sending could not be recorded is recorded then, not sent a second time.
A file is uploaded in the background (seconds for 30 MB), its chat's later items waiting for it, so one chat's
files never hold up another chat's answers; its key is stored before the send.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict

from loguru import logger

from orchestrator import files_out, metrics
from orchestrator.channels import Channel, DeliveryFailed, Outgoing
from orchestrator.store import OutboxRecord, Store
from orchestrator.supervise import LIVENESS, Streak, repeat

POLL_SECONDS = 0.5  # other processes add to the outbox too
MAX_RETRY_DELAY = 60.0


class Deliverer:
    def __init__(self, store: Store, channel: Channel) -> None:
        self.store = store
        self.channel = channel
        self._wakeup = asyncio.Event()
        self._unrecorded: set[int] = set()  # items sent whose sending the store did not take yet
        self._pass = asyncio.Lock()  # one pass at a time (the loop's, or a flush's): no item is sent by two
        self._uploads: dict[int, asyncio.Task[str]] = {}  # by outbox item: its file's upload, under way or done

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver what is due whenever woken, and every POLL_SECONDS; never ends."""
        await repeat(LIVENESS.streak("outbox"), self.deliver_due, self._next_round)

    async def _next_round(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11, wait_for swallows a cancel that comes with the wake-up, and the
        # outbox loop then outlived the service's shutdown (seen about 1 in 5 restarts under load).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_SECONDS):
                await self._wakeup.wait()
        self._wakeup.clear()  # before delivering: a wake-up during the pass asks for another pass

    async def deliver_due(self) -> None:
        """One pass over the due items; raises what the store raised, once every chat's part has ended."""
        async with self._pass:
            by_chat: dict[str, list[OutboxRecord]] = defaultdict(list)
            for item in self.store.due_outbox():
                by_chat[item.chat_id].append(item)
            results = await asyncio.gather(*(self._deliver_chat(items) for items in by_chat.values()),
                                           return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def stop(self) -> None:
        """At a shutdown: uploads under way are dropped (their items upload again at the next start)."""
        for upload in self._uploads.values():
            upload.cancel()
        self._uploads.clear()

    async def flush(self, timeout: float) -> bool:
        """Deliver what is pending, for at most `timeout` seconds; whether everything went out."""
        deadline = asyncio.get_running_loop().time() + timeout
        streak = Streak("flushing the outbox")
        while self.store.pending_outbox() and asyncio.get_running_loop().time() < deadline:
            try:
                await self.deliver_due()
            except Exception as exc:
                streak.failed(exc)
            await asyncio.sleep(0.1)
        return not self.store.pending_outbox()

    async def _deliver_chat(self, items: list[OutboxRecord]) -> None:
        for item in items:
            log = logger.bind(chat_id=item.chat_id, message_id=item.reply_to or "-")
            if item.id not in self._unrecorded:
                try:
                    if not await self._send(item):
                        return  # its file is being uploaded: this chat's later items wait, in order
                except Exception as exc:  # a channel bug must not stop delivery: treat what it raised as a failure
                    if not isinstance(exc, DeliveryFailed):
                        log.opt(exception=exc).error(f"unexpected error delivering outbox item {item.id}")
                        exc = DeliveryFailed(f"{exc.__class__.__name__}: {exc}")
                    if exc.permanent:
                        log.error(f"giving up on outbox item {item.id}: {exc}")
                        self._give_up(item, exc)
                        continue
                    delay = exc.retry_after or min(MAX_RETRY_DELAY, 2.0 ** (item.attempts + 1))
                    log.warning(f"delivery of outbox item {item.id} failed ({exc}); retrying in {delay:.1f} s")
                    self.store.mark_retry(item, str(exc), delay)
                    metrics.DELIVERIES.labels("retry").inc()
                    return  # this chat's later items wait, so the chat sees them in order
                self._unrecorded.add(item.id)  # until the store takes it: a failing mark_sent must not resend it
            self.store.mark_sent(item)
            self._unrecorded.discard(item.id)
            files_out.discard(item.file)
            metrics.DELIVERIES.labels("sent").inc()
            log.info(f"delivered outbox item {item.id}" + (" (answer)" if item.message_id else "")
                     + (f" ({item.file.kind} {item.file.name}, {item.file.size} bytes)" if item.file else ""))

    async def _send(self, item: OutboxRecord) -> bool:
        """Send the item; False while its file is still being uploaded. A file is uploaded once: its key is stored
        before the send, which carries the item's key, so neither a retry nor a restart between the two sends it
        twice (Feishu drops a repeated key). A failed upload raises here, as a failed send does."""
        upload_key = item.upload_key
        if item.file is not None and upload_key is None:
            upload = self._uploads.get(item.id)
            if upload is None:
                self._uploads[item.id] = asyncio.create_task(self._upload(item))
                return False
            if not upload.done():
                return False
            del self._uploads[item.id]
            upload_key = upload.result()
        await self.channel.deliver(Outgoing(item.chat_id, item.text, item.key, item.reply_to, item.card, item.file,
                                            upload_key))
        return True

    async def _upload(self, item: OutboxRecord) -> str:
        assert item.file is not None
        try:
            if not os.path.exists(item.file.path):  # removed by hand, or data_dir moved: no retry brings it back
                raise DeliveryFailed("its copy is gone", permanent=True)
            key = await self.channel.upload(item.chat_id, item.file)
            self.store.set_uploaded(item, key)
            return key
        finally:
            self.wake()  # the chat's pass goes on with it

    def _give_up(self, item: OutboxRecord, exc: DeliveryFailed) -> None:
        """Undeliverable for good; for a file (its answer went out), the chat is told which, in the same write."""
        notice = f"The file {item.file.name} could not be sent: {exc}" if item.file is not None else None
        self.store.mark_dead(item, str(exc), notice)
        metrics.DELIVERIES.labels("dead").inc()
        files_out.discard(item.file)
