"""DistillKit's per-position codec, checked bit by bit on hand-computed positions.

The expected bytes below were worked out by hand from the layout's definition (docs/interop.md): ids
most significant bit first at ceil(log2 d) bits, floats little-endian, bfloat16 rounded to nearest
even, residual codes `round(v / scale) + 2^(bits-1)` with `scale = max|v| / 2^(bits-1)`. Round trips
of our encoder are then held to each configuration's stated error: exact values to their dtype's
rounding, polynomial values to the least-squares fit's own residual (computed here independently, in
float64), binned residuals to half a quantisation step.
"""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.errors import UserError
from logitcache.interop import distillkit_codec as codec
from logitcache.interop.distillkit_bits import bytes_float, pack_bits, pack_words, unpack_bits, unpack_words
from logitcache.interop.distillkit_config import (
    budget,
    id_bits,
    load_config,
    parse_compression,
    parse_legacy,
    recommended,
    yaml_text,
)


def cfg(**kw):
    base = dict(d=8192, k=4, exact_k=4, exact_dtype="float32", residual_bins=[], delta_encoding=False)
    return parse_compression({**base, **kw}, "test")


# -- ids -------------------------------------------------------------------------------------------

def test_13_bit_ids_are_packed_most_significant_bit_first():
    # 1 = 0000000000001, 8191 = 1111111111111, 4096 = 1000000000000; 39 bits + 1 bit of padding:
    # 00000000 | 00001 111 | 11111111 | 11 100000 | 0000000 0
    assert id_bits(8192) == 13 and id_bits(8193) == 14
    packed = pack_bits(np.array([[1, 8191, 4096]]), 13)
    assert packed.tolist() == [[0x00, 0x0F, 0xFF, 0xE0, 0x00]]
    c = cfg(d=8192, k=3, exact_k=3)
    assert c.index_bytes == 5
    assert codec.decode_ids(packed, c).tolist() == [[1, 8191, 4096]]


def test_18_bit_ids_of_a_152k_vocabulary():
    # 151935 = 2^17 + 2^14 + 2^12 + 2^8 + 127 = 100101000101111111, 5 = 000000000000000101:
    # 10010100 | 01011111 | 11 000000 | 00000000 | 0101 0000
    assert id_bits(151936) == 18
    packed = pack_bits(np.array([[151935, 5]]), 18)
    assert packed.tolist() == [[0x94, 0x5F, 0xC0, 0x00, 0x50]]
    assert unpack_bits(packed, 18, 2).tolist() == [[151935, 5]]


@pytest.mark.parametrize("bits", [1, 3, 9, 13, 17, 18, 33, 53, 64])
def test_packing_round_trips_any_width(bits):
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**min(bits, 63), size=(7, 37), dtype=np.uint64)
    if bits == 64:
        x[0, 0] = np.uint64(2**64 - 1)
    packed = pack_bits(x, bits)
    assert packed.shape == (7, (37 * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 37), x)


def test_legacy_ids_sit_in_64_bit_words_least_significant_first():
    # 13 bits: 4 ids a word at offsets 0, 13, 26, 39
    assert pack_words(np.array([[1, 2, 3]]), 13).tolist() == [[1 + (2 << 13) + (3 << 26)]]
    # 18 bits: 3 ids a word, the fourth starts the next word
    words = pack_words(np.array([[5, 6, 7, 8]]), 18)
    assert words.tolist() == [[5 + (6 << 18) + (7 << 36), 8]]
    # Parquet may hand the words back as signed int64: the same bits
    np.testing.assert_array_equal(unpack_words(words.view(np.int64), 18, 4), [[5, 6, 7, 8]])


# -- values ----------------------------------------------------------------------------------------

def test_bf16_exact_values_round_to_nearest_even_little_endian():
    c = cfg(k=3, exact_k=3, exact_dtype="bfloat16")
    # -0.5 = 0xBF00, -1.0 = 0xBF80; -0.1 = 0xBDCCCCCD in float32, whose low half 0xCCCD > 0x8000 rounds up: 0xBDCD
    data = codec.encode_logprobs(np.array([[-0.1, -0.5, -1.0]]), c)
    assert data.tolist() == [[0xCD, 0xBD, 0x00, 0xBF, 0x80, 0xBF]]
    np.testing.assert_array_equal(codec.decode_logprobs(data, c), [[-0.10009765625, -0.5, -1.0]])


def test_fp32_exact_values_are_kept_bit_for_bit():
    c = cfg(k=2, exact_k=2, exact_dtype="float32")
    data = codec.encode_logprobs(np.array([[-0.1, -0.5]], dtype=np.float32), c)
    assert data.tolist() == [[0xCD, 0xCC, 0xCC, 0xBD, 0x00, 0x00, 0x00, 0xBF]]
    np.testing.assert_array_equal(codec.decode_logprobs(data, c), np.array([[-0.1, -0.5]], dtype=np.float32))


def test_a_polynomial_with_a_sqrt_term():
    # ranks 1..4 follow -2 - sqrt(t) for t = 0..3 exactly, so the fit is c = (-2, -1)
    c = cfg(k=5, exact_k=1, exact_dtype="float32", polynomial_terms=[0, "sqrt"], term_dtype="float32")
    values = np.array([[-0.5, -2.0, -3.0, -2 - np.sqrt(2), -2 - np.sqrt(3)]], dtype=np.float32)
    data = codec.encode_logprobs(values, c)
    assert c.logprob_bytes == 12 and data.shape == (1, 12)
    assert data[0, :4].tolist() == [0x00, 0x00, 0x00, 0xBF]                      # the exact -0.5
    np.testing.assert_allclose(bytes_float(data[:, 4:12], "float32"), [[-2.0, -1.0]], atol=1e-6)
    np.testing.assert_allclose(codec.decode_logprobs(data, c), values, atol=2e-6)


def test_residual_bins_by_hand():
    # values -1..-4: scale = 4 / 2^3 = 0.5 (fp16 0x3800); codes round(v / 0.5) + 8 = 6, 4, 2, 0 -> 0110 0100 0010 0000
    c = cfg(k=4, exact_k=0, residual_bins=[{"scale_dtype": "float16", "element_bits": 4, "num_elements": 4}])
    data = codec.encode_logprobs(np.array([[-1.0, -2.0, -3.0, -4.0]]), c)
    assert data.tolist() == [[0x00, 0x38, 0x64, 0x20]]
    np.testing.assert_array_equal(codec.decode_logprobs(data, c), [[-1.0, -2.0, -3.0, -4.0]])


def test_delta_encoding_stores_the_first_value_then_differences():
    c = cfg(k=3, exact_k=3, delta_encoding=True)
    data = codec.encode_logprobs(np.array([[-1.0, -1.5, -2.5]]), c)
    # -1.0, then -0.5, -1.0: 0xBF800000, 0xBF000000, 0xBF800000
    assert data.tolist() == [[0, 0, 0x80, 0xBF, 0, 0, 0, 0xBF, 0, 0, 0x80, 0xBF]]
    np.testing.assert_array_equal(codec.decode_logprobs(data, c), [[-1.0, -1.5, -2.5]])


def teacher_like(P: int = 400, k: int = 64, seed: int = 0) -> np.ndarray:
    """Sorted top-k log-probs of softmaxes over 2,000 logits with a heavy head (what a teacher gives)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_t(3, size=(P, 2000)) * 1.5
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.sort(-lp, axis=-1)[:, :k].astype(np.float32)


def lstsq_residual(values: np.ndarray, c) -> np.ndarray:
    """Per-position largest error of the best float64 least-squares fit: what the polynomial cannot do."""
    t = np.arange(c.approx_terms, dtype=np.float64)
    X = np.stack([np.sqrt(t) if term == "sqrt" else t ** term for term in c.terms], -1)
    y = values[:, c.exact_k:c.k].astype(np.float64)
    fit = y @ np.linalg.pinv(X).T @ X.T
    return np.abs(fit - y).max(-1)


@pytest.mark.parametrize("make", [recommended, budget])
def test_presets_round_trip_within_their_fit_error(make):
    c = make(8192)
    c = parse_compression({**c.to_dict(), "k": min(c.k, 64)}, "test")
    values = teacher_like()[:, :c.k]
    back = codec.decode_logprobs(codec.encode_logprobs(values, c), c)
    # exact part: bf16 rounding (relative 2^-8 at most); the rest: the fit's residual plus float32 rounding
    assert (np.abs(back[:, :c.exact_k] - values[:, :c.exact_k]) <= 2**-8 * np.abs(values[:, :c.exact_k])).all()
    err = np.abs(back[:, c.exact_k:] - values[:, c.exact_k:]).max(-1)
    assert (err <= lstsq_residual(values, c) + 1e-4).all()
    assert c.logprob_bytes == c.exact_k * 2 + len(c.terms) * 4


@pytest.mark.parametrize("diffuse", [False, True])
def test_binned_residuals_stay_within_their_quantisation_step(diffuse):
    bins = [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 56}]
    c = cfg(k=64, exact_k=8, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, "sqrt"], error_diffusion=diffuse,
            residual_bins=bins)
    plain = cfg(k=64, exact_k=8, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, "sqrt"])
    values = teacher_like()
    back = codec.decode_logprobs(codec.encode_logprobs(values, c), c)[:, 8:] - values[:, 8:]
    fit_only = codec.decode_logprobs(codec.encode_logprobs(values, plain), plain)[:, 8:] - values[:, 8:]
    step = np.abs(fit_only).max(-1, keepdims=True) / 8          # the bin's scale: max |residual| / 2^(4-1)
    if not diffuse:
        # half a step of rounding, a whole one where a positive extreme is clipped to code 2^3 - 1, and the
        # residual's bf16 rounding before it is added (8 steps x 2^-8)
        assert (np.abs(back) <= step * (1 + 8 * 2**-8)).all()
    else:
        # each rounding error is carried into the next element: single errors grow, their running sum does not
        assert (np.abs(np.cumsum(back, -1)) <= 3 * step).all()
    assert np.abs(back).mean() < np.abs(fit_only).mean() / 4


def test_legacy_values_round_trip():
    c = parse_legacy({"k": 64, "exact_k": 16, "polynomial_degree": 4, "vocab_size": 8192, "with_sqrt_term": True},
                     "test")
    values, ids = teacher_like(), np.tile(np.arange(64), (400, 1))
    words, exact, coeffs = codec.encode_legacy(ids, values, c)
    assert words.shape == (400, 16) and exact.shape == (400, 16) and coeffs.shape == (400, 6)
    got_ids, got = codec.decode_legacy(words, exact, coeffs, c)
    np.testing.assert_array_equal(got_ids, ids)
    # fp16 rounding: relative 2^-11, or half the subnormal spacing 2^-24 near 0 (log-probs of ~1)
    assert (np.abs(got[:, :16] - values[:, :16]) <= 2**-11 * np.abs(values[:, :16]) + 2**-25).all()


# -- configs ---------------------------------------------------------------------------------------

def test_configs_read_as_distillkit_writes_them_and_refuse_what_it_would_misread():
    c = recommended(151936)
    again = load_config(yaml_text(c), "cc.yaml")
    assert again == c and c.index_bytes == 288 and c.logprob_bytes == 16 * 2 + 6 * 4
    training = load_config("teacher:\n  kind: dataset\n  logprob_compressor:\n" + "".join(
        f"    {line}\n" for line in yaml_text(c).splitlines()), "train.yaml")
    assert training == c
    legacy = load_config("legacy_logit_compression: {vocab_size: 128256, k: 128, exact_k: 32, polynomial_degree: 8}",
                         "x")
    assert legacy.id_bits == 17 and legacy.words == 43 and legacy.num_coeffs == 9    # 3 ids of 17 bits a word
    for text, match in [("d: 8192\nk: 8\nexact_k: 2\nresidual_bins: []\ndelta_encodng: false", "delta_encodng"),
                        ("d: 8192\nk: 8\nexact_k: 2\nresidual_bins: []", "needs polynomial_terms or residual_bins"),
                        ("d: 8192\nk: 8\nexact_k: 9\nresidual_bins: []", "must be >= exact_k"),
                        ("d: 8192\nk: 8\nexact_k: 2", "residual_bins is required"),
                        ("d: 8192\nk: 8\nexact_k: 2\nresidual_bins: []\npolynomial_terms: [0, -1]", "term -1"),
                        ("d: 8192\nk: 8\nexact_k: 2\nresidual_bins: []\nexact_dtype: int8", "exact_dtype 'int8'"),
                        ("just: text", "not a DistillKit compression config"), ("[1, 2", "not YAML")]:
        with pytest.raises(UserError, match=match):
            load_config(text, "cc.yaml")
