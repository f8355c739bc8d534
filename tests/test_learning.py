"""A learning test: a few S-DPO steps on a tiny model do what S-DPO is for.

The other tests compare the fused ops with the reference; this one checks the objective itself,
independently of both: after a few optimizer steps on a batch of groups, the policy prefers each
group's chosen response to its negatives more than the reference does. Measured with the
reward statistics of minisdpo.loss.metrics (implicit reward beta * (logp - ref_logp)):
the chosen-vs-rejected accuracy and the margin rise from chance and 0 (LoRA B = 0 at the start:
policy = reference).
"""
from __future__ import annotations

import pytest
import torch

from minisdpo import loss as torch_loss
from minisdpo import ops
from minisdpo.lora import apply_lora, mark_only_lora_as_trainable
from minisdpo.batches import build_batch
from minisdpo.step import StageLoss

from conftest import TOK, random_negatives, random_rows, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("head", ["linear", "logits"])
def test_sdpo_steps_raise_reward_accuracy_and_margin(head):
    K, beta, steps = 3, 0.5, 5
    model = apply_lora(tiny_llama(seed=3), r=4, alpha=8.0)
    mark_only_lora_as_trainable(model)
    rows = random_rows(4, seed=50)
    batch = build_batch(TOK, rows, random_negatives(rows, K, seed=51), 512, domain="music")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    objective = StageLoss(model, ops, negatives=K, beta=beta, head=head)

    def evaluate():
        with torch.no_grad():
            ref_logps = objective.reference(batch)
            loss, logps = objective(batch, ref_logps=ref_logps)
        return loss.item(), torch_loss.metrics(logps, ref_logps, beta, K)

    loss0, before = evaluate()
    # lora_B starts at zero: the policy is the reference, every implicit reward is 0 up to the
    # rounding of two differently summed float32 log-probs (so the accuracy is a coin toss).
    assert abs(before["rewards/margins"]) < 1e-4
    for _ in range(steps):
        loss, _ = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss1, after = evaluate()
    assert loss1 < loss0
    assert after["rewards/accuracies"] > before["rewards/accuracies"] and after["rewards/accuracies"] >= 0.75
    assert after["rewards/margins"] > 1.0
    assert after["rewards/chosen"] > after["rewards/rejected"]
