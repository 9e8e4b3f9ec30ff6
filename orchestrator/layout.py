"""Where a chat's files live on the host: <data_dir>/chats/<chat_id>/{workspace,claude,turns}.

The Claude config dir is kept here, not in the container, so `--resume` works after the container is
re-created; turns are kept here so a turn's output outlives the orchestrator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import ChatSettings


@dataclass(frozen=True)
class ChatPaths:
    root: Path
    workspace: Path
    claude_config: Path
    turns: Path


def chat_paths(data_dir: Path, chat: ChatSettings) -> ChatPaths:
    root = data_dir / "chats" / chat.chat_id
    return ChatPaths(root=root, workspace=chat.workspace, claude_config=root / "claude", turns=root / "turns")


def make_owned_dir(path: Path, uid: int) -> None:
    """Create a folder the container's user can write (we chown when we run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and path.stat().st_uid != uid:
        os.chown(path, uid, uid)


def prepare(paths: ChatPaths, uid: int) -> None:
    for path in (paths.workspace, paths.claude_config, paths.turns):
        make_owned_dir(path, uid)
