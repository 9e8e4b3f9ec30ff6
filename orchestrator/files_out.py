"""Files the agent sends back: what it left in the workspace's `outbox/` when its turn answers (by hand, or with the
image's `send-file PATH [caption]`), and an answer too long for messages, sent as a markdown file.

The outbox folder is the agent's, so it is read as hostile (see `untrusted`): each name is opened beneath the
folder with O_NOFOLLOW|O_NONBLOCK and must be a regular file of the agent's, non-empty and within Feishu's limits;
anything else (a link to a host file, a FIFO, a folder, a name that cannot be opened) is refused with a line in
the answer, and nothing it points to is read. What is taken is copied into root's own folder of the chat
(`<chat>/sending/<turn>/`, never mounted) before it leaves the workspace, and the outbox items name that copy: the
agent cannot change a file between its check and its upload, and a restart uploads the same bytes.

Taking is idempotent per turn, for a turn followed again after a restart: the turn's folder appears whole (written
aside, synced, then renamed) with a manifest of what was taken, and a second take reads the manifest rather than the
outbox. An entry leaves the outbox only while it is the very file that was taken (same inode, size and mtime): one
the agent wrote anew meanwhile stays for the next answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import disk, inbox, untrusted
from orchestrator.channels import OutFile
from orchestrator.config import FileSettings
from orchestrator.ids import is_valid_chat_id
from orchestrator.layout import ChatPaths
from orchestrator.untrusted import excerpt

OUTBOX = "outbox"
SENDING = "sending"  # in the chat's root folder
MANIFEST = "manifest.json"
ANSWER_FILE = "answer.md"
CAPTION_SUFFIX = ".caption"  # outbox/<name>.caption: the caption of outbox/<name> (send-file writes it)
CAPTION_CHARS = 500
MAX_FILES = 10  # sent with one answer; the rest wait in the outbox for the next one
MAX_NAMES = 1000  # entries of the outbox looked at, hidden ones too: an agent can make millions
# Bytes of a chat's files waiting to be sent (root's disk, outside the chat's budget, and a sparse file costs the
# agent nothing): past this, more files wait in the outbox, so an agent filling its outbox every turn while Feishu is
# slow or down cannot fill the service's disk. Nor is a file taken that would leave less than limits.min_free_disk.
PENDING_BYTES = 300 * 1024**2
IMAGE_BYTES = 10 * 1024**2  # Feishu's image upload limit; a bigger image goes as a file
FILE_BYTES = 30 * 1024**2  # Feishu's file upload limit
SUMMARY_CHARS = 1500  # of an answer sent as a file, shown in its card
COPY_CHUNK = 1024**2
SETTLED_SECONDS = 600  # a turn's folder none of whose files waits to be sent is removed this long after it changed
# The image formats Feishu's image API takes (its docs: JPEG, PNG, WEBP, GIF, TIFF, BMP, ICO), by their first bytes.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                b"\x00\x00\x01\x00")

Identity = tuple[str, int, int, int, int]  # an outbox entry as taken: (name, device, inode, size, mtime in ns)


@dataclass(frozen=True)
class Sending:
    """What a turn's answer sends: its text (with a line for each file refused) and its files with their captions."""

    text: str
    files: tuple[tuple[OutFile, str], ...]


@dataclass(frozen=True)
class _Taken:
    """A file of the outbox, copied as `number` into the turn's folder."""

    name: str  # in the outbox
    number: int
    size: int
    head: bytes  # its first bytes: an image is told by them, never by its name
    caption: str


@dataclass
class _Room:
    """What may still be copied in this take: the chat's share of pending bytes, and the disk's free space."""

    pending: int
    disk: int

    def refusal(self, size: int) -> str | None:
        if size > self.disk:
            return "the bot's disk is nearly full"
        if size > self.pending:
            return f"this chat's files still being sent take {disk.human(PENDING_BYTES - self.pending)}"
        return None

    def take(self, size: int) -> None:
        self.pending -= size
        self.disk -= size


@dataclass
class _Outcome:
    """What reading the outbox made: files copied, lines for the answer, entries to remove."""

    taken: list[_Taken]
    refusals: list[str]
    removed: list[Identity]


def take(paths: ChatPaths, uid: int, turn: str, answer: str, limits: FileSettings, min_free: int,
         mask: Callable[[str], str]) -> Sending:
    """The turn's answer and the files it sends (see the module's docstring); blocking I/O, for a worker thread.
    `mask` takes the secrets out of the answer's text before it is written as a file."""
    sending = paths.root / SENDING
    done = sending / turn
    long = bool(limits.answer_as_file_bytes) and len(answer.encode()) > limits.answer_as_file_bytes
    if not long and not (done / MANIFEST).exists() and not os.path.lexists(paths.workspace / OUTBOX):
        return Sending(answer, ())  # every answer passes here: nothing to take costs one lstat, no folder
    if not (done / MANIFEST).exists():
        partial = sending / f".{turn}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # root's own folder: a crash's leftover, not the agent's
        partial.mkdir(mode=0o700, parents=True)
        room = _Room(PENDING_BYTES - _pending_bytes(sending), disk.free_bytes(sending) - min_free)
        outcome = _take_outbox(paths.workspace, uid, min(FILE_BYTES, limits.max_bytes), partial, room)
        text, files = _as_sent(answer, outcome, partial, done, limits, mask)
        if not files and not outcome.refusals:  # the common case: nothing to send, nothing to remember
            shutil.rmtree(partial)
            return Sending(answer, ())
        manifest = {"text": text, "files": [[asdict(file), caption] for file, caption in files],
                    "removed": outcome.removed}
        _write_synced(partial / MANIFEST, json.dumps(manifest).encode())
        _sync_folder(partial)
        os.rename(partial, done)
        _sync_folder(sending)  # the copies are on disk before the originals go
    manifest = json.loads((done / MANIFEST).read_text())
    _remove(paths.workspace, uid, manifest["removed"])  # again after a restart: it may not have happened
    return Sending(manifest["text"], tuple((OutFile(**file), caption) for file, caption in manifest["files"]))


def _as_sent(answer: str, outcome: _Outcome, partial: Path, done: Path, limits: FileSettings,
             mask: Callable[[str], str]) -> tuple[str, list[tuple[OutFile, str]]]:
    """The answer's text and its files (their copies in `partial`, to be renamed `done`)."""
    files: list[tuple[OutFile, str]] = []
    text = answer
    if limits.answer_as_file_bytes and len(answer.encode()) > limits.answer_as_file_bytes:
        whole = mask(answer).encode()
        _write_synced(partial / "0", whole)
        files.append((OutFile("file", ANSWER_FILE, str(done / "0"), len(whole)), ""))
        text = summary(answer)
    names: set[str] = {ANSWER_FILE} if files else set()
    for file in outcome.taken:
        name = inbox.safe_name(file.name, names)
        names.add(name)
        kind = "image" if is_image(file.head) and file.size <= IMAGE_BYTES else "file"
        files.append((OutFile(kind, name, str(done / str(file.number)), file.size), file.caption))
    if outcome.refusals:
        text += "\n\n" + "\n".join(outcome.refusals)
    return text, files


def summary(answer: str) -> str:
    """What the card of an answer sent as a file shows: its beginning, cut at a paragraph (or line) break, a code
    block cut open closed again, and where the rest is."""
    head = answer[:SUMMARY_CHARS]
    if len(answer) > SUMMARY_CHARS:
        cut = head.rfind("\n\n")
        if cut < SUMMARY_CHARS // 3:
            cut = head.rfind("\n")
        head = head[:cut] if cut >= SUMMARY_CHARS // 3 else head
    if head.count("```") % 2:
        head += "\n```"
    return (f"{head.rstrip()}\n\n…\n\n📄 The whole answer ({disk.human(len(answer.encode()))}) is in the file "
            f"{ANSWER_FILE} below.")


def is_image(head: bytes) -> bool:
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _pending_bytes(sending: Path) -> int:
    """Bytes of the chat's copies not yet sent (root's own folder)."""
    return sum(path.stat().st_size for path in sending.glob("*/*") if path.name != MANIFEST)


def _take_outbox(workspace: Path, uid: int, most: int, into: Path, room: _Room) -> _Outcome:
    try:
        workspace_fd = untrusted.open_dir(workspace)
    except FileNotFoundError:
        return _Outcome([], [], [])
    try:
        try:
            outbox_fd = untrusted.open_beneath(workspace_fd, OUTBOX, uid, folder=True)
        except FileNotFoundError:
            return _Outcome([], [], [])
        except untrusted.Refused:
            return _Outcome([], [f"⚠️ Nothing was sent from {OUTBOX}/: it is not a folder of the agent's."], [])
        try:
            return _take_entries(outbox_fd, uid, most, into, room)
        finally:
            os.close(outbox_fd)
    finally:
        os.close(workspace_fd)


def _take_entries(outbox_fd: int, uid: int, most: int, into: Path, room: _Room) -> _Outcome:
    names = _names(outbox_fd)
    outcome = _Outcome([], [], [])
    for name in names:
        if name.endswith(CAPTION_SUFFIX) and name[:-len(CAPTION_SUFFIX)] in names:
            continue  # read with its file
        shown = f"{OUTBOX}/{excerpt(name, 80)}"
        waits = (f"one answer sends at most {MAX_FILES} files" if len(outcome.taken) == MAX_FILES
                 else room.refusal(_size(outbox_fd, name)))
        if waits:
            outcome.refusals.append(f"⚠️ {shown} waits for the next answer: {waits}.")
            continue
        number = len(outcome.taken) + 1
        try:
            identity, head = _copy_file(outbox_fd, name, uid, min(most, room.pending, room.disk), into / str(number))
        except _Changed:
            outcome.refusals.append(f"⚠️ {shown} waits for the next answer: it changed while it was read.")
            continue
        except untrusted.Refused as exc:
            outcome.refusals.append(f"⚠️ {shown} was not sent: {exc}.")
            if (info := _stat(outbox_fd, name)) is not None and not stat.S_ISDIR(info.st_mode):
                outcome.removed.append(_identity(name, info))
            continue
        except FileNotFoundError:
            continue  # gone meanwhile
        outcome.taken.append(_Taken(name, number, identity[3], head, _caption(outbox_fd, name, uid)))
        outcome.removed.append(identity)
        room.take(identity[3])
        if name + CAPTION_SUFFIX in names and (info := _stat(outbox_fd, name + CAPTION_SUFFIX)) is not None:
            outcome.removed.append(_identity(name + CAPTION_SUFFIX, info))
    return outcome


def _names(outbox_fd: int) -> list[str]:
    """The outbox's names in order: of its first MAX_NAMES entries, those not hidden (editors' swap files)."""
    names: list[str] = []
    with os.scandir(outbox_fd) as entries:
        for looked, entry in enumerate(entries, 1):
            if not entry.name.startswith("."):
                names.append(entry.name)
            if looked == MAX_NAMES:
                break
    return sorted(names)


class _Changed(Exception):
    """The file changed while it was copied: the copy may be of no version of it."""


def _copy_file(outbox_fd: int, name: str, uid: int, most: int, target: Path) -> tuple[Identity, bytes]:
    """Copy a regular file of the agent's of 1 to `most` bytes to `target`, chunk by chunk (never whole in memory);
    what it was and its first bytes. Refused saying why not, for the chat; _Changed when it was written meanwhile
    (nothing copied then, either way)."""
    try:
        fd = untrusted.open_beneath(outbox_fd, name, uid)
    except untrusted.Refused:
        raise untrusted.Refused(_what_it_is(outbox_fd, name, uid)) from None
    size, head = 0, b""
    try:
        before = os.fstat(fd)
        with open(target, "wb") as out:
            while chunk := os.read(fd, COPY_CHUNK):
                size += len(chunk)
                if size > most:  # checked as it is read: the file may grow while it is
                    break
                head = head or chunk[:16]
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        after = os.fstat(fd)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise untrusted.Refused(f"it could not be read ({os.strerror(exc.errno or 0)})") from None
    finally:
        os.close(fd)
    if size > most:
        target.unlink()
        raise untrusted.Refused(f"it is over the limit of {disk.human(most)} for a file")
    if not size:
        target.unlink()
        raise untrusted.Refused("it is empty")
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or after.st_size != size:
        target.unlink()
        raise _Changed
    return _identity(name, after), head


def _caption(outbox_fd: int, name: str, uid: int) -> str:
    try:
        data = untrusted.read_small(outbox_fd, name + CAPTION_SUFFIX, uid, CAPTION_CHARS * 4) or b""
    except (OSError, untrusted.Refused):  # a name too long for its suffix, say
        return ""
    return data.decode(errors="replace").strip()[:CAPTION_CHARS]


def _stat(outbox_fd: int, name: str) -> os.stat_result | None:
    """An entry as it is now, not followed if it is a link."""
    try:
        return os.stat(name, dir_fd=outbox_fd, follow_symlinks=False)
    except (OSError, ValueError):
        return None


def _identity(name: str, info: os.stat_result) -> Identity:
    return name, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _what_it_is(outbox_fd: int, name: str, uid: int) -> str:
    """Why an entry is not a file to send, for the chat: never where a link points."""
    info = _stat(outbox_fd, name)
    if info is None:
        return "it could not be read"
    if stat.S_ISLNK(info.st_mode):
        return "it is a link, and links are not followed"
    if stat.S_ISDIR(info.st_mode):
        return "it is a folder (send a file, e.g. a .zip of it)"
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_uid != uid:
        return "it is not the agent's own file"
    return "it could not be opened"


def _size(outbox_fd: int, name: str) -> int:
    """What the entry says its size is (0 for anything but a regular file: it is refused later, by its open)."""
    info = _stat(outbox_fd, name)
    return info.st_size if info is not None and stat.S_ISREG(info.st_mode) else 0


def _remove(workspace: Path, uid: int, removed: Iterable[Identity]) -> None:
    """Unlink each entry that is still what was taken (unlink never follows a link)."""
    with contextlib.suppress(OSError, untrusted.Refused), untrusted.directory(workspace) as workspace_fd:
        outbox_fd = untrusted.open_beneath(workspace_fd, OUTBOX, uid, folder=True)
        try:
            for name, *identity in removed:
                info = _stat(outbox_fd, name)
                if info is not None and list(_identity(name, info)[1:]) == identity:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=outbox_fd)
        finally:
            os.close(outbox_fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(file: OutFile | None) -> None:
    """A file sent (or given up on): its copy is removed."""
    if file is not None:
        with contextlib.suppress(OSError):
            os.unlink(file.path)


def prune(chats_dir: Path, pending: set[str], now: float | None = None) -> int:
    """Remove the turns' folders (and crashed takes) of every chat that changed more than SETTLED_SECONDS ago and
    hold no file in `pending` (the copies outbox items still name); how many went. Through fds, below folders only
    root owns: a chat's own folder is never followed if it is a link, whatever the workspaces' configuration."""
    now = time.time() if now is None else now
    removed = 0
    with untrusted.directory(chats_dir) as chats_fd:
        for chat_id in os.listdir(chats_fd):
            if is_valid_chat_id(chat_id):
                with contextlib.suppress(OSError, untrusted.Refused):
                    removed += _prune_chat(chats_fd, chat_id, chats_dir / chat_id / SENDING, pending, now)
    return removed


def _prune_chat(chats_fd: int, chat_id: str, sending: Path, pending: set[str], now: float) -> int:
    chat_fd = untrusted.open_beneath(chats_fd, chat_id, os.geteuid(), folder=True)
    try:
        sending_fd = untrusted.open_beneath(chat_fd, SENDING, os.geteuid(), folder=True)
    except FileNotFoundError:
        return 0
    finally:
        os.close(chat_fd)
    removed = 0
    try:
        for name in os.listdir(sending_fd):
            info = os.stat(name, dir_fd=sending_fd, follow_symlinks=False)
            waiting = any(path.startswith(f"{sending / name}/") for path in pending)
            if now - info.st_mtime > SETTLED_SECONDS and not waiting:
                untrusted.remove_tree(sending_fd, name)
                removed += 1
    finally:
        os.close(sending_fd)
    return removed
