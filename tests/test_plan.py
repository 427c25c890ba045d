"""`trainer plan` and laws.plan: which teacher to cache, predicted by the distillation law.

Tolerances: predictions are the law evaluated in float64, so they are compared with the formula
written out here to 1e-12 relative (a few dozen float64 operations); the bottom of the U is a
bisection on the slope, compared with scipy's brentq twin to 1e-9 relative (brentq's xtol is 1e-12
in log L_T); the figures quoted from the published coefficients (best teachers, losses) were
computed with this code and are checked to 1e-4 nats, far below the gaps between candidates they
decide (>= 2e-3 nats).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from laws import BUSBRIDGE_DISTILL, BUSBRIDGE_SUPERVISED, busbridge_distill, distill_optimal_teacher_loss
from laws.fitsfile import FITS_VERSION, read_fits_law
from laws.plan import PlanConfig, PlanInputError, format_count, optimal_teacher_loss, plan_teachers, tokens_from_flops
from trainer.cli import main as trainer_main
from trainer.commands.plan import parse_quantity

ROOT = Path(__file__).resolve().parent.parent
HINT = "pip install 'logitcache[laws]'"
LADDER = tuple(float(x) for x in np.geomspace(1e8, 1e13, 11))   # x3.16 a rung
SWEEP_FITS = ROOT / "docs" / "results" / "capacity_gap_cpu" / "fits.json"


def law_by_hand(n: float, d: float, lt: float, sup=BUSBRIDGE_SUPERVISED, p=BUSBRIDGE_DISTILL) -> float:
    """Busbridge et al. Eq. 8 written out, independent of laws.forms."""
    lt_s = sup["E"] + (sup["A"] / n ** sup["a"] + sup["B"] / d ** sup["b"]) ** sup["g"]
    z = (p["A"] / n ** p["a"] + p["B"] / d ** p["b"]) ** p["g"]
    return lt + lt ** -p["c0"] * (1 + (lt / (lt_s * p["d1"])) ** (1 / p["f1"])) ** (-p["c1"] * p["f1"]) * z


def plan_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = trainer_main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the law's predictions with the published coefficients


def test_predictions_are_the_law_and_teachers_get_the_supervised_loss():
    p = plan_teachers(PlanConfig(student_params=1e9, student_tokens=2e10, teacher_params=(3e9, 7e10)))
    sup = BUSBRIDGE_SUPERVISED
    assert p.label_only_loss == pytest.approx(sup["E"] + (sup["A"] / 1e9 ** sup["a"] + sup["B"] / 2e10 ** sup["b"])
                                              ** sup["g"], rel=1e-12)
    for t in p.predictions:
        lt = sup["E"] + (sup["A"] / t.params ** sup["a"] + sup["B"] / (20 * t.params) ** sup["b"]) ** sup["g"]
        assert t.loss == pytest.approx(lt, rel=1e-12)
        assert t.student_loss == pytest.approx(law_by_hand(1e9, 2e10, lt), rel=1e-12)
        assert t.gain == pytest.approx(p.label_only_loss - t.student_loss, rel=1e-12)
    # computed with this code: 2.3747 supervised; 3B -> 2.3053, 70B -> 2.2524
    assert p.label_only_loss == pytest.approx(2.3747, abs=1e-4)
    assert [round(t.student_loss, 4) for t in p.predictions] == [2.3053, 2.2524]
    assert p.best.params == 7e10 and p.distillation_pays


def test_optimum_moves_to_stronger_teachers_as_the_student_grows():
    """Busbridge et al.: the optimal teacher grows with the student (20 tokens per parameter)."""
    plans = [plan_teachers(PlanConfig(student_params=n, student_tokens=20 * n, teacher_params=LADDER))
             for n in (1e8, 1e9, 1e10)]
    assert [p.best.params for p in plans] == pytest.approx([1e10, 1e11, 1e12], rel=1e-9)
    # the continuous bottom of the U: lower teacher loss, bigger teacher, for each larger student
    opt = [p.optimal_teacher_loss for p in plans]
    assert opt == pytest.approx([1.95314, 1.72270, 1.54198], abs=1e-5)
    assert [p.optimal_teacher_params for p in plans] == pytest.approx([1.1013e10, 8.0919e10, 8.5371e11], rel=1e-4)
    for p, n in zip(plans, (1e8, 1e9, 1e10)):   # scipy's twin agrees
        assert p.optimal_teacher_loss == pytest.approx(float(distill_optimal_teacher_loss(n, 20 * n)), rel=1e-9)
    # always far above MiniMA's 2.5x under this law (its teachers were compute-optimal, the law's too)
    assert all(p.best.params > 10 * p.minima_target_params for p in plans)


def test_a_teacher_far_stronger_than_the_optimum_gives_a_worse_student():
    """The U: for a 100M student the student loss falls to the 10B teacher, then rises."""
    p = plan_teachers(PlanConfig(student_params=1e8, student_tokens=2e9, teacher_params=LADDER))
    losses = [t.student_loss for t in p.predictions]
    i = losses.index(p.best.student_loss)
    assert 0 < i < len(losses) - 1
    assert all(a > b for a, b in zip(losses[:i], losses[1:i + 1]))     # falling to the best
    assert all(a < b for a, b in zip(losses[i:], losses[i + 1:]))      # rising past it
    # the 10T teacher (loss 1.30) predicts 3.0421: worse than the best (2.6620) and than labels alone (3.0063)
    strongest = p.predictions[-1]
    assert strongest.loss < p.best.loss
    assert strongest.student_loss == pytest.approx(3.0421, abs=1e-4)
    assert p.best.student_loss == pytest.approx(2.6620, abs=1e-4)
    assert strongest.gain < 0 < p.best.gain


def test_distillation_predicted_not_to_pay_for_a_heavily_overtrained_student(capsys):
    """At 20,000 tokens per parameter supervised training wins under the law, whatever the teacher."""
    code, out, _ = plan_cli(capsys, "--student-params", "1B", "--tokens", "20T", "--teacher-params",
                            "1B,3B,8B,30B,70B,400B")
    assert code == 0
    assert "distillation is predicted not to pay" in out
    p = plan_teachers(PlanConfig(student_params=1e9, student_tokens=2e13,
                                 teacher_params=(1e9, 3e9, 8e9, 3e10, 7e10, 4e11)))
    assert not p.distillation_pays and all(t.gain < 0 for t in p.predictions)
    assert p.best.params == 8e9 and p.best.gain == pytest.approx(-0.0071, abs=1e-4)


def test_minima_rule_picks_the_candidate_nearest_2_5x():
    p = plan_teachers(PlanConfig(student_params=1e9, student_tokens=2e10, teacher_params=(1e9, 3e9, 8e9, 7e10)))
    assert p.minima_target_params == pytest.approx(2.498e9)
    assert p.minima_choice.params == 3e9 and p.best.params == 7e10


def test_given_teacher_losses_are_used_as_given():
    p = plan_teachers(PlanConfig(student_params=1e9, student_tokens=2e10, teacher_params=(3e9, 7e10),
                                 teacher_losses=(2.2, 1.8)))
    assert [t.loss for t in p.predictions] == [2.2, 1.8]
    assert [t.loss_from for t in p.predictions] == ["given", "given"]
    assert p.predictions[1].student_loss == pytest.approx(law_by_hand(1e9, 2e10, 1.8), rel=1e-12)


def test_optimal_teacher_loss_is_global_when_a_fit_adds_a_bump():
    """Coefficients like the CPU sweep's fit (small c0) give a second dip where the weak-teacher
    factor switches on; the best teacher loss is the global minimum of a fine grid."""
    p = dict(BUSBRIDGE_DISTILL, A=5.18e-4, a=0.804, c0=0.510, d1=1.246)
    n, d, lt_s = 201280.0, 409600.0, 4.6716
    best = optimal_teacher_loss(n, d, lt_s, p)
    grid = np.linspace(0.5, 6.0, 200001)
    values = busbridge_distill(n, d, grid, p, None, Lt_S=lt_s)
    assert best == pytest.approx(grid[int(np.argmin(values))], abs=5e-5)   # the grid's step is 2.75e-5
    assert 4.3 < best < 4.6   # in the sweep's range of teacher losses, not the far dip near 1.6


# ---------------------------------------------------------------------------------------------
# numbers, budgets and the command line


@pytest.mark.parametrize("text,value", [("1.5e9", 1.5e9), ("1.5B", 1.5e9), ("20B", 2e10), ("800M", 8e8),
                                        ("350k", 3.5e5), ("2T", 2e12), (" 7e+3 ", 7e3), ("1.2G", 1.2e9),
                                        ("409600", 409600.0), (".5M", 5e5)])
def test_numbers_parse(text, value):
    assert parse_quantity(text, "--x") == pytest.approx(value, rel=1e-15)


def test_flops_budget_is_six_n_d(capsys):
    assert tokens_from_flops(1.2e20, 1e9) == pytest.approx(2e10, rel=1e-15)
    by_tokens = last_json(plan_cli(capsys, "--student-params", "1B", "--tokens", "20B", "--teacher-params",
                                   "3B,70B", "--json")[1])
    by_flops = last_json(plan_cli(capsys, "--student-params", "1B", "--flops", "1.2e20", "--teacher-params",
                                  "3B,70B", "--json")[1])
    assert by_flops["student_tokens"] == pytest.approx(2e10, rel=1e-12)
    assert by_flops["best_student_loss"] == pytest.approx(by_tokens["best_student_loss"], rel=1e-12)


def test_json_last_line_holds_the_best_teacher_and_every_prediction(capsys):
    code, out, err = plan_cli(capsys, "--student-params", "1B", "--tokens", "20B", "--teacher-params",
                              "1B,3B,8B,30B,70B,400B", "--json")
    assert code == 0 and err == ""
    res = last_json(out)
    p = plan_teachers(PlanConfig(student_params=1e9, student_tokens=2e10,
                                 teacher_params=(1e9, 3e9, 8e9, 3e10, 7e10, 4e11)))
    assert res["best_teacher_params"] == 7e10 == p.best.params
    assert res["best_teacher_loss"] == pytest.approx(p.best.loss, rel=1e-15)
    assert [t["params"] for t in res["teachers"]] == [1e9, 3e9, 8e9, 3e10, 7e10, 4e11]
    assert [t["student_loss"] for t in res["teachers"]] == pytest.approx([t.student_loss for t in p.predictions],
                                                                         rel=1e-15)
    assert res["minima_teacher_params"] == 3e9 and res["distillation_pays"] is True
    assert res["law"] == "published" and "697" in res["law_fitted_on"]
    assert any("outside 143M-12.6B" in note for note in res["notes"])   # 30B, 70B, 400B


def test_table_names_best_teacher_gain_and_the_2_5x_choice(capsys):
    code, out, _ = plan_cli(capsys, "--student-params", "1B", "--tokens", "20B", "--teacher-params",
                            "1B,3B,8B,30B,70B,400B")
    assert code == 0
    assert "best teacher: 70B" in out and "0.1223 nats (5.15%) below supervised" in out
    assert "MiniMA's 2.5x rule: a 2.5B teacher; nearest candidate 3B" in out
    assert "C4, 143M-12.6B" in out


def test_help_says_what_the_published_coefficients_were_fitted_on():
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "plan", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "C4 with 143M-12.6B non-embedding parameters over 697 distillation runs" in text
    assert "extrapolations" in text and "D = C / (6 N)" in text


BAD = [
    (["--student-params=-1B", "--tokens", "20B", "--teacher-params", "1B,3B"], "--student-params: -1e+09 must be"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,-3B"], "--teacher-params: -3e+09 must be"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "3B"], "give at least 2 teachers"),
    (["--student-params", "1B", "--tokens", "2x0B", "--teacher-params", "1B,3B"], "--tokens '2x0B': expected"),
    (["--student-params", "1.5X", "--tokens", "20B", "--teacher-params", "1B,3B"], "--student-params '1.5X'"),
    (["--student-params", "1B", "--tokens", "nan", "--teacher-params", "1B,3B"], "--tokens 'nan'"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,,3B"], "--teacher-params ''"),
    (["--student-params", "1B", "--teacher-params", "1B,3B"], "--tokens D or --flops C"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,3B", "--teacher-losses", "2.0"],
     "1 losses for 2"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,3B", "--teacher-losses", "2,-1"],
     "--teacher-losses: -1 must be"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,1B"], "listed twice"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,3B", "--teacher-tokens-per-param", "0"],
     "--teacher-tokens-per-param: 0 must be"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,3B", "--plot", "out.gif"], ".png, .pdf"),
    (["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,3B", "--law", "no-such.json"],
     "no such file"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[w for _, w in BAD])
def test_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = plan_cli(capsys, *argv)
    assert code == 2
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    assert list(tmp_path.iterdir()) == []


def test_argparse_mistakes_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exc:
        trainer_main(["plan", "--student-params", "1B", "--tokens", "20B", "--flops", "1e20"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not allowed with argument --tokens" in err


# ---------------------------------------------------------------------------------------------
# --law FITS.json


def write_fits(path: Path, *, version: int | None = FITS_VERSION, supervised: bool = True, **distill) -> Path:
    doc: dict = {"optima": [{"student_params": 2e5, "student_tokens": 4e5, "ce_only_loss": 4.67}],
                 "distillation_law": {"params": dict(BUSBRIDGE_DISTILL, **distill), "n_points": 18}}
    if version is not None:
        doc["version"] = version
    if supervised:
        doc["supervised_law"] = {"params": dict(BUSBRIDGE_SUPERVISED)}
    path.write_text(json.dumps(doc))
    return path


def test_fits_with_the_published_coefficients_predicts_as_published(tmp_path, capsys):
    fits = write_fits(tmp_path / "fits.json")
    argv = ["--student-params", "1B", "--tokens", "20B", "--teacher-params", "1B,3B,70B", "--json"]
    published = last_json(plan_cli(capsys, *argv)[1])
    fitted = last_json(plan_cli(capsys, *argv, "--law", str(fits))[1])
    assert fitted["teachers"] == published["teachers"]
    assert fitted["law"] == str(fits) and fitted["law_fitted_on"] == "18 distillation runs of 200k-200k-param students"


def test_fits_without_a_version_is_version_1_and_a_fitted_law_is_used(tmp_path, capsys):
    fits = write_fits(tmp_path / "fits.json", version=None, supervised=False, c0=0.51)
    code, out, err = plan_cli(capsys, "--student-params", "2e5", "--tokens", "4e5", "--teacher-params", "4e5,2e6",
                              "--teacher-losses", "4.49,4.46", "--law", str(fits), "--json")
    assert code == 0, err
    res = last_json(out)
    p = dict(BUSBRIDGE_DISTILL, c0=0.51)
    assert res["label_only_loss"] == 4.67 and res["label_only_from"] == "measured CE-only run"
    by_hand = []
    for lt in (4.49, 4.46):
        z = (p["A"] / 2e5 ** p["a"] + p["B"] / 4e5 ** p["b"]) ** p["g"]
        by_hand.append(lt + lt ** -p["c0"] * (1 + (lt / (4.67 * p["d1"])) ** (1 / p["f1"])) ** (-p["c1"] * p["f1"]) * z)
    assert [t["student_loss"] for t in res["teachers"]] == pytest.approx(by_hand, rel=1e-12)


def test_fits_of_another_version_is_refused_in_one_line(tmp_path):
    fits = write_fits(tmp_path / "fits.json", version=2)
    r = subprocess.run([sys.executable, "-m", "trainer.cli", "plan", "--student-params", "1B", "--tokens", "20B",
                        "--teacher-params", "1B,3B", "--law", str(fits)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"trainer: error: --law: {fits}: fits.json version 2 is not 1, the version "
                                     "this reads"]


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d["distillation_law"]["params"].pop("c0"), "lacks c0"),
    (lambda d: d["distillation_law"]["params"].update(a=-0.3), "a must be positive finite"),
    (lambda d: d["distillation_law"]["params"].update(a=True), "a must be positive finite"),
    (lambda d: d.update(version="1"), "version '1' is not 1"),
    (lambda d: d.update(optima=[{"student_params": 0}]), "optima[0] needs positive finite"),
    (lambda d: d.pop("distillation_law"), "no distillation_law"),
])
def test_fits_is_checked_before_use(tmp_path, mutate, words):
    path = write_fits(tmp_path / "fits.json")
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanInputError) as exc:
        read_fits_law(path)
    assert words in str(exc.value)


def test_fits_without_a_supervised_law_needs_the_losses_and_a_measured_student(tmp_path, capsys):
    fits = write_fits(tmp_path / "fits.json", supervised=False)
    code, _, err = plan_cli(capsys, "--student-params", "2e5", "--tokens", "4e5", "--teacher-params", "4e5,2e6",
                            "--law", str(fits))
    assert code == 2 and "holds no supervised law to turn teacher sizes into losses" in err
    code, _, err = plan_cli(capsys, "--student-params", "3e5", "--tokens", "4e5", "--teacher-params", "4e5,2e6",
                            "--teacher-losses", "4.49,4.46", "--law", str(fits))
    assert code == 2 and "no CE-only run of a 300000-param student" in err and len(err.splitlines()) == 1


def test_the_sweeps_published_fits_json_reads():
    law = read_fits_law(SWEEP_FITS)
    assert set(law.distill) == set(BUSBRIDGE_DISTILL) and len(law.label_only) >= 2
    assert all(v > 0 and math.isfinite(v) for v in law.distill.values())


# ---------------------------------------------------------------------------------------------
# --plot


def test_plot_writes_the_figure_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "plots" / "plan.png"
    code, text, err = plan_cli(capsys, "--student-params", "1B", "--tokens", "20B", "--teacher-params",
                               "1B,3B,8B,70B", "--plot", str(out))
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["plan.png"]     # no temporary file left
    assert f"plot: {out}" in text


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path):
    out = tmp_path / "plan.png"
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from trainer.cli import main\n"
            f"sys.exit(main(['plan', '--student-params', '1B', '--tokens', '20B', '--teacher-params', '1B,3B', "
            f"'--plot', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(HINT), r.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# --caches: candidates from real caches' manifests


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, tiny_teachers, corpus_dir) -> Path:
    """Caches of two tiny teachers (Llama, Qwen2), the Llama one twice (k 8 and 4): one root."""
    from logitcache.cli import main as logitcache_main

    root = tmp_path_factory.mktemp("plan-caches")
    for teacher, k in (("llama", 8), ("qwen2", 8), ("llama", 4)):
        code = logitcache_main(["produce", "--teacher", str(tiny_teachers[teacher]), "--data", str(corpus_dir),
                                "--out", str(root), "--k", str(k), "--seq-len", "32", "--max-windows", "2",
                                "--encoding", "fp32", "--dtype", "float32", "--no-progress"])
        assert code == 0
    return root


def test_caches_give_one_candidate_per_teacher_with_its_manifest_size(cache_root, tiny_teachers, capsys):
    from transformers import AutoModelForCausalLM

    code, out, err = plan_cli(capsys, "--student-params", "2e4", "--tokens", "4e5", "--caches", cache_root, "--json")
    assert code == 0, err
    res = last_json(out)
    sizes = {name: float(sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_teachers[name]).parameters()))
             for name in ("llama", "qwen2")}
    assert {t["label"]: t["params"] for t in res["teachers"]} == sizes      # the Llama's two caches: one candidate
    assert all(t["loss_from"] == "law at 20 tokens/param" for t in res["teachers"])
    # --teacher-params adds candidates beside the caches'
    code, out, _ = plan_cli(capsys, "--student-params", "2e4", "--tokens", "4e5", "--caches", cache_root,
                            "--teacher-params", "1M", "--json")
    assert code == 0 and sorted(t["params"] for t in last_json(out)["teachers"]) == sorted([1e6, *sizes.values()])


def test_caches_with_an_implausible_size_or_one_teacher_are_refused(cache_root, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (llama,) = [c for c in cache_root.iterdir() if c.name.startswith("llama") and "-k8-" in c.name]
    shutil.copytree(llama, one / llama.name)
    code, _, err = plan_cli(capsys, "--student-params", "2e4", "--tokens", "4e5", "--caches", one)
    assert code == 2 and "1 candidate(s)" in err and len(err.splitlines()) == 1

    manifest = one / llama.name / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["teacher"]["num_parameters"] = 100      # fewer than the 320-token vocabulary's embedding
    manifest.write_text(json.dumps(doc))
    code, _, err = plan_cli(capsys, "--student-params", "2e4", "--tokens", "4e5", "--caches", one,
                            "--teacher-params", "1M")
    assert code == 2 and "teacher.num_parameters 100 is not a plausible model size" in err

    code, _, err = plan_cli(capsys, "--student-params", "2e4", "--tokens", "4e5", "--caches", tmp_path / "none")
    assert code == 2 and "not a folder" in err
    code, _, err = plan_cli(capsys, "--student-params", "2e4", "--tokens", "4e5", "--caches", cache_root,
                            "--teacher-params", "1M,2M", "--teacher-losses", "3,2.9")
    assert code == 2 and "record no held-out loss" in err


def test_format_count():
    assert [format_count(x) for x in (1.5e9, 2e10, 8e5, 7358720, 512)] == ["1.5B", "20B", "800k", "7.36M", "512"]
