"""The sweep at a glance: student loss against teacher size, drawn with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from laws.extras import require
from laws.sweep import SweepRun, _curve, _group_by_student, as_runs


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
