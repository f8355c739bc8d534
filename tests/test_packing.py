"""Tests of the packed layout (minisdpo.batches.packed_batch, minisdpo.step.response_hidden):
the prompt is run once per group, the responses attend to it and to themselves, and the LM head
runs on response positions only. Oracle: the concatenated layout (sdpo_batch / sft_batch, a full forward pass
and minisdpo.loss), which must give the same log-probs, loss and gradients on a tiny random
float32 Llama (GQA) up to float32 rounding."""
from __future__ import annotations

import pytest
import torch

from minisdpo import data as D
from minisdpo.batches import PackedBatch, PlainBatch, collate, packed_batch, sdpo_batch, sdpo_responses, sft_batch
from minisdpo.data import Row, encode_group, encode_response
from minisdpo.loss import sdpo_loss, sequence_logps, token_logps
from minisdpo.model import Llama
from minisdpo.step import response_hidden

from conftest import TOK, ByteTokenizer, random_negatives, random_rows, tiny_llama

# float32: the packed and the concatenated passes sum the same terms in another order
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model() -> Llama:
    return tiny_llama()


def packed_logps(model: Llama, batch: PackedBatch) -> torch.Tensor:
    return sequence_logps(model.lm_head(response_hidden(model, batch)), batch.labels)        # (S,)


def concat_logps(model: Llama, batch: PlainBatch) -> torch.Tensor:
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)                  # (B, T, V)
    return sequence_logps(logits, batch.labels)                                           # (B,)


# ------------------------------------------------------------------------------------ layout

def expected_mask(segment: list[int], L: int) -> torch.Tensor:
    """The rule written out position by position (segment: 0 prompt, 1+i response i, -1 pad)."""
    mask = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if q == k:
                mask[q, k] = True
            elif segment[q] >= 0 and k < q and (segment[k] == 0 or segment[k] == segment[q]):
                mask[q, k] = True
    return mask


def test_layout_by_hand():
    rows = [Row(("Blur",), ("Air", "Muse", "Queen"), "Muse"), Row(("A longer history",), ("Air", "Muse"), "Air")]
    responses = [["Muse", "Air", "Queen"], ["Air"]]
    b = packed_batch(TOK, rows, responses, 512, domain="music")
    G, L = b.input_ids.shape
    S, R = b.index.shape
    pieces = [encode_group(TOK, r, t, 512, "music") for r, t in zip(rows, responses)]
    assert (G, S, R) == (2, 4, len("Queen") + 1)
    lengths = [len(p) + sum(len(x) - 1 for x in rs) for p, rs in pieces]
    assert L == max(lengths) and b.num_tokens == sum(lengths)
    s = 0
    for g, (prompt, rs) in enumerate(pieces):
        P = len(prompt)
        ids = list(prompt) + [t for r in rs for t in r[:-1]]              # EOS of each response not fed in
        assert b.input_ids[g, :len(ids)].tolist() == ids
        assert (b.input_ids[g, len(ids):] == TOK.pad_id).all()
        pos = list(range(P)) + [P + j for r in rs for j in range(len(r) - 1)]
        assert b.position_ids[g, :len(ids)].tolist() == pos
        segment = [0] * P + [1 + i for i, r in enumerate(rs) for _ in r[:-1]] + [-1] * (L - len(ids))
        assert torch.equal(b.mask[g], expected_mask(segment, L))
        for r in rs:
            n = len(r)
            assert b.labels[s, :n].tolist() == r and (b.labels[s, n:] == -100).all()
            # token 0 is predicted from the last prompt token, token j from the response's token j-1
            fed = b.input_ids.flatten()[b.index[s, :n]].tolist()
            assert fed == [prompt[-1]] + r[:-1]
            assert (b.index[s, :n] // L == g).all()
            assert b.position_ids.flatten()[b.index[s, :n]].tolist() == list(range(P - 1, P - 1 + n))
            assert (b.index[s, n:] == 0).all()
            s += 1
    # out_pos holds each row's tail from P - 1 on (padded with its last position), and out_index
    # reads through it exactly the positions that index names.
    Q = b.out_pos.shape[1]
    assert Q == max(n - len(p) + 1 for n, (p, _) in zip(lengths, pieces))
    for g, (prompt, _) in enumerate(pieces):
        tail = list(range(len(prompt) - 1, lengths[g]))
        assert b.out_pos[g].tolist() == tail + [lengths[g] - 1] * (Q - len(tail))
    flat_pos = (torch.arange(G)[:, None] * L + b.out_pos).flatten()
    real = b.labels != -100
    assert torch.equal(flat_pos[b.out_index][real], b.index[real])


def test_sdpo_responses_chosen_first_and_checked():
    rows = random_rows(3, seed=1)
    negs = random_negatives(rows, 2, seed=1)
    assert sdpo_responses(rows, negs) == [[r.target, *n] for r, n in zip(rows, negs)]
    with pytest.raises(ValueError, match="negatives"):
        sdpo_responses(rows, negs[:2])
    with pytest.raises(ValueError, match=r"negatives\[1\]"):
        sdpo_responses(rows, [negs[0], [rows[1].target, negs[1][0]], negs[2]])


def test_packed_batch_bad_input():
    rows = random_rows(2, seed=2)
    with pytest.raises(ValueError, match="responses"):
        packed_batch(TOK, rows, [[rows[0].target]], 512, domain="music")
    with pytest.raises(ValueError, match=r"responses\[1\]"):
        packed_batch(TOK, rows, [[rows[0].target], []], 512, domain="music")
    with pytest.raises(ValueError, match=r"responses\[0\]"):
        packed_batch(TOK, rows, [rows[0].target, [rows[1].target]], 512, domain="music")
    with pytest.raises(ValueError, match="rows"):
        packed_batch(TOK, [], [], 512, domain="music")
    with pytest.raises(ValueError, match="max_len"):
        packed_batch(TOK, rows, [[r.target] for r in rows], 1, domain="music")
    with pytest.raises(ValueError, match="domain"):
        packed_batch(TOK, rows, [[r.target] for r in rows], 512, domain="films")
    with pytest.raises(TypeError, match="packed_batch"):
        response_hidden(tiny_llama(), sft_batch(TOK, rows, 512, domain="music"))
    batch = packed_batch(TOK, rows, [[r.target] for r in rows], 512, domain="music")
    with pytest.raises(RuntimeError, match="hidden states of shape"):
        response_hidden(lambda ids, **kw: torch.zeros(ids.shape[0], ids.shape[1] + 1, 8), batch)


# ------------------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("k", [1, 3, 7])
def test_sdpo_logps_loss_and_grads_match_concatenated(k):
    rows = random_rows(3, seed=10 + k)
    negs = random_negatives(rows, k, seed=k)
    packed = packed_batch(TOK, rows, sdpo_responses(rows, negs), 512, domain="music")
    concat = sdpo_batch(TOK, rows, negs, 512, domain="music")
    # the groups' prompts differ in length, so some packed rows are padded
    n_real = (packed.mask.sum(-1) > 1).sum(1) + 1                      # padding (and BOS) see only themselves
    assert len(set(n_real.tolist())) > 1 and int(n_real.sum()) == packed.num_tokens
    assert packed.labels.shape[0] == concat.labels.shape[0] == 3 * (1 + k)

    ref_logps = -40.0 + torch.linspace(-3, 3, 3 * (1 + k))              # any fixed reference
    results = []
    for batch in (packed, concat):
        model = tiny_llama(seed=3)
        if batch is packed:
            logits = model.lm_head(response_hidden(model, batch))                       # (S, R, V)
        else:
            logits = model(batch.input_ids, attention_mask=batch.attention_mask)        # (S, T, V)
        loss, logps = sdpo_loss(logits, batch.labels, ref_logps, beta=0.7, num_negatives=k)
        loss.backward()
        results.append((logps.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}))

    (lp_p, loss_p, g_p), (lp_c, loss_c, g_c) = results
    torch.testing.assert_close(lp_p, lp_c, **TOL)
    torch.testing.assert_close(loss_p, loss_c, **TOL)
    assert g_p.keys() == g_c.keys()
    for name in g_c:
        scale = g_c[name].abs().max().clamp(min=1e-6)
        assert g_c[name].abs().max() > 0, name                          # every parameter gets a gradient
        torch.testing.assert_close(g_p[name] / scale, g_c[name] / scale, **TOL, msg=lambda m: f"{name}: {m}")


def test_sft_token_logps_match_concatenated(model):
    rows = random_rows(4, seed=20)
    packed = packed_batch(TOK, rows, [[r.target] for r in rows], 512, domain="movies")
    concat = sft_batch(TOK, rows, 512, domain="movies")
    with torch.no_grad():
        tok_p = token_logps(model.lm_head(response_hidden(model, packed)), packed.labels)      # (S, R)
        tok_c = token_logps(model(concat.input_ids, attention_mask=concat.attention_mask),
                            concat.labels)                                                   # (S, T)
    # the counted tokens in order, per sequence
    for s in range(len(rows)):
        torch.testing.assert_close(tok_p[s][packed.labels[s] != -100], tok_c[s][concat.labels[s] != -100], **TOL)


def test_truncated_prompts_match_concatenated(model):
    rows = random_rows(3, seed=30)
    negs = random_negatives(rows, 3, seed=30)
    max_len = 60                                       # far below the ~300-byte prompts
    packed = packed_batch(TOK, rows, sdpo_responses(rows, negs), max_len, domain="music")
    concat = sdpo_batch(TOK, rows, negs, max_len, domain="music")
    # every virtual sequence (prompt + one response) fits max_len, and the prompt is cut so that
    # the row's longest candidate, in this group or not, would fill it (the same prompt in every
    # use of the row: data.encode_group)
    L = packed.input_ids.shape[1]
    for g, row in enumerate(rows):
        seq_ends = packed.position_ids[g].max() + 2         # last fed position + 1 + its EOS
        assert seq_ends <= max_len
        prompt_len = int(packed.index[4 * g, 0]) - g * L + 1
        assert prompt_len + max(len(encode_response(TOK, c)) for c in row.candidates) == max_len
        assert packed.input_ids[g, 0] == TOK.bos_id
    assert concat.attention_mask.sum(1).max() <= max_len
    with torch.no_grad():
        torch.testing.assert_close(packed_logps(model, packed), concat_logps(model, concat), **TOL)


def test_ranking_groups_of_different_sizes(model):
    # the layout allows any number of responses per group (here 10, 1 and 4), group-major
    rows = random_rows(3, seed=40)
    responses = [list(rows[0].candidates), [rows[1].target], list(rows[2].candidates[:4])]
    packed = packed_batch(TOK, rows, responses, 512, domain="books")
    pairs = [(p, r) for row, ts in zip(rows, responses) for p, rs in [encode_group(TOK, row, ts, 512, "books")]
             for r in rs]
    concat = collate(pairs, D.padding_id(TOK))
    assert packed.labels.shape[0] == 15
    with torch.no_grad():
        torch.testing.assert_close(packed_logps(model, packed), concat_logps(model, concat), **TOL)


class DropTildeTokenizer(ByteTokenizer):
    """ByteTokenizer that drops "~": the title "~" encodes to nothing, its response to just EOS."""

    def encode(self, text, bos=False, eos=False):
        return super().encode(text.replace("~", ""), bos, eos)


def test_one_token_response(model):
    tok = DropTildeTokenizer()
    row = Row(("Blur", "Air"), ("~", "Muse", "Queen of the Stone Age"), "~")
    assert encode_response(tok, "~") == [tok.eos_id]
    responses = [["~", "Muse", "Queen of the Stone Age"]]
    packed = packed_batch(tok, [row], responses, 512, domain="music")
    assert packed.labels[0].tolist()[:2] == [tok.eos_id, -100]
    concat = sdpo_batch(tok, [row], [["Muse", "Queen of the Stone Age"]], 512, domain="music")
    with torch.no_grad():
        torch.testing.assert_close(packed_logps(model, packed), concat_logps(model, concat), **TOL)


def test_packed_layout_feeds_fewer_tokens():
    rows = random_rows(8, seed=50, n_cands=20)
    negs = random_negatives(rows, 3, seed=50)
    packed = packed_batch(TOK, rows, sdpo_responses(rows, negs), 512, domain="music")
    concat = sdpo_batch(TOK, rows, negs, 512, domain="music")
    # each prompt once instead of 1+K times: close to 4x fewer real tokens for K = 3
    assert packed.num_tokens * 3 < int(concat.attention_mask.sum())
    assert packed.index.numel() * 10 < concat.input_ids.numel()
