"""Capacity-gap and distillation scaling laws fitted to a teacher x student sweep.

A sweep distills students of several sizes from a ladder of teachers (``SweepRun`` records).
This package answers two questions from such a grid:

1. **Capacity gap** (MiniMA): which teacher is best for each student, and does the best
   teacher scale linearly with the student (``T* = r S``, MiniMA reports ~2.5x)?
   ``teacher_optima`` / ``best_teachers`` locate the optimum per student,
   ``fit_capacity_gap`` / ``fit_capacity_gap_runs`` fit the relation with bootstrap intervals.
2. **Distillation scaling law** (Busbridge et al. 2025, arXiv 2502.08606): the supervised law
   ``busbridge_supervised`` and the distillation law ``busbridge_distill``, fitted by
   ``fit_supervised`` / ``fit_distillation`` as the paper did and checked by ``holdout_error``.

Our tiny models will not share Busbridge's coefficients (C4, 143M-12.6B params): fit ours and
report theirs (``BUSBRIDGE_SUPERVISED``, ``BUSBRIDGE_DISTILL``) beside them.

Modules: ``forms`` (the law formulas and published coefficients), ``sweep`` (run records,
best teacher per student), ``gap`` (the capacity-gap fits), ``fit`` (fitting the laws),
``plan`` (which teacher to cache for one student: ``trainer plan``), ``fitsfile`` (a sweep's
``fits.json`` read back), ``plot`` (matplotlib figures), ``blas`` (one BLAS thread during fits),
``extras`` (the optional scipy / matplotlib).  numpy is the only import at load time;
functions that need scipy or matplotlib import them when called and raise ``MissingExtraError`` (one line:
``pip install 'logitcache[laws]'``) when they are missing.  docs/laws.md says what the law
implies and how far a small sweep's fit can be trusted.
"""

from __future__ import annotations

# Private, re-exported (``as``) for the tests of the gradients and of the BLAS thread pinning.
from laws.blas import _single_threaded_blas as _single_threaded_blas
from laws.extras import INSTALL_HINT, MissingExtraError, ensure_installed
from laws.fit import HUBER_DELTA, FitResult, HoldoutResult, fit_distillation, fit_supervised, holdout_error
from laws.fitsfile import FITS_VERSION, read_fits_law
from laws.forms import (
    BUSBRIDGE_DISTILL,
    BUSBRIDGE_SUPERVISED,
    DISTILL_KEYS,
    MINIMA_CAPACITY_GAP,
    SUPERVISED_KEYS,
    SWEEP_FIXED_DISTILL,
    SWEEP_FIXED_SUPERVISED,
    busbridge_distill,
    busbridge_supervised,
    distill_optimal_teacher_loss,
)
from laws.forms import _distill_with_grad as _distill_with_grad
from laws.forms import _supervised_with_grad as _supervised_with_grad
from laws.gap import fit_capacity_gap, fit_capacity_gap_runs
from laws.plan import PUBLISHED_LAW, Law, Plan, PlanConfig, PlanInputError, TeacherPrediction, plan_teachers
from laws.plot import plan_figure, plot_sweep
from laws.sweep import SweepRun, TeacherOptimum, as_runs, best_teachers, supervised_points, teacher_optima

__all__ = [
    "BUSBRIDGE_DISTILL",
    "BUSBRIDGE_SUPERVISED",
    "DISTILL_KEYS",
    "FITS_VERSION",
    "HUBER_DELTA",
    "INSTALL_HINT",
    "MINIMA_CAPACITY_GAP",
    "PUBLISHED_LAW",
    "SUPERVISED_KEYS",
    "SWEEP_FIXED_DISTILL",
    "SWEEP_FIXED_SUPERVISED",
    "FitResult",
    "HoldoutResult",
    "Law",
    "MissingExtraError",
    "Plan",
    "PlanConfig",
    "PlanInputError",
    "SweepRun",
    "TeacherOptimum",
    "TeacherPrediction",
    "as_runs",
    "best_teachers",
    "busbridge_distill",
    "busbridge_supervised",
    "distill_optimal_teacher_loss",
    "ensure_installed",
    "fit_capacity_gap",
    "fit_capacity_gap_runs",
    "fit_distillation",
    "fit_supervised",
    "holdout_error",
    "plan_figure",
    "plan_teachers",
    "plot_sweep",
    "read_fits_law",
    "supervised_points",
    "teacher_optima",
]
