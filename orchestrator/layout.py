"""Where everything lives, on the host and in a chat's container. The one module that builds these paths.

<chats_dir>/<chat_id>/          root's, 0700: the agent cannot rename or replace anything at this level
    workspace/   → /workspace             the agent's (uid), read-write
    claude/      → /home/agent/.claude    the agent's: Claude's config and sessions, so --resume survives a
                                          re-created container
    turns/       → /turns                 the agent's: each turn's output, written inside the container
    input/       → /input (read-only)     root's: each turn's request, written by the orchestrator, so no name
                                          it writes to can have been planted by the agent
<data_dir>/run/<chat_id>/  → /run/orchestrator (read-only)   root's: the chat's model gateway socket
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator import agent_host, untrusted
from orchestrator.config import NODE_FOLDER, ChatSettings, Settings

WORKSPACE_PATH = agent_host.WORKSPACE  # the container's side of the channel is the agent host's: one definition
CLAUDE_CONFIG_PATH = "/home/agent/.claude"
TURNS_PATH = agent_host.TURNS
INPUT_PATH = agent_host.INPUT
RUN_PATH = "/run/orchestrator"


@dataclass(frozen=True)
class ChatPaths:
    root: Path
    workspace: Path
    claude_config: Path
    turns: Path
    input: Path

    def mounts(self) -> tuple[tuple[str, str, bool], ...]:
        """(host path, container path, read-only) of each of the chat's folders."""
        return ((str(self.workspace), WORKSPACE_PATH, False), (str(self.claude_config), CLAUDE_CONFIG_PATH, False),
                (str(self.turns), TURNS_PATH, False), (str(self.input), INPUT_PATH, True))

    def agent_folders(self) -> tuple[Path, ...]:
        """What the agent can write, and so what its disk budget counts."""
        return (self.workspace, self.claude_config, self.turns)


def chat_paths(settings: Settings, chat: ChatSettings) -> ChatPaths:
    root = settings.chats_dir / chat.chat_id
    return ChatPaths(root=root, workspace=chat.workspace, claude_config=root / "claude", turns=root / "turns",
                     input=root / "input")


def secret_path(settings: Settings) -> Path:
    """The instance's secret (`credentials`): root's, 0600, never mounted into an agent's container."""
    return settings.data_dir / "secret"


def gateway_settings_path(settings: Settings) -> Path:
    """The model gateway's settings (the model's key among them): root's, 0600, mounted read-only into its container."""
    return settings.data_dir / "gateway.json"


def run_dir(settings: Settings) -> Path:
    return settings.data_dir / "run"


def chat_run_dir(settings: Settings, chat_id: str) -> Path:
    return run_dir(settings) / chat_id


def model_socket_dir(settings: Settings) -> Path:
    """Where the model gateway binds each chat's socket, in a folder per chat that the chat's container mounts: the
    run folder on one host; on Swarm the node's own folder, one gateway per node."""
    return NODE_FOLDER / settings.instance / "model" if settings.runtime == "swarm" else run_dir(settings)


def chat_model_socket_dir(settings: Settings, chat_id: str) -> Path:
    return model_socket_dir(settings) / chat_id


def prepare(paths: ChatPaths, uid: int) -> None:
    """Make the chat's folders: the agent's owned by its uid (chowned through an fd, never a path the agent
    could change), the input folder root's and readable by the agent."""
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.input.mkdir(exist_ok=True)
    os.chmod(paths.input, 0o755, follow_symlinks=False)  # whatever the umask: the agent host reads its requests
    with untrusted.directory(paths.root) as root:
        for folder in (paths.claude_config, paths.turns):
            untrusted.make_owned_dir(root, folder.name, uid)
    paths.workspace.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with untrusted.directory(paths.workspace.parent) as parent:
        untrusted.make_owned_dir(parent, paths.workspace.name, uid)


def prepare_instance(settings: Settings) -> None:
    """The folders of the whole instance: the chats' (root's only) and the run folder (readable by agents)."""
    settings.chats_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run = run_dir(settings)
    run.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(run, 0o755, follow_symlinks=False)
