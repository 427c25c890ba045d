"""Which teacher to cache: the distillation law's prediction for each candidate teacher of one student.

Given a student (non-embedding parameters ``N_S``, tokens ``D_S``) and candidate teachers (sizes,
and losses where known), ``plan`` predicts each candidate's distilled student loss with Busbridge
et al.'s law (``laws.forms.busbridge_distill``), names the best, and compares it with

* supervised training of the same student on the same ``D_S`` tokens (the label-only loss
  ``Lt_S``): the teacher's own cost is left out, since a cached teacher is already paid for;
* MiniMA's capacity-gap rule, a teacher ~2.5x the student (the candidate nearest in log size).

Teacher sizes without a loss are mapped to one by the supervised law at a number of training
tokens per parameter (20 by default, the compute-optimal ratio).  Everything here is numpy; the
``fits.json`` of a sweep is read by ``laws.fitsfile``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from laws.forms import (
    BUSBRIDGE_DISTILL,
    BUSBRIDGE_SUPERVISED,
    MINIMA_CAPACITY_GAP,
    _expit,
    busbridge_distill,
    busbridge_supervised,
)

#: Where the published coefficients come from; outside this range they are extrapolations.
PUBLISHED_FITTED_ON = "C4, 143M-12.6B non-embedding params, 697 distillation runs"
PUBLISHED_PARAMS_RANGE = (143e6, 12.6e9)
#: MiniMA's best teacher ~2.5x the student (the slope of the quoted T* ~ 2.498 S - 11.498).
MINIMA_RATIO = MINIMA_CAPACITY_GAP["slope"]
#: A measured label-only run stands in for the student when its size and tokens are this close.
MATCH_REL = 5e-3


class PlanInputError(ValueError):
    """An input the plan cannot use; ``setting`` names it as ``PlanConfig`` does (``student_params``)."""

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{setting}: {problem}")


@dataclass(frozen=True)
class Law:
    """A distillation law, the supervised law beside it, and what they were fitted on.

    ``supervised`` is None for a sweep that fitted only the distillation law; then the label-only
    loss must come from a measured run (``label_only``: ``(N_S, D_S, CE-only loss)`` triples) and
    teacher losses must be given.  ``params_range`` and ``teacher_params_range`` are the student and
    teacher sizes the fit saw, where known.
    """

    name: str
    distill: Mapping[str, float]
    supervised: Mapping[str, float] | None
    fitted_on: str
    params_range: tuple[float, float] | None = None
    teacher_params_range: tuple[float, float] | None = None
    label_only: tuple[tuple[float, float, float], ...] = ()


PUBLISHED_LAW = Law(name="published", distill=BUSBRIDGE_DISTILL, supervised=BUSBRIDGE_SUPERVISED,
                    fitted_on=PUBLISHED_FITTED_ON, params_range=PUBLISHED_PARAMS_RANGE,
                    teacher_params_range=PUBLISHED_PARAMS_RANGE)


def _positive(setting: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        shown = f"{value:.6g}" if isinstance(value, int | float) else repr(value)
        raise PlanInputError(setting, f"{shown} must be a positive finite number")


@dataclass(frozen=True)
class PlanConfig:
    """One planning question.  ``teacher_losses`` (held-out CE, nats) align with ``teacher_params``;
    without them each size gets the supervised law's loss at ``teacher_tokens_per_param``."""

    student_params: float            # non-embedding
    student_tokens: float
    teacher_params: tuple[float, ...]  # non-embedding, one per candidate
    teacher_losses: tuple[float, ...] | None = None
    teacher_tokens_per_param: float = 20.0
    teacher_labels: tuple[str, ...] | None = None  # e.g. the model names of caches
    law: Law = PUBLISHED_LAW

    def __post_init__(self) -> None:
        _positive("student_params", self.student_params)
        _positive("student_tokens", self.student_tokens)
        _positive("teacher_tokens_per_param", self.teacher_tokens_per_param)
        for n in self.teacher_params:
            _positive("teacher_params", n)
        if len(self.teacher_params) < 2:
            raise PlanInputError("teacher_params", f"{len(self.teacher_params)} candidate(s): give at least 2 "
                                 "teachers to choose between")
        if self.teacher_losses is not None:
            if len(self.teacher_losses) != len(self.teacher_params):
                raise PlanInputError("teacher_losses", f"{len(self.teacher_losses)} losses for "
                                     f"{len(self.teacher_params)} teachers; give one loss per teacher")
            for loss in self.teacher_losses:
                _positive("teacher_losses", loss)
        if self.teacher_labels is not None and len(self.teacher_labels) != len(self.teacher_params):
            raise PlanInputError("teacher_labels", "one label per teacher")
        pairs = list(zip(self.teacher_params, self.teacher_losses or [None] * len(self.teacher_params)))
        for i, pair in enumerate(pairs):
            if pair in pairs[:i]:
                raise PlanInputError("teacher_params", f"{pair[0]:.6g} listed twice")


@dataclass(frozen=True)
class TeacherPrediction:
    """One candidate: its loss (``loss_from``: ``given`` or the law's mapping) and the student's."""

    label: str
    params: float
    loss: float
    loss_from: str
    student_loss: float
    gain: float  # label-only loss - student loss, nats: > 0 when distilling from it pays


@dataclass(frozen=True)
class Plan:
    """The answer: every candidate, the best, MiniMA's choice, and the bottom of the law's U."""

    config: PlanConfig
    label_only_loss: float
    label_only_from: str
    predictions: tuple[TeacherPrediction, ...]
    best: TeacherPrediction
    minima_target_params: float
    minima_choice: TeacherPrediction
    optimal_teacher_loss: float           # nan when the law has no interior minimum
    optimal_teacher_params: float | None  # at teacher_tokens_per_param; None when unreachable or no law
    notes: tuple[str, ...] = field(default=())

    @property
    def distillation_pays(self) -> bool:
        return self.best.gain > 0

    def to_dict(self) -> dict:
        """Plain JSON types; the fields scripts read first are at the top."""
        cfg = self.config
        return {
            "best_teacher_params": self.best.params,
            "best_teacher_loss": self.best.loss,
            "best_student_loss": self.best.student_loss,
            "label_only_loss": self.label_only_loss,
            "label_only_from": self.label_only_from,
            "gain": self.best.gain,
            "distillation_pays": self.distillation_pays,
            "teachers": [asdict(p) for p in self.predictions],
            "minima_target_params": self.minima_target_params,
            "minima_teacher_params": self.minima_choice.params,
            "minima_student_loss": self.minima_choice.student_loss,
            "optimal_teacher_loss": None if math.isnan(self.optimal_teacher_loss) else self.optimal_teacher_loss,
            "optimal_teacher_params": self.optimal_teacher_params,
            "student_params": cfg.student_params,
            "student_tokens": cfg.student_tokens,
            "teacher_tokens_per_param": cfg.teacher_tokens_per_param,
            "law": cfg.law.name,
            "law_fitted_on": cfg.law.fitted_on,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# the pieces


def tokens_from_flops(flops: float, params: float) -> float:
    """Training tokens a budget of ``flops`` buys a model of ``params``: ``C = 6 N D`` (forward and
    backward, ~6 FLOPs per parameter per token; attention and the LM head are left out)."""
    _positive("flops", flops)
    _positive("student_params", params)
    return flops / (6.0 * params)


def supervised_teacher_loss(params: Sequence[float] | np.ndarray, tokens_per_param: float,
                            supervised: Mapping[str, float]) -> np.ndarray:
    """The held-out loss a teacher of ``params`` reaches trained on ``tokens_per_param * params`` tokens."""
    n = np.asarray(params, dtype=float)
    return busbridge_supervised(n, tokens_per_param * n, supervised)


def label_only_loss(cfg: PlanConfig) -> tuple[float, str]:
    """``Lt_S``: the student's loss trained on labels alone for ``D_S`` tokens, and where it came from."""
    law = cfg.law
    if law.supervised is not None:
        return float(busbridge_supervised(cfg.student_params, cfg.student_tokens, law.supervised)), "supervised law"
    for n, d, loss in law.label_only:
        if abs(n / cfg.student_params - 1) <= MATCH_REL and abs(d / cfg.student_tokens - 1) <= MATCH_REL:
            return float(loss), "measured CE-only run"
    have = ", ".join(f"{n:.6g} params at {d:.6g} tokens" for n, d, _ in law.label_only) or "none"
    raise PlanInputError("law", f"{law.name} holds no supervised law and no CE-only run of a {cfg.student_params:.6g}"
                         f"-param student at {cfg.student_tokens:.6g} tokens (it has: {have}), so the student's "
                         "label-only loss is unknown")


def teacher_losses(cfg: PlanConfig) -> tuple[np.ndarray, str]:
    """Each candidate's loss: as given, else the supervised law's at ``teacher_tokens_per_param``."""
    if cfg.teacher_losses is not None:
        return np.asarray(cfg.teacher_losses, dtype=float), "given"
    if cfg.law.supervised is None:
        raise PlanInputError("teacher_losses", f"{cfg.law.name} holds no supervised law to turn teacher sizes "
                             "into losses; give the teachers' held-out losses")
    losses = supervised_teacher_loss(cfg.teacher_params, cfg.teacher_tokens_per_param, cfg.law.supervised)
    return losses, f"law at {cfg.teacher_tokens_per_param:g} tokens/param"


def _u_slope(log_lt: np.ndarray, n: float, d: float, lt_s: float, p: Mapping[str, float]) -> np.ndarray:
    """``dL_S/dlog L_T = L_T - (L_S - L_T)(c0 + c1 sigmoid(x))``: negative where a stronger teacher helps."""
    lt = np.exp(log_lt)
    gap = busbridge_distill(n, d, lt, p, None, Lt_S=lt_s) - lt
    x = (log_lt - math.log(lt_s * p["d1"])) / p["f1"]
    return lt - gap * (p["c0"] + p["c1"] * _expit(x))


#: The search for the best teacher loss: log L_T from log(d1 Lt_S) - SPAN to log(d1 Lt_S), in STEPS.
OPTIMUM_SPAN, OPTIMUM_STEPS = 8.0, 8001


def optimal_teacher_loss(n: float, d: float, lt_s: float, distill: Mapping[str, float]) -> float:
    """The teacher loss that minimises the predicted student loss (numpy only).

    Global, not just the first turn of the slope: with the published coefficients the curve is one
    U (``laws.forms.distill_optimal_teacher_loss``, the scipy twin, agrees to 1e-9), but fitted
    coefficients can add a bump where the weak-teacher factor switches on.  So the minimum is
    located on a grid of log L_T (step 1e-3) below ``d1 * Lt_S`` (above it L_S ~ L_T only rises),
    then bisected on the slope between its grid neighbours.  nan when the minimum is the grid's
    lowest point (no interior minimum within e^-8 of ``d1 * Lt_S``).
    """
    top = math.log(distill["d1"] * lt_s)
    grid = np.linspace(top - OPTIMUM_SPAN, top, OPTIMUM_STEPS)
    curve = busbridge_distill(n, d, np.exp(grid), distill, None, Lt_S=lt_s)
    i = int(np.argmin(curve))
    if i == 0:
        return math.nan
    lo, hi = grid[i - 1], grid[min(i + 1, len(grid) - 1)]
    slope = lambda v: float(_u_slope(np.asarray(v), n, d, lt_s, distill))  # noqa: E731
    if not (slope(lo) < 0 < slope(hi)):
        return math.exp(grid[i])      # a flat bottom: the grid point is as good as any
    for _ in range(100):   # halves a 2e-3 bracket far below float64's resolution of log L_T
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return math.exp(0.5 * (lo + hi))


def teacher_params_for_loss(loss: float, tokens_per_param: float, supervised: Mapping[str, float]) -> float | None:
    """The teacher size whose supervised loss at ``tokens_per_param`` is ``loss``; None if no size
    below 1e30 parameters reaches it (``loss`` at or below the law's floor ``E``)."""
    if not math.isfinite(loss) or loss <= supervised["E"]:
        return None
    lo, hi = 0.0, math.log(1e30)

    def at(log_n: float) -> float:
        return float(supervised_teacher_loss([math.exp(log_n)], tokens_per_param, supervised)[0])

    if at(hi) > loss:
        return None
    if at(lo) <= loss:
        return 1.0
    for _ in range(200):   # L(N, rN) falls monotonically with N
        mid = 0.5 * (lo + hi)
        if at(mid) > loss:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def _range_notes(cfg: PlanConfig) -> list[str]:
    law = cfg.law
    notes = []
    if law.params_range is not None:
        lo, hi = law.params_range
        if not lo <= cfg.student_params <= hi:
            notes.append(f"the student ({format_count(cfg.student_params)} params) is outside {format_count(lo)}-"
                         f"{format_count(hi)}, the sizes the coefficients were fitted on: an extrapolation")
    if law.teacher_params_range is not None:
        lo, hi = law.teacher_params_range
        outside = [n for n in cfg.teacher_params if not lo <= n <= hi]
        if outside:
            notes.append(f"{len(outside)} of {len(cfg.teacher_params)} teachers are outside {format_count(lo)}-"
                         f"{format_count(hi)} params, the sizes the coefficients were fitted on: extrapolated")
    return notes


# ---------------------------------------------------------------------------------------------
# the plan


def plan_teachers(cfg: PlanConfig) -> Plan:
    """Predict the distilled student's loss for every candidate teacher of ``cfg``.

    The best is the lowest predicted student loss (ties go to the smaller teacher, the cheaper
    cache); MiniMA's choice is the candidate nearest ``MINIMA_RATIO * N_S`` in log size.
    """
    law = cfg.law
    lt_s, lt_s_from = label_only_loss(cfg)
    losses, loss_from = teacher_losses(cfg)
    students = busbridge_distill(cfg.student_params, cfg.student_tokens, losses, law.distill, None, Lt_S=lt_s)
    labels = cfg.teacher_labels or tuple(format_count(n) for n in cfg.teacher_params)
    preds = tuple(TeacherPrediction(label=lab, params=float(n), loss=float(lt), loss_from=loss_from,
                                    student_loss=float(ls), gain=float(lt_s - ls))
                  for lab, n, lt, ls in zip(labels, cfg.teacher_params, losses, students))
    best = min(preds, key=lambda p: (p.student_loss, p.params))
    target = MINIMA_RATIO * cfg.student_params
    minima = min(preds, key=lambda p: (abs(math.log(p.params / target)), p.params))
    opt_loss = optimal_teacher_loss(cfg.student_params, cfg.student_tokens, lt_s, law.distill)
    opt_params = (teacher_params_for_loss(opt_loss, cfg.teacher_tokens_per_param, law.supervised)
                  if law.supervised is not None else None)
    notes = _range_notes(cfg)
    if law.supervised is not None and not opt_loss > law.supervised["E"]:
        notes.append("the law's best teacher loss is below what any teacher reaches (its floor E): "
                     "the stronger the teacher, the better")
    return Plan(config=cfg, label_only_loss=lt_s, label_only_from=lt_s_from, predictions=preds, best=best,
                minima_target_params=target, minima_choice=minima, optimal_teacher_loss=opt_loss,
                optimal_teacher_params=opt_params, notes=tuple(notes))


def student_loss_curve(p: Plan, teacher_losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """The predicted student loss along a range of teacher losses (for the plot)."""
    cfg = p.config
    return busbridge_distill(cfg.student_params, cfg.student_tokens, np.asarray(teacher_losses, dtype=float),
                             cfg.law.distill, None, Lt_S=p.label_only_loss)


def format_count(n: float) -> str:
    """1.5e9 -> '1.5B', 8e5 -> '800k', 7358720 -> '7.36M': three significant digits."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"
