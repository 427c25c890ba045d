"""Import a DistillKit capture (its Parquet shards and compression config) as a logitcache top-k cache.

Two passes, constant memory (a batch of ~32 MB of input, one shard of output): the first checks and
decodes every row (distillkit_capture) and hashes what the key needs; the second decodes again and
writes the shards through `CacheWriter` into `.<out>.importing`, renamed to `out` once complete, so an
interrupted import resumes where it stopped (shards already written are not decoded again) and a
finished one is returned as it is (import_common). Bad input is found in the first pass, before
anything is written.

The cache's layout follows the rows: when every row is one sequence of the same length with every
position stored (fixed-length captures, or what `export --to distillkit` writes from a windows cache)
it is a windows cache of seq_len = length - 1; otherwise (rows of their own length, packed segments,
labels masking positions) a `sequences` cache (docs/FORMAT.md 2.0), one row per sequence, with the
stored positions as its loss positions. The tail is computed from the decoded top-k (DistillKit stores
none); the teacher is unknown; both are recorded in `producer.source` (docs/interop.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from logitcache import format as fmt
from logitcache.errors import SettingError, UserError
from logitcache.format.manifest import Manifest
from logitcache.format.payloads import TopK, concat
from logitcache.interop.distillkit_capture import Capture, ImportSettings, Scan
from logitcache.interop.distillkit_rows import Sequences
from logitcache.interop.import_common import (
    UNKNOWN,
    check_out,
    fitted_encoding,
    unknown_teacher,
    versions,
    write_staged,
)
from logitcache.producer.header import make_encoding
from logitcache.producer.writer import CacheWriter

LOG = logging.getLogger(__name__)

BACKEND = "import:distillkit"
READ_AT = "arcee-ai/DistillKit@a61c2e7d25c2e990d45832e12bd8542bdee9c810"   # the code the layout was read from
SHARD_POSITIONS = 1 << 18     # default shard size: about this many stored positions
TAIL_RULE = "log(1 - sum exp(decoded top-k)) in float64, floored at 2^-24 (DistillKit stores no tail)"


def provenance(capture: Capture, scan: Scan) -> dict:
    """`producer.source`: what was read, what became of it, and what the capture does not tell."""
    s = capture.settings
    unknown = ["teacher (name, revision, dtype, weights: weights_fingerprint is a sha256 of the imported top-k)",
               "the tail mass (computed, see tail)",
               "the temperature (DistillKit's vLLM capture stores raw log-probs, i.e. temperature 1)"]
    if s.tokenizer is None:
        unknown.append("tokenizer")
    if s.teacher_name is not None:
        unknown[0] = "teacher revision, dtype and weights (weights_fingerprint is a sha256 of the imported top-k)"
    return {"format": "distillkit", "read_at": READ_AT, "src": str(s.src), "files": len(capture.shards.files),
            "layout": capture.layout, "config": capture.config.to_dict() if capture.config is not None else None,
            "config_file": capture.config_where, "vocabulary": capture.width,
            "vocabulary_from": ("--vocab-size" if s.vocab_size is not None else "tokenizer" if s.tokenizer is not None
                                else "the config's d"),
            "rows": scan.counts.as_dict(), "tail": TAIL_RULE, "unknown": unknown}


def build_header(capture: Capture, scan: Scan, encoding: dict, rows_per_shard: int | None) -> Manifest:
    """The manifest before any shard: a windows cache when the rows allow it, else a sequences one."""
    s, c = capture.settings, scan.counts
    per_row = max(1, c.positions // max(1, c.sequences))
    rps = rows_per_shard or int(np.clip(SHARD_POSITIONS // per_row, 1, 256))
    data = {"source": f"distillkit:{s.src}", "text_column": None, "fingerprint": scan.fingerprint()}
    if scan.windows_layout:
        T = scan.length - 1
        data.update(seq_len=T, num_windows=c.sequences, num_tokens=c.sequences * T)
    else:
        data.update(seq_len=scan.longest - 1, num_windows=c.sequences,
                    num_tokens=scan.all_positions, layout=fmt.LAYOUT_SEQUENCES, loss_tokens=c.positions,
                    chat={"format": "distillkit", "template_sha256": None,
                          "train_on": "labels >= 0" if c.masked else "all", "truncation": None})
    teacher = unknown_teacher(s.teacher_name, scan.content(), capture.width, capture.usable)
    k = capture.expect.k
    return Manifest.header(key=fmt.cache_key(teacher, capture.tokenizer, data, k, encoding), k=k,
                           rows_per_shard=rps, num_shards=-(-c.sequences // rps), teacher=teacher,
                           tokenizer=capture.tokenizer, data=data, encoding=encoding,
                           producer={"backend": BACKEND, "versions": versions(), "source": provenance(capture, scan)})


class _Filler:
    """Gathers sequences in order into shards and writes the ones the working folder lacks."""

    def __init__(self, writer: CacheWriter, header: Manifest):
        self.writer, self.header = writer, header
        self.done = writer.completed()
        self.pending: list[tuple[np.ndarray, np.ndarray, TopK]] = []
        self.index = 0            # of the next sequence to arrive
        self.skipped = bool(self.done)

    def wanted(self, first: int, count: int) -> bool:
        """Whether sequences [first, first + count) reach a shard still to write (else not decoded)."""
        if count == 0:
            return False
        rps = self.header.rows_per_shard
        return any(i not in self.done for i in range(first // rps, (first + count - 1) // rps + 1))

    def __call__(self, seqs: Sequences, topk: TopK | None) -> None:
        rps = self.header.rows_per_shard
        if topk is not None:
            cuts = np.cumsum([len(p) for p in seqs.positions])[:-1]
            parts = [TopK(*f) for f in zip(*(np.split(a, cuts) for a in topk))]
        for i, (tokens, positions) in enumerate(zip(seqs.tokens, seqs.positions)):
            shard = self.index // rps
            self.index += 1
            if shard in self.done:
                continue
            self.pending.append((tokens, positions, parts[i]))
            if len(self.pending) == self.header.expected_rows(shard):
                self.flush(shard)

    def flush(self, shard: int) -> None:
        tokens, positions, parts = zip(*self.pending)
        self.pending = []
        payload = concat(list(parts))
        if self.header.sequences:
            self.writer.write_sequences(shard, input_ids=list(tokens), loss_positions=list(positions), payload=payload)
            return
        rows, T, k = len(tokens), self.header.seq_len, self.header.k
        self.writer.write_shard(shard, input_ids=np.stack(tokens),
                                target_logprob=payload.target_logprob.reshape(rows, T),
                                topk_ids=payload.ids.reshape(rows, T, k),
                                topk_logprobs=payload.logprobs.reshape(rows, T, k),
                                tail_logmass=payload.tail_logmass.reshape(rows, T))


def import_distillkit(settings: ImportSettings) -> Manifest:
    """Write the DistillKit capture `settings.src` as the cache folder `settings.out`; return its manifest
    (module docstring). The same call again returns the finished cache unchanged, or resumes it."""
    out = Path(settings.out)
    if settings.rows_per_shard is not None and settings.rows_per_shard < 1:
        raise SettingError("rows_per_shard", settings.rows_per_shard, "must be >= 1")
    check_out(out)
    enc = make_encoding(settings.encoding, settings.encoding_params)
    if enc.payload != fmt.PAYLOAD_TOPK:
        raise SettingError("encoding", settings.encoding, "stores draws (a samples payload); a DistillKit capture "
                           "holds top-k log-probs")
    capture = Capture(settings)
    first = capture.scan(f"check {Path(str(settings.src)).name}")
    header = build_header(capture, first, fitted_encoding(enc, first.token_counts, capture.width),
                          settings.rows_per_shard)

    def fill(writer: CacheWriter) -> None:
        filler = _Filler(writer, header)
        second = capture.scan(f"import {out.name}", each=filler, wanted=filler.wanted)
        same = second.fingerprint() == first.fingerprint() and (filler.skipped or second.content() == first.content())
        if not same:
            raise UserError(f"{settings.src}: changed while it was imported; run the import again")

    manifest = write_staged(out, header, fill)
    c = first.counts
    LOG.info("%s: %d %s of up to %d positions (%d stored), top-%d, from %d rows of %s (%s layout; teacher %s)",
             out, c.sequences, "windows" if first.windows_layout else "sequences", header.seq_len, c.positions,
             header.k, c.rows, settings.src, capture.layout, settings.teacher_name or UNKNOWN)
    return manifest
