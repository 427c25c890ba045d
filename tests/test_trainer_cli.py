"""`trainer` commands end to end: refusals (one line, non-zero exit), padded vocabularies, prune, evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, save_tiny_teacher, tiny_corpus_text
from test_loop import SEQ, caches, heldout_file, metrics, run_trainer  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.data import train_bpe_tokenizer
from trainer.prune import count_parameters

ROOT = Path(__file__).resolve().parent.parent


def trainer_subprocess(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def foreign_student(tmp_path_factory, tiny_teachers) -> Path:
    """The tiny student's weights with a tokenizer of the same size trained on other text."""
    folder = tmp_path_factory.mktemp("foreign")
    for f in tiny_teachers["llama_b"].iterdir():
        if f.name.startswith(("config", "generation", "model")):
            shutil.copy(f, folder / f.name)
    text = [doc.upper() for doc in tiny_corpus_text(seed=3)]
    train_bpe_tokenizer(text, folder, vocab_size=TINY_VOCAB)
    assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tiny_teachers["llama_b"]))
    return folder


def test_distill_refuses_cache_of_another_tokenizer(tmp_path, foreign_student, caches, capsys):
    code = run_trainer("distill", "--student", foreign_student, "--cache", caches["train"],
                       "--out", tmp_path / "o", "--steps", 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("trainer: error: --cache") and "needs the same tokenizer" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_distill_refusal_is_one_line_from_a_fresh_process(tmp_path, foreign_student, caches):
    r = trainer_subprocess("distill", "--student", foreign_student, "--cache", caches["train"],
                           "--out", tmp_path / "o", "--steps", 2)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("trainer: error: --cache") and "tokenizer" in lines[0]
    assert not (tmp_path / "o").exists()


def test_distill_refuses_eval_data_that_is_not_the_eval_cache_data(tmp_path, tiny_teachers, caches, corpus_dir,
                                                                   capsys):
    code = run_trainer("distill", "--student", tiny_teachers["llama_b"], "--cache", caches["train"],
                       "--out", tmp_path / "o", "--steps", 2, "--eval-cache", caches["heldout"],
                       "--eval-data", corpus_dir, "--work", caches["work"], "--no-progress")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--eval-data" in err[0] and "not the data of --eval-cache" in err[0]


def test_distill_eval_data_matching_eval_cache_is_accepted(tmp_path, tiny_teachers, caches, heldout_file, capsys):
    code = run_trainer("distill", "--student", tiny_teachers["llama_b"], "--cache", caches["train"],
                       "--out", tmp_path / "o", "--steps", 2, "--batch-size", 4, "--eval-cache", caches["heldout"],
                       "--eval-data", heldout_file, "--work", caches["work"], "--eval-every", 0, "--no-progress")
    assert code == 0, capsys.readouterr().err
    assert [e for e in metrics(tmp_path / "o") if e["kind"] == "eval"][-1]["eval_kl"] > 0


@pytest.fixture(scope="module")
def padded_student(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A Llama student with 384 logit columns for the 320-token tokenizer (like Qwen's 152,064 vs 151,936)."""
    return save_tiny_teacher(tmp_path_factory.mktemp("padded"), "llama", tiny_tokenizer_dir, vocab_size=384, seed=2)


def test_padded_vocab_student_trains_with_a_warning(tmp_path, padded_student, caches, capsys):
    student = padded_student
    width = AutoModelForCausalLM.from_pretrained(student).config.vocab_size
    assert width > TINY_VOCAB
    out = tmp_path / "kd"
    code = run_trainer("distill", "--student", student, "--cache", caches["train"], "--out", out, "--steps", 6,
                       "--batch-size", 4, "--lr", 1e-2, "--warmup", 1, "--eval-cache", caches["heldout"],
                       "--eval-windows", 8, "--eval-every", 3, "--log-every", 1, "--no-progress")
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{width} logit columns for a {TINY_VOCAB}-token tokenizer" in err and "ignored" in err
    m = metrics(out)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in m if e["kind"] == "train")
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == width


def test_pretrain_rejects_config_without_model_type(tmp_path, tiny_tokenizer_dir, corpus_dir, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"hidden_size": 32}))
    code = run_trainer("pretrain", "--model", cfg, "--tokenizer", tiny_tokenizer_dir, "--data", corpus_dir,
                       "--seq-len", SEQ, "--out", tmp_path / "o", "--work", tmp_path / "w")
    assert code == 2 and "model_type" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# prune


def test_prune_help_names_supported_architectures():
    from trainer.commands.prune import SUPPORTED
    from trainer.prune import SUPPORTED_ARCHITECTURES

    assert sorted(SUPPORTED) == sorted(SUPPORTED_ARCHITECTURES.values())
    r = trainer_subprocess("prune", "--help")
    assert r.returncode == 0
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        assert arch in r.stdout


@pytest.mark.parametrize("teacher", ["llama", "qwen2"])
def test_prune_cli_hits_target_and_loads(tmp_path, tiny_teachers, corpus_dir, teacher, capsys):
    src = tiny_teachers[teacher]
    before = count_parameters(AutoModelForCausalLM.from_pretrained(src))
    target = int(before * 0.7)
    out = tmp_path / "student"
    code = run_trainer("prune", "--model", src, "--out", out, "--target-params", target, "--calib", corpus_dir,
                       "--calib-windows", 8, "--seq-len", SEQ, "--work", tmp_path / "w")
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(out)
    after = count_parameters(model)
    assert summary["params_after"] == after
    assert abs(after - target) / target <= 0.02
    assert AutoTokenizer.from_pretrained(out) is not None
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_prune_refuses_unsupported_architecture(tmp_path, tiny_teachers, corpus_dir, capsys):
    code = run_trainer("prune", "--model", tiny_teachers["gpt2"], "--out", tmp_path / "s", "--sparsity", 0.3,
                       "--calib", corpus_dir, "--calib-windows", 4, "--seq-len", SEQ, "--work", tmp_path / "w")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GPT2LMHeadModel" in err[0]


def test_prune_target_suffixes():
    from trainer.commands.prune import parse_count
    assert parse_count("3.5M") == 3_500_000 and parse_count("350k") == 350_000
    assert parse_count("1.2e9") == 1_200_000_000 and parse_count("12345") == 12345


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_teacher_on_its_own_cache_has_zero_kl(tiny_teachers, caches, heldout_file, capsys):
    code = run_trainer("evaluate", "--model", tiny_teachers["llama"], "--cache", caches["heldout"],
                       "--data", heldout_file, "--work", caches["work"], "--json", "--device", "cpu")
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(res["kl"]) < 1e-5 and res["ce"] > 0 and res["tokens"] > 0
    # the student is further from the teacher; CE on the cache equals CE on the same windows as --data
    code = run_trainer("evaluate", "--model", tiny_teachers["llama_b"], "--cache", caches["heldout"], "--json")
    kd = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kd["kl"] > 0.01
    code = run_trainer("evaluate", "--model", tiny_teachers["llama_b"], "--data", heldout_file, "--seq-len", SEQ,
                       "--work", caches["work"], "--json")
    ce = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ce["tokens"] == kd["tokens"] and ce["ce"] == pytest.approx(kd["ce"], rel=1e-5)
    assert "kl" not in ce


def test_evaluate_refuses_mismatched_data_and_cache(tiny_teachers, caches, corpus_dir, capsys):
    code = run_trainer("evaluate", "--model", tiny_teachers["llama"], "--cache", caches["heldout"],
                       "--data", corpus_dir, "--work", caches["work"])
    assert code == 2 and "not the data of --cache" in capsys.readouterr().err
