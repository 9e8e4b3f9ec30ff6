"""The container is a boundary (issue 9): a hostile agent, running shell commands in its own chat's container
through the fake model's tool calls, cannot make the root orchestrator write, create, chown or read a host file,
cannot leak a secret or another chat's text into a chat, cannot grow the orchestrator's memory or fill the disk,
and cannot reach the other chats' containers; the bystander chat is answered throughout.

Real engine, real agent image, real CLI, real SQLite; Feishu and the Messages API are the fakes.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.fakes.feishu import FakeFeishu
from tests.harness import Orchestrator, answers, chat, wait_answer, wait_until

MIB = 1024 * 1024
SECRET_ENV = "ORCHESTRATOR_TEST_SECRET"


def _start(feishu: FakeFeishu, config: Path, secret: str) -> Orchestrator:
    """The orchestrator with a secret in its own environment (where /proc/self/environ would show it)."""
    bot = Orchestrator(config, env={SECRET_ENV: secret})
    feishu.wait_connected(timeout=60)
    return bot


def _say(feishu: FakeFeishu, chat_id: str, text: str) -> str:
    event = feishu.text_event(chat_id, text)
    feishu.push_event(event)
    return event["event"]["message"]["message_id"]


def _ask(feishu: FakeFeishu, chat_id: str, timeout: float = 90) -> None:
    """A plain question to a chat, answered."""
    marker = uuid.uuid4().hex[:10]
    _say(feishu, chat_id, f"are you there {marker}")
    wait_answer(feishu, chat_id, f"Fake answer to: are you there {marker}", timeout)


def _in_workspace(data: Path, chat_id: str, name: str, text: str) -> str:
    """Put a script in the chat's workspace (as the test: the agent could write it itself)."""
    path = data / "chats" / chat_id / "workspace" / name
    path.write_text(text)
    os.chown(path, 1000, 1000)
    return f"/workspace/{name}"


def _background(script: str, *args: str) -> str:
    """A RUN_BASH prompt that starts `script` detached, so it outlives the tool call and the turn."""
    return f"RUN_BASH: setsid nohup bash {script} {shlex.join(args)} >/dev/null 2>&1 </dev/null & echo started"


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Owner, mode, size, mtime and the first bytes of everything under `root` but `skip` and the service's log."""
    seen = {}
    for path in [root, *root.rglob("*")]:
        if path == skip or skip in path.parents or path.name.startswith("orchestrator-"):
            continue
        info = path.lstat()
        head = path.read_bytes()[:256] if stat.S_ISREG(info.st_mode) else b""
        seen[str(path)] = (info.st_uid, info.st_mode, info.st_size, info.st_mtime_ns, head)
    return seen


def _all_chat_text(feishu: FakeFeishu) -> str:
    return "\n".join(m.text for m in feishu.messages())


@pytest.fixture
def canaries(tmp_path: Path) -> Iterator[Path]:
    """Host files and folders an attacker would aim at: a secret file, a root folder, a path for a new .pth."""
    folder = tmp_path / "host"
    (folder / "root-only").mkdir(parents=True)
    (folder / "secret.txt").write_text(f"CANARY-{uuid.uuid4().hex}")
    os.chmod(folder / "root-only", 0o700)
    yield folder


# ---- 1. links, folders and swaps under every name the agent can see or guess ---------------------------------

PLANTER = r"""#!/bin/bash
# plant.sh SECONDS TARGET... : for SECONDS, plant links to the TARGETs (host paths) and folders under the next 40
# turn names as they used to be (<row>-<attempt>) and under every name the agent sees in /turns and /workspace,
# and keep swapping new files for links, so a root reader that follows names hits the host.
end=$((SECONDS + $1)); shift
targets=("$@")
i=0
while [ $SECONDS -lt $end ]; do
  t=${targets[$((i % ${#targets[@]}))]}; i=$((i + 1))
  for n in $(seq 1 40); do
    for a in 1 2; do
      rm -rf "/turns/$n-$a" 2>/dev/null
      if [ $((i % 2)) = 0 ]; then ln -sfn "$t" "/turns/$n-$a"; else
        mkdir -p "/turns/$n-$a"
        for f in prompt pid output.jsonl stderr exit_code; do ln -sfn "$t" "/turns/$n-$a/$f"; done
      fi
    done
  done
  for d in /turns/*/; do
    for f in prompt pid output.jsonl stderr exit_code; do
      if [ $((i % 3)) = 0 ]; then rm -f "$d$f"; echo 0 > "$d$f"; else rm -f "$d$f"; ln -s "$t" "$d$f"; fi
    done 2>/dev/null
  done
  for f in prompt output.jsonl stderr; do rm -f "/workspace/$f"; ln -s "$t" "/workspace/$f"; done
  mkfifo /turns/fifo-$i 2>/dev/null
  sleep 0.05
done
echo done > /workspace/planter-finished
"""


def test_planted_links_and_folders_reach_no_host_file_secret_or_other_chat(
        feishu: FakeFeishu, feishu_config, tmp_path: Path, canaries: Path, docker_client: docker.DockerClient) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    config = feishu_config(agent={"idle_timeout": 15}, limits={"disk_check_interval": 2})
    bot = _start(feishu, config, secret)
    data = tmp_path / "data"
    attacker, bystander = chat(), chat()
    bystander_marker = f"bystander-{uuid.uuid4().hex[:8]}"
    _say(feishu, bystander, f"RUN_BASH: echo {bystander_marker}")
    wait_answer(feishu, bystander, f"ran: {bystander_marker}")
    _ask(feishu, attacker)
    [bystander_turn] = [p for p in (data / "chats" / bystander / "turns").iterdir()]
    site_packages = Path(subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    evil_pth = site_packages / f"zz-evil-{uuid.uuid4().hex[:6]}.pth"
    targets = [str(canaries / "secret.txt"), str(canaries / "root-only"), str(canaries / "new.pth"), str(evil_pth),
               "/proc/self/environ", "/proc/1/environ", str(data / "orchestrator.db"),
               str(bystander_turn / "output.jsonl"), str(bystander_turn), str(data / "chats" / bystander / "workspace")]
    before = _snapshot(tmp_path, skip=data)
    bystander_db = (data / "chats" / bystander / "turns").stat()

    script = _in_workspace(data, attacker, "plant.sh", PLANTER)
    _say(feishu, attacker, _background(script, "30", *targets))
    began = time.monotonic()
    while time.monotonic() - began < 30:  # the bystander is answered while the planting goes on
        _ask(feishu, bystander, timeout=60)
        _say(feishu, attacker, f"RUN_BASH: cat /turns/*/stderr 2>&1 | head -c 300; echo {uuid.uuid4().hex[:6]}")
        time.sleep(2)
    wait_until(lambda: (data / "chats" / attacker / "workspace" / "planter-finished").exists(), 60,
               "the planter to finish")
    _ask(feishu, attacker, timeout=120)  # the chat answers again once the agent stops
    _ask(feishu, bystander)

    try:
        assert not evil_pth.exists()
        assert _snapshot(tmp_path, skip=data) == before  # nothing outside the chats' folders written or chowned
        assert (canaries / "root-only").stat().st_uid == 0
        assert not (canaries / "new.pth").exists()
        assert (data / "chats" / bystander / "turns").stat().st_uid == bystander_db.st_uid
        assert (data / "orchestrator.db").stat().st_uid == 0
        everything = _all_chat_text(feishu)
        assert secret not in everything and "CANARY-" not in everything
        assert feishu.app_secret not in everything and "sk-test-fake" not in everything
        assert bystander_marker not in "\n".join(answers(feishu, attacker))  # the other chat's transcript
        assert "PATH=" not in everything  # no environ of any process
    finally:
        evil_pth.unlink(missing_ok=True)
    bot.stop()


# ---- 2. gigabytes without a newline -----------------------------------------------------------------------------

FLOODER = r"""#!/bin/bash
# flood.sh: a gigabyte without a newline into the running turn's output and stderr, big files elsewhere, and
# forged answer lines far over the answer cap.
turn=/turns/$(ls -t /turns | head -1)
head -c 1G /dev/zero | tr '\0' x >> "$turn/output.jsonl" &
head -c 1G /dev/zero | tr '\0' y >> "$turn/stderr" &
head -c 256M /dev/zero | tr '\0' z > /workspace/big-no-newline &
wait
"""

FORGER = r"""
const fs = require("fs");
const turn = "/turns/" + fs.readdirSync("/turns").map(n => [fs.statSync("/turns/" + n).mtimeMs, n]).sort().pop()[1];
const line = JSON.stringify({type: "assistant", message: {content: [{type: "text", text: "A".repeat(100000)}]}});
for (let i = 0; i < 60; i++) fs.appendFileSync(turn + "/output.jsonl", line + "\n");
console.log("forged");
"""


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_gigabytes_without_newlines_keep_the_orchestrator_small_and_the_answer_capped(
        feishu: FakeFeishu, feishu_config, tmp_path: Path) -> None:
    answer_cap = 200_000
    config = feishu_config(defaults={"disk": "20g"}, limits={"answer_bytes": answer_cap})
    bot = _start(feishu, config, "unused")
    data = tmp_path / "data"
    attacker, bystander = chat(), chat()
    _ask(feishu, attacker)
    _ask(feishu, bystander)

    flood = _in_workspace(data, attacker, "flood.sh", FLOODER)
    _say(feishu, attacker, f"RUN_BASH: bash {flood}; head -c 1G /dev/zero | tr '\\0' q")
    wait_answer(feishu, attacker, "more than 64.0 MiB of output", timeout=180)
    _ask(feishu, bystander)

    forge = _in_workspace(data, attacker, "forge.js", FORGER)
    forged_id = _say(feishu, attacker, f"RUN_BASH: node {forge}")
    wait_answer(feishu, attacker, "The answer was cut here", timeout=180)
    _ask(feishu, bystander)

    peak = _peak_rss(bot.process.pid)
    print(f"orchestrator peak RSS: {peak / MIB:.0f} MiB")
    assert peak < 300 * MIB
    forged_answer = "".join(m.text for m in feishu.messages(attacker) if m.reply_to == forged_id)
    assert answer_cap < len(forged_answer.encode()) < answer_cap + 1000
    assert all(len(m.text) <= 8000 for m in feishu.messages())  # no chat message over the split size
    assert "skipped" in bot.log() and "output line(s) over" in bot.log()
    assert max(len(line) for line in bot.log().splitlines()) < 2000  # only bounded excerpts are logged
    bot.stop()


# ---- 3. the disk budget, and a full disk -------------------------------------------------------------------------

FILLER = r"""#!/bin/bash
# fill.sh: 30 MiB files, one every half second, up to 600 MiB
for i in $(seq 20); do head -c 30M /dev/zero > /workspace/fill-$i; sleep 0.5; done
echo filled
"""


def _used(folder: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*"))


def test_a_chat_over_its_disk_budget_is_stopped_told_and_refused_until_under_it(
        feishu: FakeFeishu, feishu_config, tmp_path: Path, instance: str, docker_client: docker.DockerClient) -> None:
    config = feishu_config(defaults={"disk": "100m"}, limits={"disk_check_interval": 1})
    bot = _start(feishu, config, "unused")
    workspace = tmp_path / "data" / "chats"
    attacker, bystander = chat(), chat()
    _ask(feishu, attacker)
    fill = _in_workspace(tmp_path / "data", attacker, "fill.sh", FILLER)
    _say(feishu, attacker, f"RUN_BASH: bash {fill}")
    wait_answer(feishu, attacker, "over its disk budget of 100.0 MiB", timeout=120)
    used = _used(workspace / attacker)
    assert used < 300 * MIB  # stopped long before the 600 MiB it meant to write
    assert docker_client.containers.get(f"{instance}-{attacker}").status != "running"  # its writers are gone
    _ask(feishu, bystander)

    refused = _say(feishu, attacker, "one more please")
    wait_until(lambda: any(m.reply_to == refused and "No answer can start" in m.text
                           for m in feishu.messages(attacker)), 60, "the refusal")
    for path in (workspace / attacker / "workspace").glob("fill-*"):  # an operator frees space
        path.unlink()
    _ask(feishu, attacker, timeout=120)
    bot.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_the_service_survives_a_full_disk_and_recovers_when_space_is_back(
        feishu: FakeFeishu, feishu_config, small_disk: Path) -> None:
    config = feishu_config(data_dir=str(small_disk / "data"), limits={"min_free_disk": "24m"},
                           defaults={"disk": "16m"})
    bot = _start(feishu, config, "unused")
    first = chat()
    _ask(feishu, first)

    filler = _fill(small_disk, leave=12 * MIB)  # under the floor, with room left for the store
    nearly = _say(feishu, first, "while the disk is nearly full")
    wait_until(lambda: any(m.reply_to == nearly and "disk is nearly full" in m.text for m in feishu.messages(first)),
               60, "the refusal for a nearly full disk")
    assert "refusing a turn" in bot.log()

    _fill(small_disk, leave=0)  # full: not even the store can write
    full_event = feishu.text_event(first, "while the disk is full")
    frame = feishu.push_event(full_event)
    assert feishu.wait_ack(frame, timeout=10).code != 200  # not stored, so not acked: Feishu delivers it again
    assert bot.process.poll() is None

    filler.unlink()  # space is back
    feishu.push_event(full_event)  # Feishu's redelivery
    wait_answer(feishu, first, "Fake answer to: while the disk is full", timeout=120)
    _ask(feishu, first)
    assert bot.process.poll() is None
    bot.stop()


# ---- 4. networks ---------------------------------------------------------------------------------------------


def _iptables(*args: str) -> str:
    return subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True, check=True).stdout


def test_agents_reach_neither_each_other_nor_the_host_and_the_model_still_works(
        feishu: FakeFeishu, feishu_config, instance: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    bot = _start(feishu, feishu_config(), "unused")
    attacker, neighbour = chat(), chat()
    _ask(feishu, attacker)  # the model on the host's loopback is reached through the relay
    _ask(feishu, neighbour)

    network = docker_client.networks.get(f"{instance}-agents")
    assert network.attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert network.attrs["Labels"]["orchestrator.instance"] == instance
    target = docker_client.containers.get(f"{instance}-{neighbour}")
    assert target.attrs["HostConfig"]["NetworkMode"] == f"{instance}-agents"
    address = target.attrs["NetworkSettings"]["Networks"][f"{instance}-agents"]["IPAddress"]
    # A listener the test starts in the neighbour's container; it answers from inside that container.
    target.exec_run(["socat", "TCP-LISTEN:8099,fork,reuseaddr", "SYSTEM:echo neighbour-open"], detach=True)
    wait_until(lambda: b"neighbour-open" in target.exec_run(["socat", "-T", "2", "-", "TCP:127.0.0.1:8099"]).output,
               20, "the neighbour's listener")

    _say(feishu, attacker, f"RUN_BASH: socat -T 3 - TCP:{address}:8099,connect-timeout=3 </dev/null"
                           " || echo unreachable-$?")
    wait_answer(feishu, attacker, "unreachable-", timeout=90)
    assert "neighbour-open" not in "\n".join(answers(feishu, attacker))

    # The host and everything private or link-local: proven from the rules installed, not by probing them.
    bridge = network.attrs["Options"]["com.docker.network.bridge.name"]
    docker_user, host_input = _iptables("-S", "DOCKER-USER"), _iptables("-S", "INPUT")
    [forward_chain] = [line.split()[-1] for line in docker_user.splitlines() if f"-i {bridge} " in line]
    [local_chain] = [line.split()[-1] for line in host_input.splitlines() if f"-i {bridge} " in line]
    forward = _iptables("-S", forward_chain)
    for blocked in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"):
        assert f"-d {blocked} -j REJECT" in forward
    assert _iptables("-S", local_chain).splitlines()[-1].startswith(f"-A {local_chain} -j REJECT")
    assert docker_user.splitlines()[1].endswith(forward_chain)  # first in DOCKER-USER: nothing accepts before it
    bot.stop()


def _config_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_host_and_container_networks_are_refused_unless_named_unsafe(make_config) -> None:
    for network in ("host", "bridge", "container:other"):
        check = _config_check(make_config(defaults={"network": network}))
        assert check.returncode == 2 and "defaults.network" in check.stderr and "unsafe_network" in check.stderr
    assert _config_check(make_config(defaults={"network": "none"})).returncode == 0
    assert _config_check(make_config(defaults={"network": "host", "unsafe_network": True})).returncode == 0
