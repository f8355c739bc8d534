"""Tests of minisdpo.step: every (layout, LM head) of the S-DPO and SFT micro-batch loss against
the oracle, the plain layout with materialised logits and the PyTorch twin (minisdpo.loss).
Each loss is a ``StageLoss``, which fixes the model, backend, layout and head once.

A tiny random float32 Llama with LoRA on every projection, its B matrices non-zero so that the
policy differs from the reference (adapter disabled); loss, policy and reference log-probs and
the gradients of every parameter (LM head included) must agree within 1e-5. Also the reference
cache (RefCache), the choice of head and the batch types a StageLoss accepts.
"""
from __future__ import annotations

import pytest
import torch

from minisdpo import loss as torch_loss
from minisdpo import ops
from minisdpo.batches import build_batch
from minisdpo.lora import apply_lora
from minisdpo.step import RefCache, StageLoss, response_hidden, response_logits

from conftest import TOK, random_negatives, random_rows, tiny_llama

TOL = dict(rtol=1e-5, atol=1e-5)
COMBOS = [("shared", "linear"), ("shared", "logits"), ("none", "linear"), ("none", "logits")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    m = apply_lora(tiny_llama(seed=1), r=4, alpha=8.0)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)             # policy != reference
    return m


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got, want):
    assert got.keys() == want.keys()
    assert any("lm_head" in n for n in got) and any("lora_B" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")


def sdpo_run(model, batch, ops_module, k, packing, head):
    objective = StageLoss(model, ops_module, packing=packing, negatives=k, beta=0.8, head=head)
    ref_logps = objective.reference(batch)
    loss, logps = objective(batch, ref_logps=ref_logps)
    mix = torch.linspace(-1, 1, logps.numel())
    (loss + 0.1 * (mix * logps).sum()).backward()   # through both outputs
    return loss.detach(), logps.detach(), ref_logps, grads(model)


@pytest.mark.parametrize("k", [1, 3])
def test_sdpo_step_matches_oracle(model, k):
    rows = random_rows(3, seed=10 + k)
    negs = random_negatives(rows, k, seed=k)
    oracle = sdpo_run(model, build_batch(TOK, rows, negs, 512, domain="music", packing="none"),
                      torch_loss, k, "none", "logits")
    for packing, head in COMBOS:
        batch = build_batch(TOK, rows, negs, 512, domain="music", packing=packing)
        got = sdpo_run(model, batch, ops, k, packing, head)
        for a, b in zip(got[:3], oracle[:3]):
            torch.testing.assert_close(a, b, **TOL)
        assert_grads_close(got[3], oracle[3])
    assert not torch.allclose(oracle[1], oracle[2])  # the adapter changes the log-probs


def test_sft_step_matches_oracle(model):
    rows = random_rows(4, seed=20)
    want_loss, _ = StageLoss(model, torch_loss, packing="none", head="logits")(
        build_batch(TOK, rows, None, 512, domain="movies", packing="none"))
    want_loss.backward()
    want = grads(model)
    for packing, head in COMBOS:
        batch = build_batch(TOK, rows, None, 512, domain="movies", packing=packing)
        loss, logps = StageLoss(model, ops, packing=packing, head=head)(batch)
        assert logps is None
        loss.backward()
        torch.testing.assert_close(loss, want_loss, **TOL)
        assert_grads_close(grads(model), want)


def test_default_head(model):
    def head(backend, packing="shared", m=model, **kw):
        return StageLoss(m, backend, packing=packing, **kw).head
    assert head(ops) == "linear"
    assert head(ops, "none") == "logits"
    assert head(torch_loss) == "logits"
    with pytest.raises(ValueError, match="head"):
        head(torch_loss, head="linear")
    with pytest.raises(ValueError, match="head"):
        head(ops, head="full")
    lora_head = apply_lora(tiny_llama(), r=2, target_modules=["lm_head"])
    assert head(ops, m=lora_head) == "logits"
    with pytest.raises(ValueError, match="lm_head"):
        head(ops, m=lora_head, head="linear")
    with pytest.raises(ValueError, match="packing"):
        head(ops, "packed")
    with pytest.raises(ValueError, match="negatives"):
        head(ops, negatives=-1)


def test_unknown_batch_type_rejected(model):
    # A batch is a minisdpo.batches.PlainBatch or PackedBatch; anything else (such as the dict of
    # tensors batches used to be) is a TypeError that names both, never a guess at the layout.
    rows = random_rows(2, seed=35)
    plain = build_batch(TOK, rows, None, 512, domain="music", packing="none")
    as_dict = {"input_ids": plain.input_ids, "attention_mask": plain.attention_mask, "labels": plain.labels}
    sft, sdpo = StageLoss(model, ops), StageLoss(model, ops, negatives=1)
    for call in (lambda b: response_logits(model, b), sft, sdpo,
                 sdpo.reference, sft.token_logps):
        with pytest.raises(TypeError, match="PlainBatch or PackedBatch.*got dict"):
            call(as_dict)
    with pytest.raises(TypeError, match="PackedBatch.*got PlainBatch"):
        response_hidden(model, plain)
    # A StageLoss is made for one layout: the other is refused, naming both.
    with pytest.raises(TypeError, match="PackedBatch \\(packing 'shared'\\).*got PlainBatch"):
        sft(plain)
    packed = build_batch(TOK, rows, None, 512, domain="music", packing="shared")
    with pytest.raises(TypeError, match="PlainBatch \\(packing 'none'\\).*got PackedBatch"):
        StageLoss(model, ops, packing="none")(packed)
    with pytest.raises(ValueError, match="ref_logps is for S-DPO"):
        sft(packed, ref_logps=torch.zeros(2))


def test_loss_is_divided_by_the_steps_terms(model):
    """``n_terms``: the micro-batch's loss terms summed and divided by the optimizer step's, so
    that two halves of a batch, each divided by the whole batch's terms, add up to its mean."""
    k = 3
    rows = random_rows(4, seed=36)
    negs = random_negatives(rows, k, seed=37)
    sdpo = StageLoss(model, ops, negatives=k)
    whole, _ = sdpo(build_batch(TOK, rows, negs, 512, domain="music"))
    halves = [sdpo(build_batch(TOK, rows[i:i + 2], negs[i:i + 2], 512, domain="music"), 4)[0] for i in (0, 2)]
    torch.testing.assert_close(halves[0] + halves[1], whole, **TOL)
    # SFT: its terms are response tokens, counted independently of the loss from the labels.
    sft = StageLoss(model, ops)
    batches = [build_batch(TOK, rows[i:i + 2], None, 512, domain="music") for i in (0, 2)]
    tokens = [int((b.labels != -100).sum()) for b in batches]
    whole, _ = sft(build_batch(TOK, rows, None, 512, domain="music"))
    parts = [sft(b, sum(tokens))[0] for b in batches]
    torch.testing.assert_close(parts[0] + parts[1], whole, **TOL)
    torch.testing.assert_close(sft(batches[0])[0], parts[0] * sum(tokens) / tokens[0], **TOL)


def test_ref_cache(model):
    k = 3
    rows = random_rows(4, seed=40)
    negs = random_negatives(rows, k, seed=41)
    keys = [RefCache.key(i, [r.target, *n]) for i, (r, n) in enumerate(zip(rows, negs))]
    batch = build_batch(TOK, rows, negs, 512, domain="music")
    objective = StageLoss(model, ops, negatives=k)
    passes = []     # the reference passes that ran: one per batch not held whole by the cache
    run = objective.token_logps
    objective.token_logps = lambda b: passes.append(b) or run(b)
    cache = RefCache()
    first = objective.reference(batch, cache, keys)
    assert len(cache) == 16 and len(passes) == 1      # 4 groups of 1 + K responses
    assert all(key in cache for key in keys)
    torch.testing.assert_close(first, objective.reference(batch), rtol=0, atol=0)
    # The same batch again: every group cached, no pass, and the same results.
    passes.clear()
    second = objective.reference(batch, cache, keys)
    assert not passes
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # A batch in which two groups are cached and two are new: a miss, computed again as a
    # whole (the cached groups' values again), and the new groups stored.
    new_rows = random_rows(2, seed=42)
    new_negs = random_negatives(new_rows, k, seed=43)
    mixed_keys = keys[2:] + [RefCache.key(4 + i, [r.target, *n]) for i, (r, n) in enumerate(zip(new_rows, new_negs))]
    mixed = build_batch(TOK, rows[2:] + new_rows, negs[2:] + new_negs, 512, domain="music")
    ref_mixed = objective.reference(mixed, cache, mixed_keys)
    assert len(passes) == 1 and len(cache) == 6 * (1 + k)
    torch.testing.assert_close(ref_mixed[:8], first[8:], **TOL)
    # The reference pass is skipped on a hit: planted values come back as they are.
    planted = RefCache()
    fake = torch.arange(16, dtype=torch.float32) - 50.0
    planted.put(keys, fake)
    torch.testing.assert_close(objective.reference(batch, planted, keys), fake, rtol=0, atol=0)
    # Groups are looked up by key, in the batch's order.
    sub = build_batch(TOK, rows[2:0:-1], negs[2:0:-1], 512, domain="music")
    ref_sub = objective.reference(sub, cache, keys[2:0:-1])
    torch.testing.assert_close(ref_sub, torch.cat([first[8:12], first[4:8]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="keys"):
        objective.reference(batch, cache, keys[:3])
    with pytest.raises(ValueError, match="keys"):
        objective.reference(batch, cache)
    with pytest.raises(ValueError, match="groups"):
        cache.put(keys, torch.zeros(15))


def test_bench_step(tmp_path):
    """python -m minisdpo.bench --step on the small model: both variants compute the same loss
    on fewer tokens for the efficient one, and the JSON has the documented fields."""
    import json

    from minisdpo import bench
    from minisdpo.bench import synthetic_step

    model, batches = synthetic_step.step_setup("small", 3, 2, torch.float32)
    assert batches["efficient"].num_tokens * 2 < batches["naive"].num_tokens
    losses = [synthetic_step.step_once(model, batches[v], v, 3) for v in synthetic_step.STEP_VARIANTS]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    path = tmp_path / "step.json"
    bench.main(["--step", "--models", "small", "--negatives", "1", "--groups", "1", "--repeats", "1",
                "--json", str(path)])
    result = json.loads(path.read_text())
    assert list(result) == ["small_K1"]
    entry = result["small_K1"]
    for v in ("naive", "efficient"):
        assert entry[v]["ms"] > 0 and entry[v]["peak_mb"] > 0
    # The ratios are those of the entry's own figures, and the tokens those of its two layouts.
    assert entry["speedup"] == pytest.approx(entry["naive"]["ms"] / entry["efficient"]["ms"])
    assert entry["memory_ratio"] == pytest.approx(entry["naive"]["peak_mb"] / entry["efficient"]["peak_mb"])
    tokens = entry["setup"]["tokens"]
    assert 0 < tokens["efficient"] < tokens["naive"]
