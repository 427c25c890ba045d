"""laws.extras: `import laws` needs numpy only; without scipy / matplotlib the analysis says, in one
line, how to install them, and the capacity-gap sweep refuses to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HINT = "pip install 'logitcache[laws]'"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_import_laws_loads_neither_the_extras_nor_trainer_nor_logitcache():
    r = run_python("import sys, laws; print(sorted(m for m in ('scipy', 'matplotlib', 'torch', 'trainer', "
                   "'logitcache') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_without_scipy_the_sweep_bookkeeping_works_and_a_fit_names_the_extra():
    code = """
import sys
sys.modules["scipy"] = None                      # as if scipy were not installed
import laws
runs = [laws.SweepRun(s, 20 * s, t, 4.0, 3.0 + abs(t / s - 2.5) / 10, 3.5) for s in (1e6, 2e6) for t in (1e6, 3e6, 9e6)]
print(len(laws.teacher_optima(runs)))
try:
    laws.fit_supervised([1e6, 2e6, 4e6], [2e7, 4e7, 8e7], [3.0, 2.9, 2.8])
except laws.MissingExtraError as exc:
    print(exc)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    count, message = r.stdout.strip().split("\n")
    assert count == "2"
    assert message.endswith(HINT) and "scipy" in message


def test_capacity_gap_script_refuses_in_one_line_without_the_extra(tmp_path):
    code = """
import runpy, sys
sys.modules["matplotlib"] = None                 # as if matplotlib were not installed
sys.argv = ["scripts/capacity_gap.py"] + sys.argv[1:]
runpy.run_path("scripts/capacity_gap.py", run_name="__main__")
"""
    work = tmp_path / "work"
    r = run_python(code, "--config", "scripts/configs/capacity_gap_cpu.json", "--work", str(work))
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(HINT), r.stderr
    assert not work.exists()                     # refused before any step of the sweep ran
