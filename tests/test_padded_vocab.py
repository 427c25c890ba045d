"""A teacher padded past its tokenizer (Qwen-style: 152,064 logit columns for 151,936 tokens).

The tiny `qwen2` teacher of conftest has 384 logit columns for the 320-token tokenizer, and its
padding rows are random like the others, so without a mask ~14% of its top-8 ids are padding ids
that no text can hold (and `trainer distill` refuses them). The producer masks columns at or past
len(tokenizer) before the softmax: top-k, tail, target log-prob and draws are over the 320 usable
columns, checked here against a float64 reference computed from the model's own logits, and the
manifest records `teacher.usable_vocab_size`. The last test holds the vLLM backend (marked `vllm`)
against the hf backend on a padded teacher vLLM's CPU kernels can run (head size 32).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB
from test_backend_vllm import LP_TOL, TAIL_MASS_TOL, needs_vllm
from test_loop import run_trainer
from test_produce import one_thread  # noqa: F401  (fixture)

from logitcache.backends.hf import HFBackend
from logitcache.cli import main
from logitcache.encodings.sampled import window_uniforms
from logitcache.format.key import cache_key
from logitcache.read.reader import CacheReader

K = 8
SEQ_LEN = 16
SMALL = ["--seq-len", str(SEQ_LEN), "--rows-per-shard", "4", "--batch-size", "2", "--dtype", "float32",
         "--max-windows", "8", "--no-progress"]


def produce(teacher: Path, data: Path, out: Path, *extra: str) -> tuple[Path, str]:
    """`logitcache produce` in this process; returns (the cache folder, what it wrote to stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["produce", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *SMALL, *extra])
    assert rc == 0, stderr.getvalue()
    return Path(stdout.getvalue().strip().splitlines()[-1]), stderr.getvalue()


def read_all(cache: Path) -> dict:
    reader = CacheReader(cache)
    return next(reader.iter_batches(reader.num_windows))


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def masked_reference(teacher: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the first TINY_VOCAB columns of the model's own logits, [N, TINY_VOCAB]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.double()
    assert logits.shape[-1] > TINY_VOCAB                                   # the teacher is padded
    return torch.log_softmax(logits[..., :TINY_VOCAB], dim=-1).reshape(-1, TINY_VOCAB)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, tiny_teachers, corpus_dir) -> tuple[Path, str]:
    return produce(tiny_teachers["qwen2"], corpus_dir, tmp_path_factory.mktemp("padded"), "--k", str(K),
                   "--encoding", "fp32")


def test_padding_ids_are_masked_and_values_exact_over_the_usable_vocabulary(tiny_teachers, topk_cache):
    cache, err = topk_cache
    assert "model has 384 logit columns, tokenizer 320 tokens: columns 320..383 masked out" in err
    teacher = manifest(cache)["teacher"]
    assert teacher["vocab_size"] == 384 and teacher["usable_vocab_size"] == TINY_VOCAB
    b = read_all(cache)
    ids, lp, tail = b["topk_ids"].reshape(-1, K), b["topk_logprobs"].reshape(-1, K).double(), \
        b["tail_logmass"].reshape(-1).double()
    assert int(ids.max()) < TINY_VOCAB
    # top-k mass + tail = 1 over the usable vocabulary (the padding mass is in neither)
    total = lp.exp().sum(-1) + tail.exp()
    assert (total - 1).abs().max().item() < 2e-6
    # the values are the masked float64 reference's, to float32 rounding
    ref = masked_reference(tiny_teachers["qwen2"], b["input_ids"])                        # (N, 320)
    ref_top, _ = ref.topk(K, dim=-1)
    torch.testing.assert_close(lp, ref_top, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref.gather(1, ids), lp, rtol=0, atol=2e-5)
    rest = ref.scatter(1, ids, float("-inf")).logsumexp(-1)                 # log of the mass outside top-k
    torch.testing.assert_close(tail, rest, rtol=0, atol=2e-5)
    target = ref.gather(1, b["labels"].reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(b["target_logprob"].reshape(-1).double(), target, rtol=0, atol=2e-5)


def test_distill_accepts_the_padded_teachers_cache(tmp_path, tiny_tokenizer_dir, topk_cache, capsys):
    """A Qwen2 student of 320 columns (a Qwen2 folder loads the tokenizer as Qwen2Tokenizer, whose
    fingerprint is the teacher's; a Llama folder's is not)."""
    from conftest import save_tiny_teacher

    cache, _ = topk_cache
    student = save_tiny_teacher(tmp_path / "student", "qwen2", tiny_tokenizer_dir, seed=2)
    code = run_trainer("distill", "--student", student, "--cache", cache, "--out", tmp_path / "o",
                       "--steps", 2, "--batch-size", 4, "--no-progress")
    assert code == 0, capsys.readouterr().err


def test_sampled_draws_never_pick_padding(tmp_path, tiny_teachers, corpus_dir):
    S = 64
    cache, _ = produce(tiny_teachers["qwen2"], corpus_dir, tmp_path, "--encoding", "sampled",
                       "--encoding-param", f"S={S}")
    assert manifest(cache)["teacher"]["usable_vocab_size"] == TINY_VOCAB
    b = read_all(cache)
    drawn = b["sample_ids"][b["sample_counts"] > 0]
    assert drawn.numel() > 0 and int(drawn.max()) < TINY_VOCAB
    ref = masked_reference(tiny_teachers["qwen2"], b["input_ids"])
    target = ref.gather(1, b["labels"].reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(b["target_logprob"].reshape(-1).double(), target, rtol=0, atol=2e-5)


def test_hf_backend_masks_its_draws_and_without_the_mask_would_draw_padding(tiny_teachers):
    """The masking is what keeps padding out: the same draws over all 384 columns hit padding ids."""
    window = (np.arange(9, dtype=np.int32)[None, :] * 37 % TINY_VOCAB)        # (1, 9): 8 positions
    u = window_uniforms("test-key", [0], 8, 2000)
    kept = HFBackend(str(tiny_teachers["qwen2"]), K, dtype="float32", usable_vocab=TINY_VOCAB).sample(window, 2000, u)
    every = HFBackend(str(tiny_teachers["qwen2"]), K, dtype="float32").sample(window, 2000, u)
    assert int(kept.sample_ids[kept.sample_counts > 0].max()) < TINY_VOCAB
    assert int(every.sample_ids[every.sample_counts > 0].max()) >= TINY_VOCAB


def test_key_names_the_usable_vocabulary_only_when_padding_is_masked():
    teacher = {"name_or_path": "t", "revision": None, "config_sha256": "c", "weights_fingerprint": "w",
               "dtype": "float32", "vocab_size": 384}
    tok, data, enc = {"fingerprint": "f"}, {"fingerprint": "d", "seq_len": 16}, {"name": "fp32", "params": {}}
    plain = cache_key(teacher, tok, data, K, enc)
    assert cache_key(dict(teacher, usable_vocab_size=384), tok, data, K, enc) == plain   # unpadded: key as before
    assert cache_key(dict(teacher, usable_vocab_size=320), tok, data, K, enc) != plain


# ---------------------------------------------------------------------------------------------
# vLLM (a real engine on CPU)
# ---------------------------------------------------------------------------------------------

VLLM_SEQ_LEN = 32


def _save_padded_qwen2(folder: Path, tokenizer_dir: Path) -> Path:
    """Qwen2, hidden 64, 2 heads of 32 (vLLM's CPU attention needs >= 32), 384 columns for 320 tokens,
    tied embeddings, LM head x3 so the padding rows reach the top-k; context one window."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=VLLM_SEQ_LEN + 1,
                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@needs_vllm
def test_vllm_masks_padding_as_the_hf_backend_does(tmp_path, tiny_tokenizer_dir, corpus_dir):
    teacher = _save_padded_qwen2(tmp_path / "teacher", tiny_tokenizer_dir)
    common = ["--k", "16", "--encoding", "fp32", "--seq-len", str(VLLM_SEQ_LEN), "--max-windows", "16"]
    caches = {}
    for backend in ("hf", "vllm"):   # hf first: the vLLM CPU worker pins this process's threads
        caches[backend], err = produce(teacher, corpus_dir, tmp_path / backend, *common, "--backend", backend)
        assert "columns 320..383 masked out" in err
    h, v = read_all(caches["hf"]), read_all(caches["vllm"])
    assert caches["hf"].name == caches["vllm"].name
    assert manifest(caches["vllm"])["teacher"]["usable_vocab_size"] == TINY_VOCAB
    assert int(h["topk_ids"].max()) < TINY_VOCAB and int(v["topk_ids"].max()) < TINY_VOCAB
    # unmasked, this teacher puts padding ids in the top-16 (else the test would prove nothing)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(h["input_ids"]).logits.topk(16, dim=-1).indices >= TINY_VOCAB).float().mean() > 0.05
    assert (h["topk_logprobs"] - v["topk_logprobs"]).abs().max().item() <= LP_TOL
    assert (h["target_logprob"] - v["target_logprob"]).abs().max().item() <= LP_TOL
    assert (h["tail_logmass"].double().exp() - v["tail_logmass"].double().exp()).abs().max().item() <= TAIL_MASS_TOL
    assert (h["topk_ids"] != v["topk_ids"]).float().mean().item() < 0.01
