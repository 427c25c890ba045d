"""axolotl interop: `logitcache export --to axolotl` and `logitcache import --from axolotl`.

Round trips ours -> axolotl -> ours keep the windows, ids and log-probs exactly (fp32 encoding); the
tail is recomputed from the float32 top-k as log(1 - sum exp) in float64, so it agrees in probability
mass to within the top-k's float32 rounding: |dT| <= 1e-6 absolute (k * 2^-24 is 5e-7 at k = 8), which
is the vLLM backend's tolerance (docs/vllm.md). The exported folder loads with `datasets` and has the
columns and shapes axolotl's KD collator and trainer read. Bad input is one line and leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_produce import one_thread  # noqa: F401  (fixture)
from test_writer import VOCAB, make_header, synthetic_shard

from logitcache import CacheReader, CacheWriter
from logitcache.backends.vllm import TAIL_FLOOR
from logitcache.cli import main
from logitcache.data.windows import windows_fingerprint
from logitcache.encodings import get_encoding
from logitcache.errors import UserError
from logitcache.interop import export_axolotl, import_axolotl
from logitcache.interop.axolotl import CONFIG_FILE, DATA_FILE, PAD_LOGPROB
from logitcache.producer import writer as writer_module

K, SEQ, WINDOWS = 8, 16, 50
AXOLOTL_COLUMNS = ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A synthetic fp32 top-k cache: 50 windows of 16 positions, k = 8, vocabulary 97."""
    path = tmp_path_factory.mktemp("cache") / "synthetic"
    header = make_header(k=K, seq_len=SEQ, num_windows=WINDOWS, rows_per_shard=16)
    w = CacheWriter(path, header)
    for i in range(header["num_shards"]):
        w.write_shard(i, **synthetic_shard(header, i))
    assert w.finish().complete
    return path


@pytest.fixture(scope="module")
def exported(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("axolotl") / "kd"
    export_axolotl(cache, out, progress=False)
    return out


def everything(path: Path) -> dict[str, np.ndarray]:
    reader = CacheReader(path)
    return next(reader.iter_arrays(reader.num_windows))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_line_error(capsys, argv: list[str], match: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert match in err, err
    return err


# -- export ------------------------------------------------------------------------------------


def test_exported_folder_loads_with_datasets_as_axolotl_reads_it(cache, exported):
    import datasets

    ds = datasets.load_dataset(str(exported))["train"]     # what axolotl does with a local folder
    assert ds.column_names == AXOLOTL_COLUMNS and len(ds) == WINDOWS
    # axolotl's `_is_dataset_already_tokenized`: a Dataset with these three is used as it is
    assert {"input_ids", "attention_mask", "labels"} <= set(ds.features)
    src = everything(cache)
    N = SEQ + 1
    for i in (0, 17, WINDOWS - 1):
        row = ds[i]
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) == N
        for name in ("target_token_ids", "target_logprobs", "target_mask"):
            assert np.asarray(row[name]).shape == (N, K)      # one target list per input token
        assert row["input_ids"] == src["input_ids"][i].tolist()
        assert row["labels"][0] == -100 and row["labels"][1:] == row["input_ids"][1:]
        assert set(row["attention_mask"]) == {1}
        mask = np.asarray(row["target_mask"])
        assert mask[:-1].all() and not mask[-1].any()        # the last token predicts nothing
        ids, lps = np.asarray(row["target_token_ids"]), np.asarray(row["target_logprobs"], dtype=np.float32)
        np.testing.assert_array_equal(ids[:-1], src["topk_ids"][i])
        np.testing.assert_array_equal(lps[:-1], src["topk_logprobs"][i])
        assert (lps[-1] == np.float32(PAD_LOGPROB)).all()
        # alignment: position t holds the distribution of token t + 1 (axolotl shifts labels, not targets)
        for t in range(SEQ):
            hit = np.flatnonzero(ids[t] == row["input_ids"][t + 1])
            if hit.size:
                assert lps[t, hit[0]] == src["target_logprob"][i, t]


def test_exported_config_says_what_axolotl_needs(cache, exported):
    cfg = yaml.safe_load((exported / CONFIG_FILE).read_text())
    ax, ours = cfg["axolotl"], cfg["logitcache"]
    assert "axolotl.integrations.kd.KDPlugin" in ax["plugins"] and ax["kd_trainer"] is True
    assert ax["kd_temperature"] == 1.0 and ax["sequence_len"] == SEQ + 1
    (dataset,) = ax["datasets"]
    assert dataset["logprobs_field"] == "target_logprobs" and dataset["temperature"] == 1.0
    assert dataset["path"] == str(exported.resolve()) and dataset["type"] is None
    assert ours["k"] == K and ours["seq_len"] == SEQ and ours["rows"] == WINDOWS
    assert ours["key"] == CacheReader(cache).key
    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_FILE, DATA_FILE]


def test_renormalized_export_sums_to_one_and_imports_with_no_tail(cache, tmp_path):
    out = tmp_path / "norm"
    export_axolotl(cache, out, renormalize=True, progress=False)
    lps = np.asarray(pq.read_table(out / DATA_FILE).column("target_logprobs").to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(np.exp(lps[:, :-1]).sum(-1), 1.0, atol=1e-6)
    assert yaml.safe_load((out / CONFIG_FILE).read_text())["axolotl"]["kd_normalize_topk"] is True
    import_axolotl(out, tmp_path / "back", vocab_size=VOCAB, encoding="fp32", progress=False)
    tail = everything(tmp_path / "back")["tail_logmass"]
    # all mass in the top-k: the tail is the floor, or float32 rounding of the renormalised values
    assert (tail >= np.float32(np.log(TAIL_FLOOR))).all() and (np.exp(tail) < 1e-6).all()


def test_a_sequences_cache_exports_rows_of_their_own_length_masked_as_axolotl_masks(tmp_path):
    import datasets
    from test_sequences_layout import write_cache

    rows = write_cache(tmp_path / "seq")          # rows of 5..25 tokens, a few loss positions each
    export_axolotl(tmp_path / "seq", tmp_path / "kd", progress=False)
    ds = datasets.load_dataset(str(tmp_path / "kd"))["train"]
    assert len(ds) == len(rows)
    for row, (ids, positions, full) in zip(ds, rows):
        n = len(ids)
        assert row["input_ids"] == ids.tolist() and len(row["labels"]) == len(row["attention_mask"]) == n
        stored = np.zeros(n, dtype=bool)
        stored[positions] = True
        mask = np.asarray(row["target_mask"])
        assert mask.shape == (n, full["topk_ids"].shape[-1]) and (mask.all(-1) == stored).all()
        # the token a stored position predicts takes the loss; the rest are -100, as axolotl masks prompts
        expected = [-100] + [int(ids[t + 1]) if stored[t] else -100 for t in range(n - 1)]
        assert row["labels"] == expected
        np.testing.assert_array_equal(np.asarray(row["target_token_ids"])[positions], full["topk_ids"][0][positions])
        np.testing.assert_array_equal(np.asarray(row["target_logprobs"], dtype=np.float32)[positions],
                                      full["topk_logprobs"][0][positions])
    # import writes windows caches only: rows of their own length are refused, nothing written
    with pytest.raises(UserError, match="row 1: .* tokens, but the rows before have"):
        import_axolotl(tmp_path / "kd", tmp_path / "back", vocab_size=VOCAB, progress=False)
    assert not (tmp_path / "back").exists()


# -- round trips -------------------------------------------------------------------------------


def check_same_cache(original: dict, back: dict) -> None:
    for name in ("window_id", "input_ids", "topk_ids", "topk_logprobs"):
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    # the tail: 1 - sum exp of the float32 top-k, so equal in mass to the top-k's float32 rounding
    np.testing.assert_allclose(np.exp(back["tail_logmass"].astype(np.float64)),
                               np.exp(original["tail_logmass"].astype(np.float64)), rtol=1e-4, atol=1e-6)
    # target_logprob: exact when the next token is in the top-k, else an upper bound of the true value
    hit = (original["topk_ids"] == original["input_ids"][:, 1:, None]).any(-1)
    np.testing.assert_array_equal(back["target_logprob"][hit], original["target_logprob"][hit])
    assert (back["target_logprob"][~hit] >= original["target_logprob"][~hit] - 1e-6).all()


def test_round_trip_fp32_is_exact(cache, exported, tmp_path):
    m = import_axolotl(exported, tmp_path / "back", vocab_size=VOCAB, encoding="fp32", rows_per_shard=7,
                       progress=False)
    original, back = everything(cache), everything(tmp_path / "back")
    check_same_cache(original, back)
    assert m.complete and m.num_shards == 8 and m.k == K and m.seq_len == SEQ
    assert m.producer.backend == "import:axolotl" and m.teacher.name_or_path == "unknown"
    assert m.tokenizer.fingerprint == "unknown" and m.teacher.vocab_size == VOCAB
    assert m.teacher.weights_fingerprint.startswith("imported-topk-sha256:")
    assert m.data.fingerprint == windows_fingerprint(original["input_ids"])   # the same windows, the same hash
    assert main(["verify", str(tmp_path / "back")]) == 0
    assert leftovers(tmp_path) == ["back"]


def test_round_trip_of_a_produced_cache_keeps_tokenizer_and_windows(capsys, tmp_path, tiny_teachers, corpus_dir):
    """A real tiny produce run (a padded-vocabulary Qwen2), exported and imported through the CLI."""
    root = tmp_path / "caches"
    assert main(["produce", "--teacher", str(tiny_teachers["qwen2"]), "--data", str(corpus_dir), "--out", str(root),
                 "--k", "8", "--seq-len", "16", "--max-windows", "12", "--rows-per-shard", "4", "--encoding", "fp32",
                 "--dtype", "float32", "--no-progress"]) == 0
    (made,) = [p.parent for p in root.glob("*/manifest.json")]
    original = CacheReader(made).manifest
    capsys.readouterr()
    assert main(["export", "--to", "axolotl", str(made), str(tmp_path / "ax"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ax")
    assert main(["import", "--from", "axolotl", str(tmp_path / "ax"), str(tmp_path / "back"), "--encoding", "fp32",
                 "--tokenizer", str(tiny_teachers["qwen2"]), "--vocab-size", str(original.teacher.vocab_size),
                 "--teacher-name", "tiny-qwen2", "--no-progress"]) == 0
    m = CacheReader(tmp_path / "back").manifest
    check_same_cache(everything(made), everything(tmp_path / "back"))
    assert m.tokenizer == original.tokenizer and m.data.fingerprint == original.data.fingerprint
    assert (m.teacher.vocab_size, m.teacher.usable_vocab_size) == (original.teacher.vocab_size,
                                                                   original.teacher.usable_vocab_size)
    assert m.teacher.name_or_path == "tiny-qwen2" and m.teacher.usable_vocab_size < m.teacher.vocab_size


def test_default_compact_import_fits_the_rank_table_fit_would(exported, tmp_path):
    m = import_axolotl(exported, tmp_path / "compact", vocab_size=VOCAB, progress=False)
    assert m.encoding.name == "compact"
    tokens = everything(tmp_path / "compact")["input_ids"]
    assert m.encoding.params == get_encoding("compact").fit(tokens, VOCAB)   # counts, not tokens in memory
    again = import_axolotl(exported, tmp_path / "compact", vocab_size=VOCAB, progress=False)
    assert again == m      # the same call again: the finished cache, unchanged


def test_json_lines_import_equals_parquet_import(exported, tmp_path):
    src = tmp_path / "jsonl"
    src.mkdir()
    rows = pq.read_table(exported / DATA_FILE).to_pylist()
    with open(src / "part-0.jsonl", "w") as f:
        for row in rows[:20]:
            f.write(json.dumps(row) + "\n")
    with open(src / "part-1.jsonl", "w") as f:
        for row in rows[20:]:
            f.write(json.dumps(row) + "\n\n")
    # batches of 3 and 7 rows, shards of 16: neither the key nor a byte may depend on the batching
    a = import_axolotl(src, tmp_path / "a", vocab_size=VOCAB, encoding="fp32", batch_rows=3, rows_per_shard=16,
                       progress=False)
    b = import_axolotl(exported / DATA_FILE, tmp_path / "b", vocab_size=VOCAB, encoding="fp32", batch_rows=7,
                       rows_per_shard=16, progress=False)
    assert a.key == b.key and a.shards == b.shards     # the manifests differ in data.source only
    for name in [f"shard-{i:05d}.parquet" for i in range(4)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name, arr in everything(tmp_path / "a").items():
        np.testing.assert_array_equal(arr, everything(tmp_path / "b")[name])


def test_an_interrupted_import_resumes_to_the_same_bytes(exported, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer_module.CacheWriter.write_shard

    def stop_after_two(self, index, **arrays):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, index, **arrays)

    monkeypatch.setattr(writer_module.CacheWriter, "write_shard", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        import_axolotl(exported, tmp_path / "cut", vocab_size=VOCAB, rows_per_shard=8, progress=False)
    assert leftovers(tmp_path) == [".cut.importing"]              # nothing at OUT, the work kept aside
    monkeypatch.setattr(writer_module.CacheWriter, "write_shard", real)
    written = []
    monkeypatch.setattr(writer_module.CacheWriter, "write_shard",
                        lambda self, index, **a: written.append(index) or real(self, index, **a))
    import_axolotl(exported, tmp_path / "cut", vocab_size=VOCAB, rows_per_shard=8, progress=False)
    assert written == [2, 3, 4, 5, 6] and leftovers(tmp_path) == ["cut"]
    monkeypatch.setattr(writer_module.CacheWriter, "write_shard", real)
    import_axolotl(exported, tmp_path / "whole", vocab_size=VOCAB, rows_per_shard=8, progress=False)
    for name in ["manifest.json"] + [f"shard-{i:05d}.parquet" for i in range(7)]:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


# -- bad input: one line each, nothing written ---------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def rows(exported) -> list[dict]:
    return pq.read_table(exported / DATA_FILE).slice(0, 6).to_pylist()


def refused_import(capsys, tmp_path, src: Path, match: str, *extra: str) -> None:
    out = tmp_path / "out" / "cache"
    out.parent.mkdir(exist_ok=True)
    one_line_error(capsys, ["import", "--from", "axolotl", str(src), str(out), "--no-progress", *extra], match)
    assert leftovers(out.parent) == []


def test_a_dataset_without_the_needed_columns_is_refused(capsys, tmp_path, rows):
    chat = [{"messages": [{"role": "user", "content": "hi"}], "target_token_ids": r["target_token_ids"],
             "logprobs": r["target_logprobs"]} for r in rows]
    src = write_rows(tmp_path / "chat.jsonl", chat)
    refused_import(capsys, tmp_path, src, "no column 'input_ids'", "--vocab-size", str(VOCAB))
    no_lp = write_rows(tmp_path / "nolp.parquet",
                       [{k: v for k, v in r.items() if k != "target_logprobs"} for r in rows])
    refused_import(capsys, tmp_path, no_lp, "no column 'target_logprobs'", "--vocab-size", str(VOCAB))
    renamed = write_rows(tmp_path / "renamed.parquet", rows)
    refused_import(capsys, tmp_path, renamed, "no column 'llm_logprobs'", "--vocab-size", str(VOCAB),
                   "--logprobs-field", "llm_logprobs")


def test_ids_beyond_the_vocabulary_are_refused(capsys, tmp_path, rows):
    src = write_rows(tmp_path / "d.parquet", rows)
    biggest = max(max(max(p) for p in r["target_token_ids"][:-1]) for r in rows)
    refused_import(capsys, tmp_path, src, f"outside the vocabulary 0..{biggest - 1}", "--vocab-size", str(biggest))
    rows[3]["input_ids"][5] = VOCAB + 4
    src = write_rows(tmp_path / "e.parquet", rows)
    refused_import(capsys, tmp_path, src, f"row 3: input_ids holds id {VOCAB + 4}", "--vocab-size", str(VOCAB))


def test_rows_of_uneven_length_are_refused_naming_the_row(capsys, tmp_path, rows):
    for name in ("input_ids", "labels", "attention_mask"):
        rows[4][name] = rows[4][name][:-3]
    for name in ("target_token_ids", "target_logprobs", "target_mask"):
        rows[4][name] = rows[4][name][:-3]
    src = write_rows(tmp_path / "uneven.jsonl", rows)
    refused_import(capsys, tmp_path, src, "uneven.jsonl row 4: 14 tokens, but the rows before have 17",
                   "--vocab-size", str(VOCAB))


@pytest.mark.parametrize("spoil, match", [
    (lambda r: r["target_logprobs"][2].__setitem__(1, float("nan")),
     "row 2 position 2: target_logprobs nan is not finite"),
    (lambda r: r["target_logprobs"][5].__setitem__(0, 0.5), "is positive"),
    (lambda r: r["target_token_ids"][1].pop(),
     "row 2 position 1: target_token_ids has 7 entries, earlier positions have k = 8"),
    (lambda r: r["target_token_ids"][3].__setitem__(1, r["target_token_ids"][3][0]), "repeats an id"),
    (lambda r: r["target_mask"][6].__setitem__(0, 0), "row 2 position 6: target_mask is 0"),
    (lambda r: r["labels"].__setitem__(4, r["input_ids"][5]), "unshifted"),
    (lambda r: r["attention_mask"].__setitem__(16, 0), "attention_mask has zeros"),
    (lambda r: r["target_logprobs"][0].__setitem__(slice(None), [-0.01] * 8), "sum to"),
])
def test_bad_values_are_refused_in_one_line(capsys, tmp_path, rows, spoil, match):
    spoil(rows[2])
    src = write_rows(tmp_path / "bad.jsonl", rows)
    refused_import(capsys, tmp_path, src, match, "--vocab-size", str(VOCAB))


def test_import_needs_a_vocabulary_and_a_new_folder(capsys, tmp_path, exported):
    refused_import(capsys, tmp_path, exported, "--vocab-size: give the vocabulary")
    taken = tmp_path / "taken"
    taken.mkdir()
    one_line_error(capsys, ["import", "--from", "axolotl", str(exported), str(taken), "--vocab-size", str(VOCAB)],
                   "already exists and is not a cache")
    refused_import(capsys, tmp_path, tmp_path / "missing", "no such file or folder", "--vocab-size", str(VOCAB))


def test_a_samples_cache_is_not_exported(capsys, tmp_path, tiny_teachers, corpus_dir):
    root = tmp_path / "caches"
    assert main(["produce", "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--out", str(root),
                 "--seq-len", "16", "--max-windows", "4", "--rows-per-shard", "4", "--encoding", "sampled",
                 "--encoding-param", "S=4", "--dtype", "float32", "--no-progress"]) == 0
    (sampled,) = [p.parent for p in root.glob("*/manifest.json")]
    out = tmp_path / "exports"
    out.mkdir()
    one_line_error(capsys, ["export", "--to", "axolotl", str(sampled), str(out / "kd"), "--no-progress"],
                   "a samples cache")
    assert leftovers(out) == []


def test_export_never_writes_over_a_folder(capsys, cache, exported, tmp_path):
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    one_line_error(capsys, ["export", "--to", "axolotl", str(cache), str(exported), "--no-progress"],
                   "already exists")
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
