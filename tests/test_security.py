"""No code execution from shared data: the source never unpickles, and a hostile manifest cannot
make the reader, verify, inspect or repair open a file outside the cache.

The second part uses a FIFO outside the cache as the bait: opening it for reading blocks until a
writer appears, so any code path that opens it hangs and the alarm fails the test. (Paths inside
the cache are fine to open; the bait is the only outside file named.)
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from test_reader import never_read  # noqa: F401  (fixture: a FIFO outside the cache)
from test_writer import make_header, write_cache

from logitcache import format as fmt
from logitcache.commands.repair import repair_cache
from logitcache.errors import UserError
from logitcache.read.reader import CacheReader
from logitcache.read.summary import inspect_cache
from logitcache.verify import verify_cache

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "logitcache").rglob("*.py")) + sorted((REPO / "trainer").rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _const(node: ast.AST | None):
    return node.value if isinstance(node, ast.Constant) else "<not a constant>"


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_calls(path: Path) -> list[str]:
    """Every way a file could run code from data: pickle-family imports, torch.load without
    weights_only=True, np.load with allow_pickle, trust_remote_code defaulting or set to True,
    eval/exec."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            if name.endswith("torch.load"):
                if _const(kw.get("weights_only")) is not True:
                    found.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and _const(kw.get("allow_pickle")) is not False:
                found.append(f"{where}: np.load without allow_pickle=False")
            if "trust_remote_code" in kw and _const(kw["trust_remote_code"]) is True:
                found.append(f"{where}: trust_remote_code=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) \
                + list(node.args.kw_defaults)
            for arg, default in zip(args, defaults):
                if arg.arg == "trust_remote_code" and default is not None and _const(default) is not False:
                    found.append(f"{where}: {node.name}(trust_remote_code={ast.unparse(default)})")
    return found


def test_source_never_runs_code_from_data():
    assert len(SOURCES) > 20
    problems = [p for path in SOURCES for p in unsafe_calls(path)]
    assert problems == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch, numpy as np\n"
                   "def f(trust_remote_code=True):\n    return torch.load('x'), np.load('y', allow_pickle=True)\n"
                   "g = torch.load('z', weights_only=True)\nh = np.load('w', allow_pickle=False)\n"
                   "m = from_pretrained('a', trust_remote_code=True)\n")
    found = unsafe_calls(bad)
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted([
        "import pickle", "f(trust_remote_code=True)", "torch.load without weights_only=True",
        "np.load without allow_pickle=False", "trust_remote_code=True"])


# -- hostile manifests ------------------------------------------------------------------------


HOSTILE_NAMES = ["../outside.fifo", "{bait}", "shard-00000.parquet/../../outside.fifo", "sub/shard-00000.parquet",
                 "shard-00000.parquet\u0000../outside.fifo", "shard-00000.parquet\\..\\outside.fifo",
                 "..", "", "shard-00000.parquet/"]


def _every_entry_point(cache: Path) -> None:
    """Reader, verify, inspect, repair: each refuses in one line or reports a problem, never opens the bait."""
    with pytest.raises(UserError) as exc:
        CacheReader(cache)
    assert "\n" not in str(exc.value)
    problems = verify_cache(cache)
    assert problems and all("\n" not in reason for _, reason in problems)
    with pytest.raises(UserError):
        inspect_cache(cache)
    try:
        bad, _ = repair_cache(cache)
    except UserError as exc:                 # refused as a whole: one line
        assert "\n" not in str(exc)
    else:
        assert bad                           # or the shard quarantined (moved, never opened)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_shard_names_never_open_anything_outside(tmp_path, never_read, name):
    cache = tmp_path / "c"
    write_cache(cache, make_header(num_windows=20, rows_per_shard=8))
    m = json.loads((cache / fmt.MANIFEST_NAME).read_text())
    m["shards"][0]["name"] = name.format(bait=never_read)
    fmt.write_manifest(cache, m)             # sealed: the name itself is what must be refused
    _every_entry_point(cache)
    assert never_read.exists() and os.path.realpath(never_read) == str(never_read)


def test_shard_symlinked_outside_is_never_followed(tmp_path, never_read):
    cache = tmp_path / "c"
    write_cache(cache, make_header(num_windows=20, rows_per_shard=8))
    shard = cache / fmt.shard_name(1)
    shard.unlink()
    shard.symlink_to(never_read)
    _every_entry_point(cache)
    # repair moved the link itself into quarantine; the bait is untouched
    assert not os.path.lexists(shard)
    moved = cache / ".quarantine" / f"{fmt.shard_name(1)}.0"
    assert moved.is_symlink() and os.readlink(moved) == str(never_read)


def test_manifest_symlinked_outside_is_never_followed(tmp_path, never_read):
    cache = tmp_path / "c"
    write_cache(cache, make_header(num_windows=20, rows_per_shard=8))
    (cache / fmt.MANIFEST_NAME).unlink()
    (cache / fmt.MANIFEST_NAME).symlink_to(never_read)
    with pytest.raises(UserError, match="symbolic link"):
        CacheReader(cache)
    assert verify_cache(cache)[0][0] == fmt.MANIFEST_NAME
    with pytest.raises(UserError, match="symbolic link"):
        repair_cache(cache)
