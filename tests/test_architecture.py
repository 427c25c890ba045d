"""The package structure holds: import contracts (pyproject.toml), no import cycles, and both fail
when a violation is planted in a copy of the packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("logitcache", "trainer", "laws")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# Prints one line per module-level import cycle among the packages (a module that imports a module
# that imports it back, directly or around a loop); TYPE_CHECKING imports do not count.
FIND_CYCLES = textwrap.dedent("""
    import grimp
    graph = grimp.build_graph(*%r, exclude_type_checking_imports=True)
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.chain_exists(importer=imported, imported=module):
                print("cycle:", module, "->", imported)
""") % (PACKAGES,)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy_of_packages(tmp_path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def plant(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # planted\n")


def test_contracts_hold_and_there_are_no_cycles():
    result = run([str(LINT_IMPORTS)], ROOT)
    assert result.returncode == 0 and "BROKEN" not in result.stdout, result.stdout + result.stderr
    cycles = run([sys.executable, "-c", FIND_CYCLES], ROOT)
    assert cycles.returncode == 0, cycles.stderr
    assert cycles.stdout == ""


@pytest.mark.parametrize("module, line, contract", [
    ("logitcache.read.reader", "import trainer.losses", "logitcache never imports trainer"),
    ("logitcache.read.reader", "import logitcache.producer.writer", "logitcache flows one way"),
    ("logitcache.backends.hf", "import logitcache.format.atomic", "never write files"),
    ("trainer.loop", "import logitcache.backends.hf", "the trainer never runs a teacher"),
])
def test_a_planted_violation_breaks_a_contract(copy_of_packages, module, line, contract):
    plant(copy_of_packages, module, line)
    result = run([str(LINT_IMPORTS)], copy_of_packages)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [ln for ln in result.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(contract in ln for ln in broken), result.stdout


def test_a_planted_cycle_is_found(copy_of_packages):
    plant(copy_of_packages, "logitcache.format.schema", "import logitcache.format.manifest")
    result = run([sys.executable, "-c", FIND_CYCLES], copy_of_packages)
    expected = "cycle: logitcache.format.schema -> logitcache.format.manifest"
    assert expected in result.stdout, result.stdout + result.stderr
