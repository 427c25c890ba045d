"""Share caches through any fsspec URL: push, pull, and stream a cache straight from a URL.

URLs: `file:///abs/path`, `s3://bucket/prefix` (s3fs; `--endpoint-url` for S3-compatible servers),
`hf://datasets/<user>/<repo>[/folder]` (huggingface_hub's HfFileSystem), or any other fsspec
protocol that is installed.

Both directions are resumable and verified, and nothing read from the remote side is trusted:

- **push** re-hashes each local shard against its manifest (a corrupt local cache is never
  shared), skips remote shards that already have the right size and sha256, uploads the others under
  a temporary name, re-hashes the uploaded copy, and only then moves it to its final name (Hub
  commits are atomic already, so there files go straight to their names). A dataset card
  (`README.md`) follows, and `manifest.json` goes **last**: until a push finishes, the remote side
  holds at most the previous manifest, never one listing shards that are not there yet.
- **pull** validates the remote manifest exactly as the local reader does (`format.parse_manifest`,
  the plan checks of `CacheReader`, each listed shard's size from one listing), downloads each shard
  under a temporary name while hashing it, refuses one whose sha256 or size differs from the
  manifest (one line naming the shard), renames it into place, writes the manifest last with the
  remote's exact bytes, and finally runs `verify_cache` on the result.
- **RemoteCacheReader** is a `CacheReader` over a URL: whole shards are fetched by a background
  thread pool `readahead` shards ahead of the one being decoded, each checked against the
  manifest's size and sha256 before it is parsed, so batches equal those of a local read.

One pusher per URL at a time: temporary names left by an interrupted push are removed by the next.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache import format as fmt
from logitcache.errors import UserError
from logitcache.reader import CacheReader, verify_cache
from logitcache.writer import sha256_file

CHUNK = 8 << 20                   # bytes per read/hash step
MAX_MANIFEST_BYTES = 256 << 20    # a manifest lists ~200 B per shard: far more than any real cache
CARD_NAME = "README.md"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TMP_RE = re.compile(r"^\.(shard-\d{5,9}\.parquet|manifest\.json|README\.md)\.tmp-[0-9a-f-]+$")


def is_url(path: Any) -> bool:
    """True for `scheme://...` (remote or `file://`), False for a plain local path."""
    return bool(_URL_RE.match(str(path)))


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec file system, root path without a trailing slash) for a URL; one-line errors."""
    import fsspec

    if not is_url(url):
        raise UserError(f"{url}: not a URL (use file:///abs/path, s3://bucket/prefix or hf://datasets/user/repo)")
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        raise UserError(f"{url}: {exc} (pip install 'logitcache[share]')") from None
    except ValueError as exc:
        raise UserError(f"{url}: {exc}") from None
    return fs, root.rstrip("/")


def storage_options_for(url: str, endpoint_url: str | None = None, options: dict | None = None) -> dict:
    """fsspec options from the CLI: `--endpoint-url` becomes s3fs's `endpoint_url` for s3:// URLs."""
    out = dict(options or {})
    if endpoint_url:
        if not str(url).startswith(("s3://", "s3a://")):
            raise UserError(f"--endpoint-url: only for s3:// URLs, not {url}")
        out["endpoint_url"] = endpoint_url
    return out


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def atomic_renames(fs) -> bool:
    """Whether uploads go to a temporary name first. Hub commits are atomic by themselves, and a
    rename there would be a second commit per file, so the Hub gets direct uploads."""
    return "hf" not in _protocols(fs)


class _URLPath(str):
    """A URL that joins with `/` like a Path, so the reader's error messages name remote files."""

    def __truediv__(self, other: str) -> "_URLPath":
        return _URLPath(self.rstrip("/") + "/" + str(other))


# -- remote files ------------------------------------------------------------------------------


def _is_missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == 2


def read_limited(fs, path: str, limit: int, where: str) -> bytes | None:
    """The bytes of a remote file, or None if it does not exist; refuses more than `limit` bytes."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read(limit + 1)
    except Exception as exc:   # noqa: BLE001  every backend has its own "not found"
        if _is_missing(exc):
            return None
        raise UserError(f"{where}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if len(data) > limit:
        raise UserError(f"{where}: larger than {limit} bytes; not a logitcache manifest")
    return data


def remote_digest(fs, path: str, limit: int) -> tuple[int, str]:
    """(size, sha256) of a remote file, reading at most `limit + 1` bytes (a size over `limit` is
    reported as limit + 1 and can never match). The Hub reports its LFS files' sha256 directly."""
    if not atomic_renames(fs):
        with _suppress_missing():
            info = fs.info(path)
            lfs = info.get("lfs") or {}
            if lfs.get("sha256") and info.get("size") is not None:
                return int(info["size"]), str(lfs["sha256"])
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb", block_size=CHUNK) as f:
        while n <= limit and (chunk := f.read(min(CHUNK, limit + 1 - n))):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, et, exc, tb):
        return exc is not None and _is_missing(exc)


def _listing(fs, root: str) -> dict[str, dict]:
    """Base name -> info of the files directly under `root` ({} if the folder does not exist)."""
    try:
        fs.invalidate_cache(root)
        entries = fs.ls(root, detail=True)
    except Exception as exc:   # noqa: BLE001
        if _is_missing(exc):
            return {}
        raise UserError(f"{root}: cannot list ({exc.__class__.__name__}: {exc})") from None
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") != "directory"}


# -- the dataset card --------------------------------------------------------------------------


def dataset_card(manifest: dict, title: str) -> str:
    """README.md for the Hub: `configs:` points `datasets` at exactly the listed shards, and the
    body restates the manifest's facts (the manifest stays the source of truth)."""
    import yaml

    m = manifest
    shards = sorted(m["shards"], key=lambda e: e["index"])
    front = {"configs": [{"config_name": "default",
                          "data_files": [{"split": "train", "path": [e["name"] for e in shards]}]}],
             "tags": ["logitcache", "knowledge-distillation", "teacher-logits"]}
    t, d, enc = m["teacher"], m["data"], m["encoding"]
    tokens = sum(e["tokens"] for e in shards)
    size = sum(e["bytes"] for e in shards)
    rows = [("teacher", t.get("name_or_path")), ("teacher revision", t.get("revision")),
            ("architecture", t.get("architecture")), ("parameters", t.get("num_parameters")),
            ("teacher dtype", t.get("dtype")), ("vocab size (logit width)", t.get("vocab_size")),
            ("k", m["k"]), ("encoding", f"{enc['name']} {fmt.canonical_json(enc.get('params', {}))[:200]}"),
            ("seq_len", d["seq_len"]), ("windows", f"{sum(e['rows'] for e in shards)} of {d['num_windows']}"),
            ("tokens", tokens), ("shards", f"{len(shards)} of {m['num_shards']}"),
            ("rows per shard", m["rows_per_shard"]), ("bytes", size),
            ("bytes per token", f"{size / tokens:.1f}" if tokens else "-"), ("complete", m["complete"]),
            ("data source", d.get("source")), ("data fingerprint", d.get("fingerprint")),
            ("tokenizer fingerprint", m["tokenizer"].get("fingerprint")),
            ("producer", m["producer"].get("backend")), ("cache key", m["key"])]
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    plain = enc["name"] in ("fp16", "fp32")
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n"
            "Next-token distributions of one teacher over a tokenized corpus, as written by "
            "[logitcache](https://pypi.org/project/logitcache/): per position the top-k token ids, "
            "their log-probabilities and the exact log-mass outside them. `manifest.json` describes "
            "the cache completely (with every shard's sha256); this card restates it.\n\n"
            f"| field | value |\n|---|---|\n{table}\n\n## Use\n\n```bash\n"
            "logitcache pull <this repo's hf:// URL> my-cache   # verified download\n```\n\n"
            "```python\nfrom logitcache.reader import CacheReader\n"
            "reader = CacheReader.open(\"<this repo's hf:// URL>\")   # streams with read-ahead\n"
            "import datasets\nds = datasets.load_dataset(\"<this repo>\", split=\"train\")\n```\n\n"
            + ("The top-k columns are plain lists (`seq_len * k` per row, position-major).\n" if plain else
               f"The `{enc['name']}` top-k columns are coded: decode them with `logitcache` "
               "(`CacheReader`); `input_ids` and `target_logprob` are plain lists.\n"))


# -- push --------------------------------------------------------------------------------------


ProgressHook = Callable[[str, str], None]   # (file name, "uploaded" | "skipped" | "downloaded")


def push(cache: str | os.PathLike, url: str, *, storage_options: dict | None = None, card: bool = True,
         progress: bool = True, on_file: ProgressHook | None = None) -> dict:
    """Upload a local cache to `url` (see the module doc); returns counts of what was done."""
    from tqdm import tqdm

    cache = Path(cache)
    reader = CacheReader(cache)             # the local cache is validated like any read
    m = reader.manifest
    raw = (cache / fmt.MANIFEST_NAME).read_bytes()
    if fmt.parse_manifest(raw, cache / fmt.MANIFEST_NAME) != m:
        raise UserError(f"{cache / fmt.MANIFEST_NAME}: changed while pushing; try again")
    fs, root = filesystem(url, storage_options)
    remote = read_limited(fs, f"{root}/{fmt.MANIFEST_NAME}", MAX_MANIFEST_BYTES, f"{url}/{fmt.MANIFEST_NAME}")
    if remote is not None:
        other = fmt.parse_manifest(remote, f"{url}/{fmt.MANIFEST_NAME}")
        if other["key"] != m["key"]:
            raise UserError(f"{url}: holds a cache with key {other['key'][:16]}, not {m['key'][:16]}; "
                            "push to another URL")
    fs.makedirs(root, exist_ok=True)
    listing = _listing(fs, root)
    for name in listing:
        if _TMP_RE.match(name):   # left by an interrupted push
            with _suppress_missing():
                fs.rm_file(f"{root}/{name}")
    counts = {"uploaded": 0, "skipped": 0, "bytes_uploaded": 0}
    bar = tqdm(total=reader.num_bytes, unit="B", unit_scale=True, desc=f"push {cache.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for e in reader.shards:
            local = fmt.shard_path(cache, e)
            if os.path.getsize(local) != e["bytes"] or sha256_file(local) != e["sha256"]:
                raise UserError(f"{local}: does not match its manifest (size or sha256); "
                                f"run `logitcache verify {cache}` and re-produce it before pushing")
            target = f"{root}/{e['name']}"
            info = listing.get(e["name"])
            if info is not None and info.get("size") == e["bytes"] and \
                    remote_digest(fs, target, e["bytes"]) == (e["bytes"], e["sha256"]):
                counts["skipped"] += 1
                status = "skipped"
            else:
                _upload_verified(fs, str(local), target, e["bytes"], e["sha256"], url)
                counts["uploaded"] += 1
                counts["bytes_uploaded"] += e["bytes"]
                status = "uploaded"
            bar.update(e["bytes"])
            if on_file is not None:
                on_file(e["name"], status)
        if card:
            text = dataset_card(m, f"{m['teacher'].get('name_or_path')} top-{m['k']} logit cache").encode()
            _upload_bytes(fs, text, f"{root}/{CARD_NAME}", url)
        _upload_bytes(fs, raw, f"{root}/{fmt.MANIFEST_NAME}", url)     # last: the push is now visible
    finally:
        bar.close()
    return dict(counts, shards=len(reader.shards), url=url)


def _tmp_name(target: str) -> str:
    folder, name = target.rsplit("/", 1)
    return f"{folder}/.{name}.tmp-{os.getpid():x}-{secrets.token_hex(4)}"


def _upload_verified(fs, local: str, target: str, size: int, digest: str, url: str) -> None:
    """Upload, re-hash the uploaded bytes, then move into place (or upload in place on the Hub)."""
    where = target if atomic_renames(fs) else None
    tmp = _tmp_name(target) if where else target
    try:
        fs.put_file(local, tmp)
        fs.invalidate_cache(tmp)
        got = remote_digest(fs, tmp, size)
        if got != (size, digest):
            raise UserError(f"{url}/{target.rsplit('/', 1)[-1]}: uploaded copy differs from the local shard "
                            f"({got[0]} bytes, sha256 {got[1][:16]}...); push again")
        if where:
            fs.mv(tmp, target)
    except BaseException:
        if where:
            with _suppress_missing():
                fs.rm_file(tmp)
        raise


def _upload_bytes(fs, data: bytes, target: str, url: str) -> None:
    tmp = _tmp_name(target) if atomic_renames(fs) else target
    try:
        fs.pipe_file(tmp, data)
        if tmp != target:
            fs.mv(tmp, target)
    except BaseException:
        if tmp != target:
            with _suppress_missing():
                fs.rm_file(tmp)
        raise
    fs.invalidate_cache(target)


# -- pull --------------------------------------------------------------------------------------


def pull(url: str, dest: str | os.PathLike, *, storage_options: dict | None = None, progress: bool = True,
         on_file: ProgressHook | None = None) -> dict:
    """Download the cache at `url` into the folder `dest` (see the module doc); returns counts."""
    from tqdm import tqdm

    remote = RemoteCacheReader(url, storage_options=storage_options, readahead=0)
    m, raw = remote.manifest, remote.manifest_bytes
    dest = Path(dest)
    if (dest / fmt.MANIFEST_NAME).exists() or (dest / fmt.MANIFEST_NAME).is_symlink():
        mine = fmt.load_manifest(dest)
        if mine["key"] != m["key"]:
            raise UserError(f"{dest}: holds a cache with key {mine['key'][:16]}, not {m['key'][:16]}; "
                            "pull into another folder")
    elif dest.exists() and not dest.is_dir():
        raise UserError(f"{dest}: exists and is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.iterdir():
        if _TMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
    counts = {"downloaded": 0, "skipped": 0, "bytes_downloaded": 0}
    bar = tqdm(total=remote.num_bytes, unit="B", unit_scale=True, desc=f"pull {dest.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        for e in remote.shards:
            final = fmt.shard_path(dest, e)
            if final.is_file() and final.stat().st_size == e["bytes"] and sha256_file(final) == e["sha256"]:
                counts["skipped"] += 1
                status = "skipped"
            else:
                _download_verified(remote, e, final)
                counts["downloaded"] += 1
                counts["bytes_downloaded"] += e["bytes"]
                status = "downloaded"
            bar.update(e["bytes"])
            if on_file is not None:
                on_file(e["name"], status)
    finally:
        bar.close()
    _write_atomic(dest / fmt.MANIFEST_NAME, raw)       # last: the folder is now a cache
    problems = verify_cache(dest)
    if problems:
        name, reason = problems[0]
        raise UserError(f"{dest / name}: {reason} (after pulling {url})")
    return dict(counts, shards=len(remote.shards), dest=str(dest))


def _download_verified(remote: "RemoteCacheReader", e: dict, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid():x}-{secrets.token_hex(4)}")
    h, n = hashlib.sha256(), 0
    try:
        with remote.fs.open(remote.remote_path(e), "rb", block_size=CHUNK) as src, \
                open(tmp, "xb") as out:
            while n <= e["bytes"] and (chunk := src.read(min(CHUNK, e["bytes"] + 1 - n))):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        remote.check_bytes(e, n, h.hexdigest())
        os.replace(tmp, final)
        fmt.fsync_path(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid():x}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fmt.fsync_path(path.parent)


# -- streaming reads ---------------------------------------------------------------------------


class RemoteCacheReader(CacheReader):
    """A `CacheReader` over a URL: the same validation, the same batches, shards fetched ahead.

    On open, the manifest is read (at most MAX_MANIFEST_BYTES), validated as the local reader
    does, and every listed shard must appear in one listing of the folder with exactly its
    `bytes`. Reading fetches whole shards, each checked against its manifest size and sha256 before
    it is parsed; `iter_batches`/`iter_arrays` keep `readahead` shards in flight on background
    threads while the current one is decoded. `dataset()` works too (shards fetched on demand, per
    DataLoader worker). Memory: about `readahead + 1` shards' bytes.
    """

    def __init__(self, url: str, *, storage_options: dict | None = None, readahead: int = 2):
        if readahead < 0:
            raise ValueError("readahead must be >= 0")
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self._pid = os.getpid()
        self.path = _URLPath(self.url)
        self.readahead = int(readahead)
        raw = read_limited(self.fs, f"{self.root}/{fmt.MANIFEST_NAME}", MAX_MANIFEST_BYTES,
                           self.path / fmt.MANIFEST_NAME)
        if raw is None:
            raise UserError(f"{self.url}: not a cache (no {fmt.MANIFEST_NAME})")
        self.manifest_bytes = raw
        self._files = _listing(self.fs, self.root)
        self._fetcher: _Prefetcher | None = None
        self._load(fmt.parse_manifest(raw, self.path / fmt.MANIFEST_NAME))

    def __getstate__(self) -> dict:        # DataLoader workers started by spawn get a fresh pool
        state = dict(self.__dict__)
        state["_fetcher"], state["_pid"] = None, -1
        return state

    def remote_path(self, entry: dict) -> str:
        if not fmt.SHARD_PATTERN.match(entry["name"]):   # validated already; never build another path
            raise UserError(f"{self.url}: shard name {entry['name']!r} is not allowed")
        return f"{self.root}/{entry['name']}"

    def _shard_size(self, entry: dict) -> int:
        info = self._files.get(entry["name"])
        if info is None:
            raise UserError(f"{self.path / entry['name']}: shard listed in the manifest is missing")
        if info.get("islink"):
            raise UserError(f"{self.path / entry['name']}: shard is a symbolic link; refusing to follow it")
        return int(info.get("size") or 0)

    def check_bytes(self, entry: dict, size: int, digest: str) -> None:
        """UserError naming the shard unless (size, sha256) is what the manifest lists."""
        if size != entry["bytes"]:
            raise UserError(f"{self.path / entry['name']}: {size if size <= entry['bytes'] else 'more than ' + str(entry['bytes'])} "
                            f"bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if digest != entry["sha256"]:
            raise UserError(f"{self.path / entry['name']}: sha256 mismatch ({digest[:16]}..., manifest says "
                            f"{entry['sha256'][:16]}...): the remote copy is corrupt")

    def fetch(self, entry: dict) -> bytes:
        """The whole shard, checked against its manifest size and sha256."""
        try:
            with self.fs.open(self.remote_path(entry), "rb", block_size=CHUNK) as f:
                data = f.read(entry["bytes"] + 1)
        except UserError:
            raise
        except Exception as exc:   # noqa: BLE001
            if _is_missing(exc):
                raise UserError(f"{self.path / entry['name']}: shard listed in the manifest is missing") from None
            raise UserError(f"{self.path / entry['name']}: cannot read ({exc.__class__.__name__}: {exc})") from None
        self.check_bytes(entry, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _prefetcher(self) -> "_Prefetcher":
        if self._pid != os.getpid():   # a forked DataLoader worker: clients (s3fs) are not fork-safe
            self.fs, _ = filesystem(self.url, dict(self.storage_options, skip_instance_cache=True))
            self._pid, self._fetcher = os.getpid(), None
        if self._fetcher is None:      # threads do not survive fork either
            self._fetcher = _Prefetcher(self.fetch, self.readahead)
        return self._fetcher

    def _parquet(self, entry: dict) -> pq.ParquetFile:
        buf = pa.BufferReader(self._prefetcher().get(entry))
        try:
            pf = pq.ParquetFile(buf)
        except Exception as exc:   # noqa: BLE001
            raise UserError(f"{self.path / entry['name']}: unreadable Parquet ({exc.__class__.__name__})") from None
        if pf.metadata.num_rows != entry["rows"]:
            raise UserError(f"{self.path / entry['name']}: {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
        pf._logitcache_file = buf
        return pf

    def iter_arrays(self, batch_size: int, shards: Iterable[int | str] | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        entries = self.shards if shards is None else [self._entry(s) for s in shards]
        self._prefetcher().plan(entries)
        yield from super().iter_arrays(batch_size, [e["index"] for e in entries])

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every remote shard: `(shard name, reason)` per problem, empty when intact."""
        problems = []
        for e in self.shards:
            try:
                self.fetch(e)
            except UserError as exc:
                problems.append((e["name"], str(exc).split(": ", 1)[-1]))
        return problems


class _Prefetcher:
    """Fetches shards on a small thread pool, `readahead` ahead of the one asked for in a plan."""

    def __init__(self, fetch: Callable[[dict], bytes], readahead: int):
        self.pid = os.getpid()
        self.fetch = fetch
        self.readahead = readahead
        self.pool = ThreadPoolExecutor(max_workers=max(1, readahead), thread_name_prefix="logitcache-fetch")
        self.lock = threading.Lock()
        self.futures: OrderedDict[int, Future] = OrderedDict()
        self.order: list[dict] = []
        self.position: dict[int, int] = {}

    def plan(self, entries: list[dict]) -> None:
        """The shards about to be read, in order; forgets fetches for an earlier plan."""
        with self.lock:
            for f in self.futures.values():
                f.cancel()
            self.futures.clear()
            self.order = list(entries)
            self.position = {e["index"]: p for p, e in enumerate(self.order)}

    def _submit(self, entry: dict) -> None:
        if entry["index"] not in self.futures:
            self.futures[entry["index"]] = self.pool.submit(self.fetch, entry)

    def get(self, entry: dict) -> bytes:
        with self.lock:
            self._submit(entry)
            fut = self.futures.pop(entry["index"])
            p = self.position.get(entry["index"])
            if p is not None:
                for later in self.order[p + 1:p + 1 + self.readahead]:
                    self._submit(later)
        return fut.result()
