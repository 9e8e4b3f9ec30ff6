"""The orchestrator deployed as a container (images/orchestrator, compose.yaml, deploy/): the real image, run
with compose.yaml's own hardening (host network, read-only root, capabilities, limits, healthcheck), the
Docker socket and the data dir mounted at the same path inside and out, against the fake Feishu and the
fake Messages API on 127.0.0.1; and the files the service writes kept to itself."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from orchestrator.config import load_settings
from orchestrator.service import FLUSH_SECONDS, INTERRUPT_WAIT_SECONDS
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator, StoreView, chat, free_port, wait_answer, wait_until

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


def compose_hardening(service: dict) -> dict[str, Any]:
    """compose.yaml's hardening as docker-py's run() arguments, so the test runs what compose would."""
    health = service["healthcheck"]
    path, _, options = service["tmpfs"][0].partition(":")
    return {
        "network_mode": service["network_mode"], "read_only": service["read_only"], "tmpfs": {path: options},
        "cap_drop": service["cap_drop"], "cap_add": service["cap_add"], "security_opt": service["security_opt"],
        "mem_limit": service["mem_limit"], "memswap_limit": service["memswap_limit"],
        "pids_limit": service["pids_limit"],
        "healthcheck": {"test": health["test"], "retries": health["retries"],
                        **{key: int(_seconds(health[key]) * 1e9) for key in ("interval", "timeout", "start_period")}},
    }


# Linux capability numbers (include/uapi/linux/capability.h), to read a process's CapEff.
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def effective_capabilities(status: dict[str, str]) -> set[str]:
    mask = int(status["CapEff"], 16)
    return {name for bit, name in enumerate(CAPABILITIES) if mask & (1 << bit)}


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


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
    path.mkdir(mode=0o755)  # as an operator might leave it: the service makes it 0700
    return path


@pytest.fixture
def service(orchestrator_image: str, instance: str, feishu_config: Callable[..., Path], fake_api: FakeAnthropic,
            data_dir: Path) -> Iterator[DockerContainer]:
    """The service's container, started with compose.yaml's settings. It carries the instance label, so the
    `instance` fixture removes it with the chat containers; the service itself only ever touches containers
    labelled orchestrator.managed=true."""
    # data_dir absolute: the same path in the container. /healthz on the host's loopback (host network).
    config = feishu_config(data_dir=str(data_dir), metrics={"listen": f"127.0.0.1:{free_port()}"})
    hardening = compose_hardening(compose_service())
    tmpfs = hardening.pop("tmpfs")  # testcontainers passes tmpfs itself
    container = (DockerContainer(orchestrator_image)
                 .with_name(f"{instance}-service")
                 .with_volume_mapping("/var/run/docker.sock", "/var/run/docker.sock", "rw")
                 .with_volume_mapping(str(config), CONFIG_PATH, "ro")
                 .with_volume_mapping(str(data_dir), str(data_dir), "rw")
                 .with_kwargs(**hardening, labels={"orchestrator.instance": instance}))
    container.tmpfs = tmpfs  # the engine's option strings, as compose passes them
    container.start()
    yield container
    print(f"---- the service's log ----\n{logs(container)}")  # shown when the test fails
    container.stop()  # removes it (forced)


def logs(container: DockerContainer) -> str:
    return container.get_wrapped_container().logs().decode(errors="replace")


def assert_hardened(container: docker.models.containers.Container) -> None:
    """compose.yaml's hardening, as the engine recorded it and as the kernel applies it to the service."""
    wanted = compose_service()
    host, config = container.attrs["HostConfig"], container.attrs["Config"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(wanted["cap_add"])
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Memory"] == host["MemorySwap"] == 1024**3
    assert host["PidsLimit"] == wanted["pids_limit"]
    assert host["NetworkMode"] == "host"
    assert config["Healthcheck"]["Test"] == wanted["healthcheck"]["test"]
    assert config["User"] in ("", "0", "root")  # root, with the capabilities above only
    service_process = process_status(container.attrs["State"]["Pid"])  # tini, and the service it started
    assert effective_capabilities(service_process) == set(wanted["cap_add"])
    assert service_process["NoNewPrivs"] == "1"
    probe = container.exec_run(["touch", "/etc/written"])
    assert probe.exit_code != 0 and b"Read-only file system" in probe.output


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
    wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["delivered"], 30, "delivered")

    # Hardened as compose.yaml says, and still able to do all of the above; healthy by its own healthcheck.
    wrapped = service.get_wrapped_container()
    wrapped.reload()
    assert_hardened(wrapped)
    interval = _seconds(compose_service()["healthcheck"]["interval"])
    wait_until(lambda: (wrapped.reload(), wrapped.attrs["State"]["Health"]["Status"])[1] == "healthy",
               interval * 2 + 10, f"the healthcheck to pass; log:\n{logs(service)}")
    # What it wrote on the host is its own (umask 077, data_dir 0700 though it was made 0755).
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert private(data_dir / "orchestrator.db")

    # `docker stop` while a turn runs: SIGTERM reaches the service, which lets the turn finish, delivers
    # its answer, stops the chat's container and exits 0, well within compose.yaml's grace period.
    feishu.push_event(feishu.text_event(chat_id, f"SLOW 3 finish me {marker}"))
    wait_until(lambda: fake_api.requests_mentioning(f"SLOW 3 finish me {marker}"), 60, "the slow turn to start")
    grace = _seconds(compose_service()["stop_grace_period"])
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


def test_the_service_keeps_what_it_writes_to_itself(make_config, tmp_path: Path) -> None:
    """umask 077 and data_dir 0700 for `orchestrator run` itself (any deployment), while the agent, another
    uid, still works in its chat's folders."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)  # as an operator might leave it
    marker = uuid.uuid4().hex[:8]
    bot = Orchestrator(make_config(), chat="umask")
    bot.send(f"private {marker}")
    bot.wait_output(f"Fake answer to: private {marker}")
    assert bot.finish() == 0

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    store = data_dir / "orchestrator.db"  # made by SQLite with 0644 less the umask
    assert private(store), oct(store.stat().st_mode)
    workspace = data_dir / "chats" / "umask" / "workspace"
    assert workspace.stat().st_uid == load_settings(tmp_path / "config.yaml").agent.uid


def test_compose_unit_and_config_agree_on_the_data_dir_and_outlast_the_drain() -> None:
    """compose.yaml, deploy/orchestrator.service and deploy/config.compose.yaml, read as files."""
    settings = load_settings(REPO / "deploy" / "config.compose.yaml",
                             {"DATA_DIR": "/srv/elsewhere", "FEISHU_APP_ID": "cli_x", "FEISHU_APP_SECRET": "s"})
    assert settings.data_dir == Path("/srv/elsewhere")
    assert settings.feishu.configured
    assert settings.metrics.listen, "compose.yaml's healthcheck needs metrics.listen"
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

    unit = systemd_unit(REPO / "deploy" / "orchestrator.service")
    assert float(unit["TimeoutStopSec"][0]) > longest_stop
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["on-failure"]
    [unit_data_dir] = [value.removeprefix("DATA_DIR=") for value in unit["Environment"] if value.startswith("DATA_")]
    assert unit["ReadWritePaths"] == [unit_data_dir]  # the one writable place
    assert unit["ExecStart"] == ["/opt/orchestrator/bin/orchestrator run --config /etc/orchestrator/config.yaml"]
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                 "UMask": "0077", "KillMode": "mixed"}
    assert {key: unit[key] for key in hardening} == {key: [value] for key, value in hardening.items()}
    assert unit["MemoryMax"] and unit["TasksMax"]
    # the same capabilities as the container's, whatever the deployment
    assert sorted(unit["CapabilityBoundingSet"][0].split()) == sorted(f"CAP_{c}" for c in service["cap_add"])


def logical_lines(path: Path) -> list[str]:
    """The lines of a file whose lines may end with a backslash to continue, joined; no blanks or comments."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(("#", ";"))]


def systemd_unit(path: Path) -> dict[str, list[str]]:
    """Each directive's values in file order (sections not told apart)."""
    directives: dict[str, list[str]] = {}
    for line in logical_lines(path):
        if not line.startswith("["):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_every_directive_of_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` (no running systemd needed) names unknown keys and bad values. It also wants
    ExecStart's program to exist, which only an installed service has: that one line points elsewhere here."""
    unit = tmp_path / "orchestrator.service"
    unit.write_text((REPO / "deploy" / "orchestrator.service").read_text()
                    .replace("/opt/orchestrator/bin/orchestrator", shutil.which("true") or "/bin/true"))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_the_lock_pins_every_dependency_of_the_service_with_hashes() -> None:
    """requirements.lock (what the image installs with --require-hashes) still matches pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pinned = {}
    for entry in logical_lines(REPO / "requirements.lock"):
        match = re.fullmatch(r"([\w.-]+)==(\S+)(\s+--hash=sha256:[0-9a-f]{64})+", entry)
        assert match, f"not a pinned requirement with hashes: {entry[:100]}"
        pinned[canonicalize_name(match[1])] = match[2]
    for requirement in map(Requirement, project["project"]["dependencies"] + project["build-system"]["requires"]):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in requirements.lock: regenerate it"
        version = pinned[name]
        assert requirement.specifier.contains(version), f"{requirement}: the lock has {version}; regenerate it"
