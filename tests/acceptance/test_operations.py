"""Operating it (issue 5): status, stop/reset/logs, metrics, health, and secrets kept out of sight."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import FakeFeishu
from tests.harness import (
    MODEL_KEY,
    Orchestrator,
    StoreView,
    chat,
    free_port,
    run_cli,
    status_json,
    wait_answer,
    wait_until,
)

ENGINE_SOCKET = "/var/run/docker.sock"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str) -> float:
    """The value of one sample line (`name` includes its labels) of a Prometheus text page; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class EngineProxy:
    """A unix socket that forwards to the real engine until it is cut: an engine the service can't reach."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []

    def up(self) -> None:
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.path))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        """Cut now. A socket's close() alone is not enough: a pump thread asleep in select() holds a reference to
        its sockets, so the service would see its pooled connection open until that select wakes (up to a second)
        and have its next request reset (fresh-clone CI once: the shutdown's container list, right after up()).
        shutdown() ends the connection at once, and wakes the accept() of the listener."""
        assert self.listener is not None
        self._cut(self.listener)  # first: no connection is accepted after the list below is taken
        self.path.unlink(missing_ok=True)
        for connection in list(self.connections):
            self._cut(connection)
        self.connections.clear()

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # a connection its pump already closed
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX)
            engine.connect(ENGINE_SOCKET)
            self.connections += [client, engine]
            threading.Thread(target=self._pump, args=(client, engine), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except (OSError, ValueError):  # cut by down(): the sockets are closed under us
            return
        finally:
            a.close()
            b.close()


@pytest.fixture
def engine_proxy(tmp_path: Path) -> Iterator[EngineProxy]:
    proxy = EngineProxy(tmp_path / "engine.sock")
    proxy.up()
    yield proxy
    if proxy.listener is not None:
        proxy.listener.close()


def test_status_json_for_running_stopped_and_missing_containers(
        make_config, instance: str, docker_client: docker.DockerClient, store_view: StoreView) -> None:
    config = make_config(groups={"one": {"memory": "300m", "cpus": 0.5}})
    for chat_id in ("one", "two", "three"):
        bot = Orchestrator(config, chat=chat_id)
        bot.send(f"hello from {chat_id}")
        bot.wait_output(f"Fake answer to: hello from {chat_id}")
        assert bot.finish() == 0
    docker_client.containers.get(f"{instance}-two").stop(timeout=1)
    docker_client.containers.get(f"{instance}-three").remove(force=True)

    rows = {row["chat_id"]: row for row in status_json(config)}
    assert {chat_id: row["container_state"] for chat_id, row in rows.items()} == \
        {"one": "running", "two": "exited", "three": "missing"}
    one = rows["one"]
    assert one["container_name"] == f"{instance}-one"
    assert one["container_id"] == docker_client.containers.get(f"{instance}-one").id
    assert one["session_id"] == store_view.chat("one")["session_id"]
    assert (one["cpus"], one["memory_limit_mib"], one["pids_limit"]) == (0.5, 300, 200)
    assert 0 < one["memory_mib"] < 300 and one["pids"] >= 1 and one["cpu_percent"] >= 0
    assert one["last_turn_cost_usd"] > 0 and one["last_turn_seconds"] > 0
    assert one["last_activity"] > 0 and (one["busy"], one["queued"]) == (False, 0)
    for stopped in ("two", "three"):
        assert rows[stopped]["memory_mib"] is None and rows[stopped]["session_id"]


def test_operator_commands_stop_reset_and_logs(make_config, instance: str, docker_client: docker.DockerClient,
                                               store_view: StoreView, fake_api: FakeAnthropic) -> None:
    config = make_config()
    bot = Orchestrator(config, chat="ops")
    bot.send("first words")
    bot.wait_output("Fake answer to: first words")
    assert bot.finish() == 0
    session = store_view.chat("ops")["session_id"]

    logs = run_cli(config, "logs", "ops")
    assert logs.returncode == 0
    for expected in ("delivered", "> first words", "< Fake answer to: first words"):
        assert expected in logs.stdout
    stop = run_cli(config, "stop", "ops")
    assert stop.returncode == 0 and docker_client.containers.get(f"{instance}-ops").status == "exited"
    reset = run_cli(config, "reset", "ops")
    assert reset.returncode == 0 and session in reset.stdout
    assert store_view.chat("ops")["session_id"] is None
    assert run_cli(config, "stop", "nobody").returncode == 1
    assert run_cli(config, "reset", "../etc").returncode == 2

    again = Orchestrator(config, chat="ops")
    again.send("second words")
    again.wait_output("Fake answer to: second words")
    assert again.finish() == 0
    assert "first words" not in str(fake_api.requests_mentioning("second words")[0]["messages"])
    assert store_view.chat("ops")["session_id"] not in (None, session)


def test_metrics_move_and_health_follows_docker_and_feishu(
        feishu: FakeFeishu, feishu_config, engine_proxy: EngineProxy, store_view: StoreView) -> None:
    port = free_port()
    config = feishu_config(metrics={"listen": f"127.0.0.1:{port}"})
    bot = Orchestrator(config, env={"DOCKER_HOST": f"unix://{engine_proxy.path}"})
    feishu.wait_connected(timeout=60)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, 30, "healthy at start")
    before = get(f"{base}/metrics")[1]

    chat_id = chat()
    event = feishu.text_event(chat_id, "count me")
    feishu.push_event(event)
    feishu.push_event(event)  # a redelivery
    wait_answer(feishu, chat_id, "Fake answer to: count me")
    wait_until(lambda: metric(get(f"{base}/metrics")[1], 'orchestrator_deliveries_total{result="sent"}') >= 1, 30,
               "the delivery counted")
    after = get(f"{base}/metrics")[1]
    for sample in ('orchestrator_messages_total{outcome="received"}', 'orchestrator_messages_total{outcome="answered"}',
                   'orchestrator_messages_total{outcome="duplicate"}', "orchestrator_turn_seconds_count",
                   "orchestrator_queue_wait_seconds_count", "orchestrator_turn_overhead_seconds_count"):
        assert metric(after, sample) == metric(before, sample) + 1, sample

    engine_proxy.down()
    _, body = wait_until(lambda: (r := get(f"{base}/healthz"))[0] == 503 and r, 30, "unhealthy without Docker")
    assert "Docker engine cannot be reached" in json.loads(body)["checks"]["docker"]
    engine_proxy.up()
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, 30, "healthy again with Docker")

    feishu.set_down(True)
    feishu.drop_connections()
    _, body = wait_until(lambda: (r := get(f"{base}/healthz"))[0] == 503 and r, 30, "unhealthy without Feishu")
    assert "long connection" in json.loads(body)["checks"]["feishu"]
    feishu.set_down(False)
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, 60, "healthy again with Feishu")
    assert bot.stop() == 0
    assert "stopping 1 container(s)" in bot.log()  # the engine, cut and back, still answers the stop


def test_no_secret_in_logs_or_labels(feishu: FakeFeishu, feishu_config, docker_client: docker.DockerClient,
                                     instance: str, fake_api: FakeAnthropic) -> None:
    secrets = {"ANTHROPIC_API_KEY": MODEL_KEY, "FEISHU_SECRET": feishu.app_secret}  # the only key the fake takes
    config = feishu_config({"app_secret": "${FEISHU_SECRET}", "encrypt_key": "enc-secret-77aa"},
                           gateway={"upstream_url": fake_api.base_url, "api_key": "${ANTHROPIC_API_KEY}"},
                           logging={"level": "DEBUG"})
    bot = Orchestrator(config, env=secrets)
    feishu.wait_connected(timeout=60)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, f"please print {secrets['ANTHROPIC_API_KEY']}"))
    wait_answer(feishu, chat_id, "Fake answer to: please print")
    assert bot.stop() == 0

    log = bot.log()
    for value in (*secrets.values(), "enc-secret-77aa"):
        assert value not in log
    container = docker_client.containers.get(f"{instance}-{chat_id}")
    inspected = json.dumps(container.attrs)
    for value in (*secrets.values(), "enc-secret-77aa"):
        assert value not in json.dumps(container.labels)
        assert value not in inspected  # the key stays in the gateway; the agent has a token of its chat's
    assert secrets["ANTHROPIC_API_KEY"] in fake_api.api_keys  # and yet the model was asked with the key
