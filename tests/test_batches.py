"""Tests of minisdpo.batches: the plain layout (group-major, labels shifted, -100 on prompt and
padding, prompts cut on the left), the typed batches and their ``to``, and ``build_batch``. The
packed layout against the plain one is tests/test_packing.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minisdpo.batches import (LAYOUTS, PackedBatch, PlainBatch, build_batch, collate, packed_batch, sdpo_batch,
                              sft_batch)
from minisdpo.data import Row, encode_prompt, encode_response, truncate_prompt

from conftest import TOK, make_row


def check_shifted_labels(batch, pad_id):
    ids, labels, mask = batch.input_ids, batch.labels, batch.attention_mask
    assert ids.dtype == labels.dtype == mask.dtype == torch.long and ids.shape == labels.shape == mask.shape
    counted = labels != -100
    # labels[s, t] is the next input token wherever it counts; never on the last column.
    assert not counted[:, -1].any()
    assert torch.equal(labels[:, :-1][counted[:, :-1]], ids[:, 1:][counted[:, :-1]])
    # right padding: the mask is a prefix of ones; padded positions hold pad_id and no label
    lengths = mask.sum(1)
    assert torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).long())
    assert (ids[mask == 0] == pad_id).all() and not counted[mask == 0].any()
    assert isinstance(batch, PlainBatch) and batch.num_tokens == int(lengths.sum())
    return counted


def test_sft_batch_layout():
    rows = [make_row(target_at=1), make_row(target_at=12, history=("Solo", "Duo", "Trio", "Quartet"))]
    batch = sft_batch(TOK, rows, max_len=512, domain="movies")
    counted = check_shifted_labels(batch, TOK.pad_id)
    for s, row in enumerate(rows):
        prompt = encode_prompt(TOK, row, "movies")
        response = encode_response(TOK, row.target)
        n_p = len(prompt)
        assert batch.input_ids[s, :n_p].tolist() == prompt
        # the first counted label sits on the prompt's last token and predicts the title's first
        assert counted[s].nonzero().flatten().tolist() == list(range(n_p - 1, n_p - 1 + len(response)))
        assert batch.labels[s][counted[s]].tolist() == response


def test_sdpo_batch_group_major():
    rows = [make_row(target_at=0), make_row(target_at=5)]
    negatives = [["Item 3", "Item 17", "Item 10"], ["Item 1", "Item 0", "Item 19"]]
    batch = sdpo_batch(TOK, rows, negatives, max_len=512, domain="music")
    K = 3
    assert batch.input_ids.shape[0] == len(rows) * (1 + K)
    counted = check_shifted_labels(batch, TOK.pad_id)
    for g, row in enumerate(rows):
        prompt = encode_prompt(TOK, row, "music")
        expected = [row.target, *negatives[g]]
        for j in range(1 + K):
            s = g * (1 + K) + j
            assert batch.input_ids[s, :len(prompt)].tolist() == prompt
            assert TOK.decode(batch.labels[s][counted[s]].tolist()) == expected[j]
            assert batch.labels[s][counted[s]][-1] == TOK.eos_id


def test_sdpo_batch_bad_negatives():
    rows = [make_row(target_at=0)]
    with pytest.raises(ValueError, match="non-target"):
        sdpo_batch(TOK, rows, [["Item 0", "Item 1"]], 512, domain="movies")
    with pytest.raises(ValueError, match="non-target"):
        sdpo_batch(TOK, rows, [["Item 1", "Item 1"]], 512, domain="movies")
    with pytest.raises(ValueError, match="non-target"):
        sdpo_batch(TOK, rows, [["Elsewhere"]], 512, domain="movies")
    with pytest.raises(ValueError, match="lists for"):
        sdpo_batch(TOK, rows, [], 512, domain="movies")
    with pytest.raises(ValueError, match="same K"):
        sdpo_batch(TOK, rows * 2, [["Item 1"], ["Item 1", "Item 2"]], 512, domain="movies")


def test_truncation_cuts_prompt_left_keeps_bos_and_response():
    row = make_row(history=tuple(f"Old title number {i}" for i in range(10)))
    row = Row(row.history, row.candidates[:-1] + ("A much longer rejected title",), row.target)
    rows, negatives = [row], [["Item 1", "A much longer rejected title"]]
    full = sdpo_batch(TOK, rows, negatives, max_len=10_000, domain="books")
    cut = sdpo_batch(TOK, rows, negatives, max_len=200, domain="books")
    assert full.attention_mask.sum(1).max() > 200 and cut.attention_mask.sum(1).max() <= 200
    prompt = encode_prompt(TOK, row, "books")
    longest = max(len(encode_response(TOK, t)) for t in [row.target, *negatives[0]])
    kept = 200 - longest
    for s in range(3):
        ids = cut.input_ids[s].tolist()
        assert ids[0] == TOK.bos_id and ids[1:kept] == prompt[-(kept - 1):]    # same prompt in the group
    full_counted = full.labels != -100
    cut_counted = cut.labels != -100
    for s in range(3):   # responses whole
        assert full.labels[s][full_counted[s]].tolist() == cut.labels[s][cut_counted[s]].tolist()
    with pytest.raises(ValueError, match="max_len"):
        sft_batch(TOK, rows, max_len=8, domain="books")
    assert truncate_prompt([1, 5, 6, 7, 8], response_len=2, max_len=5) == [1, 7, 8]
    assert truncate_prompt([1, 5, 6], response_len=2, max_len=5) == [1, 5, 6]


def test_collate_pad_and_empty():
    batch = collate([([1, 5], [6, 2]), ([1], [7, 8, 2])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 2], [1, 7, 8, 2]]
    assert batch.labels.tolist() == [[-100, 6, 2, -100], [7, 8, 2, -100]]
    batch = collate([([1, 5], [2]), ([1, 4, 4], [6, 2])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 2, 0, 0], [1, 4, 4, 6, 2]]
    assert batch.labels.tolist() == [[-100, 2, -100, -100, -100], [-100, -100, 6, 2, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="pairs"):
        collate([], 0)


# ------------------------------------------------------------------------------------ typed batches

def test_to_keeps_every_field():
    rows = [make_row(target_at=0), make_row(target_at=5, history=("Solo",))]
    negatives = [["Item 3", "Item 17"], ["Item 1", "Item 0"]]
    plain = sdpo_batch(TOK, rows, negatives, 512, domain="music")
    packed = packed_batch(TOK, rows, [[r.target, *n] for r, n in zip(rows, negatives)], 512, domain="music")
    assert [f.name for f in dataclasses.fields(PlainBatch)] == ["input_ids", "attention_mask", "labels", "num_tokens"]
    assert [f.name for f in dataclasses.fields(PackedBatch)] == ["input_ids", "position_ids", "mask", "index",
                                                                 "labels", "num_tokens", "out_pos",
                                                                 "out_index", "boundary", "boundary_layer"]
    # A batch of the frozen-prefix cache carries the boundary states too.
    G, L = packed.input_ids.shape
    packed = dataclasses.replace(packed, boundary=torch.randn(G, L, 8), boundary_layer=1)
    for batch in (plain, packed):
        moved = batch.to("meta")
        assert type(moved) is type(batch) and moved is not batch
        for f in dataclasses.fields(batch):
            old, new = getattr(batch, f.name), getattr(moved, f.name)
            if f.name in ("num_tokens", "boundary_layer"):
                assert type(old) is int and new == old
            else:
                assert new.device.type == "meta" and old.device.type == "cpu"
                assert new.shape == old.shape and new.dtype == old.dtype
        same = batch.to("cpu")
        for f in dataclasses.fields(batch):
            old, new = getattr(batch, f.name), getattr(same, f.name)
            assert torch.equal(new, old) if isinstance(old, torch.Tensor) else new == old
        with pytest.raises(dataclasses.FrozenInstanceError):
            batch.labels = batch.labels


def test_build_batch_layouts():
    rows = [make_row(target_at=0), make_row(target_at=5)]
    negatives = [["Item 3", "Item 17"], ["Item 1", "Item 0"]]
    assert LAYOUTS == ("shared", "none")
    for negs, per_row in ((negatives, 3), (None, 1)):
        shared = build_batch(TOK, rows, negs, 512, domain="music")                   # the default
        none = build_batch(TOK, rows, negs, 512, domain="music", packing="none")
        assert isinstance(shared, PackedBatch) and isinstance(none, PlainBatch)
        assert none.num_tokens == int(none.attention_mask.sum()) and shared.num_tokens < none.num_tokens
        assert shared.labels.shape[0] == none.labels.shape[0] == len(rows) * per_row
    with pytest.raises(ValueError, match="packing"):
        build_batch(TOK, rows, None, 512, domain="music", packing="packed")
