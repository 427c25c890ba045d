"""fsspec plumbing shared by remote reading and sharing: URLs, file systems, bounded reads, listings, digests."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from logitcache.errors import SettingError, UserError

CHUNK = 8 << 20                   # bytes per read/hash step
MAX_MANIFEST_BYTES = 256 << 20    # a manifest lists ~200 B per shard: far more than any real cache
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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
            raise SettingError("endpoint_url", None, f"only for s3:// URLs, not {url}")
        out["endpoint_url"] = endpoint_url
    return out


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def atomic_renames(fs) -> bool:
    """Whether uploads go to a temporary name first. Hub commits are atomic by themselves, and a
    rename there would be a second commit per file, so the Hub gets direct uploads."""
    return "hf" not in _protocols(fs)


class URLPath(str):
    """A URL that joins with `/` like a Path, so the reader's error messages name remote files."""

    def __truediv__(self, other: str) -> "URLPath":
        return URLPath(self.rstrip("/") + "/" + str(other))


# -- remote files ------------------------------------------------------------------------------


def is_missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == 2


def read_limited(fs, path: str, limit: int, where: str) -> bytes | None:
    """The bytes of a remote file, or None if it does not exist; refuses more than `limit` bytes."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read(limit + 1)
    except Exception as exc:   # noqa: BLE001  every backend has its own "not found"
        if is_missing(exc):
            return None
        raise UserError(f"{where}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if len(data) > limit:
        raise UserError(f"{where}: larger than {limit} bytes; not a logitcache manifest")
    return data


def remote_digest(fs, path: str, limit: int) -> tuple[int, str]:
    """(size, sha256) of a remote file, reading at most `limit + 1` bytes (a size over `limit` is
    reported as limit + 1 and can never match). The Hub reports its LFS files' sha256 directly."""
    if not atomic_renames(fs):
        with suppress_missing():
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


class suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, et, exc, tb):
        return exc is not None and is_missing(exc)


def list_folder(fs, root: str) -> dict[str, dict]:
    """Base name -> info of the files directly under `root` ({} if the folder does not exist)."""
    try:
        fs.invalidate_cache(root)
        entries = fs.ls(root, detail=True)
    except Exception as exc:   # noqa: BLE001
        if is_missing(exc):
            return {}
        raise UserError(f"{root}: cannot list ({exc.__class__.__name__}: {exc})") from None
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") != "directory"}
