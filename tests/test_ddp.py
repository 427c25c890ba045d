"""DDP on CPU: two gloo ranks started like torchrun (RANK / WORLD_SIZE / MASTER_* in the environment).

Each rank runs the real `trainer` command; the batch sources are wrapped to record which windows the
rank trained on. The ranks must read disjoint windows, finish, and leave one checkpoint (written by
rank 0) that loads into a fresh model and equals the final weights.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_loop import SEQ, caches, heldout_file, model_json, weights  # noqa: F401  (fixtures)
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.checkpoint import read_state

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str], record: str) -> None:
    """One rank: torchrun's environment, window-id recording, then the CLI."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import trainer.data as td
    from trainer.cli import main

    seen: list[int] = []
    get = td.WindowBatches.__getitem__
    stream = td.CacheBatches.stream

    def recording_get(self, i):
        batch = get(self, i)
        seen.extend(batch["window_id"].tolist())
        return batch

    def recording_stream(self, *args, **kwargs):
        for batch in stream(self, *args, **kwargs):
            seen.extend(batch["window_id"].tolist())
            yield batch

    td.WindowBatches.__getitem__ = recording_get
    td.CacheBatches.stream = recording_stream
    code = main(argv)
    Path(record, f"rank{rank}.json").write_text(json.dumps({"code": code, "windows": seen}))


def _run_ddp(argv: list, record: Path, world: int = 2) -> list[dict]:
    record.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, _free_port(), [str(a) for a in argv], str(record)), nprocs=world, join=True)
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(world)]


def _check_outputs(out: Path, ranks: list[dict], batch: int, steps: int) -> None:
    assert [r["code"] for r in ranks] == [0, 0]
    w0, w1 = (set(r["windows"]) for r in ranks)
    assert len(ranks[0]["windows"]) == len(ranks[1]["windows"]) == batch * steps
    assert w0 and w1 and not w0 & w1, "ranks must train on disjoint windows"
    state = read_state(out / "checkpoint")
    assert state["world_size"] == 2 and state["step"] == steps
    # the checkpoint (rank 0's) loads into a fresh model and holds the final weights
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    from safetensors.torch import load_model
    load_model(model, str(out / "checkpoint" / "model.safetensors"))
    final = weights(out)
    for name, p in model.state_dict().items():
        if name in final:
            assert torch.equal(p, final[name]), name
    assert {k for k in load_file(str(out / "checkpoint" / "rng.safetensors"))} >= {"rank0.torch_cpu",
                                                                                  "rank1.torch_cpu"}
    entries = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert entries and entries[-1]["step"] == steps
    # tokens per step count both ranks
    train = [e for e in entries if e["kind"] == "train"]
    assert train[-1]["tokens"] == steps * batch * SEQ * 2


def test_ddp_pretrain_two_ranks(tmp_path, tiny_tokenizer_dir, corpus_dir, heldout_file, model_json):
    out = tmp_path / "pt"
    ranks = _run_ddp(["pretrain", "--model", model_json, "--tokenizer", tiny_tokenizer_dir, "--data", corpus_dir,
                      "--seq-len", SEQ, "--work", tmp_path / "w", "--out", out, "--steps", 4, "--batch-size", 4,
                      "--eval-data", heldout_file, "--eval-every", 2, "--eval-windows", 8, "--save-every", 2,
                      "--log-every", 1, "--device", "cpu", "--no-progress"], tmp_path / "rec")
    _check_outputs(out, ranks, batch=4, steps=4)


def test_ddp_distill_two_ranks(tmp_path, tiny_teachers, caches):
    out = tmp_path / "kd"
    ranks = _run_ddp(["distill", "--student", tiny_teachers["llama_b"], "--cache", caches["train"], "--out", out,
                      "--steps", 4, "--batch-size", 4, "--eval-cache", caches["heldout"], "--eval-every", 2,
                      "--eval-windows", 8, "--log-every", 1, "--device", "cpu", "--workers", 1, "--no-progress"],
                     tmp_path / "rec")
    _check_outputs(out, ranks, batch=4, steps=4)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["eval_tokens"] == 8 * SEQ for e in evals)
