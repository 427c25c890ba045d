"""The law formulas: Busbridge et al.'s supervised and distillation laws, their published coefficients.

The supervised law ``L = E + (A/N^a + B/D^b)^g`` and the distillation law (Busbridge et al.
2025, arXiv 2502.08606)

    L_S = L_T + L_T^(-c0) * (1 + (L_T/(Lt_S*d1))^(1/f1))^(-c1*f1) * (A'/N_S^a' + B'/D_S^b')^g'

with ``Lt_S = L(N_S, D_S)`` the loss the student reaches on labels alone; N counts
non-embedding parameters, D tokens.  The ``_*_with_grad`` forms also return the gradients in
log-coefficients that the fits use.  What the law implies for a sweep (``L_S >= L_T``, the
U-shape in ``L_T``, where it disappears) is in docs/laws.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from laws.extras import require

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

#: Coefficients a small sweep should hold at the published values (see laws.fit).
SWEEP_FIXED_SUPERVISED: tuple[str, ...] = ("b", "g")
SWEEP_FIXED_DISTILL: tuple[str, ...] = ("b", "B", "g", "c1", "f1")

ArrayLike = float | Sequence[float] | np.ndarray


def _arr(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _expit(x: np.ndarray) -> np.ndarray:
    """The logistic 1 / (1 + e^-x), stable at any x; numpy alone, so evaluating the laws needs no scipy."""
    return np.exp(-np.logaddexp(0.0, -x))


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
    sig = _expit(x)
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
    brentq = require("scipy.optimize").brentq

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
        args = (n, d, lt, params)
        hi = math.log(params["d1"] * lt[0])
        lo = hi - 1.0
        while _optimum_slope(lo, *args) > 0 and lo > hi - 50:
            lo -= 1.0
        out[idx] = (math.exp(brentq(_optimum_slope, lo, hi, args=args, xtol=1e-12))
                    if _optimum_slope(hi, *args) > 0 else math.nan)
    return out


def _optimum_slope(log_lt: float, n: np.ndarray, d: np.ndarray, lt: np.ndarray,
                   params: Mapping[str, float]) -> float:
    """``L_T * dL_S/dL_T`` at ``L_T = exp(log_lt)``: sign-equivalent to the slope, and smooth."""
    LT = np.asarray([math.exp(log_lt)])
    ls = _distill_with_grad(n, d, LT, lt, params)[0]
    u = math.log(LT[0] / (lt[0] * params["d1"]))
    gap = float(ls[0] - LT[0])
    return LT[0] - gap * (params["c0"] + params["c1"] * float(_expit(np.asarray(u / params["f1"]))))
