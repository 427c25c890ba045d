"""DistillKit interop: `logitcache export --to distillkit` and `logitcache import --from distillkit`.

Captures are built here by our own encoder (tests/test_distillkit_codec.py checks it bit by bit against
hand-computed bytes): the capture layout (n tokens, n - 1 positions, rows of their own length), the
packed layout (attention_mask segments, labels), the legacy and the raw layouts. Round trips
ours -> DistillKit -> ours keep the windows and the ids exactly and the log-probs within each
configuration's error: exact for an all-exact fp32 configuration (the tail then within float32
rounding of the top-k, |dT| <= 1e-6), bf16 rounding for exact values, the least-squares fit's own
residual for polynomial values. Bad input is one line and leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_axolotl_interop import check_same_cache, everything, leftovers, one_line_error
from test_distillkit_codec import lstsq_residual
from test_produce import one_thread  # noqa: F401  (fixture)

from logitcache import CacheReader
from logitcache.backends.vllm import TAIL_FLOOR
from logitcache.cli import main
from logitcache.errors import UserError
from logitcache.interop import ExportSettings, ImportSettings, export_distillkit, import_distillkit
from logitcache.interop import distillkit_codec as codec
from logitcache.interop.distillkit_config import (
    CONFIG_FILE,
    budget,
    fit_preset,
    parse_compression,
    parse_legacy,
    yaml_text,
)
from logitcache.producer import writer as writer_module

K = 64


@pytest.fixture(scope="module")
def produced(tmp_path_factory, tiny_teachers, corpus_dir) -> Path:
    """A real tiny Llama (vocabulary 320: 9-bit ids) cached exactly: 12 windows of 16, top-64, fp32."""
    root = tmp_path_factory.mktemp("caches")
    assert main(["produce", "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--out", str(root),
                 "--k", str(K), "--seq-len", "16", "--max-windows", "12", "--rows-per-shard", "5",
                 "--encoding", "fp32", "--dtype", "float32", "--no-progress"]) == 0
    (made,) = [p.parent for p in root.glob("*/manifest.json")]
    return made


def config_file(folder: Path, **settings) -> Path:
    path = folder / f"cc-{len(list(folder.glob('cc-*')))}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


EXACT = dict(d=320, k=K, exact_k=K, exact_dtype="float32", residual_bins=[], delta_encoding=False)


def round_trip(cache: Path, tmp: Path, config: str, **imp) -> tuple[dict, dict, Path]:
    dk, back = tmp / f"dk-{Path(config).stem}", tmp / f"back-{Path(config).stem}"
    export_distillkit(ExportSettings(cache, dk, config=config, progress=False))
    import_distillkit(ImportSettings(str(dk), back, encoding="fp32", progress=False, **imp))
    return everything(cache), everything(back), dk


# -- round trips -----------------------------------------------------------------------------------

def test_an_all_exact_fp32_configuration_round_trips_exactly(produced, tmp_path):
    original, back, dk = round_trip(produced, tmp_path, str(config_file(tmp_path, **EXACT)))
    check_same_cache(original, back)
    m, src = CacheReader(tmp_path / "back-cc-0").manifest, CacheReader(produced).manifest
    assert m.data.fingerprint == src.data.fingerprint and not m.sequences and m.seq_len == 16
    assert m.producer.backend == "import:distillkit" and m.teacher.name_or_path == "unknown"
    source = m.producer.source
    assert source["layout"] == "compressed" and source["config"]["exact_k"] == K
    assert source["rows"]["cut_ends"] == 12 and source["rows"]["renormalised"] == 0
    assert any("tail" in u for u in source["unknown"]) and "tokenizer" in source["unknown"]


@pytest.mark.parametrize("preset", ["recommended", "budget"])
def test_presets_round_trip_within_their_error(produced, tmp_path, preset):
    original, back, dk = round_trip(produced, tmp_path, preset)
    c = parse_compression(yaml.safe_load((dk / CONFIG_FILE).read_text()), "cc")
    assert (c.k, c.exact_k) == ((K, 16) if preset == "recommended" else (50, 1)) and c.d == 320
    np.testing.assert_array_equal(back["input_ids"], original["input_ids"])
    np.testing.assert_array_equal(back["topk_ids"], original["topk_ids"][..., :c.k])   # the capture's order kept
    ours, theirs = back["topk_logprobs"].reshape(-1, c.k), original["topk_logprobs"][..., :c.k].reshape(-1, c.k)
    ours_mass = np.exp(ours.astype(np.float64)).sum(-1) + np.exp(back["tail_logmass"].reshape(-1).astype(np.float64))
    np.testing.assert_allclose(ours_mass, 1.0, atol=1e-6)                  # a distribution, tail included
    full = np.exp(back["tail_logmass"].reshape(-1)) > 2 * TAIL_FLOOR      # positions not scaled to fit
    exact_err = np.abs(ours[:, :c.exact_k] - theirs[:, :c.exact_k])
    assert (exact_err[full] <= 2**-8 * np.abs(theirs[full, :c.exact_k]) + 1e-6).all()     # bf16 rounding
    worst = np.maximum(lstsq_residual(theirs, c), (2**-8 * np.abs(theirs[:, :c.exact_k])).max(-1))
    # lowering a value to the one before it never raises the largest error (distillkit_rows)
    assert (np.abs(ours - theirs).max(-1)[full] <= worst[full] + 1e-4).all()


def test_a_sequences_cache_round_trips_with_its_loss_positions(tmp_path):
    from test_sequences_layout import write_cache

    rows = write_cache(tmp_path / "seq")              # vocabulary 97, k = 8, rows of 5..25 tokens
    cfg = config_file(tmp_path, **dict(EXACT, d=97, k=8, exact_k=8))
    export_distillkit(ExportSettings(tmp_path / "seq", tmp_path / "dk", config=str(cfg), progress=False))
    table = pq.read_table(tmp_path / "dk" / "data_0.parquet").to_pylist()
    for row, (ids, positions, _) in zip(table, rows):
        n = len(ids)
        assert len(row["input_ids"]) == len(row["compressed_logprobs"]) == 25      # padded: rows stack in batches
        assert row["attention_mask"] == [1] * n + [0] * (25 - n)
        assert [t for t, label in enumerate(row["labels"]) if label >= 0] == positions.tolist()
    m = import_distillkit(ImportSettings(str(tmp_path / "dk"), tmp_path / "back", encoding="fp32", progress=False))
    assert m.sequences and m.data.loss_tokens == sum(len(p) for _, p, _ in rows)
    got = everything(tmp_path / "back")
    for r, (ids, positions, full) in enumerate(rows):
        assert got["lengths"][r] == len(ids) and np.array_equal(got["input_ids"][r, :len(ids)], ids)
        assert np.flatnonzero(got["loss_mask"][r]).tolist() == positions.tolist()
        np.testing.assert_array_equal(got["topk_ids"][r, positions], full["topk_ids"][0][positions])
        np.testing.assert_array_equal(got["topk_logprobs"][r, positions], full["topk_logprobs"][0][positions])


def test_exported_rows_load_with_datasets_as_distillkit_stacks_them(produced, tmp_path):
    import datasets

    export_distillkit(ExportSettings(produced, tmp_path / "dk", config="budget", progress=False))
    ds = datasets.load_dataset(str(tmp_path / "dk"), split="train")
    assert len(ds) == 12 and set(ds.column_names) == {"input_ids", "attention_mask", "labels", "compressed_logprobs",
                                                      "bytepacked_indices"}
    c = budget(320)
    row = ds[3]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["compressed_logprobs"]) == 17
    assert {len(p) for p in row["compressed_logprobs"]} == {c.logprob_bytes}
    assert {len(p) for p in row["bytepacked_indices"]} == {(50 * 9 + 7) // 8}
    assert row["labels"][:16] == row["input_ids"][:16] and row["labels"][16] == -100   # nothing after the last
    train = yaml.safe_load((tmp_path / "dk" / "distillkit_kd.yaml").read_text())
    assert train["distillkit"]["dataset"]["prepacked"] is True
    assert train["distillkit"]["teacher"]["logprob_compressor"] == c.to_dict()
    assert train["distillkit"]["sequence_length"] == 17 and train["logitcache"]["cache_k"] == K


def test_files_hold_256_rows_and_are_read_in_numeric_order(tmp_path):
    from test_writer import make_header, synthetic_shard

    from logitcache import CacheWriter

    header = make_header(k=8, seq_len=4, num_windows=600, rows_per_shard=128)
    w = CacheWriter(tmp_path / "c", header)
    for i in range(header["num_shards"]):
        w.write_shard(i, **synthetic_shard(header, i))
    w.finish()
    cfg = config_file(tmp_path, **dict(EXACT, d=97, k=8, exact_k=8))
    export_distillkit(ExportSettings(tmp_path / "c", tmp_path / "dk", config=str(cfg), progress=False))
    sizes = [pq.ParquetFile(tmp_path / "dk" / f"data_{i}.parquet").metadata.num_rows for i in range(3)]
    assert sizes == [256, 256, 88]
    # a capture of 11 files: data_10 comes after data_9, not after data_1
    many = tmp_path / "many"
    many.mkdir()
    table = pq.read_table(tmp_path / "dk" / "data_0.parquet")
    for i in range(11):
        pq.write_table(table.slice(i, 1), many / f"data_{i}.parquet")
    shutil.copy(tmp_path / "dk" / CONFIG_FILE, many / CONFIG_FILE)
    import_distillkit(ImportSettings(str(many), tmp_path / "back", encoding="fp32", progress=False))
    back, original = everything(tmp_path / "back"), everything(tmp_path / "c")
    np.testing.assert_array_equal(back["input_ids"], original["input_ids"][:11])


# -- DistillKit's own layouts, built by our encoder ------------------------------------------------

def capture_rows(values: np.ndarray, ids: np.ndarray, tokens: list[np.ndarray], c) -> list[dict]:
    """Rows as DistillKit's capture writes them: n tokens, n - 1 positions; values/ids flat over positions."""
    lp, ix = codec.encode_logprobs(values, c), codec.encode_ids(ids, c)
    rows, at = [], 0
    for t in tokens:
        m = len(t) - 1
        rows.append({"input_ids": t.tolist(), "compressed_logprobs": lp[at:at + m].tolist(),
                     "bytepacked_indices": ix[at:at + m].tolist()})
        at += m
    return rows


def write(folder: Path, rows: list[dict], config=None, name: str = "data_0.parquet") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / name)
    if config is not None:
        (folder / CONFIG_FILE).write_text(yaml_text(config))
    return folder


def topk_sets(n: int, k: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(n, vocab))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, axis=-1)[:, :k]
    return ids, np.take_along_axis(lp, ids, -1).astype(np.float32)


def test_a_capture_of_rows_of_their_own_length_becomes_a_sequences_cache(tmp_path):
    c = parse_compression(dict(EXACT, d=8192, k=8, exact_k=8, exact_dtype="bfloat16"), "cc")   # 13-bit ids
    rng = np.random.default_rng(1)
    tokens = [rng.integers(0, 8192, size=n) for n in (5, 9, 2, 7)]
    ids, values = topk_sets(sum(len(t) - 1 for t in tokens), 8, 8192)
    src = write(tmp_path / "cap", capture_rows(values, ids, tokens, c), c)
    m = import_distillkit(ImportSettings(f"{src}/*.parquet", tmp_path / "back", encoding="fp32", progress=False))
    assert m.sequences and m.num_windows == 4 and m.seq_len == 8 and m.data.loss_tokens == 19
    got, at = everything(tmp_path / "back"), 0
    for r, t in enumerate(tokens):
        P = len(t) - 1
        assert got["loss_mask"][r].sum() == P and np.array_equal(got["input_ids"][r, :len(t)], t)
        np.testing.assert_array_equal(got["topk_ids"][r, :P], ids[at:at + P])
        bf16 = values[at:at + P]
        assert (np.abs(got["topk_logprobs"][r, :P] - bf16) <= 2**-8 * np.abs(bf16)).all()
        at += P


def test_packed_rows_split_at_segments_and_labels_mask_positions(tmp_path):
    c = parse_compression(dict(EXACT, d=151936, k=4, exact_k=4), "cc")                  # 18-bit ids
    mask = [1, 1, 1, 2, 2, 2, 2, 3, 0, 0]
    labels = [5, 6, -100, 8, 9, 10, 11, 12, -100, -100]
    tokens = np.array([5, 6, 7, 8, 9, 10, 11, 12, 0, 0])
    ids, values = topk_sets(10, 4, 151936)
    lp, ix = codec.encode_logprobs(values, c), codec.encode_ids(ids, c)
    row = {"input_ids": tokens.tolist(), "attention_mask": mask, "labels": labels,      # packed: one entry a token
           "compressed_logprobs": lp.tolist(), "bytepacked_indices": ix.tolist()}
    src = write(tmp_path / "packed", [row], c)
    m = import_distillkit(ImportSettings(str(src), tmp_path / "back", encoding="fp32", progress=False))
    got = everything(tmp_path / "back")
    # segment 1 (tokens 5 6 7): positions 0 and 1; entry 2 is the segment's last (packing cut its token off).
    # segment 2 (tokens 8..11): entries 3, 4, 5; entry 6 is its last. Segment 3 is one token: nothing to store.
    # The two padding tokens are skipped.
    assert m.num_windows == 2 and got["lengths"].tolist() == [3, 4]
    assert np.flatnonzero(got["loss_mask"][0]).tolist() == [0, 1]
    assert np.flatnonzero(got["loss_mask"][1]).tolist() == [0, 1, 2]
    np.testing.assert_array_equal(got["topk_ids"][1, :3], ids[3:6])
    rows = m.producer.source["rows"]
    assert (rows["cut_ends"], rows["padding"], rows["empty"]) == (3, 2, 1)
    labels[4] = -100                                                                       # DistillKit skips t = 4
    src = write(tmp_path / "masked", [dict(row, labels=labels)], c)
    m = import_distillkit(ImportSettings(str(src), tmp_path / "back2", encoding="fp32", progress=False))
    assert np.flatnonzero(everything(tmp_path / "back2")["loss_mask"][1]).tolist() == [0, 2]
    assert m.producer.source["rows"]["masked"] == 1 and m.data.chat["train_on"] == "labels >= 0"


def test_legacy_and_raw_layouts(tmp_path):
    lc = parse_legacy({"k": 16, "exact_k": 4, "polynomial_degree": 2, "vocab_size": 8192, "with_sqrt_term": True},
                      "cc")
    tokens = np.arange(11) * 7
    ids, values = topk_sets(10, 16, 8192, seed=3)
    words, exact, coeffs = codec.encode_legacy(ids, values, lc)
    legacy = {"input_ids": tokens.tolist(), "packed_indices": words.tolist(), "exact_values": exact.tolist(),
              "coeffs": coeffs.tolist()}
    src = write(tmp_path / "legacy", [legacy])
    (src / CONFIG_FILE).write_text(yaml.safe_dump({"legacy_logit_compression": lc.to_dict()}))
    m = import_distillkit(ImportSettings(str(src), tmp_path / "back", encoding="fp32", progress=False))
    got = everything(tmp_path / "back")
    assert m.producer.source["layout"] == "legacy" and m.seq_len == 10 and not m.sequences
    np.testing.assert_array_equal(got["topk_ids"][0], ids)
    np.testing.assert_allclose(got["topk_logprobs"][0, :, :4], values[:, :4], rtol=2**-11)
    # raw: exact values in any order, sorted on import; no config needed, the vocabulary is given
    order = np.random.default_rng(0).permuted(np.tile(np.arange(16), (10, 1)), axis=1)
    raw = {"input_ids": tokens.tolist(), "token_ids": np.take_along_axis(ids, order, 1).tolist(),
           "top_values": np.take_along_axis(values, order, 1).tolist()}
    src = write(tmp_path / "raw", [raw])
    import_distillkit(ImportSettings(str(src), tmp_path / "raw-back", vocab_size=8192, encoding="fp32", progress=False))
    got = everything(tmp_path / "raw-back")
    np.testing.assert_array_equal(got["topk_ids"][0], ids)
    np.testing.assert_array_equal(got["topk_logprobs"][0], values)


def test_a_url_source_reads_as_a_local_one(produced, tmp_path):
    export_distillkit(ExportSettings(produced, tmp_path / "dk", config="recommended", progress=False))
    local = import_distillkit(ImportSettings(str(tmp_path / "dk"), tmp_path / "a", encoding="fp32", progress=False))
    url = import_distillkit(ImportSettings(f"file://{tmp_path / 'dk'}", tmp_path / "b", encoding="fp32",
                                           progress=False))
    assert local.key == url.key and local.shards == url.shards


def test_an_interrupted_import_resumes_skipping_finished_shards(produced, tmp_path, monkeypatch, capsys):
    export_distillkit(ExportSettings(produced, tmp_path / "dk", config="recommended", progress=False))
    clean = import_distillkit(ImportSettings(str(tmp_path / "dk"), tmp_path / "clean", encoding="compact",
                                             rows_per_shard=4, progress=False))
    real = writer_module.CacheWriter.write_shard
    calls, stop = [], [True]

    def dies_on_the_second(self, index, **arrays):
        calls.append(index)
        if stop[0] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, index, **arrays)

    monkeypatch.setattr(writer_module.CacheWriter, "write_shard", dies_on_the_second)
    argv = ["import", "--from", "distillkit", str(tmp_path / "dk"), str(tmp_path / "out"), "--rows-per-shard", "4",
            "--no-progress"]
    assert main(argv) == 130                       # Ctrl-C: "run the same command again to resume"
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.importing").is_dir()
    calls.clear()
    stop[0] = False
    assert main(argv) == 0
    assert calls == [1, 2]                         # shard 0 was kept, not written (nor decoded) again
    m = CacheReader(tmp_path / "out").manifest
    assert m.key == clean.key and m.shards == clean.shards and leftovers(tmp_path).count(".out.importing") == 0
    calls.clear()
    assert main(argv) == 0 and calls == []         # finished: nothing to do


# -- bad input: one line, nothing written ---------------------------------------------------------

@pytest.fixture
def capture(produced, tmp_path) -> Path:
    export_distillkit(ExportSettings(produced, tmp_path / "dk", config="recommended", progress=False))
    return tmp_path / "dk"


def refused(capsys, tmp_path, src, match: str, *extra: str) -> None:
    out = tmp_path / "outs" / "cache"
    out.parent.mkdir(exist_ok=True)
    one_line_error(capsys, ["import", "--from", "distillkit", str(src), str(out), "--no-progress", *extra], match)
    assert leftovers(out.parent) == []


def respoiled(capture: Path, tmp_path: Path, spoil) -> Path:
    rows = pq.read_table(capture / "data_0.parquet").to_pylist()
    spoil(rows)
    folder = tmp_path / "spoiled"
    write(folder, rows)
    shutil.copy(capture / CONFIG_FILE, folder / CONFIG_FILE)
    return folder


@pytest.mark.parametrize("change, match", [
    (dict(d=151936), "bytepacked_indices holds 72 bytes, 144 expected; d=151936 (18 bits per id) and k=64 make 144 "
                     "bytes: the config does not match the data (wrong d or k?) (72 bytes fit k=32 ids of 18 bits or "
                     "k=64 ids of 9 bits (d from 257 to 512))"),
    (dict(k=32), "72 bytes, 36 expected; d=320 (9 bits per id) and k=32 make 36 bytes: the config does not match "
                 "the data (wrong d or k?) (72 bytes fit k=64 ids of 9 bits or k=32 ids of 18 bits"),
    (dict(exact_dtype="float32"), "compressed_logprobs holds 56 bytes, 88 expected"),
    (dict(polynomial_terms=[0, 1, 2]), "wrong k, exact_k, a dtype, the terms or the bins"),
])
def test_a_config_that_does_not_match_the_bytes_is_refused(capsys, tmp_path, capture, change, match):
    cfg = dict(yaml.safe_load((capture / CONFIG_FILE).read_text()), **change)
    refused(capsys, tmp_path, capture, match, "--config", str(config_file(tmp_path, **cfg)))


def test_ids_beyond_the_vocabulary_are_refused(capsys, tmp_path, capture):
    refused(capsys, tmp_path, capture, "outside the vocabulary 0..99", "--vocab-size", "100")
    spoiled = respoiled(capture, tmp_path, lambda rows: rows[2]["input_ids"].__setitem__(4, 400))
    refused(capsys, tmp_path, spoiled, "row 2: input_ids holds id 400, outside the vocabulary 0..319")


def test_rows_of_uneven_length_are_refused(capsys, tmp_path, capture):
    spoiled = respoiled(capture, tmp_path, lambda rows: rows[5]["compressed_logprobs"].pop())
    refused(capsys, tmp_path, spoiled, "row 5: bytepacked_indices has 17 positions, compressed_logprobs has 16")
    spoiled = respoiled(capture, tmp_path, lambda rows: rows[1].__setitem__("input_ids", rows[1]["input_ids"][:-3]))
    refused(capsys, tmp_path, spoiled, "row 1: input_ids has 14 tokens, bytepacked_indices 17 positions: rows of "
            "uneven length")
    spoiled = respoiled(capture, tmp_path, lambda rows: rows[0]["labels"].pop())
    refused(capsys, tmp_path, spoiled, "row 0: labels has 16 entries, input_ids has 17")


def test_a_missing_config_and_an_unknown_layout_are_refused(capsys, tmp_path, capture):
    (capture / CONFIG_FILE).unlink()
    refused(capsys, tmp_path, capture, "no compression_config.yaml beside the shards; give DistillKit's")
    other = write(tmp_path / "other", [{"input_ids": [1, 2, 3], "logits": [[0.5], [0.25], [0.1]]}])
    refused(capsys, tmp_path, other, "not a DistillKit capture (columns: input_ids, logits)")
    refused(capsys, tmp_path, tmp_path / "nowhere", "no such file, folder or glob")


def test_values_that_are_not_log_probs_are_refused(capsys, tmp_path):
    """A legacy capture of centred logits (DistillKit's legacy `compress` stores them) has no normaliser."""
    lc = parse_legacy({"k": 4, "exact_k": 4, "polynomial_degree": 1, "vocab_size": 64}, "cc")
    words, exact, coeffs = codec.encode_legacy(np.array([[1, 2, 3, 4]] * 3), np.array([[3.0, 2.0, 1.0, 0.5]] * 3), lc)
    src = write(tmp_path / "logits", [{"input_ids": [1, 2, 3, 4], "packed_indices": words.tolist(),
                                       "exact_values": exact.tolist(), "coeffs": coeffs.tolist()}])
    (src / CONFIG_FILE).write_text(yaml.safe_dump(lc.to_dict()))
    refused(capsys, tmp_path, src, "row 0 position 0: log-prob 3 (rank 0) is positive: not a log-probability")


def test_export_refuses_what_it_cannot_write(capsys, tmp_path, produced):
    big = config_file(tmp_path, **dict(EXACT, k=128, exact_k=128))
    out = tmp_path / "exports"
    out.mkdir()
    one_line_error(capsys, ["export", "--to", "distillkit", str(produced), str(out / "a"), "--config", str(big),
                            "--no-progress"], "k = 128, but the cache holds top-64")
    small = config_file(tmp_path, **dict(EXACT, d=256))
    one_line_error(capsys, ["export", "--to", "distillkit", str(produced), str(out / "b"), "--config", str(small),
                            "--no-progress"], "d = 256, but the cache's ids go up to 319")
    one_line_error(capsys, ["export", "--to", "distillkit", str(produced), str(out / "c"), "--config", "cheap",
                            "--no-progress"], "neither recommended nor budget nor a config file")
    assert leftovers(out) == []
    assert fit_preset(budget(320), 8).k == 8 and json.dumps(budget(320).to_dict())
    with pytest.raises(UserError, match="already exists"):
        export_distillkit(ExportSettings(produced, out, progress=False))
