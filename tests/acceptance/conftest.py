"""Fixtures for tests that drive the orchestrator through the fake Feishu."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator


@pytest.fixture
def feishu() -> Iterator[FakeFeishu]:
    fake = FakeFeishu().start()
    yield fake
    fake.stop()


@pytest.fixture
def feishu_config(make_config, feishu: FakeFeishu) -> Callable[..., Path]:
    def make(feishu_overrides: dict | None = None, **sections) -> Path:
        block = {"app_id": feishu.app_id, "app_secret": feishu.app_secret, "domain": feishu.base_url,
                 **(feishu_overrides or {})}
        sections.setdefault("access", {"allowed_chats": "*", "allowed_users": "*"})
        return make_config(feishu=block, **sections)

    return make


@pytest.fixture
def start(feishu: FakeFeishu) -> Iterator[Callable[[Path], Orchestrator]]:
    """Start the orchestrator and wait for its long connection; stopped at the end of the test."""
    started: list[Orchestrator] = []

    def run(config: Path, connections: int = 1) -> Orchestrator:
        bot = Orchestrator(config)
        started.append(bot)
        feishu.wait_connected(timeout=60, total=connections)
        return bot

    yield run
    for bot in started:
        if bot.process.poll() is None:
            bot.kill()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """On a failure, the tail of every orchestrator log the test wrote, in the report (CI shows nothing else)."""
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and call.when == "call" and tmp_path is not None:
        for log in sorted(Path(tmp_path).glob("orchestrator-*.log")):
            report.sections.append((f"log {log.name} (tail)", log.read_text(errors="replace")[-6000:]))
    return report
