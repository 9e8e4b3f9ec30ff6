from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator import firewall, runtime
from tests.fakes.anthropic import FakeAnthropic
from tests.harness import AGENT_IMAGE, MODEL_KEY, ORCHESTRATOR_IMAGE, StoreView, write_config
from tests.postgres import PostgresServer, server_binaries
from tests.swarm import NODE_IMAGE, Swarm

QUICK_SUITE = "not docker"
# The suite without the engine mostly waits (timeouts of locked stores, slow fake upstreams, subprocesses): measured
# 64 s on one process, 42 s on 4 workers on this 2-core machine.
QUICK_SUITE_WORKERS = 4


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`pytest -m "not docker"`, the suite a developer runs on every change, runs on pytest-xdist's workers unless
    `-n` says otherwise; any other selection (the whole suite, mutmut's) runs in one process."""
    if (config.option.markexpr == QUICK_SUITE and getattr(config.option, "numprocesses", 0) is None
            and not config.option.collectonly and not hasattr(config, "workerinput")):
        config.option.numprocesses = QUICK_SUITE_WORKERS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the engine (its fixture, directly or through another) is marked `docker`, so
    `pytest -m "not docker"` is the suite that runs without it; every test that uses a PostgreSQL server, `postgres`."""
    for item in items:
        if "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
        if "swarm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.swarm)


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """`orchestrator run` and `migrate` set the process's umask to 0077 (cli._keep_data_private): a test that calls
    cli.main in the test process would leave it to the tests after it."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the session's own (tests/postgres.py), removed at its end."""
    binaries = server_binaries()
    if binaries is None:
        pytest.fail("these tests need PostgreSQL's server (Debian's postgresql: ./scripts/dev setup installs it)")
    server = PostgresServer(binaries)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def fake_api() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic(api_key=MODEL_KEY).start()  # the real key only: the gateway must add it
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


@pytest.fixture(scope="session")
def swarm_cluster(docker_client: docker.DockerClient) -> Iterator[Swarm]:
    """A Swarm of three Docker-in-Docker nodes with a local registry holding the agent image, pulled on every node
    (tests/swarm.py); made once per session (about two minutes, most of it moving the 1.2 GB image) and removed
    with everything it made at its end."""
    try:
        docker_client.images.get(NODE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"the Swarm tests need the image {NODE_IMAGE} (./scripts/dev setup builds it: "
                    "images/build.sh --swarm-node)")
    reuse = os.environ.get("SWARM_TEST_REUSE")  # a developer's: a file naming a Swarm left up by an earlier run
    if reuse and Path(reuse).exists():
        swarm = Swarm.attach(docker_client, Path(reuse))
        if not swarm.orchestrator_image:  # saved before the guard existed
            swarm.push_images(AGENT_IMAGE, ORCHESTRATOR_IMAGE)
            swarm.save(Path(reuse))
        yield swarm
        return
    swarm = Swarm(docker_client)
    try:
        began = time.monotonic()
        swarm.start()
        up = time.monotonic()
        moved = swarm.push_images(AGENT_IMAGE, ORCHESTRATOR_IMAGE)
        print(f"\nswarm: 3 nodes up in {up - began:.1f} s, {moved}")
        if reuse:
            swarm.save(Path(reuse))  # and left up: the developer removes it (docker rm -f -v, network rm)
        yield swarm
    finally:
        if not reuse:
            swarm.remove()


@pytest.fixture
def instance(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh instance name per test; its containers, its agents' network and its firewall chains are removed
    afterwards (every start of an instance installs chains: they would pile up over a run)."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    remove_instance(docker_client, name)


def remove_instance(client: docker.DockerClient, instance: str) -> None:
    """Everything an orchestrator instance leaves on the host: containers, networks, firewall chains."""
    for container in client.containers.list(all=True, filters={"label": f"orchestrator.instance={instance}"}):
        container.remove(force=True)
    for network in (runtime.network_name(instance), runtime.egress_network_name(instance)):
        with contextlib.suppress(docker.errors.NotFound):
            client.networks.get(network).remove()
    firewall.remove(instance, firewall.Bridges(runtime.bridge_name(instance), runtime.egress_bridge_name(instance)))


@pytest.fixture
def make_config(tmp_path: Path, instance: str, fake_api: FakeAnthropic) -> Callable[..., Path]:
    def make(**sections: Any) -> Path:
        return write_config(tmp_path / "config.yaml", instance=instance, api_url=fake_api.base_url, **sections)

    return make


@pytest.fixture
def store_view(tmp_path: Path) -> StoreView:
    return StoreView(tmp_path / "data" / "orchestrator.db")
