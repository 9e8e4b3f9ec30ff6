from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.fakes.anthropic import FakeAnthropic
from tests.harness import AGENT_IMAGE, StoreView, write_config


@pytest.fixture(scope="session")
def fake_api() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The real engine, checked independently of the orchestrator's runtime module."""
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(AGENT_IMAGE)
    except docker.errors.DockerException as exc:
        pytest.fail(f"these tests need the Docker engine and the image {AGENT_IMAGE} "
                    f"(./scripts/dev setup makes both): {exc}")
    yield client
    client.close()


@pytest.fixture
def instance(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh container-name prefix per test; its containers are removed afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    for container in docker_client.containers.list(all=True, filters={"label": f"orchestrator.instance={name}"}):
        container.remove(force=True)


@pytest.fixture
def make_config(tmp_path: Path, instance: str, fake_api: FakeAnthropic) -> Callable[..., Path]:
    def make(**sections: Any) -> Path:
        return write_config(tmp_path / "config.yaml", instance=instance, api_url=fake_api.base_url, **sections)

    return make


@pytest.fixture
def store_view(tmp_path: Path) -> StoreView:
    return StoreView(tmp_path / "data" / "orchestrator.db")
