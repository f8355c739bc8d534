"""The frozen-prefix cache (minisdpo.prefix) against the whole model: with the same adapter on the
top layers, the cached path gives the uncached path's SFT loss, S-DPO loss, log-probs, LoRA
gradients, ranking scores and validation losses, in float32 to 1e-5 and in bfloat16 to its
rounding. Oracle: the packed batch run through every layer (itself tested against the plain
layout in test_packing.py)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from minisdpo import data as D
from minisdpo import ops
from minisdpo.batches import build_batch, packed_batch
from minisdpo.evaluate import ranking_scores
from minisdpo.lora import apply_lora, mark_only_lora_as_trainable, top_layers
from minisdpo.model import Llama, ModelArgs
from minisdpo.prefix import PrefixCache
from minisdpo.step import RefCache, StageLoss
from minisdpo.config import build_parser
from minisdpo.trainer import Env, StageData, validation_loss

from conftest import TOK, random_negatives, random_rows

N_LAYERS, TOP = 3, 1
BOUNDARY = N_LAYERS - TOP
# Relative error of a tensor as a whole: float32 sums the same terms in another order; bfloat16
# rounds each op to 8 bits (2^-8 = 0.004), a few of which add up.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


def lora_model(dtype: torch.dtype, seed: int = 0) -> Llama:
    """A tiny GQA Llama with a non-zero LoRA adapter on its top layer (policy != reference)."""
    torch.manual_seed(seed)
    model = Llama(ModelArgs(vocab_size=TOK.vocab_size, dim=64, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2,
                            intermediate_size=128)).to(dtype)
    apply_lora(model, r=4, alpha=8.0, layers=top_layers(N_LAYERS, TOP))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def rows():
    return random_rows(6, seed=3, n_cands=20)


def lora_grads(model: Llama) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def loss_and_grads(model: Llama, batch, k: int):
    model.zero_grad(set_to_none=True)
    objective = StageLoss(model, ops, negatives=k)
    ref = objective.reference(batch) if k else None
    loss, logps = objective(batch, ref_logps=ref)
    loss.backward()
    return loss.detach(), logps, ref, lora_grads(model)


# ------------------------------------------------------------------------------ the split model

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_two_halves_are_the_whole_forward_bit_for_bit(rows, dtype):
    model = lora_model(dtype)
    b = build_batch(TOK, rows, random_negatives(rows, 3, seed=1), 512, domain="music")
    with torch.no_grad():
        whole = model(b.input_ids, position_ids=b.position_ids, mask=b.mask)
        for layer in range(N_LAYERS + 1):
            h = model(b.input_ids, position_ids=b.position_ids, mask=b.mask, stop_layer=layer)
            assert h.shape == (*b.input_ids.shape, 64)
            top = (model(b.input_ids, position_ids=b.position_ids, mask=b.mask, first_layer=layer, hidden=h)
                   if layer else model(b.input_ids, position_ids=b.position_ids, mask=b.mask))
            assert torch.equal(top, whole), f"split at layer {layer}"


def test_split_forward_errors(rows):
    model = lora_model(torch.float32)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="stop_layer must be an int in"):
        model(ids, stop_layer=N_LAYERS + 1)
    with pytest.raises(ValueError, match="first_layer must be an int in"):
        model(ids, first_layer=-1, hidden=torch.zeros(1, 5, 64))
    with pytest.raises(ValueError, match="hidden .* is given exactly when"):
        model(ids, first_layer=1)
    with pytest.raises(ValueError, match="hidden .* is given exactly when"):
        model(ids, hidden=torch.zeros(1, 5, 64))
    with pytest.raises(ValueError, match=r"hidden must have shape \(1, 5, 64\)"):
        model(ids, first_layer=1, hidden=torch.zeros(1, 4, 64))


# ------------------------------------------------------------------------------ cached = uncached

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 3, 19])
def test_cached_loss_logps_and_lora_gradients_equal_the_whole_model(rows, dtype, k):
    """k = 0 is SFT (the target's segment only); k >= 1 S-DPO with the fused linear head, up to
    all 19 non-target candidates."""
    model = lora_model(dtype)
    cache = PrefixCache.build(model, TOK, rows, "music", 512, BOUNDARY, batch_size=4, progress=False)
    assert cache.hidden.dtype == dtype and cache.layer == BOUNDARY
    negs = random_negatives(rows, k, seed=k) if k else None
    ids = [4, 0, 2, 5]                                   # any rows, any order
    part = [rows[i] for i in ids]
    part_negs = [negs[i] for i in ids] if negs else None
    cached = cache.batch(ids, [[r.target, *n] for r, n in zip(part, part_negs)] if k else [[r.target] for r in part])
    assert cached.boundary.shape == (*cached.input_ids.shape, 64) and cached.boundary_layer == BOUNDARY
    whole = build_batch(TOK, part, part_negs, 512, domain="music")
    for name in ("input_ids", "position_ids", "mask", "index", "labels"):
        assert torch.equal(getattr(cached, name), getattr(whole, name)), name
    got, want = loss_and_grads(model, cached, k), loss_and_grads(model, whole, k)
    for what, a, b in zip(("loss", "logps", "ref_logps", "LoRA gradients"), got, want):
        if a is not None:
            assert rel_err(a, b) <= TOL[dtype], f"{what}: relative error {rel_err(a, b):.2e}"
    assert want[-1].norm() > 0                          # the gradient is not trivially zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_ranking_scores_equal_the_whole_model(rows, dtype):
    model = lora_model(dtype)
    cache = PrefixCache.build(model, TOK, rows, "music", 512, BOUNDARY, progress=False)
    got = ranking_scores(model, TOK, rows, "music", batch_size=4, progress=False, prefix=cache)
    want = ranking_scores(model, TOK, rows, "music", batch_size=4, progress=False)
    assert got.shape == (6, 20) and rel_err(got, want) <= TOL[dtype]
    with pytest.raises(ValueError, match="exactly these rows"):
        ranking_scores(model, TOK, rows[:3], "music", progress=False, prefix=cache)


@pytest.mark.parametrize("k", [0, 3])
def test_validation_loss_with_and_without_the_cache(rows, k):
    """The trainer's validation: S-DPO's reference log-probs come from one pass over all of a
    row's candidates (RefCache), SFT's loss from the target's segment."""
    model = lora_model(torch.float32)
    cache = PrefixCache.build(model, TOK, rows, "music", 512, BOUNDARY, progress=False)
    plain = StageData(TOK, "music", rows, rows)
    cached = dataclasses.replace(plain, train_prefix=cache, val_prefix=cache)
    cfg = build_parser().parse_args(["--batch-size", "4"])
    refs = [RefCache() if k else None for _ in range(2)]
    want = validation_loss(StageLoss(model, ops, negatives=k), cfg, plain, Env(), refs[0])
    got = validation_loss(StageLoss(model, ops, negatives=k), cfg, cached, Env(), refs[1])
    assert math.isfinite(want) and got == pytest.approx(want, rel=1e-5)
    if k:   # every candidate of every row, not only the validation groups' 1 + K
        assert len(refs[1]) == 6 * 20 and len(refs[0]) == 6 * (1 + k)


# ------------------------------------------------------------------------------ the cache file

def test_cache_file_is_reused_only_for_the_same_rows_and_source(rows, tmp_path):
    model = lora_model(torch.bfloat16)
    path = tmp_path / "cache" / "train-layer2"
    first = PrefixCache.build(model, TOK, rows, "music", 512, BOUNDARY, path=path, source="base", progress=False)
    assert not first.reused and (path / "meta.json").exists()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokens"] * 64 * 2 == (path / "hidden.bin").stat().st_size == first.nbytes
    again = PrefixCache.build(model, TOK, rows, "music", 512, BOUNDARY, path=path, source="base", progress=False)
    assert again.reused and torch.equal(again.hidden, first.hidden) and torch.equal(again.ids, first.ids)
    for name, kw in (("source", dict(source="sft")), ("rows", dict(rows=rows[:5])), ("max_len", dict(max_len=400))):
        args = dict(rows=rows, max_len=512, source="base") | kw
        other = PrefixCache.build(model, TOK, args["rows"], "music", args["max_len"], BOUNDARY, path=path,
                                  source=args["source"], progress=False)
        assert not other.reused, name
    # An interrupted build (no meta.json, written last) is built again.
    (path / "meta.json").unlink()
    assert not PrefixCache.build(model, TOK, rows[:5], "music", 512, BOUNDARY, path=path, progress=False).reused


def test_cache_errors(rows):
    model = lora_model(torch.float32)
    with pytest.raises(ValueError, match=r"layer must be an int in \[1, 3\]"):
        PrefixCache.build(model, TOK, rows, "music", 512, 0, progress=False)
    with pytest.raises(ValueError, match="rows is empty"):
        PrefixCache.build(model, TOK, [], "music", 512, 1, progress=False)
    cache = PrefixCache.build(model, TOK, rows, "music", 512, 1, progress=False)
    with pytest.raises(ValueError, match="not a candidate of row 0"):
        cache.batch([0], [["no such title"]])
    with pytest.raises(ValueError, match="2 lists for 1 rows"):
        cache.batch([0], [[rows[0].target], [rows[0].target]])


def test_batches_from_the_cached_ids_are_packed_batch_s(rows):
    """The cache builds its batches from the token ids it keeps, without the tokenizer: the same
    tensors as packed_batch from the rows' text, for any responses in any order."""
    model = lora_model(torch.float32)
    cache = PrefixCache.build(model, TOK, rows, "music", 512, 1, progress=False)
    ids = [3, 0, 5]
    responses = [[rows[i].target, *[c for c in rows[i].candidates if c != rows[i].target][:k]]
                 for i, k in zip(ids, (0, 3, 1))]
    responses[1] = responses[1][::-1]
    want = packed_batch(TOK, [rows[i] for i in ids], responses, 512, domain="music")
    got = cache.batch(ids, responses)
    for name in ("input_ids", "position_ids", "mask", "index", "labels"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.num_tokens == want.num_tokens


# ------------------------------------------------------------------------------ a real checkpoint

@pytest.mark.slow
def test_smollm2_cached_equals_uncached(smollm2_dir):
    """SmolLM2-135M (30 layers), LoRA on the top 4, MovieLens rows: S-DPO at K = 3 and 19 and the
    ranking of all 20 candidates. float32: the cache equals the whole model to 1e-5. bfloat16:
    both paths round differently, and the S-DPO loss and gradients, built from small differences
    of log-probs, carry that rounding far (here about 10% of the loss, 100% of the gradients,
    against float32): there the cached bfloat16 log-probs must equal the uncached ones to
    bfloat16's tolerance, and the loss and gradients must be about as far from the float32
    truth as the uncached bfloat16 ones (at most 4x + 0.02; a wrong boundary is off by 100%)."""
    from minisdpo.checkpoint import from_pretrained
    from minisdpo.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(str(smollm2_dir))
    rows = D.load_dataset("movielens")["train"][:3]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = from_pretrained(str(smollm2_dir), dtype=dtype)
        apply_lora(model, r=8, alpha=32.0, layers=top_layers(30, 4))
        mark_only_lora_as_trainable(model)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.01)
        model.eval()
        cache = PrefixCache.build(model, tok, rows, "movies", 512, 26, progress=False)
        for k in (3, 19):
            negs = random_negatives(rows, k, seed=k)
            cached = cache.batch([0, 1, 2], [[r.target, *n] for r, n in zip(rows, negs)])
            whole = build_batch(tok, rows, negs, 512, domain="movies")
            results[dtype, k] = loss_and_grads(model, cached, k), loss_and_grads(model, whole, k)
        results[dtype, "rank"] = (
            (ranking_scores(model, tok, rows, "movies", progress=False, prefix=cache),),
            (ranking_scores(model, tok, rows, "movies", progress=False),))
    names = ("loss", "logps", "ref_logps", "LoRA gradients")
    for key in (3, 19, "rank"):
        (c32, w32), (c16, w16) = results[torch.float32, key], results[torch.bfloat16, key]
        for what, a, b, a16, b16 in zip(names, c32, w32, c16, w16):
            assert rel_err(a, b) <= TOL[torch.float32], f"{key} {what}: float32 relative error {rel_err(a, b):.2e}"
            if what in ("logps", "ref_logps") or key == "rank":   # what the cache itself changes
                assert rel_err(a16, b16) <= TOL[torch.bfloat16], f"{key} {what}: {rel_err(a16, b16):.2e}"
            else:   # built from small differences of those: rounding dominates either path
                far, usual = rel_err(a16, b), rel_err(b16, b)
                assert far <= 4 * usual + 0.02, f"{key} {what}: bfloat16 cached {far:.2e} vs uncached {usual:.2e}"
