"""The loss of one SFT or S-DPO micro-batch: layout, frozen reference, LM head, loss.

Shared by ``minisdpo.train`` and ``minisdpo.bench --step``; ``response_hidden`` and
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
with ``"logits"`` and ``minisdpo.loss`` (the PyTorch twin) is the tests' oracle. The S-DPO reference (Chen et al.,
NeurIPS 2024, eq. 11) is the same model inside ``minisdpo.lora.reference``: its LoRA adapter
disabled, or, when the stage trains the SFT adapter itself (``--sdpo-init sft-adapter``), the
frozen copy of that adapter in place of the trained one; run without gradients on the same
batch, or read from a ``RefCache`` when the negatives of a row are fixed.

``backend`` is ``minisdpo.ops`` (the fused kernels) or ``minisdpo.loss`` (their PyTorch twin): both
are a ``minisdpo.loss.LossBackend``; only ``minisdpo.ops`` is a ``LinearLossBackend`` (the fused
linear head). "Reference" here always means the frozen reference model, never the PyTorch twin.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

from minisdpo.batches import PackedBatch, PlainBatch
from minisdpo.loss import LinearLossBackend, LossBackend
from minisdpo.lora import reference
from minisdpo.prefix import PrefixCache

__all__ = ["HEADS", "RefCache", "resolve_head", "response_hidden", "final_hidden", "response_logits",
           "sft_loss_sum", "reference_logps", "fill_reference", "sdpo_loss_sum"]

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


def resolve_head(head: str | None, batch: PlainBatch | PackedBatch, backend: LossBackend, model: Any) -> str:
    """The LM head to use: ``head`` checked, or the default ("linear" for a packed batch when
    ``backend`` has the linear ops and the model's head is a plain Linear, else "logits")."""
    packed = _is_packed(batch)
    has_linear = isinstance(backend, LinearLossBackend)
    if head is None:
        return "linear" if packed and has_linear and _plain_head(model) else "logits"
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS} or None, got {head!r}")
    if head == "linear" and not has_linear:
        name = getattr(backend, "__name__", type(backend).__name__)
        raise ValueError(f"head='linear' needs a LinearLossBackend (minisdpo.ops), got {name}")
    if head == "linear" and not _plain_head(model):
        raise ValueError("head='linear' needs model.lm_head to be a bias-free nn.Linear")
    return head


def response_hidden(model: Any, batch: PackedBatch) -> torch.Tensor:
    """The final hidden states that predict the response tokens of a ``packed_batch``, (S, R, dim).

    ``model`` is called as ``model(input_ids, position_ids=..., mask=..., return_hidden=True)``
    (minisdpo.model.Llama's signature) and must return (G, L, dim). Apply ``model.lm_head`` to
    the result to get the logits that ``batch.labels`` scores: the LM head then runs on the
    S * R response rows only.
    """
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a minisdpo.batches.PackedBatch (from packed_batch), "
                        f"got {type(batch).__name__}")
    # A batch of the frozen-prefix cache (minisdpo.prefix) carries the residual stream entering
    # its boundary layer: the model runs from there.
    split = {} if batch.boundary is None else {"first_layer": batch.boundary_layer, "hidden": batch.boundary}
    h = model(batch.input_ids, position_ids=batch.position_ids, mask=batch.mask,
              return_hidden=True, **split)                                   # (G, L, dim)
    G, L = batch.input_ids.shape
    if h.dim() != 3 or h.shape[:2] != (G, L):
        raise RuntimeError(f"model returned hidden states of shape {tuple(h.shape)}, expected ({G}, {L}, dim)")
    S, R = batch.index.shape
    # index_select: its backward adds the gradients of the prompt's last position, shared by
    # every response of a group.
    return h.flatten(0, 1).index_select(0, batch.index.flatten()).view(S, R, -1)  # (S, R, dim)


def final_hidden(model: Any, batch: PlainBatch | PackedBatch) -> torch.Tensor:
    """The final hidden states aligned with ``batch.labels``: response rows only for a packed
    batch, every position for the plain layout."""
    if _is_packed(batch):
        return response_hidden(model, batch)                                     # (S, R, dim)
    return model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)  # (S, T, dim)


def response_logits(model: Any, batch: PlainBatch | PackedBatch) -> torch.Tensor:
    """The logits that ``batch.labels`` scores: response tokens only for a packed batch (the
    LM head skips the prompt), every position for the plain layout."""
    if _is_packed(batch):
        return model.lm_head(response_hidden(model, batch))                     # (S, R, V)
    return model(batch.input_ids, attention_mask=batch.attention_mask)          # (S, T, V)


def _token_logps(model: Any, batch: PlainBatch | PackedBatch, backend: LossBackend, head: str) -> torch.Tensor:
    if head == "linear":
        return backend.linear_token_logps(final_hidden(model, batch), model.lm_head.weight, batch.labels)
    return backend.token_logps(response_logits(model, batch), batch.labels)       # (S, R)


def sft_loss_sum(model: Any, batch: PlainBatch | PackedBatch, backend: LossBackend, *,
                 head: str | None = None) -> torch.Tensor:
    """Sum of the response tokens' negative log-likelihoods (the caller divides by their count)."""
    head = resolve_head(head, batch, backend, model)
    return -_token_logps(model, batch, backend, head).sum()


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
        self.hits = 0
        self.misses = 0

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
            self.misses += 1
            return None
        self.hits += 1
        return torch.tensor([self._logps[w] for w in wanted], dtype=self._dtype)  # (S,)

    def put(self, keys: Sequence[Hashable], ref_logps: torch.Tensor) -> None:
        """Store the (S,) log-probs of the responses of ``keys``' groups, laid out group-major."""
        wanted = [(row, title) for row, titles in keys for title in titles]
        if not keys or ref_logps.dim() != 1 or ref_logps.numel() != len(wanted):
            raise ValueError(f"ref_logps of shape {tuple(ref_logps.shape)} does not match the "
                             f"{len(wanted)} responses of {len(keys)} groups")
        self._dtype = ref_logps.dtype
        self._logps.update(zip(wanted, ref_logps.detach().cpu().tolist()))


@torch.no_grad()
def reference_logps(model: Any, batch: PlainBatch | PackedBatch, backend: LossBackend, *,
                    head: str | None = None) -> torch.Tensor:
    """The frozen reference's summed log-prob of each response of the batch, (S,): the model
    with its LoRA adapter disabled, or with its adapter's frozen copy
    (``minisdpo.lora.freeze_reference``), without gradients."""
    head = resolve_head(head, batch, backend, model)
    with reference(model):
        return _token_logps(model, batch, backend, head).sum(-1)                 # (S,)


def fill_reference(model: Any, prefix: PrefixCache, ids: Sequence[int], ref_cache: RefCache, backend: LossBackend,
                   *, key: Callable[[int], Hashable] = lambda i: i, batch_size: int = 8,
                   device: torch.device | str = "cpu") -> None:
    """Put the reference log-probs of every candidate of the prefix cache's rows ``ids`` (keyed
    ``key(i)`` in ``ref_cache``) that it does not hold yet: one pass of the top layers a row,
    after which any negatives of the row are a lookup."""
    need = [i for i in ids if RefCache.key(key(i), prefix.rows[i].candidates) not in ref_cache]
    for start in range(0, len(need), batch_size):
        part = need[start:start + batch_size]
        batch = prefix.batch(part, [prefix.rows[i].candidates for i in part]).to(device)
        ref_cache.put([RefCache.key(key(i), prefix.rows[i].candidates) for i in part],
                      reference_logps(model, batch, backend))


def _check_ref_keys(ref_cache: RefCache | None, ref_keys: Sequence[Hashable] | None,
                    batch: PlainBatch | PackedBatch, num_negatives: int) -> None:
    if (ref_cache is None) != (ref_keys is None):
        raise ValueError("ref_cache and ref_keys go together: pass both or neither")
    groups = batch.labels.shape[0] // (1 + num_negatives)
    if ref_keys is not None and len(ref_keys) != groups:
        raise ValueError(f"ref_keys has {len(ref_keys)} keys for a batch of {groups} groups")
    if ref_keys is not None and any(len(titles) != 1 + num_negatives for _, titles in ref_keys):
        raise ValueError(f"every ref_keys entry must name the group's 1 + K = {1 + num_negatives} responses")


def sdpo_loss_sum(model: Any, batch: PlainBatch | PackedBatch, backend: LossBackend, beta: float,
                  num_negatives: int, *, head: str | None = None, ref_cache: RefCache | None = None,
                  ref_keys: Sequence[Hashable] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S-DPO loss summed over the batch's groups, the policy's and the reference's log-probs (S,).

    ``head``: "linear", "logits" or None (see ``resolve_head``). ``ref_cache`` with ``ref_keys``
    (one ``RefCache.key`` per group, in the batch's order) reuses the reference log-probs of
    groups seen before and stores those it computes.
    """
    head = resolve_head(head, batch, backend, model)
    _check_ref_keys(ref_cache, ref_keys, batch, num_negatives)
    labels = batch.labels
    ref_logps = ref_cache.get(ref_keys) if ref_cache is not None else None
    if ref_logps is None:
        ref_logps = reference_logps(model, batch, backend, head=head)               # (S,)
        if ref_cache is not None:
            ref_cache.put(ref_keys, ref_logps)
    ref_logps = ref_logps.to(labels.device)
    if head == "linear":
        loss, logps = backend.sdpo_linear_loss(final_hidden(model, batch), model.lm_head.weight, labels,
                                           ref_logps, beta=beta, num_negatives=num_negatives)
    else:
        loss, logps = backend.sdpo_loss(response_logits(model, batch), labels, ref_logps, beta=beta,
                                    num_negatives=num_negatives)
    groups = labels.shape[0] // (1 + num_negatives)
    return loss * groups, logps, ref_logps
