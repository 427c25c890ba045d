"""Byte-level helpers shared by the compact codecs: byte planes, binary columns, frequency ranks, gaps.

Everything here is vectorised over positions; no Python loop runs per position. The compact codecs
turn each window into a few integer *streams* (id gaps, value codes, tail codes, lengths), split
every stream into little-endian byte planes (plane 0 holds the low bytes) and store each plane as one
Parquet `binary` column with one value per window. Parquet's zstd then compresses each plane of a
row group as one homogeneous block: the low bytes of the gaps are nearly entropy-coded by zstd's
Huffman stage, and high planes that are almost all zero cost almost nothing.
"""

from __future__ import annotations

import base64
import binascii
import threading

import numpy as np
import pyarrow as pa
import zstandard

from logitcache.errors import UserError

# ---------------------------------------------------------------------------
# byte planes
# ---------------------------------------------------------------------------


def nbytes_for(max_value: int) -> int:
    """Bytes needed to hold unsigned integers up to `max_value` (at least 1, at most 8)."""
    return max(1, (int(max_value).bit_length() + 7) // 8)


def uint_dtype(nbytes: int) -> np.dtype:
    return np.dtype({1: np.uint8, 2: "<u2", 3: "<u4", 4: "<u4"}.get(nbytes, "<u8"))


def to_planes(values: np.ndarray, nbytes: int) -> list[np.ndarray]:
    """Flat unsigned integers -> `nbytes` uint8 arrays, least significant byte first."""
    v = np.ascontiguousarray(values, dtype=uint_dtype(nbytes).newbyteorder("<"))
    if nbytes == 1:
        return [v.view(np.uint8)]
    b = v.view(np.uint8).reshape(-1, v.dtype.itemsize)
    return [np.ascontiguousarray(b[:, i]) for i in range(nbytes)]


def from_planes(planes: list[np.ndarray], nbytes: int, wide: bool = False) -> np.ndarray:
    """Inverse of :func:`to_planes`: uint8 planes -> unsigned integers (uint8/16/32/64).

    `wide` asks for at least uint32 (what a following cumulative sum wants: numpy's cumsum is
    several times slower when it also converts the dtype)."""
    dtype = uint_dtype(nbytes)
    if wide and dtype.itemsize < 4:
        if nbytes == 1:
            return planes[0].astype(np.uint32)
        # widen and shift in one pass (the ufunc casts its input chunk by chunk), then OR the rest in
        out = np.left_shift(planes[-1], 8, dtype=np.uint32)
        for i, plane in enumerate(planes[-2::-1]):
            if i:
                out <<= 8
            out |= plane
        return out
    if nbytes == 1:
        return planes[0]
    if nbytes == 2:
        out = np.left_shift(planes[1], 8, dtype="<u2")
        out |= planes[0]
        return out
    n = len(planes[0])
    out = np.zeros((n, dtype.itemsize), dtype=np.uint8)
    for i in range(nbytes):
        out[:, i] = planes[i]
    return out.view(dtype.newbyteorder("<")).reshape(n).astype(dtype, copy=False)


# ---------------------------------------------------------------------------
# binary columns: one value per window, built and read without a loop
# ---------------------------------------------------------------------------


def binary_column(data: np.ndarray, row_lengths: np.ndarray) -> pa.Array:
    """Concatenated uint8 `data` cut into rows of `row_lengths` bytes -> a `binary` array (zero copy)."""
    offsets = np.zeros(len(row_lengths) + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    if offsets[-1] != len(data):
        raise ValueError("row lengths do not add up to the stream length")
    if offsets[-1] < 2**31 - 1:
        return pa.Array.from_buffers(pa.binary(), len(row_lengths),
                                     [None, pa.py_buffer(offsets.astype(np.int32)),
                                      pa.py_buffer(np.ascontiguousarray(data))])
    return pa.Array.from_buffers(pa.large_binary(), len(row_lengths),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))])


def binary_values(column) -> tuple[np.ndarray, np.ndarray]:
    """A binary column (chunked or not) -> (all bytes concatenated as uint8, per-row byte lengths)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise ValueError("binary stream column holds nulls")
    large = pa.types.is_large_binary(column.type)
    if not (large or pa.types.is_binary(column.type)):
        raise ValueError(f"expected a binary column, got {column.type}")
    _, off_buf, data_buf = column.buffers()
    off = np.frombuffer(off_buf, dtype=np.int64 if large else np.int32)[column.offset:column.offset + len(column) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = data[off[0]:off[-1]]
    return data, np.diff(off).astype(np.int64)


def put_stream(out: dict, name: str, values: np.ndarray, row_counts: np.ndarray, nbytes: int) -> None:
    """Store a flat integer stream with `row_counts` elements per window as `nbytes` plane columns."""
    for i, plane in enumerate(to_planes(values, nbytes)):
        out[f"{name}_b{i}"] = binary_column(plane, row_counts)


def get_planes(columns: dict, name: str, nbytes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The byte planes of a stream written by :func:`put_stream`, unjoined: (planes, elements per window)."""
    planes, counts = [], None
    for i in range(nbytes):
        data, lengths = binary_values(columns[f"{name}_b{i}"])
        if counts is None:
            counts = lengths
        elif not np.array_equal(counts, lengths):
            raise ValueError(f"stream '{name}': byte planes disagree in length")
        planes.append(data)
    return planes, counts


def get_stream(columns: dict, name: str, nbytes: int, wide: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read back a stream written by :func:`put_stream`: (flat values, elements per window)."""
    planes, counts = get_planes(columns, name, nbytes)
    return from_planes(planes, nbytes, wide), counts


def stream_fields(name: str, nbytes: int) -> list[pa.Field]:
    return [pa.field(f"{name}_b{i}", pa.binary()) for i in range(nbytes)]


# ---------------------------------------------------------------------------
# self-compressed streams: one zstd frame per window
# ---------------------------------------------------------------------------

# Small-alphabet, high-entropy streams (value codes) are hurt by zstd's match finder at the levels a
# writer can afford: it takes short coincidences as matches and pays more for them than Huffman
# coding the bytes would cost. A frame per window with min_match 7 is close to pure Huffman coding
# (docs/encodings.md, "Implementation notes", has the figures).
FRAME_LEVEL = 3
FRAME_MIN_MATCH = 7
_local = threading.local()


def _frame_compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        params = zstandard.ZstdCompressionParameters.from_level(FRAME_LEVEL, min_match=FRAME_MIN_MATCH,
                                                                write_content_size=True)
        c = _local.cctx = zstandard.ZstdCompressor(compression_params=params)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def put_frames(out: dict, name: str, values: np.ndarray, row_counts: np.ndarray, nbytes: int) -> None:
    """Store a flat stream as one zstd frame per window (its byte planes one after another)."""
    flat = np.ascontiguousarray(values)
    ends = np.cumsum(row_counts)
    cctx = _frame_compressor()
    frames = []
    for start, end in zip(ends - row_counts, ends):
        planes = to_planes(flat[start:end], nbytes)
        frames.append(cctx.compress(b"".join(p.tobytes() for p in planes)))
    out[name] = pa.array(frames, type=pa.binary())


def get_frames(columns: dict, name: str, nbytes: int, row_counts: np.ndarray) -> np.ndarray:
    """Read back a stream written by :func:`put_frames`; `row_counts` (elements per window) must be
    known from other streams, and each frame must decompress to exactly that many elements."""
    data, lengths = binary_values(columns[name])
    if len(lengths) != len(row_counts):
        raise ValueError(f"stream '{name}': {len(lengths)} windows, expected {len(row_counts)}")
    dctx = _decompressor()
    ends = np.cumsum(lengths)
    parts = []
    for start, end, count in zip((ends - lengths).tolist(), ends.tolist(), row_counts.tolist()):
        want = int(count) * nbytes
        try:
            raw = _bounded_decompress(dctx, data[start:end], want)
        except (zstandard.ZstdError, ValueError) as exc:
            raise ValueError(f"stream '{name}': corrupt zstd frame ({exc})") from None
        if len(raw) != want:
            raise ValueError(f"stream '{name}': a window holds {len(raw)} bytes, expected {want}")
        parts.append(raw)
    total = int(np.sum(row_counts))
    raw = np.frombuffer(b"".join(parts), dtype=np.uint8)
    if nbytes == 1:
        return raw
    # per window: plane 0 of its elements, then plane 1, ...: regroup to whole planes
    planes = [np.empty(total, dtype=np.uint8) for _ in range(nbytes)]
    pos = 0
    offset = 0
    for count in row_counts.tolist():
        for i in range(nbytes):
            planes[i][offset:offset + count] = raw[pos:pos + count]
            pos += count
        offset += count
    return from_planes(planes, nbytes)


def _bounded_decompress(dctx: zstandard.ZstdDecompressor, frame: bytes, max_size: int) -> bytes:
    """Decompress one frame of at most `max_size` bytes. The size a frame header declares is checked
    first: python-zstandard would otherwise allocate whatever a hostile header claims."""
    if len(frame) == 0:
        raise ValueError("empty frame")
    declared = zstandard.frame_content_size(frame)
    if declared > max_size:
        raise ValueError(f"frame declares {declared} bytes, more than the {max_size} expected")
    return dctx.decompress(frame, max_output_size=max(max_size, 1))


def frame_fields(name: str) -> list[pa.Field]:
    return [pa.field(name, pa.binary())]


# ---------------------------------------------------------------------------
# zstd (for the rank table blob)
# ---------------------------------------------------------------------------


def zstd_compress(data: bytes, level: int = 19) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def zstd_decompress(data: bytes, max_size: int) -> bytes:
    out = _bounded_decompress(_decompressor(), data, max_size)
    if len(out) > max_size:
        raise ValueError("decompressed blob is larger than announced")
    return out


# ---------------------------------------------------------------------------
# corpus-frequency rank table
# ---------------------------------------------------------------------------

RANK_TABLE_MAX = 1 << 17


def fit_rank_order(tokens: np.ndarray, vocab_size: int, max_entries: int = RANK_TABLE_MAX) -> np.ndarray:
    """Token ids by descending corpus count (ties by id), cut to those seen and to `max_entries`.

    Ids not in the returned list take the ranks after it, in ascending id order.
    """
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    seen = int((counts > 0).sum())
    return order[:min(seen, max_entries)].astype(np.int64)


def pack_rank_order(order: np.ndarray) -> str:
    """Rank order -> 'zstd+b64:' text: zigzag deltas from the rank, 3 byte planes, zstd-19, base64."""
    d = order.astype(np.int64) - np.arange(len(order), dtype=np.int64)
    zz = ((d << 1) ^ (d >> 63)).astype(np.uint64)
    raw = len(order).to_bytes(4, "little") + b"".join(p.tobytes() for p in to_planes(zz, 3))
    return "zstd+b64:" + base64.b64encode(zstd_compress(raw, 19)).decode("ascii")


def unpack_rank_order(text: str, vocab_size: int) -> np.ndarray:
    if not isinstance(text, str) or not text.startswith("zstd+b64:"):
        raise ValueError("rank table must be a 'zstd+b64:' string")
    raw = zstd_decompress(base64.b64decode(text[len("zstd+b64:"):], validate=True), 4 + 3 * max(vocab_size, 1))
    n = int.from_bytes(raw[:4], "little")
    if n > vocab_size or len(raw) != 4 + 3 * n:
        raise ValueError("rank table length does not match the vocabulary")
    planes = [np.frombuffer(raw[4 + i * n:4 + (i + 1) * n], dtype=np.uint8) for i in range(3)]
    zz = from_planes(planes, 3).astype(np.int64)
    order = (zz >> 1) ^ -(zz & 1)
    order += np.arange(n, dtype=np.int64)
    if n and (order.min() < 0 or order.max() >= vocab_size or len(np.unique(order)) != n):
        raise ValueError("rank table is not a list of distinct ids of the vocabulary")
    return order


class RankMap:
    """id <-> rank maps: ranks follow the fitted order, then every other id in ascending order."""

    def __init__(self, order: np.ndarray | None, vocab_size: int | None):
        self.vocab_size = vocab_size
        self.table_length = 0 if order is None else len(order)
        if order is None or vocab_size is None:
            self.rank_of = self.id_of = None
            return
        listed = np.zeros(vocab_size, dtype=bool)
        listed[order] = True
        id_of = np.concatenate([order, np.flatnonzero(~listed)]).astype(np.int64)
        rank_of = np.empty(vocab_size, dtype=np.int32)
        rank_of[id_of] = np.arange(vocab_size, dtype=np.int32)
        self.rank_of, self.id_of = rank_of, id_of

    def ranks(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and ids.min() < 0:
            raise ValueError("token ids must be non-negative")
        if self.vocab_size is not None and ids.size and ids.max() >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {self.vocab_size}")
        if self.rank_of is None:
            return ids.astype(np.int64, copy=False)
        return self.rank_of[ids].astype(np.int64, copy=False)

    def ids(self, ranks: np.ndarray) -> np.ndarray:
        """Ranks (already checked to lie below vocab_size) -> int64 ids."""
        if self.id_of is None:
            return ranks.astype(np.int64, copy=False)
        return np.take(self.id_of, ranks)


def check_vocab_and_table(name: str, vocab_size, rank_table) -> tuple[int | None, str | None, RankMap]:
    """Validate the `vocab_size` / `rank_table` parameters shared by the set codecs (UserError)."""
    if vocab_size is not None and not (isinstance(vocab_size, int) and not isinstance(vocab_size, bool)
                                       and 1 <= vocab_size < 2**31):
        raise UserError(f"encoding {name}: vocab_size must be a positive integer, got {vocab_size!r}")
    if rank_table is not None and vocab_size is None:
        raise UserError(f"encoding {name}: a rank_table needs vocab_size")
    try:
        order = unpack_rank_order(rank_table, vocab_size) if rank_table is not None else None
    except (ValueError, zstandard.ZstdError, binascii.Error) as exc:
        raise UserError(f"encoding {name}: unreadable rank_table ({exc})") from None
    return vocab_size, rank_table, RankMap(order, vocab_size)


# ---------------------------------------------------------------------------
# sorted id sets as gaps
# ---------------------------------------------------------------------------


def gaps_from_sorted(ranks: np.ndarray, row_starts: np.ndarray) -> np.ndarray:
    """Flat ranks, strictly increasing within each set, -> gaps (first: the rank; then diff - 1).

    `row_starts` is a bool array marking the first element of every set.
    """
    g = np.empty_like(ranks)
    if ranks.size == 0:
        return g
    g[0] = ranks[0]
    g[1:] = ranks[1:] - ranks[:-1] - 1
    g[row_starts] = ranks[row_starts]
    if g.size and g.min() < 0:
        raise ValueError("token ids within a position must be distinct")
    return g


def sorted_from_gaps(gaps: np.ndarray, set_sizes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`gaps_from_sorted`, given the number of elements in each set."""
    c = np.cumsum(gaps.astype(np.int64) + 1)
    if c.size == 0:
        return c
    ends = np.cumsum(set_sizes)
    starts = ends - set_sizes
    # value of the running sum just before each set (0 before the first)
    before = np.where(starts > 0, c[np.maximum(starts - 1, 0)], 0)
    nonempty = set_sizes > 0
    return c - 1 - np.repeat(before[nonempty], set_sizes[nonempty])


def describe_rank_table(params: dict, ranks: RankMap) -> dict:
    """`params` with the rank table (kilobytes of base64) replaced by what it holds, for people."""
    table = params.get("rank_table")
    if table is None:
        return dict(params)
    return {**params, "rank_table": f"{ranks.table_length:,} ids ranked by frequency ({len(table):,} characters)"}
