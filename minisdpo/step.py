"""The loss of one SFT or S-DPO micro-batch: layout, frozen reference, LM head, loss.

Shared by ``minisdpo.train`` and ``minisdpo.bench --step``. Two layouts of the same batch
(``minisdpo.data``):

* ``"none"``: one full prompt + response sequence per response, logits at every position, as
  the public S-DPO code and TRL's DPO do: the prompt runs 1 + K times through the model.
* ``"shared"`` (default): one packed sequence per prompt, ``[prompt, r_0, ..., r_K]``, whose
  responses attend to the prompt and to themselves only (a block mask, per-segment positions),
  and the LM head on the response tokens only.

Both give the same log-probs (tests/test_packing.py); ``"none"`` is the oracle. The S-DPO
reference (Chen et al., NeurIPS 2024, eq. 11) is the same model with its LoRA adapter disabled,
run without gradients on the same batch.

``ops`` is ``minisdpo.ops`` (the fused kernels) or ``minisdpo.loss`` (their PyTorch twin): both
provide ``token_logps`` and ``sdpo_loss`` with the same signatures.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import torch

from minisdpo import data as D
from minisdpo.lora import disable_lora

__all__ = ["LAYOUTS", "build_batch", "response_logits", "sft_loss_sum", "sdpo_loss_sum"]

LAYOUTS = ("shared", "none")


def build_batch(tok: Any, rows: Sequence[D.Row], negatives: Sequence[Sequence[str]] | None, max_len: int,
                *, domain: str, packing: str = "shared") -> dict[str, Any]:
    """An SFT batch (``negatives`` None) or an S-DPO batch (K negatives per row) in a layout.

    Adds ``num_tokens``: the real (unpadded) tokens that go through the model, for tokens/s.
    """
    if packing not in LAYOUTS:
        raise ValueError(f"packing must be one of {LAYOUTS}, got {packing!r}")
    if packing == "shared":
        responses = ([[r.target, *n] for r, n in zip(rows, negatives)] if negatives is not None
                     else [[r.target] for r in rows])
        batch = D.packed_batch(tok, rows, responses, max_len, domain=domain)
        batch["num_tokens"] = int(batch["num_tokens"])
        return batch
    batch = (D.sdpo_batch(tok, rows, negatives, max_len, domain=domain) if negatives is not None
             else D.sft_batch(tok, rows, max_len, domain=domain))
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    return batch


def response_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits that ``batch["labels"]`` scores: response tokens only for a packed batch (the
    LM head skips the prompt), every position for the plain layout."""
    if "index" in batch:
        return model.lm_head(D.response_hidden(model, batch))                   # (S, R, V)
    return model(batch["input_ids"], attention_mask=batch["attention_mask"])    # (S, T, V)


def sft_loss_sum(model: Any, batch: dict[str, torch.Tensor], ops: ModuleType) -> torch.Tensor:
    """Sum of the response tokens' negative log-likelihoods (the caller divides by their count)."""
    return -ops.token_logps(response_logits(model, batch), batch["labels"]).sum()


def sdpo_loss_sum(model: Any, batch: dict[str, torch.Tensor], ops: ModuleType, beta: float,
                  num_negatives: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S-DPO loss summed over the batch's groups, the policy's and the reference's log-probs (S,)."""
    with torch.no_grad(), disable_lora(model):
        ref_logps = ops.token_logps(response_logits(model, batch), batch["labels"]).sum(-1)  # (S,)
    loss, logps = ops.sdpo_loss(response_logits(model, batch), batch["labels"], ref_logps, beta=beta,
                                num_negatives=num_negatives)
    groups = batch["labels"].shape[0] // (1 + num_negatives)
    return loss * groups, logps, ref_logps
