"""Conversations through a chat template: token ids plus a loss mask over the assistant's tokens.

The mask convention (what every consumer of `Sequence` relies on):

    loss_mask[i] is True  <=>  token input_ids[i] is a training target.

A causal LM's logits at position t predict token t+1, so the loss at position t is weighted by
`loss_mask[t + 1]`; `loss_mask[0]` is always False (nothing predicts the first token, and in a
packed row it would be predicted across a sequence boundary).

Which tokens are targets, by `train_on`:
- `assistant`: every assistant turn; `last-assistant`: only the last one; `completion`: the
  assistant turns of a prompt-completion row's completion (for other rows, the last assistant
  turn); `all`: every token (but the first).
- A trained turn's targets are the tokens of its content as the template renders it, plus its
  end-of-turn text: what the template emits right after the content and before anything of the
  next turn, without trailing whitespace (ChatML's `<|im_end|>` but not the `\\n` after it,
  Llama-3's `<|eot_id|>`). The model thus learns to stop; the newline that follows is never
  generated, since generation stops at the end-of-turn token.

Two ways to find those tokens:
- The template marks them with `{% generation %}...{% endgeneration %}`: transformers'
  `apply_chat_template(return_assistant_tokens_mask=True)` gives the mask, and the template is
  the authority. Templates here wrap content + end-of-turn token, matching the rule above. For
  a subset of turns (`last-assistant`, `completion`), the i-th run of marked tokens is taken to
  be the i-th assistant message; a template whose runs do not count one per message is refused.
- Otherwise the mask is derived, with a fast tokenizer's character offsets: render the whole
  conversation as text; for each trained turn j find its content (as is, else trimmed, since
  templates often `| trim`) in the text at or after the end of the prefix rendered for
  messages[:j] with a generation prompt (and after the previous message's content), and take
  as its end-of-turn text what follows the content in the render
  of messages[:j+1], as far as that render agrees with the whole one; then mark every token
  whose character span overlaps [content start, end of end-of-turn text). A token that a
  byte-level BPE merged across the boundary (template text + content) overlaps the content and
  is marked, exactly as transformers marks generation spans (first to last token touched).
  A slow tokenizer (no offsets), a content the text does not contain, or a template that
  renders a turn differently once later turns follow leaves no sound derivation: UserError.
  (Text a template adds only after the whole conversation, such as a closing EOS, counts as the
  last turn's end-of-turn text.)

Rendered text is tokenized with add_special_tokens=False: the template's own BOS (if any) is the
only one.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any
from typing import Sequence as Seq

import numpy as np

from logitcache.data.conversations import check_messages
from logitcache.errors import SettingError, UserError, exception_line

TRAIN_ON = ("assistant", "last-assistant", "completion", "all")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class NoAssistantTurn(UserError):
    """A conversation with no assistant turn to train on: callers skip and count it, or refuse it."""


@dataclass(frozen=True, eq=False)
class Sequence:
    """One rendered conversation: `input_ids` (L,) int32 and `loss_mask` (L,) bool, as the module docstring says."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """How many tokens are training targets."""
        return int(self.loss_mask.sum())


def resolve_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template text `render` uses: `chat_template` if given, else the tokenizer's own."""
    if chat_template is not None and not isinstance(chat_template, str):
        raise SettingError("chat_template", type(chat_template).__name__, "is not a Jinja string")
    try:
        return tokenizer.get_chat_template(chat_template)
    except ValueError:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} "
                        "has no chat template; pass one as a Jinja string") from None


def template_fingerprint(tokenizer: Any, chat_template: str | None = None) -> str:
    """sha256 hex of the template text actually used, for a cache key or a manifest."""
    return hashlib.sha256(resolve_template(tokenizer, chat_template).encode()).hexdigest()


def has_generation_markers(template: str) -> bool:
    """Whether the template wraps assistant text in `{% generation %}` (masks come from transformers)."""
    return bool(_GENERATION_TAG.search(template))


def trained_turns(messages: Seq[dict[str, str]], train_on: str, completion_start: int | None = None) -> list[int]:
    """Indices of the assistant messages whose tokens are targets under `train_on` (empty for `all`)."""
    if train_on not in TRAIN_ON:
        raise SettingError("train_on", train_on, f"not one of {', '.join(TRAIN_ON)}")
    if completion_start is not None and not 0 <= completion_start <= len(messages):
        raise SettingError("completion_start", completion_start, f"not between 0 and {len(messages)} messages")
    assistant = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "assistant":
        return assistant
    if train_on == "completion" and completion_start is not None:
        return [j for j in assistant if j >= completion_start]
    if train_on in ("last-assistant", "completion"):
        return assistant[-1:]
    return []


def render(tokenizer: Any, messages: Seq[dict[str, str]], *, chat_template: str | None = None,
           train_on: str = "assistant", completion_start: int | None = None) -> Sequence:
    """Render one conversation with a chat template into token ids and a loss mask.

    Raises NoAssistantTurn when `train_on` is not `all` and no assistant turn qualifies, and a
    one-line UserError when the template fails or cannot give masks.
    """
    messages = check_messages(messages)
    trained = trained_turns(messages, train_on, completion_start)
    if train_on != "all" and not trained:
        raise NoAssistantTurn(f"no assistant turn to train on (train_on {train_on})")
    template = resolve_template(tokenizer, chat_template)
    if train_on == "all":
        ids = _encode(tokenizer, _render_text(tokenizer, messages, template))["input_ids"]
        mask = np.ones(len(ids), dtype=bool)
    elif has_generation_markers(template):
        ids, mask = _marked_mask(tokenizer, messages, template, trained)
    else:
        ids, mask = _derived_mask(tokenizer, messages, template, trained)
    mask = np.asarray(mask, dtype=bool)
    if len(mask):
        mask[0] = False  # nothing predicts the first token
    if train_on != "all" and not mask.any() and any(messages[j]["content"] for j in trained):
        raise UserError(f"template cannot give masks: no token of the trained assistant turn(s) {trained} "
                        "is marked in its rendering")
    return Sequence(np.asarray(ids, dtype=np.int32), mask)


def _render_text(tokenizer: Any, messages: list[dict[str, str]], template: str, *,
                 add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # the template is user code (Jinja): any failure is the template's
        raise UserError(f"the chat template failed on this conversation: {exception_line(exc)}") from exc


def _encode(tokenizer: Any, text: str, offsets: bool = False) -> dict:
    # The template writes every special token it wants (BOS included): add none.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


def _marked_mask(tokenizer: Any, messages: list[dict[str, str]], template: str,
                 trained: list[int]) -> tuple[list[int], np.ndarray]:
    """The template's `{% generation %}` spans as transformers marks them, kept for the trained turns."""
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as exc:  # the template is user code (Jinja): any failure is the template's
        raise UserError(f"the chat template failed on this conversation: {exception_line(exc)}") from exc
    ids, full = list(out["input_ids"]), np.asarray(out["assistant_masks"], dtype=bool)
    assistant = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if trained == assistant:
        return ids, full
    # Fewer turns than all: the i-th marked run of tokens is the i-th assistant message.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], full.astype(np.int8), [0]])))
    runs = list(zip(edges[0::2], edges[1::2]))
    if len(runs) != len(assistant):
        raise UserError(f"template cannot give masks per turn: its generation blocks mark {len(runs)} "
                        f"runs of tokens for {len(assistant)} assistant messages")
    mask = np.zeros(len(ids), dtype=bool)
    for (start, end), j in zip(runs, assistant):
        if j in trained:
            mask[start:end] = True
    return ids, mask


def _derived_mask(tokenizer: Any, messages: list[dict[str, str]], template: str,
                  trained: list[int]) -> tuple[list[int], np.ndarray]:
    """Tokens overlapping each trained turn's content + end-of-turn text, found by rendering prefixes."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is a slow tokenizer (no character offsets): no derivation "
                        "of assistant masks is sound; use a fast tokenizer or a template with generation markers")
    text = _render_text(tokenizer, messages, template)
    spans = []
    cursor = 0
    for j, message in enumerate(messages):
        if j not in trained:
            # Walking the untrained messages too keeps a search from matching an earlier copy.
            found = _locate(text, message["content"], cursor)
            cursor = found[1] if found else cursor
            continue
        if j > 0:
            prompt = _render_text(tokenizer, messages[:j], template, add_generation_prompt=True)
            cursor = max(cursor, len(os.path.commonprefix([prompt, text])))
        found = _locate(text, message["content"], cursor)
        if found is None:
            raise UserError(f"message {j} (assistant): its content is not in the rendered conversation, so no "
                            "derivation of its mask is sound; use a template with generation markers")
        start, end = found
        turn = text if j == len(messages) - 1 else _render_text(tokenizer, messages[:j + 1], template)
        shared = len(os.path.commonprefix([turn, text]))
        if shared < end:
            raise UserError(f"message {j} (assistant): the template renders it differently once later turns "
                            "follow, so no derivation of its mask is sound; use a template with generation markers")
        end += len(turn[end:shared].rstrip())  # the end-of-turn text, up to what the next turn adds
        spans.append((start, end))
        cursor = end
    enc = _encode(tokenizer, text, offsets=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(enc["input_ids"]), dtype=bool)
    for start, end in spans:
        if end > start:
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return list(enc["input_ids"]), mask


def _locate(text: str, content: str, start: int) -> tuple[int, int] | None:
    """Where `content` appears in `text` at or after `start`; trimmed content too (templates often `| trim`)."""
    at = text.find(content, start)
    if at >= 0:
        return at, at + len(content)
    trimmed = content.strip()
    if trimmed and trimmed != content:
        at = text.find(trimmed, start)
        if at >= 0:
            return at, at + len(trimmed)
    return None
