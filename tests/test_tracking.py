"""`trainer pretrain|distill --report-to`: TensorBoard event files and an offline W&B run hold the
metrics.jsonl entries; `none` writes nothing more; a missing library is one line and writes nothing.

Values are read back with the libraries' own formats: TensorBoard's EventAccumulator (scalars stored
as float32, so compared to 1e-6 relative) and the records of W&B's run file (JSON, exact).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from test_loop import _pretrain_args, caches, heldout_file, metrics, model_json, run_trainer  # noqa: F401  (fixtures)

from trainer.tracking import scalars

EXPECTED = {"metrics.jsonl", "run_config.json", "checkpoint", "config.json", "generation_config.json",
            "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def distill(out: Path, caches: dict, student: Path, *extra) -> int:
    return run_trainer("distill", "--student", student, "--cache", caches["train"], "--out", out, "--steps", 4,
                       "--batch-size", 4, "--eval-cache", caches["heldout"], "--eval-every", 2, "--eval-windows", 8,
                       "--log-every", 1, "--no-progress", *extra)


def test_scalars_name_each_number_by_its_kind():
    step, values = scalars({"kind": "eval", "step": 4, "eval_ce": 2.5, "eval_tokens": 128, "note": "x"})
    assert step == 4 and values == {"eval/ce": 2.5, "eval/tokens": 128.0}
    assert scalars({"kind": "train", "step": 1, "loss": 3.0, "finished": True})[1] == {"train/loss": 3.0}


def test_tensorboard_event_files_hold_the_metrics(tmp_path, tiny_teachers, caches):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "kd"
    assert distill(out, caches, tiny_teachers["llama_b"], "--report-to", "tensorboard") == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    entries = metrics(out)
    for kind, tag, key in (("train", "train/loss", "loss"), ("train", "train/kd", "kd"), ("train", "train/lr", "lr"),
                           ("eval", "eval/kl", "eval_kl"), ("eval", "eval/ce", "eval_ce")):
        want = [(e["step"], e[key]) for e in entries if e["kind"] == kind]
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 3, tag
        assert all(g == pytest.approx(w, rel=1e-6) for (_, g), (_, w) in zip(got, want)), tag


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: LevelDB's log format (32 KiB blocks, 7-byte record
    headers: crc, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte file header `:W&B`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, head, at, parts = 32768, 7, 7, b""
    while at + head <= len(data):
        if block - at % block < head:               # a block's tail too short for a header is padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at:at + head])
        if kind == 0:
            break
        parts += data[at + head:at + head + length]
        at += head + length
        if kind in (1, 4):                          # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_and_resume_continues_it(tmp_path, monkeypatch, tiny_tokenizer_dir,
                                                                     corpus_dir, heldout_file, model_json):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "pt"
    argv = _pretrain_args(tiny_tokenizer_dir, corpus_dir, heldout_file, model_json, tmp_path / "w", out)
    assert run_trainer(*argv, "--report-to", "wandb", "--stop-at", 4) == 0
    assert run_trainer(*argv, "--report-to", "wandb", "--resume") == 0
    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2          # one W&B run, in two sittings
    history: dict[int, dict] = {}
    config, kinds = None, []
    for record in (r for f in files for r in wandb_records(f)):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run" and config is None:
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    entries = metrics(out)
    assert {e["kind"] for e in entries} == {"train", "eval"} and entries[-1]["step"] == 8
    for e in entries:
        _, values = scalars(e)
        assert e["step"] in history, (e["step"], sorted(history), kinds)
        assert {k: history[e["step"]][k] for k in values} == values, e["step"]
    assert config["command"] == "pretrain" and config["train"]["steps"] == 8


def test_report_to_none_writes_nothing_more_and_a_missing_library_is_one_line(tmp_path, tiny_teachers, caches,
                                                                             capsys, monkeypatch):
    assert distill(tmp_path / "plain", caches, tiny_teachers["llama_b"]) == 0
    assert {p.name for p in (tmp_path / "plain").iterdir()} == EXPECTED
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "wandb", None)          # as if not installed
    assert distill(tmp_path / "w", caches, tiny_teachers["llama_b"], "--report-to", "wandb") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'logitcache[track]'" in err[0] and "--report-to wandb" in err[0]
    assert not (tmp_path / "w").exists()
