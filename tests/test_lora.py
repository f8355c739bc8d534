"""minisdpo.lora: layers, merging, disabling, and adapter files exchanged with Hugging Face PEFT."""
import json
import math
import warnings

import pytest
import torch

from minisdpo.checkpoint import from_pretrained
from minisdpo.lora import (LoRALinear, adapted_layers, apply_lora, disable_lora, load_adapter, load_lora_state_dict,
                           lora_state_dict, mark_only_lora_as_trainable, merge_lora, save_adapter, top_layers,
                           unmerge_lora)
from minisdpo.model import Llama, ModelArgs

pytest.importorskip("hf_utils")
peft = pytest.importorskip("peft")
from hf_utils import CONFIGS, padded_batch, tiny_hf_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def small_model(seed=0):
    torch.manual_seed(seed)
    return Llama(ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           intermediate_size=48)).eval()


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_layer_init_and_forward():
    base = torch.nn.Linear(12, 7)
    layer = LoRALinear(base, r=4, alpha=8.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.weight.shape == (4, 12) and layer.lora_B.weight.shape == (7, 4)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert 0 < layer.lora_A.weight.abs().max() <= bound
    assert layer.scaling == 2.0
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: starts as the base
    torch.nn.init.normal_(layer.lora_B.weight)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_apply_keeps_names_and_marks_trainable():
    model = small_model()
    names_before = set(model.state_dict())
    apply_lora(model, r=2, alpha=4, dropout=0.1, target_modules=TARGETS)
    assert not any(m.training for m in model.modules())  # an eval model stays in eval: no dropout
    names_after = set(model.state_dict())
    assert names_before <= names_after
    added = names_after - names_before
    assert len(added) == 2 * len(TARGETS) * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in added)
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == added
    assert set(lora_state_dict(model)) == added


def test_apply_errors():
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(small_model(), target_modules=["nope_proj"])
    with pytest.raises(TypeError, match="input_layernorm"):
        apply_lora(small_model(), target_modules=["input_layernorm"])
    model = apply_lora(small_model(), r=2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, r=2)
    with pytest.raises(ValueError, match="r must"):
        LoRALinear(torch.nn.Linear(3, 3), r=0, alpha=1)


def test_merge_unmerge_idempotent_and_equal():
    model = apply_lora(small_model(), r=4, alpha=8, target_modules=TARGETS)
    randomize_b(model)
    ids = torch.randint(0, 64, (2, 10))
    base_weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merge_lora(model)  # idempotent: merged once
        merged = model(ids)
        model.train()
        model.eval()      # train/eval leave the merge alone
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        again = model(ids)
        unmerge_lora(model)
        unmerge_lora(model)
        back = model(ids)
    assert (merged - unmerged).abs().max() <= 1e-5
    torch.testing.assert_close(again, merged)
    assert (back - unmerged).abs().max() <= 1e-5
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, base_weight, atol=1e-6, rtol=0)
    assert not torch.allclose(unmerged, small_model()(ids), atol=1e-3)  # the adapter does something


def test_disable_lora_is_the_base_model():
    model = apply_lora(small_model(), r=4, alpha=8)
    randomize_b(model)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        adapted = model(ids)
        with disable_lora(model) as ref:
            assert ref is model
            base = model(ids)
        after = model(ids)
    torch.testing.assert_close(base, small_model()(ids))
    torch.testing.assert_close(after, adapted)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_lora(model):
            pass


def test_gradients_reach_only_the_adapter():
    model = apply_lora(small_model(), r=2, alpha=4, dropout=0.1)
    mark_only_lora_as_trainable(model)
    model.train()
    model(torch.randint(0, 64, (2, 8))).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_half_precision_base_keeps_float32_adapter():
    model = small_model().to(torch.bfloat16)
    apply_lora(model, r=2)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert model(torch.randint(0, 64, (1, 5))).dtype == torch.bfloat16


def test_lora_state_dict_round_trip():
    a = apply_lora(small_model(), r=2)
    randomize_b(a)
    b = apply_lora(small_model(), r=2)
    load_lora_state_dict(b, lora_state_dict(a))
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(b, {})


# ---- PEFT interoperability ----

@pytest.fixture
def hf_dir(tmp_path):
    tiny_hf_model(**CONFIGS["gqa_untied"]).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def load_hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def compare(ours, theirs, vocab_size):
    ids, mask = padded_batch(vocab_size)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)[real]
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[real]
    return (got - expected).abs().max()


def test_our_adapter_loads_into_peft(hf_dir, tmp_path):
    ours = apply_lora(from_pretrained(hf_dir), r=4, alpha=16, dropout=0.05, target_modules=TARGETS)
    randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 16, "none")
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    theirs = peft.PeftModel.from_pretrained(load_hf(hf_dir), tmp_path / "adapter").eval()
    assert compare(ours, theirs, 96) <= 1e-5
    base = load_hf(hf_dir)
    assert compare(ours, base, 96) > 1e-2  # the adapter is not a no-op


def test_peft_adapter_loads_into_ours(hf_dir, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["k_proj", "o_proj", "up_proj", "gate_proj"])
    theirs = peft.get_peft_model(load_hf(hf_dir), config).eval()
    randomize_b(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(from_pretrained(hf_dir), tmp_path / "adapter")
    layer = ours.model.layers[1].mlp.up_proj
    assert isinstance(layer, LoRALinear) and (layer.r, layer.scaling) == (2, 3.0)
    assert compare(ours, theirs, 96) <= 1e-5
    merge_lora(ours)  # merged, it matches too
    assert compare(ours, theirs, 96) <= 1e-5


def test_top_layers_adapter_round_trips_with_peft(hf_dir, tmp_path):
    # LoRA on the top layer only: PEFT's layers_to_transform, both ways.
    ours = apply_lora(from_pretrained(hf_dir), r=4, alpha=16, target_modules=TARGETS, layers=top_layers(2, 1))
    assert adapted_layers(ours) == [1] and not isinstance(ours.model.layers[0].self_attn.q_proj, LoRALinear)
    randomize_b(ours)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    theirs = peft.PeftModel.from_pretrained(load_hf(hf_dir), tmp_path / "ours").eval()
    assert not any(".layers.0." in n for n, _ in theirs.named_parameters() if "lora_" in n)
    assert compare(ours, theirs, 96) <= 1e-5
    assert compare(ours, load_hf(hf_dir), 96) > 1e-2
    peft_config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"], task_type="CAUSAL_LM",
                                  layers_to_transform=[1])
    theirs = peft.get_peft_model(load_hf(hf_dir), peft_config).eval()
    randomize_b(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(from_pretrained(hf_dir), tmp_path / "theirs")
    assert adapted_layers(back) == [1]
    assert compare(back, theirs, 96) <= 1e-5
    # Every layer adapted: saved as None (PEFT's "all").
    save_adapter(apply_lora(from_pretrained(hf_dir), r=2, alpha=4, target_modules=TARGETS), tmp_path / "all")
    assert json.loads((tmp_path / "all" / "adapter_config.json").read_text())["layers_to_transform"] is None


def test_top_layers_errors():
    with pytest.raises(ValueError, match=r"layers \[5\] are not blocks"):
        apply_lora(small_model(), r=2, layers=[1, 5])
    with pytest.raises(ValueError, match="non-empty sequence"):
        apply_lora(small_model(), r=2, layers=[])
    with pytest.raises(ValueError, match=r"in \[1, 2\]"):
        top_layers(2, 3)
    assert top_layers(30, 4) == [26, 27, 28, 29] and top_layers(30, None) is None


def test_load_adapter_errors(hf_dir, tmp_path):
    ours = apply_lora(from_pretrained(hf_dir), r=4, alpha=8, target_modules=TARGETS)
    save_adapter(ours, tmp_path / "a")
    other_rank = apply_lora(from_pretrained(hf_dir), r=2, alpha=8, target_modules=TARGETS)
    with pytest.raises(ValueError, match="r=2"):
        load_adapter(other_rank, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(from_pretrained(hf_dir), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(from_pretrained(hf_dir), tmp_path / "nowhere")


def test_merge_and_unload_gives_plain_linears_with_equal_logits():
    from minisdpo.lora import merge_and_unload
    torch.manual_seed(0)
    model = Llama(ModelArgs(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64))
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter, so the merge matters
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids)
        merge_and_unload(model)
        got = model(ids)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(".lora_" not in n for n, _ in model.named_parameters())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_frozen_reference_is_the_adapter_as_it_was_and_takes_no_gradient():
    """freeze_reference keeps a copy of the adapter (not of the base): inside ``reference`` the
    model computes with that copy, without dropout, whatever the trained adapter became."""
    from minisdpo.lora import freeze_reference, has_frozen_reference, reference
    model = apply_lora(small_model(), r=4, alpha=8, dropout=0.5)
    randomize_b(model)
    mark_only_lora_as_trainable(model)
    ids = torch.randint(0, 64, (2, 10))
    model.eval()
    with torch.no_grad():
        start = model(ids)
        with reference(model):                        # no copy yet: the adapter disabled
            torch.testing.assert_close(model(ids), small_model()(ids), rtol=0, atol=0)
    assert not has_frozen_reference(model)
    base_before = {n: p.clone() for n, p in model.named_parameters() if ".lora_" not in n}
    freeze_reference(model)
    assert has_frozen_reference(model)
    assert set(lora_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}  # no copy saved
    randomize_b(model, seed=7)                        # the adapter trains on
    model.train()                                     # dropout 0.5 in the trained adapter's path
    trained = model(ids)
    with reference(model):
        ref = model(ids)                              # grad mode on: still nothing to differentiate
        again = model(ids)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, start, rtol=0, atol=0)    # exact, and no dropout
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    assert (trained - start).abs().max() > 1e-2
    trained.sum().backward()                          # the policy's graph is untouched by the reference pass
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_" in n)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if ".lora_" not in n)
    assert not any(m.use_reference for m in model.modules() if isinstance(m, LoRALinear))
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with reference(model):
            pass
