"""Wiring: messages from a channel, a queue and a worker per chat, turns under a global bound, answers out
through the outbox; reconciling with the engine, culling idle containers, and shutting down gracefully.

Every step is a durable state change in the store first (received → queued → running → answered →
delivered, or failed), so a restarted service picks up where the last one stopped.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger

from orchestrator import (
    budgets,
    commands,
    credentials,
    egress,
    files_out,
    firewall,
    gateway,
    inbox,
    layout,
    leadership,
    metrics,
    turns,
)
from orchestrator.agent import Failure
from orchestrator.approvals import Approvals
from orchestrator.channels import Channel, Incoming
from orchestrator.config import Settings
from orchestrator.delivery import Deliverer
from orchestrator.housekeeping import Candidate, Finding, containers_to_stop, reconcile
from orchestrator.ids import is_valid_chat_id
from orchestrator.leadership import Leadership
from orchestrator.masking import MaskedChannel, Masker
from orchestrator.runtime import (
    ContainerSpec,
    ContainerState,
    Runtime,
    RuntimeFailure,
    bridge_name,
    egress_bridge_name,
    egress_proxy_spec,
    gateway_container_name,
    gateway_container_spec,
    network_name,
)
from orchestrator.states import State
from orchestrator.store import MessageRecord, Store, refused_for_now
from orchestrator.supervise import LIVENESS, Streak, describe, repeat, retry
from orchestrator.turn_runner import INTERRUPTED_BY_RESTART, TurnRunner

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from loguru import Logger

HOUSEKEEPING_SECONDS = 30.0
REFUSALS_SECONDS = 2.0  # how often the egress proxy's refusal log is read (an fstat when nothing is new)
KEEP_TURNS = 200  # turn folders (prompt, output, stderr) kept per chat, for `orchestrator logs` and debugging
INTERRUPT_WAIT_SECONDS = 10.0  # after SIGINT, how long interrupted turns get to end and be recorded
FLUSH_SECONDS = 10.0  # at shutdown, how long to keep trying to deliver what is pending
LIST_AGAIN_SECONDS = 1.0  # at shutdown, the wait before asking the engine for the containers a second time
STRANDED_SECONDS = 60.0  # a message stored this long ago and still not queued was never handed on
# A queued or running message no orchestrator has touched for this long, not this leader's: a deposed leader's, which
# stops within leadership.CHECK_SECONDS of losing the lock.
ADOPT_SECONDS = 15.0
UNEXPECTED_ERROR = ("Something went wrong on our side while answering this message; the operators have the "
                    "details.")


class ShuttingDown(Exception):
    """Raised to a channel that hands over a message while the service stops: it must not be acked."""


class Service:
    def __init__(self, settings: Settings, store: Store, runtime: Runtime, channel: Channel,
                 leadership: Leadership | None = None) -> None:
        self.settings = settings
        # Several orchestrators may share a PostgreSQL store: only the leader runs the chats (leadership).
        self.leadership = leadership or Leadership(store.leader_lock())
        # submit hands a stored message on to its chat's queue; run() holds that back until it leads and recovered.
        self._routing = True
        self._deposed = False  # lost the leadership: stop at once, leaving everything to the next leader
        self._owned: set[str] = set()  # messages queued or running here, or commands running
        self.store = store
        self.runtime = runtime
        self.mask = Masker(settings.secrets)
        self.channel: Channel = MaskedChannel(channel, self.mask)  # secrets never reach a chat
        self.approvals = Approvals(settings, store, self.channel)
        self.turns = TurnRunner(settings, store, runtime, self.approvals, self.channel.fetch_attachment,
                                on_container_started=self._enforce_max_running)
        self.deliverer = Deliverer(store, self.channel)
        self.queues: dict[str, asyncio.Queue[str]] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.active: set[str] = set()  # chats whose worker is handling a message
        self.retrying: set[str] = set()  # chats whose message waits to be handled again (the store refused a write)
        self._displays: dict[str, str] = {}  # by message id: display states not yet known to be stored
        self._held: dict[tuple[str, str, str], _Held] = {}  # messages of files only by (chat, sender, topic)
        self.exit_code = 0  # 1 once one of the service's tasks died
        self.accepting = True
        self._slots = asyncio.Semaphore(settings.scheduler.max_concurrent_turns)
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._egress_proxy: ContainerSpec | None = None  # made by close_network when a chat's egress is an allowlist
        self._refusals = egress.refusal_logs(settings)
        self._refusal_problems: dict[str, str] = {}  # runtime: swarm: nodes' logs that could not be read, as said

    # ---- lifecycle ----

    async def run(self) -> int:
        """Serve until the channel ends (then finish the queued work) or a SIGINT/SIGTERM arrives, or until one
        of the service's loops dies (then stop as on SIGTERM); the exit code, 1 if a loop died, so that the
        supervisor starts the service again."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.settings.metrics.listen:
            host, _, port = self.settings.metrics.listen.rpartition(":")
            metrics.serve(host.strip("[]"), int(port), self.health)
            logger.info(f"metrics and health on http://{self.settings.metrics.listen}/metrics and /healthz")
        stop_task = asyncio.create_task(self._stop.wait(), name="stop")
        channel_task = None
        if self.leadership.shared:  # a standby receives and stores too: Feishu gives each event to one connection
            self._routing = False
            channel_task = self._start_channel()
            leading = asyncio.create_task(self.leadership.take(), name="take the lead")
            await asyncio.wait({leading, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not leading.done():
                return await self._stand_down(channel_task, leading, stop_task)
        tasks = await self._lead(loop)
        channel_task = channel_task or self._start_channel()
        await asyncio.wait({channel_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if channel_task.done() and not self._stop.is_set():  # a channel that failed sets _stop (_on_task_end)
            logger.info("input ended: finishing queued messages")
            await asyncio.wait({asyncio.create_task(self._drained()), stop_task}, return_when=asyncio.FIRST_COMPLETED)
        self.accepting = False
        self._forget_held()
        channel_task.cancel()
        for task in tasks:
            task.cancel()
        if self._stop.is_set() and not self._deposed:
            await self.shutdown()
        for task in (stop_task, *self.workers.values()):
            task.cancel()
        await asyncio.gather(*tasks, *self.workers.values(), return_exceptions=True)
        self.leadership.release()
        return self.exit_code

    def _start_channel(self) -> asyncio.Task[None]:
        channel_task = asyncio.create_task(self.channel.run(self.submit, self.approvals.act), name="channel")
        LIVENESS.streak("channel")
        channel_task.add_done_callback(self._on_task_end)
        return channel_task

    async def _lead(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        """Start as the one that runs the chats: the instance's network and gateway, the containers reconciled,
        what was waiting or running queued again (as after a restart), then the outbox and housekeeping."""
        layout.prepare_instance(self.settings)
        await self.close_network()
        await self.start_gateway()
        await self.reconcile()
        self.runtime.watch(self.settings.instance,
                           lambda chat_id, action: loop.call_soon_threadsafe(self._on_container_event, chat_id, action))
        self.recover()
        self._routing = True
        tasks = [asyncio.create_task(self.deliverer.run(), name="outbox"),
                 asyncio.create_task(self._housekeep_forever(), name="housekeeping"),
                 asyncio.create_task(self._keep_leading(), name="leadership")]
        for task in tasks:
            task.add_done_callback(self._on_task_end)
        return tasks

    async def _keep_leading(self) -> None:
        """Stop at once when the leadership is lost: another orchestrator may lead already, and it follows the
        running turns and sends what is queued; this one must not touch them any more."""
        await self.leadership.kept()
        logger.critical("lost the leadership (the store's lock or its connection): stopping at once, leaving the "
                        "chats to the orchestrator that leads now")
        self._deposed = True
        self.exit_code = 1
        self.accepting = False
        self._stop.set()

    async def _stand_down(self, channel_task: asyncio.Task[None], leading: asyncio.Task[None],
                          stop_task: asyncio.Task[None]) -> int:
        """A standby's stop: nothing of the chats' was started here, and what it stored waits for the leader."""
        self.accepting = False
        for task in (channel_task, leading, stop_task):
            task.cancel()
        await asyncio.gather(channel_task, leading, stop_task, return_exceptions=True)
        logger.info("stopped while standing by")
        return self.exit_code

    def _on_task_end(self, task: asyncio.Task[None]) -> None:
        """The channel may end (its input did); any other end of a task, or the channel failing, is a death:
        shown in /healthz, and the service stops as on SIGTERM, to exit non-zero."""
        if (task.cancelled() and not self.accepting) or self._deposed:
            return  # cancelled by run() on the way out, or no longer leading (_keep_leading said so)
        error = None if task.cancelled() else task.exception()
        if task.get_name() == "channel" and not task.cancelled() and error is None:
            return
        reason = describe(error) if error else "cancelled" if task.cancelled() else "it returned"
        LIVENESS.streak(task.get_name()).died(reason)
        logger.opt(exception=error).critical(f"the {task.get_name()} task died ({reason}); stopping, so that the "
                                             "supervisor starts the service again")
        self.exit_code = 1
        self._stop.set()

    async def close_network(self) -> None:
        """The instance's networks (the agents' internal one, the egress one), the egress proxy between them when
        some chat's egress is an allowlist (its config written, its container adopted or made), and the host's
        firewall closing both."""
        networks = await self.runtime.ensure_networks(self.settings.instance)
        proxy_name = egress.proxy_name(self.settings.instance)
        policies = egress.policies(self.settings)
        if policies:
            secret = await asyncio.to_thread(credentials.load_or_make_secret, layout.secret_path(self.settings))
            digest = await asyncio.to_thread(egress.write_files, self.settings, secret)
            self._egress_proxy = egress_proxy_spec(self.settings, digest)
            await self.runtime.ensure(self._egress_proxy)
            logger.info(f"egress proxy {proxy_name}: {len(policies)} allowlist(s) "
                        f"({', '.join(p.name for p in policies)})")
        elif (await self.runtime.inspect(proxy_name)).running:
            await self._stop_container(proxy_name, "-")  # no chat uses it any more
        chains = await asyncio.to_thread(firewall.install, self.settings.instance, self._bridges(),
                                         await self._proxy_address())
        logger.info(f"agents' network {networks.agents.name} ({', '.join(networks.agents.subnets)}): internal, only "
                    f"the egress proxy's port; egress network {networks.egress.name} "
                    f"({', '.join(networks.egress.subnets)}): closed to the host, private and link-local addresses and "
                    f"Swarm's ports (iptables {chains.agents}, {chains.forward}, {chains.local})")

    def _bridges(self) -> firewall.Bridges:
        return firewall.Bridges(agents=bridge_name(self.settings.instance),
                                egress=egress_bridge_name(self.settings.instance))

    async def _proxy_address(self) -> str | None:
        if self._egress_proxy is None:
            return None
        return await self.runtime.address(self._egress_proxy.name, network_name(self.settings.instance))

    async def start_gateway(self) -> None:
        """The model gateway, the only holder of the model's key: its settings written, its container adopted or made
        (and made again when the settings changed). It runs on its own, so turns reach their model while this
        service restarts."""
        await asyncio.to_thread(credentials.load_or_make_secret, layout.secret_path(self.settings))
        await asyncio.to_thread(gateway.write_settings, self.settings)
        spec = gateway_container_spec(self.settings, gateway.settings_digest(self.settings))
        container = await self.runtime.ensure(spec)
        logger.info(f"model gateway {container.name}: agents reach {self.settings.gateway.upstream_url} through it")

    def health(self) -> dict[str, str | None]:
        """Each dependency and each of the service's loops, and what is wrong with it (None: fine). Runs on the
        metrics server's thread."""
        checks = {"feishu": self.channel.health(), "docker": self.runtime.ping(), "store": self.store.writable(),
                  **LIVENESS.checks()}
        return {name: problem and self.mask(problem) for name, problem in checks.items()}

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            logger.warning(f"{sig.name} again: not waiting for running turns any longer")
            self._hurry.set()
        else:
            logger.info(f"{sig.name}: stopping (new messages are left for the next start)")
            self._stop.set()

    async def shutdown(self) -> None:
        """Let running turns finish, interrupt the rest and tell their chats, then stop the containers.
        With `shutdown.keep_containers`, leave containers and turns running for the next start to adopt."""
        if self.settings.shutdown.keep_containers or self.leadership.shared:
            # Several orchestrators share the store: the next leader, maybe a standby already, takes them over.
            successor = "leader" if self.leadership.shared else "start"
            logger.info(f"leaving {len(self.turns.running_chats())} running turn(s) and the containers for the next "
                        f"{successor}")
            return
        denied = self.approvals.deny_waiting("the bot is restarting")
        if denied:
            logger.info(f"denied {denied} permission request(s) that waited for an approver")
        drain = self.settings.shutdown.drain_timeout
        if self.turns.running_chats():
            logger.info(f"waiting up to {drain:g} s for {len(self.turns.running_chats())} running turn(s)")
            await self._until(lambda: not self.turns.running_chats(), drain, self._hurry)
        interrupted = await self.turns.interrupt_all()  # Claude ends each turn and keeps what it had
        if interrupted:
            logger.info(f"interrupted {len(interrupted)} turn(s)")
        await self._until(lambda: not self.active, INTERRUPT_WAIT_SECONDS)
        for message_id in interrupted:  # did not end in time: record it all the same
            if self.store.message(message_id).state is State.RUNNING:
                self.store.fail(message_id, "interrupted by a restart", INTERRUPTED_BY_RESTART)
                logger.bind(message_id=message_id).warning("turn did not end after its interrupt")
        if not await self.deliverer.flush(FLUSH_SECONDS):
            logger.warning("some replies could not be delivered before stopping; they go out after the next start")
        self.deliverer.stop()
        await self._stop_chats_containers()
        if self._egress_proxy is not None:
            await self._stop_container(self._egress_proxy.name, "-")
        # Last: it carried the model requests of the turns that just ended.
        await self._stop_container(gateway_container_name(self.settings.instance), "-")

    async def _stop_chats_containers(self) -> None:
        """Every running chat container. The list is asked twice, a second apart (a pooled connection the engine
        reset fails one call); when both fail, the containers are left running for the next start to adopt, and
        the stop goes on (the proxy, the gateway): one failed call is no reason to leave all behind."""
        try:
            containers = await self._count_containers()
        except RuntimeFailure as exc:
            logger.warning(f"cannot list the chats' containers to stop them ({exc}): asking again in a second")
            await asyncio.sleep(LIST_AGAIN_SECONDS)
            try:
                containers = await self._count_containers()
            except RuntimeFailure as again:
                logger.error(f"cannot list the chats' containers to stop them ({again}): they keep running, and the "
                             "next start adopts them")
                return
        logger.info(f"stopping {len(containers)} container(s)")
        await asyncio.gather(*(self._stop_container(c.name, c.chat_id) for c in containers))

    async def _stop_container(self, name: str, chat_id: str) -> None:
        try:
            await self.runtime.stop(name, self.settings.containers.stop_timeout)
            logger.bind(chat_id=chat_id).info(f"stopped container {name}")
        except RuntimeFailure as exc:
            logger.bind(chat_id=chat_id).error(f"could not stop container {name}: {exc}")

    @staticmethod
    async def _until(done: Callable[[], bool], timeout: float, hurry: asyncio.Event | None = None) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done() and asyncio.get_running_loop().time() < deadline and not (hurry and hurry.is_set()):
            await asyncio.sleep(0.1)

    async def _drained(self) -> None:
        """Every queued message handled and everything said delivered."""
        for queue in list(self.queues.values()):
            await queue.join()
        await self.deliverer.flush(float("inf"))

    # ---- reconciling with the engine ----

    async def reconcile(self) -> None:
        """Compare the store with the engine and log each decision; adopt, never kill (but stop what another
        runtime left running for the chats)."""
        began = time.monotonic()
        for name in await self.runtime.stop_leftovers(self.settings.instance, self.settings.containers.stop_timeout):
            logger.warning(f"reconcile: stopped {name}, left running by another runtime (it would take its chat's "
                           "turns beside this runtime's)")
        containers = await self.runtime.list_managed(self.settings.instance)
        chats = self.store.chats()
        for found in reconcile(chats, containers):
            log = logger.bind(chat_id=found.chat_id)
            if found.finding is Finding.UNKNOWN:
                self.store.ensure_chat(found.chat_id)
                self.store.touch(found.chat_id)
            if found.container is not None:
                self.store.set_container(found.chat_id, found.container.name, found.container.id)
            log.info({
                Finding.RUNNING: "reconcile: adopted its running container",
                Finding.STOPPED: "reconcile: its container is stopped; the next message starts it",
                Finding.VANISHED: "reconcile: its container is gone; the next message re-creates it",
                Finding.UNKNOWN: "reconcile: adopted a labelled container the store did not know",
            }[found.finding])
        running = sum(1 for c in containers if c.running)
        logger.info(f"reconciled with the engine in {time.monotonic() - began:.2f} s: {len(chats)} chats, "
                    f"{len(containers)} containers ({running} running)")

    def _on_container_event(self, chat_id: str, action: str) -> None:
        log = logger.bind(chat_id=chat_id or "-")
        if action == "oom":
            log.warning("the kernel killed a process in the chat's container: out of memory")
            self.turns.note_oom(chat_id)
        elif action == "die":
            during = " during a turn" if chat_id in self.turns.running_chats() else ""
            log.info(f"the chat's container stopped{during}")
        if action in ("start", "die"):
            self._in_background(self._count_containers())

    async def _count_containers(self) -> list[ContainerState]:
        running = [c for c in await self.runtime.list_managed(self.settings.instance) if c.running]
        metrics.CONTAINERS_RUNNING.set(len(running))
        return running

    async def _housekeep_forever(self) -> None:
        """Each housekeeping step on a loop of its own: one that fails (logged once, shown in /healthz, tried
        again with backoff) holds up none of the others."""
        interval = max(1.0, min(HOUSEKEEPING_SECONDS, self.settings.containers.idle_stop / 2))
        steps = {"idle_stop": self._stop_idle_containers, "prune": self._prune_turns,
                 "disk_budget": self._stop_containers_over_budget, "stranded": self._resume_stranded,
                 "firewall": self._keep_network_closed, "spending": self._publish_spending}
        others = [repeat(LIVENESS.streak("housekeeping.others_messages"), self._take_others_messages,
                         lambda: asyncio.sleep(leadership.POLL_SECONDS))] if self.leadership.shared else []
        await asyncio.gather(*(repeat(LIVENESS.streak(f"housekeeping.{name}"), step, lambda: asyncio.sleep(interval))
                               for name, step in steps.items()),
                             repeat(LIVENESS.streak("housekeeping.egress_refusals"), self._report_refusals,
                                    lambda: asyncio.sleep(REFUSALS_SECONDS)), *others)

    async def _keep_network_closed(self) -> None:
        """The egress proxy started again when it stopped, and the firewall rules put back if something took them
        away (a firewall reload, a flush by hand) or the proxy's address changed."""
        if self._egress_proxy is not None and not (await self.runtime.inspect(self._egress_proxy.name)).running:
            logger.error(f"the egress proxy {self._egress_proxy.name} is not running; starting it again")
            await self.runtime.ensure(self._egress_proxy)
        bridges, proxy = self._bridges(), await self._proxy_address()
        if not await asyncio.to_thread(firewall.intact, self.settings.instance, bridges, proxy):
            logger.error("the instance network's firewall rules were changed or removed (or the egress proxy's "
                         "address changed); installing them again")
            await asyncio.to_thread(firewall.install, self.settings.instance, bridges, proxy)

    async def _report_refusals(self) -> None:
        """Each request the egress proxy refused since the last pass: logged with its chat and host, and counted. On
        Swarm, a node's log that cannot be read is said once (and the others read on)."""
        refusals = await asyncio.to_thread(self._refusals.read)
        for node, problem in self._refusals.problems.items():
            if self._refusal_problems.get(node) != problem:
                logger.warning(f"the egress refusals of node {node} cannot be read: {problem}")
        self._refusal_problems = dict(self._refusals.problems)
        for refusal in refusals:
            logger.bind(chat_id=refusal.chat_id).warning(
                f"egress refused: {refusal.method} {refusal.host}:{refusal.port} ({refusal.reason})")
            metrics.EGRESS_REFUSED.labels(refusal.chat_id).inc()

    async def _publish_spending(self) -> None:
        """Each chat's spending of the day and the month, for /metrics."""
        for period, spent in budgets.spent_by_chat(self.settings, self.store).items():
            for chat_id, usd in spent.items():
                metrics.CHAT_SPENT_USD.labels(chat_id, period).set(usd)

    async def _prune_turns(self) -> None:
        # Every turn a message still waits on, not only those followed now: after a restart a running turn may wait
        # for its slot while the agent plants newer finished folders, and its folder must not be pruned meanwhile.
        busy = self.turns.running_turn_names() | {m.turn for m in self.store.unfinished_messages() if m.turn}
        await asyncio.to_thread(turns.prune, self.settings.chats_dir, KEEP_TURNS, busy)
        await asyncio.to_thread(files_out.prune, self.settings.chats_dir, self.store.pending_file_paths())

    async def _resume_stranded(self) -> None:
        """A message stored but never queued (the write after storing it failed, so it was not acked, and its
        redelivery was taken for a duplicate) is handed on as at a start; one held for its sender's text is not
        stranded."""
        for message in self._unrouted(self.store.unfinished_messages(), time.time() - STRANDED_SECONDS):
            logger.bind(chat_id=message.chat_id, message_id=message.message_id).warning(
                "stored but never queued; handing it on now")
            self._route(message, _kind(message))

    async def _take_others_messages(self) -> None:
        """What the standbys stored (Feishu gave them those events) handed on, every POLL_SECONDS; and what a
        leader that had lost the lead without knowing it yet queued or started after this one recovered (it stops
        within leadership.CHECK_SECONDS), once it has not moved for ADOPT_SECONDS: followed, as after a restart."""
        unfinished = self.store.unfinished_messages()  # one query a poll, for both
        for message in self._unrouted(unfinished, time.time()):
            logger.bind(chat_id=message.chat_id, message_id=message.message_id).info("taken from a standby")
            self._route(message, _kind(message))
        stale = time.time() - ADOPT_SECONDS
        for message in unfinished:
            if message.state in (State.QUEUED, State.RUNNING) and message.message_id not in self._owned \
                    and message.updated_at < stale:
                logger.bind(chat_id=message.chat_id, message_id=message.message_id).warning(
                    f"{message.state} by a leader that had lost the lead; taking it over")
                self._enqueue(message)

    def _unrouted(self, unfinished: list[MessageRecord], received_before: float) -> list[MessageRecord]:
        """Of `unfinished`, those stored before `received_before` and neither queued, held for their sender's text
        nor run as a command here: this instance routes what it stores at once, so those are another's, or
        stranded."""
        held = {m.message_id for waiting in self._held.values() for m in waiting.messages}
        return [message for message in unfinished if message.state is State.RECEIVED
                and message.message_id not in held and message.message_id not in self._owned
                and message.received_at < received_before]

    async def _stop_containers_over_budget(self) -> None:
        """A chat's background jobs can fill its folders between turns: its container is stopped then. When the
        disk itself runs low every chat's container is stopped: what writes may not be measurable (a file deleted
        but held open counts in no folder)."""
        low = await self.turns.low_disk()
        for container in await self._count_containers():
            if low is not None:
                logger.bind(chat_id=container.chat_id).error(f"{low}: stopping the chat's container")
                await self._stop_container(container.name, container.chat_id)
                continue
            if container.chat_id in self.turns.running_chats():
                continue  # its turn measures and stops itself
            over = await self.turns.check_disk(container.chat_id)
            if over is not None:
                logger.bind(chat_id=container.chat_id).warning(f"{over} Stopping its container.")
                await self._stop_container(container.name, container.chat_id)

    async def _enforce_max_running(self, chat_id: str) -> None:
        if self.settings.containers.max_running:
            await self._stop_idle_containers()

    async def _stop_idle_containers(self) -> None:
        chats = {chat.chat_id: chat for chat in self.store.chats()}
        containers = await self._count_containers()
        running = [Candidate(c.chat_id, c.name, chats[c.chat_id].last_activity or 0.0)
                   for c in containers if c.chat_id in chats]
        busy = self.active | self.retrying | {chat_id for chat_id, queue in self.queues.items() if queue.qsize()}
        for candidate in containers_to_stop(running, busy, time.time(), self.settings.containers.idle_stop,
                                            self.settings.containers.max_running):
            logger.bind(chat_id=candidate.chat_id).info(f"stopping idle container {candidate.container_name}")
            await self._stop_container(candidate.container_name, candidate.chat_id)

    # ---- receiving ----

    def recover(self) -> None:
        """Queue every message that was waiting or running again, in arrival order per chat."""
        self.approvals.cancel_orphans()
        for message in self.store.unfinished_messages():
            if message.state is State.ANSWERED:
                continue  # its answer is in the outbox
            logger.bind(chat_id=message.chat_id, message_id=message.message_id).info(
                f"recovered a {message.state} message")
            if message.state is State.RECEIVED:
                self._route(message, _kind(message))  # stored, not yet handled (or files held for their text)
            else:
                self._enqueue(message)

    async def submit(self, incoming: Incoming) -> None:
        log = logger.bind(chat_id=incoming.chat_id, message_id=incoming.message_id)
        if not self.accepting:
            raise ShuttingDown("the service is stopping")
        if not is_valid_chat_id(incoming.chat_id):
            log.warning("rejected: not a valid chat id")
            return
        if not incoming.trusted and not self._allowed(incoming, log):
            return
        self.store.ensure_chat(incoming.chat_id, incoming.chat_name)
        message = self.store.record_received(incoming.message_id, incoming.chat_id, incoming.sender_id,
                                             incoming.text, incoming.thread_id,
                                             inbox.encode_attachments(incoming.attachments))
        if message is None:
            log.info("duplicate delivery ignored")
            metrics.MESSAGES.labels("duplicate").inc()
            return
        log.info(f"received ({incoming.kind})")
        metrics.MESSAGES.labels("received").inc()
        if self._routing:
            self._route(message, incoming.kind)
        else:
            log.info("stored for the leader")

    # ---- files waiting for their text ----

    def _route(self, message: MessageRecord, kind: str) -> None:
        """A stored message to `_dispatch`; but one of files only is held for its sender's next text message in the
        chat and topic (people paste a screenshot, then type the question), which takes their files: one turn."""
        key = (message.chat_id, message.sender_id, message.thread_id)
        held = self._held.get(key)
        if held is not None and held.messages[-1].received_at + self.settings.files.wait_for_text \
                < message.received_at:
            self._release(key)  # its time was up before this message came (at a start): its turn comes first
            held = None
        if kind != "text" or commands.find(message.text) is not None:
            self._dispatch(message, kind)  # commands and unreadable messages take no files
        elif message.attachments and not message.text and self.settings.files.wait_for_text:
            self._hold(key, message)
        else:
            self._dispatch(self._take_held(key, message) if held else message, kind)

    def _hold(self, key: tuple[str, str, str], message: MessageRecord) -> None:
        """Hold `message` with the sender's other files, until their text comes or `wait_for_text` after it."""
        wait = max(0.0, message.received_at + self.settings.files.wait_for_text - time.time())
        timer = asyncio.get_running_loop().call_later(wait, self._release_in_time, key)
        held = self._held.get(key)
        if held is None:
            self._held[key] = _Held([message], timer)
        else:
            held.timer.cancel()
            held.messages.append(message)
            held.timer = timer
        logger.bind(chat_id=message.chat_id, message_id=message.message_id).info(
            f"files only: waiting {wait:.0f} s for the sender's text")

    def _release_in_time(self, key: tuple[str, str, str]) -> None:
        """The timer of held files: no text came. When the store refuses the write, they are left received for
        `_resume_stranded` to hand on."""
        try:
            self._release(key)
        except Exception as exc:
            self._held.pop(key, None)
            logger.bind(chat_id=key[0]).opt(exception=exc).error(
                f"files held for their text could not be handed on ({describe(exc)}); they are tried again later")

    def _release(self, key: tuple[str, str, str]) -> None:
        """Held files whose text did not come: one turn for them all, in the last of their messages."""
        last = self._held[key].messages[-1]
        logger.bind(chat_id=last.chat_id, message_id=last.message_id).info(
            "no text came for the files: they get a turn of their own")
        self._dispatch(self._take_held(key, last), "text")

    def _take_held(self, key: tuple[str, str, str], into: MessageRecord) -> MessageRecord:
        """The held files of `key` taken into `into`, in order and before its own; its record from then on."""
        held = self._held[key]
        others = [m for m in held.messages if m.message_id != into.message_id]
        if others:
            into = self.store.merge(into.message_id, inbox.merged_attachments([*others, into]),
                                    [m.message_id for m in others])
            metrics.MESSAGES.labels("merged").inc(len(others))
            logger.bind(chat_id=into.chat_id, message_id=into.message_id).info(
                f"took the files of {', '.join(m.message_id for m in others)} (sent without text)")
        del self._held[key]
        held.timer.cancel()
        return into

    def _forget_held(self) -> None:
        """At a stop: the held files stay received in the store, for the next start to hold again."""
        for held in self._held.values():
            held.timer.cancel()
        self._held.clear()

    def _dispatch(self, message: MessageRecord, kind: str) -> None:
        """A stored message to where it goes: a short reply, a command, or the chat's queue."""
        if kind != "text":
            self._reply_directly(message, f"I can read text, rich text, images and files; {kind} messages "
                                          "are not supported yet.")
        elif (command := commands.find(message.text)) is not None:
            # not awaited: the channel acks once the message is stored, and /status asks the engine
            self._in_background(self._own_while(message.message_id,
                                                commands.run(command, self._command_context(), message)))
        elif self._waiting(message.chat_id) >= self.settings.scheduler.queue_depth:
            depth = self.settings.scheduler.queue_depth
            logger.bind(chat_id=message.chat_id, message_id=message.message_id).warning(
                f"refused: {depth} messages already wait in this chat")
            metrics.MESSAGES.labels("refused").inc()
            self.store.fail(message.message_id, "queue full", f"{depth} messages are already waiting in this "
                            "chat; please send this again once they are answered.")
            self.deliverer.wake()
        else:
            self._enqueue(message)

    async def _own_while(self, message_id: str, coroutine: Coroutine[None, None, None]) -> None:
        """A command runs while its message is still received: owned meanwhile, so that nothing hands it on again."""
        self._owned.add(message_id)
        try:
            await coroutine
        finally:
            self._owned.discard(message_id)

    def _in_background(self, coroutine: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _waiting(self, chat_id: str) -> int:
        queue = self.queues.get(chat_id)
        return queue.qsize() if queue else 0

    def _allowed(self, incoming: Incoming, log: Logger) -> bool:
        access = self.settings.access
        if access.allows(incoming.chat_id, incoming.sender_id):
            return True
        if access.allows(incoming.chat_id, "*") or "*" in access.allowed_chats \
                or incoming.chat_id in access.allowed_chats:
            who, key = "user", f"{incoming.chat_id}/{incoming.sender_id}"
            text = (f"You are not allowed to use this bot. An admin can add your user id {incoming.sender_id} "
                    "to access.allowed_users.")
        else:
            who, key = "chat", incoming.chat_id
            text = (f"This chat is not allowed to use this bot. An admin can add its chat id {incoming.chat_id} "
                    "to access.allowed_chats.")
        first = self.store.record_refusal(key)
        metrics.MESSAGES.labels("refused").inc()
        log.warning(f"refused: {who} not allowed" + ("; telling them once" if first else ""))
        if first:
            self.store.say(incoming.chat_id, text, reply_to=incoming.message_id)
            self.deliverer.wake()
        return False

    def _enqueue(self, message: MessageRecord) -> None:
        if message.state is State.RECEIVED:
            self.store.mark_queued(message.message_id)
        self._owned.add(message.message_id)
        queue = self.queues.get(message.chat_id)
        if queue is None:
            queue = self.queues[message.chat_id] = asyncio.Queue()
            self.workers[message.chat_id] = asyncio.create_task(self._worker(queue), name=f"chat {message.chat_id}")
        queue.put_nowait(message.message_id)

    def _reply_directly(self, message: MessageRecord, text: str) -> None:
        """Answer without a turn (commands, unsupported messages); the answer goes out like any other."""
        self.store.answer_without_turn(message.message_id, text)
        self.deliverer.wake()

    # ---- commands ----

    def _command_context(self) -> commands.Context:
        return commands.Context(self.settings, self.store, self.runtime, self.turns, self._reply_directly)

    # ---- one chat's turns ----

    async def _worker(self, queue: asyncio.Queue[str]) -> None:
        """One chat's messages, one at a time, in arrival order."""
        while True:
            message_id = await queue.get()
            try:
                await retry(Streak("handling the message", logger.bind(message_id=message_id)),
                            functools.partial(self._handle_stored, message_id))
            finally:
                self._owned.discard(message_id)
                queue.task_done()

    async def _handle_stored(self, message_id: str) -> None:
        """Handle a queued message. When the store refuses a write meanwhile (another process holds it locked,
        its disk is full), that is raised and the worker tries again until the store takes writes: the turn is
        then followed, not run twice, as after a restart. Any other error fails the message."""
        message = self.store.message(message_id)
        if message.state in (State.QUEUED, State.RUNNING):  # not finished before a later write was refused
            try:
                await self._handle(message)
            except Exception as exc:
                if refused_for_now(exc):
                    self.retrying.add(message.chat_id)  # its turn may go on in the container: not idle
                    raise
                await self._fail_unexpectedly(message, exc)
        self.retrying.discard(message.chat_id)

    async def _fail_unexpectedly(self, message: MessageRecord, error: Exception) -> None:
        """A generic reason for the user, the details for the operators in the log; stored as soon as the store
        takes it (not over an answer that was stored before the error)."""
        log = logger.bind(chat_id=message.chat_id, message_id=message.message_id)
        log.opt(exception=error).error(f"unexpected error while handling the message: {describe(error)}")

        async def record() -> None:
            if self.store.fail_unanswered(message.message_id, f"unexpected error: {describe(error)}",
                                          UNEXPECTED_ERROR):
                metrics.MESSAGES.labels("failed").inc()
                self.deliverer.wake()

        await retry(Streak("recording that the message failed", log), record)

    async def _handle(self, message: MessageRecord) -> None:
        log = logger.bind(chat_id=message.chat_id, message_id=message.message_id)
        async with self._slots:  # the global bound; waiting chats are served in arrival order
            if not self.accepting:
                return  # stopping: it stays queued for the next start
            self.active.add(message.chat_id)
            metrics.BUSY_CHATS.set(len(self.active))
            metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - message.received_at))
            try:
                await self._turn(message, log)
            finally:
                self.active.discard(message.chat_id)
                metrics.BUSY_CHATS.set(len(self.active))

    def _save_display(self, message_id: str, state: str, log: Logger) -> None:
        """The display's state (its card, its reaction) kept in memory first: when the store refuses the write
        (locked, full), the message is handled again in this process and must go on with the same card."""
        self._displays[message_id] = state
        try:
            self.store.set_display(message_id, state)
        except Exception as exc:
            if not refused_for_now(exc):
                raise
            log.warning(f"the card's state could not be stored yet ({describe(exc)}); kept in memory")

    async def _turn(self, message: MessageRecord, log: Logger) -> None:
        saved = self._displays.get(message.message_id, message.display)
        display = self.channel.display(message.chat_id, message.message_id, saved,
                                       lambda state: self._save_display(message.message_id, state, log))
        await display.start()
        began = time.monotonic()
        try:
            result = await self.turns.run(message, display, log)
        finally:
            card = await display.end()
            self.store.touch(message.chat_id)
        wall = time.monotonic() - began
        metrics.TURN_SECONDS.observe(wall)
        if isinstance(result, Failure):
            text = f"{result.partial_text}\n\n{result.reason}" if result.partial_text else result.reason
            if self.store.fail(message.message_id, result.reason, text, card):
                log.warning(f"failed: {result.reason}")
                metrics.MESSAGES.labels("failed").inc()
            else:
                log.warning(f"the turn ended ({result.reason}) after its message was failed; dropped")
        elif self.store.answer(message.message_id, result.text, result.cost_usd, result.duration_ms, card,
                               result.files):
            metrics.MESSAGES.labels("answered").inc()
            if result.duration_ms is not None:
                metrics.OVERHEAD_SECONDS.observe(max(0.0, wall - result.duration_ms / 1000))
            log.info(f"answered ({len(result.text)} chars, cost {result.cost_usd}, {result.duration_ms} ms)")
        else:
            for file, _ in result.files:
                files_out.discard(file)
            log.warning("the answer came after its message was failed (at a shutdown); dropped"
                        + (f" with its {len(result.files)} file(s)" if result.files else ""))
        self._displays.pop(message.message_id, None)
        self.deliverer.wake()


@dataclass
class _Held:
    """A sender's messages of files only (in a chat and topic), waiting for their text; the timer gives up."""

    messages: list[MessageRecord]
    timer: asyncio.TimerHandle


def _kind(message: MessageRecord) -> str:
    """What a stored message was, for `_dispatch`: text (or files) reach a turn; anything else was not readable."""
    return "text" if message.text or message.attachments else "non-text"
