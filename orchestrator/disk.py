"""How much disk a chat's folders take, and how much is free. Measured by walking the folders without
following links (the agent's files are hostile: a link to / must not count the host), in a thread.

No quota system is assumed (bind mounts of one filesystem share it), so the budget is enforced by measuring:
often while the chat is busy, and in housekeeping while its container runs.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_ENTRIES = 2_000_000  # a walk stops here: so many files are over any budget that makes sense (inodes)


@dataclass(frozen=True)
class Measurement:
    used: int  # bytes allocated
    entries: int
    at: float  # monotonic time

    @property
    def exhausted_entries(self) -> bool:
        return self.entries >= MAX_ENTRIES


def measure(folders: Iterable[Path]) -> Measurement:
    used = entries = 0
    stack = [str(folder) for folder in folders]
    while stack and entries < MAX_ENTRIES:
        try:
            iterator = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # changed meanwhile, or a link: not counted
        with iterator:
            for entry in iterator:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                used += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    stack.append(entry.path)
    return Measurement(used=used, entries=entries, at=time.monotonic())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
