"""Collaborative item tokens: the language model reads what SASRec knows (LLaRA's hybrid prompt).

LLaRA (Liao et al., "LLaRA: Large Language-Recommendation Assistant", SIGIR 2024) follows every
title in the prompt with one extra token whose input is a projection of the item's embedding
from a trained, frozen SASRec. Here (docs/design.md section 8):

* ``ItemTokenizer`` wraps the run's tokenizer: ``minisdpo.data.encode_prompt`` then puts the
  item token of each history and candidate title before it (``before``) or after it (LLaRA's
  place). Item token ids continue the language model's vocabulary: ``vocab_size + j`` is
  SASRec's item ``j`` in the history, ``vocab_size + N + j`` as a candidate (an item SASRec never
  saw is its unknown id). The response stays the title + EOS.
* ``attach`` gives the model an ``minisdpo.model.ItemTokens``: SASRec's item embeddings as the
  frozen feature table, a trainable projector into the model's hidden size, and the layer where
  the projection enters the residual stream (0: at the input embeddings, as LLaRA; the
  frozen-prefix cache's boundary: the frozen layers see only the placeholder token, so the
  cache keeps its value while the projector trains).
* ``save_projector`` / ``load_projector``: the projector in a safetensors file of its own,
  beside the stage's adapter (PEFT loads the adapter, not this file).

The SASRec itself is the run's baseline (``minisdpo.baselines``), trained once and kept in the
run directory (``SASRecRecommender.save``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minisdpo.baselines import UNKNOWN, SASRecRecommender
from minisdpo.model import ItemTokens, Llama

__all__ = ["ITEM_TOKENS", "PROJECTOR_FILE", "PLACEHOLDER", "ItemTokenizer", "placeholder_id", "attach",
           "save_projector", "projector_layout", "load_projector"]

# "sasrec": SASRec's item embeddings; "sasrec-user": a candidate's token carries the user's SASRec
# representation of the history too (minisdpo.model.ItemTokens' user encoder).
ITEM_TOKENS = ("none", "sasrec", "sasrec-user")
PROJECTOR_FILE = "item_projector.safetensors"
# The text whose (last) token the layers below the projection read at an item token's place.
PLACEHOLDER = " item"


class ItemTokenizer:
    """``tok`` with an item token after each title of a prompt (``minisdpo.data.encode_prompt``
    calls ``item_token``); everything else is ``tok``'s. The ids: ``offset`` (the model's
    vocabulary size) + the title's SASRec id in the history, + ``n_items`` more as a candidate."""

    def __init__(self, tok: Any, vocab: dict[str, int], offset: int, n_items: int, before: bool = False):
        self.tok, self.vocab, self.offset, self.n_items = tok, vocab, offset, n_items
        self.items_before = before          # the item token precedes its title (else follows it)

    @classmethod
    def of(cls, tok: Any, rec: SASRecRecommender, vocab_size: int, before: bool = False) -> ItemTokenizer:
        """``tok`` with the item tokens of ``rec``'s items, after a vocabulary of ``vocab_size``."""
        return cls(tok, rec.vocab, vocab_size, rec.model.items.num_embeddings, before)

    def item_token(self, title: str, candidate: bool = False) -> int:
        """The id of ``title``'s item token (its SASRec id, the unknown id if none)."""
        return self.offset + self.n_items * candidate + self.vocab.get(title, UNKNOWN)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


def placeholder_id(tok: Any) -> int:
    """The ordinary token that item tokens read as below the projection's layer."""
    ids = tok.encode(PLACEHOLDER)
    if not ids:
        raise ValueError(f"the tokenizer encodes {PLACEHOLDER!r} to no token")
    return ids[-1]


def attach(model: Llama, rec: SASRecRecommender, layer: int, placeholder: int, user: bool = False,
           before: bool = False, seed: int = 0) -> ItemTokens:
    """Give ``model`` item tokens for ``rec``'s items (a fresh projector, seeded) entering at
    ``layer``; returns them (``model.items``). The features are SASRec's item embeddings at the
    scale of its own input (times sqrt(dim)), frozen; ``user``: a frozen copy of the SASRec
    encodes each row's history for its candidates' tokens too; ``before``: the item tokens
    precede their titles, and the projection enters at the title's first token too."""
    if not 0 <= layer < model.args.n_layers:
        raise ValueError(f"layer must be in [0, {model.args.n_layers}), got {layer}")
    weight = rec.model.items.weight.detach()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    encoder = copy.deepcopy(rec.model) if user else None
    model.items = ItemTokens(weight * math.sqrt(weight.shape[1]), model.args.dim, layer, placeholder,
                             user=encoder, history_len=rec.model.max_len, spread=before).to(device)
    return model.items


def save_projector(model: Llama, path: str | Path) -> None:
    """The projector of ``model.items`` as safetensors, with its layer and placeholder."""
    items = model.items
    state = {k: v.detach().contiguous().cpu() for k, v in items.proj.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=_layout(items))
    tmp.replace(path)


def _layout(items: ItemTokens) -> dict[str, str]:
    return {"layer": str(items.layer), "placeholder_id": str(items.placeholder_id),
            "items": str(items.features.shape[0]), "user": str(int(items.user is not None)),
            "before": str(int(items.spread))}


def projector_layout(path: str | Path) -> tuple[int, int, bool, bool]:
    """(layer, placeholder id, user, before) of a projector written by ``save_projector``: how to
    ``attach`` the item tokens it belongs to. A missing file raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no item-token projector {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        return int(meta["layer"]), int(meta["placeholder_id"]), meta.get("user") == "1", meta.get("before") == "1"
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not an item-token projector of minisdpo (no layer and placeholder_id)") from None


def load_projector(model: Llama, path: str | Path) -> None:
    """Load a projector written by ``save_projector`` into ``model.items`` (attached for the same
    SASRec, layer and placeholder); a missing or mismatching file raises FileNotFoundError or
    ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no item-token projector {path}")
    items = model.items
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    want = _layout(items)
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise ValueError(f"{path} was written for other item tokens: "
                         + ", ".join(f"{k} {a} (here {b})" for k, (a, b) in diff.items()))
    state = load_file(str(path))
    items.proj.load_state_dict({k: v.to(items.features.device) for k, v in state.items()})
