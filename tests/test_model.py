"""minisdpo.model.Llama against transformers' LlamaForCausalLM on tiny random configs."""
import copy

import pytest
import torch

from minisdpo.checkpoint import args_from_hf_config
from minisdpo.model import KVCache, Llama, ModelArgs, rope_inv_freq

hf_utils = pytest.importorskip("hf_utils")
from hf_utils import CONFIGS, padded_batch, tiny_hf_model  # noqa: E402


def ours_from_hf(hf) -> Llama:
    model = Llama(args_from_hf_config(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=not hf.config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, left):
    hf = tiny_hf_model(**CONFIGS[name], attn_implementation="eager")
    ours = ours_from_hf(hf)
    ids, mask = padded_batch(hf.config.vocab_size, left=left)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert expected.shape == got.shape == (2, 16, hf.config.vocab_size)
    assert expected[real].std() > 0.3  # not a trivially small comparison
    assert (got[real] - expected[real]).abs().max() <= 1e-5


def test_llama3_scaling_changes_frequencies():
    # Guards the case above against a config where the scaling would be a no-op.
    plain = ModelArgs(dim=64, n_heads=4, rope_theta=500000.0)
    scaled = ModelArgs(dim=64, n_heads=4, rope_theta=500000.0, rope_scaling=dict(hf_utils.LLAMA3_SCALING))
    ratio = rope_inv_freq(scaled) / rope_inv_freq(plain)
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / 8)
    assert 1 / 8 + 1e-3 < ratio[1] < 1 - 1e-3  # the smoothed band


def test_hidden_states_and_lm_head():
    model = ours_from_hf(tiny_hf_model())
    ids, mask = padded_batch(model.args.vocab_size)
    with torch.no_grad():
        h = model(ids, attention_mask=mask, return_hidden=True)
        assert h.shape == (2, 16, model.args.dim)
        torch.testing.assert_close(model.lm_head(h), model(ids, attention_mask=mask))


def test_generate_matches_transformers():
    hf = tiny_hf_model(**CONFIGS["gqa_untied"])
    ours = ours_from_hf(hf)
    ids, mask = padded_batch(hf.config.vocab_size, T=12, pad=4)
    free = ours.generate(ids, 10, eos_id=None, attention_mask=mask)
    assert free.shape == (2, 10)
    # An EOS that row 0 produces early and row 1 later or never: rows stop at different steps.
    eos = int(free[0, 3])
    got = ours.generate(ids, 10, eos_id=eos, attention_mask=mask)
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:]
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    first_eos = int((free[0] == eos).nonzero()[0])
    assert (got[0, first_eos:] == eos).all()


def test_kv_cache_decode_equals_full_forward():
    model = ours_from_hf(tiny_hf_model(**CONFIGS["mqa_tied"]))
    ids, mask = padded_batch(model.args.vocab_size, T=16, pad=3)
    prompt_len = 10
    with torch.no_grad():
        full = model(ids, attention_mask=mask)                                       # (2, 16, V)
        cache = KVCache(model.args, 2, 16, torch.float32, "cpu")
        steps = [model.prefill(ids[:, :prompt_len], mask[:, :prompt_len], cache)]
        position = mask[:, :prompt_len].sum(-1)
        for t in range(prompt_len, 15):
            steps.append(model.decode_step(ids[:, t], position, cache, t))
            position = position + 1
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt_len - 1:15], atol=5e-5, rtol=1e-5)


def test_block_mask_packed_equals_separate():
    model = ours_from_hf(tiny_hf_model(**CONFIGS["head_dim_odd_vocab"]))
    g = torch.Generator().manual_seed(3)
    prompt, r1, r2 = (torch.randint(3, 101, (n,), generator=g) for n in (7, 4, 6))
    P, T = len(prompt), len(prompt) + len(r1) + len(r2)
    segment = torch.tensor([0] * P + [1] * len(r1) + [2] * len(r2))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    # A token sees the prompt and its own segment, causally.
    mask = causal & ((segment[:, None] == segment[None, :]) | (segment[None, :] == 0))
    position_ids = torch.cat([torch.arange(P), P + torch.arange(len(r1)), P + torch.arange(len(r2))])
    with torch.no_grad():
        packed = model(torch.cat([prompt, r1, r2])[None], position_ids=position_ids, mask=mask)[0]
        one = model(torch.cat([prompt, r1])[None])[0]
        two = model(torch.cat([prompt, r2])[None])[0]
    torch.testing.assert_close(packed[:P + len(r1)], one, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[P + len(r1):], two[P:], atol=1e-5, rtol=0)
    # and the same mask batched (B, T, T) next to a plain causal row
    with torch.no_grad():
        batched = model(torch.cat([prompt, r1, r2])[None].repeat(2, 1), position_ids=position_ids,
                        mask=torch.stack([mask, causal]))
    torch.testing.assert_close(batched[0], packed, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[1, P + len(r1):], packed[P + len(r1):], atol=1e-3)


@pytest.mark.parametrize("masking", ["causal", "attention_mask", "mask_TT", "mask_BTT"])
@pytest.mark.parametrize("first_layer", [0, 1, 2])
def test_outputs_equal_the_full_forward_at_those_positions(masking, first_layer):
    """outputs=pos: the last layer computes those queries only; logits, hidden states and every
    gradient equal the full forward's at those positions (float32, 1e-5)."""
    model = ours_from_hf(tiny_hf_model(**CONFIGS["head_dim_odd_vocab"])).train()
    g = torch.Generator().manual_seed(5)
    B, T = 3, 12
    ids = torch.randint(3, 101, (B, T), generator=g)
    kwargs = {}
    if masking == "attention_mask":
        kwargs["attention_mask"] = torch.ones(B, T, dtype=torch.long)
        kwargs["attention_mask"][1, :4] = 0                                   # left padding
    elif masking != "causal":
        mask = torch.rand(T, T, generator=g) < 0.6
        kwargs["mask"] = mask if masking == "mask_TT" else torch.stack([mask, mask.tril(), mask.T])
    pos = torch.tensor([[0, 5, 5, 11], [3, 4, 9, 10], [11, 10, 2, 7]])     # any order, repeats allowed
    if first_layer:
        with torch.no_grad():
            kwargs["hidden"] = model(ids, stop_layer=first_layer, **kwargs)
        kwargs["hidden"].requires_grad_(True)
        kwargs["first_layer"] = first_layer
    w = torch.randn(B, 4, model.args.vocab_size, generator=g)
    grads = []
    for use_outputs in (False, True):
        model.zero_grad()
        if "hidden" in kwargs:
            kwargs["hidden"].grad = None
        out = model(ids, outputs=pos, **kwargs) if use_outputs else model(ids, **kwargs).gather(
            1, pos[..., None].expand(-1, -1, model.args.vocab_size))
        (out * w).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      None if "hidden" not in kwargs else kwargs["hidden"].grad.clone()))
    (full, g_full, h_full), (picked, g_picked, h_picked) = grads
    torch.testing.assert_close(picked, full, atol=1e-5, rtol=0)
    assert g_full.keys() == g_picked.keys() and len(g_full) > 0
    for name in g_full:     # relative to the gradient's largest entry (sums of many terms)
        scale = g_full[name].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(g_picked[name] / scale, g_full[name] / scale, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
    if h_full is not None:
        scale = h_full.abs().max()
        torch.testing.assert_close(h_picked / scale, h_full / scale, atol=1e-5, rtol=0)
    with torch.no_grad():     # the hidden states, before the LM head
        hid = model(ids, return_hidden=True, outputs=pos, **kwargs)
        torch.testing.assert_close(model.lm_head(hid), full, atol=1e-5, rtol=0)


def test_outputs_bad_input():
    model = Llama(ModelArgs(vocab_size=50, dim=32, n_layers=2, n_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="outputs must be a \\(B, Q\\)"):
        model(ids, outputs=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outputs must be"):
        model(ids, outputs=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="does not go with stop_layer"):
        model(ids, outputs=torch.zeros(2, 2, dtype=torch.long), stop_layer=1)


def test_bad_inputs_raise():
    model = Llama(ModelArgs(vocab_size=50, dim=32, n_layers=1, n_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(TypeError, match="mask"):
        model(ids, mask=torch.ones(6, 6))
    with pytest.raises(ValueError, match="mask"):
        model(ids, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5))
    holes = torch.ones(2, 6, dtype=torch.long)
    holes[1, 2] = 0
    with pytest.raises(ValueError, match="one run"):
        model.generate(ids, 3, eos_id=2, attention_mask=holes)
    with pytest.raises(ValueError, match="one run"):
        model.generate(ids, 3, eos_id=2, attention_mask=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=32, n_heads=4, n_kv_heads=3)


def test_bfloat16_keeps_float32_rope():
    model = Llama(ModelArgs(vocab_size=50, dim=32, n_layers=1, n_heads=2, intermediate_size=64,
                            rope_theta=500000.0)).eval()
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16 and model._inv_freq.dtype == torch.float32
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def _two_models_sharing_the_bottom(dtype: torch.dtype) -> tuple[Llama, Llama]:
    """A random 3-layer Llama and a copy with LoRA (far from zero) on its top layer only."""
    from minisdpo.lora import apply_lora
    torch.manual_seed(0)
    base = Llama(ModelArgs(vocab_size=90, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=128))
    tuned = copy.deepcopy(base)
    apply_lora(tuned, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers=[2])
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 3.0)
    return base.to(dtype).eval(), tuned.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_prefill_is_the_forward_pass(dtype, left):
    # A prefill attends over the keys it writes, in the model's dtype (a bfloat16 model on the CPU
    # keeps a float32 cache, Llama.cache_dtype): its logits are the forward pass's, bit for bit.
    model, _ = _two_models_sharing_the_bottom(dtype)
    ids, mask = padded_batch(model.args.vocab_size, T=12, pad=4, left=left)
    last = 11 - mask.flip(-1).argmax(-1, keepdim=True)                           # (2, 1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, outputs=last)[:, 0]
        cache = KVCache(model.args, 2, 12, model.cache_dtype(), "cpu")
        assert torch.equal(model.prefill(ids, mask, cache), full)
        # forward(..., cache=) writes the same keys and values and returns the same states.
        again = KVCache(model.args, 2, 12, model.cache_dtype(), "cpu")
        assert torch.equal(model(ids, attention_mask=mask, outputs=last, cache=again)[:, 0], full)
    for a, b in zip(cache.k + cache.v, again.k + again.v):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_continues_from_one_pass_of_shared_bottom_layers(dtype):
    # Layers 0..1 run once over right-padded prompts into a cache; each model then runs its top
    # layer and decodes from it, in turn on the same cache: the tokens of each model's own generate.
    base, tuned = _two_models_sharing_the_bottom(dtype)
    ids, mask = padded_batch(base.args.vocab_size, T=12, pad=4, left=False)
    with torch.no_grad():
        cache = KVCache(base.args, 2, 12 + 8, base.cache_dtype(), "cpu")
        states = base(ids, attention_mask=mask, stop_layer=2, cache=cache)          # (2, 12, dim)
        alone = [m.generate(ids, 8, eos_id=None, attention_mask=mask) for m in (base, tuned)]
        assert not torch.equal(alone[0], alone[1])                  # the top layer matters
        for m, expected in zip((base, tuned, base), alone + alone[:1]):
            got = m.generate(ids, 8, eos_id=None, attention_mask=mask, cache=cache, first_layer=2, hidden=states)
            assert torch.equal(got, expected)
    if dtype == torch.float32:   # right padding decodes as left padding does
        left_ids, left_mask = padded_batch(base.args.vocab_size, T=12, pad=4, left=True)
        left_ids[1, 4:] = ids[1, :8]
        assert torch.equal(tuned.generate(left_ids, 8, eos_id=None, attention_mask=left_mask), alone[1])


def test_generate_from_a_layer_bad_input():
    base, _ = _two_models_sharing_the_bottom(torch.float32)
    ids, mask = padded_batch(base.args.vocab_size, T=12, pad=4, left=False)
    cache = KVCache(base.args, 2, 12 + 8, torch.float32, "cpu")
    with torch.no_grad():
        states = base(ids, attention_mask=mask, stop_layer=2, cache=cache)
        with pytest.raises(ValueError, match="first_layer > 0 needs the cache"):
            base.generate(ids, 8, None, attention_mask=mask, first_layer=2, hidden=states)
        with pytest.raises(ValueError, match="hidden goes with first_layer"):
            base.generate(ids, 8, None, attention_mask=mask, cache=cache, hidden=states)
        with pytest.raises(ValueError, match="hidden goes with first_layer"):
            base.generate(ids, 8, None, attention_mask=mask, cache=cache, first_layer=2, hidden=states[:, :5])
        with pytest.raises(ValueError, match="first_layer must be"):
            base.generate(ids, 8, None, attention_mask=mask, cache=cache, first_layer=3, hidden=states)
        with pytest.raises(ValueError, match="at least T \\+ max_new_tokens = 21"):
            base.generate(ids, 9, None, attention_mask=mask, cache=cache, first_layer=2, hidden=states)
        with pytest.raises(ValueError, match="cache must hold 2 rows of at least 12 slots"):
            base(ids, stop_layer=2, cache=KVCache(base.args, 2, 11, torch.float32, "cpu"))
