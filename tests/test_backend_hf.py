"""The transformers backend and teacher identity: every position of four architectures against a
direct float32 computation, chunked LM head against unchunked, fingerprints and refusals.

Reference: `model(input_ids).logits` in float32, `log_softmax` over the full width, `torch.topk`.
Tolerance 2e-5 absolute on log-probs, tail and target: both sides are float32 reductions of the
same logits (|log-probs| < ~10 here, so one ulp is ~1e-6) and the hidden states come from the same
kernels, so anything above a few ulps is a real difference. Top-k ids are compared as sets except
where the k-th and (k+1)-th reference values are within that tolerance (a tie may pick either id).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.backends import TopK, make_backend, resolve_backend_name
from logitcache.backends.hf import HFBackend, default_logits_chunk
from logitcache.backends.teacher import (
    check_seq_len,
    check_tokenizer_fits,
    config_sha256,
    describe_teacher,
    load_tokenizer,
    max_context,
)
from logitcache.data import prepare_windows
from logitcache.errors import UserError

ATOL = 2e-5
K = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared machine run faster, and reproducibly, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def windows(corpus_dir, tiny_tokenizer_dir) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return prepare_windows(str(corpus_dir), tok, seq_len=24, max_windows=6).tokens


def reference(folder, windows):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.as_tensor(windows, dtype=torch.long)
    with torch.inference_mode():
        logits = model(x[:, :-1]).logits.float()
    return torch.log_softmax(logits, -1), x[:, 1:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_every_position_matches_full_vocabulary_log_softmax(arch, tiny_teachers, windows):
    backend = HFBackend(str(tiny_teachers[arch]), K, "cpu", "float32", chunk_size=37)
    out = backend.run(windows)
    assert isinstance(out, TopK)
    ids, lp, tail, tgt = (torch.from_numpy(a) for a in out)
    B, T = windows.shape[0], windows.shape[1] - 1
    assert ids.shape == (B, T, K) and ids.dtype == torch.int32 and lp.dtype == torch.float32
    assert tail.shape == tgt.shape == (B, T)

    logp, targets = reference(tiny_teachers[arch], windows)
    assert logp.shape[-1] == backend.describe()["vocab_size"]
    ref = torch.topk(logp, K + 1, dim=-1)
    torch.testing.assert_close(lp, ref.values[..., :K], atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, logp.gather(-1, ids.long()), atol=ATOL, rtol=0)
    clear = (ref.values[..., K - 1] - ref.values[..., K]) > ATOL        # no tie at the boundary
    assert clear.float().mean() > 0.9
    for b, t in clear.nonzero().tolist():
        assert set(ids[b, t].tolist()) == set(ref.indices[b, t, :K].tolist())
    masked = logp.double().scatter(-1, ids.long(), float("-inf"))
    torch.testing.assert_close(tail.double(), torch.logsumexp(masked, -1), atol=ATOL, rtol=0)
    total = lp.double().exp().sum(-1) + tail.double().exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    torch.testing.assert_close(tgt, logp.gather(-1, targets[..., None]).squeeze(-1), atol=ATOL, rtol=0)
    backend.close()


def test_chunked_head_equals_unchunked(tiny_teachers, windows):
    """Same values to a few ulps (BLAS may block a 1-row and a 10^6-row matmul differently)."""
    folder = str(tiny_teachers["llama"])
    whole = HFBackend(folder, K, "cpu", "float32", chunk_size=10**6).run(windows)
    for chunk in (1, 5, 64):
        part = HFBackend(folder, K, "cpu", "float32", chunk_size=chunk).run(windows)
        assert np.array_equal(part.ids, whole.ids)
        for a, b in zip(part[1:], whole[1:]):
            np.testing.assert_allclose(a, b, atol=4e-6, rtol=0)


def test_padded_vocabulary_is_cut_to_the_usable_columns(tiny_teachers, windows, tiny_tokenizer_dir):
    """Qwen2-style padding: with `usable_vocab` (what the producer passes: the tokenizer's length)
    the padding columns are masked out before the softmax; without it every column counts.
    tests/test_padded_vocab.py checks the producer's caches end to end."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    n = len(tok)
    masked = HFBackend(str(tiny_teachers["qwen2"]), K, "cpu", "float32", usable_vocab=n)
    assert masked.describe()["vocab_size"] > n and masked.describe()["usable_vocab_size"] == n
    x = torch.as_tensor(windows, dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(tiny_teachers["qwen2"], dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(x[:, :-1]).logits.float()
    out = masked.run(windows)
    assert out.ids.max() < n
    ref = torch.log_softmax(logits[..., :n], -1)
    torch.testing.assert_close(torch.from_numpy(out.logprobs), ref.topk(K, -1).values, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.from_numpy(out.target_logprob), ref.gather(-1, x[:, 1:, None])[..., 0],
                               atol=ATOL, rtol=0)
    every = HFBackend(str(tiny_teachers["qwen2"]), K, "cpu", "float32").run(windows)
    torch.testing.assert_close(torch.from_numpy(every.logprobs[..., 0]),
                               torch.log_softmax(logits, -1).max(-1).values, atol=ATOL, rtol=0)


def test_k_equal_to_vocabulary(tiny_teachers, windows):
    backend = HFBackend(str(tiny_teachers["gpt2"]), 320, "cpu", "float32")
    out = backend.run(windows[:1])
    assert np.isneginf(out.tail_logmass).all()
    np.testing.assert_allclose(np.exp(out.logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_bfloat16_teacher_runs_close_to_float32(tiny_teachers, windows):
    folder = str(tiny_teachers["llama"])
    ref = HFBackend(folder, K, "cpu", "float32").run(windows[:2])
    bf = HFBackend(folder, K, "cpu", "bfloat16")
    assert bf.describe()["dtype"] == "bfloat16"
    out = bf.run(windows[:2])
    assert out.logprobs.dtype == np.float32
    np.testing.assert_allclose(out.target_logprob, ref.target_logprob, atol=0.1)   # bf16 weights: ~1e-2


def test_make_backend_hf(tiny_teachers):
    if not torch.cuda.is_available():
        assert resolve_backend_name("auto") == "hf"
    backend = make_backend("hf", str(tiny_teachers["gpt_neox"]), k=4)
    assert backend.name == "hf" and backend.k == 4
    assert set(backend.versions()) >= {"torch", "transformers"}
    with pytest.raises(UserError, match="backend nope"):
        resolve_backend_name("nope")


def test_a_head_that_is_not_a_plain_projection_is_refused(tmp_path, tiny_tokenizer_dir):
    """Gemma 2 soft-caps its logits after the head: chunking the head alone would cache wrong values."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=1.0, initializer_range=0.5)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a plain projection"):
        HFBackend(str(tmp_path), 4, "cpu", "float32")


def test_default_chunk_sizes():
    assert default_logits_chunk(8192, "cpu") * 8192 * 4 == 16 << 20
    assert default_logits_chunk(152064, "cuda") * 152064 * 4 <= 256 << 20
    assert default_logits_chunk(10**9, "cpu") == 1


def test_k_larger_than_vocabulary_is_refused(tiny_teachers):
    with pytest.raises(UserError, match="k 321"):
        HFBackend(str(tiny_teachers["gpt2"]), 321, "cpu", "float32")


# -- teacher identity ------------------------------------------------------------------------------


def test_describe_teacher_fields_and_stability(tiny_teachers):
    folder = tiny_teachers["llama"]
    a = describe_teacher(str(folder), None, "auto")
    assert set(a) == {"name_or_path", "revision", "architecture", "dtype", "num_parameters", "config_sha256",
                      "weights_fingerprint", "vocab_size", "max_position_embeddings"}
    assert a["architecture"] == "LlamaForCausalLM" and a["dtype"] == "float32" and a["vocab_size"] == 320
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert a["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert describe_teacher(str(folder) + "/", None, "auto") == a          # path spelling does not matter
    assert describe_teacher(str(folder), None, "bfloat16")["dtype"] == "bfloat16"


def test_config_hash_ignores_volatile_fields(tiny_teachers):
    config = json.loads((tiny_teachers["llama"] / "config.json").read_text())
    moved = dict(config, transformers_version="0.0.1", _name_or_path="/elsewhere")
    assert config_sha256(moved) == config_sha256(config)
    assert config_sha256(dict(config, num_hidden_layers=3)) != config_sha256(config)


def test_weights_fingerprint_changes_with_retrained_weights(tmp_path, tiny_teachers, tiny_tokenizer_dir):
    from conftest import save_tiny_teacher

    a = save_tiny_teacher(tmp_path / "a", "llama", tiny_tokenizer_dir, seed=0)
    b = save_tiny_teacher(tmp_path / "b", "llama", tiny_tokenizer_dir, seed=5)
    da, db = describe_teacher(str(a)), describe_teacher(str(b))
    assert da["config_sha256"] == db["config_sha256"]
    assert da["weights_fingerprint"] != db["weights_fingerprint"]
    assert da["weights_fingerprint"] == describe_teacher(str(tiny_teachers["llama"]))["weights_fingerprint"]


def test_missing_teacher_and_missing_weights(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        describe_teacher(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(UserError, match="no weight files"):
        describe_teacher(str(tmp_path))
    with pytest.raises(UserError, match="no usable tokenizer"):
        load_tokenizer(tmp_path / "nope")


def test_tokenizer_and_context_checks(tiny_teachers, tiny_tokenizer_dir):
    teacher = describe_teacher(str(tiny_teachers["gpt2"]))
    tok = load_tokenizer(tiny_tokenizer_dir)
    check_tokenizer_fits(tok, teacher)                                        # equal sizes
    check_tokenizer_fits(tok, dict(teacher, vocab_size=512))                  # padded model
    with pytest.raises(UserError, match="tokenizer has 320 tokens but the model's vocabulary is 300"):
        check_tokenizer_fits(tok, dict(teacher, vocab_size=300))
    assert max_context({"n_positions": 1024}) == 1024 and max_context({}) is None
    check_seq_len(63, teacher)                                                # a window is seq_len + 1 tokens
    with pytest.raises(UserError, match="seq_len 64: a window of seq_len . 1 = 65 tokens"):
        check_seq_len(64, teacher)
