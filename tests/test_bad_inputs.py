"""Bad input, one case per test: a one-line error, a non-zero exit, and nothing half-written.

Cases tested elsewhere are listed in README.md ("What the tool promises and how it is tested")
rather than repeated here. The disk-full case uses a real file-size limit (RLIMIT_FSIZE) in a
subprocess; the out-of-memory case injects the error from a real head module subclass.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_backend_vllm import needs_vllm
from test_produce import REPO, SMALL, cli_command, cli_env, one_thread, snapshot  # noqa: F401

from logitcache import format as fmt
from logitcache.backends.hf import HFBackend
from logitcache.cli import main as logitcache_main
from logitcache.errors import UserError
from trainer.cli import main as trainer_main


def one_line_error(capsys, main, argv: list, *, rc: int = 2, match: str = "") -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == rc and len(lines) == 1, (code, err)
    assert match in lines[0], lines[0]
    return lines[0]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


# -- nonexistent paths, through every command that takes one ----------------------------------


@pytest.mark.parametrize("prog,argv", [
    ("logitcache", ["verify", "{missing}"]),
    ("logitcache", ["inspect", "{missing}"]),
    ("logitcache", ["repair", "{missing}"]),
    ("logitcache", ["produce", "--teacher", "{teacher}", "--data", "{missing}", "--out", "{out}", "--seq-len", "16"]),
    ("trainer", ["distill", "--student", "{teacher}", "--cache", "{missing}", "--out", "{out}"]),
    ("trainer", ["distill", "--student", "{missing}", "--cache", "{missing}", "--out", "{out}"]),
    ("trainer", ["evaluate", "--model", "{missing}", "--data", "{missing}"]),
])
def test_nonexistent_paths(capsys, tmp_path, tiny_teachers, prog, argv):
    values = {"missing": tmp_path / "no-such-thing", "teacher": tiny_teachers["llama"], "out": tmp_path / "out"}
    argv = [a.format(**values) for a in argv]
    line = one_line_error(capsys, logitcache_main if prog == "logitcache" else trainer_main, argv)
    assert line.startswith(f"{prog}: error: ") and "no-such-thing" in line
    assert not (tmp_path / "out").exists()


# -- manifests from strangers -----------------------------------------------------------------


@pytest.fixture
def small_cache(capsys, tmp_path, tiny_teachers, corpus_dir) -> Path:
    capsys.readouterr()
    rc = logitcache_main(["produce", "--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir),
                          "--out", str(tmp_path / "root"), "--max-windows", "8", *SMALL])
    assert rc == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_newer_format_version_in_every_command(capsys, tmp_path, small_cache, tiny_teachers):
    m = json.loads((small_cache / fmt.MANIFEST_NAME).read_text())
    fmt.write_manifest(small_cache, dict(m, format_version=fmt.FORMAT_VERSION + 1))
    before = snapshot(small_cache)
    one_line_error(capsys, logitcache_main, ["inspect", small_cache], match="newer than this reader supports")
    one_line_error(capsys, logitcache_main, ["repair", small_cache], match="newer than this reader supports")
    one_line_error(capsys, trainer_main, ["distill", "--student", tiny_teachers["llama_b"], "--cache", small_cache,
                                          "--out", tmp_path / "o"], match="newer than this reader supports")
    # verify reports it as the manifest's problem: one line on stdout, exit 1
    capsys.readouterr()
    assert logitcache_main(["verify", str(small_cache)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "newer than this reader supports" in out[0]
    assert snapshot(small_cache) == before and not (tmp_path / "o").exists()


def test_shard_row_count_disagreeing_with_manifest_at_distill(capsys, tmp_path, small_cache, tiny_teachers):
    """A shard replaced by another cache's shard of the same size and fewer rows, manifest resealed."""
    m = json.loads((small_cache / fmt.MANIFEST_NAME).read_text())
    m["shards"][0]["bytes"] += 1
    fmt.write_manifest(small_cache, m)
    one_line_error(capsys, trainer_main, ["distill", "--student", tiny_teachers["llama_b"], "--cache", small_cache,
                                          "--out", tmp_path / "o"], match="manifest says")
    assert not (tmp_path / "o").exists()


# -- teachers and corpora ---------------------------------------------------------------------


def test_teacher_producing_nan_is_refused_before_any_shard(capsys, tmp_path, tiny_teachers, corpus_dir):
    """A checkpoint whose LM head weights are NaN (as after a diverged fine-tune)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "nan-teacher"
    shutil.copytree(tiny_teachers["llama"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(folder, safe_serialization=True)
    one_line_error(capsys, logitcache_main, ["produce", "--teacher", folder, "--data", corpus_dir,
                                             "--out", tmp_path / "out", "--max-windows", "8", *SMALL],
                   match="non-finite logits")
    assert not [f for f in files(tmp_path / "out") if f.endswith(".parquet") or ".tmp-" in f]


@pytest.mark.parametrize("cut", ["empty", "inside-length", "inside-header", "inside-data", "one-byte-short"])
def test_truncated_safetensors_teacher_is_one_line_naming_the_file(capsys, tmp_path, tiny_teachers, corpus_dir, cut):
    """An interrupted download: model.safetensors cut at several points. The header is checked
    against the file's size where the producer first reads it (describing the teacher), before any
    windows or cache are written."""
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teachers["llama"], folder)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    n = int.from_bytes(whole[:8], "little")
    size = {"empty": 0, "inside-length": 5, "inside-header": 8 + n // 2,
            "inside-data": 8 + n + (len(whole) - 8 - n) // 2, "one-byte-short": len(whole) - 1}[cut]
    weights.write_bytes(whole[:size])
    line = one_line_error(capsys, logitcache_main, ["produce", "--teacher", folder, "--data", corpus_dir,
                                                    "--out", tmp_path / "out", *SMALL], match=str(weights))
    assert line.startswith("logitcache: error: ") and "truncated or corrupt" in line and "re-download" in line
    assert not (tmp_path / "out").exists()


@needs_vllm
def test_teacher_vllm_cannot_run_is_one_line_naming_the_hf_fallback(tmp_path, tiny_teachers, corpus_dir):
    """The tiny Llama has attention heads of 8: vLLM's CPU attention has no kernel for them, and says
    so only at the first forward pass (RuntimeError: Unsupported CPU attention configuration:
    head_dim=8), after the engine started. In a fresh process, as a user runs it: exit 2, one error
    line naming the failure and `--backend hf`, no traceback, no cache folder (the windows, made
    before the teacher starts, stay for the next run). vLLM and torch print a few lines of their own
    at start-up (a Triton notice, a NUMA binding warning, deprecation warnings); they are not ours."""
    out = tmp_path / "out"
    done = subprocess.run(cli_command("--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir),
                                      "--out", str(out), "--backend", "vllm", "--max-windows", "4", *SMALL),
                          env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "[rank0]" not in done.stderr, done.stderr
    errors = [line for line in lines if line.startswith("logitcache: error: ")]
    assert errors == lines[-1:], done.stderr
    assert f"--teacher {tiny_teachers['llama']}: vLLM could not run it (RuntimeError: " in errors[0]
    assert "head_dim=8" in errors[0] and errors[0].endswith("--backend hf is the fallback")
    assert sorted(p.name for p in out.iterdir()) == ["windows"]


def test_non_utf8_text_through_produce(capsys, tmp_path, tiny_teachers):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_bytes(b"Some text \xff\xfe\xfa that is not UTF-8 " * 50)
    one_line_error(capsys, logitcache_main, ["produce", "--teacher", tiny_teachers["llama"], "--data",
                                             tmp_path / "data", "--out", tmp_path / "out", *SMALL],
                   match="could not be read as text")
    assert not [f for f in files(tmp_path / "out") if not f.startswith("windows") or ".tmp-" in f]


def test_student_vocabulary_smaller_than_its_tokenizer(capsys, tmp_path, small_cache, tiny_tokenizer_dir):
    from conftest import save_tiny_teacher

    student = save_tiny_teacher(tmp_path / "student", "llama", tiny_tokenizer_dir, vocab_size=256)
    one_line_error(capsys, trainer_main, ["distill", "--student", student, "--cache", small_cache,
                                          "--out", tmp_path / "o", "--steps", "1"], match="vocabulary")
    assert not (tmp_path / "o").exists()


# -- disk full --------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # get EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_disk_full_is_one_line_leaves_no_partial_shard_and_resumes(capsys, tmp_path, tiny_teachers, corpus_dir):
    """Files are capped at 4 KB (RLIMIT_FSIZE): the windows (~1 KB) and the manifest (~2 KB) fit, the
    fp32 shards (~5.3 KB) do not. The run stops with one line, leaves no temporary or partial
    shard, and the same command without the cap resumes to the bytes of an uncapped run."""
    args = ["--teacher", str(tiny_teachers["llama"]), "--data", str(corpus_dir), "--max-windows", "12",
            "--encoding", "fp32", *SMALL]
    capsys.readouterr()
    assert logitcache_main(["produce", *args, "--out", str(tmp_path / "ref")]) == 0
    reference = Path(capsys.readouterr().out.strip())
    assert min(p.stat().st_size for p in reference.glob("shard-*.parquet")) > 4096

    root = tmp_path / "capped"
    done = subprocess.run(cli_command(*args, "--out", str(root)), env=cli_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=_file_size_limit(4096))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("logitcache: error: ") and "writing a shard failed: File too large" in lines[0]
    cache = root / reference.name
    assert sorted(p.name for p in cache.iterdir()) == [fmt.LOCK_NAME, fmt.MANIFEST_NAME]   # nothing partial
    assert fmt.load_manifest(cache)["shards"] == []

    resumed = subprocess.run(cli_command(*args, "--out", str(root)), env=cli_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}


# -- out of memory in the LM head -------------------------------------------------------------


class OutOfMemoryHead(torch.nn.Linear):
    """The teacher's real LM head (same weights), which runs out of memory above `max_rows` rows,
    as a GPU would for a chunk of logits too large for what is left."""

    def __init__(self, head: torch.nn.Linear, max_rows: int):
        super().__init__(head.in_features, head.out_features, bias=head.bias is not None)
        self.weight, self.bias = head.weight, head.bias
        self.max_rows = max_rows
        self.rows_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(x.shape[0])
        if x.shape[0] > self.max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0] * self.out_features * 4} "
                                         "bytes")
        return super().forward(x)


def test_lm_head_out_of_memory_halves_the_chunk_and_gives_the_same_top_k(tiny_teachers):
    windows = np.random.default_rng(0).integers(0, 320, (3, 17)).astype(np.int32)
    plain = HFBackend(str(tiny_teachers["llama"]), 8, "cpu", "float32", chunk_size=48)
    expected = plain.run(windows)
    backend = HFBackend(str(tiny_teachers["llama"]), 8, "cpu", "float32", chunk_size=48)
    backend.head = OutOfMemoryHead(backend.head, max_rows=10)
    got = backend.run(windows)
    assert backend.chunk_size == 6 and backend.head.rows_seen[:4] == [48, 24, 12, 6]   # halved until it fit
    assert max(r for r in backend.head.rows_seen[4:]) <= 6
    # the same values: per-row matmuls of different chunk sizes agree to float32 rounding (1e-5 is
    # ~100 ulp at these magnitudes); ids are equal wherever neighbours are not within that
    np.testing.assert_array_equal(got.ids, expected.ids)
    for a, b in zip(got[1:], expected[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_lm_head_out_of_memory_at_one_position_is_one_line(tiny_teachers):
    backend = HFBackend(str(tiny_teachers["llama"]), 8, "cpu", "float32", chunk_size=4)
    backend.head = OutOfMemoryHead(backend.head, max_rows=0)
    with pytest.raises(UserError, match="out of memory in the LM head even for one position") as exc:
        backend.run(np.zeros((1, 9), dtype=np.int32))
    assert "\n" not in str(exc.value) and backend.head.rows_seen == [4, 2, 1]
    # other runtime errors are not mistaken for memory
    backend.head = torch.nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        backend.run(np.zeros((1, 9), dtype=np.int32))
