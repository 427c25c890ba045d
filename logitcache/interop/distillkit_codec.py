"""DistillKit's per-position codec, written from its definition (docs/interop.md names the commit read).

`compressed_logprobs` of one position is, in this order:

1. the first `exact_k` values in `exact_dtype`, little-endian;
2. one coefficient per polynomial term in `term_dtype`: the values at ranks `exact_k .. k-1` are fitted
   as `sum_j c_j * f_j(t)` with `t = 0 .. k - exact_k - 1` (or `t / (k - exact_k - 1)` under `normalize_t`)
   and `f_j(t)` = `t ** j` for an integer term, `sqrt(t)` or `exp(t)`, all evaluated in `term_dtype`;
3. per residual bin, a scale in `scale_dtype` and `num_elements` codes of `element_bits` packed most
   significant bit first; code q stands for `(q - 2^(bits-1)) * scale` (1-bit codes: `(2q - 1) * scale`),
   added (rounded to `exact_dtype`) to the polynomial at the next ranks; ranks past the bins get none.

With `delta_encoding` the stored sequence is the first value then the differences of consecutive
values, and decoding ends with a cumulative sum (in float32, then rounded to `exact_dtype`).
`bytepacked_indices` is the k ids at ceil(log2 d) bits, most significant bit first, in the same order.

Decoding follows DistillKit's dtypes step by step (values rounded where it rounds them), so the result
agrees with its decoder to a float32 rounding or two. Encoding is ours: the polynomial is fitted by
least squares in float64 (DistillKit fits in float32), the rest as defined.
"""

from __future__ import annotations

import numpy as np

from logitcache.interop.distillkit_bits import (
    bytes_float,
    float_bytes,
    pack_bits,
    pack_words,
    to_dtype,
    unpack_bits,
    unpack_words,
)
from logitcache.interop.distillkit_config import DTYPE_BYTES, CompressionConfig, LegacyConfig


def _promote(a: str, b: str) -> str:
    """torch's result dtype of an operation on two float dtypes."""
    if "float64" in (a, b):
        return "float64"
    return a if a == b else "float32"


def _wide(dtype: str):
    return np.float64 if dtype == "float64" else np.float32


def rank_terms(terms: tuple, n: int, dtype: str, normalize_t: bool) -> np.ndarray:
    """[n, len(terms)] basis of the polynomial over the ranks, each entry rounded to `dtype`."""
    pts = np.linspace(0.0, 1.0, n) if normalize_t else np.arange(n, dtype=np.float64)
    pts = to_dtype(pts, dtype).astype(np.float64)
    cols = []
    for term in terms:
        if term == "sqrt":
            cols.append(np.sqrt(pts))
        elif term == "exp":
            cols.append(np.exp(pts))
        else:
            cols.append(pts ** int(term))    # 0 ** 0 = 1, as in torch
    X = np.stack(cols, axis=-1) if cols else np.zeros((n, 0))
    return to_dtype(X, dtype)


def poly_eval(coeffs: np.ndarray, X: np.ndarray, dtype: str) -> np.ndarray:
    """sum_j X[t, j] * coeffs[..., j] in `dtype`: products rounded to it, summed in float32 or wider
    (torch's reduction) and rounded once more."""
    wide = _wide(dtype)
    prods = to_dtype(X.astype(wide)[None] * coeffs.astype(wide)[:, None, :], dtype)   # [P, n, m]
    return to_dtype(prods.astype(wide).sum(-1), dtype)


def _quant_range(bits: int) -> tuple[int, int]:
    return (0, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def dequantize(codes: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Codes [P, n] (uint64) and scales [P, 1] -> residuals, as DistillKit's `dequantize`."""
    if bits == 1:
        return (codes.astype(np.float32) * 2.0 - 1.0) * scale
    qmin, _ = _quant_range(bits)
    return (codes.astype(np.int64) + qmin).astype(np.float32) * scale


def decode_logprobs(data: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """[P, logprob_bytes] uint8 -> [P, k] float64 log-probs (values as DistillKit's decoder gives them)."""
    P = data.shape[0]
    out = cfg.exact_dtype
    e = cfg.exact_k * DTYPE_BYTES[out]
    exact = bytes_float(data[:, :e], out)
    at = e
    coeffs = None
    if cfg.terms:
        c = len(cfg.terms) * DTYPE_BYTES[cfg.term_dtype]
        coeffs = bytes_float(data[:, at:at + c], cfg.term_dtype)
        at += c
    parts = []
    for b in cfg.residual_bins:
        s = DTYPE_BYTES[b.scale_dtype]
        scale = bytes_float(data[:, at:at + s], b.scale_dtype)
        at += s
        nb = (b.element_bits * b.num_elements + 7) // 8
        parts.append(dequantize(unpack_bits(data[:, at:at + nb], b.element_bits, b.num_elements), scale,
                                b.element_bits))
        at += nb
    n = cfg.approx_terms
    if parts:
        residual = np.concatenate(parts, axis=-1)
        residual = np.pad(residual, ((0, 0), (0, n - residual.shape[1])))
    else:
        residual = np.zeros((P, n), dtype=_wide(out))
    residual = to_dtype(residual, out)             # `residual.to(out_dtype)` before it is added
    approx_dtype = out
    approx = residual
    if coeffs is not None:
        fit = poly_eval(coeffs, rank_terms(cfg.terms, n, cfg.term_dtype, cfg.normalize_t), cfg.term_dtype)
        approx_dtype = _promote(cfg.term_dtype, out)
        approx = to_dtype(fit.astype(np.float64) + residual.astype(np.float64), approx_dtype)
    values = np.concatenate([exact.astype(np.float64), approx.astype(np.float64)], axis=-1)
    if cfg.delta_encoding:
        # DistillKit: cumsum of the values as float32 (accumulated wider on CPU), then `.to(exact_dtype)`
        values = to_dtype(to_dtype(np.cumsum(to_dtype(values, "float32").astype(np.float64), axis=-1),
                                   "float32"), out)
    else:
        values = to_dtype(values, _promote(out, approx_dtype))
    return np.asarray(values, dtype=np.float64)


def _fit(values: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Least-squares coefficients [P, m] of values [P, n] on the basis X [n, m], in float64."""
    if X.shape[0] == 0:
        return np.zeros((values.shape[0], X.shape[1]))
    return values.astype(np.float64) @ np.linalg.pinv(X.astype(np.float64)).T


def _quantize(values: np.ndarray, bits: int, scale_dtype: str, carry: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(scale [P, 1], codes [P, n], carried error) of one bin; with `carry` (error diffusion) each
    element's rounding error is added to the next one, across bins too."""
    top = np.abs(values).max(axis=-1, keepdims=True)
    scale = np.where(top == 0, 1.0, top / (1.0 if bits == 1 else float(1 << (bits - 1))))
    scale = to_dtype(scale.astype(values.dtype), scale_dtype).astype(values.dtype)
    scaled = values / scale
    qmin, qmax = _quant_range(bits)
    if carry is None:
        return scale, (np.clip(np.round(scaled), qmin, qmax) - qmin).astype(np.uint64), None
    codes = np.zeros(scaled.shape, dtype=np.uint64)
    for i in range(scaled.shape[1]):
        current = scaled[:, i] + carry
        q = np.clip(np.round(current), qmin, qmax)
        carry = (current - q).astype(scaled.dtype)
        codes[:, i] = (q - qmin).astype(np.uint64)
    return scale, codes, carry


def encode_logprobs(logprobs: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """[P, k] log-probs sorted descending (finite) -> [P, logprob_bytes] uint8."""
    v = np.asarray(logprobs, dtype=np.float32)[:, :cfg.k]
    if cfg.delta_encoding:
        work = np.float64 if cfg.error_diffusion else np.float32
        deltas = np.concatenate([v[:, :1].astype(work), np.diff(v.astype(work), axis=-1)], axis=-1)
        if cfg.error_diffusion:      # each delta rounded to float32 with the previous rounding error carried
            carry = np.zeros(len(v))
            for i in range(cfg.k):
                current = deltas[:, i] + carry
                deltas[:, i] = current.astype(np.float32)
                carry = current - deltas[:, i]
        v = deltas.astype(np.float32)
    chunks = [float_bytes(v[:, :cfg.exact_k], cfg.exact_dtype)]
    rest = v[:, cfg.exact_k:]
    if cfg.terms:
        X = rank_terms(cfg.terms, cfg.approx_terms, cfg.term_dtype, cfg.normalize_t)
        coeffs = to_dtype(_fit(rest, X), cfg.term_dtype)
        chunks.append(float_bytes(coeffs, cfg.term_dtype))
        rest = (rest - poly_eval(coeffs, X, cfg.term_dtype)).astype(np.float32)
    carry = np.zeros(len(v), dtype=np.float32) if cfg.error_diffusion else None
    at = 0
    for b in cfg.residual_bins:
        scale, codes, carry = _quantize(rest[:, at:at + b.num_elements], b.element_bits, b.scale_dtype, carry)
        chunks += [float_bytes(scale, b.scale_dtype), pack_bits(codes, b.element_bits)]
        at += b.num_elements
    return np.ascontiguousarray(np.concatenate(chunks, axis=-1), dtype=np.uint8)


def encode_ids(ids: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """[P, k] ids in rank order -> [P, index_bytes] uint8."""
    return pack_bits(np.asarray(ids)[:, :cfg.k], cfg.id_bits)


def decode_ids(data: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """[P, index_bytes] uint8 -> [P, k] int64 ids."""
    return unpack_bits(data, cfg.id_bits, cfg.k).astype(np.int64)


# -- the legacy layout ---------------------------------------------------------------------------

def legacy_terms(cfg: LegacyConfig) -> np.ndarray:
    """[k - exact_k, m] float32 basis over the 1-based ranks a: a ** (-i or i) for i in 0..degree, then sqrt(a)."""
    a = np.arange(1, cfg.k - cfg.exact_k + 1, dtype=np.float32)
    cols = [a ** np.float32(-i if cfg.invert_polynomial else i) for i in range(cfg.polynomial_degree + 1)]
    if cfg.with_sqrt_term:
        cols.append(np.sqrt(a))
    return np.stack(cols, axis=-1).astype(np.float32)


def decode_legacy(words: np.ndarray, exact: np.ndarray, coeffs: np.ndarray, cfg: LegacyConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-position legacy arrays ([P, words], [P, exact_k], [P, num_coeffs]) -> ids [P, k], values [P, k]."""
    ids = unpack_words(words, cfg.id_bits, cfg.k).astype(np.int64)
    if cfg.num_coeffs:
        approx = (legacy_terms(cfg)[None] * coeffs.astype(np.float32)[:, None, :]).sum(-1, dtype=np.float32)
    else:
        approx = np.zeros((len(exact), cfg.k - cfg.exact_k), dtype=np.float32)
    return ids, np.concatenate([exact.astype(np.float32), approx], axis=-1).astype(np.float64)


def encode_legacy(ids: np.ndarray, values: np.ndarray, cfg: LegacyConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids and values [P, k] -> the legacy row's per-position words, exact values (fp16-rounded, as
    float32) and coefficients (rounded to term_dtype, as float32)."""
    v = np.asarray(values, dtype=np.float32)
    exact = to_dtype(v[:, :cfg.exact_k], "float16")
    coeffs = (to_dtype(_fit(v[:, cfg.exact_k:cfg.k], legacy_terms(cfg)), cfg.term_dtype).astype(np.float32)
              if cfg.num_coeffs else np.zeros((len(v), 0), dtype=np.float32))
    return pack_words(np.asarray(ids)[:, :cfg.k], cfg.id_bits), exact, coeffs
