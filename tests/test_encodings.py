"""Compact codecs (compact, adaptive, sampled): round trips, edge cases, KL bounds, Parquet, params."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from logitcache.encodings import available_encodings, get_encoding
from logitcache.encodings.bytes import (
    RankMap,
    fit_rank_order,
    from_planes,
    gaps_from_sorted,
    pack_rank_order,
    sorted_from_gaps,
    to_planes,
    unpack_rank_order,
)
from logitcache.encodings.compact import coarse_kl
from logitcache.encodings.sampled import draw_samples
from logitcache.errors import UserError
from trainer.losses import forward_kl

TOPK = ("compact", "adaptive")


# ---------------------------------------------------------------------------
# test data
# ---------------------------------------------------------------------------


def topk_of(logits: np.ndarray, k: int):
    """Exact top-k (descending) and tail of full logits [N, V], computed in float64."""
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    if k == logits.shape[1]:
        idx = np.argsort(-lp, axis=1, kind="stable")
    else:
        idx = np.argpartition(-lp, k - 1, axis=1)[:, :k]
        idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(lp, idx, 1), axis=1, kind="stable"), 1)
    vals = np.take_along_axis(lp, idx, 1)
    rest = lp.copy()
    np.put_along_axis(rest, idx, -np.inf, 1)
    with np.errstate(divide="ignore"):
        tail = np.logaddexp.reduce(rest, axis=1) if k < logits.shape[1] else np.full(len(lp), -np.inf)
    return idx.astype(np.int64), vals.astype(np.float32), tail.astype(np.float32)


def realistic_logits(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Language-model-like rows: a Zipf prior over ids (low ids frequent) plus per-row structure,
    with sharpness varying from flat (top-1 ~ 0.05) to confident (top-1 > 0.999)."""
    rng = np.random.default_rng(seed)
    prior = -1.1 * np.log1p(np.arange(vocab))
    sharp = rng.choice([0.6, 1.0, 1.5, 2.5, 4.0, 8.0], size=(n, 1))
    logits = prior[None, :] * 0.6 + rng.standard_normal((n, vocab)) * sharp
    return logits


def make_fitted(name: str, vocab: int, seed: int = 0, **params):
    enc = get_encoding(name, params)
    corpus = np.random.default_rng(seed).zipf(1.3, size=200_000) % vocab
    return get_encoding(name, json.loads(json.dumps(enc.fit(corpus, vocab))))


def roundtrip(enc, ids, lp, tail, seq_len: int):
    b = len(ids) // seq_len
    k = ids.shape[-1]
    cols = enc.encode(ids.reshape(b, seq_len, k), lp.reshape(b, seq_len, k), tail.reshape(b, seq_len))
    assert set(cols) == {f.name for f in enc.arrow_fields(k, seq_len)}
    return cols, enc.decode(cols, k, seq_len)


def assert_normalised(lp, tail, tol=1e-6):
    total = np.exp(lp.astype(np.float64)).sum(axis=-1) + np.exp(tail.astype(np.float64))
    assert np.abs(total - 1).max() <= tol, np.abs(total - 1).max()


def assert_same_sets(ids_a, ids_b):
    k = ids_a.shape[-1]
    assert np.array_equal(np.sort(ids_a.reshape(-1, k), 1), np.sort(ids_b.reshape(-1, k), 1))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def test_registered():
    assert {"compact", "adaptive", "sampled"} <= set(available_encodings())


@pytest.mark.parametrize("nbytes,top", [(1, 255), (2, 65535), (3, 2**24 - 1), (4, 2**32 - 1)])
def test_byte_planes_roundtrip(nbytes, top):
    x = np.array([0, 1, top, top // 3, 7], dtype=np.uint64)
    planes = to_planes(x, nbytes)
    assert len(planes) == nbytes and all(p.dtype == np.uint8 for p in planes)
    assert np.array_equal(from_planes(planes, nbytes).astype(np.uint64), x)


def test_gaps_roundtrip_ragged():
    sizes = np.array([3, 1, 0, 4])
    ranks = np.array([0, 5, 9, 2, 1, 2, 3, 70000])
    starts = np.zeros(len(ranks), bool)
    starts[[0, 3, 4]] = True
    gaps = gaps_from_sorted(ranks, starts)
    assert gaps.tolist() == [0, 4, 3, 2, 1, 0, 0, 69996]
    assert np.array_equal(sorted_from_gaps(gaps, sizes), ranks)


def test_rank_table_fit_pack_unpack_large_vocab():
    vocab = 200_000
    rng = np.random.default_rng(1)
    tokens = np.concatenate([rng.integers(0, vocab, 300_000), np.full(1000, 150_000), np.full(500, 3)])
    order = fit_rank_order(tokens, vocab)
    assert order[0] == 150_000 and order[1] == 3
    text = pack_rank_order(order)
    assert np.array_equal(unpack_rank_order(text, vocab), order)
    rm = RankMap(order, vocab)
    ids = np.array([150_000, 3, 0, vocab - 1])
    assert np.array_equal(rm.ids(rm.ranks(ids)), ids)
    assert rm.ranks(np.array([150_000, 3])).tolist() == [0, 1]
    with pytest.raises(ValueError):
        unpack_rank_order(text, 1000)               # table does not fit the vocabulary
    with pytest.raises(ValueError):
        fit_rank_order(np.array([vocab]), vocab)


def test_fit_is_deterministic_and_params_are_json():
    enc = get_encoding("compact", {})
    toks = np.random.default_rng(0).integers(0, 5000, 50_000)
    a, b = enc.fit(toks, 5000), enc.fit(toks.copy(), 5000)
    assert a == b and json.loads(json.dumps(a)) == a
    assert get_encoding("compact", a).params() == a


# ---------------------------------------------------------------------------
# compact and adaptive
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fitted", [True, False])
def test_compact_kl_bounds_on_realistic_distributions(fitted):
    vocab, k, seq_len = 8192, 64, 128
    logits = realistic_logits(4 * seq_len, vocab)
    ids, lp, tail = topk_of(logits, k)
    enc = make_fitted("compact", vocab) if fitted else get_encoding("compact", {})
    _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
    assert ids2.shape == (4, seq_len, k) and ids2.dtype == np.int64 and lp2.dtype == np.float32
    assert_same_sets(ids, ids2)
    assert_normalised(lp2, tail2)
    assert np.all(np.diff(lp2, axis=-1) <= 0), "decoded log-probs must be descending"
    kl = coarse_kl(ids, lp, tail, ids2, lp2, tail2)
    assert kl.mean() <= 1e-3 and kl.max() <= 5e-3, (kl.mean(), kl.max())
    # the budget formula (k+1) step^2 / 6 predicts the mean within a factor of two
    assert 0.5 < kl.mean() / ((k + 1) * enc.step ** 2 / 6) < 2.0


def test_compact_vocab_above_65535_with_and_without_table():
    vocab, k, seq_len = 200_003, 32, 16
    logits = realistic_logits(2 * seq_len, vocab, seed=3)
    logits[:, -50:] += 30.0                          # push the largest ids into the top-k
    ids, lp, tail = topk_of(logits, k)
    assert ids.max() > 65535
    for enc in (make_fitted("compact", vocab), get_encoding("compact", {})):
        cols, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
        assert_same_sets(ids, ids2)
        assert_normalised(lp2, tail2)
        assert coarse_kl(ids, lp, tail, ids2, lp2, tail2).max() < 5e-3


@pytest.mark.parametrize("name", TOPK)
def test_k_equals_vocab_empty_tail(name):
    vocab = 50
    logits = realistic_logits(2 * 8, vocab, seed=2)
    ids, lp, tail = topk_of(logits, vocab)
    assert np.all(np.isneginf(tail))
    enc = make_fitted(name, vocab) if name == "compact" else get_encoding(name, {"p": 1.0, "vocab_size": vocab})
    _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, 8)
    assert np.all(np.isneginf(tail2))
    assert_same_sets(ids, ids2)
    assert_normalised(lp2, tail2)
    assert coarse_kl(ids, lp, tail, ids2, lp2, tail2).max() < 5e-3


@pytest.mark.parametrize("name", TOPK)
def test_ties_and_zero_probabilities(name):
    k, seq_len = 8, 4
    ids = np.tile(np.arange(100, 100 + k), (seq_len, 1))
    lp = np.full((seq_len, k), np.log(0.1), dtype=np.float32)          # 8 x 0.1 ties, tail 0.2
    tail = np.full(seq_len, np.log(0.2), dtype=np.float32)
    lp[1, 4:] = -np.inf                                                  # zeros inside the top-k
    lp[1, :4] = np.log(0.2)
    lp[2] = -np.inf                                                      # one token holds everything
    lp[2, 0] = 0.0
    tail[2] = -np.inf
    lp[3, 0] = np.log1p(-1e-7 - 7 * 1e-12)                               # confident, tiny rest
    lp[3, 1:] = np.log(1e-12)
    tail[3] = np.log(1e-7)
    enc = get_encoding(name, {"p": 1.0, "vocab_size": 1000} if name == "adaptive" else {})
    _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
    assert_normalised(lp2, tail2)
    assert np.all(lp2[0, 0] == lp2[0, 0, 0])                             # ties decode equal
    np.testing.assert_allclose(np.exp(lp2[0, 0]), 0.1, rtol=0.01)
    np.testing.assert_allclose(np.exp(tail2[0, 0]), 0.2, rtol=0.02)
    assert np.sum(np.isneginf(lp2[0, 1])) == 4                           # zeros stay exactly zero
    assert sorted(ids2[0, 1, :4].tolist()) == [100, 101, 102, 103]
    assert lp2[0, 2, 0] == 0.0 and ids2[0, 2, 0] == 100 and np.all(np.isneginf(lp2[0, 2, 1:]))
    assert np.isneginf(tail2[0, 2])
    np.testing.assert_allclose(tail2[0, 3], np.log(1e-7), atol=0.02)     # tiny tail keeps ~2% precision
    kl = coarse_kl(ids, lp, tail, ids2, lp2, tail2)
    assert np.all(kl < 5e-3), kl


def test_tiny_topk_mass_keeps_relative_precision():
    """Flat huge vocabulary: the top-k holds 1e-4 of the mass; storing log T alone would lose it."""
    k, seq_len = 16, 2
    ids = np.tile(np.arange(k), (seq_len, 1))
    lp = np.full((seq_len, k), np.log(1e-4 / k), dtype=np.float32)
    tail = np.full(seq_len, np.log1p(-1e-4), dtype=np.float32)
    enc = get_encoding("compact", {"vocab_size": 300_000})
    _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
    np.testing.assert_allclose(np.exp(lp2.astype(np.float64)).sum(-1), 1e-4, rtol=0.02)
    assert coarse_kl(ids, lp, tail, ids2, lp2, tail2).max() < 1e-5


@pytest.mark.parametrize("name", TOPK)
def test_invalid_inputs_raise(name):
    enc = get_encoding(name, {"vocab_size": 100})
    ids = np.array([[[1, 2, 3]]])
    lp = np.log(np.array([[[0.5, 0.2, 0.1]]], dtype=np.float32))
    tail = np.log(np.array([[0.2]], dtype=np.float32))
    with pytest.raises(ValueError):
        enc.encode(np.array([[[1, 1, 3]]]), lp, tail)        # duplicate id
    with pytest.raises(ValueError):
        enc.encode(ids, np.full_like(lp, np.nan), tail)
    with pytest.raises(ValueError):
        enc.encode(np.array([[[1, 2, 100]]]), lp, tail)      # id outside the vocabulary
    with pytest.raises(UserError):
        get_encoding(name, {"step": 0.0})
    with pytest.raises(UserError):
        get_encoding(name, {"vocab_size": 100, "rank_table": "zstd+b64:AAAA"})


@pytest.mark.parametrize("name", TOPK + ("sampled",))
def test_parquet_roundtrip_and_json_params(name):
    vocab, k, seq_len, rows = 8192, 16, 32, 5
    logits = realistic_logits(rows * seq_len, vocab, seed=4)
    enc = make_fitted(name, vocab, **({"S": k} if name == "sampled" else {}))
    if name == "sampled":
        a, b = draw_samples(logits.astype(np.float32), k, torch.Generator().manual_seed(0))
    else:
        a, b, tail = topk_of(logits, k)
    args = (a.reshape(rows, seq_len, k), b.reshape(rows, seq_len, k))
    if name != "sampled":
        args += (tail.reshape(rows, seq_len),)
    cols = enc.encode(*args)
    table = pa.table(cols, schema=pa.schema(enc.arrow_fields(k, seq_len)))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=2, use_dictionary=False)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert any(isinstance(back.column(c), pa.ChunkedArray) and back.column(c).num_chunks > 1 for c in cols)
    again = get_encoding(name, json.loads(json.dumps(enc.params())))
    direct = enc.decode(cols, k, seq_len)
    via_parquet = again.decode({c: back.column(c) for c in back.column_names}, k, seq_len)
    sliced = enc.decode({c: v.slice(1, 3) for c, v in cols.items()}, k, seq_len)    # non-zero offsets
    for x, y, z in zip(direct, via_parquet, sliced):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x[1:4], z)


def test_adaptive_folds_dropped_mass_into_the_tail():
    vocab, k, seq_len = 8192, 64, 64
    logits = realistic_logits(2 * seq_len, vocab, seed=5)
    ids, lp, tail = topk_of(logits, k)
    enc = make_fitted("adaptive", vocab, p=0.9)
    _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
    ids2, lp2, tail2 = ids2.reshape(-1, k), lp2.reshape(-1, k), tail2.reshape(-1)
    assert_normalised(lp2, tail2)
    kept = ~np.isneginf(lp2)
    n_kept = kept.sum(1)
    cum = np.cumsum(np.exp(lp.astype(np.float64)), axis=1)
    expect = np.minimum(1 + (cum < 0.9).sum(1), k)
    assert np.array_equal(n_kept, expect)
    assert 1 <= n_kept.min() and n_kept.min() < k                       # the data does exercise it
    # kept tokens are the most probable prefix; padding: distinct ids outside the kept set
    for r in range(len(ids)):
        assert set(ids2[r, :n_kept[r]]) == set(ids[r, :n_kept[r]])
        assert len(set(ids2[r].tolist())) == k
    kl = coarse_kl(ids, lp, tail, ids2, lp2, tail2)
    assert kl.mean() <= 1e-3 and kl.max() <= 5e-3
    # p = 1 keeps everything and decodes exactly like compact
    full = make_fitted("adaptive", vocab, p=1.0)
    comp = make_fitted("compact", vocab)
    for x, y in zip(roundtrip(full, ids, lp, tail, seq_len)[1], roundtrip(comp, ids, lp, tail, seq_len)[1]):
        np.testing.assert_array_equal(x, y)


def test_adaptive_padding_is_exact_for_forward_kl():
    """Padding slots are distinct rare ids with teacher probability 0: for a student that gives
    them no mass, the padded [N, k] rows give the tail-bucket forward KL (value and gradient) of
    the kept tokens + tail alone."""
    vocab, k, seq_len = 300, 32, 16
    logits = realistic_logits(seq_len, vocab, seed=6)
    ids, lp, tail = topk_of(logits, k)
    enc = get_encoding("adaptive", {"p": 0.8, "vocab_size": vocab})
    _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
    ids2, lp2, tail2 = ids2.reshape(-1, k), lp2.reshape(-1, k), tail2.reshape(-1)
    student = torch.randn(seq_len, vocab, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.bool)
    padded_rows = 0
    for r in range(seq_len):
        n = int((~np.isneginf(lp2[r])).sum())
        padded_rows += n < k
        z = student[r:r + 1].clone()
        z[0, ids2[r, n:]] = -1e4                     # the student gives the padding ids no mass
        z1 = z.clone().requires_grad_(True)
        a = forward_kl(z1, torch.from_numpy(ids2[r:r + 1]), torch.from_numpy(lp2[r:r + 1]).double(),
                       torch.from_numpy(tail2[r:r + 1]).double(), one)
        a.backward()
        z2 = z.clone().requires_grad_(True)
        b = forward_kl(z2, torch.from_numpy(ids2[r:r + 1, :n]), torch.from_numpy(lp2[r:r + 1, :n]).double(),
                       torch.from_numpy(tail2[r:r + 1]).double(), one)
        b.backward()
        assert torch.allclose(a, b, atol=1e-10) and torch.allclose(z1.grad, z2.grad, atol=1e-10)
    assert padded_rows > 0


def test_adaptive_padding_avoids_kept_rare_tokens_and_needs_vocab():
    vocab, k, seq_len = 50, 8, 4
    ids = np.array([[49, 48, 47, 1, 2, 3, 4, 5]] * seq_len)       # kept tokens at the rarest ranks
    lp = np.log(np.array([[0.5, 0.3, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01]] * seq_len, dtype=np.float32))
    tail = np.log(np.full(seq_len, 0.05, dtype=np.float32))
    enc = get_encoding("adaptive", {"p": 0.85, "vocab_size": vocab})
    _, (ids2, lp2, _) = roundtrip(enc, ids, lp, tail, seq_len)
    ids2, lp2 = ids2.reshape(-1, k), lp2.reshape(-1, k)
    assert sorted(ids2[0, :3].tolist()) == [47, 48, 49] and np.all(np.isneginf(lp2[0, 3:]))
    assert ids2[0, 3:].tolist() == [46, 45, 44, 43, 42] and len(set(ids2[0].tolist())) == k
    with pytest.raises(ValueError, match="vocab_size"):
        get_encoding("adaptive", {"p": 0.9}).encode(ids.reshape(1, seq_len, k), lp.reshape(1, seq_len, k),
                                                    tail.reshape(1, seq_len))


# ---------------------------------------------------------------------------
# sampled
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vocab,S", [(8192, 16), (200_000, 16), (40, 1), (40, 300)])
def test_sampled_roundtrip(vocab, S):
    seq_len, rows = 16, 3
    rng = np.random.default_rng(7)
    logits = realistic_logits(rows * seq_len, vocab, seed=7).astype(np.float32)
    if vocab > 65535:
        logits[:, -10:] += 40.0
    logits[0] = -np.inf
    logits[0, vocab - 1] = 0.0                       # one certain token: a single id with count S
    ids, counts = draw_samples(logits, S, torch.Generator().manual_seed(int(rng.integers(1 << 30))))
    for enc in (make_fitted("sampled", vocab, S=S), get_encoding("sampled", {"S": S})):
        cols = enc.encode(ids.reshape(rows, seq_len, S), counts.reshape(rows, seq_len, S))
        ids2, counts2 = enc.decode(cols, S, seq_len)
        assert ids2.shape == counts2.shape == (rows, seq_len, S) and counts2.dtype == np.int32
        ids2, counts2 = ids2.reshape(-1, S), counts2.reshape(-1, S)
        assert np.all(counts2.sum(1) == S)
        assert np.all(ids2[counts2 == 0] == 0)
        assert ids2[0, 0] == vocab - 1 and counts2[0, 0] == S
        for r in range(rows * seq_len):
            before = dict(zip(ids[r][counts[r] > 0].tolist(), counts[r][counts[r] > 0].tolist()))
            after = dict(zip(ids2[r][counts2[r] > 0].tolist(), counts2[r][counts2[r] > 0].tolist()))
            assert before == after
    if vocab > 65535:
        assert ids.max() > 65535


def test_sampled_rejects_bad_counts():
    enc = get_encoding("sampled", {"S": 4})
    ids = np.array([[[1, 2, 0, 0]]])
    with pytest.raises(ValueError):
        enc.encode(ids, np.array([[[2, 1, 0, 0]]]))          # does not sum to S
    with pytest.raises(ValueError):
        enc.encode(np.array([[[1, 1, 0, 0]]]), np.array([[[2, 2, 0, 0]]]))   # duplicate id


@pytest.mark.parametrize("name", TOPK + ("sampled",))
def test_corrupt_streams_are_rejected(name):
    """Readers get shards from strangers: out-of-range ids or codes and inconsistent lengths raise."""
    vocab, k, seq_len = 1000, 8, 4
    logits = realistic_logits(seq_len, vocab, seed=8)
    enc = get_encoding(name, {"vocab_size": vocab, **({"S": k} if name == "sampled" else {})})
    if name == "sampled":
        cols = enc.encode(*[a.reshape(1, seq_len, k) for a in draw_samples(logits.astype(np.float32), k)])
    else:
        ids, lp, tail = topk_of(logits, k)
        cols = enc.encode(ids.reshape(1, seq_len, k), lp.reshape(1, seq_len, k), tail.reshape(1, seq_len))
    gap_hi = [c for c in cols if "gap" in c][-1]
    first = [c for c in cols if c.endswith("_b0")][0]
    for column, mutate in [(gap_hi, lambda b: b"\xff" * len(b)),     # ids far beyond the vocabulary
                           (first, lambda b: b[:-1])]:                 # a stream one element short
        bad = dict(cols)
        bad[column] = pa.array([mutate(cols[column][0].as_py())], pa.binary())
        with pytest.raises(ValueError):
            enc.decode(bad, k, seq_len)
    if name != "sampled":
        val = [c for c in cols if "val" in c][0]
        bad = dict(cols)
        bad[val] = pa.array([b"\xfe" * len(cols[val][0].as_py())], pa.binary())   # code above cmax
        with pytest.raises(ValueError):
            enc.decode(bad, k, seq_len)


def test_hostile_frame_header_is_refused_before_allocating():
    """A zstd frame may declare any content size; python-zstandard would allocate it."""
    import zstandard

    vocab, k, seq_len = 1000, 8, 4
    ids, lp, tail = topk_of(realistic_logits(seq_len, vocab, seed=9), k)
    enc = get_encoding("compact", {"vocab_size": vocab})
    cols = enc.encode(ids.reshape(1, seq_len, k), lp.reshape(1, seq_len, k), tail.reshape(1, seq_len))
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 50_000_000)     # 50 MB declared, ~1.6 kB stored
    with pytest.raises(ValueError, match="declares"):
        enc.decode({**cols, "cz_val": pa.array([bomb], pa.binary())}, k, seq_len)


@pytest.mark.parametrize("name", TOPK)
def test_fine_step_uses_two_byte_codes(name):
    vocab, k, seq_len = 8192, 64, 32
    ids, lp, tail = topk_of(realistic_logits(2 * seq_len, vocab, seed=10), k)
    coarse = get_encoding(name, {"vocab_size": vocab, **({"p": 1.0} if name == "adaptive" else {})})
    fine = get_encoding(name, {"vocab_size": vocab, "step": 0.002, **({"p": 1.0} if name == "adaptive" else {})})
    assert coarse.code_bytes == 1 and fine.code_bytes == 2
    kls = []
    for enc in (coarse, fine):
        _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, seq_len)
        assert_same_sets(ids, ids2)
        assert_normalised(lp2, tail2)
        kls.append(coarse_kl(ids, lp, tail, ids2, lp2, tail2).mean())
    assert kls[1] < kls[0] / 10                     # KL ~ step^2: (0.009 / 0.002)^2 ~ 20


def test_shipped_parquet_level_is_declared():
    for name in ("compact", "adaptive", "sampled"):
        assert get_encoding(name, {"vocab_size": 100}).parquet_level == 9


@pytest.mark.parametrize("name", TOPK + ("sampled",))
def test_no_rows_and_k_one(name):
    vocab = 100
    enc = get_encoding(name, {"vocab_size": vocab, **({"S": 1} if name == "sampled" else {})})
    empty = (np.zeros((0, 4, 1), np.int64), np.zeros((0, 4, 1), np.int64 if name == "sampled" else np.float32))
    if name != "sampled":
        empty += (np.zeros((0, 4), np.float32),)
    assert all(a.shape[0] == 0 for a in enc.decode(enc.encode(*empty), 1, 4))
    if name != "sampled":
        ids, lp, tail = topk_of(realistic_logits(8, vocab, seed=11), 1)
        _, (ids2, lp2, tail2) = roundtrip(enc, ids, lp, tail, 4)
        assert np.array_equal(ids2.reshape(-1), ids.reshape(-1))
        assert_normalised(lp2, tail2)


@pytest.mark.parametrize("name", TOPK)
def test_through_cache_writer_and_reader(tmp_path, name):
    """A cache written by CacheWriter with a fitted encoding reads back through CacheReader as the
    encoding decodes it directly, and within the KL budget of the exact arrays."""
    from test_writer import VOCAB, make_header, synthetic_shard

    from logitcache import format as fmt
    from logitcache.producer.writer import CacheWriter
    from logitcache.read.reader import CacheReader

    h = make_header(num_windows=40, rows_per_shard=16)
    params = get_encoding(name, {}).fit(np.arange(VOCAB).repeat(np.arange(VOCAB) % 7 + 1), VOCAB)
    h["encoding"] = {"name": name, "params": params}
    h["key"] = fmt.cache_key(h["teacher"], h["tokenizer"], h["data"], h["k"], h["encoding"])
    w = CacheWriter(tmp_path, h)
    shards = [synthetic_shard(h, i) for i in range(h["num_shards"])]
    for i, arrays in enumerate(shards):
        w.write_shard(i, **arrays)
    w.finish()
    enc = get_encoding(name, params)
    batch = next(iter(CacheReader(tmp_path).iter_batches(40)))
    ref = {key: np.concatenate([s[key] for s in shards]) for key in shards[0]}
    direct = enc.decode(enc.encode(ref["topk_ids"], ref["topk_logprobs"], ref["tail_logmass"]), h["k"], 16)
    for key, want in zip(("topk_ids", "topk_logprobs", "tail_logmass"), direct):
        np.testing.assert_array_equal(batch[key].numpy(), want)
    kl = coarse_kl(ref["topk_ids"], ref["topk_logprobs"], ref["tail_logmass"],
                   batch["topk_ids"].numpy(), batch["topk_logprobs"].numpy(), batch["tail_logmass"].numpy())
    assert kl.mean() < 1e-3 and kl.max() < 5e-3


# ---------------------------------------------------------------------------
# edge cases, in every encoding, through Parquet
# ---------------------------------------------------------------------------

EDGE_CASES = ("empty_tail", "k_equals_vocab", "ties", "neg_inf", "vocab_above_65535", "one_token")


def edge_case(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids [8, k], log-probs [8, k] descending, tail [8], vocab) for one edge case."""
    n, k, vocab = 8, 8, 1000
    if case == "k_equals_vocab":
        k = vocab = 12
    if case == "vocab_above_65535":
        vocab = 200_003
    logits = realistic_logits(n, vocab, seed=5)
    if case == "vocab_above_65535":
        logits[:, -40:] += 30.0                       # the largest ids win the top-k
    ids, lp, tail = topk_of(logits, k)
    if case == "empty_tail":                          # all mass inside the top-k though k < V
        lp = (lp - np.logaddexp.reduce(lp.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
        tail = np.full(n, -np.inf, np.float32)
    elif case == "ties":                              # k equal values, tail twice one of them
        lp = np.full((n, k), np.log(1 / (k + 2)), np.float32)
        tail = np.full(n, np.log(2 / (k + 2)), np.float32)
    elif case == "neg_inf":                           # zeros inside the top-k, and a top-k of zeros
        lp[:, k // 2:] = -np.inf
        lp[:, :k // 2] = (lp[:, :k // 2] - np.logaddexp.reduce(lp[:, :k // 2].astype(np.float64), axis=1,
                                                               keepdims=True) + np.log(0.9)).astype(np.float32)
        tail[:] = np.log(0.1)
        lp[-1], tail[-1] = -np.inf, 0.0
    elif case == "one_token":                         # the whole mass on one token
        lp[:, 1:], lp[:, 0], tail[:] = -np.inf, 0.0, -np.inf
    return ids, lp, tail, vocab


def parquet_roundtrip(enc, arrays: tuple, k: int, seq_len: int):
    """Encode, write Parquet as the cache writer does, read back, decode."""
    b = len(arrays[0]) // seq_len
    shaped = [a.reshape(b, seq_len, *a.shape[1:]) for a in arrays]
    table = pa.table(enc.encode(*shaped), schema=pa.schema(enc.arrow_fields(k, seq_len)))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1, compression="zstd", use_dictionary=False, version="2.6")
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    return enc.decode({c: back.column(c) for c in back.column_names}, k, seq_len)


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("name", ("fp32", "fp16") + TOPK)
def test_topk_edge_cases_round_trip(name, case):
    """fp32 is bit-exact; fp16 keeps ids and -inf exactly and values to fp16 rounding (rel 2**-11);
    compact/adaptive keep every nonzero id, zeros as exact zeros, a proper distribution (1e-6) and
    KL(exact || decoded) under 5e-3 nats (their per-position bound at the default step, see
    test_compact_kl_bounds_on_realistic_distributions)."""
    ids, lp, tail, vocab = edge_case(case)
    k = ids.shape[1]
    enc = make_fitted(name, vocab) if name in TOPK else get_encoding(name)
    ids2, lp2, tail2 = (a.reshape(len(ids), *a.shape[2:]) for a in parquet_roundtrip(enc, (ids, lp, tail), k, 4))
    if name == "fp32":
        assert np.array_equal(ids2, ids) and np.array_equal(lp2, lp) and np.array_equal(tail2, tail)
        return
    if name == "fp16":
        assert np.array_equal(ids2, ids) and np.array_equal(tail2, tail)
        assert np.array_equal(np.isneginf(lp2), np.isneginf(lp))
        fin = np.isfinite(lp)
        np.testing.assert_allclose(lp2[fin], lp[fin], rtol=2 ** -11, atol=1e-7)
        return
    assert_normalised(lp2, tail2)
    kl = coarse_kl(ids, lp, tail, ids2, lp2, tail2)
    assert np.isfinite(kl).all() and kl.max() < 5e-3, kl.max()
    kept = ~np.isneginf(lp2)
    for r in range(len(ids)):
        nonzero = set(ids[r][np.isfinite(lp[r])].tolist())
        got = set(ids2[r][kept[r]].tolist())
        assert got <= nonzero                          # a decoded nonzero is a true nonzero
        if name == "compact":
            assert got == nonzero                      # compact keeps them all; adaptive folds some
        assert len(set(ids2[r].tolist())) == k         # distinct ids in every row (padding included)
    if name == "compact":
        assert np.array_equal(np.isneginf(tail2), np.isneginf(tail))
    else:                                              # adaptive adds dropped mass to the tail
        assert not (np.isneginf(tail2) & ~np.isneginf(tail)).any()


@pytest.mark.parametrize("case", EDGE_CASES)
def test_sampled_edge_cases_round_trip(case):
    """Draws of each edge case's distribution, through Parquet: every (id, count) pair exactly.

    "empty_tail": logits finite on 8 tokens only; "k_equals_vocab": S = 64 draws over a 12-token
    vocabulary (every id can be drawn); "ties": uniform logits; "neg_inf": half the vocabulary at
    -inf (never drawn); "one_token": one finite logit, so one id with count S."""
    vocab = {"k_equals_vocab": 12, "vocab_above_65535": 200_003}.get(case, 1000)
    S = 64 if case == "k_equals_vocab" else 16
    logits = realistic_logits(8, vocab, seed=9).astype(np.float32)
    if case == "empty_tail":
        logits[:, 8:] = -np.inf
    elif case == "ties":
        logits[:] = 0.0
    elif case == "neg_inf":
        logits[:, ::2] = -np.inf
    elif case == "vocab_above_65535":
        logits[:, -40:] += 30.0
    elif case == "one_token":
        logits[:] = -np.inf
        logits[:, 7] = 1.0
    ids, counts = draw_samples(logits, S, torch.Generator().manual_seed(3))
    enc = make_fitted("sampled", vocab, S=S)
    ids2, counts2 = (a.reshape(8, S) for a in parquet_roundtrip(enc, (ids, counts), S, 4))
    for r in range(8):
        before = dict(zip(ids[r][counts[r] > 0].tolist(), counts[r][counts[r] > 0].tolist()))
        after = dict(zip(ids2[r][counts2[r] > 0].tolist(), counts2[r][counts2[r] > 0].tolist()))
        assert before == after
        if case == "neg_inf":
            assert all(i % 2 == 1 for i in after)
        if case == "one_token":
            assert after == {7: S}
        if case == "empty_tail":
            assert max(after) < 8
    if case == "vocab_above_65535":
        assert ids2.max() > 65535
