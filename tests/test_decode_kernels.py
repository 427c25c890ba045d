"""The compiled `compact` decoder against its numpy reference: the same bytes out, the same errors.

Both paths sum each row's mass exactly (integers in units of step^2 / 12) and apply the same float32
shift, so equality is exact, not within a tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from test_encodings import make_fitted, realistic_logits, topk_of

from logitcache.encodings import get_encoding, kernels
from logitcache.encodings.bytes import put_frames

pytestmark = pytest.mark.skipif(not kernels.enabled(),
                                reason="compiled loops off (numba missing or LOGITCACHE_NUMBA=0)")


def encode(enc, ids, lp, tail, seq_len):
    b, k = len(ids) // seq_len, ids.shape[-1]
    return enc.encode(ids.reshape(b, seq_len, k), lp.reshape(b, seq_len, k), tail.reshape(b, seq_len))


def assert_paths_agree(enc, cols, k, seq_len):
    fast = enc.decode(cols, k, seq_len, compiled=True)
    ref = enc.decode(cols, k, seq_len, compiled=False)
    for a, b in zip(fast, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), np.nanmax(np.abs(a.astype(np.float64) - b))
    return fast


def with_column(cols: dict, name: str, byte: bytes) -> dict:
    """`cols` with every byte of one window's column `name` set to `byte` (ids far past V)."""
    return {**cols, name: pa.array([byte * len(cols[name][0].as_py())], pa.binary())}


def with_large_codes(cols: dict, name: str, count: int) -> dict:
    """`cols` with a well-formed value frame whose every code delta is 254 (past max_code)."""
    out = dict(cols)
    put_frames(out, name, np.full(count, 254, dtype=np.uint8), np.array([count]), 1)
    return out


def sparse_rows(n: int, k: int, vocab: int, seed: int):
    """Distinct random ids anywhere in a huge vocabulary, Dirichlet values, a tail of 0-50%."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    p = rng.dirichlet(np.full(k, 0.3), size=n) * rng.uniform(0.5, 1.0, size=(n, 1))
    order = np.argsort(-p, axis=1)
    ids, p = np.take_along_axis(ids, order, 1), np.take_along_axis(p, order, 1)
    tail = np.log1p(-p.sum(1))
    return ids.astype(np.int64), np.log(p).astype(np.float32), tail.astype(np.float32)


@pytest.mark.parametrize("vocab,k,seq_len", [(8192, 64, 32), (8192, 1, 16), (1000, 37, 8)])
def test_realistic_rows_decode_identically(vocab, k, seq_len):
    ids, lp, tail = topk_of(realistic_logits(3 * seq_len, vocab, seed=k), k)
    for enc in (make_fitted("compact", vocab), get_encoding("compact", {"vocab_size": vocab})):
        out = assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)
        assert np.array_equal(np.sort(out[0].reshape(-1, k), 1), np.sort(ids, 1))


def test_wide_vocabularies_three_and_four_byte_gaps():
    vocab, k, seq_len = 200_003, 32, 16                       # 3-byte gaps, with a rank table
    logits = realistic_logits(2 * seq_len, vocab, seed=3)
    logits[:, -50:] += 30.0
    ids, lp, tail = topk_of(logits, k)
    enc = make_fitted("compact", vocab)
    assert enc.gap_bytes == 3 and ids.max() > 65535
    assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)

    vocab = (1 << 24) + 3                                     # 4-byte gaps, ids are ranks (no table)
    ids, lp, tail = sparse_rows(2 * seq_len, k, vocab, seed=4)
    enc = get_encoding("compact", {"vocab_size": vocab})
    assert enc.gap_bytes == 4 and enc.ranks.id_of is None
    out = assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)
    assert np.array_equal(np.sort(out[0].reshape(-1, k), 1), np.sort(ids, 1))


def test_fine_step_uses_64_bit_keys():
    vocab, k, seq_len = 1 << 20, 16, 8
    enc = get_encoding("compact", {"vocab_size": vocab, "step": 1e-4})
    assert enc._key_dtype == np.int64                        # 20 rank bits + 14 code bits
    ids, lp, tail = sparse_rows(2 * seq_len, k, vocab, seed=5)
    assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)


def test_edge_rows_decode_identically():
    """k = V with no tail, ties, zeros inside the top-k, one token holding all the mass, a tiny rest."""
    vocab = 50
    ids, lp, tail = topk_of(realistic_logits(16, vocab, seed=2), vocab)
    enc = make_fitted("compact", vocab)
    assert_paths_agree(enc, encode(enc, ids, lp, tail, 8), vocab, 8)

    k, seq_len = 8, 4
    ids = np.tile(np.arange(100, 100 + k), (seq_len, 1))
    lp = np.full((seq_len, k), np.log(0.1), dtype=np.float32)
    tail = np.full(seq_len, np.log(0.2), dtype=np.float32)
    lp[1, 4:], lp[1, :4] = -np.inf, np.log(0.2)
    lp[2], lp[2, 0], tail[2] = -np.inf, 0.0, -np.inf
    lp[3, 0], lp[3, 1:], tail[3] = np.log1p(-1e-7 - 7e-12), np.log(1e-12), np.log(1e-7)
    enc = get_encoding("compact", {})
    out = assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)
    assert out[1][0, 2, 0] == 0.0 and np.all(np.isneginf(out[1][0, 2, 1:]))


def test_corrupt_streams_raise_the_same_error_in_both_paths():
    vocab, k, seq_len = 1000, 8, 4
    ids, lp, tail = topk_of(realistic_logits(seq_len, vocab, seed=8), k)
    enc = get_encoding("compact", {"vocab_size": vocab})
    cols = encode(enc, ids, lp, tail, seq_len)
    for bad in (with_column(cols, "cz_gap_b1", b"\xff"), with_large_codes(cols, "cz_val", seq_len * k)):
        messages = []
        for compiled in (True, False):
            with pytest.raises(ValueError) as err:
                enc.decode(bad, k, seq_len, compiled=compiled)
            messages.append(str(err.value))
        assert messages[0] == messages[1], messages


@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
def test_adaptive_rows_decode_identically(p):
    """Variable-length sets padded to k with the rarest free ranks, also where kept tokens sit among
    those ranks (the padding must step over them), and at V = 200,003 (3-byte gaps)."""
    vocab, k, seq_len = 8192, 64, 32
    ids, lp, tail = topk_of(realistic_logits(2 * seq_len, vocab, seed=11), k)
    ids[::3, -4:] = np.arange(vocab - 4, vocab)          # the least likely kept ids are the rarest ranks
    for enc in (make_fitted("adaptive", vocab, p=p), get_encoding("adaptive", {"p": p, "vocab_size": vocab})):
        out = assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)
        if p < 1.0:
            assert np.isneginf(out[1]).any()                 # some rows were padded
    vocab, k = 200_003, 16
    ids, lp, tail = sparse_rows(2 * seq_len, k, vocab, seed=12)
    enc = get_encoding("adaptive", {"p": p, "vocab_size": vocab})
    assert enc.gap_bytes == 3
    assert_paths_agree(enc, encode(enc, ids, lp, tail, seq_len), k, seq_len)


def test_adaptive_padding_next_to_kept_rare_tokens_and_corruption():
    vocab, k, seq_len = 50, 8, 4
    ids = np.array([[49, 48, 47, 1, 2, 3, 4, 5]] * seq_len)
    ids[1] = [49, 47, 45, 1, 2, 3, 4, 5]                     # holes between the kept rare ranks
    lp = np.log(np.array([[0.5, 0.3, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01]] * seq_len, dtype=np.float32))
    tail = np.log(np.full(seq_len, 0.05, dtype=np.float32))
    enc = get_encoding("adaptive", {"p": 0.85, "vocab_size": vocab})
    cols = encode(enc, ids, lp, tail, seq_len)
    out = assert_paths_agree(enc, cols, k, seq_len)
    assert out[0][0, 1, 3:].tolist() == [48, 46, 44, 43, 42]
    kept = len(cols["ad_gap_b0"][0].as_py())
    for bad in (with_column(cols, "ad_gap_b0", b"\xff"), with_large_codes(cols, "ad_val", kept)):
        messages = []
        for compiled in (True, False):
            with pytest.raises(ValueError) as err:
                get_encoding("adaptive", {"p": 0.85, "vocab_size": vocab}).decode(bad, k, seq_len, compiled=compiled)
            messages.append(str(err.value))
        assert messages[0] == messages[1], messages


def test_environment_switch_selects_the_numpy_path(monkeypatch):
    monkeypatch.setenv("LOGITCACHE_NUMBA", "0")
    kernels._loops.cache_clear()
    try:
        assert not kernels.enabled()
        ids, lp, tail = topk_of(realistic_logits(8, 300, seed=1), 16)
        enc = get_encoding("compact", {"vocab_size": 300})
        out = enc.decode(encode(enc, ids, lp, tail, 8), 16, 8)       # the numpy path, no numba call
        assert np.array_equal(np.sort(out[0].reshape(-1, 16), 1), np.sort(ids, 1))
    finally:
        monkeypatch.delenv("LOGITCACHE_NUMBA")
        kernels._loops.cache_clear()
    assert kernels.enabled()


@pytest.mark.parametrize("encoding,params", [("compact", {}), ("adaptive", {"p": 0.9})])
def test_dataset_compiles_the_loops_before_workers_fork(tmp_path, encoding, params):
    """`CacheReader.dataset` compiles the loops for the cache's array types in the calling process,
    so forked DataLoader workers inherit them: reading real shards afterwards compiles nothing new."""
    from test_writer import VOCAB, make_header, write_cache

    from logitcache import format as fmt

    header = make_header(encoding=encoding, num_windows=20, rows_per_shard=8)
    header["encoding"]["params"] = {**params, "vocab_size": VOCAB}
    header["key"] = fmt.cache_key(header["teacher"], header["tokenizer"], header["data"], header["k"],
                                  header["encoding"])
    write_cache(tmp_path / "cache", header)
    script = textwrap.dedent(f"""
        import json
        from logitcache.encodings import kernels
        from logitcache.read.reader import CacheReader
        reader = CacheReader({str(tmp_path / "cache")!r})
        loops = kernels._loops()
        compiled = lambda: [len(f.signatures) for f in loops]
        before = compiled()
        reader.dataset(4)
        warmed = compiled()
        rows = sum(len(b["topk_ids"]) for b in reader.iter_batches(4))
        print(json.dumps({{"before": before, "warmed": warmed, "after": compiled(), "rows": rows}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"before": [0, 0], "warmed": [1, 1], "after": [1, 1], "rows": 20}, got
