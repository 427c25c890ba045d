"""`logitcache inspect`: a readable summary, with the encoding's full parameters only in --json."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"


def test_table_summarises_the_rank_table_and_json_keeps_it(capsys):
    cache = FIXTURES / "compact-k8"
    table = json.loads((cache / "manifest.json").read_text())["encoding"]["params"]["rank_table"]
    assert main(["inspect", str(cache), "--sample-windows", "0"]) == 0
    out = capsys.readouterr().out
    assert table not in out and "zstd+b64" not in out
    assert "98 ids ranked by frequency" in out and "step" in out and "payload" in out
    assert max(len(line) for line in out.splitlines()) < 120
    assert main(["inspect", str(cache), "--json", "--sample-windows", "0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoding_params"]["rank_table"] == table and info["payload"] == "topk"


def test_samples_cache_names_its_draws(capsys):
    assert main(["inspect", str(FIXTURES / "sampled-s4"), "--sample-windows", "0"]) == 0
    out = capsys.readouterr().out
    assert "samples" in out and "draws (S)" in out and "zstd+b64" not in out
