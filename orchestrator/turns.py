"""The files of one agent turn, written inside the chat's container by `run-turn` (images/claude-runner).

<chat>/turns/<turn>/prompt        the user's text, the CLI's stdin (written by us)
                    pid           the CLI's pid inside the container
                    output.jsonl  the CLI's stream-json output, read incrementally
                    stderr        the CLI's stderr
                    exit_code     written last, when the CLI has ended

The process writing them is not the orchestrator's child, so a turn and its answer survive a restart
of the orchestrator: the next one reads the same files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.layout import ChatPaths, make_owned_dir

_STDERR_TAIL = 4096


@dataclass(frozen=True)
class TurnFiles:
    host_dir: Path
    container_dir: str

    @property
    def prompt(self) -> Path:
        return self.host_dir / "prompt"

    @property
    def output(self) -> Path:
        return self.host_dir / "output.jsonl"

    def started(self) -> bool:
        """Whether run-turn got as far as starting the CLI (so the turn must be followed, not run again)."""
        return self.pid() is not None or self.output.exists() or self.exit_code() is not None

    def pid(self) -> int | None:
        return _read_int(self.host_dir / "pid")

    def exit_code(self) -> int | None:
        return _read_int(self.host_dir / "exit_code")

    def stderr(self) -> str:
        try:
            with open(self.host_dir / "stderr", "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - _STDERR_TAIL))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def turn_files(paths: ChatPaths, turn: str, container_turns_dir: str) -> TurnFiles:
    return TurnFiles(host_dir=paths.turns / turn, container_dir=f"{container_turns_dir}/{turn}")


def write_prompt(files: TurnFiles, text: str, uid: int) -> None:
    """A fresh turn: the prompt, and nothing left of an earlier start of the same turn."""
    make_owned_dir(files.host_dir, uid)
    for stale in ("pid", "output.jsonl", "stderr", "exit_code"):
        (files.host_dir / stale).unlink(missing_ok=True)
    files.prompt.write_text(text)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None  # absent, or not yet complete


class OutputReader:
    """Reads the complete lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def rest(self) -> list[str]:
        """Whatever follows the last newline, once the writer has ended."""
        lines = self.new_lines()
        if self._partial:
            lines.append(self._partial.decode(errors="replace"))
            self._partial = b""
        return lines


def prune(chats_dir: Path, keep: int, busy: set[str | None]) -> int:
    """Delete all but the newest `keep` finished turn folders of each chat; how many were deleted."""
    deleted = 0
    for turns_dir in chats_dir.glob("*/turns"):
        finished = [d for d in turns_dir.iterdir() if d.name not in busy and (d / "exit_code").exists()]
        for old in sorted(finished, key=lambda d: d.stat().st_mtime)[:-keep or None]:
            shutil.rmtree(old, ignore_errors=True)
            deleted += 1
    return deleted
