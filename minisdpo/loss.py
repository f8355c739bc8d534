"""The S-DPO loss in plain PyTorch: the readable specification of the fused kernels.

This module is the specification of the fused kernel in ``csrc/`` and its test oracle
(``minisdpo.ops`` has the same two functions with the same signatures: ``LossBackend``, below). It follows
"On Softmax Direct Preference Optimization for Recommendation" (Chen et al., NeurIPS 2024,
arXiv 2406.09215), eq. (11)-(12), and its public code: token log-probs are summed, not averaged,
and the loss is averaged over prompts. docs/method.md derives the loss and its gradient step by
step; ``preference_loss`` states the loss next to its code.

Layout (docs/method.md; docs/design.md, the op contract): sequences come group-major. Group g
holds 1+K sequences; row g*(1+K) is the chosen response y_w and rows g*(1+K)+1 .. g*(1+K)+K the
rejected ones y_1..y_K. ``labels[s, t]`` is the token that ``logits[s, t]`` predicts (the caller shifts);
``ignore_index`` marks positions that do not count (prompt, padding).

``LossBackend`` is what this module and ``minisdpo.ops`` both are, as module objects:
``token_logps`` and ``sdpo_loss`` with these signatures. ``LinearLossBackend`` adds the LM head
fused into the loss (``linear_token_logps``, ``sdpo_linear_loss``), which only ``minisdpo.ops`` has. Both are
``runtime_checkable``: ``isinstance(minisdpo.ops, LinearLossBackend)`` is True, and False for this
module (the check looks at the names only; tests/test_backends.py compares the signatures).
Code that takes either module annotates it ``LossBackend`` and asks
``isinstance(backend, LinearLossBackend)`` before using the fused LM head.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["token_logps", "sequence_logps", "preference_loss", "sdpo_loss", "dpo_loss", "metrics", "start_loss",
           "accumulation_dtype", "LossBackend", "LinearLossBackend"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the log-probs are computed and returned in: float32 whatever the input
    precision, float64 for float64 (for gradcheck). The kernels' rule (acc_dtype in
    csrc/sdpo_math.h) is the same; minisdpo.ops's fake kernels use this function."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits[s, t])[labels[s, t]] for each token, 0 where the label is ignored.

    logits (S, T, V), labels (S, T) -> (S, T) in float32 (float64 for float64 logits).
    """
    counted = labels != ignore_index                                   # (S, T)
    safe_labels = labels.masked_fill(~counted, 0)                      # any valid index
    logprobs = torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=-1)  # (S, T, V)
    picked = logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)                 # (S, T)
    return picked.masked_fill(~counted, 0.0)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logp(y|x): the summed log-probs of each sequence's counted tokens, (S,)."""
    return token_logps(logits, labels, ignore_index).sum(-1)


def preference_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 1.0, num_negatives: int = 1
) -> torch.Tensor:
    """The S-DPO loss of each group, from sequence log-probs (S,) laid out group-major -> (G,).

        delta(y) = logp_pi(y|x) - logp_ref(y|x)                 (sequence_logps)
        z_j      = beta * (delta(y_j) - delta(y_w))            j = 1..K
        loss_g   = -log sigmoid(-logsumexp_j z_j) = softplus(logsumexp_j z_j)

    With K = 1 this is the DPO loss, -log sigmoid(beta * (delta(y_w) - delta(y_1))) (``dpo_loss``).
    """
    rewards = beta * (policy_logps - ref_logps.to(policy_logps.dtype))  # beta * delta(y), (S,)
    rewards = rewards.view(-1, 1 + num_negatives)                        # (G, 1+K)
    z = rewards[:, 1:] - rewards[:, :1]                                  # (G, K): z_j
    # softplus(logsumexp z) == -log softmax([r_w, r_1..r_K])[0]: a cross-entropy whose logits
    # are the implicit rewards, with the chosen response as the class.
    return F.softplus(torch.logsumexp(z, dim=-1))


def sdpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 1.0,
    num_negatives: int = 1,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S-DPO loss (mean over groups) and the policy's sequence log-probs.

    logits (S, T, V) with S = G * (1 + K); labels (S, T); ref_logps (S,).
    Returns (loss (), logps (S,)), in float32 (float64 for float64 logits).
    """
    logps = sequence_logps(logits, labels, ignore_index)
    return preference_loss(logps, ref_logps, beta, num_negatives).mean(), logps


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """The textbook DPO sigmoid loss (Rafailov et al. 2023, eq. 7), mean over pairs."""
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def start_loss(num_negatives: int) -> float:
    """The S-DPO loss when every reward is 0 (a fresh adapter: policy = reference): ln(1 + K)."""
    return math.log1p(num_negatives)


def metrics(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 1.0, num_negatives: int = 1
) -> dict[str, float]:
    """The reward and log-prob statistics, named as TRL and the S-DPO code name them."""
    k1 = 1 + num_negatives
    rewards = (beta * (policy_logps.float() - ref_logps.float())).view(-1, k1)  # (G, 1+K)
    logps = policy_logps.float().view(-1, k1)                                   # (G, 1+K)
    chosen, rejected = rewards[:, 0], rewards[:, 1:]
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected.mean(-1)).mean().item(),
        "rewards/accuracies": (chosen.unsqueeze(-1) > rejected).all(-1).float().mean().item(),
        "logps/chosen": logps[:, 0].mean().item(),
        "logps/rejected": logps[:, 1:].mean().item(),
    }


# ----- the backends: this module and minisdpo.ops, as module objects


@runtime_checkable
class LossBackend(Protocol):
    """The loss functions a training step needs: this module (plain PyTorch) or ``minisdpo.ops``."""

    def token_logps(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        ...

    def sdpo_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_logps: torch.Tensor,
        beta: float = 1.0,
        num_negatives: int = 1,
        ignore_index: int = -100,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ...


@runtime_checkable
class LinearLossBackend(LossBackend, Protocol):
    """A ``LossBackend`` that also takes the hidden states and the LM head's weight instead of the
    logits, never forming them whole: ``minisdpo.ops`` (csrc/linear.cpp)."""

    def linear_token_logps(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = -100,
        chunk_rows: int = 0,
    ) -> torch.Tensor:
        ...

    def sdpo_linear_loss(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_logps: torch.Tensor,
        beta: float = 1.0,
        num_negatives: int = 1,
        ignore_index: int = -100,
        chunk_rows: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ...
