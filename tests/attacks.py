"""The attacks of issue 9 ("the container is a boundary"), run by a hostile agent in its own chat's container
through the fake model's `RUN_BASH:` tool calls, and the small helpers that stage and judge them. Shared by the
acceptance tests (tests/acceptance/test_boundary.py) and the fault suite (bench/faults_lib/boundary.py)."""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fakes.feishu import FakeFeishu
from tests.harness import wait_until

MIB = 1024 * 1024
# A canary file's text. Not "PATH=" nor the agent's key: an environ read inside the container (the attacker's
# `cat` of a stderr it linked to /proc/self/environ) is the agent's own; the orchestrator's environ is caught by the
# secret the tests put in it.
LEAK_MARKERS = ("CANARY-",)
NEIGHBOUR_REPLY = "neighbour-open"
Snapshot = dict[str, tuple[int, int, int, int, bytes]]

# ---- links, folders and swaps under every name the agent can see or guess ---------------------------------

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

# ---- gigabytes without a newline -----------------------------------------------------------------------------

FLOODER = r"""#!/bin/bash
# flood.sh: a gigabyte without a newline into the running turn's output and stderr, big files elsewhere, and
# forged answer lines far over the answer cap.
turn=$(ls -td /turns/*/ | head -1)  # the newest turn folder (the agent host's usage report lies beside them)
head -c 1G /dev/zero | tr '\0' x >> "$turn/output.jsonl" &
head -c 1G /dev/zero | tr '\0' y >> "$turn/stderr" &
head -c 256M /dev/zero | tr '\0' z > /workspace/big-no-newline &
head -c 64M /dev/zero | tr '\0' w > /proc/1/fd/1 &   # the container's log, written by the engine
wait
"""

FORGER = r"""
const fs = require("fs");
// the newest turn folder: the agent host's usage report lies beside them, rewritten every 10 s through a
// usage.tmp that may be gone by the time it is looked at, so only folders (readdir's own types) are stat'ed
const turn = fs.readdirSync("/turns", {withFileTypes: true}).filter(entry => entry.isDirectory())
  .map(entry => "/turns/" + entry.name).map(p => [fs.statSync(p).mtimeMs, p]).sort((a, b) => a[0] - b[0]).pop()[1];
const line = JSON.stringify({type: "assistant", message: {content: [{type: "text", text: "A".repeat(100000)}]}});
for (let i = 0; i < 60; i++) fs.appendFileSync(turn + "/output.jsonl", line + "\n");
console.log("forged");
"""

# ---- the disk budget ---------------------------------------------------------------------------------------

FILLER = r"""#!/bin/bash
# fill.sh: 30 MiB files, one every half second, up to 600 MiB
for i in $(seq 20); do head -c 30M /dev/zero > /workspace/fill-$i; sleep 0.5; done
echo filled
"""


# ---- staging ---------------------------------------------------------------------------------------------


def in_workspace(data: Path, chat_id: str, name: str, text: str) -> str:
    """Put a script in the chat's workspace (as the test: the agent could write it itself)."""
    path = data / "chats" / chat_id / "workspace" / name
    path.write_text(text)
    os.chown(path, 1000, 1000)
    return f"/workspace/{name}"


def background(script: str, *args: str) -> str:
    """A RUN_BASH prompt that starts `script` detached, so it outlives the tool call and the turn."""
    return f"RUN_BASH: setsid nohup bash {script} {shlex.join(args)} >/dev/null 2>&1 </dev/null & echo started"


def plant_canaries(folder: Path) -> Path:
    """Host files and folders an attacker would aim at: a secret file and a root-only folder in `folder` (and,
    absent, `new.pth`)."""
    (folder / "root-only").mkdir(parents=True)
    (folder / "secret.txt").write_text(f"CANARY-{uuid.uuid4().hex}")
    os.chmod(folder / "root-only", 0o700)
    return folder


def evil_pth() -> Path:
    """A new .pth in this Python's site-packages: code in it would run as root at the service's next start."""
    site_packages = Path(subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    return site_packages / f"zz-evil-{uuid.uuid4().hex[:6]}.pth"


def link_targets(canaries: Path, pth: Path, data: Path, bystander: str, bystander_turn: Path) -> list[str]:
    """What the planted links point at: the canaries, a new .pth, environs holding secrets, the store, and
    another chat's transcript, turn folder and workspace."""
    return [str(canaries / "secret.txt"), str(canaries / "root-only"), str(canaries / "new.pth"), str(pth),
            "/proc/self/environ", "/proc/1/environ", str(data / "orchestrator.db"),
            str(bystander_turn / "output.jsonl"), str(bystander_turn), str(data / "chats" / bystander / "workspace")]


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `mount` (made if absent; needs root), a disk small enough to fill; lazily
    unmounted afterwards."""
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def listen(container: Any, port: int) -> None:
    """A listener in `container` (one the test made) that answers NEIGHBOUR_REPLY; back once it answers there."""
    container.exec_run(["socat", f"TCP-LISTEN:{port},fork,reuseaddr", f"SYSTEM:echo {NEIGHBOUR_REPLY}"], detach=True)
    wait_until(lambda: NEIGHBOUR_REPLY.encode() in container.exec_run(
        ["socat", "-T", "2", "-", f"TCP:127.0.0.1:{port}"]).output, 20, "the neighbour's listener")


def probe(address: str, port: int) -> str:
    """A shell command that connects to address:port and prints what answered, or `unreachable-<exit code>`."""
    return f"socat -T 3 - TCP:{address}:{port},connect-timeout=3 </dev/null || echo unreachable-$?"


# ---- judging ---------------------------------------------------------------------------------------------


def snapshot(root: Path, skip: Path) -> Snapshot:
    """Owner, mode, size, mtime and the first bytes of everything under `root` but `skip` and the service's log."""
    seen = {}
    for path in [root, *root.rglob("*")]:
        if path == skip or skip in path.parents or path.name.startswith("orchestrator-"):
            continue
        info = path.lstat()
        head = path.read_bytes()[:256] if stat.S_ISREG(info.st_mode) else b""
        seen[str(path)] = (info.st_uid, info.st_mode, info.st_size, info.st_mtime_ns, head)
    return seen


def all_chat_text(feishu: FakeFeishu) -> str:
    return "\n".join(m.text for m in feishu.messages())


def leaks(text: str, *secrets: str) -> list[str]:
    """Which of `secrets` and LEAK_MARKERS appear in `text`."""
    return [s for s in (*secrets, *LEAK_MARKERS) if s in text]


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def used(folder: Path) -> int:
    """Bytes of disk taken by everything under `folder`, links not followed."""
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*"))
