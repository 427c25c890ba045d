"""Sweep records and what they say on their own: one run per record, each student's best teacher.

A sweep distills students of several sizes from a ladder of teachers.  Each run is one
``SweepRun``: student non-embedding params ``N_S`` and tokens ``D_S``, teacher non-embedding
params ``N_T`` and held-out loss ``L_T``, the held-out loss ``L_S`` of the distilled student,
and the held-out loss of the same student trained on labels only (``ce_only_loss``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class SweepRun:
    """One distillation run of the sweep; losses are held-out cross-entropies in nats."""

    student_params: float  # non-embedding
    student_tokens: float
    teacher_params: float  # non-embedding
    teacher_loss: float
    student_loss: float  # the distilled student
    ce_only_loss: float  # the same student trained on labels only (its Lt_S)
    teacher_tokens: float | None = None  # lets the teacher ladder join the supervised fit


def as_runs(items: Iterable[SweepRun | Mapping[str, float]]) -> list[SweepRun]:
    """Normalise records (e.g. loaded from JSON); unknown keys are rejected, not ignored."""
    names = {f.name for f in fields(SweepRun)}
    out: list[SweepRun] = []
    for item in items:
        if isinstance(item, SweepRun):
            out.append(item)
            continue
        unknown = set(item) - names
        if unknown:
            raise ValueError(f"unknown sweep-run keys {sorted(unknown)}; expected {sorted(names)}")
        out.append(SweepRun(**{k: (None if v is None else float(v)) for k, v in item.items()}))
    if not out:
        raise ValueError("no sweep runs")
    return out


# ---------------------------------------------------------------------------------------------
# best teacher per student


@dataclass(frozen=True)
class TeacherOptimum:
    """Where one student's loss-vs-teacher curve bottoms out.

    ``bracketed`` is False when the lowest loss sits at an end of the teacher ladder: the true
    optimum may then lie beyond the ladder and ``smoothed_teacher`` is only a bound.
    """

    student_params: float
    student_tokens: float
    argmin_teacher: float
    smoothed_teacher: float
    min_loss: float
    ce_only_loss: float
    bracketed: bool
    n_teachers: int


def _curve_arrays(log_nt: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log N_T, mean L_S, count) per distinct teacher, sorted; repeats (seeds) are averaged."""
    x, inv, w = np.unique(log_nt, return_inverse=True, return_counts=True)
    y = np.bincount(inv, weights=loss, minlength=len(x)) / w
    return x, y, w.astype(float)


def _curve(runs: Sequence[SweepRun]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _curve_arrays(np.log(np.asarray([r.teacher_params for r in runs], dtype=float)),
                         np.asarray([r.student_loss for r in runs], dtype=float))


def _smoothed_optimum(x: np.ndarray, y: np.ndarray, w: np.ndarray, window: int,
                      ladder: tuple[float, float]) -> float:
    """Vertex of a quadratic in log N_T fitted around the discrete minimum (log-space result).

    The window is the argmin plus ``window`` ladder neighbours each side (shifted inwards at the
    ladder's ends so it always holds 2*window+1 points when there are that many).  A quadratic
    through 3 points whose middle one is lowest has its vertex between the outer two, so for an
    interior minimum the default window=1 cannot extrapolate; at a ladder end it can, hence the
    clamp to the ladder's range.  A non-convex fit falls back to the argmin.
    """
    i = int(np.argmin(y))
    if len(x) < 3:
        return float(x[i])
    width = min(2 * window + 1, len(x))
    lo = min(max(i - window, 0), len(x) - width)
    sel = slice(lo, lo + width)
    xs, ys, ws = x[sel], y[sel], w[sel]
    centre = xs.mean()  # centring keeps the fit well conditioned (log N_T ~ 15-25)
    t = xs - centre
    # weighted least squares for y = p0 + p1 t + p2 t^2 via its 3x3 normal equations: what
    # np.polyfit computes, with less overhead in the bootstrap loop that calls this ~3000 times
    m = [float(np.dot(ws, t ** k)) for k in range(5)]
    rhs = [float(np.dot(ws, ys * t ** k)) for k in range(3)]
    gram = np.asarray([[m[0], m[1], m[2]], [m[1], m[2], m[3]], [m[2], m[3], m[4]]])
    try:
        _, p1, p2 = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        return float(x[i])
    if not np.isfinite(p2) or p2 <= 0:
        return float(x[i])
    return float(np.clip(centre - p1 / (2 * p2), *ladder))


def _optima_from_groups(groups: Mapping[tuple[float, float], Sequence[SweepRun]],
                        window: int) -> list[TeacherOptimum]:
    out = []
    for (n_s, d_s), group in sorted(groups.items()):
        x, y, w = _curve(group)
        i = int(np.argmin(y))
        out.append(TeacherOptimum(
            student_params=n_s, student_tokens=d_s,
            argmin_teacher=sorted({float(r.teacher_params) for r in group})[i],  # as recorded
            smoothed_teacher=float(np.exp(_smoothed_optimum(x, y, w, window, (x[0], x[-1])))),
            min_loss=float(y[i]),
            ce_only_loss=float(np.mean([r.ce_only_loss for r in group])),
            bracketed=0 < i < len(x) - 1,
            n_teachers=len(x),
        ))
    return out


def _group_by_student(runs: Sequence[SweepRun]) -> dict[tuple[float, float], list[SweepRun]]:
    groups: dict[tuple[float, float], list[SweepRun]] = {}
    for r in runs:
        groups.setdefault((float(r.student_params), float(r.student_tokens)), []).append(r)
    return groups


def teacher_optima(runs: Iterable[SweepRun | Mapping[str, float]],
                   window: int = 1) -> list[TeacherOptimum]:
    """Per student (params, tokens), the best teacher: the raw argmin and a smoothed optimum.

    The argmin can only return a ladder rung (a x2.5 ladder quantises the ratio by up to
    x1.6 either way), so the smoothed optimum -- the vertex of a quadratic in log N_T fitted
    to the rungs around the argmin, clamped to the ladder's range -- is what the capacity-gap
    fit should use.  Students are sorted by size.
    """
    if window < 1:
        raise ValueError("window must be >= 1")
    return _optima_from_groups(_group_by_student(as_runs(runs)), window)


def best_teachers(runs: Iterable[SweepRun | Mapping[str, float]], smoothed: bool = True,
                  window: int = 1) -> list[tuple[float, float]]:
    """``[(student_params, best_teacher_params)]``, smoothed optimum by default (see ``teacher_optima``).

    ``smoothed=False`` returns the teacher of the ladder with the lowest student loss.
    """
    return [(o.student_params, o.smoothed_teacher if smoothed else o.argmin_teacher)
            for o in teacher_optima(runs, window)]


def supervised_points(runs: Iterable[SweepRun | Mapping[str, float]],
                      include_teachers: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) of every label-only run in the sweep, for ``fit_supervised``.

    The CE-only students give one point per student; teachers are label-only runs too and add
    one point per rung when ``teacher_tokens`` is recorded -- on a 3-student sweep that turns
    3 points into 9.  Duplicates (same N, D) are averaged.
    """
    acc: dict[tuple[float, float], list[float]] = {}
    for r in as_runs(runs):
        acc.setdefault((r.student_params, r.student_tokens), []).append(r.ce_only_loss)
        if include_teachers and r.teacher_tokens is not None:
            acc.setdefault((r.teacher_params, r.teacher_tokens), []).append(r.teacher_loss)
    keys = sorted(acc)
    return (np.asarray([k[0] for k in keys]), np.asarray([k[1] for k in keys]),
            np.asarray([float(np.mean(acc[k])) for k in keys]))
