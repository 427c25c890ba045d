"""Sampled caches end to end: the hf backend's draws, `produce --encoding sampled`, the reader, `trainer distill`.

Real parts only: tiny teachers built from configs (conftest), the real producer CLI, Parquet shards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from test_loop import metrics, produce_cache, run_trainer
from test_produce import cache_bytes, one_thread, produce, refused  # noqa: F401  (fixture)

from logitcache.backends.hf import HFBackend
from logitcache.cli import main
from logitcache.encodings.sampled import draw_samples_at, window_uniforms
from logitcache.read.reader import CacheReader

S = 16
SMALL = ["--seq-len", "16", "--rows-per-shard", "4", "--dtype", "float32", "--no-progress"]


def sampled_args(teacher, data, root, *extra):
    return ["--teacher", str(teacher), "--data", str(data), "--out", str(root), "--max-windows", "8",
            "--encoding", "sampled", "--encoding-param", f"S={S}", *SMALL, *extra]


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tiny_teachers, corpus_dir):
    root = tmp_path_factory.mktemp("sampled")
    assert main(["produce", *sampled_args(tiny_teachers["llama"], corpus_dir, root, "--batch-size", "2")]) == 0
    (cache,) = [p.parent for p in root.glob("*/manifest.json")]
    return cache


def test_draw_frequencies_match_the_teachers_probabilities(tiny_teachers):
    """Chi-square goodness of fit of 20,000 draws per position against the float64 softmax.

    Cells with an expected count below 5 are pooled (the usual validity rule). Each of the 6
    positions is tested at alpha = 1e-4, so a correct sampler fails with probability < 6e-4. The
    chi-square over ~320 cells catches diffuse bias; the per-cell z-score (at most 5.5 standard
    errors: < 4e-8 per cell, < 1e-4 over all 1,920 cells for a correct sampler) catches one
    token drawn too often or too rarely, e.g. an off-by-one in the inverse CDF.
    """
    draws = 20000
    backend = HFBackend(str(tiny_teachers["llama"]), k=8, dtype="float32")
    window = np.arange(7, dtype=np.int32)[None, :] * 17 % 300              # (1, 7): 6 positions
    u = window_uniforms("test-key", [0], 6, draws)
    got = backend.sample(window, draws, u)
    with torch.no_grad():
        logits = backend.model(input_ids=torch.as_tensor(window[:, :-1], dtype=torch.long)).logits[0]
    p = torch.softmax(logits.double(), -1).numpy()
    assert (got.sample_counts.sum(-1) == draws).all()
    for t in range(6):
        observed = np.zeros(p.shape[1])
        used = got.sample_counts[0, t] > 0
        np.add.at(observed, got.sample_ids[0, t][used], got.sample_counts[0, t][used])
        expected = p[t] * draws
        big = expected >= 5
        obs, exp = observed[big], expected[big]
        if (~big).any():
            obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
        chi2 = ((obs - exp) ** 2 / exp).sum()
        assert chi2 < stats.chi2.ppf(1 - 1e-4, len(obs) - 1), (t, chi2, len(obs))
        z = np.abs(observed - expected) / np.sqrt(expected * (1 - p[t]) + 1e-12)
        assert z[big].max() < 5.5, (t, z[big].max())   # 5.5 sigma: < 1e-6 per cell under a correct sampler


def test_draws_do_not_depend_on_chunking_and_skip_zero_probability_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 50, generator=g) * 3
    logits[:, 7] = -float("inf")                       # probability exactly 0: never drawn
    u = window_uniforms("k", [3, 4], 6, 64)
    ids, counts = draw_samples_at(logits, u)
    parts = [draw_samples_at(logits[a:a + 5], u[a:a + 5]) for a in range(0, 12, 5)]
    assert torch.equal(ids, torch.cat([p[0] for p in parts])) and torch.equal(counts, torch.cat([p[1] for p in parts]))
    assert not ((ids == 7) & (counts > 0)).any()
    assert (counts.sum(1) == 64).all()
    one = torch.full((1, 50), -float("inf"))
    one[0, 49] = 0.0                                   # all mass on the last token, u close to 1
    ids1, counts1 = draw_samples_at(one, torch.tensor([[0.0, 0.5, 1 - 1e-16]], dtype=torch.float64))
    assert ids1.tolist() == [[49, 0, 0]] and counts1.tolist() == [[3, 0, 0]]


def test_sampled_cache_reads_back_draws(sampled_cache):
    r = CacheReader(sampled_cache)
    assert r.sampled and r.k == S and r.manifest["encoding"]["name"] == "sampled"
    (batch,) = list(r.iter_batches(8))
    assert set(batch) == {"window_id", "input_ids", "labels", "target_logprob", "sample_ids", "sample_counts"}
    assert batch["sample_ids"].shape == (8, 16, S) and batch["sample_ids"].dtype == torch.int64
    assert batch["sample_counts"].dtype == torch.int32
    assert (batch["sample_counts"].sum(-1) == S).all()
    assert (batch["target_logprob"] < 0).all()
    ds_batch = next(iter(r.dataset(4, shuffle=True, seed=1)))
    assert {"sample_ids", "sample_counts"} <= set(ds_batch) and "topk_ids" not in ds_batch
    assert not r.verify()


def test_batch_size_chunking_and_workers_give_identical_shards(capsys, tmp_path, tiny_teachers, corpus_dir,
                                                               sampled_cache):
    teacher = tiny_teachers["llama"]
    rc, (other,), _ = produce(capsys, *sampled_args(teacher, corpus_dir, tmp_path / "a", "--batch-size", "4",
                                                     "--logits-chunk", "5"))
    assert rc == 0 and other.name == sampled_cache.name
    # Another batch size runs other matmul shapes, whose float32 sums may differ in the last bit; a
    # uniform that falls within that much of a CDF boundary then picks the neighbouring token. So the
    # draws agree almost everywhere (seeded per window, not per batch), not byte for byte.
    a, b = CacheReader(other).read_shard(0), CacheReader(sampled_cache).read_shard(0)
    same = (a["sample_ids"] == b["sample_ids"]).all(-1) & (a["sample_counts"] == b["sample_counts"]).all(-1)
    assert same.mean() >= 0.95, same.mean()
    for w in (1, 0):   # two workers, the second first: same bytes as one process
        rc, _, _ = produce(capsys, *sampled_args(teacher, corpus_dir, tmp_path / "b", "--batch-size", "2",
                                                 "--num-workers", "2", "--worker-index", str(w)))
        assert rc == 0
    (two,) = [p.parent for p in (tmp_path / "b").glob("*/manifest.json")]
    assert cache_bytes(two) == cache_bytes(sampled_cache)


def test_sampled_with_vllm_is_refused_in_one_line(capsys, tmp_path, tiny_teachers, corpus_dir):
    root = tmp_path / "out"
    args = ["--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--max-windows", "8",
            "--encoding", "sampled", *SMALL, "--backend", "vllm"]
    refused(capsys, root, *args, match="--encoding sampled: needs --backend hf")
    assert not root.exists()


def test_k_is_a_sampled_caches_S_and_must_agree_with_the_S_parameter(capsys, tmp_path, tiny_teachers, corpus_dir):
    """`--k 8 --encoding sampled` draws 8 per position (k is S); a different `S=` is refused in one line."""
    args = ["--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--max-windows", "4",
            "--encoding", "sampled", "--k", "8", *SMALL]
    assert main(["produce", *args, "--out", str(tmp_path / "k8")]) == 0
    (cache,) = [p.parent for p in (tmp_path / "k8").glob("*/manifest.json")]
    reader = CacheReader(cache)
    assert reader.k == 8 and reader.encoding.S == 8
    assert next(iter(reader.dataset(2)))["sample_ids"].shape[-1] == 8
    refused(capsys, tmp_path / "bad", *args, "--encoding-param", "S=16",
            match="--k 8: a sampled cache's k is its S, and --encoding-param S=16 differs")


def test_distill_from_a_sampled_cache_decreases_the_loss(tmp_path, tiny_teachers, sampled_cache):
    out = tmp_path / "kd"
    assert run_trainer("distill", "--student", tiny_teachers["llama_b"], "--cache", sampled_cache, "--out", out,
                       "--steps", 30, "--batch-size", 4, "--lr", 1e-2, "--warmup", 3, "--log-every", 5,
                       "--no-progress") == 0
    train = [e for e in metrics(out) if e["kind"] == "train"]
    # the sampled loss estimates KL + H(teacher): it falls towards H(teacher), not 0
    assert train[-1]["kd"] < 0.85 * train[0]["kd"], (train[0]["kd"], train[-1]["kd"])


def test_distill_refuses_mismatched_loss_and_cache(tmp_path, tiny_teachers, sampled_cache, corpus_dir, capsys):
    base = ["distill", "--student", tiny_teachers["llama_b"], "--out", tmp_path / "x", "--steps", 1, "--no-progress"]
    capsys.readouterr()
    assert run_trainer(*base, "--cache", sampled_cache, "--loss", "forward_kl") == 2
    err = capsys.readouterr().err.strip()
    assert "is a sampled cache" in err and len(err.splitlines()) == 1
    topk = produce_cache(tiny_teachers["llama"], str(corpus_dir), tmp_path / "topk")
    assert run_trainer(*base, "--cache", topk, "--loss", "sampled") == 2
    err = capsys.readouterr().err.strip()
    assert "is a top-k cache" in err and len(err.splitlines()) == 1
    assert run_trainer(*base, "--cache", topk, "--eval-cache", sampled_cache) == 2
    err = capsys.readouterr().err.strip()
    assert "has no top-k to measure KL on" in err and len(err.splitlines()) == 1


def test_evaluate_refuses_a_sampled_cache_in_one_line(tiny_teachers, sampled_cache, capsys):
    capsys.readouterr()
    assert run_trainer("evaluate", "--model", tiny_teachers["llama_b"], "--cache", sampled_cache) == 2
    err = capsys.readouterr().err.strip()
    assert "has no top-k to measure KL on" in err and len(err.splitlines()) == 1 and "Traceback" not in err
