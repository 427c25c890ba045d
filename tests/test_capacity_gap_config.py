"""The sweep configs shipped in scripts/configs/ describe the experiment the issue asks for.

The sweep itself takes an hour (see docs/results/); here only what can be checked in a second: the
configs parse, reject unknown keys, and their ladders have the promised shape, with parameter
counts taken from real (meta-device) Llama models built from each rung's config.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.prune import count_parameters

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "scripts" / "configs").glob("capacity_gap_*.json"))


def load_script():
    spec = importlib.util.spec_from_file_location("capacity_gap", ROOT / "scripts" / "capacity_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def non_embedding(rung: dict, vocab: int) -> int:
    config = LlamaConfig(vocab_size=vocab, hidden_size=rung["hidden"], num_hidden_layers=rung["layers"],
                         num_attention_heads=rung["heads"], num_key_value_heads=rung["heads"],
                         intermediate_size=rung["ffn"], tie_word_embeddings=True)
    with torch.device("meta"):
        return count_parameters(LlamaForCausalLM(config), non_embedding=True)


def test_cpu_and_gpu_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"capacity_gap_cpu", "capacity_gap_gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_describes_a_ladder_of_six_over_one_and_a_half_decades(path):
    cfg = load_script().load_config(path)
    vocab = cfg["tokenizer"]["vocab_size"]
    sizes = sorted(non_embedding(t, vocab) for t in cfg["teachers"])
    assert len(sizes) >= 6
    assert math.log10(sizes[-1] / sizes[0]) >= 1.5, sizes
    assert len(cfg["students"]) >= 3
    # one initialisation per student size: each is pruned from a teacher of the ladder
    assert all(s["prune_from"] in {t["name"] for t in cfg["teachers"]} for s in cfg["students"])


def test_gpu_ladder_is_about_thirty_times_the_cpu_one():
    module = load_script()
    cpu, gpu = (module.load_config(ROOT / "scripts" / "configs" / f"capacity_gap_{n}.json") for n in ("cpu", "gpu"))
    top = [max(non_embedding(t, c["tokenizer"]["vocab_size"]) for t in c["teachers"]) for c in (cpu, gpu)]
    assert 20 <= top[1] / top[0] <= 45, top


def test_unknown_keys_are_refused(tmp_path):
    cfg = json.loads((ROOT / "scripts" / "configs" / "capacity_gap_cpu.json").read_text())
    cfg["student_training"]["alpha"] = 0.5                      # a typo of alpha_ce
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="unknown keys in student_training"):
        load_script().load_config(bad)
