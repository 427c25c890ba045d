"""Chat rows in, conversations out: detect a dataset's chat format and normalise each row to messages.

Four row formats are read, named by the column that carries them:

- `messages`: a list of `{"role", "content"}` dicts, the transformers chat format;
- `sharegpt`: a `conversations` list of `{"from", "value"}` dicts (`human`/`user`, `gpt`/`assistant`,
  `system`, `tool`), mapped to roles; `{"role", "content"}` items are read too;
- `prompt-completion`: `prompt` and `completion` columns, each a plain string (a user message and
  an assistant message) or a message list; the completion's messages are remembered so that only
  they can be trained on;
- `text`: a plain string, read as one assistant message (so every policy trains on all of it).

Every row becomes a `Conversation`: a tuple of `{"role", "content"}` dicts (other keys are dropped)
and, for prompt-completion rows, the index of the first completion message. Bad rows raise a
one-line `UserError` naming the row's index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from logitcache.errors import SettingError, UserError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names; `from` values outside this map are refused rather than guessed.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
# Checked in this order, so a dataset with both `messages` and `text` columns reads as `messages`.
FORMATS = ("messages", "sharegpt", "prompt-completion", "text")
_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt-completion": ("prompt", "completion"),
            "text": ("text",)}


@dataclass(frozen=True)
class Conversation:
    """One normalised row: its messages and, for prompt-completion rows, where the completion starts."""

    messages: tuple[dict[str, str], ...]
    completion_start: int | None = None


def detect_format(columns: Iterable[str], format: str | None = None) -> str:
    """The chat format of a dataset with these column names, or `format` checked against them."""
    columns = list(columns)
    if format is not None:
        if format not in FORMATS:
            raise SettingError("format", format, f"not one of {', '.join(FORMATS)}")
        missing = [c for c in _COLUMNS[format] if c not in columns]
        if missing:
            raise SettingError("format", format, f"needs column(s) {', '.join(missing)} "
                               f"(columns: {', '.join(columns) or 'none'})")
        return format
    for name in FORMATS:
        if all(c in columns for c in _COLUMNS[name]):
            return name
    raise UserError(f"columns ({', '.join(columns) or 'none'}) match no chat format: expected messages, "
                    "conversations (ShareGPT), prompt + completion, or text")


def normalize_row(row: Mapping[str, Any], index: int, format: str | None = None) -> Conversation:
    """Row `index` of a dataset as a `Conversation`; `format` None detects it from the row's keys."""
    if not isinstance(row, Mapping):
        raise UserError(f"row {index}: not a mapping of columns ({type(row).__name__})")
    if format is None:
        format = next((name for name in FORMATS if all(c in row for c in _COLUMNS[name])), None)
        if format is None:
            raise UserError(f"row {index}: fits no chat format (keys: {', '.join(map(str, row)) or 'none'})")
    elif format not in FORMATS:
        raise SettingError("format", format, f"not one of {', '.join(FORMATS)}")
    where = f"row {index}"
    for column in _COLUMNS[format]:
        if row.get(column) is None:
            raise UserError(f"{where}: no '{column}' for the {format} format")
    if format == "messages":
        messages = check_messages(row["messages"], where)
        completion_start = None
    elif format == "sharegpt":
        messages = _sharegpt(row["conversations"], where)
        completion_start = None
    elif format == "prompt-completion":
        prompt = _part(row["prompt"], "user", where, "prompt")
        completion = _part(row["completion"], "assistant", where, "completion")
        if not completion:
            raise UserError(f"{where}: empty completion")
        messages, completion_start = prompt + completion, len(prompt)
    else:
        text = row["text"]
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: 'text' is not a non-empty string")
        messages, completion_start = [{"role": "assistant", "content": text}], None
    if not messages:
        raise UserError(f"{where}: empty message list")
    return Conversation(tuple(messages), completion_start)


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """`messages` as a list of `{"role", "content"}` dicts, or a one-line UserError naming `where`."""
    if not isinstance(messages, (list, tuple)):
        raise UserError(f"{where}: messages are not a list ({type(messages).__name__})")
    if not messages:
        raise UserError(f"{where}: empty message list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: message {i} is not a {{role, content}} mapping")
        out.append(_message(message["role"], message["content"], where, i))
    return out


def _message(role: Any, content: Any, where: str, i: int) -> dict[str, str]:
    if role not in ROLES:
        raise UserError(f"{where}: message {i} has role {role!r}, not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        # Multimodal content lists and tool-call-only messages have no text to render and mask.
        raise UserError(f"{where}: message {i}'s content is not a string ({type(content).__name__})")
    return {"role": role, "content": content}


def _sharegpt(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, (list, tuple)):
        raise UserError(f"{where}: conversations are not a list ({type(turns).__name__})")
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, Mapping) and "from" in turn and "value" in turn:
            speaker, content = turn["from"], turn["value"]
        elif isinstance(turn, Mapping) and "role" in turn and "content" in turn:
            speaker, content = turn["role"], turn["content"]
        else:
            raise UserError(f"{where}: conversation turn {i} is not a {{from, value}} mapping")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise UserError(f"{where}: message {i} is from {speaker!r}, not one of {', '.join(SHAREGPT_ROLES)}")
        out.append(_message(role, content, where, i))
    return out


def _part(value: Any, role: str, where: str, column: str) -> list[dict[str, str]]:
    """A prompt or completion: a plain string is one message of `role`; an empty string none."""
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value else []
    if isinstance(value, (list, tuple)):
        return check_messages(value, f"{where} ({column})") if value else []
    raise UserError(f"{where}: '{column}' is neither a string nor a message list ({type(value).__name__})")
