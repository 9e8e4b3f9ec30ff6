"""Drives the real `orchestrator` command as a subprocess, and reads its SQLite store independently."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.extras
import yaml

from tests.fakes.feishu import FakeFeishu

T = TypeVar("T")
AGENT_IMAGE = os.environ.get("ORCHESTRATOR_TEST_IMAGE", "claude-runner:latest")
ORCHESTRATOR_IMAGE = "orchestrator:latest"  # ./scripts/dev setup builds it (the model gateway's, the Swarm guard's)
# The model's real key in tests: recognizable, so a test can look for it wherever an agent could (it must be nowhere
# but in the gateway); the fake API answers only requests that carry it.
MODEL_KEY = "sk-ant-api03-CANARY-model-key-0123456789abcdef"


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_config(path: Path, *, instance: str, api_url: str, **sections: Any) -> Path:
    """A config for tests: the instance network (the fake API on 127.0.0.1 is reached through the model gateway,
    which alone holds MODEL_KEY), small caps, fast timeouts."""
    config: dict[str, Any] = {
        "data_dir": "./data",
        "instance": instance,
        "agent": {"image": AGENT_IMAGE, "idle_timeout": 60},
        "gateway": {"upstream_url": api_url, "api_key": MODEL_KEY},
        "budgets": {"footer": False},  # answers as the model gave them; tests of spending turn it on
        "defaults": {"cpus": 1, "memory": "512m", "pids_limit": 200},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(config))
    return path


class Orchestrator:
    """`orchestrator run`. In console mode (no Feishu in the config) stdin lines are messages to one chat
    and stdout the answers; with Feishu configured it talks to the fake Feishu and stdin is unused."""

    def __init__(self, config: Path, chat: str = "console", env: dict[str, str] | None = None) -> None:
        self.config = config
        self.stdout: list[str] = []
        self.log_path = config.parent / f"orchestrator-{chat}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(config), "--chat", chat],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.append(line.rstrip("\n"))

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def wait_output(self, text: str, timeout: float = 60) -> str:
        return wait_until(lambda: next((line for line in self.stdout if text in line), None), timeout,
                          f"{text!r} on stdout; log:\n{self.log()}")

    def finish(self, timeout: float = 120) -> int:
        """Close the input: the service answers what is queued, then exits."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.wait(timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, timeout: float = 120) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.log(), timeout, f"{text!r} in the log:\n{self.log()}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            self._reader.join(5)
            self._log.close()
        return code

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()


class StoreView:
    """Reads the orchestrator's store with the database's own driver, not through our store module: a SQLite file
    with sqlite3, a `postgresql://` URL with psycopg2."""

    def __init__(self, db: Path | str) -> None:
        self.db = db

    def _rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if isinstance(self.db, str):
            with contextlib.closing(psycopg2.connect(self.db)) as db, db, db.cursor(
                    cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
                cursor.execute(sql.replace("?", "%s"), args)
                return [dict(row) for row in cursor.fetchall()] if cursor.description else []
        with sqlite3.connect(self.db) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql, args)]

    def messages(self, chat_id: str) -> list[dict[str, Any]]:
        return self._rows("select * from messages where chat_id = ? order by id", chat_id)

    def chat(self, chat_id: str) -> dict[str, Any]:
        rows = self._rows("select * from chats where chat_id = ?", chat_id)
        assert rows, f"chat {chat_id} is not in the store"
        return rows[0]

    def set_session(self, chat_id: str, session_id: str) -> None:
        self._rows("update chats set session_id = ? where chat_id = ?", session_id, chat_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args[:1], "--config", str(config), *args[1:]],
                          capture_output=True, text=True, timeout=timeout)


def status_json(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--config", str(config), "--json"],
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


# ---- through the fake Feishu ----


def chat() -> str:
    return f"oc_{uuid.uuid4().hex[:16]}"


def answers(feishu: FakeFeishu, chat_id: str) -> list[str]:
    return [m.text for m in feishu.messages(chat_id)]


def wait_answer(feishu: FakeFeishu, chat_id: str, text: str, timeout: float = 90) -> None:
    wait_until(lambda: any(text in t for t in answers(feishu, chat_id)), timeout,
               f"{text!r} in chat {chat_id}; it shows {answers(feishu, chat_id)}")
