"""The benchmarks' short versions, so they cannot rot: each runs end to end and prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.docker
def test_every_benchmark_runs_and_prints_its_figures() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for benchmark in ("warm/real-cli", "warm/stub-cli", "cold/real-cli", "cold/stub-cli"):
        assert re.search(rf"^{benchmark}: ratio=\d+\.\d+x median", out, re.M), out
    for benchmark in ("warm/real-cli", "warm/stub-cli"):
        assert re.search(rf"^{benchmark}: overhead on the hot CLI: median=-?\d+ ms p90=-?\d+ ms .*"
                         r"target <= 30 ms median: (meets|misses)$", out, re.M), out
    assert re.search(r"^throughput: messages=20 chats=5 answered_once=20 answered_twice_or_more=0 unanswered=0$",
                     out, re.M), out
    assert re.search(r"^throughput: orchestrator=[\d.]+ msg/s, bare docker exec=[\d.]+ msg/s", out, re.M), out
    assert re.search(r"^throughput: against the full run before issue 10 \([\d.]+ msg/s, [\d.]+x of bare\): "
                     r"rate (at least as high|lower), ratio (at least as high|lower)", out, re.M), out
    assert re.search(r"^footprint: 100 known chats and 5 running containers, idle: RSS=\d+ MiB", out, re.M), out
    assert re.search(r"^hot_memory: chats=1 the idle CLI's RSS median=\d+ MiB", out, re.M), out
    assert re.search(r"^hot_memory: container memory with the CLI hot median=\d+ MiB, after hot_idle \(3 s\) and "
                     r"the CLI's exit median=\d+ MiB: hot_idle gives back -?\d+ MiB per chat", out, re.M), out
    assert re.search(r"^restart: adopted 10 of 10 running containers", out, re.M), out
    assert re.search(r"^restart: graceful shutdown with 3 busy chats took [\d.]+ s .* exit code 0; "
                     r"containers left running 0$", out, re.M), out
    assert re.search(r"^streaming: first text to first card: median=\d+ ms", out, re.M), out
    assert re.search(r"^gateway latency: added per request median=-?[\d.]+ ms p95=-?[\d.]+ ms", out, re.M), out
    assert re.search(r"^approvals: click -> tool start: samples=3 median=\d+ ms p95=\d+ ms; baseline", out, re.M), out
    assert re.search(r"^approvals: Feishu API calls per turn with one approval: .* on the approval card itself: "
                     r"min 1, max 1 ", out, re.M), out
    assert re.search(r"^gateway throughput: \d+ req/s through the gateway, \d+ req/s direct \(concurrency 8\); "
                     r"ratio=[\d.]+x of direct$", out, re.M), out
    assert re.search(r"^files in: a 5 MiB file message -> its turn starting: samples=\d+ median=\d+ ms", out, re.M), out
    assert re.search(r"^files out 10 MiB: samples=\d+ answer delivered -> file in the chat median=\d+ ms", out,
                     re.M), out
    assert re.search(r"^files: Feishu API calls per file: a file in adds \+1 \(download \+1\)", out, re.M), out
    assert re.search(r"^postgres: 9 messages over 3 chats per run, 1 run\(s\) per store: sqlite=[\d.]+ msg/s, "
                     r"postgres=[\d.]+ msg/s .*; answered once 18 of 18$", out, re.M), out
    assert re.search(r"^postgres: time per message [\d.]+x of SQLite's; target <= 1.2x: (meets|misses)$", out,
                     re.M), out
