"""A sweep's ``fits.json`` (``scripts/capacity_gap.py`` writes it) read back as a ``laws.plan.Law``.

The parts read, version 1:

* ``version``: 1.  A file without the field is version 1 too (the layout before the field was
  written); any other value is refused.
* ``distillation_law.params``: the nine coefficients of ``DISTILL_KEYS``, positive and finite.
* ``supervised_law.params`` (optional): the six of ``SUPERVISED_KEYS``.  Without it the
  student's label-only loss comes from the sweep's CE-only runs (``optima``) and teacher losses
  must be given.
* ``optima``: per student, ``student_params``, ``student_tokens`` and ``ce_only_loss``.

Every number is checked before use: the file is a stranger's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from laws.forms import DISTILL_KEYS, SUPERVISED_KEYS
from laws.plan import Law, PlanInputError, format_count

FITS_VERSION = 1
MAX_FITS_BYTES = 16 * 2**20   # a fits.json is a few kB; refuse to parse anything huge


def _bad(path: Path | str, problem: str) -> PlanInputError:
    return PlanInputError("law", f"{path}: {problem}")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _coefficients(obj: Any, keys: tuple[str, ...], where: str, path: Path | str) -> dict[str, float]:
    params = obj.get("params") if isinstance(obj, Mapping) else None
    if not isinstance(params, Mapping):
        raise _bad(path, f"{where}.params must be an object")
    missing = [k for k in keys if k not in params]
    if missing:
        raise _bad(path, f"{where}.params lacks {', '.join(missing)}")
    bad = [k for k in keys if not _number(params[k])]
    if bad:
        raise _bad(path, f"{where}.params {', '.join(bad)} must be positive finite numbers")
    return {k: float(params[k]) for k in keys}


def _label_only(optima: Any, path: Path | str) -> tuple[tuple[float, float, float], ...]:
    if optima is None:
        return ()
    if not isinstance(optima, list):
        raise _bad(path, "optima must be a list")
    out = []
    for i, o in enumerate(optima):
        keys = ("student_params", "student_tokens", "ce_only_loss")
        if not isinstance(o, Mapping) or not all(_number(o.get(k)) for k in keys):
            raise _bad(path, f"optima[{i}] needs positive finite {', '.join(keys)}")
        out.append(tuple(float(o[k]) for k in keys))
    return tuple(out)


def read_fits_law(path: Path | str) -> Law:
    """The laws a sweep fitted, as a ``Law`` (``PlanInputError`` naming the file and the problem)."""
    p = Path(path)
    if not p.is_file():
        raise _bad(path, "no such file")
    if p.stat().st_size > MAX_FITS_BYTES:
        raise _bad(path, f"larger than {MAX_FITS_BYTES // 2**20} MiB: not a fits.json")
    try:
        doc = json.loads(p.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, Mapping):
        raise _bad(path, "not a JSON object")
    version = doc.get("version", FITS_VERSION)
    if isinstance(version, bool) or version != FITS_VERSION:
        raise _bad(path, f"fits.json version {version!r:.20} is not {FITS_VERSION}, the version this reads")
    if "distillation_law" not in doc:
        raise _bad(path, "no distillation_law: not a sweep's fits.json")
    distill = _coefficients(doc["distillation_law"], DISTILL_KEYS, "distillation_law", path)
    supervised = (_coefficients(doc["supervised_law"], SUPERVISED_KEYS, "supervised_law", path)
                  if doc.get("supervised_law") is not None else None)
    label_only = _label_only(doc.get("optima"), path)
    sizes = [n for n, _, _ in label_only]
    n_points = doc["distillation_law"].get("n_points")
    runs = f"{int(n_points)} distillation runs" if _number(n_points) else "a sweep"
    fitted_on = f"{runs} of {format_count(min(sizes))}-{format_count(max(sizes))}-param students" if sizes else runs
    return Law(name=str(path), distill=distill, supervised=supervised, fitted_on=fitted_on,
               params_range=(min(sizes), max(sizes)) if sizes else None, label_only=label_only)
