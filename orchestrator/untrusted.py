"""Reading and writing where an agent can write, as root, without trusting anything the agent controls.

An agent owns its chat's mounted folders: it can put a symlink, a FIFO, a device node's name, a folder or a
gigabyte file under any name, and swap one for another at any moment. So, below a folder the orchestrator
made (whose own path only root can change):
- every name is one path component, opened relative to a folder fd with O_NOFOLLOW (a link is refused by
  the kernel, not by a check that a swap could outrun), and O_NONBLOCK (a FIFO cannot hang the open);
- what was opened is checked with fstat: a regular file (or folder) owned by the agent's uid, so a hard
  link to a root file is refused too;
- reads are bounded, and text for the log is an escaped excerpt (no CR, no ANSI escapes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What an open of an agent's name may meet that the agent made it meet: a link, a FIFO or socket, a folder, a mode
# or a lease that refuses root (a lease on its own file is its owner's right: O_NONBLOCK then gives EAGAIN), a name too
# long for a suffix the orchestrator adds. Anything else is the orchestrator's own trouble, and raised.
_REFUSED = (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EAGAIN,
            errno.EWOULDBLOCK, errno.ENAMETOOLONG, errno.ETXTBSY)
MAX_DEPTH = 128  # folders below a folder that `remove_tree` descends into


class Refused(Exception):
    """Something an agent can write is not what it must be (a link, a FIFO, another owner, a folder)."""


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Refused(f"not a plain name: {name!r}")


def open_dir(path: Path) -> int:
    """A folder the orchestrator made, its last component not followed if it is a link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


@contextlib.contextmanager
def directory(path: Path) -> Iterator[int]:
    fd = open_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


def open_beneath(dir_fd: int, name: str, owner: int | None, folder: bool = False) -> int:
    """Open `name` in the folder `dir_fd` for reading: a regular file (or a folder), not a link, owned by
    `owner` (None: any owner). FileNotFoundError when it is not there; Refused when it is not what it must be."""
    _check_name(name)
    flags = os.O_RDONLY | _OPEN_FLAGS | (os.O_DIRECTORY if folder else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _REFUSED:
            raise Refused(f"{name}: {os.strerror(exc.errno)}") from None
        raise
    try:
        info = os.fstat(fd)
        kind_ok = stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)
        if not kind_ok:
            raise Refused(f"{name}: not a {'folder' if folder else 'regular file'}")
        if owner is not None and info.st_uid != owner:
            raise Refused(f"{name}: owned by uid {info.st_uid}, not {owner}")
        if not folder:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(dir_fd: int, name: str, owner: int | None, limit: int) -> bytes | None:
    """The first `limit` bytes of a small file; None when it is absent or refused."""
    try:
        fd = open_beneath(dir_fd, name, owner)
    except (FileNotFoundError, Refused):
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_tail(dir_fd: int, name: str, owner: int | None, limit: int) -> bytes:
    """The last `limit` bytes of a file; empty when it is absent or refused."""
    try:
        fd = open_beneath(dir_fd, name, owner)
    except (FileNotFoundError, Refused):
        return b""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit))
    finally:
        os.close(fd)


def exists(dir_fd: int, name: str) -> bool:
    """Whether anything (a link too, not followed) has this name."""
    _check_name(name)
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_new(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Create a file that must not exist yet, in a folder only root can write (so nothing can be planted)."""
    _check_name(name)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def make_owned_dir(parent_fd: int, name: str, uid: int, mode: int = 0o700) -> None:
    """A folder `name` in a folder only root can write, owned by `uid`: made if missing, chowned through an fd
    (never through a path), and refused if something else has the name."""
    _check_name(name)
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent_fd)
    fd = open_beneath(parent_fd, name, owner=None, folder=True)
    try:
        info = os.fstat(fd)
        if info.st_uid != uid and os.geteuid() == 0:
            os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def remove_tree(parent_fd: int, name: str, depth: int = 0) -> None:
    """Delete the folder `name` and what it holds, opening each folder with O_NOFOLLOW|O_NONBLOCK|O_DIRECTORY: a
    link or a FIFO swapped in for a folder is unlinked, never opened (shutil.rmtree opens what it lstat'ed
    without O_NONBLOCK, so a FIFO swapped in between hangs it). Past MAX_DEPTH, and where the agent keeps
    changing things, what is left stays for the next time."""
    _check_name(name)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent_fd)
        return
    try:
        for entry in list(os.scandir(fd)):
            if entry.is_dir(follow_symlinks=False):
                if depth < MAX_DEPTH:
                    remove_tree(fd, entry.name, depth + 1)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=parent_fd)


def excerpt(data: bytes | str, limit: int = 200) -> str:
    """A bounded, escaped excerpt for one log line: control characters (CR, LF, ESC…) shown as escapes."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    cut = text[:limit]
    escaped = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in cut)
    return escaped + ("…" if len(text) > limit else "")
