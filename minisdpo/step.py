"""The loss of one SFT or S-DPO micro-batch: layout, frozen reference, LM head, loss.

``StageLoss`` fixes, once per stage, what every micro-batch of the stage shares: the model, the
loss backend, the batch layout, the LM head, K and beta. ``train.py``'s stages (through
``minisdpo.trainer``) and ``minisdpo.bench --step`` call it; ``response_hidden`` and
``response_logits``, the model's pass over a batch, also serve ``minisdpo.evaluate``. Two layouts
of the same batch (``minisdpo.batches``), told apart by their type:

* ``"none"`` (a ``PlainBatch``): one full prompt + response sequence per response, logits at
  every position, as the public S-DPO code and TRL's DPO do: the prompt runs 1 + K times
  through the model.
* ``"shared"`` (default, a ``PackedBatch``): one packed sequence per prompt,
  ``[prompt, r_0, ..., r_K]``, whose responses attend to the prompt and to themselves only (a
  block mask, per-segment positions), and the LM head on the response tokens only.

and two LM heads (``head=``):

* ``"logits"``: ``model.lm_head`` on the hidden states, then ``backend.sdpo_loss`` /
  ``backend.token_logps`` on the logits;
* ``"linear"`` (default for a packed batch when the backend is ``minisdpo.ops``):
  ``backend.sdpo_linear_loss`` / ``backend.linear_token_logps`` on the hidden states and
  ``model.lm_head.weight``, which form the logits one chunk of counted tokens at a time
  (csrc/linear.cpp): no (S, R, V) logits, in the policy's pass or the reference's.

All combinations give the same log-probs (tests/test_packing.py, tests/test_step.py); ``"none"``
with ``"logits"`` and ``minisdpo.loss`` (the PyTorch twin) is the tests' oracle. The S-DPO
reference (docs/method.md, section 2) is the same model inside ``minisdpo.lora.reference``: its
LoRA adapter disabled, or, when the stage trains the SFT adapter itself (``--sdpo-init
sft-adapter``), the frozen copy of that adapter in place of the trained one; run without
gradients on the same batch, or read from a ``RefCache``.

``backend`` is ``minisdpo.ops`` (the fused kernels) or ``minisdpo.loss`` (their PyTorch twin): both
are a ``minisdpo.loss.LossBackend``; only ``minisdpo.ops`` is a ``LinearLossBackend`` (the fused
linear head). "Reference" here always means the frozen reference model, never the PyTorch twin.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
from torch import nn

from minisdpo.batches import IGNORE_INDEX, LAYOUTS, PackedBatch, PlainBatch
from minisdpo.loss import LinearLossBackend, LossBackend
from minisdpo.lora import reference
from minisdpo.prefix import PrefixCache

__all__ = ["HEADS", "StageLoss", "RefCache", "response_hidden", "response_logits"]

HEADS = ("linear", "logits")


def _is_packed(batch: PlainBatch | PackedBatch) -> bool:
    """True for a PackedBatch, False for a PlainBatch; anything else is a TypeError."""
    if isinstance(batch, PackedBatch):
        return True
    if isinstance(batch, PlainBatch):
        return False
    raise TypeError(f"batch must be a minisdpo.batches.PlainBatch or PackedBatch (see build_batch), "
                    f"got {type(batch).__name__}")


def _plain_head(model: Any) -> bool:
    # The linear head needs logits = hidden @ lm_head.weight^T exactly: a plain bias-free Linear
    # (not one wrapped by LoRA).
    head = getattr(model, "lm_head", None)
    return type(head) is nn.Linear and head.bias is None


def response_hidden(model: Any, batch: PackedBatch) -> torch.Tensor:
    """The final hidden states that predict the response tokens of a ``packed_batch``, (S, R, dim).

    ``model`` is called as ``model(input_ids, position_ids=..., mask=..., return_hidden=True,
    outputs=batch.out_pos)`` (minisdpo.model.Llama's signature) and must return the (G, Q, dim)
    states of those positions. Apply ``model.lm_head`` to the result to get the logits that
    ``batch.labels`` scores: the LM head, like the last layer, runs on response rows only.
    """
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a minisdpo.batches.PackedBatch (from packed_batch), "
                        f"got {type(batch).__name__}")
    # A batch of the frozen-prefix cache (minisdpo.prefix) carries the residual stream entering
    # its boundary layer: the model runs from there.
    split = {} if batch.boundary is None else {"first_layer": batch.boundary_layer, "hidden": batch.boundary}
    # Only the positions that predict a response token come out (the last layer runs on them alone).
    h = model(batch.input_ids, position_ids=batch.position_ids, mask=batch.mask,
              return_hidden=True, outputs=batch.out_pos, **split)                # (G, Q, dim)
    G, Q = batch.out_pos.shape
    if h.dim() != 3 or h.shape[:2] != (G, Q):
        raise RuntimeError(f"model returned hidden states of shape {tuple(h.shape)}, expected ({G}, {Q}, dim)")
    S, R = batch.out_index.shape
    # index_select: its backward adds the gradients of the prompt's last position, shared by
    # every response of a group.
    return h.flatten(0, 1).index_select(0, batch.out_index.flatten()).view(S, R, -1)  # (S, R, dim)


def response_logits(model: Any, batch: PlainBatch | PackedBatch) -> torch.Tensor:
    """The logits that ``batch.labels`` scores: response tokens only for a packed batch (the
    LM head skips the prompt), every position for the plain layout."""
    if _is_packed(batch):
        return model.lm_head(response_hidden(model, batch))                     # (S, R, V)
    return model(batch.input_ids, attention_mask=batch.attention_mask)          # (S, T, V)


class RefCache:
    """The frozen reference's log-prob of each (row, response), computed once.

    The reference model is frozen (LoRA disabled or its frozen copy, no dropout in its path) and
    a row's prompt is the same whichever responses go with it (``minisdpo.data.encode_group``),
    so the log-prob of a response never changes: with fixed negatives (the public S-DPO code draws them once) from
    the second epoch on, and with the frozen-prefix cache always (the trainer fills in all of a
    row's candidates at once), the reference pass is wasted work. Key a group by
    ``RefCache.key(row, responses)``, ``row`` any hashable id unique across the rows that share
    the cache (a row index, or ("val", index) when splits share one cache) and ``responses`` the
    group's titles in order ([target, *negatives]). The cache is only valid while the base
    weights, the tokenizer and max_len stay the same.
    """

    def __init__(self) -> None:
        self._logps: dict[tuple[Hashable, str], float] = {}
        self._dtype = torch.float32

    @staticmethod
    def key(row: Hashable, responses: Sequence[str]) -> tuple[Hashable, tuple[str, ...]]:
        if isinstance(responses, str):
            raise TypeError(f"responses must be a sequence of titles, got the string {responses!r}")
        return row, tuple(responses)

    def __len__(self) -> int:
        """The number of (row, response) log-probs held."""
        return len(self._logps)

    def __contains__(self, key: Hashable) -> bool:
        """Whether every response of the group ``key`` (a ``RefCache.key``) is held."""
        row, titles = key
        return all((row, t) in self._logps for t in titles)

    def get(self, keys: Sequence[Hashable]) -> torch.Tensor | None:
        """The cached (S,) log-probs of these groups' responses, in order, or None if any is missing."""
        wanted = [(row, title) for row, titles in keys for title in titles]
        if not keys or any(w not in self._logps for w in wanted):
            return None
        return torch.tensor([self._logps[w] for w in wanted], dtype=self._dtype)  # (S,)

    def put(self, keys: Sequence[Hashable], ref_logps: torch.Tensor) -> None:
        """Store the (S,) log-probs of the responses of ``keys``' groups, laid out group-major."""
        wanted = [(row, title) for row, titles in keys for title in titles]
        if not keys or ref_logps.dim() != 1 or ref_logps.numel() != len(wanted):
            raise ValueError(f"ref_logps of shape {tuple(ref_logps.shape)} does not match the "
                             f"{len(wanted)} responses of {len(keys)} groups")
        self._dtype = ref_logps.dtype
        self._logps.update(zip(wanted, ref_logps.detach().cpu().tolist()))


@contextmanager
def _reference_items(model: Any) -> Iterator[None]:
    """Within the block, the model's item tokens (``minisdpo.model.ItemTokens``, if any) use the
    frozen copy of their projector: the reference's, when a preference stage trains it."""
    items = getattr(model, "items", None)
    if items is None:
        yield
        return
    before, items.use_reference = items.use_reference, True
    try:
        yield
    finally:
        items.use_reference = before


class StageLoss:
    """The loss of a stage's micro-batches: SFT (``negatives=0``) or S-DPO with K = ``negatives``
    (K = 1: DPO), with what the stage fixes chosen once: model, loss backend, batch layout
    (``packing``, as ``minisdpo.batches.build_batch``), LM head and beta.

        objective = StageLoss(model, ops, negatives=3)
        loss, logps = objective(batch, n_terms, objective.reference(batch))

    ``head``: "linear", "logits" or None, the default: "linear" for packed batches when the
    backend has the linear ops and ``model.lm_head`` is a plain bias-free Linear, else "logits".
    """

    def __init__(self, model: Any, backend: LossBackend, *, packing: str = "shared", negatives: int = 0,
                 beta: float = 1.0, head: str | None = None):
        if packing not in LAYOUTS:
            raise ValueError(f"packing must be one of {LAYOUTS}, got {packing!r}")
        if not (isinstance(negatives, int) and negatives >= 0):
            raise ValueError(f"negatives must be an int >= 0 (0: SFT), got {negatives!r}")
        self.model, self.backend, self.negatives, self.beta = model, backend, negatives, beta
        self.packed = packing == "shared"
        has_linear = isinstance(backend, LinearLossBackend)
        if head is None:
            head = "linear" if self.packed and has_linear and _plain_head(model) else "logits"
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS} or None, got {head!r}")
        if head == "linear" and not has_linear:
            name = getattr(backend, "__name__", type(backend).__name__)
            raise ValueError(f"head='linear' needs a LinearLossBackend (minisdpo.ops), got {name}")
        if head == "linear" and not _plain_head(model):
            raise ValueError("head='linear' needs model.lm_head to be a bias-free nn.Linear")
        self.head = head

    def _check(self, batch: PlainBatch | PackedBatch) -> None:
        if not isinstance(batch, PackedBatch if self.packed else PlainBatch):
            _is_packed(batch)          # not a batch at all: a TypeError that names both types
            want = "PackedBatch (packing 'shared')" if self.packed else "PlainBatch (packing 'none')"
            raise TypeError(f"batch must be a minisdpo.batches.{want}, as this StageLoss was made for, "
                            f"got {type(batch).__name__}")

    def _hidden(self, batch: PlainBatch | PackedBatch) -> torch.Tensor:
        """The final hidden states aligned with ``batch.labels``: the response rows only for a
        packed batch (``response_hidden``), every position for the plain layout."""
        if self.packed:
            return response_hidden(self.model, batch)                                 # (S, R, dim)
        return self.model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)  # (S, T, dim)

    def token_logps(self, batch: PlainBatch | PackedBatch) -> torch.Tensor:
        """The policy's log-prob of every labelled token, (S, R) (0 where ignored)."""
        self._check(batch)
        if self.head == "linear":
            return self.backend.linear_token_logps(self._hidden(batch), self.model.lm_head.weight, batch.labels)
        return self.backend.token_logps(self.model.lm_head(self._hidden(batch)), batch.labels)

    @torch.no_grad()
    def reference(self, batch: PlainBatch | PackedBatch, ref_cache: RefCache | None = None,
                  keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """The frozen reference's summed log-prob of each response, (S,): the model with its LoRA
        adapter disabled or replaced by its frozen copy (``minisdpo.lora.reference``), without
        gradients. With ``ref_cache`` and ``keys`` (one ``RefCache.key`` per group, in the
        batch's order), read from the cache when it holds every group, else computed and stored."""
        if (ref_cache is None) != (keys is None):
            raise ValueError("ref_cache and keys go together: pass both or neither")
        if keys is not None:
            groups = batch.labels.shape[0] // (1 + self.negatives)
            if len(keys) != groups:
                raise ValueError(f"keys has {len(keys)} keys for a batch of {groups} groups")
            if any(len(titles) != 1 + self.negatives for _, titles in keys):
                raise ValueError(f"every key must name the group's 1 + K = {1 + self.negatives} responses")
            cached = ref_cache.get(keys)
            if cached is not None:
                return cached.to(batch.labels.device)
        with reference(self.model), _reference_items(self.model):
            logps = self.token_logps(batch).sum(-1)                                   # (S,)
        if ref_cache is not None:
            ref_cache.put(keys, logps)
        return logps

    def fill_reference(self, prefix: PrefixCache, ids: Sequence[int], ref_cache: RefCache, *,
                       key: Callable[[int], Hashable] = lambda i: i, batch_size: int = 8,
                       device: torch.device | str = "cpu") -> None:
        """Put the reference log-probs of every candidate of the prefix cache's rows ``ids`` (keyed
        ``key(i)`` in ``ref_cache``) that it does not hold yet: one pass of the top layers a row,
        after which any negatives of the row are a lookup."""
        need = [i for i in ids if RefCache.key(key(i), prefix.rows[i].candidates) not in ref_cache]
        for start in range(0, len(need), batch_size):
            part = need[start:start + batch_size]
            batch = prefix.batch(part, [prefix.rows[i].candidates for i in part]).to(device)
            ref_cache.put([RefCache.key(key(i), prefix.rows[i].candidates) for i in part], self.reference(batch))

    def __call__(self, batch: PlainBatch | PackedBatch, n_terms: int | None = None,
                 ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, logps): the sum of the batch's loss terms (response tokens for SFT, groups for
        S-DPO) divided by ``n_terms``, the terms of the whole optimizer step, so that the
        micro-batches' gradients add up to the step's (default: the batch's own terms, its mean
        loss); and the policy's (S,) sequence log-probs (None for SFT). S-DPO needs the
        reference's (S,) ``ref_logps``, computed here when not given (``reference``)."""
        self._check(batch)
        labels = batch.labels
        if not self.negatives:
            if ref_logps is not None:
                raise ValueError("ref_logps is for S-DPO: this StageLoss is SFT's (negatives=0)")
            total = -self.token_logps(batch).sum()
            terms = int((labels != IGNORE_INDEX).sum()) if n_terms is None else n_terms
            return total / terms, None
        if ref_logps is None:
            ref_logps = self.reference(batch)
        ref_logps = ref_logps.to(labels.device)
        if self.head == "linear":
            loss, logps = self.backend.sdpo_linear_loss(self._hidden(batch), self.model.lm_head.weight, labels,
                                                        ref_logps, beta=self.beta, num_negatives=self.negatives)
        else:
            loss, logps = self.backend.sdpo_loss(self.model.lm_head(self._hidden(batch)), labels, ref_logps,
                                                 beta=self.beta, num_negatives=self.negatives)
        groups = labels.shape[0] // (1 + self.negatives)
        # The backends return the batch's mean over groups: back to the sum, then the step's mean.
        return (loss * groups) / (groups if n_terms is None else n_terms), logps
