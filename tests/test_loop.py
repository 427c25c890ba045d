"""The shared training loop: schedule, configs, checkpoints, exact resume, distillation from a cache.

Exactness claims are tested with torch.equal (bit-identical float32 weights on CPU). The KD loss on
a batch read back from an fp32 cache is compared with the same loss computed in float64 from the
live teacher's logits collapsed onto the same (k+1) outcomes; the cache stores float32 log-probs
computed from float32 logits, so the two agree to float32 rounding: |diff| <= 1e-5 * (1 + |loss|).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_corpus_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache import format as fmt
from logitcache.backends.teacher import describe_teacher
from logitcache.backends.topk import topk_from_logits
from logitcache.data import prepare_windows, tokenizer_fingerprint
from logitcache.errors import UserError
from logitcache.producer.writer import CacheWriter
from logitcache.read.reader import CacheReader
from trainer.checkpoint import optimizer_from_flat, optimizer_to_flat
from trainer.cli import main as trainer_main
from trainer.config import RunConfig, TrainConfig, resume_differences
from trainer.data import CacheBatches, WindowBatches
from trainer.loop import lr_at
from trainer.losses import distill_loss

SEQ = 16


# ---------------------------------------------------------------------------------------------
# fixtures and helpers shared with test_trainer_cli.py and test_ddp.py


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text("\n".join(tiny_corpus_text(n_docs=3, seed=7)))
    return path


def write_cache(teacher_dir: Path, data: str, out: Path, work: Path, *, k: int = 8, seq_len: int = SEQ,
                rows_per_shard: int = 32, max_windows: int | None = None, encoding: str = "fp32") -> Path:
    """A real cache of `teacher_dir` over `data`: live float32 logits -> top-k + tail -> CacheWriter."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    win = prepare_windows(data, tok, seq_len, work, max_windows=max_windows)
    n = win.num_windows
    teacher = describe_teacher(str(teacher_dir), dtype="float32")
    tokenizer = {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id}
    data_d = {"source": win.source, "text_column": "text", "fingerprint": win.fingerprint, "seq_len": seq_len,
              "num_windows": n, "num_tokens": n * seq_len}
    enc = {"name": encoding, "params": {}}
    header = {"key": fmt.cache_key(teacher, tokenizer, data_d, k, enc), "teacher": teacher,
              "tokenizer": tokenizer, "data": data_d, "k": k, "encoding": enc,
              "producer": {"backend": "test", "versions": {}}, "rows_per_shard": rows_per_shard,
              "num_shards": -(-n // rows_per_shard)}
    writer = CacheWriter(out, header)
    with torch.no_grad():
        for i in range(header["num_shards"]):
            rows = win.tokens[i * rows_per_shard:(i + 1) * rows_per_shard]
            x = torch.as_tensor(rows, dtype=torch.long)
            logits = model(input_ids=x[:, :-1]).logits
            r = len(rows)
            ids, lp, tail, tgt = topk_from_logits(logits.reshape(r * seq_len, -1), x[:, 1:].reshape(-1), k)
            writer.write_shard(i, input_ids=rows, target_logprob=tgt.reshape(r, seq_len).numpy(),
                               topk_ids=ids.reshape(r, seq_len, k).numpy(),
                               topk_logprobs=lp.reshape(r, seq_len, k).numpy(),
                               tail_logmass=tail.reshape(r, seq_len).numpy())
    writer.finish()
    return out


def produce_cache(teacher_dir: Path, data: str, root: Path, *, k: int = 8, seq_len: int = SEQ,
                  rows_per_shard: int = 32) -> Path:
    """`logitcache produce` (fp32) into `root`; returns the cache folder.

    Falls back to `write_cache` (the same arrays through CacheWriter) where the producer is absent.
    """
    try:
        from logitcache.cli import main as logitcache_main
        from logitcache.commands import produce  # noqa: F401
    except ImportError:
        return write_cache(teacher_dir, data, root / "cache", root, k=k, seq_len=seq_len,
                           rows_per_shard=rows_per_shard)
    code = logitcache_main(["produce", "--teacher", str(teacher_dir), "--data", data, "--out", str(root),
                            "--k", str(k), "--seq-len", str(seq_len), "--rows-per-shard", str(rows_per_shard),
                            "--batch-size", "16", "--encoding", "fp32", "--dtype", "float32", "--no-progress"])
    assert code == 0
    (cache,) = [p.parent for p in root.glob("*/manifest.json")]
    return cache


@pytest.fixture(scope="session")
def caches(tmp_path_factory, tiny_teachers, corpus_dir, heldout_file) -> dict[str, Path]:
    """Top-8 fp32 caches of the tiny Llama teacher: `train` (the corpus) and `heldout`.

    `work` is a folder for the windows of --eval-data runs.
    """
    root = tmp_path_factory.mktemp("caches")
    train = produce_cache(tiny_teachers["llama"], str(corpus_dir), root / "train")
    heldout = produce_cache(tiny_teachers["llama"], str(heldout_file), root / "heldout")
    return {"train": train, "heldout": heldout, "work": root / "work"}


def run_trainer(*argv: str) -> int:
    return trainer_main([str(a) for a in argv])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# pieces


def test_lr_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[20] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(0, 2.0, 0, 10, 0.0) == pytest.approx(2.0)


def test_run_config_round_trip_and_rejects_unknown_keys(tmp_path):
    run = RunConfig(command="pretrain", model="m.json", out=str(tmp_path), train=TrainConfig(steps=7))
    run.save(tmp_path / "run_config.json")
    assert RunConfig.load(tmp_path / "run_config.json") == run
    d = run.to_dict()
    d["train"]["stepz"] = 3
    with pytest.raises(UserError, match="unknown key.*stepz"):
        RunConfig.from_dict(d)
    d = run.to_dict()
    d["colour"] = "blue"
    with pytest.raises(UserError, match="unknown key.*colour"):
        RunConfig.from_dict(d)


def test_resume_differences_ignore_reporting_settings():
    a = RunConfig(command="pretrain", model="m", out="o", train=TrainConfig(steps=10, eval_every=5))
    b = RunConfig(command="pretrain", model="m", out="o", train=TrainConfig(steps=10, eval_every=2, stop_at=4,
                                                                             workers=2))
    assert resume_differences(a, b) == []
    c = RunConfig(command="pretrain", model="m", out="o", train=TrainConfig(steps=10, lr=0.5))
    assert resume_differences(a, c) == ["train.lr: 0.001 -> 0.5"]


def test_optimizer_state_survives_tensors_plus_json():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW([{"params": [model[0].weight], "weight_decay": 0.1},
                             {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}],
                            lr=0.01, betas=(0.9, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_to_flat(opt)
    json.dumps(meta)   # JSON-serialisable, no pickle
    opt2 = torch.optim.AdamW(model.parameters(), lr=1.0)
    opt2.param_groups[:] = []
    for g in opt.param_groups:
        opt2.add_param_group({"params": g["params"]})
    opt2.load_state_dict(optimizer_from_flat(tensors, meta))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_chunked_ce_loss_matches_unchunked():
    from trainer.commands.pretrain import make_ce_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 10, 40, dtype=torch.float64, requires_grad=True)   # 30 positions, 8 padding columns
    batch = {"labels": torch.randint(0, 32, (3, 10))}
    (a, _), (b, _) = make_ce_loss(32, None)(logits, batch), make_ce_loss(32, 7)(logits, batch)
    ga, = torch.autograd.grad(a, logits)
    gb, = torch.autograd.grad(b, logits)
    ref = torch.nn.functional.cross_entropy(logits[..., :32].reshape(30, 32), batch["labels"].reshape(30))
    assert torch.allclose(a, ref) and torch.allclose(b, ref)
    assert torch.allclose(ga, gb) and not gb[..., 32:].any()


def test_window_batches_deterministic_disjoint_ranks_and_epochs():
    tokens = np.arange(50 * 5, dtype=np.int32).reshape(50, 5)
    src = WindowBatches(tokens, batch_size=4, seed=3)
    assert src.batches_per_epoch == 12
    first = [src[i]["window_id"].tolist() for i in range(12)]
    assert sorted(sum(first, [])) == sorted(set(sum(first, [])))          # no repeats in an epoch
    assert [src[i]["window_id"].tolist() for i in range(12, 24)] != first  # new permutation next epoch
    again = WindowBatches(tokens, batch_size=4, seed=3)
    assert again[17]["window_id"].tolist() == src[17]["window_id"].tolist()
    b = src[0]
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    r0 = {w for i in range(12) for w in WindowBatches(tokens, 4, 3, 0, 2)[i]["window_id"].tolist()}
    r1 = {w for i in range(12) for w in WindowBatches(tokens, 4, 3, 1, 2)[i]["window_id"].tolist()}
    assert r0 and r1 and not r0 & r1


def test_cache_batches_resume_mid_stream_and_across_epochs(caches):
    reader = CacheReader(caches["train"])
    src = CacheBatches(reader, batch_size=8, seed=1)
    per_epoch = src.batches_in_epoch(0)
    total = per_epoch * 2 + 3
    full = [b["window_id"].tolist() for b in src.stream(0, total)]
    assert len(full) == total
    start = per_epoch - 2          # resume two batches before an epoch boundary
    tail = [b["window_id"].tolist() for b in CacheBatches(reader, 8, seed=1).stream(start, total - start)]
    assert tail == full[start:]
    ranks = [{w for b in CacheBatches(reader, 8, 1, r, 2).stream(0, 4) for w in b["window_id"].tolist()}
             for r in range(2)]
    assert not ranks[0] & ranks[1]


# ---------------------------------------------------------------------------------------------
# exact resume, through the CLI


def _pretrain_args(tiny_tokenizer_dir, corpus_dir, heldout_file, model_json, work, out):
    return ["pretrain", "--model", model_json, "--tokenizer", tiny_tokenizer_dir, "--data", corpus_dir,
            "--seq-len", SEQ, "--work", work, "--out", out, "--steps", 8, "--batch-size", 4, "--grad-accum", 2,
            "--lr", 3e-3, "--warmup", 2, "--eval-data", heldout_file, "--eval-every", 3, "--eval-windows", 8,
            "--save-every", 3, "--log-every", 2, "--no-progress"]


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "max_position_embeddings": 64, "tie_word_embeddings": False}))
    return path


def test_pretrain_resume_gives_identical_weights(tmp_path, tiny_tokenizer_dir, corpus_dir, heldout_file, model_json):
    args = lambda out: _pretrain_args(tiny_tokenizer_dir, corpus_dir, heldout_file, model_json, tmp_path / "w", out)
    assert run_trainer(*args(tmp_path / "full")) == 0
    assert run_trainer(*args(tmp_path / "split"), "--stop-at", 4) == 0
    assert not (tmp_path / "split" / "model.safetensors").exists()          # interrupted: no final model
    state = json.loads((tmp_path / "split" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["batch_position"] == 8
    assert run_trainer(*args(tmp_path / "split"), "--resume") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    assert_same_weights(tmp_path / "full" / "checkpoint", tmp_path / "split" / "checkpoint")
    # the metrics log of the resumed run continues the interrupted one without duplicates
    m_full, m_split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    key = lambda e: (e["kind"], e["step"])
    assert sorted(map(key, m_full)) == sorted(set(map(key, m_split)) - {("eval", 4)})
    losses = {e["step"]: e["loss"] for e in m_full if e["kind"] == "train"}
    assert losses == {e["step"]: e["loss"] for e in m_split if e["kind"] == "train"}
    # the final checkpoint is an ordinary Hugging Face model with its tokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "full") is not None
    assert RunConfig.load(tmp_path / "full" / "run_config.json").train.steps == 8


def test_resume_refuses_changed_settings_and_fresh_run_refuses_checkpoint(
        tmp_path, tiny_tokenizer_dir, corpus_dir, heldout_file, model_json, capsys):
    args = _pretrain_args(tiny_tokenizer_dir, corpus_dir, heldout_file, model_json, tmp_path / "w", tmp_path / "o")
    assert run_trainer(*args, "--stop-at", 3) == 0
    capsys.readouterr()
    assert run_trainer(*args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run_trainer(*args, "--resume", "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and len(err.strip().splitlines()) == 1


def test_distill_resume_gives_identical_weights(tmp_path, tiny_teachers, caches):
    def args(out):
        return ["distill", "--student", tiny_teachers["llama_b"], "--cache", caches["train"], "--out", out,
                "--steps", 8, "--batch-size", 4, "--grad-accum", 2, "--lr", 3e-3, "--warmup", 2,
                "--alpha-ce", 0.25, "--logits-chunk", 16, "--eval-cache", caches["heldout"], "--eval-every", 3,
                "--eval-windows", 8, "--save-every", 3, "--log-every", 2, "--no-progress"]
    assert run_trainer(*args(tmp_path / "full")) == 0
    assert run_trainer(*args(tmp_path / "split"), "--stop-at", 5) == 0
    assert run_trainer(*args(tmp_path / "split"), "--resume") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "split")


# ---------------------------------------------------------------------------------------------
# distillation from a cache


def test_distill_end_to_end_loss_decreases_with_eval_entries(tmp_path, tiny_teachers, caches):
    out = tmp_path / "kd"
    assert run_trainer("distill", "--student", tiny_teachers["llama_b"], "--cache", caches["train"], "--out", out,
                       "--steps", 40, "--batch-size", 8, "--lr", 1e-2, "--warmup", 4,
                       "--eval-cache", caches["heldout"], "--eval-every", 20, "--eval-windows", 16,
                       "--log-every", 5, "--no-progress") == 0
    m = metrics(out)
    train = [e for e in m if e["kind"] == "train"]
    evals = [e for e in m if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert all({"eval_kl", "eval_ce", "eval_teacher_tail_mass"} <= e.keys() for e in evals)
    assert train[-1]["kd"] < 0.7 * train[0]["kd"]
    assert evals[-1]["eval_kl"] < 0.8 * evals[0]["eval_kl"]
    assert {"loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s", "data_wait_fraction"} <= train[0].keys()
    AutoModelForCausalLM.from_pretrained(out)


def _bucket_kl_float64(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, kind: str) -> float:
    """The (k+1)-way divergence from full logits, in float64, with the teacher's own top-k."""
    t = torch.log_softmax(teacher_logits.double(), -1)
    s = torch.log_softmax(student_logits.double(), -1)
    ids = t.topk(k, dim=-1).indices
    rest = torch.ones_like(t, dtype=torch.bool).scatter(1, ids, False)
    def buckets(lp):
        tail = torch.logsumexp(lp.masked_fill(~rest, -math.inf), -1, keepdim=True)
        return torch.cat([lp.gather(1, ids), tail], -1)
    p, q = buckets(t), buckets(s)
    if kind == "forward_kl":
        rows = (p.exp() * (p - q)).sum(-1)
    elif kind == "reverse_kl":
        rows = (q.exp() * (q - p)).sum(-1)
    else:
        m = torch.logaddexp(p + math.log(0.5), q + math.log(0.5))
        rows = 0.5 * (p.exp() * (p - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)
    return rows.mean().item()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_from_cache_equals_live_teacher(tiny_teachers, caches, kind):
    reader = CacheReader(caches["train"])
    batch = next(reader.iter_batches(6))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["llama"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_teachers["llama_b"], dtype=torch.float32).eval()
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits.reshape(-1, teacher.config.vocab_size)
        s_logits = student(input_ids=batch["input_ids"]).logits.reshape(-1, student.config.vocab_size)
    n, k = s_logits.shape[0], reader.k
    loss, _ = distill_loss(s_logits, batch["topk_ids"].reshape(n, k), batch["topk_logprobs"].reshape(n, k),
                           batch["tail_logmass"].reshape(n), batch["labels"].reshape(n),
                           torch.ones(n, dtype=torch.bool), kind=kind, beta=0.5, chunk_size=16)
    ref = _bucket_kl_float64(s_logits, t_logits, k, kind)
    assert ref > 1e-3
    assert abs(loss.item() - ref) <= 1e-5 * (1 + abs(ref))
