"""Check one batch of a DistillKit capture's rows and decode it into the sequences a cache stores.

A row (docs/interop.md) has `input_ids` (n tokens) and payload columns with one entry per position:
P = n - 1 entries as captured (entry t is vLLM's prompt log-probs at token t + 1, the distribution of
token t + 1), or P = n once `distillkit-pack-logits` has cut `input_ids` to the entries for training
(entry t is still the distribution of the token after t in its own sample). Optional columns:

- `attention_mask` (n): packing's segment ids 1, 2, ... (0 = padding). Each segment is one sample the
  teacher saw on its own, so it becomes one sequence; the segment's last entry predicts a token packing
  cut off, so it is dropped (counted).
- `labels` (n): DistillKit distils position t only where `labels[t] >= 0`; other positions are not stored.

Anything wrong is one UserError naming the file, the row and the position. Decoded values are then
made a cache's top-k: log-probs above 0 (rounding) become 0; a value above the one before it (the
polynomial's error) is lowered to it, keeping the capture's id order, which is the teacher's ranking
(this never raises the largest error); positions whose decoded mass exceeds 1 are scaled down to
1 - 2^-24 (counted). Raw rows (exact values) are sorted instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from logitcache.backends.vllm import TAIL_FLOOR
from logitcache.errors import UserError
from logitcache.interop import distillkit_codec as codec
from logitcache.interop.distillkit_config import CompressionConfig, Config, LegacyConfig
from logitcache.interop.distillkit_read import COMPRESSED, LAYOUT_COLUMNS, LEGACY, RAW
from logitcache.interop.row_checks import RowChecks, is_list

# Decoded log-probs above this are not rounding of a log-prob near 0: the data are not log-probs
# (the legacy layout could hold centred logits) or the config is wrong.
MAX_LOGPROB = 0.1
# A top-k whose decoded probabilities sum past this is not one distribution. Below it, the excess is the
# codec's error: DistillKit's budget configuration overshoots to a decoded mass of ~1.2 at 1-2% of the
# demo teacher's positions (a polynomial over 49 ranks that starts far above the true rank-2 value).
MAX_MASS = 2.0


@dataclass
class Expect:
    """What every row must agree on: the layout, its config, the vocabulary and (raw rows) k."""

    layout: str
    config: Config | None
    vocab: int
    k: int | None = None


@dataclass
class Counts:
    """What the rows became (saved in the manifest's provenance)."""

    rows: int = 0
    sequences: int = 0
    positions: int = 0
    cut_ends: int = 0        # entries whose next token is not in the row (a packed segment's last)
    masked: int = 0          # positions with labels < 0
    empty: int = 0           # segments left without a stored position
    padding: int = 0         # tokens with attention_mask 0
    renormalised: int = 0    # positions whose decoded mass exceeded 1
    whole_rows: bool = True  # every row is one sequence with every position stored

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "whole_rows"}


@dataclass
class Sequences:
    """Rows' sequences: tokens, stored positions (relative), and the flat entry index of each position."""

    tokens: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    take: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class RowBatch(RowChecks):
    """The checks and decoding of one batch; `where` is the file, rows numbered within it from `first`."""

    def __init__(self, table: pa.Table, where: str, first: int, expect: Expect):
        super().__init__(table, where, first)
        self.expect = expect
        self.entry_start: np.ndarray | None = None

    def fail_entry(self, what: str, entry: int) -> UserError:
        row = int(np.searchsorted(self.entry_start, entry, side="right") - 1)
        return self.fail(what, row, int(entry - self.entry_start[row]))

    def entries(self, name: str, width: int | None, what: str) -> np.ndarray:
        """A payload column's entries as [E, width] numbers (width None: fixed by the first entry, raw k)."""
        _, inner = self.lists(self.column(name), name)
        lengths, values = self.lists(inner, name) if is_list(inner.type) else (None, None)
        if lengths is None:
            raise self.fail(f"column {name} holds lists of {inner.type}, not one list per position")
        if width is None and len(lengths):
            width = self.expect.k = int(lengths[0])
            if width < 1:
                raise self.fail_entry(f"{name} is empty; a top-k holds at least one entry", 0)
        bad = np.flatnonzero(lengths != width)
        if bad.size:
            found = int(lengths[bad[0]])
            raise self.fail_entry(f"{name} holds {found} {what}, {width} expected; {self.mismatch(name, found)}",
                                  int(bad[0]))
        flat = self.numbers(values, name, integer=name in ("compressed_logprobs", "bytepacked_indices",
                                                          "packed_indices", "token_ids"))
        return flat.reshape(len(lengths), width or 0)

    def mismatch(self, name: str, found: int) -> str:
        """Why an entry's length can differ from the config's: which setting is likely wrong."""
        cfg = self.expect.config
        if isinstance(cfg, CompressionConfig) and name == "bytepacked_indices":
            bits = [b for b in range(1, 65) if (cfg.k * b + 7) // 8 == found]
            ks = [k for k in range(1, found * 8 // cfg.id_bits + 1) if (k * cfg.id_bits + 7) // 8 == found]
            fits = [f"k={ks[-1]} ids of {cfg.id_bits} bits"] if ks else []
            if bits:
                fits.append(f"k={cfg.k} ids of {bits[0]} bits (d from {2 ** (bits[0] - 1) + 1} to {2 ** bits[0]})")
            hint = f" ({found} bytes fit {' or '.join(fits)})" if fits else ""
            return (f"d={cfg.d} ({cfg.id_bits} bits per id) and k={cfg.k} make {cfg.index_bytes} bytes: the config "
                    f"does not match the data (wrong d or k?){hint}")
        if isinstance(cfg, CompressionConfig):
            return (f"the config ({cfg.describe()}) makes {cfg.logprob_bytes} bytes: it does not match the data "
                    "(wrong k, exact_k, a dtype, the terms or the bins?)")
        if isinstance(cfg, LegacyConfig):
            return f"the legacy config ({cfg.describe()}) does not match the data"
        return "every position must hold the same k"

    # -- structure -------------------------------------------------------------------------------

    def sequences(self, counts: Counts) -> Sequences:
        """Split the rows into sequences (module docstring) and list the entries to decode."""
        n_len, tok_vals = self.lists(self.column("input_ids"), "input_ids")
        tokens = self.numbers(tok_vals, "input_ids", integer=True).astype(np.int64)
        P, first_name = None, None
        for name in LAYOUT_COLUMNS[self.expect.layout]:
            plen, _ = self.lists(self.column(name), name)
            if P is not None and (plen != P).any():
                r = int(np.flatnonzero(plen != P)[0])
                raise self.fail(f"{name} has {plen[r]} positions, {first_name} has {P[r]}: rows of uneven length", r)
            P, first_name = plen, name
        bad = np.flatnonzero((P != n_len) & (P != n_len - 1))
        if bad.size:
            r = int(bad[0])
            raise self.fail(f"input_ids has {n_len[r]} tokens, {first_name} {P[r]} positions: rows of uneven length "
                            "(DistillKit keeps one position per token, or one fewer as captured)", r)
        extra = {}
        for name in ("attention_mask", "labels"):
            col = self.column(name)
            if col is not None:
                lengths, values = self.lists(col, name)
                if (lengths != n_len).any():
                    r = int(np.flatnonzero(lengths != n_len)[0])
                    raise self.fail(f"{name} has {lengths[r]} entries, input_ids has {n_len[r]}: rows of uneven "
                                    "length", r)
                extra[name] = self.numbers(values, name, integer=True).astype(np.int64)
        mask, labels = extra.get("attention_mask"), extra.get("labels")
        real = mask != 0 if mask is not None else np.ones(len(tokens), dtype=bool)
        out_of_vocab = real & ((tokens < 0) | (tokens >= self.expect.vocab))
        tok_start = np.concatenate([[0], np.cumsum(n_len)])
        self.entry_start = np.concatenate([[0], np.cumsum(P)])
        if out_of_vocab.any():
            j = int(np.flatnonzero(out_of_vocab)[0])
            r = int(np.searchsorted(tok_start, j, side="right") - 1)
            raise self.fail(f"input_ids holds id {tokens[j]}, outside the vocabulary 0..{self.expect.vocab - 1}", r)
        out, takes = Sequences(), []
        for r in range(self.n):
            n, p, t0, e0 = int(n_len[r]), int(P[r]), int(tok_start[r]), int(self.entry_start[r])
            tok = tokens[t0:t0 + n].astype(np.int32)
            if mask is not None:
                m = mask[t0:t0 + n]
                cuts = np.flatnonzero(m[1:] != m[:-1]) + 1
                starts, ends = np.r_[0, cuts], np.r_[cuts, n]
                keep = m[starts] != 0 if n else np.zeros(0, dtype=bool)
                segments = list(zip(starts[keep].tolist(), ends[keep].tolist()))
                counts.padding += int((m == 0).sum())
            else:
                segments = [(0, n)] if n else []
            lab = labels[t0:t0 + n] if labels is not None else None
            made = 0
            for s, e in segments:
                pos = np.arange(s, min(e - 1, p), dtype=np.int64)     # position t predicts token t + 1
                counts.cut_ends += int(e - 1 < p)                     # entry e - 1's token is cut off
                if lab is not None:
                    kept = lab[pos] >= 0
                    counts.masked += int((~kept).sum())
                    pos = pos[kept]
                if not len(pos):
                    counts.empty += 1
                    continue
                out.tokens.append(tok[s:e])
                out.positions.append((pos - s).astype(np.int32))
                takes.append(e0 + pos)
                made += 1
                counts.positions += len(pos)
            counts.whole_rows &= made == 1 and segments == [(0, n)] and len(out.positions[-1]) == n - 1
            counts.sequences += made
        counts.rows += self.n
        out.take = np.concatenate(takes) if takes else np.zeros(0, dtype=np.int64)
        return out

    # -- payload ---------------------------------------------------------------------------------

    def decode(self, take: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids [M, k] int64 and log-probs [M, k] float64 of the entries `take`, as the capture stores them."""
        cfg, layout = self.expect.config, self.expect.layout
        if layout == COMPRESSED:
            lp = self.entries("compressed_logprobs", cfg.logprob_bytes, "bytes")
            ix = self.entries("bytepacked_indices", cfg.index_bytes, "bytes")
            for name, arr in (("compressed_logprobs", lp), ("bytepacked_indices", ix)):
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise self.fail(f"{name} holds values outside 0..255; it holds bytes")
            return (codec.decode_ids(ix[take].astype(np.uint8), cfg),
                    codec.decode_logprobs(lp[take].astype(np.uint8), cfg))
        if layout == LEGACY:
            words = self.entries("packed_indices", cfg.words, "64-bit words")
            exact = self.entries("exact_values", cfg.exact_k, "values")
            coeffs = self.entries("coeffs", cfg.num_coeffs, "coefficients")
            return codec.decode_legacy(words[take], exact[take], coeffs[take], cfg)
        k = self.expect.k
        ids = self.entries("token_ids", k, "ids")
        values = self.entries("top_values", self.expect.k, "values")
        return ids[take].astype(np.int64), values[take].astype(np.float64)

    def settle(self, take: np.ndarray, ids: np.ndarray, lps: np.ndarray, counts: Counts
               ) -> tuple[np.ndarray, np.ndarray]:
        """Check decoded top-k sets and make them a cache's (module docstring): ids int32, log-probs float64."""
        vocab = self.expect.vocab
        for test, what in (((ids < 0) | (ids >= vocab), lambda i, j: f"id {ids[i, j]} (rank {j}) is outside the "
                            f"vocabulary 0..{vocab - 1}"),
                           (~np.isfinite(lps), lambda i, j: f"log-prob {lps[i, j]} (rank {j}) is not finite"),
                           (lps > MAX_LOGPROB, lambda i, j: f"log-prob {lps[i, j]:.4g} (rank {j}) is positive: not a "
                            "log-probability (a legacy capture of logits, or a config that does not match?)")):
            if test.any():
                i, j = (int(x) for x in np.argwhere(test)[0])
                raise self.fail_entry(what(i, j), int(take[i]))
        srt = np.sort(ids, axis=-1)
        dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(-1))
        if dup.size:
            raise self.fail_entry("the top-k repeats an id; the ids are not one top-k (wrong d?)", int(take[dup[0]]))
        v = np.minimum(lps, 0.0)
        mass = np.exp(v).sum(-1)
        if (mass > MAX_MASS).any():
            i = int(np.flatnonzero(mass > MAX_MASS)[0])
            raise self.fail_entry(f"the top-k probabilities sum to {mass[i]:.4f} > {MAX_MASS}: not the log-probs of "
                                  "one distribution", int(take[i]))
        if self.expect.layout == RAW:
            order = np.argsort(-v, axis=-1, kind="stable")
            ids, v = np.take_along_axis(ids, order, -1), np.take_along_axis(v, order, -1)
        else:
            v = np.minimum.accumulate(v, axis=-1)
        mass = np.exp(v).sum(-1)
        full = 1.0 if v.shape[-1] >= vocab else 1.0 - TAIL_FLOOR
        over = mass > full
        if over.any():
            v[over] -= (np.log(mass[over]) - np.log(full))[:, None]
            counts.renormalised += int(over.sum())
        return ids.astype(np.int32), v
