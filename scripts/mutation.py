"""Mutation testing of the core: `mutmut run` over the modules named (all the core by default), then each module's
score and its surviving mutants, from mutmut's own records under mutants/. Exits 1 when a module scores under the
bar. Run through `./scripts/dev mutate [module ...]`; modules by path (orchestrator/store.py) or name (store).

The core: the modules whose rules every turn relies on and that unit tests reach without the engine (pyproject's
[tool.mutmut] only_mutate lists the same). mutmut runs the tests of `-m "not docker"` (tests/unit) against each
mutant, only those that reach the mutated function.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CORE = ("orchestrator/states.py", "orchestrator/store.py", "orchestrator/agent.py", "orchestrator/ratelimit.py",
        "orchestrator/config.py", "orchestrator/channels/feishu_events.py", "orchestrator/turns.py",
        "orchestrator/housekeeping.py")
BAR = 0.90
KILLED = {1, 3, 37}  # a failing test, pytest's internal error, a type check (mutmut's own reading)
NOT_COUNTED = {None, 2, 5, 33, 34}  # not checked, interrupted, no test reaches it, skipped


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: the core)")
    parser.add_argument("--report-only", action="store_true", help="read the last run's results, run nothing")
    args = parser.parse_args(argv)
    modules = [_path(module) for module in args.modules] or list(CORE)
    if not args.report_only:
        names = [_mutant_prefix(module) + "*" for module in modules]
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "2", *names], check=False)
    below = [module for module in modules if not _report(module)]
    if below:
        print(f"mutation: under {BAR:.0%} killed: {', '.join(below)}")
        return 1
    return 0


def _path(module: str) -> str:
    if module.endswith(".py"):
        return module
    return next((path for path in CORE if Path(path).stem == module), f"orchestrator/{module}.py")


def _mutant_prefix(module: str) -> str:
    """mutmut names a mutant after its module's dotted path: orchestrator.store.x_Store__answer__mutmut_3."""
    return module.removesuffix(".py").replace("/", ".")


def _report(module: str) -> bool:
    """Print the module's score and survivors; whether it reaches the bar."""
    meta = Path("mutants") / (module + ".meta")
    if not meta.exists():
        print(f"mutation: {module}: no results (run it first)")
        return False
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    counted = {key: code for key, code in codes.items() if code not in NOT_COUNTED}
    killed = sum(1 for code in counted.values() if code in KILLED)
    survivors = sorted(key for key, code in counted.items() if code not in KILLED)
    score = killed / len(counted) if counted else 1.0
    print(f"mutation: {module}: {killed}/{len(counted)} killed ({score:.1%}), {len(codes) - len(counted)} not counted")
    for key in survivors:
        print(f"    survived: {key}  (mutmut show {key})")
    return score >= BAR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
