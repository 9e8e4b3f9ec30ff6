"""Wiring: messages from a channel, one worker per chat, turns in the chat's container, answers back.

Every step is a durable state change in the store first (received → queued → running → answered →
delivered, or failed), so a restarted service picks up where the last one stopped: `recover` re-queues
what was waiting and follows turns that are still running in their containers, and the outbox delivers
whatever was answered but not yet delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger

from orchestrator import agent, layout, turns
from orchestrator.agent import Answer, Failure, Init, Text, ToolUse, Transcript, Unparsed
from orchestrator.channels import Channel, DeliveryFailed, Incoming, Outgoing, TurnDisplay
from orchestrator.config import ChatSettings, Settings, resolve_chat
from orchestrator.ids import is_valid_chat_id
from orchestrator.runtime import TURNS_PATH, ContainerState, DockerRuntime, RuntimeFailure, container_spec
from orchestrator.states import State
from orchestrator.store import MessageRecord, OutboxRecord, Store

if TYPE_CHECKING:
    from loguru import Logger

POLL_SECONDS = 0.1
CONTAINER_CHECK_SECONDS = 2.0
KILL_GRACE_SECONDS = 5.0
OUTBOX_POLL_SECONDS = 0.5  # `orchestrator notify` adds to the outbox from another process
MAX_RETRY_DELAY = 60.0
RUN_TURN = "run-turn"  # in the agent image: keeps a turn's output in its turn folder
HELP = ("Send a message and Claude Code answers it in this chat's own container.\n"
        "/new  start a new conversation (Claude forgets this chat's earlier context)\n"
        "/stop  stop the answer being worked on\n"
        "/status  this chat's container, limits, session and queue\n"
        "/help  this text")


@dataclass
class RunningTurn:
    message_id: str
    container_id: str
    files: turns.TurnFiles
    stop_requested: bool = False


class Service:
    def __init__(self, settings: Settings, store: Store, runtime: DockerRuntime, channel: Channel) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.channel = channel
        self.queues: dict[str, asyncio.Queue[str]] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, RunningTurn] = {}
        self._outbox_wakeup = asyncio.Event()
        self._commands: set[asyncio.Task[None]] = set()

    @property
    def agent_user(self) -> str:
        return f"{self.settings.agent.uid}:{self.settings.agent.uid}"

    # ---- running ----

    async def run(self) -> None:
        """Serve until the channel ends (then finish the queued work) or a SIGINT/SIGTERM arrives."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.recover()
        deliverer = asyncio.create_task(self._deliver_forever(), name="outbox")
        channel_task = asyncio.create_task(self.channel.run(self.submit), name="channel")
        stop_task = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({channel_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if channel_task.done():
            channel_task.result()
            logger.info("input ended: finishing queued messages")
            await asyncio.wait({asyncio.create_task(self._drained()), stop_task},
                               return_when=asyncio.FIRST_COMPLETED)
        busy = len(self.running)
        if busy:
            logger.info(f"stopping with {busy} turn(s) still running in their containers; "
                        "the next start follows them and delivers their answers")
        for task in (channel_task, stop_task, deliverer, *self.workers.values()):
            task.cancel()
        await asyncio.gather(deliverer, *self.workers.values(), return_exceptions=True)

    async def _drained(self) -> None:
        """Every queued message handled and everything said delivered (or given up on)."""
        for queue in list(self.queues.values()):
            await queue.join()
        while self.store.pending_outbox():
            self._outbox_wakeup.set()
            await asyncio.sleep(OUTBOX_POLL_SECONDS)

    def recover(self) -> None:
        """Queue every message that was waiting or running again, in arrival order per chat."""
        for message in self.store.unfinished_messages():
            if message.state is State.ANSWERED:
                continue  # its answer is in the outbox
            logger.bind(chat_id=message.chat_id, message_id=message.message_id).info(
                f"recovered a {message.state} message")
            self._enqueue(message)

    # ---- receiving ----

    async def submit(self, incoming: Incoming) -> None:
        log = logger.bind(chat_id=incoming.chat_id, message_id=incoming.message_id)
        if not is_valid_chat_id(incoming.chat_id):
            log.warning("rejected: not a valid chat id")
            return
        if not incoming.trusted and not self._allowed(incoming, log):
            return
        self.store.ensure_chat(incoming.chat_id, incoming.chat_name)
        message = self.store.record_received(incoming.message_id, incoming.chat_id, incoming.sender_id,
                                             incoming.text)
        if message is None:
            log.info("duplicate delivery ignored")
            return
        log.info(f"received ({incoming.kind})")
        if incoming.kind != "text":
            self._reply_directly(message, f"I can read text and rich-text messages; {incoming.kind} messages "
                                          "are not supported yet.")
        elif (command := incoming.text.strip().lower()) in COMMANDS:
            # not awaited: the channel acks once the message is stored, and /status asks the engine
            task = asyncio.create_task(COMMANDS[command](self, message), name=f"{command} {message.message_id}")
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)
        else:
            self._enqueue(message)

    def _allowed(self, incoming: Incoming, log: Logger) -> bool:
        access = self.settings.access
        if access.allows(incoming.chat_id, incoming.sender_id):
            return True
        chat_allowed = access.allows(incoming.chat_id, "*") or "*" in access.allowed_chats \
            or incoming.chat_id in access.allowed_chats
        if chat_allowed:
            key, text = (f"{incoming.chat_id}/{incoming.sender_id}",
                         f"You are not allowed to use this bot. An admin can add your user id {incoming.sender_id} "
                         "to access.allowed_users.")
        else:
            key, text = (incoming.chat_id,
                         f"This chat is not allowed to use this bot. An admin can add its chat id {incoming.chat_id} "
                         "to access.allowed_chats.")
        first = self.store.record_refusal(key)
        log.warning(f"refused: {'user' if chat_allowed else 'chat'} not allowed" + ("; telling them" if first else ""))
        if first:
            self.store.say(incoming.chat_id, text, reply_to=incoming.message_id)
            self._outbox_wakeup.set()
        return False

    def _enqueue(self, message: MessageRecord) -> None:
        if message.state is State.RECEIVED:
            self.store.mark_queued(message.message_id)
        queue = self.queues.get(message.chat_id)
        if queue is None:
            queue = self.queues[message.chat_id] = asyncio.Queue()
            self.workers[message.chat_id] = asyncio.create_task(self._worker(queue), name=f"chat {message.chat_id}")
        queue.put_nowait(message.message_id)

    def _reply_directly(self, message: MessageRecord, text: str) -> None:
        """Answer without a turn (commands, unsupported messages); the answer goes out like any other."""
        self.store.mark_queued(message.message_id)
        self.store.mark_running(message.message_id, "")
        self.store.answer(message.message_id, text, None, None, card=None)
        self._outbox_wakeup.set()

    # ---- commands ----

    async def _help(self, message: MessageRecord) -> None:
        self._reply_directly(message, HELP)

    async def _new(self, message: MessageRecord) -> None:
        self.store.set_session(message.chat_id, None)
        logger.bind(chat_id=message.chat_id, message_id=message.message_id).info("session cleared by /new")
        self._reply_directly(message, "Started a new conversation: the next message begins with a fresh context.")

    async def _stop(self, message: MessageRecord) -> None:
        turn = self.running.get(message.chat_id)
        if turn is None:
            self._reply_directly(message, "Nothing is running in this chat.")
            return
        turn.stop_requested = True
        await self._signal(turn, "INT")  # the CLI ends the turn and keeps what it had in its transcript
        logger.bind(chat_id=message.chat_id, message_id=turn.message_id).info("turn interrupted by /stop")
        self._reply_directly(message, "Stopping the current answer.")

    async def _status(self, message: MessageRecord) -> None:
        chat = self.store.chat(message.chat_id)
        limits = resolve_chat(self.settings, message.chat_id).options
        state = await self.runtime.inspect(chat.container_name) if chat.container_name else None
        waiting = [m for m in self.store.unfinished_messages() if m.chat_id == message.chat_id
                   and m.state in (State.RECEIVED, State.QUEUED)]
        last = next((m for m in reversed(self.store.messages(message.chat_id)) if m.duration_ms is not None), None)
        lines = [
            f"Container: {chat.container_name or '(none yet)'} {state.status if state else ''}".rstrip(),
            f"Limits: {limits.cpus:g} CPUs, {limits.memory // (1024 * 1024)} MiB memory, "
            f"{limits.pids_limit} processes, network {limits.network}",
            f"Session: {chat.session_id or '(new)'}",
            f"Running: {'yes' if message.chat_id in self.running else 'no'}; queued: {len(waiting)}",
        ]
        if last is not None:
            lines.append(f"Last turn: {last.duration_ms / 1000:.1f} s, ${last.cost_usd or 0:.4f}")
        self._reply_directly(message, "\n".join(lines))

    # ---- one chat's turns ----

    async def _worker(self, queue: asyncio.Queue[str]) -> None:
        """One chat's messages, one at a time, in arrival order."""
        while True:
            message_id = await queue.get()
            try:
                await self._handle(self.store.message(message_id))
            except Exception:
                logger.bind(message_id=message_id).exception("unexpected error while handling a message")
            finally:
                queue.task_done()

    async def _handle(self, message: MessageRecord) -> None:
        log = logger.bind(chat_id=message.chat_id, message_id=message.message_id)
        display = self.channel.display(message.chat_id, message.message_id)
        await display.start()
        try:
            result = await self._turn(message, display, log)
        except RuntimeFailure as exc:
            log.error(f"container failure: {exc}")
            result = Failure(f"The chat's container could not be started ({exc}).")
        finally:
            card = await display.end()
            self.running.pop(message.chat_id, None)
            self.store.touch(message.chat_id)
        if isinstance(result, Failure):
            log.warning(f"failed: {result.reason}")
            text = f"{result.partial_text}\n\n{result.reason}" if result.partial_text else result.reason
            self.store.fail(message.message_id, result.reason, text, card)
        else:
            self.store.answer(message.message_id, result.text, result.cost_usd, result.duration_ms, card)
            log.info(f"answered ({len(result.text)} chars, cost {result.cost_usd}, {result.duration_ms} ms)")
        self._outbox_wakeup.set()

    async def _turn(self, message: MessageRecord, display: TurnDisplay, log: Logger) -> Answer | Failure:
        chat = resolve_chat(self.settings, message.chat_id)
        paths = layout.chat_paths(self.settings.data_dir, chat)
        if message.state is State.RUNNING and message.turn:
            log.info(f"following turn {message.turn}, started before a restart")
            container = await self.runtime.inspect(self.store.chat(message.chat_id).container_name)
            files = turns.turn_files(paths, message.turn, TURNS_PATH)
            return await self._follow(message, container, files, display, log)
        for attempt in (1, 2):
            session_id = self.store.chat(message.chat_id).session_id
            result = await self._start_turn(message, chat, paths, f"{message.id}-{attempt}", session_id,
                                            display, log)
            if not (isinstance(result, Failure) and result.unknown_session and session_id):
                return result
            log.warning(f"session {session_id} is gone; starting a new one")
            self.store.set_session(message.chat_id, None)
            self.store.mark_queued(message.message_id, f"session {session_id} was not found; started a new one")
            self.store.say(message.chat_id, "The previous conversation could not be found, so this answer starts "
                                            "a new one.", reply_to=message.message_id)
            self._outbox_wakeup.set()
        return result

    async def _start_turn(self, message: MessageRecord, chat: ChatSettings, paths: layout.ChatPaths, turn: str,
                          session_id: str | None, display: TurnDisplay, log: Logger) -> Answer | Failure:
        container = await self._container(chat, paths, message.chat_id)
        files = turns.turn_files(paths, turn, TURNS_PATH)
        turns.write_prompt(files, message.text, self.settings.agent.uid)
        self.store.mark_running(message.message_id, turn)
        argv = [RUN_TURN, files.container_dir, *agent.turn_argv(self.settings.agent, session_id)]
        await self.runtime.start_process(container.id, argv, dict(self.settings.agent.env), self.agent_user)
        log.info(f"turn {turn} started in {container.name}" + (f", resuming {session_id}" if session_id else ""))
        return await self._follow(message, container, files, display, log)

    async def _container(self, chat: ChatSettings, paths: layout.ChatPaths, chat_id: str) -> ContainerState:
        layout.prepare(paths, self.settings.agent.uid)
        record = self.store.chat(chat_id)
        spec = container_spec(self.settings, chat, paths, record.name)
        container = await self.runtime.ensure(spec)
        if container.id != record.container_id:
            logger.bind(chat_id=chat_id).info(f"container {container.name} is {container.id[:12]}")
            self.store.set_container(chat_id, container.name, container.id)
        return container

    async def _follow(self, message: MessageRecord, container: ContainerState, files: turns.TurnFiles,
                      display: TurnDisplay, log: Logger) -> Answer | Failure:
        """Read the turn's output as it grows until the CLI ends, goes silent, or its container stops."""
        turn = self.running[message.chat_id] = RunningTurn(message.message_id, container.id, files)
        loop = asyncio.get_running_loop()
        transcript = Transcript()
        reader = turns.OutputReader(files.output)
        idle_timeout = self.settings.agent.idle_timeout
        last_output = last_check = loop.time()
        while True:
            exit_code = files.exit_code()  # before reading: once it is there, the output is complete
            lines = reader.rest() if exit_code is not None else reader.new_lines()
            if lines:
                last_output = loop.time()
                await self._take(lines, transcript, message, display, log)
            if exit_code is not None:
                if turn.stop_requested:
                    return Failure("Stopped at your request.", partial_text=transcript.text_so_far)
                return agent.outcome(transcript, exit_code, files.stderr())
            if loop.time() - last_output > idle_timeout:
                await self._kill(turn)
                return Failure(f"Claude Code produced no output for {idle_timeout:g} seconds and was stopped.",
                               partial_text=transcript.text_so_far)
            if loop.time() - last_check > CONTAINER_CHECK_SECONDS:
                last_check = loop.time()
                state = await self.runtime.inspect(container.name)
                if not state.running and files.exit_code() is None:
                    return Failure(_stopped_reason(state), partial_text=transcript.text_so_far)
            await asyncio.sleep(POLL_SECONDS)

    async def _take(self, lines: list[str], transcript: Transcript, message: MessageRecord, display: TurnDisplay,
                    log: Logger) -> None:
        texts_before = len(transcript.texts)
        for line in lines:
            for event in agent.parse_line(line):
                transcript.add(event)
                match event:
                    case Init(session_id=session_id) if session_id:
                        if self.store.chat(message.chat_id).session_id != session_id:
                            self.store.set_session(message.chat_id, session_id)
                            log.info(f"session {session_id}")
                    case ToolUse(name=name):
                        log.info(f"tool {name}")
                    case Unparsed(line=text):
                        log.warning(f"CLI printed a line that is not stream-json: {text[:200]}")
                    case Text():
                        pass
        if len(transcript.texts) > texts_before:
            await display.update(transcript.text_so_far)

    async def _signal(self, turn: RunningTurn, sig: str) -> None:
        pid = turn.files.pid()
        if pid is not None:
            with contextlib.suppress(RuntimeFailure):
                await self.runtime.run(turn.container_id, ["kill", f"-{sig}", str(pid)], self.agent_user)

    async def _kill(self, turn: RunningTurn) -> None:
        """SIGTERM to the hung CLI, SIGKILL if it is still there after a grace period."""
        loop = asyncio.get_running_loop()
        for sig, grace in (("TERM", KILL_GRACE_SECONDS), ("KILL", 0.0)):
            await self._signal(turn, sig)
            deadline = loop.time() + grace
            while turn.files.exit_code() is None and loop.time() < deadline:
                await asyncio.sleep(POLL_SECONDS)
            if turn.files.exit_code() is not None:
                return

    # ---- delivering ----

    async def _deliver_forever(self) -> None:
        """Send what the outbox holds, in order per chat, chats in parallel; retry what fails."""
        while True:
            by_chat: dict[str, list[OutboxRecord]] = defaultdict(list)
            for item in self.store.due_outbox():
                by_chat[item.chat_id].append(item)
            await asyncio.gather(*(self._deliver_chat(items) for items in by_chat.values()))
            self._outbox_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_wakeup.wait(), OUTBOX_POLL_SECONDS)

    async def _deliver_chat(self, items: list[OutboxRecord]) -> None:
        for item in items:
            log = logger.bind(chat_id=item.chat_id, message_id=item.reply_to or "-")
            try:
                await self.channel.deliver(Outgoing(item.chat_id, item.text, item.key, item.reply_to, item.card))
            except DeliveryFailed as exc:
                if exc.permanent:
                    log.error(f"giving up on outbox item {item.id}: {exc}")
                    self.store.mark_dead(item, str(exc))
                    continue
                delay = exc.retry_after or min(MAX_RETRY_DELAY, 2.0 ** (item.attempts + 1))
                log.warning(f"delivery of outbox item {item.id} failed ({exc}); retrying in {delay:.1f} s")
                self.store.mark_retry(item, str(exc), delay)
                return  # later items of this chat wait, so the chat sees them in order
            self.store.mark_sent(item)
            log.info(f"delivered outbox item {item.id}" + (" (answer)" if item.message_id else ""))


COMMANDS = {"/help": Service._help, "/new": Service._new, "/stop": Service._stop, "/status": Service._status}


def _stopped_reason(state: ContainerState) -> str:
    if state.oom_killed:
        return "The chat's container ran out of memory and was stopped by the kernel during this turn."
    if state.status == "missing":
        return "The chat's container was removed during this turn."
    return f"The chat's container stopped during this turn ({state.status}, exit code {state.exit_code})."
