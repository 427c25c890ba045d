"""Packed rows: several documents in one row, positions restarting and attention kept inside each.

- data.packing: documents grouped greedily in order into rows of at most limit + 1 tokens; tokens,
  masks and loss positions unchanged; position and document ids of a padded batch;
- trainer.attention, on tiny real Llama and Qwen2 models in float32: every document's logits inside
  a packed batch equal its logits run alone within 1e-5 (float32 rounding of other matmul shapes,
  at most ~2.4e-6 seen), for eager and sdpa; changing one document's tokens leaves every other document's
  logits bit-identical (masked keys get weight exactly 0); the flattened varlen path of
  flash_attention_2/3 is driven through transformers with a reference varlen attention registered
  under a test name (the flash kernel itself needs a GPU); other implementations are refused;
- the loop's normalisation: a step on packed rows has the loss tokens and, in float64, the
  gradient of the same documents one per row (within 1e-9).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from test_loss_masks import first_step_grads, max_diff

from logitcache.data import Sequences, pack_rows, pack_sequences, packed_positions, unpacked
from logitcache.errors import UserError
from trainer import attention
from trainer.commands.pretrain import make_ce_loss
from trainer.data import SequenceBatches
from trainer.logits import LogitsAt
from trainer.loop import MODEL_INPUTS, loss_tokens

VOCAB = 64
TOL = 1e-5
# 9 documents of 2..17 tokens; with limit 23 (24 tokens a row) they pack into 4 rows
LENGTHS = [7, 12, 3, 9, 15, 5, 17, 2, 6]
LIMIT = 23


def documents(lengths=LENGTHS, seed: int = 0, limit: int = LIMIT) -> Sequences:
    """Random documents (ids 1..VOCAB-1), each with a prompt of a third of it carrying no loss."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, n).astype(np.int32) for n in lengths]
    masks = []
    for n in lengths:
        mask = np.zeros(n, bool)
        mask[max(1, n // 3):] = True
        masks.append(mask)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Sequences(np.concatenate(ids), offsets, np.concatenate(masks), limit, "docs" + str(seed), "test", "tok",
                     {"format": "text"})


def model_with(arch: str, impl: str, dtype=torch.float32):
    model = build_tiny_model(arch, VOCAB, seed=2, context=64).to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def packed_logits(model, seqs: Sequences) -> tuple[torch.Tensor, dict]:
    """Logits [B, T, V] of every packed row in one batch, through LogitsAt as the loop runs it."""
    batch = SequenceBatches(seqs, 1).rows_batch(np.arange(seqs.num_windows))
    with torch.no_grad():
        return LogitsAt(model)(**{k: batch[k] for k in MODEL_INPUTS if k in batch}), batch


def per_document(logits: torch.Tensor, seqs: Sequences) -> list[torch.Tensor]:
    """Each document's logits at its positions (its n - 1 first tokens), cut from a packed batch."""
    out = []
    for r in range(seqs.num_windows):
        start = 0
        for n in seqs.doc_lengths(r).tolist():
            out.append(logits[r, start:start + n - 1])
            start += n
    return out


# ---------------------------------------------------------------------------------------------
# data.packing


def test_documents_are_grouped_greedily_in_order():
    assert pack_rows(np.array([5, 3, 9, 2, 2, 7]), 10).tolist() == [0, 2, 3, 5, 6]
    assert pack_rows(np.array([10, 10]), 10).tolist() == [0, 1, 2]          # full rows stay alone
    assert pack_rows(np.array([], dtype=np.int64), 10).tolist() == [0]
    docs = documents()
    packed = pack_sequences(docs)
    assert packed.packing == {"method": "greedy", "max_tokens": LIMIT + 1, "documents": len(LENGTHS)}
    groups = [packed.doc_lengths(r).tolist() for r in range(packed.num_windows)]
    assert groups == [[7, 12, 3], [9, 15], [5, 17, 2], [6]]     # a row is full at 24 tokens
    assert packed.seq_len == 23 and packed.limit == LIMIT and packed.num_windows == 4
    assert np.array_equal(packed.input_ids, docs.input_ids) and np.array_equal(packed.loss_mask, docs.loss_mask)
    assert packed.loss_tokens == docs.loss_tokens
    # a row's loss positions are its documents' own, shifted by where each starts; none at a boundary
    again = unpacked(packed)
    assert np.array_equal(again.offsets, docs.offsets) and again.packing is None
    j = 0
    for r in range(packed.num_windows):
        start, want = 0, []
        for n in packed.doc_lengths(r).tolist():
            want += (docs.loss_positions(j) + start).tolist()
            assert start + n - 1 not in packed.loss_positions(r).tolist()
            start, j = start + n, j + 1
        assert packed.loss_positions(r).tolist() == want
    # the fingerprint tells packed rows from the same documents unpacked, and is reproducible
    assert packed.fingerprint != docs.fingerprint == documents().fingerprint
    assert pack_sequences(documents()).fingerprint == packed.fingerprint
    assert pack_sequences(documents(limit=40)).fingerprint != packed.fingerprint


def test_position_and_document_ids_restart_at_each_document():
    pos, doc = packed_positions([np.array([3, 2]), np.array([4])], 6)
    # row 0: 5 tokens -> 4 positions (3 + the second document's first), then 2 of padding
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert doc.tolist() == [[0, 0, 0, 1, -1, -1], [0, 0, 0, -1, -1, -1]]
    with pytest.raises(ValueError):
        packed_positions([np.array([4, 4])], 6)


# ---------------------------------------------------------------------------------------------
# trainer.attention: a document inside a packed row is the document alone


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_documents_in_packed_rows_equal_themselves_alone(arch, impl):
    model = model_with(arch, impl)
    seqs = pack_sequences(documents())
    logits, batch = packed_logits(model, seqs)
    assert batch["position_ids"].shape == batch["input_ids"].shape and seqs.num_windows == 4
    got = per_document(logits, seqs)
    docs = unpacked(seqs)
    worst = 0.0
    with torch.no_grad():
        for j in range(docs.num_windows):
            ids = torch.as_tensor(docs.row(j)[0][:-1], dtype=torch.long)[None]
            alone = model(input_ids=ids).logits[0]
            worst = max(worst, float((got[j] - alone).abs().max()))
    assert worst <= TOL
    # the same rows with attention across the boundaries (positions renumbered only) are far off
    with torch.no_grad():
        crossing = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch["attention_mask"]).logits
    assert float((crossing - logits).abs().max()) > 1e-2


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_changing_one_document_never_changes_another(impl):
    model = model_with("llama", impl)
    seqs = pack_sequences(documents())
    base = per_document(packed_logits(model, seqs)[0], seqs)
    for j in (0, 1, 4, 8):      # the first and middle of a row, the last of another, a row's only document
        changed = seqs.input_ids.copy()
        start, end = int(seqs.documents[j]), int(seqs.documents[j + 1])
        changed[start:end] = (changed[start:end] + 7) % (VOCAB - 1) + 1
        other = per_document(packed_logits(model, Sequences(changed, *_rest(seqs)))[0], seqs)
        for i, (a, b) in enumerate(zip(base, other)):
            if i == j:
                assert not torch.equal(a, b)
            else:
                assert torch.equal(a, b), f"document {i} changed when document {j} did"


def _rest(seqs: Sequences) -> tuple:
    return (seqs.offsets, seqs.loss_mask, seqs.limit, seqs.fingerprint, seqs.source, seqs.tokenizer_fingerprint,
            seqs.chat, seqs.counts, seqs.path, seqs.documents, seqs.packing)


def reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each segment of `cu_seq_lens_q` over one flattened row, in plain torch:
    what flash_attn_varlen_func computes, given the kwargs transformers' flash path receives."""
    assert attention_mask is None and query.shape[0] == 1
    cu = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["cu_seq_lens_k"].tolist() == cu and kwargs["max_length_q"] == max(np.diff(cu))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling)
        for s, e in zip(cu[:-1], cu[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def test_the_flattened_varlen_path_equals_documents_alone(monkeypatch):
    from transformers import AttentionInterface

    AttentionInterface.register("varlen_reference", reference_varlen_attention)
    monkeypatch.setattr(attention, "VARLEN", attention.VARLEN + ("varlen_reference",))
    monkeypatch.setattr(attention, "COVERED", attention.COVERED + ("varlen_reference",))
    model = model_with("llama", "sdpa")
    seqs = pack_sequences(documents())
    want = per_document(packed_logits(model, seqs)[0], seqs)
    model.set_attn_implementation("varlen_reference")
    logits, batch = packed_logits(model, seqs)
    assert logits.shape[:2] == batch["input_ids"].shape
    assert max(float((a - b).abs().max()) for a, b in zip(per_document(logits, seqs), want)) <= TOL
    # and at the loss positions only (the body's hidden states flattened in the same order)
    index = batch["loss_mask"].reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        picked = LogitsAt(model)(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, index=index)
    assert float((picked - logits.reshape(-1, VOCAB)[index]).abs().max()) <= TOL


def test_an_implementation_that_cannot_keep_documents_apart_is_refused():
    model = model_with("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UserError, match="packed rows need one of the attention implementations eager, sdpa, "
                                        "flash_attention_2, flash_attention_3; the model uses flex_attention"):
        attention.check_packing_support(model, "--student")
    assert attention.block_causal_mask(torch.tensor([[0, 1, 0, 1]]), "sdpa", torch.float32)[0, 0].tolist() == [
        [True, False, False, False], [True, True, False, False], [False, False, True, False],
        [False, False, True, True]]
    eager = attention.block_causal_mask(torch.tensor([[0, 1, 0]]), "eager", torch.float32)[0, 0]
    assert eager[2, 0] == torch.finfo(torch.float32).min and eager[1, 0] == 0 and eager.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# the loop's token normalisation over packed rows


def test_a_step_on_packed_rows_is_a_step_on_the_same_documents_unpacked(monkeypatch, tmp_path):
    docs = documents(seed=5)
    packed = pack_sequences(docs)
    batch_packed = SequenceBatches(packed, 1).rows_batch(np.arange(packed.num_windows))
    batch_docs = SequenceBatches(docs, 1).rows_batch(np.arange(docs.num_windows))
    assert loss_tokens(batch_packed) == loss_tokens(batch_docs) == docs.loss_tokens
    assert batch_packed["labels"].numel() < batch_docs["labels"].numel()     # what packing saves

    def student():
        model = build_tiny_model("llama", VOCAB, seed=3, context=64).double().train()
        model.set_attn_implementation("eager")
        return model

    def grads(batches, accum):
        return first_step_grads(monkeypatch, tmp_path / f"run{len(batches)}-{accum}-{batches[0]['labels'].shape[1]}",
                                student(), batches, make_ce_loss(VOCAB, 7), grad_accum=accum)

    whole, m_whole = grads([batch_docs], 1)
    # packed rows in two micro-batches of unequal loss tokens: normalised by the step's tokens
    halves = [{k: v[:2] for k, v in batch_packed.items()}, {k: v[2:] for k, v in batch_packed.items()}]
    assert loss_tokens(halves[0]) != loss_tokens(halves[1])
    split, m_split = grads(halves, 2)
    assert max_diff(whole, split) <= 1e-9
    assert m_split[0]["loss"] == pytest.approx(m_whole[0]["loss"], abs=1e-12)
    assert m_split[0]["loss_tokens_per_step"] == m_whole[0]["loss_tokens_per_step"] == docs.loss_tokens
