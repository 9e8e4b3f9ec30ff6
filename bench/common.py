"""What every benchmark needs: the fakes, a config, the orchestrator as a subprocess, a stand-in CLI image,
figures. Figures are ratios against a baseline measured in the same run; absolute times are noted as such."""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from orchestrator.agent import cli_argv
from orchestrator.config import AgentSettings, ChatOptions
from tests.conftest import remove_instance
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import AGENT_IMAGE, MODEL_KEY, Orchestrator, write_config

STUB_IMAGE = "claude-stub:latest"
STUB_DIR = Path(__file__).parent / "stub"
AGENT_USER = "1000:1000"
# The one-shot command each turn ran before issue 10 (`docker exec` per turn, the prompt as its last argument): the
# bare baselines' command.
CLI_ARGS = ["claude", "-p", "--output-format", "stream-json", "--verbose", "--permission-mode", "bypassPermissions"]
HOT_CLI_ARGS = cli_argv(AgentSettings(), ChatOptions())  # the long-lived stream-json CLI, as the agent host starts it


def stub_image(client: docker.DockerClient) -> str:
    """The agent image with a stand-in `claude` that answers at once: the orchestrator's own overhead."""
    client.images.build(path=str(STUB_DIR), tag=STUB_IMAGE, buildargs={"AGENT_IMAGE": AGENT_IMAGE}, rm=True)
    return STUB_IMAGE


@dataclass
class Rig:
    """The fakes, a data dir and a config for one benchmark; orchestrators started on it are stopped after."""

    root: Path
    instance: str
    feishu: FakeFeishu
    api: FakeAnthropic
    client: docker.DockerClient
    config: Path = Path()
    bots: list[Orchestrator] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def configure(self, image: str, **sections: Any) -> Path:
        feishu = {"app_id": self.feishu.app_id, "app_secret": self.feishu.app_secret, "domain": self.feishu.base_url,
                  **sections.pop("feishu", {})}
        self.config = write_config(self.root / "config.yaml", instance=self.instance, api_url=self.api.base_url,
                                   agent={"image": image, **sections.pop("agent", {})}, feishu=feishu,
                                   access={"allowed_chats": "*", "allowed_users": "*"}, **sections)
        return self.config

    def start(self) -> Orchestrator:
        """Start the orchestrator and wait for its long connection to the fake Feishu."""
        connections = self.feishu.connection_count
        bot = Orchestrator(self.config)
        self.bots.append(bot)
        self.feishu.wait_connected(timeout=120, total=connections + 1)
        return bot

    def env(self) -> dict[str, str]:
        """A bare container's CLI on the host's network (the cold baseline): straight to the API with its key."""
        return {"ANTHROPIC_BASE_URL": self.api.base_url, "ANTHROPIC_API_KEY": MODEL_KEY}

    def container(self, chat_id: str) -> Any:
        return self.client.containers.get(f"{self.instance}-{chat_id}")

    def reply_time(self, message_id: str, timeout: float = 120) -> float:
        """When the fake Feishu received the reply to `message_id` (the answer reaching the chat)."""
        path = f"/open-apis/im/v1/messages/{message_id}/reply"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for call in self.feishu.calls:
                if call.path == path and call.status == 200:
                    return call.time
            time.sleep(0.002)
        raise TimeoutError(f"no reply to {message_id} within {timeout} s")


@contextmanager
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    client = docker.from_env(timeout=300)
    setup = Rig(root=root, instance=f"b{uuid.uuid4().hex[:8]}", feishu=FakeFeishu().start(),
                api=FakeAnthropic(api_key=MODEL_KEY).start(), client=client)
    try:
        yield setup
    finally:
        for bot in setup.bots:
            if bot.process.poll() is None:
                bot.kill()
        remove_instance(client, setup.instance)
        setup.feishu.stop()
        setup.api.stop()
        client.close()
        shutil.rmtree(root, ignore_errors=True)


def start_chats(setup: Rig, count: int, timeout: float = 900) -> list[str]:
    """New chats, each with one answered message, so each has a running container."""
    messages = {new_message(): new_chat() for _ in range(count)}
    for message_id, chat_id in messages.items():
        setup.feishu.push_event(setup.feishu.text_event(chat_id, "start a container", message_id=message_id))
    for message_id in messages:
        setup.reply_time(message_id, timeout=timeout)
    return list(messages.values())


def new_chat() -> str:
    return f"oc_{uuid.uuid4().hex[:16]}"


def new_message() -> str:
    return f"om_{uuid.uuid4().hex}"


def timed(action: Callable[[], Any]) -> float:
    began = time.monotonic()
    action()
    return time.monotonic() - began


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def median_p95(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), percentile(samples, 0.95)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def compare(name: str, ours: list[float], bare: list[float], target: float | None) -> list[str]:
    """Median and p95 of both paths (absolute, this machine) and their ratio against the target, if it has one."""
    ours_median, ours_p95 = median_p95(ours)
    bare_median, bare_p95 = median_p95(bare)
    ratio = ours_median / bare_median
    verdict = f"target <= {target}x: {'meets' if ratio <= target else 'misses'}" if target else "no target"
    return [f"{name}: samples={len(ours)} orchestrator median={ms(ours_median)} p95={ms(ours_p95)}; "
            f"bare median={ms(bare_median)} p95={ms(bare_p95)} (absolute, this machine)",
            f"{name}: ratio={ratio:.2f}x median, {ours_p95 / bare_p95:.2f}x p95; {verdict}"]


class HotCli:
    """A bare long-lived CLI in stream-json mode in a container, started once with `docker exec -i` (no agent host,
    no orchestrator): one user line in, its stream-json out up to the result."""

    def __init__(self, container_id: str, env: dict[str, str], timeout: float = 120) -> None:
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        options = [f"--env={key}={value}" for key, value in env.items()]
        self.process = subprocess.Popen(
            ["docker", "exec", "-i", f"--user={AGENT_USER}", "--workdir=/workspace", *options, container_id,
             *HOT_CLI_ARGS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0)
        assert self.process.stdin and self.process.stdout
        self._stdin, self._stdout = self.process.stdin, self.process.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)
        self._buffer = b""

    def ask(self, text: str) -> float:
        """Seconds from writing the user line to reading its result line."""
        line = json.dumps({"type": "user", "message": {"role": "user", "content": text}}).encode() + b"\n"
        began = time.monotonic()
        self._stdin.write(line)
        while not any(json.loads(out).get("type") == "result" for out in self._lines(began + self.timeout)):
            pass
        return time.monotonic() - began

    def _lines(self, deadline: float) -> list[bytes]:
        if not self._selector.select(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the bare hot CLI gave no result within {self.timeout} s")
        data = os.read(self._stdout, 1 << 20)
        if not data:
            self._stderr.seek(0)
            raise RuntimeError(f"the bare hot CLI ended: {self._stderr.read()[-500:]!r}")
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        return [line for line in lines if line.startswith(b"{")]

    def close(self) -> None:
        self._stdin.close()  # the CLI ends after its stdin closes
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._selector.close()
        self._stderr.close()


def main(run: Callable[[bool], list[str]], description: str) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few samples, for CI: seconds, not minutes")
    args = parser.parse_args()
    for line in run(args.quick):
        print(line, flush=True)
