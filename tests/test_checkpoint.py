"""Hugging Face directories <-> minisdpo: loading, saving, sharding, and errors that name the problem."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisdpo.checkpoint import CheckpointError, args_from_hf_config, from_pretrained, hf_config, save_pretrained
from minisdpo.model import Llama, ModelArgs

pytest.importorskip("hf_utils")
from hf_utils import CONFIGS, LLAMA3_SCALING, padded_batch, tiny_config, tiny_hf_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def hf_logits(hf, ids, mask):
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def load_hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_directory_loads_with_equal_logits(tmp_path, name):
    hf = tiny_hf_model(**CONFIGS[name], attn_implementation="eager")
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert not ours.training
    assert all(p.device.type == "cpu" for p in ours.parameters())
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, mask = padded_batch(hf.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    assert (got[real] - hf_logits(hf, ids, mask)[real]).abs().max() <= 1e-5
    assert from_pretrained(tmp_path).args == ours.args


@pytest.mark.parametrize("shard", [None, 20_000], ids=["single", "sharded"])
@pytest.mark.parametrize("name", ["mqa_tied", "llama3_rope"])
def test_our_save_loads_into_transformers(tmp_path, name, shard):
    ours = from_pretrained_hf(tmp_path, name)
    out = tmp_path / "ours"
    save_pretrained(ours, out, **({"max_shard_size": shard} if shard else {}))
    files = os.listdir(out)
    if shard:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert ("lm_head.weight" in index["weight_map"]) != ours.args.tie_word_embeddings
    else:
        assert "model.safetensors" in files
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["torch_dtype"]) == \
        (["LlamaForCausalLM"], "llama", "float32")
    hf = load_hf(out)
    ids, mask = padded_batch(ours.args.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        assert (ours(ids, attention_mask=mask)[real] - hf_logits(hf, ids, mask)[real]).abs().max() <= 1e-5
    # and back into ours, sharded or not
    again = from_pretrained(out)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def from_pretrained_hf(tmp_path, name):
    tiny_hf_model(**CONFIGS[name]).save_pretrained(tmp_path / "hf")
    return from_pretrained(tmp_path / "hf")


def test_dtype_and_save_in_bfloat16(tmp_path):
    ours = from_pretrained_hf(tmp_path, "gqa_untied")
    low = from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    save_pretrained(low, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    torch.testing.assert_close(back.lm_head.weight, ours.lm_head.weight.bfloat16().float())


def test_save_refuses_lora_tensors(tmp_path):
    from minisdpo.lora import apply_lora
    model = apply_lora(Llama(ModelArgs(vocab_size=32, dim=16, n_layers=1, n_heads=2, intermediate_size=32)), r=2)
    with pytest.raises(ValueError, match="LoRA"):
        save_pretrained(model, tmp_path)


# ---- errors that name the problem ----

@pytest.fixture
def saved(tmp_path):
    """A valid single-file checkpoint of the untied GQA model; returns its directory."""
    tiny_hf_model(**CONFIGS["gqa_untied"]).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_hf_config_round_trip_and_transformers4_layout():
    cfg = tiny_config(**CONFIGS["llama3_rope"], head_dim=32).to_dict()
    args = args_from_hf_config(cfg)
    assert (args.n_heads, args.n_kv_heads, args.head_dim, args.rope_theta) == (4, 4, 32, 500000.0)
    assert args.rope_scaling["rope_type"] == "llama3"
    assert args_from_hf_config(hf_config(args)) == args
    # transformers 4.x: rope_theta and rope_scaling at the top level, no rope_parameters
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    assert args_from_hf_config(old) == args


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["MistralForCausalLM"]), "architecture"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_configs_name_the_problem(change, message):
    cfg = tiny_config().to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        args_from_hf_config(cfg)


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(saved)


def test_missing_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(saved)


def test_missing_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(saved)


def test_unexpected_tensor(saved):
    rewrite_tensors(saved, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*q_proj\.bias"):
        from_pretrained(saved)


def test_shape_mismatch(saved):
    rewrite_tensors(saved, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*model\.norm\.weight"):
        from_pretrained(saved)


def test_untied_config_with_tied_file(saved):
    rewrite_tensors(saved, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        from_pretrained(saved)


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["Qwen2ForCausalLM"]), "unsupported architecture"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "unsupported rope type"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_config(saved, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=message):
        from_pretrained(saved)


def test_truncated_file(saved):
    file = saved / "model.safetensors"
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(saved)


def test_corrupt_header(saved):
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"not json {{{"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        from_pretrained(saved)


def test_missing_shard(tmp_path):
    ours = from_pretrained_hf(tmp_path, "gqa_untied")
    save_pretrained(ours, tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        from_pretrained(tmp_path / "sharded")


def test_bad_max_shard_size(tmp_path):
    ours = from_pretrained_hf(tmp_path, "gqa_untied")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(ours, tmp_path / "x", max_shard_size="lots")


# ---- memory ----

MEMORY_SCRIPT = r"""
import sys
from minisdpo.checkpoint import from_pretrained

def peak():  # the high-water mark of this process's resident set, in bytes
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

before = peak()
model = from_pretrained(sys.argv[1])
print(peak() - before)
"""
# The first load also pays one-time costs (about 65 MiB, mostly Python modules that the meta
# device imports): loading a tiny checkpoint first separates them from the per-byte cost.
WARM_SCRIPT = MEMORY_SCRIPT.replace("before = peak()", "from_pretrained(sys.argv[2])\nbefore = peak()")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_loading_peaks_below_1_2x_checkpoint_size(tmp_path):
    # About 420 MB in float32, in three shards. The peak is read from VmHWM, not ru_maxrss:
    # a child's ru_maxrss starts at its parent's peak (it survives exec), VmHWM does not.
    args = ModelArgs(vocab_size=32000, dim=768, n_layers=8, n_heads=12, intermediate_size=2048)
    torch.manual_seed(0)
    save_pretrained(Llama(args), tmp_path, max_shard_size="200MB")
    size = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    save_pretrained(Llama(ModelArgs(vocab_size=32, dim=16, n_layers=1, n_heads=2, intermediate_size=32)),
                    tmp_path / "tiny")

    def growth(script):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "tiny")],
                             capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.split()[-1])

    cold, warm = growth(MEMORY_SCRIPT), growth(WARM_SCRIPT)
    print(f"checkpoint {size / 1e6:.0f} MB; peak resident growth while loading: first load in a fresh "
          f"process {cold / 1e6:.0f} MB (ratio {cold / size:.3f}), after a warm-up {warm / 1e6:.0f} MB "
          f"(ratio {warm / size:.3f})")
    assert size > 4e8
    assert cold <= 1.2 * size
