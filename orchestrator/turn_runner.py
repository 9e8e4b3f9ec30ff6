"""One agent turn: the chat's container made ready, the turn's request written for the agent host in it, its
output followed to the end. No `docker exec` per turn: the agent host (the container's main process, see
orchestrator/agent_host.py) keeps the chat's CLI between turns and takes each request from the chat's input folder.

The turn's process is not ours (it is the agent host's child and writes into the chat's turns folder), so a
turn that was running when the orchestrator stopped is followed again by the next one: `run` sees a message
already in the running state and reads the same files.

The service talks to this module only through `TurnRunner`'s public methods: run a message's turn, stop (/stop)
or interrupt (shutdown) turns, note an OOM kill, and ask which chats are running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger

from orchestrator import agent, agent_host, budgets, credentials, disk, files_out, inbox, layout, model_socket, turns
from orchestrator.agent import Answer, Failure, Init, Text, ToolUse, Transcript, Unparsed
from orchestrator.approvals import MAX_ASKS_PER_TURN, Approvals, FollowedTurn
from orchestrator.channels import AttachmentRefused, TurnDisplay
from orchestrator.config import ChatSettings, Settings, resolve_chat
from orchestrator.egress import proxied
from orchestrator.masking import Masker
from orchestrator.runtime import ContainerState, Runtime, RuntimeFailure, container_spec
from orchestrator.states import State
from orchestrator.store import ApprovalRecord, ChatRecord, MessageRecord, Store
from orchestrator.untrusted import excerpt

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from loguru import Logger

POLL_SECONDS = 0.1
FIRST_POLL_SECONDS = 0.005  # right after output, look again soon: a hot CLI's next line (or its result) is close
POLL_GROWTH = 1.3
CONTAINER_CHECK_SECONDS = 2.0
# After a stop request, before our own SIGKILL: the host's SIGTERM and its SIGKILL STOP_KILL_SECONDS later, plus
# its rescan of the input folder (shared storage sends no inotify event) and the exit code's write.
KILL_GRACE_SECONDS = agent_host.STOP_KILL_SECONDS + 3.0
CLAIM_SECONDS = 10.0  # after a restart, how long a running container's agent host gets to take a pending request
INTERRUPT_GRACE_SECONDS = 5.0  # after an interrupt request, before the fallback: SIGINT to the CLI
INTERRUPTED_BY_RESTART = ("This answer was interrupted because the bot is restarting. Send your message again "
                          "to continue where it stopped.")
UNPARSED_LOGGED = 3  # lines of a turn that are not stream-json, logged (as excerpts); the rest are counted
TOOLS_LOGGED = 20  # tool calls of a turn whose names are logged
YIELD_EVERY_LINES = 2000  # lines parsed between two yields to the event loop (~7 ms)
DISK_FULL = ("The bot's disk is nearly full, so no new answer can start now; the operators are told in the "
             "log. Please try again later.")


@dataclass
class _RunningTurn:
    """A turn being followed; owned by the runner, changed only through its methods."""

    message_id: str
    container_id: str
    container_name: str
    files: turns.TurnFiles
    stopped_by_user: bool = False  # /stop
    interrupted: bool = False  # a shutdown that could not wait for it
    oom: bool = False  # the kernel killed a process of this chat's container for memory meanwhile


class TurnRunner:
    def __init__(self, settings: Settings, store: Store, runtime: Runtime, approvals: Approvals, fetch: inbox.Fetch,
                 on_container_started: Callable[[str], Awaitable[None]]) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.approvals = approvals
        self.fetch = fetch  # a message's files, from its channel
        self.on_container_started = on_container_started
        self._secret: bytes | None = None
        self._mask = Masker(settings.secrets)  # an answer written as a file is masked as its text is
        self._running: dict[str, _RunningTurn] = {}  # by chat id
        self._disk: dict[str, disk.Measurement] = {}  # by chat id: the latest measurement of its folders
        self._fallbacks: dict[str, asyncio.Task[None]] = {}  # by chat id: a /stop's SIGINT fallback under way

    @property
    def agent_user(self) -> str:
        return f"{self.settings.agent.uid}:{self.settings.agent.uid}"

    # ---- the API the service uses ----

    def running_chats(self) -> set[str]:
        """Chats whose turn is being followed now."""
        return set(self._running)

    def running_message(self, chat_id: str) -> str | None:
        """The message id of the chat's running turn, or None."""
        turn = self._running.get(chat_id)
        return turn.message_id if turn else None

    def running_turn_names(self) -> set[str]:
        return {turn.files.name for turn in self._running.values()}

    def note_oom(self, chat_id: str) -> None:
        """The kernel killed a process of the chat's container for memory: the turn's answer says so."""
        turn = self._running.get(chat_id)
        if turn is not None:
            turn.oom = True

    async def stop(self, chat_id: str) -> str | None:
        """/stop: interrupt the chat's turn through the control protocol (the CLI keeps what it had and the session
        goes on); the id of the message it was answering, or None when nothing runs. Returns at once: the
        SIGINT fallback, if the host does not answer, runs in the background."""
        turn = self._running.get(chat_id)
        if turn is None:
            return None
        turn.stopped_by_user = True
        await asyncio.to_thread(turns.request_interrupt, turn.files)
        if chat_id not in self._fallbacks:  # a second /stop of the same turn: the first one's fallback is under way
            fallback = self._fallbacks[chat_id] = asyncio.create_task(self._unless_ended(turn))
            fallback.add_done_callback(lambda _: self._fallbacks.pop(chat_id, None))
        return turn.message_id

    async def _after_fallback(self, chat_id: str) -> None:
        """The chat's /stop fallback, if one is under way, finished first: its SIGINT by `docker exec` could reach
        the hot CLI as it took this turn's request, had the stopped turn ended meanwhile."""
        pending = self._fallbacks.get(chat_id)
        if pending is not None:
            await asyncio.wait({pending})

    async def interrupt_all(self) -> list[str]:
        """Shutdown: interrupt every running turn, and SIGINT those whose host did not answer; their message ids."""
        running = list(self._running.values())
        for turn in running:
            turn.interrupted = True
            await asyncio.to_thread(turns.request_interrupt, turn.files)
        await asyncio.gather(*(self._unless_ended(turn) for turn in running))
        return [turn.message_id for turn in running]

    async def _unless_ended(self, turn: _RunningTurn) -> None:
        """After an interrupt request: if the turn has not ended within a grace period (the agent host did not
        answer), SIGINT to the CLI, which ends the turn the same way; if even that fails (a stopped host), the
        container is stopped, which ends the turn's follow."""
        if await self._ended_within(turn, INTERRUPT_GRACE_SECONDS):
            return
        logger.bind(message_id=turn.message_id).warning("the agent host did not interrupt the turn; SIGINT")
        await self._signal(turn, "INT")
        if not await self._ended_within(turn, KILL_GRACE_SECONDS):
            await self._stop_container(turn, "the turn did not end after SIGINT")

    # ---- one message's turn ----

    async def run(self, message: MessageRecord, display: TurnDisplay, log: Logger) -> Answer | Failure:
        return self._priced(message, await self._with_files(message, await self._run(message, display, log), log))

    async def _with_files(self, message: MessageRecord, result: Answer | Failure, log: Logger) -> Answer | Failure:
        """An answer with the files the agent left in its outbox (and itself as a file when it is long)."""
        if isinstance(result, Failure):
            return result
        chat = resolve_chat(self.settings, message.chat_id)
        paths = layout.chat_paths(self.settings, chat)
        assert result.turn, "an answer comes from a turn"
        sending = await asyncio.to_thread(files_out.take, paths, self.settings.agent.uid, result.turn, result.text,
                                          self.settings.files, self.settings.limits.min_free_disk, self._mask)
        for file, _ in sending.files:
            log.info(f"sending {file.kind} {file.name} ({file.size} bytes) after the answer")
        return dataclasses.replace(result, text=sending.text, files=sending.files)

    async def _run(self, message: MessageRecord, display: TurnDisplay, log: Logger) -> Answer | Failure:
        chat = resolve_chat(self.settings, message.chat_id)
        paths = layout.chat_paths(self.settings, chat)
        try:
            if message.state is State.RUNNING and message.turn:
                files = turns.turn_files(paths, message.turn, self.settings.agent.uid)
                if await self._taken_before(message, files, log):
                    log.info(f"following turn {message.turn}, started before a restart")
                    container = await self.runtime.inspect(self.store.chat(message.chat_id).container_name)
                    return self._stopped_by_budget(message, await self._follow(message, container, files, display, log),
                                                   log)
                log.info(f"turn {message.turn} was never taken before the restart; starting it now")
            refusal = await self._disk_refusal(chat, paths, log) or self._budget_refusal(message, log)
            if refusal is not None:
                return refusal
            return self._stopped_by_budget(message, await self._start(message, chat, paths, display, log), log)
        except RuntimeFailure as exc:
            log.error(f"container failure: {exc}")
            return Failure("The chat's container could not be started; the operators have the details in the log.",
                           detail=str(exc))

    async def _taken_before(self, message: MessageRecord, files: turns.TurnFiles, log: Logger) -> bool:
        """Whether the agent host took the turn that was recorded before a restart, so it must be followed, not run
        again. A request still pending in a running container gets CLAIM_SECONDS to be taken; then it is withdrawn
        (and looked at once more: the host may have taken it just before)."""
        if files.started():
            return True
        if files.requested():
            container = await self.runtime.inspect(self.store.chat(message.chat_id).container_name)
            if container.running:
                await _within(CLAIM_SECONDS, files.started)
            if not files.started():
                log.info(f"turn {files.name} was not taken; withdrawing its request")
                await asyncio.to_thread(turns.withdraw, files)
                # Taken at that very moment? The host then either read the request (and writes the CLI's pid) or
                # found it gone (and ends the turn WITHDRAWN at once).
                if files.started():
                    await _within(CLAIM_SECONDS, lambda: files.pid() is not None or files.exit_code() is not None)
        return files.started() and files.exit_code() != agent_host.WITHDRAWN

    async def _start(self, message: MessageRecord, chat: ChatSettings, paths: layout.ChatPaths, display: TurnDisplay,
                     log: Logger) -> Answer | Failure:
        conversation = chat.options.conversation(message.thread_id)
        await self._after_fallback(message.chat_id)
        for attempt in (1, 2):
            record, session_id = self.store.chat_and_session(message.chat_id, conversation)
            container = await self._container(chat, paths, record)
            files = turns.turn_files(paths, turns.new_turn_name(message.id, attempt), self.settings.agent.uid)
            self.store.start_turn(message.message_id, files.name)  # before the request: a restart follows this one
            refused = await self._request(message, chat, files, session_id, log)
            if refused is not None:
                return refused
            log.info(f"turn {files.name} requested in {container.name}"
                     + (f", resuming {session_id}" if session_id else ""))
            result = await self._follow(message, container, files, display, log)
            if isinstance(result, Failure) and files.hit_process_limit():
                # Processes left over (a turn's background jobs, a fork bomb) fill the cap: restarting the
                # container ends them; its state is in the mounts. A turn that could not even start is retried.
                log.warning("the container's process limit refused processes; restarting the container")
                await self.runtime.stop(container.name, self.settings.containers.stop_timeout)
                if attempt == 1 and not files.has_output():
                    continue
                result = Failure(f"This chat's container reached its limit of {chat.options.pids_limit} processes, "
                                 f"so new ones were refused; it was restarted to clear them. {result.reason}",
                                 partial_text=result.partial_text)
            if not (isinstance(result, Failure) and result.unknown_session and session_id):
                return result
            log.warning(f"session {session_id} is gone; starting a new one")
            self.store.set_session(message.chat_id, None, conversation)
            self.store.mark_queued(message.message_id, f"session {session_id} was not found; started a new one")
            self.store.say(message.chat_id, "The previous conversation could not be found, so this answer starts "
                                            "a new one.", reply_to=message.message_id)
        return result

    async def _request(self, message: MessageRecord, chat: ChatSettings, files: turns.TurnFiles,
                       session_id: str | None, log: Logger) -> Failure | None:
        """The turn's request (and its message's files) written for the agent host; a Failure when a file cannot be
        had. Its own function: the files and the request (megabytes of base64 images) are not kept while the turn
        is followed."""
        try:
            with logger.contextualize(chat_id=message.chat_id):  # the channel's download lines name the chat
                inbound = await inbox.prepare(message, files.name, self.settings.files, self.fetch)
        except AttachmentRefused as exc:
            log.warning(f"a file of the message could not be had: {excerpt(str(exc))}")
            return Failure(f"No answer could start: a file could not be read ({exc}).")
        request = agent_host.encode_request(agent.cli_argv(self.settings.agent, chat.options),
                                            dict(self.settings.agent.env), session_id, inbound.text,
                                            self.settings.agent.hot_idle, inbound.files, inbound.images)
        await asyncio.to_thread(_write_turn, files, inbound.contents, request)
        return None

    async def _container(self, chat: ChatSettings, paths: layout.ChatPaths, record: ChatRecord) -> ContainerState:
        chat_id = record.chat_id
        layout.prepare(paths, self.settings.agent.uid)
        model_socket.prepare_chat(self.settings, chat_id, proxied(chat.options))
        if self._secret is None:
            self._secret = credentials.load_or_make_secret(layout.secret_path(self.settings))
        container = await self.runtime.ensure(container_spec(self.settings, chat, paths, self._secret, record.name))
        await model_socket.wait_served(self.settings, chat_id)
        if container.id != record.container_id:
            logger.bind(chat_id=chat_id).info(f"container {container.name} is {container.id[:12]}")
            self.store.set_container(chat_id, container.name, container.id)
        await self.on_container_started(chat_id)
        return container

    async def _follow(self, message: MessageRecord, container: ContainerState, files: turns.TurnFiles,
                      display: TurnDisplay, log: Logger) -> Answer | Failure:
        """Read the turn's output as it grows until the turn ends, goes silent, its container stops, or it passes
        a limit (its output, its chat's disk budget). Afterwards its request is withdrawn: nothing takes it later;
        unless following it was cancelled, which leaves it to the next start."""
        turn = self._running[message.chat_id] = _RunningTurn(message.message_id, container.id, container.name, files)
        limits = self.settings.limits
        reader = turns.OutputReader(files, limits.line_bytes, limits.output_bytes)
        asking = FollowedTurn(message.chat_id, message, files) if resolve_chat(
            self.settings, message.chat_id).options.asks_approval else None
        left = False  # cancelled (a stop that leaves the turn running, a lost leadership): as after a kill -9, the
        # next start follows the turn, and its request, interrupt and decisions must still be there for its host
        try:
            result = await self._follow_output(turn, message, container, reader, display, log, asking)
        except asyncio.CancelledError:
            left = True
            raise
        finally:
            reader.close()
            del self._running[message.chat_id]
            if not left:
                await asyncio.to_thread(turns.withdraw, files)
            if reader.skipped_lines:
                log.warning(f"skipped {reader.skipped_lines} output line(s) over {limits.line_bytes} bytes")
            if turn.oom:
                log.warning("a process of the chat's container was killed for memory during the turn")
        # Only a turn that ended closes its approvals: one left for the next start (a shutdown that keeps the
        # containers, a store that refused a write) still waits in its container, and its card must still work.
        if asking is not None:
            await self._end_approvals(asking, log)
        return result

    async def _follow_output(self, turn: _RunningTurn, message: MessageRecord, container: ContainerState,
                             reader: turns.OutputReader, display: TurnDisplay, log: Logger,
                             asking: FollowedTurn | None) -> Answer | Failure:
        loop = asyncio.get_running_loop()
        files = turn.files
        transcript = Transcript(answer_bytes=self.settings.limits.answer_bytes)
        unparsed = [0]
        idle_timeout = self.settings.agent.idle_timeout
        began = last_output = last_check = last_disk = looked = loop.time()
        poll = FIRST_POLL_SECONDS
        waiting_note = ""
        while True:
            if asking is not None:
                # Time spent waiting for a person counts as neither silence nor the turn's work: both clocks stop.
                waiting = await self.approvals.follow(asking)
                if waiting:
                    pause = loop.time() - looked
                    began, last_output = began + pause, max(last_output, loop.time())
                if asking.flooded:
                    await self.kill(turn)
                    return Failure(f"This answer was stopped: it made more than {MAX_ASKS_PER_TURN} permission "
                                   "requests.", partial_text=transcript.text_so_far)
                note = _waiting_note(waiting)
                if note != waiting_note:
                    waiting_note = note
                    await display.update(transcript.text_so_far + note)
                looked = loop.time()
            exit_code = files.exit_code()  # before reading: once it is there, the output is complete
            offset = reader.offset
            lines = reader.new_lines()  # one chunk: a turn that ended with much unread is taken chunk by chunk
            drained = exit_code is not None and reader.offset == offset
            if drained:
                lines += reader.rest()  # what follows the last newline
            if lines:
                last_output = loop.time()
                poll = FIRST_POLL_SECONDS
                await self._take(lines, transcript, message, display, log, unparsed)
            if exit_code is not None and not drained:
                continue
            # Before the turn's end: a turn whose output passed the cap ended unread past it (its result line
            # among what was not read), whether it ended before the reader got there or not.
            if reader.over_limit:
                await self.kill(turn)
                much = (f"{turns.MAX_LINES:,} lines" if reader.too_many_lines
                        else disk.human(self.settings.limits.output_bytes))
                return Failure(f"This answer was stopped: Claude Code wrote more than {much} of output in one turn.",
                               partial_text=transcript.text_so_far)
            if exit_code == agent_host.ABANDONED:  # the next container's host found it never ended
                log.warning(f"turn {files.name} was left unfinished by the chat's last container")
                return self._ending(turn, Failure(RESTARTED_MID_TURN, partial_text=transcript.text_so_far), transcript)
            if exit_code is not None:
                stderr = files.stderr()
                result = self._ending(turn, agent.outcome(files.name, transcript, exit_code, stderr), transcript)
                if isinstance(result, Failure) and result.detail:
                    log.warning(f"the CLI said: {excerpt(result.detail, 300)}")
                return result
            if loop.time() - began > self.settings.agent.turn_timeout:
                await self.kill(turn)
                return Failure(f"This answer was stopped: it took longer than {self.settings.agent.turn_timeout:g} "
                               "seconds (agent.turn_timeout).", partial_text=transcript.text_so_far)
            if loop.time() - last_output > idle_timeout:
                await self.kill(turn)
                return Failure(f"Claude Code produced no output for {idle_timeout:g} seconds and was stopped.",
                               partial_text=transcript.text_so_far)
            if loop.time() - last_disk > self.settings.limits.disk_check_interval:
                last_disk = loop.time()
                over = await self._over_budget(message.chat_id, files.paths, fresh=True)
                if over is not None:
                    log.warning(f"over its disk budget: {over}; stopping the turn and the container")
                    await self.kill(turn)
                    await self.runtime.stop(container.name, self.settings.containers.stop_timeout)
                    return Failure(f"This answer was stopped: {over}", partial_text=transcript.text_so_far)
            if loop.time() - last_check > CONTAINER_CHECK_SECONDS:
                last_check = loop.time()
                state = await self.runtime.inspect(container.name)
                # Another container runs now (Swarm moved the chat's task off a drained or lost node, or it was made
                # again): the turn's CLI went with the old one, and the new agent host does not take it up.
                if (not state.running or state.id != container.id) and files.exit_code() is None:
                    reason = self._memory_note(message.chat_id) if state.oom_killed else _stopped_reason(state)
                    return Failure(reason, partial_text=transcript.text_so_far)
            await self._pause(poll, asking)
            poll = min(POLL_SECONDS, poll * POLL_GROWTH)

    async def _pause(self, seconds: float, asking: FollowedTurn | None) -> None:
        """Until the next look at the turn: `seconds`, or less when a decision for the chat came (a click)."""
        if asking is None:
            await asyncio.sleep(seconds)
            return
        wake = self.approvals.wakeup(asking.chat_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()
        wake.clear()

    async def _end_approvals(self, asking: FollowedTurn, log: Logger) -> None:
        """What still waits is cancelled and the cards show how each request ended; a failure here is logged, never
        raised over the turn's answer."""
        try:
            await self.approvals.end_turn(asking)
        except Exception as exc:
            log.opt(exception=exc).error(f"the turn's approvals could not be closed: {exc!r}")

    # ---- budgets ----

    def _budget_refusal(self, message: MessageRecord, log: Logger) -> Failure | None:
        """Why no turn may start for the chat or its sender: a budget is spent."""
        refused = budgets.refusal(self.settings, self.store, message.chat_id, message.sender_id)
        if refused is None:
            return None
        log.warning(f"refusing a turn: the {refused.scope} budget is spent")
        return Failure(refused.text)

    def _priced(self, message: MessageRecord, result: Answer | Failure) -> Answer | Failure:
        """An answer's cost as the gateway priced its model requests (the CLI's own figure is an estimate whose
        meaning changes between versions), and its footer."""
        if isinstance(result, Failure):
            return result
        text = result.text
        if self.settings.budgets.footer:
            text += "\n\n" + budgets.footer(self.settings, self.store, message.message_id, message.chat_id)
        return dataclasses.replace(result, text=text, cost_usd=budgets.turn_cost_usd(self.store, message.message_id))

    def _stopped_by_budget(self, message: MessageRecord, result: Answer | Failure, log: Logger) -> Answer | Failure:
        """A turn that ended in an error after crossing a budget was stopped by the gateway, which refused its next
        model request: say so, rather than the CLI's words for the refusal."""
        if isinstance(result, Answer):
            return result
        refused = budgets.refusal(self.settings, self.store, message.chat_id, message.sender_id)
        if refused is None:
            return result
        log.warning(f"the turn was stopped: the {refused.scope} budget is spent")
        return Failure(f"This answer was stopped: {refused.text}", partial_text=result.partial_text)

    # ---- disk ----

    async def _disk_refusal(self, chat: ChatSettings, paths: layout.ChatPaths, log: Logger) -> Failure | None:
        """Why no turn may start now for lack of disk: the host's is nearly full, or the chat is over budget."""
        low = await self.low_disk()
        if low is not None:
            log.error(f"refusing a turn: {low}")
            return Failure(DISK_FULL)
        over = await self._over_budget(chat.chat_id, paths, fresh=False)
        if over is not None:
            log.warning(f"refusing a turn: {over}")
            return Failure(f"No answer can start: {over} An operator can raise the budget or free space.")
        return None

    async def low_disk(self) -> str | None:
        """Why the disk of data_dir or chats_dir is too full for any turn (below limits.min_free_disk), or None."""
        floor = self.settings.limits.min_free_disk
        folders = sorted({self.settings.data_dir, self.settings.chats_dir})
        frees = await asyncio.to_thread(lambda: [disk.free_bytes(where) for where in folders])  # one thread hop
        for where, free in zip(folders, frees, strict=True):
            if free < floor:
                return f"{disk.human(free)} free on the disk of {where} (limits.min_free_disk is {disk.human(floor)})"
        return None

    async def _over_budget(self, chat_id: str, paths: layout.ChatPaths, fresh: bool) -> str | None:
        """Why the chat's folders are over its disk budget, or None. Measured again unless a measurement is
        newer than limits.disk_check_interval (and `fresh` is not asked)."""
        budget = resolve_chat(self.settings, chat_id).options.disk
        latest = self._disk.get(chat_id)
        age = asyncio.get_running_loop().time() - latest.at if latest else float("inf")
        over = latest is not None and (latest.exhausted_entries or latest.used > budget)
        if fresh or over or age > self.settings.limits.disk_check_interval:  # "over" is never taken on trust
            latest = self._disk[chat_id] = await asyncio.to_thread(disk.measure, paths.agent_folders())
        if latest.too_deep:
            return f"this chat's folders are nested more than {disk.MAX_DEPTH} levels deep."
        if latest.exhausted_entries:
            return f"this chat's folders hold more than {disk.MAX_ENTRIES:,} files."
        if latest.used > budget:
            return f"this chat's files take {disk.human(latest.used)}, over its disk budget of {disk.human(budget)}."
        return None

    async def check_disk(self, chat_id: str) -> str | None:
        """For housekeeping: a fresh measurement of a chat's folders against its budget."""
        chat = resolve_chat(self.settings, chat_id)
        return await self._over_budget(chat_id, layout.chat_paths(self.settings, chat), fresh=True)

    def _ending(self, turn: _RunningTurn, result: Answer | Failure, transcript: Transcript) -> Answer | Failure:
        """What the user is told, given why the turn ended."""
        if turn.interrupted:
            return Failure(INTERRUPTED_BY_RESTART, partial_text=transcript.text_so_far)
        if turn.stopped_by_user:
            return Failure("Stopped at your request.", partial_text=transcript.text_so_far)
        if turn.oom:
            note = self._memory_note(self.store.message(turn.message_id).chat_id)
            if isinstance(result, Failure):
                return Failure(note, partial_text=result.partial_text)
            return dataclasses.replace(result, text=f"{result.text}\n\n({note})")
        return result

    def _memory_note(self, chat_id: str) -> str:
        memory = resolve_chat(self.settings, chat_id).options.memory // (1024 * 1024)
        return (f"A process in this chat's container ran out of memory (its limit is {memory} MiB) and was "
                "stopped by the kernel.")

    async def _take(self, lines: list[str], transcript: Transcript, message: MessageRecord, display: TurnDisplay,
                    log: Logger, unparsed: list[int]) -> None:
        # The output is the agent's to write: a read may hold 70,000 forged lines. Nothing here may cost the event
        # loop more than parsing them: the session id is stored once per read, a few tool names are logged.
        texts_before, session_before = len(transcript.texts), transcript.session_id
        for number, line in enumerate(lines):
            if number % YIELD_EVERY_LINES == YIELD_EVERY_LINES - 1:
                await asyncio.sleep(0)  # other chats go on: a chunk of forged 3-byte lines takes ~1 s to parse
            for event in agent.parse_line(line):
                transcript.add(event)
                match event:
                    case ToolUse(name=name) if transcript.tools_used <= TOOLS_LOGGED:
                        log.info(f"tool {excerpt(name, 60)}")
                    case Unparsed(line=text):
                        unparsed[0] += 1
                        if unparsed[0] <= UNPARSED_LOGGED:
                            log.warning(f"CLI printed a line that is not stream-json: {excerpt(text)}")
                    case Init() | Text() | ToolUse():
                        pass
        session_id = transcript.session_id
        conversation = resolve_chat(self.settings, message.chat_id).options.conversation(message.thread_id)
        if session_id and session_id != session_before \
                and self.store.session(message.chat_id, conversation) != session_id:
            self.store.set_session(message.chat_id, session_id, conversation)
            log.info(f"session {session_id}" + (f" (topic {conversation})" if conversation else ""))
        if len(transcript.texts) > texts_before:
            await display.update(transcript.text_so_far)

    async def _signal(self, turn: _RunningTurn, sig: str) -> None:
        """A signal to the turn's CLI (a fallback: one `docker exec` of kill, never on a turn's normal path), unless
        the turn has ended: its CLI, hot, may then be answering the next turn when the signal lands."""
        pid = turn.files.pid()
        if pid is not None and turn.files.exit_code() is None:
            with contextlib.suppress(RuntimeFailure):
                await self.runtime.run(turn.container_id, ["kill", f"-{sig}", str(pid)], self.agent_user)

    async def kill(self, turn: _RunningTurn) -> None:
        """The agent host ends the turn's CLI (SIGTERM, SIGKILL 2 s later) and the turn with it; if the turn has not
        ended after a grace period (the host stopped or wedged), SIGKILL from here, then the container stopped: no
        turn holds its slot for ever. The host, not a signal from here, does it first: only the host knows whether
        the turn is still in progress. (A fault-suite flood turn ended just as the runner saw it pass the output cap;
        the SIGTERM sent then reached the hot CLI as it took the chat's next turn, which ended with exit code 143.)"""
        await asyncio.to_thread(turns.request_stop, turn.files)
        if await self._ended_within(turn, KILL_GRACE_SECONDS):
            return
        logger.bind(message_id=turn.message_id).warning(
            f"the agent host did not stop the turn within {KILL_GRACE_SECONDS:g} s; SIGKILL by docker exec where it "
            "reaches the container, else the container stopped")
        await self._signal(turn, "KILL")
        if await self._ended_within(turn, KILL_GRACE_SECONDS):
            return
        await self._stop_container(turn, "the turn did not end after SIGKILL")

    @staticmethod
    async def _ended_within(turn: _RunningTurn, seconds: float) -> bool:
        return await _within(seconds, lambda: turn.files.exit_code() is not None)

    async def _stop_container(self, turn: _RunningTurn, why: str) -> None:
        logger.bind(message_id=turn.message_id).error(f"{why}; stopping the chat's container")
        with contextlib.suppress(RuntimeFailure):
            await self.runtime.stop(turn.container_name, self.settings.containers.stop_timeout)


def _write_turn(files: turns.TurnFiles, contents: dict[str, bytes], request: bytes) -> None:
    """The message's files, then the request that names them, in one thread hop: on the benchmark's busy machine each
    hop cost a warm turn's start about a millisecond (bench.swarm), a turn's start took four (now two)."""
    turns.write_inbound(files, contents)
    turns.write_request(files, request)


def _waiting_note(waiting: list[ApprovalRecord]) -> str:
    """What the answer's card says while the agent waits for people."""
    if not waiting:
        return ""
    tools = ", ".join(dict.fromkeys(approval.tool for approval in waiting))
    return f"\n\n⏳ Waiting for approval: {tools} (see the card below)"


async def _within(seconds: float, done: Callable[[], bool]) -> bool:
    """Whether `done()` holds within `seconds`, looked at every POLL_SECONDS."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    return done()


_NOT_AGAIN = "; this answer is not run again: please send it again if you still want it."
RESTARTED_MID_TURN = "The chat's container stopped during this turn and runs again now" + _NOT_AGAIN


def _stopped_reason(state: ContainerState) -> str:
    if state.status == "missing":
        return "The chat's container was removed during this turn."
    if state.running:
        return "The chat's container was replaced during this turn" + _NOT_AGAIN  # not where: no hostname
    if state.status == "created":  # on Swarm: its task is on its way to another node (its node drained or lost)
        return "The chat's container stopped during this turn and is being started again" + _NOT_AGAIN
    return f"The chat's container stopped during this turn ({state.status}, exit code {state.exit_code})."
