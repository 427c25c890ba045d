"""The sweep and a plan at a glance: student loss against teacher size, drawn with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from laws.extras import require
from laws.plan import Plan, format_count, student_loss_curve, supervised_teacher_loss
from laws.sweep import SweepRun, _curve, _group_by_student, as_runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_sweep(runs: Iterable[SweepRun | Mapping[str, float]], best: Sequence[tuple[float, float]],
               out_png: str | Path, title: str | None = None) -> Path:
    """Student loss vs teacher params, one curve per student size, best teacher starred,
    CE-only baseline dashed in the same colour: the capacity gap at a glance.

    ``best`` is ``best_teachers(...)`` output; a smoothed optimum between rungs is marked on
    the curve (interpolated in log N_T).  Uses the Agg canvas directly, never pyplot's global
    state, so it is safe in scripts and tests alike.
    """
    FigureCanvasAgg = require("matplotlib.backends.backend_agg").FigureCanvasAgg
    Figure = require("matplotlib.figure").Figure

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


def plan_figure(plan: Plan) -> "Figure":
    """The plan at a glance: predicted student loss against teacher loss (and, when the losses come
    from the supervised law, against teacher size), candidates marked, the best starred, MiniMA's
    2.5x choice a diamond, supervised training of the same student dashed.

    Returns a matplotlib ``Figure`` on an Agg canvas (never pyplot's global state); the caller
    saves it (``trainer plan`` writes it under a temporary name, then renames).
    """
    FigureCanvasAgg = require("matplotlib.backends.backend_agg").FigureCanvasAgg
    Figure = require("matplotlib.figure").Figure

    cfg = plan.config
    preds = plan.predictions
    by_size = cfg.law.supervised is not None and cfg.teacher_losses is None
    fig = Figure(figsize=(11.0 if by_size else 6.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if by_size else 1, squeeze=False)[0]

    # student loss against teacher loss: the candidates, the bottom of the U, and the supervised loss
    losses = np.asarray([p.loss for p in preds])
    lo = min(losses.min(), plan.optimal_teacher_loss if math.isfinite(plan.optimal_teacher_loss) else losses.min())
    hi = max(losses.max(), plan.label_only_loss)
    grid = np.linspace(0.97 * lo, 1.03 * hi, 400)
    _plan_panel(axes[0], grid, student_loss_curve(plan, grid), [p.loss for p in preds], plan)
    axes[0].set_xlabel("teacher held-out loss (nats)")
    axes[0].invert_xaxis()   # stronger teachers to the right, as in the size panel
    if by_size:
        sizes = np.geomspace(min(p.params for p in preds) / 4, max(p.params for p in preds) * 4, 400)
        curve = student_loss_curve(plan, supervised_teacher_loss(sizes, cfg.teacher_tokens_per_param,
                                                                 cfg.law.supervised))
        _plan_panel(axes[1], sizes, curve, [p.params for p in preds], plan)
        axes[1].set_xscale("log")
        axes[1].set_xlabel(f"teacher non-embedding params (trained on {cfg.teacher_tokens_per_param:g} tokens/param)")
    fig.suptitle(f"student {format_count(cfg.student_params)} params, {format_count(cfg.student_tokens)} tokens; "
                 f"law: {'published' if cfg.law.name == 'published' else 'fitted'}", fontsize="medium")
    fig.tight_layout()
    return fig


def _plan_panel(ax, x: np.ndarray, curve: np.ndarray, xs: Sequence[float], plan: Plan) -> None:
    preds = plan.predictions
    ax.plot(x, curve, "-", color="C0", label="distilled student (law)")
    ax.plot(xs, [p.student_loss for p in preds], "o", color="C0")
    for xv, p in zip(xs, preds):
        ax.annotate(p.label, (xv, p.student_loss), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    i_best, i_minima = preds.index(plan.best), preds.index(plan.minima_choice)
    ax.plot([xs[i_best]], [plan.best.student_loss], marker="*", markersize=15, color="C1",
            markeredgecolor="black", linestyle="none", label="best candidate")
    ax.plot([xs[i_minima]], [plan.minima_choice.student_loss], marker="D", markersize=8, color="none",
            markeredgecolor="C2", markeredgewidth=2, linestyle="none", label="MiniMA 2.5x choice")
    ax.axhline(plan.label_only_loss, color="C3", linestyle="--", linewidth=1.0, label="supervised, same tokens")
    ax.set_ylabel("predicted student loss (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
