"""Tests for trainer.scaling_laws: capacity-gap optima and fits, the Busbridge laws and their fits.

Synthetic sweeps with known answers throughout.  Tolerance rationale:

* Exact or noise-free inputs: ``1e-9`` relative for closed forms (float64 round-off on a few
  dozen operations), ``1e-3`` for noise-free recovery through L-BFGS-B (its stopping rule is
  a relative objective change of 1e-10, i.e. parameters settle to ~1e-4-1e-5).
* Noisy capacity-gap sweeps (0.005 nats per run, 3 students x 6 teachers on a x2.5 ladder):
  over 100 seeds the smoothed ratio had sd 6% and worst error 16%, and the runs-bootstrap
  95% interval covered 2.5 in 100/100; we allow 25%.
* Noisy law fits (0.2% multiplicative noise per run): tolerances are ~5x the sd measured over
  30 seeds (quoted at each test), so they catch a wrong fit without depending on the seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import laws as sl
from laws import (
    BUSBRIDGE_DISTILL,
    BUSBRIDGE_SUPERVISED,
    SWEEP_FIXED_DISTILL,
    SWEEP_FIXED_SUPERVISED,
    SweepRun,
    as_runs,
    best_teachers,
    busbridge_distill,
    busbridge_supervised,
    distill_optimal_teacher_loss,
    fit_capacity_gap,
    fit_capacity_gap_runs,
    fit_distillation,
    fit_supervised,
    holdout_error,
    plot_sweep,
    supervised_points,
    teacher_optima,
)

RATIO = 2.5
LADDER = np.geomspace(1e6, 1e8, 6)  # a shared teacher ladder, x2.51 per rung
STUDENTS = (2e6, 5e6, 1.2e7)  # optima 5e6, 1.25e7, 3e7: all inside the ladder


def capacity_sweep(seed: int = 0, noise: float = 0.0, asymmetry: float = 0.0, repeats: int = 1,
                   ratio: float = RATIO, students: tuple[float, ...] = STUDENTS) -> list[SweepRun]:
    """Student loss = base(S) + U(log(N_T / (ratio S))) + noise, minimum exactly at N_T = ratio S.

    ``asymmetry=0`` gives a parabola in log N_T; otherwise ``(e^(s u) - 1 - s u) / s^2``, still
    minimal at u = 0 but steeper on one side (s < 0: weak teachers hurt more, as in practice).
    """
    rng = np.random.default_rng(seed)
    runs = []
    for S in students:
        base = 6.0 - 0.3 * math.log10(S)
        for T in LADDER:
            u = math.log(T / (ratio * S))
            s = asymmetry
            shape = 0.5 * u * u if s == 0 else (math.exp(s * u) - 1 - s * u) / s ** 2
            for _ in range(repeats):
                runs.append(SweepRun(student_params=S, student_tokens=20 * S, teacher_params=float(T),
                                     teacher_loss=5.5 - 0.3 * math.log10(T),
                                     student_loss=base + 0.08 * shape + noise * rng.standard_normal(),
                                     ce_only_loss=base + 0.05, teacher_tokens=200 * float(T)))
    return runs


# ---------------------------------------------------------------------------------------------
# best teachers


def test_smoothed_optimum_is_exact_for_a_parabola_and_argmin_is_a_rung() -> None:
    runs = capacity_sweep()
    for (S, smooth), (_, raw) in zip(best_teachers(runs), best_teachers(runs, smoothed=False)):
        assert smooth == pytest.approx(RATIO * S, rel=1e-9)
        assert raw in LADDER  # quantised to the ladder: up to x1.58 off
        assert raw != pytest.approx(RATIO * S, rel=0.05)


def test_smoothing_beats_argmin_on_an_asymmetric_u() -> None:
    # the 3-point parabola is biased towards the shallow side; measured bias 12.4% here,
    # versus 25-58% for the raw argmin on a x2.5 ladder
    runs = capacity_sweep(asymmetry=-1.0)
    for o in teacher_optima(runs):
        smooth_err = abs(math.log(o.smoothed_teacher / (RATIO * o.student_params)))
        raw_err = abs(math.log(o.argmin_teacher / (RATIO * o.student_params)))
        assert smooth_err < math.log(1.15)
        assert smooth_err < raw_err


def test_optimum_at_a_ladder_end_is_flagged_and_clamped() -> None:
    runs = capacity_sweep(ratio=200.0, students=(2e6,))  # optimum 4e8 > the largest teacher
    (o,) = teacher_optima(runs)
    assert not o.bracketed
    assert o.argmin_teacher == LADDER[-1]
    assert o.smoothed_teacher == pytest.approx(LADDER[-1], rel=1e-12)


def test_repeated_seeds_are_averaged_and_records_can_be_mappings() -> None:
    runs = capacity_sweep(repeats=2)
    as_dicts = [vars(r) for r in runs]
    assert best_teachers(as_dicts) == best_teachers(capacity_sweep())
    with pytest.raises(ValueError, match="unknown sweep-run keys"):
        as_runs([{**as_dicts[0], "studnet_loss": 1.0}])


# ---------------------------------------------------------------------------------------------
# capacity-gap fits


def test_capacity_gap_fits_recover_known_lines() -> None:
    S = np.asarray([1e6, 3e6, 1e7, 3e7])
    res = fit_capacity_gap(list(zip(S, 2.498 * S - 11.498)), n_boot=200)
    assert res["slope"] == pytest.approx(2.498, rel=1e-9)
    assert res["intercept"] == pytest.approx(-11.498, rel=1e-6)  # abs error ~1e-5 on T ~ 1e7
    res = fit_capacity_gap(list(zip(S, 3.0 * S ** 0.9)), n_boot=200)
    assert res["exponent"] == pytest.approx(0.9, rel=1e-9)
    assert res["coef"] == pytest.approx(3.0, rel=1e-9)
    assert res["rmse_log_power"] < 1e-9 < res["rmse_log_ratio"]


def test_noisy_sweep_recovers_the_ratio_and_the_interval_covers_it() -> None:
    res = fit_capacity_gap_runs(capacity_sweep(seed=0, noise=0.005), n_boot=1000, seed=0)
    assert res["ratio"] == pytest.approx(RATIO, rel=0.25)
    lo, hi = res["ratio_ci"]
    assert lo <= RATIO <= hi
    assert 0.5 < res["exponent"] < 1.5
    # the pairs-only variant gives the same point estimates from the same optima
    pairs_res = fit_capacity_gap(res["pairs"], n_boot=200)
    assert pairs_res["ratio"] == pytest.approx(res["ratio"], rel=1e-12)


def test_cell_bootstrap_uses_only_seed_noise() -> None:
    # one run per cell: resampling within cells reproduces the data, so the interval collapses
    single = fit_capacity_gap_runs(capacity_sweep(noise=0.005), n_boot=50, within="cell",
                                   resample_students=False)
    assert single["ratio_ci"][0] == pytest.approx(single["ratio_ci"][1], rel=1e-12)
    # three seeds per cell: a proper interval around the truth (covered 91/100 seeds, nominal 95)
    triple = fit_capacity_gap_runs(capacity_sweep(noise=0.01, repeats=3), n_boot=300, within="cell",
                                   resample_students=False)
    lo, hi = triple["ratio_ci"]
    assert lo < hi and lo <= RATIO <= hi


# ---------------------------------------------------------------------------------------------
# the published laws


def test_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(8, 10, 12), 10 ** rng.uniform(9, 11, 12)
    LT, Lt = rng.uniform(1.8, 3.5, 12), busbridge_supervised(N, D)
    cases = [(sl.SUPERVISED_KEYS, lambda p: sl._supervised_with_grad(N, D, p), BUSBRIDGE_SUPERVISED),
             (sl.DISTILL_KEYS, lambda p: sl._distill_with_grad(N, D, LT, Lt, p), BUSBRIDGE_DISTILL)]
    for keys, model, params in cases:
        _, grads = model(params)
        for k in keys:
            h = 1e-6  # central differences in log-coefficient: error ~h^2, round-off ~1e-16/h
            up = model({**params, k: params[k] * math.exp(h)})[0]
            down = model({**params, k: params[k] * math.exp(-h)})[0]
            numeric = (up - down) / (2 * h)
            scale = np.max(np.abs(numeric)) + 1e-12
            assert np.max(np.abs(numeric - grads[k])) / scale < 1e-6, k


def test_published_laws_sanity() -> None:
    # C4-scale values: a 1B model at 20 tokens/param sits near 2.4 nats under the paper's fit
    assert float(busbridge_supervised(1e9, 2e10)) == pytest.approx(2.3747, abs=1e-3)
    N = np.geomspace(1e7, 1e11, 30)
    LS = busbridge_distill(N, 20 * N, 2.0)
    assert np.all(np.diff(LS) < 0)  # bigger students do better with the same teacher
    assert np.all(LS > 2.0)  # and never beat the teacher
    # weak-teacher side: beyond ~0.9 d1 Lt_S the student just copies the teacher
    lt = float(busbridge_supervised(1e8, 2e9))
    weak = np.asarray([0.9, 1.0, 1.5]) * BUSBRIDGE_DISTILL["d1"] * lt
    assert np.allclose(busbridge_distill(1e8, 2e9, weak), weak, rtol=1e-5)


@pytest.mark.parametrize("n_s", [1e7, 1e8, 1e9, 1e10])
def test_published_law_is_u_shaped_in_teacher_loss(n_s: float) -> None:
    d_s = 20 * n_s
    lt = float(busbridge_supervised(n_s, d_s))
    grid = np.linspace(BUSBRIDGE_SUPERVISED["E"], 2 * lt, 200_001)  # step ~3e-5 nats
    LS = busbridge_distill(n_s, d_s, grid)
    i = int(np.argmin(LS))
    best = float(distill_optimal_teacher_loss(n_s, d_s))
    assert 0 < i < len(grid) - 1  # an interior minimum: a too-strong teacher hurts
    assert best == pytest.approx(grid[i], abs=2 * (grid[1] - grid[0]))
    assert BUSBRIDGE_SUPERVISED["E"] < best < lt  # reachable, and stronger than the student
    assert LS[i] < lt  # at the optimum distillation beats training on labels
    # the closed form ignores the broken-power-law factor (< 1 there) and lands low
    p = BUSBRIDGE_DISTILL
    S = p["A"] / n_s ** p["a"] + p["B"] / d_s ** p["b"]
    closed = (p["c0"] * S ** p["g"]) ** (1 / (1 + p["c0"]))
    assert 0.85 * best < closed < best


def test_u_shape_leaves_reachable_range_for_huge_students() -> None:
    # measured threshold ~1.6e11 non-embedding params at 20 tokens/param
    assert float(distill_optimal_teacher_loss(1e11, 2e12)) > BUSBRIDGE_SUPERVISED["E"]
    assert float(distill_optimal_teacher_loss(1e12, 2e13)) < BUSBRIDGE_SUPERVISED["E"]


# ---------------------------------------------------------------------------------------------
# fitting the laws

TRUE_SUP = dict(BUSBRIDGE_SUPERVISED, E=1.30, A=3000.0, a=0.38)
TRUE_DIS = dict(BUSBRIDGE_DISTILL, A=2000.0, a=0.35, c0=2.2, d1=1.25)


def supervised_grid(seed: int, noise: float = 0.002) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """6 sizes x 3 token budgets from TRUE_SUP with multiplicative noise."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e8, 1e10, 6), [1e9, 1e10, 1e11]))
    eps = np.random.default_rng(seed).standard_normal(N.size)
    L = busbridge_supervised(N, D, TRUE_SUP) * np.exp(noise * eps)
    return N, D, L


def distill_grid(seed: int, noise: float = 0.002) -> tuple[np.ndarray, ...]:
    """5 students x 2 token budgets x 6 teachers (L_T from TRUE_SUP at 20 tokens/param).

    L_T / (d1 Lt_S) spans 0.43-1.03, so both branches of the law are sampled.
    """
    rows = [(ns, ds, float(busbridge_supervised(nt, 20 * nt, TRUE_SUP)))
            for ns in np.geomspace(1e8, 3e9, 5) for ds in (1e8, 1e10)
            for nt in np.geomspace(1e8, 1e10, 6)]
    NS, DS, LT = (np.asarray(c) for c in zip(*rows))
    LS = busbridge_distill(NS, DS, LT, TRUE_DIS, TRUE_SUP)
    LS = LS * np.exp(noise * np.random.default_rng(seed).standard_normal(LS.size))
    return NS, DS, LT, LS


def test_supervised_fit_with_exponents_fixed_recovers_scales() -> None:
    fixed = {k: TRUE_SUP[k] for k in "abg"}
    exact = fit_supervised(*supervised_grid(0, noise=0.0), fixed=fixed)
    for k in "EAB":
        assert exact.params[k] == pytest.approx(TRUE_SUP[k], rel=1e-3)
    noisy = fit_supervised(*supervised_grid(0), fixed=fixed)
    # sd over 30 seeds: E 0.7%, A 1.5%, B 1.4%
    assert noisy.params["E"] == pytest.approx(TRUE_SUP["E"], rel=0.04)
    assert noisy.params["A"] == pytest.approx(TRUE_SUP["A"], rel=0.08)
    assert noisy.params["B"] == pytest.approx(TRUE_SUP["B"], rel=0.08)
    assert noisy.rmse_log == pytest.approx(0.002, rel=0.5)  # fits down to the noise, not below
    assert noisy.free == ("E", "A", "B") and noisy.params["a"] == TRUE_SUP["a"]


def test_supervised_fit_extrapolates_to_larger_models() -> None:
    N, D, L = supervised_grid(0)
    small = N <= 1.1e9  # fit on 3 of the 6 sizes, predict the decade above

    def extrapolation_error(fixed: dict[str, float] | None) -> float:
        fit = fit_supervised(N[small], D[small], L[small], fixed=fixed)
        pred = busbridge_supervised(N[~small], D[~small], fit.params)
        return float(np.mean(np.abs(pred / L[~small] - 1)))

    # all six free: mean error 0.4-2.2% over 10 seeds (per-point noise 0.2%)
    assert extrapolation_error(None) < 0.04
    # b, g fixed as the sweep should: 0.1-1.3% over 20 seeds
    assert extrapolation_error({k: BUSBRIDGE_SUPERVISED[k] for k in SWEEP_FIXED_SUPERVISED}) < 0.025


def test_distillation_fit_with_exponents_fixed_recovers_scales() -> None:
    fixed = {k: TRUE_DIS[k] for k in ("a", "b", "g", "c0", "c1", "f1")}
    NS, DS, LT, _ = distill_grid(0)
    clean = busbridge_distill(NS, DS, LT, TRUE_DIS, TRUE_SUP)
    exact = fit_distillation(NS, DS, LT, clean, TRUE_SUP, fixed=fixed)
    for k in ("A", "B", "d1"):
        assert exact.params[k] == pytest.approx(TRUE_DIS[k], rel=1e-3)
    noisy = fit_distillation(*distill_grid(0), TRUE_SUP, fixed=fixed)
    # sd over 30 seeds: A 1.1%, d1 0.25%; B (the data term, ~10% of the power sum here) 12%
    assert noisy.params["A"] == pytest.approx(TRUE_DIS["A"], rel=0.06)
    assert noisy.params["d1"] == pytest.approx(TRUE_DIS["d1"], rel=0.015)
    assert noisy.params["B"] == pytest.approx(TRUE_DIS["B"], rel=0.6)


def test_distillation_fit_predicts_held_out_runs() -> None:
    NS, DS, LT, LS = distill_grid(2)
    # extrapolation to larger students with the sweep's recommended coefficients fixed:
    # mean error 0.19% (sd 0.04%), worst point 0.9% over 30 seeds
    fixed = {k: BUSBRIDGE_DISTILL[k] for k in SWEEP_FIXED_DISTILL}
    res = holdout_error(NS, DS, LT, LS, TRUE_SUP, split="student", fixed=fixed)
    assert res.n_train == 24 and res.n_test == 36  # 2 of 5 student sizes (round(0.5 * 5))
    assert np.all(NS[res.train_mask] < NS[~res.train_mask].min())
    assert res.mean_abs_rel_error < 0.006 and res.max_abs_rel_error < 0.02
    # interpolation with all nine coefficients free: they are not identifiable from 48 runs,
    # but the fitted surface still predicts unseen runs at the noise level (0.11-0.26% over
    # 10 seeds)
    mask = np.random.default_rng(0).random(NS.size) < 0.8
    free = holdout_error(NS, DS, LT, LS, TRUE_SUP, train_mask=mask)
    assert free.fit.free == sl.DISTILL_KEYS
    assert free.mean_abs_rel_error < 0.006


def test_teacher_split_trains_on_the_weakest_teachers() -> None:
    NS, DS, LT, LS = distill_grid(3)
    fixed = {k: BUSBRIDGE_DISTILL[k] for k in SWEEP_FIXED_DISTILL}
    res = holdout_error(NS, DS, LT, LS, TRUE_SUP, split="teacher", fixed=fixed)
    assert LT[res.train_mask].min() > LT[~res.train_mask].max()
    assert np.isfinite(res.mean_abs_rel_error)


def test_measured_ce_only_losses_can_replace_the_supervised_law() -> None:
    NS, DS, LT, LS = distill_grid(0)
    fixed = {k: BUSBRIDGE_DISTILL[k] for k in SWEEP_FIXED_DISTILL}
    via_law = fit_distillation(NS, DS, LT, LS, TRUE_SUP, fixed=fixed)
    via_lt = fit_distillation(NS, DS, LT, LS, Lt_S=busbridge_supervised(NS, DS, TRUE_SUP), fixed=fixed)
    for k in via_law.free:
        assert via_lt.params[k] == pytest.approx(via_law.params[k], rel=1e-9)


def test_small_sweep_supervised_fit_uses_teachers_too() -> None:
    N, D, L = supervised_points(capacity_sweep())
    assert len(N) == len(STUDENTS) + len(LADDER)  # 3 CE-only students + 6 teachers
    fit = fit_supervised(N, D, L, fixed={k: BUSBRIDGE_SUPERVISED[k] for k in SWEEP_FIXED_SUPERVISED})
    assert fit.free == ("E", "A", "B", "a")
    assert np.isfinite(fit.rmse)


def test_fit_rejects_unknown_or_bad_fixed_coefficients() -> None:
    N, D, L = supervised_grid(0)
    with pytest.raises(ValueError, match="unknown coefficients"):
        fit_supervised(N, D, L, fixed={"alpha": 0.3})
    with pytest.raises(ValueError, match="positive"):
        fit_supervised(N, D, L, fixed={"a": 0.0})


def test_blas_thread_limit_is_restored() -> None:
    import ctypes

    def counts() -> list[int]:
        with open("/proc/self/maps") as maps:
            paths = sorted({ln.split()[-1] for ln in maps
                            if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
        out = []
        for p in paths:
            lib = ctypes.CDLL(p)
            get = (getattr(lib, "scipy_openblas_get_num_threads64_", None)
                   or getattr(lib, "scipy_openblas_get_num_threads", None))
            if get is not None:
                out.append(int(get()))
        return out

    try:
        before = counts()
    except OSError:
        pytest.skip("no /proc/self/maps")
    with sl._single_threaded_blas():
        inside = counts()
    assert counts() == before
    assert all(c == 1 for c in inside)


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_writes_a_png(tmp_path) -> None:
    runs = capacity_sweep(noise=0.005)
    out = plot_sweep(runs, best_teachers(runs), tmp_path / "sub" / "sweep.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
