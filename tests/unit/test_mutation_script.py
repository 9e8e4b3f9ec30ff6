"""scripts/mutation.py's `--changed`, as CI runs it: only the core modules whose source differs from the baseline
of the last full run are mutated, and none at all when nothing changed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mutation.py"


@pytest.fixture
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_modules_whose_source_differs_from_the_baseline_are_changed(mutation) -> None:
    assert mutation.changed(["a.py", "b.py", "c.py"], {"a.py": "1", "b.py": "2"},
                            {"a.py": "1", "b.py": "X", "c.py": "3"}) == ["b.py", "c.py"]
    assert mutation.changed(["a.py"], {}, {"a.py": "1"}) == ["a.py"]


def test_a_core_as_at_the_last_full_run_is_not_mutated_and_one_change_is(mutation, tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    monkeypatch.chdir(SCRIPT.parents[1])
    baseline = tmp_path / "baseline.json"
    monkeypatch.setattr(mutation, "BASELINE", baseline)
    ran: list[list[str]] = []
    monkeypatch.setattr(mutation, "_run", ran.append)
    baseline.write_text(json.dumps({module: mutation._digest(module) for module in mutation.CORE}))
    assert mutation.main(["--changed"]) == 0
    assert ran == [] and "nothing to mutate" in capsys.readouterr().out

    recorded = json.loads(baseline.read_text())
    recorded["orchestrator/states.py"] = "0" * 64
    baseline.write_text(json.dumps(recorded))
    monkeypatch.setattr(mutation, "_report", lambda module, explained: True)
    assert mutation.main(["--changed"]) == 0
    assert ran == [["orchestrator.states*"]]
    # states met the bar: the baseline now holds its source, and the next CI run mutates nothing
    assert json.loads(baseline.read_text())["orchestrator/states.py"] == mutation._digest("orchestrator/states.py")
    assert mutation.main(["--changed"]) == 0
    assert ran == [["orchestrator.states*"]]


def test_a_module_under_the_bar_fails_the_run_and_leaves_the_baseline_as_it_was(mutation, tmp_path: Path,
                                                                              monkeypatch) -> None:
    monkeypatch.chdir(SCRIPT.parents[1])
    baseline = tmp_path / "baseline.json"
    monkeypatch.setattr(mutation, "BASELINE", baseline)
    monkeypatch.setattr(mutation, "_run", lambda names: None)
    monkeypatch.setattr(mutation, "_report", lambda module, explained: module != "orchestrator/store.py")
    assert mutation.main(["--changed"]) == 1
    assert not baseline.exists()


def test_a_run_that_tested_no_mutant_fails(mutation, tmp_path: Path, monkeypatch, capsys) -> None:
    # mutmut's clean run of the tests failed (a flaky test under its load): it marks every mutant "not checked"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mutants" / "orchestrator").mkdir(parents=True)
    not_checked = next(code for code, status in mutation.status_by_exit_code.items() if status == "not checked")
    (tmp_path / "mutants" / "orchestrator" / "store.py.meta").write_text(json.dumps(
        {"exit_code_by_key": {f"orchestrator.store.x_f__mutmut_{n}": not_checked for n in range(3)}}))
    assert mutation._report("orchestrator/store.py", {}) is False
    assert "no mutant was tested" in capsys.readouterr().out
