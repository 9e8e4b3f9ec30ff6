"""Wiring: messages from a channel, one worker per chat, turns in the chat's container, answers back.

Every step is a durable state change in the store first (received → queued → running → answered →
delivered, or failed), so a restarted service picks up where the last one stopped: `recover` re-queues
what was waiting, follows turns that are still running in their containers, and delivers answers that
were not yet delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING

from loguru import logger

from orchestrator import agent, layout, turns
from orchestrator.agent import Answer, Failure, Init, Text, ToolUse, Transcript, Unparsed
from orchestrator.channels import Channel, Incoming, Reply
from orchestrator.config import ChatSettings, Settings, resolve_chat
from orchestrator.ids import is_valid_chat_id
from orchestrator.runtime import TURNS_PATH, ContainerState, DockerRuntime, RuntimeFailure, container_spec
from orchestrator.states import State
from orchestrator.store import MessageRecord, Store

if TYPE_CHECKING:
    from loguru import Logger

POLL_SECONDS = 0.1
CONTAINER_CHECK_SECONDS = 2.0
KILL_GRACE_SECONDS = 5.0
RUN_TURN = "run-turn"  # in the agent image: keeps a turn's output in its turn folder


class Service:
    def __init__(self, settings: Settings, store: Store, runtime: DockerRuntime, channel: Channel) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.channel = channel
        self.queues: dict[str, asyncio.Queue[str]] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}

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
        channel_task = asyncio.create_task(self.channel.run(self.submit), name="channel")
        stop_task = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({channel_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if channel_task.done():
            channel_task.result()
            logger.info("input ended: finishing queued messages")
            await asyncio.wait({self._drained(), stop_task}, return_when=asyncio.FIRST_COMPLETED)
        channel_task.cancel()
        stop_task.cancel()
        busy = sum(1 for m in self.store.unfinished_messages() if m.state is State.RUNNING)
        if busy:
            logger.info(f"stopping with {busy} turn(s) still running in their containers; "
                        "the next start follows them and delivers their answers")
        for worker in self.workers.values():
            worker.cancel()
        await asyncio.gather(*self.workers.values(), return_exceptions=True)

    def _drained(self) -> asyncio.Task[None]:
        async def drained() -> None:
            for queue in list(self.queues.values()):
                await queue.join()

        return asyncio.create_task(drained(), name="drain")

    def recover(self) -> None:
        """Queue every unfinished message again, in arrival order per chat."""
        for message in self.store.unfinished_messages():
            logger.bind(chat_id=message.chat_id, message_id=message.message_id).info(
                f"recovered a {message.state} message")
            self._enqueue(message)

    async def submit(self, incoming: Incoming) -> None:
        log = logger.bind(chat_id=incoming.chat_id, message_id=incoming.message_id)
        if not is_valid_chat_id(incoming.chat_id):
            log.warning("rejected: not a valid chat id")
            return
        self.store.ensure_chat(incoming.chat_id, incoming.chat_name)
        message = self.store.record_received(incoming.message_id, incoming.chat_id, incoming.sender_id,
                                             incoming.text)
        if message is None:
            log.info("duplicate delivery ignored")
            return
        log.info("received")
        self._enqueue(message)

    def _enqueue(self, message: MessageRecord) -> None:
        if message.state is State.RECEIVED:
            self.store.mark_queued(message.message_id)
        queue = self.queues.get(message.chat_id)
        if queue is None:
            queue = self.queues[message.chat_id] = asyncio.Queue()
            self.workers[message.chat_id] = asyncio.create_task(
                self._worker(queue), name=f"chat {message.chat_id}")
        queue.put_nowait(message.message_id)

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

    # ---- one message ----

    async def _handle(self, message: MessageRecord) -> None:
        log = logger.bind(chat_id=message.chat_id, message_id=message.message_id)
        reply = self.channel.reply_to(message.chat_id, message.message_id)
        if message.state is State.ANSWERED:
            result: Answer | Failure = Answer(message.answer or "", None)
        else:
            try:
                result = await self._turn(message, reply, log)
            except RuntimeFailure as exc:
                log.error(f"container failure: {exc}")
                result = Failure(f"The chat's container could not be started ({exc}).")
            self.store.touch(message.chat_id)
        if isinstance(result, Failure):
            log.warning(f"failed: {result.reason}")
            self.store.mark_failed(message.message_id, result.reason)
            await reply.fail(result.reason)
            return
        if message.state is not State.ANSWERED:
            self.store.mark_answered(message.message_id, result.text, result.cost_usd, result.duration_ms)
            log.info(f"answered ({len(result.text)} chars, cost {result.cost_usd}, {result.duration_ms} ms)")
        await reply.finish(result.text)
        self.store.mark_delivered(message.message_id)
        log.info("delivered")

    async def _turn(self, message: MessageRecord, reply: Reply, log: Logger) -> Answer | Failure:
        chat = resolve_chat(self.settings, message.chat_id)
        paths = layout.chat_paths(self.settings.data_dir, chat)
        if message.state is State.RUNNING and message.turn:
            log.info(f"following turn {message.turn}, started before a restart")
            container = await self.runtime.inspect(self.store.chat(message.chat_id).container_name)
            return await self._follow(message, container, turns.turn_files(paths, message.turn, TURNS_PATH),
                                      reply, log)
        for attempt in (1, 2):
            session_id = self.store.chat(message.chat_id).session_id
            result = await self._start_turn(message, chat, paths, f"{message.id}-{attempt}", session_id,
                                            reply, log)
            if not (isinstance(result, Failure) and result.unknown_session and session_id):
                return result
            log.warning(f"session {session_id} is gone; starting a new one")
            self.store.set_session(message.chat_id, None)
            self.store.mark_queued(message.message_id, f"session {session_id} was not found; started a new one")
            await self.channel.notify(message.chat_id,
                                      "The previous conversation could not be found, so this answer starts a new one.")
        return result

    async def _start_turn(self, message: MessageRecord, chat: ChatSettings, paths: layout.ChatPaths, turn: str,
                          session_id: str | None, reply: Reply, log: Logger) -> Answer | Failure:
        container = await self._container(chat, paths, message.chat_id)
        files = turns.turn_files(paths, turn, TURNS_PATH)
        turns.write_prompt(files, message.text, self.settings.agent.uid)
        self.store.mark_running(message.message_id, turn)
        argv = [RUN_TURN, files.container_dir, *agent.turn_argv(self.settings.agent, session_id)]
        await self.runtime.start_process(container.id, argv, dict(self.settings.agent.env), self.agent_user)
        log.info(f"turn {turn} started in {container.name}" + (f", resuming {session_id}" if session_id else ""))
        return await self._follow(message, container, files, reply, log)

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
                      reply: Reply, log: Logger) -> Answer | Failure:
        """Read the turn's output as it grows until the CLI ends, goes silent, or its container stops."""
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
                await self._take(lines, transcript, message, reply, log)
            if exit_code is not None:
                return agent.outcome(transcript, exit_code, files.stderr())
            if loop.time() - last_output > idle_timeout:
                await self._kill(container, files)
                return Failure(f"Claude Code produced no output for {idle_timeout:g} seconds and was stopped.",
                               partial_text=transcript.text_so_far)
            if loop.time() - last_check > CONTAINER_CHECK_SECONDS:
                last_check = loop.time()
                state = await self.runtime.inspect(container.name)
                if not state.running and files.exit_code() is None:
                    return Failure(_stopped_reason(state), partial_text=transcript.text_so_far)
            await asyncio.sleep(POLL_SECONDS)

    async def _take(self, lines: list[str], transcript: Transcript, message: MessageRecord, reply: Reply,
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
            await reply.progress(transcript.text_so_far)

    async def _kill(self, container: ContainerState, files: turns.TurnFiles) -> None:
        """SIGTERM to the hung CLI, SIGKILL if it is still there after a grace period."""
        pid = files.pid()
        if pid is None:
            return
        for sig, wait in (("TERM", KILL_GRACE_SECONDS), ("KILL", 0.0)):
            with contextlib.suppress(RuntimeFailure):
                await self.runtime.run(container.id, ["kill", f"-{sig}", str(pid)], self.agent_user)
            deadline = asyncio.get_running_loop().time() + wait
            while files.exit_code() is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(POLL_SECONDS)
            if files.exit_code() is not None:
                return


def _stopped_reason(state: ContainerState) -> str:
    if state.oom_killed:
        return "The chat's container ran out of memory and was stopped by the kernel during this turn."
    if state.status == "missing":
        return "The chat's container was removed during this turn."
    return f"The chat's container stopped during this turn ({state.status}, exit code {state.exit_code})."
