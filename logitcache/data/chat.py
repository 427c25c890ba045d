"""Chat rows in, masked token sequences out: the one loop that joins formats, templates and counts.

`render_rows` reads rows of any supported chat format (`conversations.FORMATS`), renders each with
the chat template (`templates.render`) and yields `(row index, Sequence)`. Rows with no assistant
turn to train on are skipped and counted (or refused when `strict`); every other bad row is a
one-line UserError naming its index. Lengths are left to the caller: `len(sequence)` is the
rendered length, and cutting (dropping, truncating or splitting long sequences) is the caller's
choice, made on these lengths and masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from logitcache.data.conversations import detect_format, normalize_row
from logitcache.data.templates import TRAIN_ON, NoAssistantTurn, Sequence, render, resolve_template
from logitcache.errors import SettingError, UserError

logger = logging.getLogger(__name__)


@dataclass
class ChatCounts:
    """What `render_rows` saw; complete once its iterator is exhausted."""

    rows: int = 0
    sequences: int = 0
    skipped_no_assistant: int = 0
    tokens: int = 0
    target_tokens: int = 0


def render_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, format: str | None = None,
                chat_template: str | None = None, train_on: str = "assistant", strict: bool = False,
                counts: ChatCounts | None = None) -> Iterator[tuple[int, Sequence]]:
    """Yield `(row index, Sequence)` for each usable row, in order.

    `format` None detects the format from the first row's columns and holds every row to it.
    `chat_template` None uses the tokenizer's own. A row with no assistant turn to train on is
    skipped and counted in `counts.skipped_no_assistant`, or raises NoAssistantTurn if `strict`.
    """
    if train_on not in TRAIN_ON:
        raise SettingError("train_on", train_on, f"not one of {', '.join(TRAIN_ON)}")
    counts = counts if counts is not None else ChatCounts()
    template = resolve_template(tokenizer, chat_template)  # once, before any row: a missing one fails first
    for index, row in enumerate(rows):
        if index == 0:
            if not isinstance(row, Mapping):
                raise UserError(f"row 0: not a mapping of columns ({type(row).__name__})")
            format = detect_format(row.keys(), format)
        counts.rows += 1
        conversation = normalize_row(row, index, format)
        try:
            sequence = render(tokenizer, conversation.messages, chat_template=template, train_on=train_on,
                              completion_start=conversation.completion_start)
        except NoAssistantTurn as exc:
            if strict:
                raise NoAssistantTurn(f"row {index}: {exc}") from None
            counts.skipped_no_assistant += 1
            continue
        except UserError as exc:
            raise UserError(f"row {index}: {exc}") from exc
        counts.sequences += 1
        counts.tokens += len(sequence)
        counts.target_tokens += sequence.num_targets
        yield index, sequence
    if counts.skipped_no_assistant:
        logger.info("skipped %d of %d rows with no assistant turn to train on (train_on %s)",
                    counts.skipped_no_assistant, counts.rows, train_on)
