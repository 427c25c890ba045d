"""The capacity gap (MiniMA): does the best teacher scale linearly with the student, T* = r S?

Fits T* against S three ways (through the origin, a free line, a power law) with percentile
bootstrap intervals, from ``(S, T*)`` pairs or from the runs themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from laws.blas import _single_threaded_blas
from laws.forms import MINIMA_CAPACITY_GAP
from laws.sweep import SweepRun, _curve_arrays, _group_by_student, _optima_from_groups, _smoothed_optimum, as_runs


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
        for y, cs in zip(ys, cells):
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
