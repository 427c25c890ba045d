"""The bit-level primitives of DistillKit's layout: integers packed most significant bit first, the
64-bit words of its legacy layout, and floats as the little-endian bytes torch's `view(torch.uint8)`
gives (bfloat16 included, which numpy lacks).

All functions work on the last axis and are vectorised over the others.
"""

from __future__ import annotations

import numpy as np

# Work on at most this many unpacked bits at once (one byte each), so memory stays bounded.
_CHUNK_BITS = 1 << 25


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] non-negative integers -> [..., ceil(n * bits / 8)] uint8: each value's `bits` low bits,
    most significant first, values one after another, the last byte padded with zero bits
    (DistillKit's `pack_to_bytes`)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, not {bits}")
    x = np.ascontiguousarray(values).astype(np.uint64)
    lead, n = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, n)
    out = np.empty((flat.shape[0], (n * bits + 7) // 8), dtype=np.uint8)
    step = max(1, _CHUNK_BITS // max(1, n * bits))
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    for s in range(0, flat.shape[0], step):
        part = flat[s:s + step]
        planes = ((part[..., None] >> shifts) & np.uint64(1)).astype(np.uint8)   # [rows, n, bits]
        out[s:s + step] = np.packbits(planes.reshape(len(part), n * bits), axis=-1)
    return out.reshape(*lead, out.shape[-1])


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of `pack_bits`: [..., m] uint8 -> [..., n] uint64 (m * 8 >= n * bits)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, not {bits}")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    lead, m = data.shape[:-1], data.shape[-1]
    if m * 8 < n * bits:
        raise ValueError(f"{m} bytes hold fewer than {n} values of {bits} bits")
    flat = data.reshape(-1, m)
    out = np.zeros((flat.shape[0], n), dtype=np.uint64)
    step = max(1, _CHUNK_BITS // max(1, m * 8))
    for s in range(0, flat.shape[0], step):
        planes = np.unpackbits(flat[s:s + step], axis=-1)[:, :n * bits].reshape(-1, n, bits)
        acc = out[s:s + step]
        for j in range(bits):     # most significant bit first
            acc <<= np.uint64(1)
            acc |= planes[:, :, j].astype(np.uint64)
    return out.reshape(*lead, n)


def pack_words(values: np.ndarray, bits: int) -> np.ndarray:
    """The legacy layout's ids: [..., n] -> [..., ceil(n / (64 // bits))] uint64 words; word w holds ids
    w * per + j at bit offset bits * j (least significant first), no id straddling two words."""
    per = 64 // bits
    x = np.ascontiguousarray(values).astype(np.uint64)
    n = x.shape[-1]
    words = -(-n // per)
    padded = np.zeros((*x.shape[:-1], words * per), dtype=np.uint64)
    padded[..., :n] = x
    grouped = padded.reshape(*x.shape[:-1], words, per)
    out = np.zeros((*x.shape[:-1], words), dtype=np.uint64)
    for j in range(per):
        out |= grouped[..., j] << np.uint64(bits * j)
    return out


def unpack_words(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of `pack_words`: [..., w] 64-bit words (signed or not) -> [..., n] uint64."""
    per = 64 // bits
    w = np.ascontiguousarray(words)
    w = w.view(np.uint64) if w.dtype == np.int64 else w.astype(np.uint64)   # int64 words: same bits
    mask = np.uint64((1 << bits) - 1)
    parts = [(w >> np.uint64(bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*w.shape[:-1], w.shape[-1] * per)[..., :n]


# -- floats ------------------------------------------------------------------------------------

def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bit patterns of bfloat16, rounded to nearest even (torch's conversion)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded)


def bf16_to_f32(bits16: np.ndarray) -> np.ndarray:
    return (np.asarray(bits16, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


_NUMPY = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values rounded to `dtype`, returned as float32 (float64 for float64): what torch's `.to(dtype)`
    keeps of them."""
    if dtype == "bfloat16":
        return bf16_to_f32(round_bf16(np.asarray(x, dtype=np.float32)))
    if dtype == "float64":
        return np.asarray(x, dtype=np.float64)
    return np.asarray(x).astype(_NUMPY[dtype]).astype(np.float32)


def float_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """[..., n] values -> [..., n * size] uint8: their little-endian bytes in `dtype`."""
    if dtype == "bfloat16":
        raw = round_bf16(np.asarray(x, dtype=np.float32)).astype("<u2")
    else:
        raw = np.ascontiguousarray(np.asarray(x).astype(_NUMPY[dtype]))
    raw = np.ascontiguousarray(raw)
    return raw.view(np.uint8).reshape(*raw.shape[:-1], raw.shape[-1] * raw.dtype.itemsize)


def bytes_float(data: np.ndarray, dtype: str) -> np.ndarray:
    """[..., n * size] uint8 -> [..., n] values (float32; float64 for float64)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if dtype == "bfloat16":
        return bf16_to_f32(data.view("<u2"))
    return data.view(_NUMPY[dtype]).astype(np.float64 if dtype == "float64" else np.float32)
