"""logitcache.data.templates: chat templates of three families render into ids + loss masks that match
hand-written references token by token; the generation-marker path and the derived path agree; every
`train_on` policy; and each way a template or tokenizer cannot give masks is a one-line UserError.

The tokenizers are byte-level BPEs trained here on a few KB (session-scoped, well under a second)
with the families' special tokens added; the templates are the files in assets/chat_templates/.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_corpus_text

from logitcache.data import NoAssistantTurn, Sequence, render, template_fingerprint
from logitcache.errors import SettingError, UserError

TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "demo-teacher"

# Text the tokenizers learn from: the tiny corpus plus chat words, and ":--" so that a merge across
# a template/content boundary exists for the test that needs one.
_CHAT_TEXT = ["system user assistant Be brief. You are a helpful assistant.\n"] * 20 + \
             ["user:--Hark\nassistant:--Nay, sir.\n"] * 40

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is there?"},
    {"role": "assistant", "content": "Nay, answer me."},
    {"role": "user", "content": "Long live the king!"},
    {"role": "assistant", "content": "Bernardo? He."},
]


def build_tokenizer(specials: list[str], **special_map):
    """A byte-level BPE of 400 tokens whose `specials` are special tokens (never merged or split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus_text() + _CHAT_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_map)


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def without_markers(text: str) -> str:
    """The same template with its {% generation %} tags removed: it renders the same text."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", text)


@pytest.fixture(scope="session")
def chatml():
    """Qwen2-style: <|im_start|>/<|im_end|> special, EOS <|im_end|>, the ChatML template as its own."""
    tok = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = template("chatml")
    return tok


@pytest.fixture(scope="session")
def llama3():
    """Llama-3-style: header tokens and <|eot_id|> special, BOS <|begin_of_text|>."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = build_tokenizer(specials, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                          pad_token="<|end_of_text|>", additional_special_tokens=specials[2:])
    tok.chat_template = template("llama3")
    return tok


@pytest.fixture(scope="session")
def demo():
    """The demo teacher's tokenizer: no chat special tokens at all."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_TOKENIZER)


def reference(tok, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Expected ids and mask from hand-written (text, is_target) segments, each encoded on its own.

    The segments are cut where the tokenizer cannot merge across (special tokens, newlines before
    letters), so their concatenation is the tokenization of the whole text.
    """
    ids, mask = [], []
    for text, target in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [target] * len(piece)
    mask[0] = False
    return ids, mask


def runs(tok, seq: Sequence) -> list[str]:
    """The decoded text of each run of target tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], seq.loss_mask.astype(np.int8), [0]])))
    return [tok.decode(seq.input_ids[a:b].tolist()) for a, b in zip(edges[0::2], edges[1::2])]


# ---- hand-checked references, one per family ---------------------------------------------------------

def test_chatml_multi_turn_with_system_matches_reference(chatml):
    seq = render(chatml, CONVERSATION)
    ids, mask = reference(chatml, [
        ("<|im_start|>", False), ("system\nBe brief.", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("user\nWho is there?", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("Nay, answer me.", True), ("<|im_end|>", True),
        ("\n", False),
        ("<|im_start|>", False), ("user\nLong live the king!", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("Bernardo? He.", True), ("<|im_end|>", True),
        ("\n", False),
    ])
    assert seq.input_ids.dtype == np.int32 and seq.loss_mask.dtype == np.bool_
    assert seq.input_ids.tolist() == ids
    assert seq.loss_mask.tolist() == mask
    assert runs(chatml, seq) == ["Nay, answer me.<|im_end|>", "Bernardo? He.<|im_end|>"]


def test_chatml_default_system_message_is_rendered_and_not_trained(chatml):
    seq = render(chatml, CONVERSATION[1:3])
    text = chatml.decode(seq.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert runs(chatml, seq) == ["Nay, answer me.<|im_end|>"]


def test_llama3_multi_turn_with_system_matches_reference(llama3):
    seq = render(llama3, CONVERSATION)
    head = lambda role: [("<|start_header_id|>", False), (role, False), ("<|end_header_id|>", False),
                         ("\n\n", False)]
    ids, mask = reference(llama3, [
        ("<|begin_of_text|>", False),
        *head("system"), ("Be brief.", False), ("<|eot_id|>", False),
        *head("user"), ("Who is there?", False), ("<|eot_id|>", False),
        *head("assistant"), ("Nay, answer me.", True), ("<|eot_id|>", True),
        *head("user"), ("Long live the king!", False), ("<|eot_id|>", False),
        *head("assistant"), ("Bernardo? He.", True), ("<|eot_id|>", True),
    ])
    assert seq.input_ids.tolist() == ids
    assert seq.loss_mask.tolist() == mask
    assert runs(llama3, seq) == ["Nay, answer me.<|eot_id|>", "Bernardo? He.<|eot_id|>"]


def test_llama3_bos_is_not_added_twice(llama3):
    seq = render(llama3, CONVERSATION)
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert seq.input_ids[0] == bos and int((seq.input_ids == bos).sum()) == 1


def test_llama3_trims_content_and_the_mask_follows(llama3):
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "  Nay, answer me.\n"}]
    assert runs(llama3, render(llama3, messages)) == ["Nay, answer me.<|eot_id|>"]


def test_chatml_with_generation_markers_matches_the_same_reference(chatml):
    marked = render(chatml, CONVERSATION, chat_template=template("chatml_generation"))
    derived = render(chatml, CONVERSATION)
    assert marked.input_ids.tolist() == derived.input_ids.tolist()
    assert marked.loss_mask.tolist() == derived.loss_mask.tolist()


# ---- the generation-marker path equals the derived path ---------------------------------------------

@pytest.mark.parametrize("name, tok_fixture", [("chatml_generation", "chatml"), ("llama3_generation", "llama3"),
                                               ("demo", "demo")])
@pytest.mark.parametrize("train_on", ["assistant", "last-assistant", "completion", "all"])
def test_marker_path_equals_derived_path(request, name, tok_fixture, train_on):
    tok = request.getfixturevalue(tok_fixture)
    marked_template = template(name)
    plain_template = without_markers(marked_template)
    assert plain_template != marked_template
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        assert (tok.apply_chat_template(messages, chat_template=marked_template, tokenize=False)
                == tok.apply_chat_template(messages, chat_template=plain_template, tokenize=False))
        marked = render(tok, messages, chat_template=marked_template, train_on=train_on,
                        completion_start=len(messages) - 2)
        derived = render(tok, messages, chat_template=plain_template, train_on=train_on,
                        completion_start=len(messages) - 2)
        assert marked.input_ids.tolist() == derived.input_ids.tolist()
        assert marked.loss_mask.tolist() == derived.loss_mask.tolist()
        assert marked.num_targets > 0


def test_demo_template_trains_on_textual_end_markers(demo):
    seq = render(demo, CONVERSATION, chat_template=template("demo"))
    assert runs(demo, seq) == ["Nay, answer me.<|im_end|>", "Bernardo? He.<|im_end|>"]
    assert demo.decode(seq.input_ids.tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


# ---- a byte-level merge across a turn boundary --------------------------------------------------------

# transformers renders with trim_blocks: a newline right after a block tag is dropped, hence {{ '\n' }}.
PLAIN = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ '\\n' }}{% endfor %}"
PLAIN_MARKED = ("{% for m in messages %}{{ m['role'] }}:{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}")


def test_a_merge_across_the_template_content_boundary_keeps_derived_masks_whole(chatml):
    messages = [{"role": "user", "content": "--Hark"}, {"role": "assistant", "content": "--Nay, sir."}]
    seq = render(chatml, messages, chat_template=PLAIN)
    text = "user:--Hark\nassistant:--Nay, sir.\n"
    for t in (PLAIN, PLAIN_MARKED):
        assert chatml.apply_chat_template(messages, chat_template=t, tokenize=False) == text
    enc = chatml(text, add_special_tokens=False, return_offsets_mapping=True)
    content_start = text.index("--Nay")
    straddling = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < content_start < b]
    assert straddling, "the tokenizer should merge ':--' across the boundary; the case is not built"
    assert seq.input_ids.tolist() == enc["input_ids"]
    # The straddling token (":--") is marked, so every content character is covered by a target.
    assert seq.loss_mask[straddling[0]]
    covered = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < len(text) - 1 and b > content_start]
    assert seq.loss_mask.tolist() == [i in covered for i in range(len(seq))]
    assert chatml.decode(seq.input_ids[seq.loss_mask].tolist()) == ":--Nay, sir."
    marked = render(chatml, messages, chat_template=PLAIN_MARKED)
    assert marked.loss_mask.tolist() == seq.loss_mask.tolist()


# ---- train_on policies --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chatml", "chatml_generation"])
def test_every_train_on_policy(chatml, name):
    t = template(name)
    assert runs(chatml, render(chatml, CONVERSATION, chat_template=t, train_on="assistant")) == \
        ["Nay, answer me.<|im_end|>", "Bernardo? He.<|im_end|>"]
    assert runs(chatml, render(chatml, CONVERSATION, chat_template=t, train_on="last-assistant")) == \
        ["Bernardo? He.<|im_end|>"]
    # completion: from completion_start on; without one (not a prompt-completion row), the last turn.
    assert runs(chatml, render(chatml, CONVERSATION, chat_template=t, train_on="completion",
                               completion_start=2)) == ["Nay, answer me.<|im_end|>", "Bernardo? He.<|im_end|>"]
    assert runs(chatml, render(chatml, CONVERSATION, chat_template=t, train_on="completion",
                               completion_start=3)) == ["Bernardo? He.<|im_end|>"]
    assert runs(chatml, render(chatml, CONVERSATION, chat_template=t, train_on="completion")) == \
        ["Bernardo? He.<|im_end|>"]
    every = render(chatml, CONVERSATION, chat_template=t, train_on="all")
    assert every.loss_mask.tolist() == [False] + [True] * (len(every) - 1)


@pytest.mark.parametrize("train_on", ["assistant", "last-assistant", "completion"])
def test_no_assistant_turn_is_its_own_error(chatml, train_on):
    with pytest.raises(NoAssistantTurn, match="no assistant turn"):
        render(chatml, CONVERSATION[:2], train_on=train_on)
    with pytest.raises(NoAssistantTurn):
        render(chatml, CONVERSATION, train_on="completion", completion_start=5)
    assert render(chatml, CONVERSATION[:2], train_on="all").num_targets > 0


def test_empty_assistant_content_still_trains_its_end_of_turn(chatml):
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": ""}]
    assert runs(chatml, render(chatml, messages)) == ["<|im_end|>"]
    assert runs(chatml, render(chatml, messages, chat_template=template("chatml_generation"))) == ["<|im_end|>"]


def test_content_repeated_from_an_earlier_message_is_found_in_its_own_turn(chatml):
    messages = [{"role": "user", "content": "He."}, {"role": "assistant", "content": "He."},
                {"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"}]
    seq = render(chatml, messages)
    assert runs(chatml, seq) == ["He.<|im_end|>", "assistant<|im_end|>"]
    assert seq.loss_mask.tolist() == render(chatml, messages, chat_template=template("chatml_generation")
                                            ).loss_mask.tolist()


# ---- fingerprints -------------------------------------------------------------------------------------

def test_template_fingerprint_is_the_sha256_of_the_template_used(chatml):
    assert template_fingerprint(chatml) == hashlib.sha256(template("chatml").encode()).hexdigest()
    other = template("chatml_generation")
    assert template_fingerprint(chatml, other) == hashlib.sha256(other.encode()).hexdigest()


# ---- what cannot give masks: one-line UserErrors ------------------------------------------------------

def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def test_a_slow_tokenizer_is_refused_for_derived_masks():
    from transformers import ByT5Tokenizer

    with pytest.raises(UserError, match="slow tokenizer") as exc:
        render(ByT5Tokenizer(), CONVERSATION, chat_template=template("chatml"))
    one_line(exc)


def test_content_the_template_rewrites_cannot_be_located(chatml):
    shouting = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(UserError, match="no derivation") as exc:
        render(chatml, CONVERSATION, chat_template=shouting)
    assert "message 2" in one_line(exc)


def test_a_turn_rendered_differently_when_last_cannot_be_derived(chatml):
    thinking = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and loop.last %}"
                "<think></think>{% endif %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UserError, match="no derivation") as exc:
        render(chatml, CONVERSATION, chat_template=thinking)
    assert "differently" in one_line(exc)
    # The last turn alone is sound: it is rendered as the last.
    assert runs(chatml, render(chatml, CONVERSATION, chat_template=thinking, train_on="last-assistant")) == \
        ["Bernardo? He."]


def test_generation_blocks_that_miss_the_assistant_cannot_give_masks(chatml):
    hollow = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'tool' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}")
    with pytest.raises(UserError, match="template cannot give masks") as exc:
        render(chatml, CONVERSATION, chat_template=hollow)
    one_line(exc)


def test_a_template_that_raises_is_one_line(chatml):
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system\\nmessages here') }}{% endif %}"
    with pytest.raises(UserError, match="chat template failed") as exc:
        render(chatml, CONVERSATION, chat_template=strict)
    one_line(exc)


def test_no_chat_template_is_one_line():
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    with pytest.raises(UserError, match="no chat template") as exc:
        render(bare, CONVERSATION)
    one_line(exc)


def test_bad_messages_and_settings_are_one_line(chatml):
    with pytest.raises(UserError, match="message 1 has role 'narrator'") as exc:
        render(chatml, [CONVERSATION[0], {"role": "narrator", "content": "Night."}])
    one_line(exc)
    with pytest.raises(UserError, match="empty message list"):
        render(chatml, [])
    with pytest.raises(SettingError, match="train_on everything"):
        render(chatml, CONVERSATION, train_on="everything")
    with pytest.raises(SettingError, match="completion_start 9"):
        render(chatml, CONVERSATION, train_on="completion", completion_start=9)
