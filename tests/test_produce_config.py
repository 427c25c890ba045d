"""ProduceConfig: one validated object; embedded, the producer is quiet; errors speak of values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from logitcache import ProduceConfig, SettingError
from logitcache.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("changes, message", [
    ({"k": 0}, "k 0: must be at least 1"),
    ({"seq_len": -3}, "seq_len -3: must be at least 1"),
    ({"teachers": ()}, "teacher: give at least one"),
    ({"teachers": ("a", "a")}, "teacher: the same teacher is given twice"),
    ({"num_workers": 2, "worker_index": 2}, "worker_index 2: must be in 0..1"),
    ({"max_windows": 0}, "max_windows 0: must be at least 1"),
    ({"engine": "slurm"}, "engine slurm: unknown (known: local, ray)"),
])
def test_bad_settings_name_the_setting_and_value(changes, message):
    with pytest.raises(SettingError) as info:
        ProduceConfig(**{"teachers": ("t",), "data": "d", "out": "o", **changes})
    assert str(info.value) == message


def test_unknown_settings_are_refused_and_values_are_normalised(tmp_path):
    with pytest.raises(TypeError):
        ProduceConfig(teachers=("t",), data="d", out="o", top_k=3)
    config = ProduceConfig(teachers="one-teacher", data=tmp_path, out=str(tmp_path))
    assert config.teachers == ("one-teacher",) and config.data == str(tmp_path) and config.out == tmp_path
    assert config.replace(k=8).k == 8 and config.k == 64


def test_the_command_line_names_its_flags(capsys, tmp_path):
    assert main(["produce", "--teacher", "t", "--data", "d", "--out", str(tmp_path), "--max-windows", "0"]) == 2
    assert capsys.readouterr().err.strip() == "logitcache: error: --max-windows 0: must be at least 1"


def test_embedded_produce_is_quiet_unless_logging_is_configured(tiny_teachers, corpus_dir, tmp_path):
    """The padded teacher makes the producer say that it masks columns: embedded, nothing is printed;
    with logging configured, the message reaches the `logitcache` logger."""
    code = f"""
import logging, sys
from logitcache import ProduceConfig, produce
config = ProduceConfig(teachers=({str(tiny_teachers["qwen2"])!r},), data={str(corpus_dir)!r}, out={str(tmp_path)!r},
                       k=4, seq_len=16, max_windows=8, rows_per_shard=8, backend="hf", progress=False)
if sys.argv[1] == "logging":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
(cache,) = produce(config)
"""
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    logged = subprocess.run([sys.executable, "-c", code, "logging"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert logged.returncode == 0, logged.stderr
    assert "logitcache.producer.pipeline: " in logged.stderr and "masked out" in logged.stderr
