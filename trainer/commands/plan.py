"""Which teacher to cache: predict the distilled student's loss for each candidate teacher.

    trainer plan --student-params 1B --tokens 20B --teacher-params 1B,3B,8B,30B,70B
    trainer plan --student-params 350M --flops 4.2e19 --caches caches/ --json
    trainer plan --student-params 201280 --tokens 409600 --teacher-params 221664,791680 \\
        --teacher-losses 4.5956,4.4542 --law docs/results/capacity_gap_cpu/fits.json

The distillation scaling law of Busbridge et al. 2025 (arXiv 2502.08606) predicts the student's
held-out loss from its non-embedding parameters N, its training tokens D and the teacher's loss.
The plan prints every candidate's prediction, the best teacher, the gain over supervised training
of the same student on the same D tokens (the teacher's cost is left out: a cached teacher is
paid for already) and says when distillation is predicted not to pay, with MiniMA's rule (a
teacher ~2.5x the student) beside it.

The published coefficients (--law published, the default) were fitted on C4 with 143M-12.6B
non-embedding parameters over 697 distillation runs; for other data, other tokenizers or sizes
outside that range the numbers are extrapolations, and a loss on another corpus is on another
scale. --law FITS.json uses the coefficients a sweep fitted (scripts/capacity_gap.py writes
fits.json, version 1).

Numbers take suffixes: 1.5e9, 1.5B, 20B, 800M, 350k. --flops C stands for D = C / (6 N): ~6 FLOPs
per parameter per training token (forward and backward), the student's training alone. Teacher
sizes without losses get the supervised law's loss at --teacher-tokens-per-param tokens per
parameter. --caches ROOT takes candidates from the manifests of the caches under ROOT (their
teacher.num_parameters counts embeddings too, so those teachers look somewhat larger to the law
than they are; manifests record no held-out loss, so their losses come from the law).
--json prints one JSON object on one line.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

from logitcache.errors import UserError

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", re.IGNORECASE)
# Beyond any model built: a manifest claiming more parameters than this is not believed.
MAX_TEACHER_PARAMS = 1e14
PLOT_FORMATS = ("png", "pdf", "svg")


def parse_quantity(text: str, option: str) -> float:
    """'1.5e9', '1.5B', '20B', '800M', '350k' -> a float; anything else is a one-line error naming `option`."""
    m = _NUMBER.fullmatch(text)
    if not m:
        raise UserError(f"{option} {text!r}: expected a number such as 1.5e9, 1.5B, 20B or 800M")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def parse_list(text: str, option: str) -> tuple[float, ...]:
    return tuple(parse_quantity(part, option) for part in text.split(","))


def add_arguments(p) -> None:
    p.add_argument("--student-params", metavar="N", help="the student's non-embedding parameters (required)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", metavar="D", help="the student's training tokens (this or --flops)")
    budget.add_argument("--flops", metavar="C", help="the student's training compute; D = C / (6 N)")
    p.add_argument("--teacher-params", metavar="N1,N2,...",
                   help="candidate teachers' non-embedding parameters, comma-separated (2 or more "
                        "candidates in all, counting those of --caches)")
    losses = p.add_mutually_exclusive_group()
    losses.add_argument("--teacher-tokens-per-param", metavar="R", default=None,
                        help="map teacher sizes to losses by the supervised law at R training tokens per "
                             "parameter (default 20, compute-optimal)")
    losses.add_argument("--teacher-losses", metavar="L1,L2,...",
                        help="the teachers' held-out losses (nats), one per --teacher-params, instead")
    p.add_argument("--law", default="published", metavar="published|FITS.json",
                   help="the coefficients: 'published' (Busbridge et al., fitted on C4, 143M-12.6B params, "
                        "697 distillation runs: extrapolated outside that) or a sweep's fits.json "
                        "(default %(default)s)")
    p.add_argument("--caches", metavar="ROOT",
                   help="add one candidate per teacher of the caches under ROOT (sizes from their manifests)")
    p.add_argument("--plot", metavar="FILE",
                   help="write the curve (student loss against teacher loss and size) to FILE "
                        f"({', '.join(PLOT_FORMATS)}); needs pip install 'logitcache[laws]'")
    p.add_argument("--json", action="store_true", help="print one JSON object on one line instead of the table")
    # Every mistake is one line, argparse's own included (it would print the usage first).
    p.error = lambda message: _argparse_error(p.prog, message)


def _argparse_error(prog: str, message: str):
    print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
    sys.exit(2)


def cache_teachers(root: str) -> list[tuple[str, float]]:
    """(name, parameters) of each distinct teacher among the caches in ROOT (or ROOT itself).

    Folders are not followed through symbolic links, every manifest is validated by
    `Manifest.load`, and its parameter count must be plausible: more than the vocabulary (the
    embedding alone holds vocab x hidden) and at most MAX_TEACHER_PARAMS.
    """
    from logitcache.format.manifest import MANIFEST_NAME, Manifest

    base = Path(root)
    if not base.is_dir():
        raise UserError(f"--caches {root}: not a folder")
    folders = [base] if (base / MANIFEST_NAME).is_file() else sorted(
        d for d in base.iterdir() if d.is_dir() and not d.is_symlink() and (d / MANIFEST_NAME).is_file())
    if not folders:
        raise UserError(f"--caches {root}: no caches (folders with {MANIFEST_NAME}) in it")
    seen: dict[tuple, tuple[str, float]] = {}
    for folder in folders:
        t = Manifest.load(folder).teacher
        n = t.num_parameters
        if n is None:
            raise UserError(f"--caches {folder}: the manifest records no teacher.num_parameters; "
                            "give the size with --teacher-params instead")
        if not (t.vocab_size or 0) < n <= MAX_TEACHER_PARAMS:
            raise UserError(f"--caches {folder}: teacher.num_parameters {n} is not a plausible model size "
                            f"(vocabulary {t.vocab_size}); refusing it")
        key = (t.name_or_path, t.revision, t.weights_fingerprint, n)
        seen.setdefault(key, (Path(t.name_or_path).name or t.name_or_path, float(n)))
    return list(seen.values())


def build_config(args):
    """The command line as a `laws.plan.PlanConfig` (every number parsed and checked)."""
    from laws.fitsfile import read_fits_law
    from laws.plan import PUBLISHED_LAW, PlanConfig, tokens_from_flops

    if args.student_params is None:
        raise UserError("--student-params is required")
    n_s = parse_quantity(args.student_params, "--student-params")
    if args.tokens is None and args.flops is None:
        raise UserError("give the student's budget: --tokens D or --flops C")
    if args.tokens is not None:
        tokens = parse_quantity(args.tokens, "--tokens")
    else:
        tokens = tokens_from_flops(parse_quantity(args.flops, "--flops"), n_s)
    params = parse_list(args.teacher_params, "--teacher-params") if args.teacher_params else ()
    labels = [None] * len(params)
    losses = parse_list(args.teacher_losses, "--teacher-losses") if args.teacher_losses else None
    if losses is not None and not params:
        raise UserError("--teacher-losses: give the sizes they belong to with --teacher-params")
    if losses is not None and len(losses) != len(params):
        raise UserError(f"--teacher-losses: {len(losses)} losses for {len(params)} --teacher-params")
    if args.caches:
        if losses is not None:
            raise UserError("--caches with --teacher-losses: cache manifests record no held-out loss, and "
                            "mixing given losses with the law's would compare two scales; drop one")
        found = cache_teachers(args.caches)
        params += tuple(n for _, n in found)
        labels += [name for name, _ in found]
    if not params:
        raise UserError("give candidate teachers: --teacher-params N1,N2,... or --caches ROOT")
    r = parse_quantity(args.teacher_tokens_per_param or "20", "--teacher-tokens-per-param")
    law = PUBLISHED_LAW if args.law == "published" else read_fits_law(args.law)
    labels = tuple(lab if lab is not None else _label(n) for lab, n in zip(labels, params))
    return PlanConfig(student_params=n_s, student_tokens=tokens, teacher_params=params, teacher_losses=losses,
                      teacher_tokens_per_param=r, teacher_labels=labels, law=law)


def _label(n: float) -> str:
    from laws.plan import format_count

    return format_count(n)


OPTIONS = {"student_params": "--student-params", "student_tokens": "--tokens", "teacher_params": "--teacher-params",
           "teacher_losses": "--teacher-losses", "teacher_tokens_per_param": "--teacher-tokens-per-param",
           "law": "--law", "flops": "--flops", "teacher_labels": "--caches"}


def run(args) -> int:
    from laws.extras import MissingExtraError, require
    from laws.plan import PlanInputError, plan_teachers

    fmt = None
    if args.plot:
        fmt = Path(args.plot).suffix.lower().lstrip(".")
        if fmt not in PLOT_FORMATS:
            raise UserError(f"--plot {args.plot}: name a .png, .pdf or .svg file")
        try:
            require("matplotlib")
        except MissingExtraError as exc:
            raise UserError(f"--plot: {exc}") from None
    try:
        result = plan_teachers(build_config(args))
    except PlanInputError as exc:
        raise UserError(f"{OPTIONS.get(exc.setting, exc.setting)}: {exc.problem}") from None
    if args.plot:
        write_plot(result, Path(args.plot), fmt)
    if args.json:
        print(json.dumps(result.to_dict(), allow_nan=False))
    else:
        print(render(result))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def write_plot(result, out: Path, fmt: str) -> None:
    """The figure under a temporary name, renamed into place: no half-written file on failure."""
    from laws.plot import plan_figure
    from logitcache.format.atomic import temporary_path

    fig = plan_figure(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(out)
    try:
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def render(p) -> str:
    """The plan as the table `trainer plan` prints."""
    from laws.plan import format_count

    cfg = p.config
    law = ("Busbridge et al. 2025, published coefficients" if cfg.law.name == "published"
           else f"coefficients from {cfg.law.name}")
    lines = [f"student: {format_count(cfg.student_params)} non-embedding params, {format_count(cfg.student_tokens)} "
             f"tokens ({cfg.student_tokens / cfg.student_params:.3g} per param)",
             f"law: {law} (fitted on {cfg.law.fitted_on})",
             f"supervised (labels only, same tokens): loss {p.label_only_loss:.4f} ({p.label_only_from})",
             ""]
    named = any(t.label != format_count(t.params) for t in p.predictions)   # cache teachers have names
    rows = [("teacher", "params", "teacher loss", "student loss", "vs supervised", "")]
    for t in p.predictions:
        mark = " ".join(m for m, on in (("best", t is p.best), ("2.5x", t is p.minima_choice)) if on)
        rows.append((t.label, format_count(t.params), f"{t.loss:.4f}", f"{t.student_loss:.4f}",
                     f"{-t.gain:+.4f} ({-t.gain / p.label_only_loss:+.2%})", mark))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells[0 if named else 1:]).rstrip())
    b, m = p.best, p.minima_choice
    lines.append(f"teacher losses: {b.loss_from}")
    lines.append("")
    if p.distillation_pays:
        size = "" if b.label == format_count(b.params) else f"{format_count(b.params)} params, "
        lines.append(f"best teacher: {b.label} ({size}loss {b.loss:.4f}): student "
                     f"{b.student_loss:.4f}, {b.gain:.4f} nats ({b.gain / p.label_only_loss:.2%}) below supervised")
    else:
        lines.append(f"distillation is predicted not to pay: the best candidate, {b.label}, gives "
                     f"{b.student_loss:.4f}, {-b.gain:.4f} nats above supervised training on the same tokens")
    same = " (the same teacher)" if m is b else f", {m.student_loss - b.student_loss:+.4f} against the best"
    lines.append(f"MiniMA's 2.5x rule: a {format_count(p.minima_target_params)} teacher; nearest candidate {m.label} "
                 f"predicts {m.student_loss:.4f}{same}")
    if math.isfinite(p.optimal_teacher_loss):
        size = (f" (~{format_count(p.optimal_teacher_params)} params at {cfg.teacher_tokens_per_param:g} tokens/param)"
                if p.optimal_teacher_params is not None else "")
        losses = [t.loss for t in p.predictions]
        where = (" (stronger than every candidate)" if p.optimal_teacher_loss < min(losses) else
                 " (weaker than every candidate)" if p.optimal_teacher_loss > max(losses) else "")
        lines.append(f"the law's best teacher loss for this student: {p.optimal_teacher_loss:.4f}{size}{where}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
