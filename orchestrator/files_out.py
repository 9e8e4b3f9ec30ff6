"""Files the agent sends back: what it left in the workspace's `outbox/` when its turn answers (by hand, or with the
image's `send-file PATH [caption]`), and an answer too long for messages, sent as a markdown file.

The outbox folder is the agent's, so it is read as hostile (see `untrusted`): each name is opened beneath the
folder with O_NOFOLLOW|O_NONBLOCK and must be a regular file of the agent's, non-empty and within Feishu's limits;
anything else (a link to a host file, a FIFO, a device, a folder) is refused with a line in the answer, and nothing
it points to is read. What is taken is copied into root's own folder of the chat (`<chat>/sending/<turn>/`, never
mounted) before it leaves the workspace, and the outbox items name that copy: the agent cannot change a file
between its check and its upload, and a restart uploads the same bytes.

Taking is idempotent per turn, for a turn followed again after a restart: the turn's folder appears whole (written
aside, then renamed) with a manifest of what was taken, and a second take reads the manifest rather than the
outbox, which was emptied after the folder appeared.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import disk, inbox, untrusted
from orchestrator.channels import OutFile
from orchestrator.config import FileSettings
from orchestrator.untrusted import excerpt

OUTBOX = "outbox"
SENDING = "sending"  # in the chat's root folder
MANIFEST = "manifest.json"
ANSWER_FILE = "answer.md"
CAPTION_SUFFIX = ".caption"  # outbox/<name>.caption: the caption of outbox/<name> (send-file writes it)
CAPTION_CHARS = 500
MAX_FILES = 10  # sent with one answer; the rest wait in the outbox for the next one
MAX_NAMES = 1000  # names of the outbox looked at: an agent can make millions
# Bytes of a chat's files waiting to be sent (root's disk, outside the chat's budget): past this, more files wait in
# the outbox. An agent filling its outbox every turn while Feishu is slow or down cannot fill the service's disk.
PENDING_BYTES = 300 * 1024**2
IMAGE_BYTES = 10 * 1024**2  # Feishu's image upload limit; a bigger image goes as a file
FILE_BYTES = 30 * 1024**2  # Feishu's file upload limit
SUMMARY_CHARS = 1500  # of an answer sent as a file, shown in its card
COPY_CHUNK = 1024**2
KEEP_SECONDS = 7 * 24 * 3600  # a turn's copies left behind (an item that never went out) are removed after this
SENT_KEEP_SECONDS = 600  # a turn's folder whose files all went out (only its manifest left) is removed after this
# The image formats Feishu's image API takes (its docs: JPEG, PNG, WEBP, GIF, TIFF, BMP, ICO), by their first bytes.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                b"\x00\x00\x01\x00")


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


def take(chat_root: Path, workspace: Path, turn: str, answer: str, uid: int, limits: FileSettings) -> Sending:
    """The turn's answer and the files it sends (see the module's docstring); blocking I/O, for a worker thread."""
    done = chat_root / SENDING / turn
    if not (done / MANIFEST).exists():
        partial = chat_root / SENDING / f".{turn}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # root's own folder: a crash's leftover, not the agent's
        partial.mkdir(mode=0o700, parents=True)
        room = PENDING_BYTES - _pending_bytes(chat_root / SENDING)
        taken, refusals, names = _take_outbox(workspace, uid, limits, partial, room)
        text, files = _as_sent(answer, taken, refusals, partial, done, limits)
        if not files and not refusals:  # the common case: nothing to send, nothing to remember
            shutil.rmtree(partial)
            return Sending(answer, ())
        manifest = {"text": text, "files": [[asdict(file), caption] for file, caption in files], "taken": names}
        (partial / MANIFEST).write_text(json.dumps(manifest))
        os.rename(partial, done)
    manifest = json.loads((done / MANIFEST).read_text())
    _remove_taken(workspace, uid, manifest["taken"])  # again after a restart: it may not have happened
    return Sending(manifest["text"], tuple((OutFile(**file), caption) for file, caption in manifest["files"]))


def _as_sent(answer: str, taken: list[_Taken], refusals: list[str], partial: Path, done: Path,
             limits: FileSettings) -> tuple[str, list[tuple[OutFile, str]]]:
    """The answer's text and its files (their copies in `partial`, to be renamed `done`)."""
    files: list[tuple[OutFile, str]] = []
    text = answer
    if limits.answer_as_file_bytes and len(answer.encode()) > limits.answer_as_file_bytes:
        (partial / "0").write_text(answer)
        files.append((OutFile("file", ANSWER_FILE, str(done / "0"), len(answer.encode())), ""))
        text = summary(answer)
    names: set[str] = {ANSWER_FILE} if files else set()
    for file in taken:
        name = inbox.safe_name(file.name, names)
        names.add(name)
        kind = "image" if is_image(file.head) and file.size <= IMAGE_BYTES else "file"
        files.append((OutFile(kind, name, str(done / str(file.number)), file.size), file.caption))
    if refusals:
        text += "\n\n" + "\n".join(refusals)
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


def _take_outbox(workspace: Path, uid: int, limits: FileSettings, into: Path, room: int
                 ) -> tuple[list[_Taken], list[str], list[str]]:
    """(the files copied into `into`, a line for each entry refused, the names to remove from the outbox)."""
    try:
        workspace_fd = untrusted.open_dir(workspace)
    except FileNotFoundError:
        return [], [], []
    try:
        try:
            outbox_fd = untrusted.open_beneath(workspace_fd, OUTBOX, uid, folder=True)
        except FileNotFoundError:
            return [], [], []
        except untrusted.Refused:
            return [], [f"⚠️ Nothing was sent from {OUTBOX}/: it is not a folder."], []
        try:
            return _take_entries(outbox_fd, uid, min(FILE_BYTES, limits.max_bytes), into, room)
        finally:
            os.close(outbox_fd)
    finally:
        os.close(workspace_fd)


def _take_entries(outbox_fd: int, uid: int, most: int, into: Path, room: int
                  ) -> tuple[list[_Taken], list[str], list[str]]:
    names = _names(outbox_fd)
    taken: list[_Taken] = []
    refusals: list[str] = []
    removed: list[str] = []
    for name in names:
        if name.endswith(CAPTION_SUFFIX) and name[:-len(CAPTION_SUFFIX)] in names:
            continue  # read with its file
        shown = f"{OUTBOX}/{excerpt(name, 80)}"
        if len(taken) == MAX_FILES:
            refusals.append(f"⚠️ {shown} waits for the next answer: one answer sends at most {MAX_FILES} files.")
            continue
        if _size(outbox_fd, name) > room:
            refusals.append(f"⚠️ {shown} waits for the next answer: this chat's files still being sent take "
                            f"{disk.human(PENDING_BYTES - room)}.")
            continue
        number = len(taken) + 1
        try:
            size, head = _copy_file(outbox_fd, name, uid, min(most, room), into / str(number))
        except untrusted.Refused as exc:
            refusals.append(f"⚠️ {shown} was not sent: {exc}.")
            if not _is_folder(outbox_fd, name):
                removed.append(name)
            continue
        except FileNotFoundError:
            continue  # gone meanwhile
        caption = untrusted.read_small(outbox_fd, name + CAPTION_SUFFIX, uid, CAPTION_CHARS * 4) or b""
        taken.append(_Taken(name, number, size, head, caption.decode(errors="replace").strip()[:CAPTION_CHARS]))
        removed.append(name)
        room -= size
    removed += [name + CAPTION_SUFFIX for name in list(removed) if name + CAPTION_SUFFIX in names]
    return taken, refusals, removed


def _names(outbox_fd: int) -> list[str]:
    """The outbox's names in order, at most MAX_NAMES, hidden ones (editors' swap files) left alone."""
    names: list[str] = []
    with os.scandir(outbox_fd) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                names.append(entry.name)
            if len(names) == MAX_NAMES:
                break
    return sorted(names)


def _copy_file(outbox_fd: int, name: str, uid: int, most: int, target: Path) -> tuple[int, bytes]:
    """Copy a regular file of the agent's of 1 to `most` bytes to `target`, chunk by chunk (never whole in memory);
    its size and first bytes. Refused saying why not, for the chat (nothing copied then)."""
    try:
        fd = untrusted.open_beneath(outbox_fd, name, uid)
    except untrusted.Refused:
        raise untrusted.Refused(_what_it_is(outbox_fd, name)) from None
    size, head = 0, b""
    try:
        with open(target, "wb") as out:
            while chunk := os.read(fd, COPY_CHUNK):
                size += len(chunk)
                if size > most:  # checked as it is read: the file may grow while it is
                    break
                head = head or chunk[:16]
                out.write(chunk)
    finally:
        os.close(fd)
    if size > most:
        target.unlink()
        raise untrusted.Refused(f"it is over the limit of {disk.human(most)} for a file")
    if not size:
        target.unlink()
        raise untrusted.Refused("it is empty")
    return size, head


def _what_it_is(outbox_fd: int, name: str) -> str:
    """Why an entry is not a file to send, for the chat: never where a link points."""
    try:
        mode = os.stat(name, dir_fd=outbox_fd, follow_symlinks=False).st_mode
    except OSError:
        return "it could not be read"
    if stat.S_ISLNK(mode):
        return "it is a link, and links are not followed"
    if stat.S_ISDIR(mode):
        return "it is a folder (send a file, e.g. a .zip of it)"
    if stat.S_ISREG(mode):
        return "it is not the agent's own file"
    return "it is not a regular file"


def _size(outbox_fd: int, name: str) -> int:
    """What the entry says its size is (0 for anything but a regular file: it is refused later, by its open)."""
    with contextlib.suppress(OSError):
        info = os.stat(name, dir_fd=outbox_fd, follow_symlinks=False)
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    return 0


def _is_folder(outbox_fd: int, name: str) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISDIR(os.stat(name, dir_fd=outbox_fd, follow_symlinks=False).st_mode)
    return False


def _remove_taken(workspace: Path, uid: int, names: list[str]) -> None:
    """Unlink what was taken (unlink never follows a link); a folder swapped in meanwhile stays."""
    with contextlib.suppress(OSError, untrusted.Refused), untrusted.directory(workspace) as workspace_fd:
        outbox_fd = untrusted.open_beneath(workspace_fd, OUTBOX, uid, folder=True)
        try:
            for name in names:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=outbox_fd)
        finally:
            os.close(outbox_fd)


def discard(file: OutFile | None) -> None:
    """A file sent (or given up on): its copy is removed."""
    if file is not None:
        with contextlib.suppress(OSError):
            os.unlink(file.path)


def prune(chats_dir: Path, now: float | None = None) -> int:
    """Remove turns' folders whose files all went out (after SENT_KEEP_SECONDS: the answer that names them is
    stored by then), and any older than KEEP_SECONDS (items that never went out); how many folders went."""
    now = time.time() if now is None else now
    removed = 0
    for folder in chats_dir.glob(f"*/{SENDING}/*"):
        with contextlib.suppress(OSError):
            age = now - folder.stat(follow_symlinks=False).st_mtime
            if age > KEEP_SECONDS or (age > SENT_KEEP_SECONDS and os.listdir(folder) == [MANIFEST]):
                shutil.rmtree(folder)
                removed += 1
    return removed
