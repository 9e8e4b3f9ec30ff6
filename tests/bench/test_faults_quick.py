"""CI for the fault suite (issue 6): its quick run must pass, so the suite cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.faults import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^(\w+): trials=(\d+) passed=(\d+) lost=(\d+) duplicated=(\d+)$", re.MULTILINE)


@pytest.mark.docker
def test_quick_fault_suite_loses_and_duplicates_nothing() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.faults", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)
    report = f"stdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-3000:]}"
    lines = {name: tuple(map(int, counts)) for name, *counts in SUMMARY.findall(run.stdout)}
    assert set(lines) == set(SCENARIOS), report
    for name, (trials, passed, lost, duplicated) in lines.items():
        assert trials > 0 and (passed, lost, duplicated) == (trials, 0, 0), f"{name}\n{report}"
    assert run.returncode == 0, report
