"""`trainer distill` from a cache of conversations: masked batches end to end, and the student's chat
template checked against the cache's."""

from __future__ import annotations

import json

import numpy as np
from conftest import save_tiny_teacher
from test_produce_chat import SMALL, chat_data, chat_teacher, produce, rows  # noqa: F401  (fixtures)
from test_produce_chat_data import TEMPLATES, chat_tokenizer_dir  # noqa: F401  (fixture)

from trainer.cli import main as trainer_main

STEPS = ["--steps", "3", "--batch-size", "4", "--lr", "3e-3", "--no-progress"]


def test_distill_from_a_chat_cache_and_the_template_check(capsys, tmp_path, chat_teacher, chat_data,
                                                           chat_tokenizer_dir, tiny_tokenizer_dir):
    rc, (cache,), err = produce(capsys, "--teacher", str(chat_teacher), "--data", str(chat_data),
                                "--out", str(tmp_path / "caches"), *SMALL)
    assert rc == 0, err
    # a student with the cache's tokenizer and template: trains on the loss positions, KD finite
    student = save_tiny_teacher(tmp_path / "student", "llama", chat_tokenizer_dir, seed=3, context=128)
    code = trainer_main(["distill", "--student", str(student), "--cache", str(cache), "--out", str(tmp_path / "kd"),
                         "--eval-cache", str(cache), "--eval-every", "3", *STEPS])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert summary["finished"] and np.isfinite(summary["train"]["loss"])
    assert summary["eval"]["tokens"] == manifest["data"]["loss_tokens"]      # KL at the stored positions only
    # the same tokenizer without a template: refused unless the cache's template is given
    bare = tmp_path / "bare"
    save_tiny_teacher(bare, "llama", chat_tokenizer_dir, seed=3, context=128)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    capsys.readouterr()
    assert trainer_main(["distill", "--student", str(bare), "--cache", str(cache), "--out", str(tmp_path / "x"),
                         *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has none; give the cache's template with --chat-template" in err
    other = TEMPLATES / "chatml.jinja"
    assert trainer_main(["distill", "--student", str(bare), "--cache", str(cache), "--out", str(tmp_path / "x"),
                         "--chat-template", str(other), *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "distil with the template the cache was made with" in err
    assert not (tmp_path / "x").exists()
