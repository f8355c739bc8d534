"""Batch layouts: rows and their responses as tensors, ready for the model.

Two layouts of the same responses, each a small typed batch whose fields are tensors plus
``num_tokens``, the real (unpadded) tokens that go through the model (for tokens/s):

* ``PlainBatch`` (``collate``, ``sft_batch``, ``sdpo_batch``; ``build_batch(..., packing="none")``):
  one full prompt + response sequence per response, as the public S-DPO code and TRL's DPO
  build them, logits at every position.
* ``PackedBatch`` (``packed_batch``; ``build_batch(..., packing="shared")``, the default): one
  sequence per prompt holding all its responses, the prompt run once.

``LAYOUTS`` names them as ``--packing`` does. A batch is built on the CPU; ``batch.to(device)``
returns a copy on another device. ``minisdpo.step`` turns either layout into the loss and tells
them apart by their type. Rows, prompts and tokens come from ``minisdpo.data``.

Batches are right-padded with the tokenizer's pad id (its EOS id when it has none) and come
with **labels already shifted**: ``labels[s, t]`` is the token that ``logits[s, t]`` predicts,
i.e. ``input_ids[s, t + 1]`` where that token belongs to the response, and -100 elsewhere (the
prompt, the padding, the last column). So training does ``logits = model(input_ids,
attention_mask=...)`` and hands ``labels`` straight to ``minisdpo.loss`` / ``minisdpo.ops`` or
to ``F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)``.

The **packed layout** (``packed_batch``) computes the same log-probs with no repeated work: the
1+K sequences of a group share their prompt, so the group becomes one sequence
``[prompt, r_0, r_1, ..., r_n]`` in which the prompt is run once, each response attends to the
whole prompt and causally to itself (never to another response), and continues the prompt's
RoPE positions as if it followed the prompt alone. A response's last token (EOS) predicts
nothing, so it is not fed in. Only the hidden states that predict response tokens are gathered
(``minisdpo.step.response_hidden``) and sent through the LM head, instead of the whole (B, T, V)
logits::

    h = response_hidden(model, batch)             # (S, R, dim): response positions only
    logits = model.lm_head(h)                      # (S, R, V)
    loss, logps = sdpo_loss(logits, batch.labels, ref_logps, beta, K)

For a prompt of P tokens and titles of t, a group costs P + (1 + K) t transformer tokens instead
of (1 + K)(P + t), and (1 + K) t LM-head rows instead of (1 + K)(P + t): with P much longer than
t, about 1 + K times fewer tokens and far fewer LM-head rows than the concatenated layout. The idea is the "shared prefix"
packing of multi-response preference training (the prefix sharing of Wang & Hegde, 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from minisdpo.data import Row, TokenizerLike, encode_group, padding_id

__all__ = ["IGNORE_INDEX", "LAYOUTS", "PlainBatch", "PackedBatch", "collate", "sft_batch", "sdpo_responses",
           "sdpo_batch", "packed_batch", "pack_groups", "group_responses", "build_batch"]

IGNORE_INDEX = -100
LAYOUTS = ("shared", "none")


def _to(batch: Any, device: torch.device | str) -> Any:
    moved = {f.name: getattr(batch, f.name).to(device) for f in fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return replace(batch, **moved)


@dataclass(frozen=True, eq=False)
class PlainBatch:
    """One right-padded prompt + response sequence per response (``collate``); B sequences of at
    most T tokens, group-major for S-DPO."""

    input_ids: torch.Tensor        # (B, T) long: prompt + response, then the pad id
    attention_mask: torch.Tensor   # (B, T) long: 1 on real tokens
    labels: torch.Tensor           # (B, T) long: shifted, -100 where a token does not count
    num_tokens: int                # real (unpadded) tokens: attention_mask.sum()

    def to(self, device: torch.device | str) -> PlainBatch:
        """A new batch with every tensor on ``device``."""
        return _to(self, device)


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """One packed sequence per prompt, ``[prompt, r_0, r_1, ...]`` (``packed_batch`` documents
    the tensors); G sequences of L positions, S responses of at most R tokens."""

    input_ids: torch.Tensor        # (G, L) long
    position_ids: torch.Tensor     # (G, L) long
    mask: torch.Tensor             # (G, L, L) bool, True = may attend
    index: torch.Tensor            # (S, R) long: flat positions that predict each response token
    labels: torch.Tensor           # (S, R) long: the response tokens, -100 on padding
    num_tokens: int                # real (unpadded) positions of input_ids
    out_pos: torch.Tensor          # (G, Q) long: the positions whose final hidden state a label reads
    out_index: torch.Tensor        # (S, R) long: index, as flat positions in the (G * Q) out_pos
    # From the frozen-prefix cache (minisdpo.prefix.PrefixCache.batch): the residual stream
    # entering layer boundary_layer at every position, (G, L, dim); None: run the whole model.
    boundary: torch.Tensor | None = None
    boundary_layer: int = 0

    def to(self, device: torch.device | str) -> PackedBatch:
        """A new batch with every tensor on ``device``."""
        return _to(self, device)


# --------------------------------------------------------------------------------------------
# The plain layout: one sequence per response

def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> PlainBatch:
    """A right-padded ``PlainBatch`` from (prompt ids, response ids) pairs, labels shifted.

    input_ids (B, T) long: prompt + response, then pad_id; attention_mask (B, T) long: 1 on
    real tokens; labels (B, T) long: labels[s, t] = input_ids[s, t + 1] where that token is
    part of the response, else -100. T is the longest sequence of the batch.
    """
    if not pairs:
        raise ValueError("pairs is empty")
    lengths = [len(p) + len(r) for p, r in pairs]
    B, T = len(pairs), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for s, (prompt, response) in enumerate(pairs):
        if not prompt or not response:
            raise ValueError(f"pair {s}: the prompt and the response must both be non-empty")
        n_p, n = len(prompt), lengths[s]
        input_ids[s, :n] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[s, :n] = 1
        # logits at position t predict token t+1: the response tokens sit at n_p .. n-1,
        # so they are predicted from positions n_p-1 .. n-2.
        labels[s, n_p - 1:n - 1] = torch.tensor(list(response), dtype=torch.long)
    return PlainBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      num_tokens=sum(lengths))


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")


def sft_batch(tok: TokenizerLike, rows: Sequence[Row], max_len: int, *, domain: str) -> PlainBatch:
    """SFT batch: prompt + target response per row; loss only on the response (title + EOS)."""
    _check_max_len(max_len)
    pairs = []
    for row in rows:
        prompt, (response,) = encode_group(tok, row, [row.target], max_len, domain)
        pairs.append((prompt, response))
    return collate(pairs, padding_id(tok))


def sdpo_responses(rows: Sequence[Row], negatives: Sequence[Sequence[str]]) -> list[list[str]]:
    """The responses of each S-DPO group, chosen first: [[target, *negatives], ...].

    Checks that every row has the same K >= 1 distinct non-target candidates as negatives.
    """
    if len(negatives) != len(rows):
        raise ValueError(f"negatives has {len(negatives)} lists for {len(rows)} rows")
    k = len(negatives[0]) if negatives else 0
    for g, (row, negs) in enumerate(zip(rows, negatives)):
        if len(negs) != k or k < 1:
            raise ValueError(f"negatives[{g}] has {len(negs)} titles; every row needs the same K >= 1 "
                             f"(negatives[0] has {k})")
        if len(set(negs)) != k or row.target in negs or not set(negs) <= set(row.candidates):
            raise ValueError(f"negatives[{g}] must be {k} distinct non-target candidates of rows[{g}], "
                             f"got {list(negs)}")
    return [[row.target, *negs] for row, negs in zip(rows, negatives)]


def sdpo_batch(tok: TokenizerLike, rows: Sequence[Row], negatives: Sequence[Sequence[str]], max_len: int,
               *, domain: str) -> PlainBatch:
    """S-DPO batch, group-major: B = G * (1 + K); row g*(1+K) is prompt + chosen (the target),
    rows g*(1+K)+1 .. g*(1+K)+K are the prompt + each of the K rejected titles."""
    _check_max_len(max_len)
    pairs = []
    for row, responses in zip(rows, sdpo_responses(rows, negatives)):
        prompt, response_ids = encode_group(tok, row, responses, max_len, domain)
        pairs.extend((prompt, r) for r in response_ids)
    return collate(pairs, padding_id(tok))


# --------------------------------------------------------------------------------------------
# The packed layout: one sequence per group, the prompt run once

def packed_batch(tok: TokenizerLike, rows: Sequence[Row], responses: Sequence[Sequence[str]], max_len: int,
                 *, domain: str) -> PackedBatch:
    """One packed sequence per row: ``[prompt, r_0, r_1, ...]``, right-padded (see the module
    docstring). ``responses[g]`` are the titles of row g: [target, *negatives] for S-DPO
    (``sdpo_responses``), [target] for SFT, the candidates for ranking. Prompts are cut as in
    ``encode_group`` (on the left, BOS kept, for the longest candidate of the row), so every
    response gets exactly the context it has in ``sdpo_batch`` / ``sft_batch``.

    Returns a ``PackedBatch``, with G rows, L the longest packed sequence, S = total responses (group-major, in
    the order given) and R the longest response (title + EOS):

    * ``input_ids`` (G, L) long: the prompt, then each response without its last token (EOS
      predicts nothing), then the pad id;
    * ``position_ids`` (G, L) long: the prompt at 0..P-1, every response again from P on;
    * ``mask`` (G, L, L) bool, True = may attend: causal in the prompt; a response sees the whole
      prompt and its own earlier tokens; a padding position sees itself only. Pass it as
      ``model(input_ids, position_ids=..., mask=...)`` with no attention_mask;
    * ``index`` (S, R) long: flat positions in the (G * L) hidden states that predict each
      response token: token 0 of every response from the prompt's last position, token j >= 1
      from the response's own position j - 1; 0 (any valid position) on padding;
    * ``labels`` (S, R) long: the response tokens, -100 on padding;
    * ``num_tokens`` int: the real (unpadded) positions of ``input_ids``, for tokens/s;
    * ``out_pos`` (G, Q) long: the positions that ``index`` reads, the prompt's last and every
      response position (a row's tail from P - 1 on), right-padded by repeating its last one.
      The model's last layer computes only these queries (``Llama.forward``'s ``outputs``);
    * ``out_index`` (S, R) long: ``index`` as flat positions in the (G * Q) states of ``out_pos``.
    """
    _check_max_len(max_len)
    if len(responses) != len(rows):
        raise ValueError(f"responses has {len(responses)} lists for {len(rows)} rows")
    if not rows:
        raise ValueError("rows is empty")
    groups = []
    for g, (row, titles) in enumerate(zip(rows, responses)):
        if isinstance(titles, str) or not titles:
            raise ValueError(f"responses[{g}] must be a non-empty list of titles, got {titles!r}")
        groups.append(encode_group(tok, row, titles, max_len, domain))
    return pack_groups(groups, padding_id(tok))


def pack_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> PackedBatch:
    """``packed_batch`` from token ids: ``groups`` holds (prompt ids, [response ids, ...]) per
    row, each response ending in its EOS (``minisdpo.data.encode_group``'s pieces)."""
    lengths = [len(p) + sum(len(r) - 1 for r in rs) for p, rs in groups]
    G, L = len(groups), max(lengths)
    S, R = sum(len(rs) for _, rs in groups), max(len(r) for _, rs in groups for r in rs)
    input_ids = torch.full((G, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((G, L), dtype=torch.long)
    # segment: 0 on the prompt, 1 + i on response i, -1 on padding
    segment = torch.full((G, L), -1, dtype=torch.long)
    index = torch.zeros((S, R), dtype=torch.long)
    labels = torch.full((S, R), IGNORE_INDEX, dtype=torch.long)
    # The positions a label reads: each row's tail from the prompt's last position on.
    Q = max(n - len(p) + 1 for n, (p, _) in zip(lengths, groups))
    out_pos = torch.zeros((G, Q), dtype=torch.long)
    out_index = torch.zeros((S, R), dtype=torch.long)
    s = 0
    for g, (prompt, response_ids) in enumerate(groups):
        P = len(prompt)
        out_pos[g] = torch.arange(P - 1, P - 1 + Q).clamp(max=lengths[g] - 1)
        ids, pos, seg = list(prompt), list(range(P)), [0] * P
        for i, r in enumerate(response_ids):
            start, n = len(ids), len(r) - 1                   # r[:-1] is fed in, r is predicted
            ids += r[:-1]
            pos += range(P, P + n)
            seg += [1 + i] * n
            # token 0 from the prompt's last position, token j from the response's position j-1
            index[s, :len(r)] = g * L + torch.tensor([P - 1, *range(start, start + n)])
            out_index[s, :len(r)] = g * Q + torch.tensor([0, *range(start - P + 1, start - P + 1 + n)])
            labels[s, :len(r)] = torch.tensor(r)
            s += 1
        input_ids[g, :len(ids)] = torch.tensor(ids)
        position_ids[g, :len(ids)] = torch.tensor(pos)
        segment[g, :len(ids)] = torch.tensor(seg)

    q_seg, k_seg = segment[:, :, None], segment[:, None, :]                 # (G, L, 1), (G, 1, L)
    q_pos, k_pos = torch.arange(L)[:, None], torch.arange(L)[None, :]        # (L, 1), (1, L)
    sees = (q_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg)) & (k_pos <= q_pos)   # (G, L, L)
    mask = sees | (k_pos == q_pos)                                           # (G, L, L)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, mask=mask, index=index,
                       labels=labels, num_tokens=sum(lengths), out_pos=out_pos, out_index=out_index)


# --------------------------------------------------------------------------------------------
# Either layout by name

def group_responses(rows: Sequence[Row], negatives: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """The responses of each row: [target, *negatives] for S-DPO (checked: ``sdpo_responses``),
    [target] for SFT (None)."""
    if negatives is None:
        return [[r.target] for r in rows]
    return sdpo_responses(rows, negatives)


def build_batch(tok: Any, rows: Sequence[Row], negatives: Sequence[Sequence[str]] | None, max_len: int,
                *, domain: str, packing: str = "shared") -> PlainBatch | PackedBatch:
    """An SFT batch (``negatives`` None) or an S-DPO batch (K negatives per row) in a layout:
    ``packing`` "shared" gives a ``PackedBatch``, "none" a ``PlainBatch``."""
    if packing not in LAYOUTS:
        raise ValueError(f"packing must be one of {LAYOUTS}, got {packing!r}")
    if packing == "shared":
        return packed_batch(tok, rows, group_responses(rows, negatives), max_len, domain=domain)
    return (sdpo_batch(tok, rows, negatives, max_len, domain=domain) if negatives is not None
            else sft_batch(tok, rows, max_len, domain=domain))
