"""The orchestrator deployed as a container (images/orchestrator, compose.yaml, deploy/): the real image, run
with host networking, the Docker socket and the data dir mounted at the same path inside and out, against
the fake Feishu and the fake Messages API on 127.0.0.1."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
import yaml
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from orchestrator.config import load_settings
from orchestrator.service import FLUSH_SECONDS, INTERRUPT_WAIT_SECONDS
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import StoreView, chat, wait_answer, wait_until

REPO = Path(__file__).resolve().parents[2]
IMAGE = "orchestrator:latest"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONFIG_PATH = "/etc/orchestrator/config.yaml"  # where the image's command reads it

# Ryuk (testcontainers' reaper) would have to be pulled; the fixtures below remove what they start.
testcontainers_config.ryuk_disabled = True


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", str(value))
    assert match, f"{value!r}: expected a duration in seconds like 120s"
    return float(match.group(1))


def compose_service() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["orchestrator"]


@pytest.fixture(scope="session")
def orchestrator_image(docker_client: docker.DockerClient) -> str:
    """Built as ./scripts/dev setup builds it: with cached layers this takes about a second, and a changed
    package is rebuilt, so the test never runs a stale image."""
    # build.sh reads EXTRA_CA_BUNDLE itself; otherwise the host's bundle, as scripts/dev passes it.
    use_host_bundle = not os.environ.get("EXTRA_CA_BUNDLE") and HOST_CA_BUNDLE.exists()
    ca = ["--ca-bundle", str(HOST_CA_BUNDLE)] if use_host_bundle else []
    build = subprocess.run([str(REPO / "images" / "build.sh"), "--orchestrator", "--tag", IMAGE, *ca],
                           capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        pytest.fail(f"images/build.sh --orchestrator failed:\n{build.stdout}\n{build.stderr}")
    return IMAGE


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def service(orchestrator_image: str, instance: str, feishu_config: Callable[..., Path], fake_api: FakeAnthropic,
            data_dir: Path) -> Iterator[DockerContainer]:
    """The service's container, started as compose.yaml starts it (host networking instead of a bridge, to
    reach the fakes). It carries the instance label, so the `instance` fixture removes it with the chat
    containers; the service itself only ever touches containers labelled orchestrator.managed=true."""
    config = feishu_config(data_dir=str(data_dir))  # absolute: the same path in the container
    container = (DockerContainer(orchestrator_image)
                 .with_name(f"{instance}-service")
                 .with_volume_mapping("/var/run/docker.sock", "/var/run/docker.sock", "rw")
                 .with_volume_mapping(str(config), CONFIG_PATH, "ro")
                 .with_volume_mapping(str(data_dir), str(data_dir), "rw")
                 .with_kwargs(network_mode="host", labels={"orchestrator.instance": instance}))
    container.start()
    yield container
    print(f"---- the service's log ----\n{logs(container)}")  # shown when the test fails
    container.stop()  # removes it (forced)


def logs(container: DockerContainer) -> str:
    return container.get_wrapped_container().logs().decode(errors="replace")


def test_the_containerised_service_answers_through_the_mounted_socket_and_drains_on_docker_stop(
        service: DockerContainer, feishu: FakeFeishu, fake_api: FakeAnthropic, docker_client: docker.DockerClient,
        instance: str, data_dir: Path, store_view: StoreView) -> None:
    try:
        feishu.wait_connected(timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the service's log:\n{logs(service)}") from None
    chat_id, marker = chat(), uuid.uuid4().hex[:8]
    feishu.push_event(feishu.text_event(chat_id, f"hello from a container {marker}"))
    wait_answer(feishu, chat_id, f"Fake answer to: hello from a container {marker}")

    # The chat's container was made through the mounted socket, with host paths for its mounts.
    [chat_container] = docker_client.containers.list(filters={"label": [
        "orchestrator.managed=true", f"orchestrator.chat_id={chat_id}", f"orchestrator.instance={instance}"]})
    assert chat_container.name == f"{instance}-{chat_id}"
    sources = {m["Destination"]: m["Source"] for m in chat_container.attrs["Mounts"]}
    assert sources["/workspace"] == str(data_dir / "chats" / chat_id / "workspace")
    assert (data_dir / "chats" / chat_id / "turns").is_dir()  # written inside, visible outside
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["delivered"], 30, "delivered")

    # `docker stop` while a turn runs: SIGTERM reaches the service, which lets the turn finish, delivers
    # its answer, stops the chat's container and exits 0, well within compose.yaml's grace period.
    feishu.push_event(feishu.text_event(chat_id, f"SLOW 3 finish me {marker}"))
    wait_until(lambda: fake_api.requests_mentioning(f"SLOW 3 finish me {marker}"), 60, "the slow turn to start")
    grace = _seconds(compose_service()["stop_grace_period"])
    wrapped = service.get_wrapped_container()
    started = time.monotonic()
    wrapped.stop(timeout=int(grace))
    took = time.monotonic() - started
    wrapped.reload()
    state = wrapped.attrs["State"]
    log = logs(service)
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False), log
    assert took < grace, f"stopping took {took:.1f} s; log:\n{log}"
    assert "SIGTERM: stopping" in log
    wait_answer(feishu, chat_id, f"Fake answer to: SLOW 3 finish me {marker}", timeout=1)
    assert [m["state"] for m in store_view.messages(chat_id)] == ["delivered", "delivered"]
    chat_container.reload()
    assert chat_container.status == "exited"


def test_compose_unit_and_config_agree_on_the_data_dir_and_outlast_the_drain() -> None:
    """compose.yaml, deploy/orchestrator.service and deploy/config.compose.yaml, read as files."""
    settings = load_settings(REPO / "deploy" / "config.compose.yaml",
                             {"DATA_DIR": "/srv/elsewhere", "FEISHU_APP_ID": "cli_x", "FEISHU_APP_SECRET": "s"})
    assert settings.data_dir == Path("/srv/elsewhere")
    assert settings.feishu.configured
    # SIGTERM: drain, then SIGINT and wait, flush the outbox, stop the containers (in parallel).
    longest_stop = (settings.shutdown.drain_timeout + INTERRUPT_WAIT_SECONDS + FLUSH_SECONDS
                    + settings.containers.stop_timeout)

    service = compose_service()
    assert _seconds(service["stop_grace_period"]) > longest_stop
    assert service["restart"] == "unless-stopped"
    data_dir = service["environment"]["DATA_DIR"]
    assert f"{data_dir}:{data_dir}" in service["volumes"]  # the same path inside and out
    assert any(v.startswith("/var/run/docker.sock:") for v in service["volumes"])
    assert any(v.endswith(f":{CONFIG_PATH}:ro") for v in service["volumes"])

    unit = (REPO / "deploy" / "orchestrator.service").read_text()
    timeout_stop = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))
    docker_stop = float(re.search(r"docker stop --time (\d+)", unit).group(1))
    assert timeout_stop > docker_stop > longest_stop
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.MULTILINE)
    assert re.search(r"^Restart=on-failure$", unit, re.MULTILINE)
    assert "--volume ${DATA_DIR}:${DATA_DIR}" in unit
