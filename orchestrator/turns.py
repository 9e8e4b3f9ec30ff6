"""The files of one agent turn: the channel between the orchestrator and the agent host in the chat's container
(orchestrator/agent_host.py, where each file is described). The request is written by us where only root can
write; everything else is written inside the container, and so is hostile input:

<chat>/input/<turn>               the turn's request (the CLI's argv and env, the session, the user's text)
<chat>/input/<turn>.interrupt     our request to interrupt it
<chat>/input/<turn>.decision-<n>  our answer to its n-th permission request
<chat>/input/<turn>.files/        the files that came with its message (the host copies them into the workspace)
<chat>/turns/<turn>/pid           the CLI's pid inside the container
                    process       the id of the CLI process that answers it (the same across a hot CLI's turns)
                    output.jsonl  the CLI's stream-json output, read incrementally, with bounds
                    stderr        the CLI's stderr during the turn
                    exit_code     written last, when the turn has ended
                    ask-<n>       the CLI's n-th permission request (ask-<n>.cancelled: withdrawn)

A turn's name holds a random part, so the agent cannot plant the folder of a turn to come; and whatever it
does to the folder meanwhile, we open nothing in it by a path that follows a link (see `untrusted`).
The process writing them is not the orchestrator's child, so a turn and its answer survive a restart of
the orchestrator: the next one reads the same files. A request lives only while its turn may still be taken:
it is withdrawn (deleted) when we stop following the turn, so a container started later never runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from loguru import logger

from orchestrator import agent_host, untrusted
from orchestrator.layout import ChatPaths

STDERR_TAIL = 4096
READ_CHUNK = 1024**2  # output read per look: with the line cap, what one look can hold in memory
# Lines of one turn at most. A real turn writes one line per content block and tool result (hundreds, a few
# thousand for a long one); 3-byte forged lines cost ~3.5 µs each to parse, so this bounds a turn's parsing to ~1 s.
MAX_LINES = 200_000
ORPHAN_REQUEST_SECONDS = 3600.0  # a request never taken is kept this long, then pruned
# A permission request's file at most: a Write of a big file carries the whole file. Past it only the tool's name
# (written first by the host) is read, and the card says the input was too large to show.
MAX_ASK_BYTES = 2 * 1024**2
_ASK_HEAD = re.compile(rb'\{"tool": "([A-Za-z0-9_.:-]{1,100})"')
_REFUSALS_LOGGED: set[str] = set()  # turns whose refused output was logged
_Number = TypeVar("_Number", int, float)


def new_turn_name(message_row: int, attempt: int) -> str:
    name = f"{message_row}-{attempt}-{secrets.token_hex(8)}"
    assert agent_host.turn_order(name) is not None  # the agent host takes only names of this form
    return name


@dataclass(frozen=True)
class TurnFiles:
    name: str
    paths: ChatPaths
    uid: int  # the agent's: what it writes is owned by it, and anything else is refused

    @contextlib.contextmanager
    def folder(self) -> Iterator[int | None]:
        """The turn's folder, opened without following links; None while it is absent or not a folder."""
        try:
            with untrusted.directory(self.paths.turns) as turns:
                fd = untrusted.open_beneath(turns, self.name, self.uid, folder=True)
        except (FileNotFoundError, untrusted.Refused):
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def started(self) -> bool:
        """Whether the agent host took the turn, making its folder (so it must be followed, not run again)."""
        with self.folder() as fd:
            return fd is not None

    def requested(self) -> bool:
        """Whether the turn's request is still there for the agent host to take."""
        return (self.paths.input / self.name).is_file()

    def pid(self) -> int | None:
        """The CLI's pid in the container; only a plain one (it becomes `kill -INT <pid>`: not 0, -1 or 1, which
        would signal the whole container or its init)."""
        pid = self._number(agent_host.PID, int)
        return pid if pid is not None and 1 < pid < 2**22 else None

    def exit_code(self) -> int | None:
        return self._number(agent_host.EXIT_CODE, int)

    def hit_process_limit(self) -> bool:
        """Whether the kernel refused processes in the container for its pids limit while the turn ran (the agent
        host's count: the agent's to forge, which only restarts its own container, or keeps it)."""
        return (self._number(agent_host.LIMIT_HITS, int) or 0) > 0

    def _number(self, name: str, kind: type[_Number]) -> _Number | None:
        with self.folder() as fd:
            data = untrusted.read_small(fd, name, self.uid, 32) if fd is not None else None
        try:
            return kind(data.strip()) if data else None
        except ValueError:
            return None  # not yet complete, or not a number

    def ask_made(self, number: int) -> bool:
        """Whether the host wrote the turn's `number`-th permission request (they come numbered 1, 2, ...: looking for
        the next one costs one stat, however many files the agent puts in the folder)."""
        with self.folder() as fd:
            return fd is not None and untrusted.exists(fd, agent_host.ask_name(number))

    def ask_cancelled(self, number: int) -> bool:
        with self.folder() as fd:
            return fd is not None and untrusted.exists(fd, agent_host.ask_name(number) + agent_host.CANCELLED_SUFFIX)

    def read_ask(self, number: int) -> Ask:
        """The request as the host wrote it, read with bounds; what cannot be read is an Ask with no input."""
        with self.folder() as fd:
            data = None if fd is None else untrusted.read_small(fd, agent_host.ask_name(number), self.uid,
                                                                MAX_ASK_BYTES + 1)
        if data is None:
            return Ask(number, "", None, "the request could not be read")
        if len(data) > MAX_ASK_BYTES:
            head = _ASK_HEAD.match(data)
            return Ask(number, head[1].decode() if head else "", None, f"its input is over {MAX_ASK_BYTES:,} bytes")
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            raw = None
        if not (isinstance(raw, dict) and isinstance(raw.get("tool"), str) and isinstance(raw.get("input"), dict)):
            return Ask(number, "", None, "the request is not in the host's format")
        return Ask(number, raw["tool"][:100], raw["input"])

    def stderr(self) -> str:
        with self.folder() as fd:
            tail = untrusted.read_tail(fd, agent_host.STDERR, self.uid, STDERR_TAIL) if fd is not None else b""
        return tail.decode(errors="replace")

    def has_output(self) -> bool:
        """Whether the turn wrote any output (a turn the pids limit kept from starting wrote none)."""
        fd = self.open_output()
        if fd is None:
            return False
        try:
            return os.fstat(fd).st_size > 0
        finally:
            os.close(fd)

    def open_output(self) -> int | None:
        with self.folder() as fd:
            if fd is None:
                return None
            try:
                return untrusted.open_beneath(fd, agent_host.OUTPUT, self.uid)
            except FileNotFoundError:
                return None
            except untrusted.Refused as exc:
                if self.name not in _REFUSALS_LOGGED:  # once per turn: the agent can keep it refused for long
                    _REFUSALS_LOGGED.add(self.name)
                    logger.warning(f"turn {self.name}: its output is refused ({untrusted.excerpt(str(exc))})")
                return None


@dataclass(frozen=True)
class Ask:
    """A permission request of the CLI's, as the agent host wrote it (hostile: everything in it is the agent's)."""

    number: int
    tool: str
    input: dict | None  # None when it could not be read
    problem: str = ""  # why not


def turn_files(paths: ChatPaths, turn: str, uid: int) -> TurnFiles:
    return TurnFiles(name=turn, paths=paths, uid=uid)


def write_request(files: TurnFiles, request: bytes) -> None:
    """The turn's request, in root's input folder under the turn's new name."""
    _publish(files, files.name, request)


def _publish(files: TurnFiles, name: str, data: bytes) -> None:
    """A file for the agent host in root's input folder: written aside and linked in place, so the host never
    reads half of it, nor a file not yet readable (its mode is set after it is made), and, unlike a rename, one
    already there is never replaced (FileExistsError)."""
    with untrusted.directory(files.paths.input) as folder:
        with contextlib.suppress(FileNotFoundError):  # left by a process killed between the write and the link
            os.unlink(f".{name}", dir_fd=folder)
        untrusted.write_new(folder, f".{name}", data)
        try:
            os.link(f".{name}", name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
        finally:
            os.unlink(f".{name}", dir_fd=folder)


def request_interrupt(files: TurnFiles) -> None:
    """Ask the agent host to interrupt the turn (it sends the CLI an interrupt through the control protocol)."""
    _ask_host(files, agent_host.INTERRUPT_SUFFIX)


def request_stop(files: TurnFiles) -> None:
    """Ask the agent host to end the turn's CLI (SIGTERM, then SIGKILL): it does so only while the turn is in
    progress, never to the hot CLI once the turn ended."""
    _ask_host(files, agent_host.STOP_SUFFIX)


def _ask_host(files: TurnFiles, suffix: str) -> None:
    """An empty `<turn><suffix>` in the chat's input folder (once: a second ask finds it there)."""
    with untrusted.directory(files.paths.input) as folder, contextlib.suppress(FileExistsError):
        untrusted.write_new(folder, files.name + suffix, b"")


def files_folder(turn: str) -> str:
    return f"{turn}.files"


def write_inbound(files: TurnFiles, contents: dict[str, bytes]) -> None:
    """The files of the turn's message, in root's input folder for the agent host to copy (root never writes into
    the agent's workspace); names are safe already (inbox.safe_name)."""
    with untrusted.directory(files.paths.input) as folder:
        if untrusted.exists(folder, files_folder(files.name)):  # left by a try that did not get to its request
            untrusted.remove_tree(folder, files_folder(files.name))
        os.mkdir(files_folder(files.name), 0o755, dir_fd=folder)
        fd = untrusted.open_beneath(folder, files_folder(files.name), owner=None, folder=True)
        try:
            os.fchmod(fd, 0o755)  # whatever the umask (the service's unit sets 0077): the agent host reads it
            for name, data in contents.items():
                untrusted.write_new(fd, name, data)
        except BaseException:  # a full disk: nothing half written stays (the message fails or is tried again)
            untrusted.remove_tree(folder, files_folder(files.name))
            raise
        finally:
            os.close(fd)


def write_decision(files: TurnFiles, number: int, decision: bytes) -> None:
    """Our answer to the turn's `number`-th permission request, for the agent host (written once; a second write of
    the same decision, after a restart, finds it there)."""
    with contextlib.suppress(FileExistsError):
        _publish(files, agent_host.decision_name(files.name, number), decision)


def withdraw(files: TurnFiles) -> None:
    """The turn's request, interrupt, stop and decisions, deleted: once we stop following a turn, no agent host may
    take it. (Its decisions are in our own folder: listing it costs what we wrote.)"""
    with untrusted.directory(files.paths.input) as folder:
        decisions = [name for name in os.listdir(folder)
                     if name.lstrip(".").startswith(files.name + agent_host.DECISION_INFIX)]
        for name in (files.name, files.name + agent_host.INTERRUPT_SUFFIX, files.name + agent_host.STOP_SUFFIX,
                     *decisions):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
        if untrusted.exists(folder, files_folder(files.name)):
            untrusted.remove_tree(folder, files_folder(files.name))


class OutputReader:
    """Reads the complete lines appended to a turn's output since the last call, within bounds: a line over
    `line_bytes` is skipped (and counted), and no more than `output_bytes` are read in all."""

    def __init__(self, files: TurnFiles, line_bytes: int, output_bytes: int) -> None:
        self.files = files
        self.line_bytes = line_bytes
        self.output_bytes = output_bytes
        self.offset = 0
        self.lines = 0  # read so far, skipped ones included
        self.skipped_lines = 0
        self._fd: int | None = None
        self._partial = b""
        self._skipping = False  # inside a line that is over the cap: drop bytes until its newline

    @property
    def over_limit(self) -> bool:
        return self.offset >= self.output_bytes or self.too_many_lines

    @property
    def too_many_lines(self) -> bool:
        return self.lines >= MAX_LINES

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def new_lines(self) -> list[str]:
        """The complete lines of the next chunk (at most READ_CHUNK bytes)."""
        if self.too_many_lines:
            return []
        if self._fd is None:
            self._fd = self.files.open_output()
            if self._fd is None:
                return []
        data = os.pread(self._fd, min(READ_CHUNK, self.output_bytes - self.offset), self.offset)
        self.offset += len(data)
        return self._split(data)

    def _split(self, data: bytes) -> list[str]:
        *lines, rest = data.split(b"\n")
        if self._skipping and lines:  # the oversized line ends here
            lines, self._skipping = lines[1:], False
        elif self._skipping:
            return []
        if lines:
            lines[0], self._partial = self._partial + lines[0], b""
        self.lines += len(lines)
        kept = [line for line in lines if len(line) <= self.line_bytes]
        self.skipped_lines += len(lines) - len(kept)
        self._partial += rest
        if len(self._partial) > self.line_bytes:
            self._partial, self._skipping = b"", True
            self.skipped_lines += 1
        return [line.decode(errors="replace") for line in kept]

    def rest(self) -> list[str]:
        """All lines not read yet and whatever follows the last newline, once the writer has ended."""
        lines: list[str] = []
        while not self.over_limit:  # to the end: a chunk inside one long line holds no line, yet more follows
            offset = self.offset
            lines += self.new_lines()
            if self.offset == offset:
                break
        if self._partial:
            lines.append(self._partial.decode(errors="replace"))
            self._partial = b""
        return lines


# ---- pruning old turns ----------------------------------------------------------------------------------


def prune(chats_dir: Path, keep: int, busy: set[str | None]) -> int:
    """Delete all but the newest `keep` finished turn folders of each chat, and their requests; how many
    were deleted. The agent may be changing its turns folder meanwhile: nothing is followed, and what
    vanishes is skipped."""
    deleted = 0
    with contextlib.suppress(FileNotFoundError):
        for chat in os.scandir(chats_dir):
            if chat.is_dir(follow_symlinks=False):
                deleted += _prune_chat(Path(chat.path), keep, busy)
    return deleted


def _prune_chat(chat_dir: Path, keep: int, busy: set[str | None]) -> int:
    try:
        turns_fd = untrusted.open_dir(chat_dir / "turns")
    except (FileNotFoundError, NotADirectoryError, OSError):
        return 0
    try:
        finished = sorted(_finished_turns(turns_fd, busy))
        doomed = [name for _, name in finished[:-keep or None]]
        for name in doomed:
            untrusted.remove_tree(turns_fd, name)
        present = {entry.name for entry in os.scandir(turns_fd)}
    finally:
        os.close(turns_fd)
    _prune_requests(chat_dir / "input", present, busy)
    return len(doomed)


def _finished_turns(turns_fd: int, busy: set[str | None]) -> Iterator[tuple[float, str]]:
    """(modification time, name) of each finished turn folder."""
    for entry in os.scandir(turns_fd):
        if entry.name in busy or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = untrusted.open_beneath(turns_fd, entry.name, owner=None, folder=True)
        except (FileNotFoundError, untrusted.Refused):
            continue
        try:
            if untrusted.exists(fd, agent_host.EXIT_CODE):
                yield os.fstat(fd).st_mtime, entry.name
        finally:
            os.close(fd)


def _prune_requests(input_dir: Path, turns_present: set[str], busy: set[str | None]) -> None:
    """Requests left by turns pruned away, and by turns never taken long ago (a withdrawn request is gone already)."""
    now = time.time()
    with contextlib.suppress(FileNotFoundError), untrusted.directory(input_dir) as fd:
        for entry in os.scandir(fd):
            if entry.name in turns_present or entry.name in busy:
                continue
            info = entry.stat(follow_symlinks=False)
            if now - info.st_mtime <= ORPHAN_REQUEST_SECONDS:
                continue
            if stat.S_ISREG(info.st_mode):
                os.unlink(entry.name, dir_fd=fd)
            elif stat.S_ISDIR(info.st_mode) and entry.name.removesuffix(".files") not in busy:
                untrusted.remove_tree(fd, entry.name)  # a message's files whose turn never got to withdraw them
