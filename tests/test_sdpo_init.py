"""``--sdpo-init sft-adapter`` against transformers + PEFT, the public S-DPO code's set-up.

The public softmax_dpo.py loads the base model with the SFT adapter as trainable
(``PeftModel.from_pretrained(base, sft_adapter, is_trainable=True)``) and a second base model
with the same adapter, frozen, as the reference. minisdpo builds the stage's model with
``train.preference_model`` (the base, the SFT adapter unmerged and trainable, and a frozen copy
of the adapter as the reference: ``minisdpo.lora.freeze_reference``) and computes the step on
the packed batch with the fused linear loss. On a tiny float32 Llama both must give the same
loss and adapter gradients, at the start (policy = reference: ln(1 + K)) and after an AdamW
step (policy != reference, the reference still the SFT adapter).
"""
from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch

pytest.importorskip("peft")
from hf_utils import tiny_hf_model  # noqa: E402  (skips without transformers)

import peft  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from minisdpo import loss as torch_loss, ops, train  # noqa: E402
from minisdpo.batches import build_batch  # noqa: E402
from minisdpo.checkpoint import from_pretrained  # noqa: E402
from minisdpo.lora import DEFAULT_TARGETS, apply_lora, has_frozen_reference, save_adapter  # noqa: E402
from minisdpo.run import adapter_dir  # noqa: E402
from minisdpo.step import StageLoss  # noqa: E402
from minisdpo.trainer import Env  # noqa: E402

from conftest import TOK, random_negatives, random_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

K, BETA, LR = 3, 1.0, 1e-3


def _hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama (vocabulary for the byte tokenizer) and a non-zero 'SFT adapter' of a
    run directory, in PEFT's format."""
    root = tmp_path_factory.mktemp("sft_adapter")
    tiny_hf_model(seed=0, vocab_size=300, num_attention_heads=4, num_key_value_heads=2).save_pretrained(root / "base")
    sft = apply_lora(from_pretrained(str(root / "base")), r=4, alpha=16.0, dropout=0.0, target_modules=DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(sft, str(adapter_dir(root / "run", "sft")))
    return root


def test_sft_adapter_step_matches_transformers_peft(setup, capsys):
    rows = random_rows(3, seed=5)
    negatives = random_negatives(rows, K, seed=6)
    packed = build_batch(TOK, rows, negatives, 512, domain="music", packing="shared")
    plain = build_batch(TOK, rows, negatives, 512, domain="music", packing="none")

    # ours: the stage's model as train.py builds it
    args = argparse.Namespace(sdpo_init="sft-adapter", seed=0)
    ours, base = train.preference_model(args, Env(), setup / "run", str(setup / "base"))
    assert has_frozen_reference(ours) and base == str((setup / "base").resolve())
    ours.train()
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_params and all(".lora_" in n for n in ours_params)
    ours_opt = torch.optim.AdamW(list(ours_params.values()), lr=LR)

    # theirs: softmax_dpo.py's two PeftModels
    sft_dir = str(adapter_dir(setup / "run", "sft"))
    with warnings.catch_warnings():     # PEFT calls a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        policy = peft.PeftModel.from_pretrained(_hf(setup / "base"), sft_dir, is_trainable=True).train()
        reference = peft.PeftModel.from_pretrained(_hf(setup / "base"), sft_dir).eval()
    their_params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert len(their_params) == len(ours_params)
    their_opt = torch.optim.AdamW(list(their_params.values()), lr=LR)

    def theirs_name(name: str) -> str:
        return "base_model.model." + name.replace(".weight", ".default.weight")

    diffs = []
    for step in range(2):
        objective = StageLoss(ours, ops, negatives=K, beta=BETA)
        ref_logps = objective.reference(packed)
        ours_loss, logps = objective(packed, ref_logps=ref_logps)
        ours_loss.backward()
        ours_loss = ours_loss.detach()
        with torch.no_grad():
            their_ref = torch_loss.sequence_logps(reference(input_ids=plain.input_ids,
                                                            attention_mask=plain.attention_mask).logits, plain.labels)
        logits = policy(input_ids=plain.input_ids, attention_mask=plain.attention_mask).logits
        their_loss, their_logps = torch_loss.sdpo_loss(logits, plain.labels, their_ref, beta=BETA, num_negatives=K)
        their_loss.backward()
        their_loss = their_loss.detach()

        grad_diff = max(float((p.grad - their_params[theirs_name(n)].grad).abs().max()) for n, p in ours_params.items())
        grad_scale = max(float(p.grad.abs().max()) for p in ours_params.values())
        diff = {"step": step, "loss": float(ours_loss), "loss_diff": abs(float(ours_loss) - float(their_loss)),
                "ref_diff": float((ref_logps - their_ref).abs().max()),
                "logps_diff": float((logps.detach() - their_logps.detach()).abs().max()),
                "grad_diff": grad_diff, "grad_max": grad_scale}
        diffs.append(diff)
        assert diff["loss_diff"] <= 1e-5 and diff["ref_diff"] <= 1e-4 and diff["logps_diff"] <= 1e-4, diff
        assert grad_diff <= 1e-5 + 1e-4 * grad_scale, diff
        if step == 0:   # the policy is its reference: every group's loss is ln(1 + K)
            assert float(ours_loss) == pytest.approx(math.log(1 + K), abs=1e-6)
            assert float(their_loss) == pytest.approx(math.log(1 + K), abs=1e-6)
            start_ref = ref_logps.clone()
        else:           # moved by the step; the reference is still the SFT adapter
            assert abs(float(ours_loss) - math.log(1 + K)) > 1e-3
            torch.testing.assert_close(ref_logps, start_ref, rtol=0, atol=0)
        ours_opt.step()
        their_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        their_opt.zero_grad(set_to_none=True)
    with capsys.disabled():
        print("\nsft-adapter vs transformers + PEFT: " + "; ".join(
            f"step {d['step']}: loss {d['loss']:.6f} (|diff| {d['loss_diff']:.1e}), max |grad diff| "
            f"{d['grad_diff']:.1e} of max |grad| {d['grad_max']:.1e}, ref logps {d['ref_diff']:.1e}" for d in diffs))
