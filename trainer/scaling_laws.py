"""Fitting the capacity-gap and distillation scaling laws to a teacher x student sweep.

A sweep distills students of several sizes from a ladder of teachers.  Each run is one
``SweepRun``: student non-embedding params ``N_S`` and tokens ``D_S``, teacher non-embedding
params ``N_T`` and held-out loss ``L_T``, the held-out loss ``L_S`` of the distilled student,
and the held-out loss of the same student trained on labels only (``ce_only_loss``).  This
module answers two questions from such a grid, in pure numpy/scipy:

1. **Capacity gap** (MiniMA): which teacher is best for each student, and does the best
   teacher scale linearly with the student (``T* = r S``, MiniMA reports ~2.5x)?
   ``teacher_optima`` / ``best_teachers`` locate the optimum per student,
   ``fit_capacity_gap`` / ``fit_capacity_gap_runs`` fit the relation with bootstrap intervals.
2. **Distillation scaling law** (Busbridge et al. 2025, arXiv 2502.08606): the supervised law
   ``L = E + (A/N^a + B/D^b)^g`` and the distillation law

       L_S = L_T + L_T^(-c0) * (1 + (L_T/(Lt_S*d1))^(1/f1))^(-c1*f1) * (A'/N_S^a' + B'/D_S^b')^g'

   with ``Lt_S = L(N_S, D_S)`` the loss the student reaches on labels alone.
   ``fit_supervised`` / ``fit_distillation`` fit them as the paper did (Huber loss, delta 1e-4,
   on log-loss residuals; L-BFGS-B from a grid of starts; coefficients log-parameterised so
   they stay positive), and ``holdout_error`` checks a fit by extrapolating from weaker runs.

What the law implies (worth knowing before reading a sweep):

* ``L_S >= L_T`` always: under the law a distilled student never beats its teacher.
* Weak-teacher side: once ``L_T`` exceeds about ``0.8 * d1 * Lt_S`` the broken-power-law
  factor collapses (exponent ``-c1*f1 ~ -47`` for the published values: 0.85 at 0.6, 0.15 at
  0.75, 0.02 at 0.8, 3e-6 at 0.9) and ``L_S ~ L_T``: the student copies a teacher that is
  worse than what it could learn alone.
* Strong-teacher side: the factor is ~1 and ``L_S ~ L_T + Z * L_T^(-c0)`` with
  ``Z = (A'/N_S^a' + B'/D_S^b')^g'``, which falls then rises as ``L_T`` drops.  So for a fixed
  student ``L_S(L_T)`` is U-shaped -- a teacher that is too good hurts -- with its minimum
  (``distill_optimal_teacher_loss``, about 0.3-0.6 of ``d1 * Lt_S``) where the factor is
  0.85-0.98, i.e. slightly above the closed form ``(c0 Z)^(1/(1+c0))``.  The U is visible
  only while that minimum is a reachable teacher loss (above the supervised ``E``): with the
  published coefficients, for students below ~1.6e11 non-embedding params at 20 tokens per
  parameter; beyond that a better teacher always helps.

Identifiability on a small sweep.  A CPU grid of ~3 student sizes x 6 teachers gives 18
distillation runs and only 3 CE-only runs, and usually ``D_S`` grows with ``N_S``, so the
``N`` and ``D`` terms are collinear.  Every fit therefore accepts ``fixed={name: value}`` to
hold a subset of coefficients.  What the sweep should do:

* Supervised law: fit it on *all* label-only runs -- the 3 CE-only students plus the teacher
  ladder itself (set ``SweepRun.teacher_tokens`` and use ``supervised_points``) -- and fix
  ``SWEEP_FIXED_SUPERVISED`` (``b``, ``g`` at the published values), fitting ``E, A, a, B``.
  With only the 3 CE-only runs, skip the law and pass the measured CE-only losses as
  ``Lt_S`` (``fit_distillation(..., Lt_S=ce_only)``).
* Distillation law: fix ``SWEEP_FIXED_DISTILL`` (``b, B, g, c1, f1``) at the published
  values and fit ``A, a, c0, d1``.  ``c0`` is identified by the spread of teacher losses
  within a student, ``A, a`` by the three student sizes, ``d1`` by the weak teachers (those
  near the student's own CE-only loss); ``c1, f1`` only shape how sharp the weak-teacher
  transition is, which 18 runs cannot resolve; with ``D_S`` proportional to ``N_S`` the
  data term ``B/D^b`` is nearly collinear with ``A/N^a``, and ``g`` with ``a`` (only ``a*g``
  shows in the slope).
* What to trust.  On simulated 3 x 6 grids (0.2% noise, 10 seeds) fitting the two smaller
  students predicted the largest to 0.1-0.3% even when the fixed values were wrong (true
  ``g, b, c1, f1`` perturbed), but ``c0`` then absorbed the error (2.2 true, 2.2-4.0 fitted).
  Fitting the weaker half of the teachers and predicting the stronger half -- the side where
  the U turns up -- was off by 0.6-7%, and once by 150% with wrong fixed values.  So quote
  the fitted law for student scaling; treat its teacher optimum as a hypothesis that the
  sweep's own best teachers (``teacher_optima``) must confirm.

Our tiny models will not share Busbridge's coefficients (C4, 143M-12.6B params): fit ours and
report theirs (``BUSBRIDGE_SUPERVISED``, ``BUSBRIDGE_DISTILL``) beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

__all__ = [
    "BUSBRIDGE_SUPERVISED",
    "BUSBRIDGE_DISTILL",
    "MINIMA_CAPACITY_GAP",
    "SUPERVISED_KEYS",
    "DISTILL_KEYS",
    "SWEEP_FIXED_SUPERVISED",
    "SWEEP_FIXED_DISTILL",
    "HUBER_DELTA",
    "SweepRun",
    "as_runs",
    "TeacherOptimum",
    "teacher_optima",
    "best_teachers",
    "fit_capacity_gap",
    "fit_capacity_gap_runs",
    "busbridge_supervised",
    "busbridge_distill",
    "distill_optimal_teacher_loss",
    "FitResult",
    "fit_supervised",
    "fit_distillation",
    "supervised_points",
    "HoldoutResult",
    "holdout_error",
    "plot_sweep",
]

# ---------------------------------------------------------------------------------------------
# published coefficients

#: Busbridge et al. 2025, Table 6: supervised law L = E + (A/N^a + B/D^b)^g (C4, N non-embedding).
BUSBRIDGE_SUPERVISED: dict[str, float] = {
    "E": 1.220, "A": 3355.0, "B": 18186.0, "a": 0.408, "b": 0.431, "g": 0.452,
}
#: Busbridge et al. 2025, Table 6: distillation law (the primed A', B', a', b', g' stored
#: without primes; they belong to this dict, not to the supervised one).
BUSBRIDGE_DISTILL: dict[str, float] = {
    "A": 2243.0, "B": 24181.0, "a": 0.321, "b": 0.637, "g": 0.764,
    "c0": 2.549, "c1": 522.6, "f1": 0.090, "d1": 1.315,
}
#: MiniMA's capacity-gap line T* ~ 2.498 S - 11.498 as quoted by a secondary source (not
#: verified from the paper).  The intercept's unit is unstated (likely millions of params), so
#: compare slopes; an intercept of -11.5 *parameters* would be meaningless.
MINIMA_CAPACITY_GAP: dict[str, float] = {"slope": 2.498, "intercept": -11.498}

SUPERVISED_KEYS: tuple[str, ...] = ("E", "A", "B", "a", "b", "g")
DISTILL_KEYS: tuple[str, ...] = ("A", "B", "a", "b", "g", "c0", "c1", "f1", "d1")

#: Coefficients a small sweep should hold at the published values (see the module docstring).
SWEEP_FIXED_SUPERVISED: tuple[str, ...] = ("b", "g")
SWEEP_FIXED_DISTILL: tuple[str, ...] = ("b", "B", "g", "c1", "f1")

#: Busbridge et al.'s Huber threshold on log-loss residuals.
HUBER_DELTA = 1e-4

# Log-space bounds per coefficient: wide enough never to bind on a sane fit, narrow enough that
# exp() cannot overflow while L-BFGS-B explores.
_BOUNDS: dict[str, tuple[float, float]] = {
    "E": (1e-4, 50.0), "A": (1e-8, 1e15), "B": (1e-8, 1e15),
    "a": (1e-3, 5.0), "b": (1e-3, 5.0), "g": (1e-3, 10.0),
    "c0": (1e-3, 20.0), "c1": (1e-3, 1e5), "f1": (1e-3, 10.0), "d1": (1e-2, 1e2),
}

ArrayLike = float | Sequence[float] | np.ndarray


# ---------------------------------------------------------------------------------------------
# BLAS threads


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the enclosed block with one BLAS thread, then restore the previous count.

    scipy's L-BFGS-B calls BLAS on its tiny (<= 10-parameter) matrices; OpenBLAS threads gain
    nothing there, and on a busy machine their spin-waiting made each iteration ~50x slower
    (measured here with 2 cores shared: 1.2 ms vs 24 us per L-BFGS-B step).  Uses
    threadpoolctl when installed, else the OpenBLAS builds numpy and scipy load; a no-op
    where neither applies.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    handles: list[tuple[Callable, int]] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({ln.split()[-1] for ln in maps
                            if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    put.argtypes = [ctypes.c_int]
                    handles.append((put, int(get())))
                    put(1)
                    break
            else:
                continue
            break
    try:
        yield
    finally:
        for put, previous in handles:
            put(previous)


# ---------------------------------------------------------------------------------------------
# sweep records


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


# ---------------------------------------------------------------------------------------------
# capacity gap: T* vs S


def _line_fits(S: np.ndarray, T: np.ndarray) -> dict[str, np.ndarray]:
    """The three fits on a batch of resamples, vectorised over the leading axis.

    S, T: (n_boot, n).  Degenerate resamples (all students the same size) give NaN slopes.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (S * T).sum(-1) / (S * S).sum(-1)
        sm, tm = S.mean(-1, keepdims=True), T.mean(-1, keepdims=True)
        sxx = ((S - sm) ** 2).sum(-1)
        slope = ((S - sm) * (T - tm)).sum(-1) / np.where(sxx > 0, sxx, np.nan)
        intercept = tm[..., 0] - slope * sm[..., 0]
        lS, lT = np.log(S), np.log(T)
        lsm, ltm = lS.mean(-1, keepdims=True), lT.mean(-1, keepdims=True)
        lxx = ((lS - lsm) ** 2).sum(-1)
        exponent = ((lS - lsm) * (lT - ltm)).sum(-1) / np.where(lxx > 0, lxx, np.nan)
        log_coef = ltm[..., 0] - exponent * lsm[..., 0]
        geo = np.exp((lT - lS).mean(-1))
    return {"ratio": ratio, "slope": slope, "intercept": intercept, "exponent": exponent,
            "coef": np.exp(log_coef), "ratio_geometric": geo}


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (math.nan, math.nan)
    q = 100 * (1 - level) / 2
    lo, hi = np.percentile(v, [q, 100 - q])
    return (float(lo), float(hi))


def _rmse_log(T: np.ndarray, pred: np.ndarray) -> float:
    """RMSE of log(T_pred / T): one scale on which the linear and power-law fits compare."""
    if np.any(pred <= 0):
        return math.nan
    return float(np.sqrt(np.mean(np.log(pred / T) ** 2)))


def _gap_summary(S: np.ndarray, T: np.ndarray, boot: dict[str, np.ndarray], n_boot: int,
                 level: float, method: str) -> dict:
    point = {k: float(v[0]) for k, v in _line_fits(S[None], T[None]).items()}
    ss_tot = float(((T - T.mean()) ** 2).sum())
    lin_pred = point["slope"] * S + point["intercept"]
    log_pred = point["coef"] * S ** point["exponent"]
    out = {
        "n_students": int(S.size),
        **point,
        "rmse_log_ratio": _rmse_log(T, point["ratio"] * S),
        "rmse_log_linear": _rmse_log(T, lin_pred),
        "rmse_log_power": _rmse_log(T, log_pred),
        "r2_linear": float(1 - ((T - lin_pred) ** 2).sum() / ss_tot) if ss_tot > 0 else math.nan,
        "minima_slope": MINIMA_CAPACITY_GAP["slope"],
        "minima_intercept": MINIMA_CAPACITY_GAP["intercept"],
        "n_boot": int(n_boot),
        "bootstrap": method,
        "ci_level": level,
    }
    for key in ("ratio", "ratio_geometric", "slope", "intercept", "exponent"):
        out[f"{key}_ci"] = _percentile_ci(boot[key], level)
    out["n_boot_degenerate"] = int(np.sum(~np.isfinite(boot["slope"])))
    return out


def fit_capacity_gap(pairs: Sequence[tuple[float, float]], n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Fit optimal teacher size T* against student size S from ``(S, T*)`` pairs.

    Three fits, so a small sweep can say which shape it supports:

    * ``ratio``: least squares through the origin, T* = r S (MiniMA's claim is r ~ 2.5).
      Least squares weights the largest students most; ``ratio_geometric`` (the geometric
      mean of T*/S, the log-space fit with slope 1) weights them equally.
    * ``slope``/``intercept``: T* = a S + b, to compare with MiniMA's 2.498 S - 11.498.
    * ``exponent``/``coef``: log T* = log c + e log S; e != 1 means the gap is not linear,
      which is plausible far below MiniMA's scale.

    ``rmse_log_*`` compare the three on one scale.  ``*_ci`` are percentile bootstrap
    intervals from resampling the pairs (students) with replacement.  With 3 students that
    resampling is coarse (10 distinct resamples) and blind to the noise within each student's
    curve -- on synthetic sweeps it covered the true ratio in only 72-83% of seeds --
    so ``fit_capacity_gap_runs``, which resamples the runs themselves, is the one to quote.
    """
    arr = np.asarray(pairs, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 2 or np.any(arr <= 0):
        raise ValueError("need >= 2 (student_params, teacher_params) pairs of positive numbers")
    S, T = arr[:, 0], arr[:, 1]
    idx = np.random.default_rng(seed).integers(0, len(S), size=(n_boot, len(S)))
    boot = _line_fits(S[idx], T[idx])
    return _gap_summary(S, T, boot, n_boot, level, "pairs")


def _bootstrap_optima(rng: np.random.Generator, xs: list[np.ndarray], ys: list[np.ndarray],
                      cells: list[list[np.ndarray]], ladders: list[tuple[float, float]], S: np.ndarray,
                      Sb: np.ndarray, Tb: np.ndarray, resample_students: bool, within: str,
                      smoothed: bool, window: int) -> None:
    """Fill each row of (Sb, Tb) with one resampled set of (student, optimum) pairs."""
    n_students = len(xs)
    for b in range(Sb.shape[0]):
        chosen = rng.integers(0, n_students, n_students) if resample_students else range(n_students)
        for j, ki in enumerate(chosen):
            if within == "student":
                draw = rng.integers(0, len(xs[ki]), len(xs[ki]))
            else:
                draw = np.concatenate([c[rng.integers(0, len(c), len(c))] for c in cells[ki]])
            x, y, w = _curve_arrays(xs[ki][draw], ys[ki][draw])
            log_t = (_smoothed_optimum(x, y, w, window, ladders[ki]) if smoothed
                     else float(x[int(np.argmin(y))]))
            Sb[b, j], Tb[b, j] = S[ki], math.exp(log_t)


def fit_capacity_gap_runs(runs: Iterable[SweepRun | Mapping[str, float]], n_boot: int = 1000,
                          seed: int = 0, smoothed: bool = True, window: int = 1,
                          resample_students: bool = True,
                          within: Literal["student", "cell"] = "student",
                          level: float = 0.95) -> dict:
    """``fit_capacity_gap`` on the optima of ``runs``, with a bootstrap that resamples runs.

    Each replicate draws the students with replacement (if ``resample_students``), then the
    runs of each drawn student with replacement, re-locates every optimum and refits.

    ``within="student"`` draws among all of a student's runs, so some rungs of the ladder drop
    out of a replicate: the interval then also carries how much the optimum depends on which
    rungs are there (conservative: on synthetic sweeps with one run per cell it covered the
    true ratio in 98-100% of 100 seeds, nominal 95%).  ``within="cell"`` draws only among the
    repeats (seeds) of each (student, teacher) cell, so the ladder stays intact and only seed
    noise moves the optimum; it needs >= 2 runs per cell to say anything (with one run per
    cell every replicate equals the data).  Deviations from each cell's mean are inflated by
    sqrt(m/(m-1)) first (m repeats), the usual small-sample correction; with 3 seeds per cell
    it then covered the truth in 91% of 100 synthetic sweeps (nominal 95%).

    Replicates keep each student's full ladder range for the clamp.  The result also holds
    the point-estimate ``pairs``.
    """
    if within not in ("student", "cell"):
        raise ValueError(f"within must be 'student' or 'cell', not {within!r}")
    runs = as_runs(runs)
    groups = _group_by_student(runs)
    keys = sorted(groups)
    optima = _optima_from_groups(groups, window)
    pick = (lambda o: o.smoothed_teacher) if smoothed else (lambda o: o.argmin_teacher)
    S = np.asarray([o.student_params for o in optima])
    T = np.asarray([pick(o) for o in optima])
    if len(S) < 2:
        raise ValueError("need runs for >= 2 student sizes")
    # per student: each run's log N_T and loss, and the run indices of each cell
    xs = [np.log(np.asarray([r.teacher_params for r in groups[k]], dtype=float)) for k in keys]
    ys = [np.asarray([r.student_loss for r in groups[k]], dtype=float) for k in keys]
    cells = [[np.flatnonzero(x == v) for v in np.unique(x)] for x in xs]
    if within == "cell":
        # Resampled means of m repeats have (m-1)/m of the true variance; inflate the
        # deviations from each cell's mean by sqrt(m/(m-1)) so the interval is not too narrow.
        for x, y, cs in zip(xs, ys, cells):
            for c in cs:
                if len(c) > 1:
                    mu = y[c].mean()
                    y[c] = mu + math.sqrt(len(c) / (len(c) - 1)) * (y[c] - mu)
    ladders = [(float(x.min()), float(x.max())) for x in xs]
    rng = np.random.default_rng(seed)
    Sb = np.empty((n_boot, len(keys)))
    Tb = np.empty((n_boot, len(keys)))
    with _single_threaded_blas():
        _bootstrap_optima(rng, xs, ys, cells, ladders, S, Sb, Tb, resample_students, within,
                          smoothed, window)
    method = ("students+" if resample_students else "") + ("runs" if within == "student" else "cells")
    out = _gap_summary(S, T, _line_fits(Sb, Tb), n_boot, level, method)
    out["pairs"] = list(zip(S.tolist(), T.tolist()))
    return out


# ---------------------------------------------------------------------------------------------
# the Busbridge laws (with gradients in log-parameters, for the fits)


def _arr(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _power_sum(N: np.ndarray, D: np.ndarray,
               p: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S = A/N^a + B/D^b and its two terms, computed in log space (no overflow at N ~ 1e12)."""
    tA = np.exp(math.log(p["A"]) - p["a"] * np.log(N))
    tB = np.exp(math.log(p["B"]) - p["b"] * np.log(D))
    return tA + tB, tA, tB


def _supervised_with_grad(N: np.ndarray, D: np.ndarray,
                          p: Mapping[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """L and dL/dlog(coef) for every supervised coefficient."""
    S, tA, tB = _power_sum(N, D, p)
    logS = np.log(S)
    Q = np.exp(p["g"] * logS)
    gq = p["g"] * Q / S
    grads = {
        "E": np.full_like(S, p["E"]),
        "A": gq * tA,
        "B": gq * tB,
        "a": -gq * tA * p["a"] * np.log(N),
        "b": -gq * tB * p["b"] * np.log(D),
        "g": Q * p["g"] * logS,
    }
    return p["E"] + Q, grads


def busbridge_supervised(N: ArrayLike, D: ArrayLike,
                         params: Mapping[str, float] = BUSBRIDGE_SUPERVISED) -> np.ndarray:
    """Supervised loss ``E + (A/N^a + B/D^b)^g`` (Busbridge Eq. 1); N non-embedding params, D tokens."""
    return _supervised_with_grad(_arr(N), _arr(D), params)[0]


def _distill_with_grad(N: np.ndarray, D: np.ndarray, LT: np.ndarray, Lt: np.ndarray,
                       p: Mapping[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """L_S and dL_S/dlog(coef) for every distillation coefficient (supervised part held fixed)."""
    S, tA, tB = _power_sum(N, D, p)
    logS = np.log(S)
    logLT = np.log(LT)
    u = logLT - np.log(Lt) - math.log(p["d1"])  # log(L_T / (Lt_S d1))
    x = u / p["f1"]
    soft = np.logaddexp(0.0, x)  # log(1 + (L_T/(Lt_S d1))^(1/f1)), stable for large x
    logF = -p["c1"] * p["f1"] * soft
    logP = -p["c0"] * logLT + logF + p["g"] * logS
    P = np.exp(logP)
    sig = expit(x)
    gS = p["g"] / S
    dlogP = {
        "A": gS * tA,
        "B": gS * tB,
        "a": -gS * tA * p["a"] * np.log(N),
        "b": -gS * tB * p["b"] * np.log(D),
        "g": p["g"] * logS,
        "c0": -p["c0"] * logLT,
        "c1": logF,
        "f1": logF + p["c1"] * u * sig,
        "d1": p["c1"] * sig,
    }
    return LT + P, {k: P * v for k, v in dlogP.items()}


def busbridge_distill(N_S: ArrayLike, D_S: ArrayLike, L_T: ArrayLike,
                      params: Mapping[str, float] = BUSBRIDGE_DISTILL,
                      sup_params: Mapping[str, float] | None = BUSBRIDGE_SUPERVISED, *,
                      Lt_S: ArrayLike | None = None) -> np.ndarray:
    """Distilled student loss (Busbridge Eq. 8) for teacher loss ``L_T``.

    ``Lt_S`` (the student's label-only loss) comes from the supervised law with ``sup_params``
    unless given directly -- e.g. the measured CE-only losses, which on a tiny sweep are better
    known than a supervised law fitted to three points.
    """
    N, D, LT = np.broadcast_arrays(_arr(N_S), _arr(D_S), _arr(L_T))
    if Lt_S is None:
        if sup_params is None:
            raise ValueError("give sup_params or Lt_S")
        Lt = busbridge_supervised(N, D, sup_params)
    else:
        Lt = np.broadcast_to(_arr(Lt_S), N.shape)
    return _distill_with_grad(N, D, LT, Lt, params)[0]


def distill_optimal_teacher_loss(N_S: ArrayLike, D_S: ArrayLike,
                                 params: Mapping[str, float] = BUSBRIDGE_DISTILL,
                                 sup_params: Mapping[str, float] | None = BUSBRIDGE_SUPERVISED, *,
                                 Lt_S: ArrayLike | None = None) -> np.ndarray:
    """The teacher loss that minimises the student's loss under the law (the bottom of the U).

    Solves ``dL_S/dL_T = 0``, i.e. ``P * (c0 + c1 * sigmoid(x)) = L_T`` with ``P = L_S - L_T``,
    on ``0 < L_T < d1 * Lt_S`` (beyond that L_S ~ L_T only rises).  Ignoring the broken-power-law
    factor gives the closed form ``(c0 Z)^(1/(1+c0))``, but at the optimum that factor is
    already 0.85-0.98 for the published coefficients, so the closed form is up to ~10% low.
    A result below the lowest reachable teacher loss (the supervised ``E``) means the
    strongest available teacher is best.
    """
    from scipy.optimize import brentq

    N, D = np.broadcast_arrays(_arr(N_S), _arr(D_S))
    if Lt_S is None:
        if sup_params is None:
            raise ValueError("give sup_params or Lt_S")
        Lt = busbridge_supervised(N, D, sup_params)
    else:
        Lt = np.broadcast_to(_arr(Lt_S), N.shape)
    out = np.empty(N.shape)
    for idx in np.ndindex(N.shape):
        n, d, lt = (np.asarray([v[idx]]) for v in (N, D, Lt))

        def slope(log_lt: float) -> float:  # L_T * dL_S/dL_T, sign-equivalent and smooth
            LT = np.asarray([math.exp(log_lt)])
            ls = _distill_with_grad(n, d, LT, lt, params)[0]
            u = math.log(LT[0] / (lt[0] * params["d1"]))
            gap = float(ls[0] - LT[0])
            return LT[0] - gap * (params["c0"] + params["c1"] * float(expit(u / params["f1"])))

        hi = math.log(params["d1"] * lt[0])
        lo = hi - 1.0
        while slope(lo) > 0 and lo > hi - 50:
            lo -= 1.0
        out[idx] = math.exp(brentq(slope, lo, hi, xtol=1e-12)) if slope(hi) > 0 else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# fitting


@dataclass
class FitResult:
    """A fitted law: all coefficients (fixed ones included) and how well they fit.

    ``rmse`` is in loss units (nats), ``rmse_log`` on log-loss (the fitted scale);
    ``objective`` is the mean Huber loss divided by delta (so ~ mean |log residual|).
    ``converged`` is L-BFGS-B's verdict for the winning start; False after its 1000-iteration
    cap usually means a flat valley -- more free coefficients than the data pin down -- where
    the predictions are fine but the individual coefficients are not to be quoted.
    """

    params: dict[str, float]
    free: tuple[str, ...]
    fixed: dict[str, float]
    rmse: float
    rmse_log: float
    objective: float
    converged: bool
    n_points: int
    n_starts: int
    residuals_log: np.ndarray = field(repr=False)


def _huber_over_delta(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber(r)/delta and its derivative.  Dividing by delta keeps the objective and gradient
    O(|r|) and O(1) instead of ~1e-6 and ~1e-4, so L-BFGS-B's tolerances mean something."""
    a = np.abs(r)
    val = np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta)
    return val, np.clip(r / delta, -1.0, 1.0)


def _fit(model: Callable[[Mapping[str, float]], tuple[np.ndarray, dict[str, np.ndarray]]],
         keys: tuple[str, ...], L_obs: np.ndarray, fixed: Mapping[str, float] | None,
         starts: Iterable[Mapping[str, float]], delta: float) -> FitResult:
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    unknown = set(fixed) - set(keys)
    if unknown:
        raise ValueError(f"unknown coefficients {sorted(unknown)}; expected a subset of {keys}")
    if any(v <= 0 for v in fixed.values()):
        raise ValueError("fixed coefficients must be positive")
    if np.any(~np.isfinite(L_obs)) or np.any(L_obs <= 0):
        raise ValueError("losses must be finite and positive")
    free = tuple(k for k in keys if k not in fixed)
    n = L_obs.size
    log_obs = np.log(L_obs)

    def unpack(theta: np.ndarray) -> dict[str, float]:
        return {**fixed, **{k: float(math.exp(t)) for k, t in zip(free, theta)}}

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        pred, grads = model(unpack(theta))
        if np.any(~np.isfinite(pred)) or np.any(pred <= 0):
            return 1e6, np.zeros_like(theta)
        r = np.log(pred) - log_obs
        val, dval = _huber_over_delta(r, delta)
        w = dval / pred / n
        return float(val.sum() / n), np.asarray([float(np.dot(w, grads[k])) for k in free])

    bounds = [(math.log(_BOUNDS[k][0]), math.log(_BOUNDS[k][1])) for k in free]
    with _single_threaded_blas():
        best, n_starts = _multistart(objective, starts, free, bounds)
    if best is None:
        raise ValueError("no starting points")
    params = unpack(best[0])
    pred = model(params)[0]
    r = np.log(pred) - log_obs
    return FitResult(
        params={k: params[k] for k in keys}, free=free, fixed=fixed,
        rmse=float(np.sqrt(np.mean((pred - L_obs) ** 2))),
        rmse_log=float(np.sqrt(np.mean(r ** 2))),
        objective=best[1], converged=best[2], n_points=n, n_starts=n_starts, residuals_log=r,
    )


def _multistart(objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
                starts: Iterable[Mapping[str, float]], free: tuple[str, ...],
                bounds: list[tuple[float, float]]) -> tuple[tuple[np.ndarray, float, bool] | None, int]:
    """L-BFGS-B from every distinct start; the lowest end point wins."""
    best = None
    seen: set[tuple[float, ...]] = set()
    n_starts = 0
    for start in starts:
        missing = [k for k in free if k not in start]
        if missing:
            raise ValueError(f"start {dict(start)} lacks free coefficients {missing}")
        theta0 = np.asarray([math.log(min(max(float(start[k]), _BOUNDS[k][0]), _BOUNDS[k][1]))
                             for k in free])
        key = tuple(np.round(theta0, 6))
        if key in seen:
            continue
        seen.add(key)
        n_starts += 1
        if not free:
            theta, fun, ok = theta0, objective(theta0)[0], True
        else:
            res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-8})
            theta, fun, ok = res.x, float(res.fun), bool(res.success)
        if best is None or fun < best[1]:
            best = (theta, fun, ok)
    return best, n_starts


def _scales_for(target: float, N: np.ndarray, D: np.ndarray, a: float, b: float,
                g: float) -> tuple[float, float]:
    """A, B such that each term is half of ``target^(1/g)`` at the sweep's geometric-mean N, D:
    puts every start of the grid at the data's loss level whatever the model scale."""
    half = 0.5 * max(target, 1e-3) ** (1.0 / g)
    n_mid, d_mid = float(np.exp(np.log(N).mean())), float(np.exp(np.log(D).mean()))
    return half * n_mid ** a, half * d_mid ** b


def _default_supervised_starts(N: np.ndarray, D: np.ndarray, L: np.ndarray,
                               fixed: Mapping[str, float]) -> list[dict[str, float]]:
    grid = {"a": (0.2, 0.6), "b": (0.2, 0.6), "g": (0.3, 0.7),
            "E": (0.3 * L.min(), 0.7 * L.min())}
    for k, v in fixed.items():
        grid[k] = (v,)
    starts = [dict(BUSBRIDGE_SUPERVISED, **fixed)]
    for E, a, b, g in itertools.product(grid["E"], grid["a"], grid["b"], grid["g"]):
        A, B = _scales_for(float(np.exp(np.log(L).mean())) - E, N, D, a, b, g)
        starts.append({"E": E, "A": fixed.get("A", A), "B": fixed.get("B", B), "a": a, "b": b, "g": g})
    return starts


def fit_supervised(N: ArrayLike, D: ArrayLike, L: ArrayLike, *, fixed: Mapping[str, float] | None = None,
                   starts: Iterable[Mapping[str, float]] | None = None,
                   delta: float = HUBER_DELTA) -> FitResult:
    """Fit ``L = E + (A/N^a + B/D^b)^g`` to label-only runs.

    Huber(delta) on ``log L_pred - log L_obs``, L-BFGS-B over the logs of the free coefficients
    from each start; the best end point wins.  Default starts: the published coefficients plus
    a 2-level grid over (E, a, b, g) -- 17 starts -- with A, B scaled to the data
    (``_scales_for``); on synthetic data a 3-level grid (55 starts) found the same optimum
    from 41 of them, so the finer grid only cost time.  ``fixed`` holds
    coefficients at given values (e.g. ``{k: BUSBRIDGE_SUPERVISED[k] for k in "abg"}``); keep
    the free count well below the number of points or the fit interpolates and says nothing.
    """
    Na, Da, La = np.broadcast_arrays(_arr(N), _arr(D), _arr(L))
    Na, Da, La = Na.ravel(), Da.ravel(), La.ravel()
    fixed = dict(fixed or {})
    starts = list(starts) if starts is not None else _default_supervised_starts(Na, Da, La, fixed)
    return _fit(lambda p: _supervised_with_grad(Na, Da, p), SUPERVISED_KEYS, La, fixed, starts, delta)


def _default_distill_starts(N: np.ndarray, D: np.ndarray, LT: np.ndarray, LS: np.ndarray,
                            fixed: Mapping[str, float]) -> list[dict[str, float]]:
    grid = {"a": (0.3, 0.7), "b": (0.3, 0.7), "g": (0.5, 1.0), "c0": (1.0, 2.5),
            "c1": (BUSBRIDGE_DISTILL["c1"],), "f1": (0.05, 0.3), "d1": (1.0, 1.4)}
    for k, v in fixed.items():
        if k in grid:
            grid[k] = (v,)
    strong = LS > LT * 1.001  # runs the strong-teacher branch describes
    gap = (LS - LT)[strong] if strong.any() else np.asarray([0.1])
    lt = LT[strong] if strong.any() else LT
    starts = [dict(BUSBRIDGE_DISTILL, **fixed)]
    names = ("a", "b", "g", "c0", "c1", "f1", "d1")
    for values in itertools.product(*(grid[k] for k in names)):
        p = dict(zip(names, values))
        # Z such that the strong-teacher branch L_T + Z L_T^-c0 matches the typical gap
        Z = float(np.exp(np.mean(np.log(gap) + p["c0"] * np.log(lt))))
        A, B = _scales_for(Z, N, D, p["a"], p["b"], p["g"])
        starts.append({**p, "A": fixed.get("A", A), "B": fixed.get("B", B)})
    return starts


def fit_distillation(N_S: ArrayLike, D_S: ArrayLike, L_T: ArrayLike, L_S: ArrayLike,
                     sup_params: Mapping[str, float] | None = None, *,
                     Lt_S: ArrayLike | None = None, fixed: Mapping[str, float] | None = None,
                     starts: Iterable[Mapping[str, float]] | None = None,
                     delta: float = HUBER_DELTA) -> FitResult:
    """Fit the distillation law's coefficients with the supervised part held fixed.

    ``Lt_S`` comes from ``sup_params`` (a fitted or the published supervised law) unless given
    directly.  Method as ``fit_supervised``; default starts: the published coefficients plus a
    2-level grid over (a, b, g, c0, f1, d1) -- up to 64 starts, fewer when some are fixed --
    with A, B scaled so the strong-teacher branch matches the observed gaps L_S - L_T.  See
    the module docstring (and ``SWEEP_FIXED_DISTILL``) for what a small sweep should fix.
    """
    N, D, LT, LS = (a.ravel() for a in np.broadcast_arrays(_arr(N_S), _arr(D_S), _arr(L_T), _arr(L_S)))
    if Lt_S is None:
        if sup_params is None:
            raise ValueError("give sup_params or Lt_S")
        Lt = busbridge_supervised(N, D, sup_params)
    else:
        Lt = np.broadcast_to(_arr(Lt_S), N.shape).ravel()
    fixed = dict(fixed or {})
    starts = list(starts) if starts is not None else _default_distill_starts(N, D, LT, LS, fixed)
    return _fit(lambda p: _distill_with_grad(N, D, LT, Lt, p), DISTILL_KEYS, LS, fixed, starts, delta)


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


@dataclass
class HoldoutResult:
    """Extrapolation check: fitted on the weaker runs, scored on the rest."""

    fit: FitResult
    mean_abs_rel_error: float
    max_abs_rel_error: float
    n_train: int
    n_test: int
    train_mask: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)


def holdout_error(N_S: ArrayLike, D_S: ArrayLike, L_T: ArrayLike, L_S: ArrayLike,
                  sup_params: Mapping[str, float] | None = None, *,
                  split: Literal["student", "teacher"] = "student", weak_fraction: float = 0.5,
                  train_mask: ArrayLike | None = None, Lt_S: ArrayLike | None = None,
                  fixed: Mapping[str, float] | None = None,
                  starts: Iterable[Mapping[str, float]] | None = None) -> HoldoutResult:
    """Fit the distillation law on the weaker runs and report mean |L_pred - L_obs| / L_obs on the rest.

    ``split="student"``: train on the smallest students (the first ``weak_fraction`` of the
    distinct N_S, at least one, never all); ``"teacher"``: on the weakest teachers (highest
    L_T).  ``train_mask`` overrides both.  Extrapolating to stronger runs is the test that
    matters: a law is fitted at small scale to predict larger scale.
    """
    N, D, LT, LS = (a.ravel() for a in np.broadcast_arrays(_arr(N_S), _arr(D_S), _arr(L_T), _arr(L_S)))
    if train_mask is None:
        if split == "student":
            levels = np.unique(N)  # ascending: small students first
            key = N
        elif split == "teacher":
            levels = np.unique(LT)[::-1]  # descending loss: weak teachers first
            key = LT
        else:
            raise ValueError(f"split must be 'student' or 'teacher', not {split!r}")
        if len(levels) < 2:
            raise ValueError(f"need >= 2 distinct {split} levels to hold any out")
        n_weak = min(max(1, int(round(weak_fraction * len(levels)))), len(levels) - 1)
        mask = np.isin(key, levels[:n_weak])
    else:
        mask = np.broadcast_to(np.asarray(train_mask, dtype=bool), N.shape).ravel()
    if mask.all() or not mask.any():
        raise ValueError("the split must leave runs on both sides")
    Lt = None if Lt_S is None else np.broadcast_to(_arr(Lt_S), N.shape).ravel()
    fit = fit_distillation(N[mask], D[mask], LT[mask], LS[mask], sup_params,
                           Lt_S=None if Lt is None else Lt[mask], fixed=fixed, starts=starts)
    pred = busbridge_distill(N, D, LT, fit.params, sup_params, Lt_S=Lt)
    rel = np.abs(pred[~mask] - LS[~mask]) / LS[~mask]
    return HoldoutResult(fit=fit, mean_abs_rel_error=float(rel.mean()),
                         max_abs_rel_error=float(rel.max()), n_train=int(mask.sum()),
                         n_test=int((~mask).sum()), train_mask=mask, predicted=pred)


# ---------------------------------------------------------------------------------------------
# plot


def plot_sweep(runs: Iterable[SweepRun | Mapping[str, float]], best: Sequence[tuple[float, float]],
               out_png: str | Path, title: str | None = None) -> Path:
    """Student loss vs teacher params, one curve per student size, best teacher starred,
    CE-only baseline dashed in the same colour: the capacity gap at a glance.

    ``best`` is ``best_teachers(...)`` output; a smoothed optimum between rungs is marked on
    the curve (interpolated in log N_T).  Uses the Agg canvas directly, never pyplot's global
    state, so it is safe in scripts and tests alike.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _group_by_student(as_runs(runs))
    best_by_student = {float(s): float(t) for s, t in best}
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    for colour, ((n_s, d_s), group) in zip(colours, sorted(groups.items())):
        x, y, _ = _curve(group)
        nt = np.exp(x)
        ax.plot(nt, y, "o-", color=colour, label=f"student {n_s:.3g} params, {d_s:.3g} tok")
        ce = float(np.mean([r.ce_only_loss for r in group]))
        ax.axhline(ce, color=colour, linestyle="--", linewidth=1.0, alpha=0.8)
        if n_s in best_by_student:
            t_best = best_by_student[n_s]
            y_best = float(np.interp(math.log(t_best), x, y))
            ax.plot([t_best], [y_best], marker="*", markersize=14, color=colour,
                    markeredgecolor="black", linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel("teacher non-embedding parameters")
    ax.set_ylabel("student held-out loss (nats)")
    ax.set_title(title or "Distilled student loss vs teacher size (dashed: CE-only; star: best)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
