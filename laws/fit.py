"""Fitting the laws to a sweep: Huber loss on log-loss residuals, L-BFGS-B from a grid of starts.

As Busbridge et al. did: Huber (delta 1e-4) on ``log L_pred - log L_obs``, L-BFGS-B over the
logs of the coefficients (so they stay positive) from several starts, the lowest end point
wins.  ``holdout_error`` checks a fit by extrapolating from weaker runs to stronger ones.

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
* Quote the fitted law for student scaling; treat its teacher optimum as a hypothesis that
  the sweep's own best teachers (``teacher_optima``) must confirm: on simulated sweeps the
  extrapolation to stronger teachers was far less reliable than to larger students
  (docs/laws.md has the figures).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from laws.blas import _single_threaded_blas
from laws.extras import require
from laws.forms import (
    BUSBRIDGE_DISTILL,
    BUSBRIDGE_SUPERVISED,
    DISTILL_KEYS,
    SUPERVISED_KEYS,
    ArrayLike,
    _arr,
    _distill_with_grad,
    _supervised_with_grad,
    busbridge_distill,
    busbridge_supervised,
)

#: Busbridge et al.'s Huber threshold on log-loss residuals.
HUBER_DELTA = 1e-4

# Log-space bounds per coefficient: wide enough never to bind on a sane fit, narrow enough that
# exp() cannot overflow while L-BFGS-B explores.
_BOUNDS: dict[str, tuple[float, float]] = {
    "E": (1e-4, 50.0), "A": (1e-8, 1e15), "B": (1e-8, 1e15),
    "a": (1e-3, 5.0), "b": (1e-3, 5.0), "g": (1e-3, 10.0),
    "c0": (1e-3, 20.0), "c1": (1e-3, 1e5), "f1": (1e-3, 10.0), "d1": (1e-2, 1e2),
}



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
    minimize = require("scipy.optimize").minimize
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
        # int(): round() of a numpy 1.x float returns a float
        n_weak = min(max(1, int(round(weak_fraction * len(levels)))), len(levels) - 1)  # noqa: RUF046
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
