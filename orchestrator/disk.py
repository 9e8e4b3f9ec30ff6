"""How much disk a chat's folders take, and how much is free. Measured by walking the folders without
following links (the agent's files are hostile: a link to / must not count the host, a tree nested past
PATH_MAX must not hide its files or break the walk), in a thread.

No quota system is assumed (bind mounts of one filesystem share it), so the budget is enforced by measuring:
often while the chat is busy, and in housekeeping while its container runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator import untrusted

MAX_ENTRIES = 2_000_000  # a walk stops here: so many files are over any budget that makes sense (inodes)
# A walk holds one fd per level of the current path, so its depth is capped: a deeper tree is not walked and
# counts as over any budget (an agent could otherwise nest folders past PATH_MAX to hide files).
MAX_DEPTH = 128


@dataclass(frozen=True)
class Measurement:
    used: int  # bytes allocated
    entries: int
    at: float  # monotonic time
    too_deep: bool = False  # folders nested deeper than MAX_DEPTH: not walked

    @property
    def exhausted_entries(self) -> bool:
        """The walk gave up (too many entries, or too deep), so the folders count as over any budget."""
        return self.entries >= MAX_ENTRIES or self.too_deep


def measure(folders: Iterable[Path]) -> Measurement:
    walk = _Walk()
    for folder in folders:
        try:
            top = untrusted.open_dir(folder)
        except OSError:
            continue  # absent, a link, or unreadable: not counted
        walk.run(top)
    return Measurement(used=walk.used, entries=walk.entries, at=time.monotonic(), too_deep=walk.too_deep)


class _Walk:
    """Each folder is opened relative to its parent's fd, without following a link: a folder the agent swaps
    for a link meanwhile is refused by the kernel, and no path grows past PATH_MAX however deep the tree."""

    def __init__(self) -> None:
        self.used = self.entries = 0
        self.too_deep = False

    def run(self, top: int) -> None:
        levels: list[tuple[int, list[str]]] = []  # the open folders of the current path, with subfolders to walk
        try:
            self._enter(levels, top)
            while levels:
                fd, subfolders = levels[-1]
                if not subfolders or self.entries >= MAX_ENTRIES:
                    os.close(levels.pop()[0])
                elif len(levels) >= MAX_DEPTH:
                    self.too_deep = True
                    subfolders.clear()
                else:
                    with contextlib.suppress(FileNotFoundError, untrusted.Refused):  # changed meanwhile
                        self._enter(levels, untrusted.open_beneath(fd, subfolders.pop(), owner=None, folder=True))
        finally:
            for fd, _ in levels:
                os.close(fd)

    def _enter(self, levels: list[tuple[int, list[str]]], fd: int) -> None:
        """Count the entries of the folder `fd` (closed with `levels`), and keep its subfolders to walk."""
        subfolders: list[str] = []
        levels.append((fd, subfolders))
        with os.scandir(fd) as entries:
            for entry in entries:
                if self.entries >= MAX_ENTRIES:
                    break
                self.entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                self.used += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    subfolders.append(entry.name)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
