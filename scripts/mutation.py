"""Mutation testing of the core: `mutmut run` over the modules named (all the core by default), then each module's
score and its surviving mutants, from mutmut's own records under mutants/. Exits 1 when a module scores under the
bar. Run through `./scripts/dev mutate [module ...]`; modules by path (orchestrator/store.py) or name (store).

The core: the modules whose rules every turn relies on and that unit tests reach without the engine (pyproject's
[tool.mutmut] only_mutate lists the same). mutmut runs the tests of `-m "not docker"` (tests/unit) against each
mutant, only those that reach the mutated function.

`--changed` (CI) mutates only the core modules whose source differs from the last full run's that met the bar
(BASELINE: each module's sha256 as of the last run that measured it and met the bar, committed with its scores in
docs/TESTING.md). The whole core takes about 23 minutes on 2 cores; a change to one module, that module's share.
A weakened test of an unchanged module is not seen by `--changed`: the next full run sees it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mutmut.stats import status_by_exit_code

CORE = ("orchestrator/states.py", "orchestrator/store.py", "orchestrator/agent.py", "orchestrator/ratelimit.py",
        "orchestrator/config.py", "orchestrator/channels/feishu_events.py", "orchestrator/turns.py",
        "orchestrator/housekeeping.py")
BAR = 0.90
RUN_SECONDS = 30 * 60  # the whole core takes about 15 minutes on 2 cores
EXPLAINED = Path("docs/TESTING.md")  # its table of the survivors left, each with why it is harmless
BASELINE = Path("docs/mutation-baseline.json")  # each core module's sha256 at the last full run that met the bar
# mutmut's own reading of each mutant's exit code (mutmut.stats.status_by_exit_code). A timeout is a mutant the
# tests caught (it made them hang: an endless loop); no test reaching it, skipped or not run is not counted.
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
NOT_COUNTED = {"no tests", "skipped", "not checked", "check was interrupted by user"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: the core)")
    parser.add_argument("--report-only", action="store_true", help="read the last run's results, run nothing")
    parser.add_argument("--changed", action="store_true",
                        help=f"only the core modules changed since the run recorded in {BASELINE}")
    args = parser.parse_args(argv)
    modules = [_path(module) for module in args.modules] or list(CORE)
    digests = {module: _digest(module) for module in modules}  # of the sources this run measures
    if args.changed:
        modules = changed(modules, _baseline(BASELINE), digests)
        if not modules:
            print(f"mutation: the core is as at the last full run ({BASELINE}): nothing to mutate")
            return 0
        print(f"mutation: changed since the last full run: {', '.join(modules)}")
    if not args.report_only:
        started = time.monotonic()
        _run([_mutant_prefix(module) + "*" for module in modules])
        print(f"mutation: ran in {time.monotonic() - started:.0f} s")
    explained = _explained(EXPLAINED)
    below = [module for module in modules if not _report(module, explained)]
    if below:
        print(f"mutation: under {BAR:.0%} killed: {', '.join(below)}")
        return 1
    if not args.report_only:
        _record_baseline(BASELINE, {module: digests[module] for module in modules})
    return 0


def changed(modules: list[str], baseline: dict[str, str], digests: dict[str, str]) -> list[str]:
    """The modules whose digest is not the one recorded (all of them when nothing is). Pure."""
    return [module for module in modules if baseline.get(module) != digests[module]]


def _digest(module: str) -> str:
    return hashlib.sha256(Path(module).read_bytes()).hexdigest()


def _baseline(path: Path) -> dict[str, str]:
    return json.loads(path.read_text()) if path.exists() else {}


def _record_baseline(path: Path, measured: dict[str, str]) -> None:
    path.write_text(json.dumps({**_baseline(path), **measured}, indent=2, sort_keys=True) + "\n")
    print(f"mutation: {', '.join(measured)} met the bar; {path} records the sources measured (commit it with the "
          "scores)")


def _run(names: list[str]) -> None:
    """A fresh run each time: mutmut keeps a mutant's result until its function changes, so a test added since
    would not be seen to kill it. mutmut redraws a progress line many times a second: it goes to mutants/run.log,
    not to a CI log."""
    shutil.rmtree("mutants", ignore_errors=True)
    Path("mutants").mkdir()
    with open("mutants/run.log", "w") as log:
        try:
            subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(os.cpu_count() or 1),
                            *names], stdout=log, stderr=subprocess.STDOUT, check=False, timeout=RUN_SECONDS)
        except subprocess.TimeoutExpired:  # a test that hangs under mutmut hangs its whole run (and CI with it)
            print(f"mutation: mutmut did not finish within {RUN_SECONDS} s (a hanging test?); see mutants/run.log")


def _path(module: str) -> str:
    if module.endswith(".py"):
        return module
    return next((path for path in CORE if Path(path).stem == module), f"orchestrator/{module}.py")


def _mutant_prefix(module: str) -> str:
    """mutmut names a mutant after its module's dotted path: orchestrator.store.x_Store__answer__mutmut_3."""
    return module.removesuffix(".py").replace("/", ".")


def _explained(doc: Path) -> dict[str, str]:
    """Survivors judged harmless, by name: the rows `| `name` | class | why |` of the document."""
    rows = (_SURVIVOR_ROW.match(line) for line in doc.read_text().splitlines()) if doc.exists() else ()
    return {row["name"]: f"{row['kind']}: {row['why']}" for row in rows if row}


_SURVIVOR_ROW = re.compile(r"^\| `(?P<name>orchestrator\.[^`]+)` \| (?P<kind>[^|]+?) \| (?P<why>.+?) \|$")


def _report(module: str, explained: dict[str, str]) -> bool:
    """Print the module's score and survivors (with why each is harmless, where EXPLAINED says); whether the
    module reaches the bar."""
    meta = Path("mutants") / (module + ".meta")
    if not meta.exists():
        print(f"mutation: {module}: no results (mutmut's output: mutants/run.log)")
        return False
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {key: status_by_exit_code[code] for key, code in codes.items()}
    counted = {key: status for key, status in statuses.items() if status not in NOT_COUNTED}
    killed = sum(1 for status in counted.values() if status in KILLED)
    survivors = sorted(key for key, status in counted.items() if status not in KILLED)
    if not counted:  # mutmut's clean run of the tests failed (it then tests no mutant), or no test reaches any
        print(f"mutation: {module}: no mutant was tested ({len(codes)} not counted; mutmut's output: "
              "mutants/run.log)")
        return False
    score = killed / len(counted)
    print(f"mutation: {module}: {killed}/{len(counted)} killed ({score:.1%}), {len(codes) - len(counted)} not counted")
    for key in survivors:
        why = explained.get(key, f"NOT EXPLAINED in {EXPLAINED}: a gap? mutmut show {key}")
        print(f"    survived: {key}  ({why})")
    return score >= BAR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
