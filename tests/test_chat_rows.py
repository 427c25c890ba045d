"""logitcache.data.conversations and chat: formats are detected from columns, every row normalises to
{role, content} messages, `render_rows` skips and counts rows with no assistant turn, and every bad
row is a one-line UserError naming its index."""

from __future__ import annotations

import pytest
from test_chat_templates import chatml, one_line, runs  # noqa: F401  (a session fixture and helpers)

from logitcache.data import (
    ChatCounts,
    Conversation,
    NoAssistantTurn,
    detect_format,
    normalize_row,
    render,
    render_rows,
)
from logitcache.errors import SettingError, UserError

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"},
         {"role": "assistant", "content": "Nay, answer me."}]


# ---- detection ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns, expected", [
    (["messages"], "messages"),
    (["id", "conversations"], "sharegpt"),
    (["prompt", "completion"], "prompt-completion"),
    (["text", "meta"], "text"),
    (["text", "messages"], "messages"),           # the richer format wins
    (["prompt", "completion", "text"], "prompt-completion"),
])
def test_detect_format_from_columns(columns, expected):
    assert detect_format(columns) == expected


def test_a_format_override_is_checked_against_the_columns():
    assert detect_format(["text", "messages"], "text") == "text"
    with pytest.raises(SettingError, match="format sharegpt: needs column"):
        detect_format(["messages"], "sharegpt")
    with pytest.raises(SettingError, match="format chatml: not one of"):
        detect_format(["messages"], "chatml")
    with pytest.raises(UserError, match=r"columns \(prompt, id\) match no chat format") as exc:
        detect_format(["prompt", "id"])
    one_line(exc)


# ---- normalisation ------------------------------------------------------------------------------------

def test_messages_rows_keep_role_and_content_only():
    row = {"messages": [dict(m, name="x") for m in TURNS], "id": 3}
    assert normalize_row(row, 0) == Conversation(tuple(TURNS), None)


def test_sharegpt_speakers_map_to_roles():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Who is there?"},
                             {"from": "gpt", "value": "Nay, answer me."}, {"from": "user", "value": "Hm."},
                             {"role": "assistant", "content": "Ay."}]}
    conv = normalize_row(row, 0)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[:3] == tuple(TURNS)


def test_prompt_completion_strings_and_lists():
    conv = normalize_row({"prompt": "Who is there?", "completion": "Nay, answer me."}, 0)
    assert conv == Conversation(({"role": "user", "content": "Who is there?"},
                                 {"role": "assistant", "content": "Nay, answer me."}), 1)
    conv = normalize_row({"prompt": TURNS[:2], "completion": TURNS[2:]}, 0)
    assert conv == Conversation(tuple(TURNS), 2)
    assert normalize_row({"prompt": "", "completion": "Nay."}, 0).completion_start == 0


def test_text_rows_are_one_assistant_message():
    assert normalize_row({"text": "To be."}, 0) == Conversation(({"role": "assistant", "content": "To be."},), None)


@pytest.mark.parametrize("row, format, match", [
    ({"id": 1}, None, "fits no chat format"),
    ({"messages": []}, None, "empty message list"),
    ({"messages": [{"role": "narrator", "content": "Night."}]}, None, "role 'narrator'"),
    ({"messages": [{"role": "user"}]}, None, "message 0 is not a {role, content} mapping"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, None, "content is not a string"),
    ({"messages": "Who is there?"}, None, "messages are not a list"),
    ({"conversations": [{"from": "bard", "value": "Hm."}]}, None, "from 'bard'"),
    ({"conversations": []}, None, "empty message list"),
    ({"conversations": [{"speaker": "x"}]}, None, "turn 0 is not a {from, value} mapping"),
    ({"prompt": "Who?", "completion": ""}, None, "empty completion"),
    ({"prompt": "Who?", "completion": 3}, None, "'completion' is neither a string nor a message list"),
    ({"prompt": [{"role": "oracle", "content": "x"}], "completion": "y"}, None, "role 'oracle'"),
    ({"text": ""}, None, "'text' is not a non-empty string"),
    ({"text": "x"}, "messages", "no 'messages'"),
    ("a string", None, "not a mapping"),
])
def test_bad_rows_are_one_line_and_name_the_row(row, format, match):
    with pytest.raises(UserError, match=match) as exc:
        normalize_row(row, 7, format)
    assert one_line(exc).startswith("row 7")


# ---- render_rows --------------------------------------------------------------------------------------

def test_render_rows_renders_skips_and_counts(chatml):
    rows = [{"messages": TURNS}, {"messages": TURNS[:2]}, {"messages": TURNS + TURNS[1:]}]
    counts = ChatCounts()
    out = list(render_rows(rows, chatml, counts=counts))
    assert [i for i, _ in out] == [0, 2]
    assert runs(chatml, out[1][1]) == ["Nay, answer me.<|im_end|>"] * 2
    assert out[0][1].input_ids.tolist() == render(chatml, TURNS).input_ids.tolist()
    assert counts == ChatCounts(rows=3, sequences=2, skipped_no_assistant=1,
                                tokens=sum(len(s) for _, s in out), target_tokens=sum(s.num_targets for _, s in out))


def test_render_rows_strict_refuses_a_row_with_no_assistant_turn(chatml):
    rows = [{"messages": TURNS}, {"messages": TURNS[:2]}]
    with pytest.raises(NoAssistantTurn, match="row 1: no assistant turn") as exc:
        list(render_rows(rows, chatml, strict=True))
    one_line(exc)


def test_render_rows_prompt_completion_trains_on_the_completion(chatml):
    rows = [{"prompt": TURNS, "completion": [{"role": "assistant", "content": "Bernardo?"}]}]
    (_, seq), = render_rows(rows, chatml, train_on="completion")
    assert runs(chatml, seq) == ["Bernardo?<|im_end|>"]
    (_, seq), = render_rows(rows, chatml, train_on="assistant")
    assert runs(chatml, seq) == ["Nay, answer me.<|im_end|>", "Bernardo?<|im_end|>"]


def test_render_rows_holds_every_row_to_the_first_rows_format(chatml):
    rows = [{"messages": TURNS}, {"text": "To be."}]
    with pytest.raises(UserError, match="row 1: no 'messages' for the messages format") as exc:
        list(render_rows(rows, chatml))
    one_line(exc)


def test_render_rows_names_the_row_of_a_template_failure(chatml):
    rows = [{"messages": TURNS}, {"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Ho"}]}]
    shouting = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(UserError, match="row 0: message 2 .*no derivation") as exc:
        list(render_rows(rows, chatml, chat_template=shouting))
    one_line(exc)


def test_render_rows_bad_settings(chatml):
    with pytest.raises(SettingError, match="train_on most"):
        list(render_rows([{"messages": TURNS}], chatml, train_on="most"))
    with pytest.raises(SettingError, match="format shared"):
        list(render_rows([{"messages": TURNS}], chatml, format="shared"))
