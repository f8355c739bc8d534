"""Hugging Face Llama directories <-> ``minisdpo.model.Llama``.

A directory holds ``config.json`` and the weights as safetensors: one ``model.safetensors``, or
shards listed by ``model.safetensors.index.json`` (its ``weight_map`` names the shard of each
tensor). Tensor names are the model's own parameter names (docs/design.md section 4), so loading is
an identity copy; with tied embeddings the file has no ``lm_head.weight``. ``config.json`` is
mapped to ``ModelArgs`` and back here (``args_from_hf_config``, ``hf_config``, reading the
transformers 4.x and 5.x spellings of RoPE), for this module and ``minisdpo.convert`` alike.

Loading builds the model on the meta device and assigns each tensor as it is read
(``load_state_dict(..., assign=True)``), so a checkpoint is never held twice. Tensors are read
with plain ``readinto`` calls into their final buffers, following the safetensors format
(an 8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, then the
bytes): a memory map would count the whole file in the resident set on top of the copies.
Files are written with ``safetensors.torch.save_file``, which ``transformers`` reads.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import torch
from safetensors.torch import save_file

from minisdpo.model import Llama, ModelArgs

__all__ = ["from_pretrained", "save_pretrained", "load_config", "args_from_hf_config", "hf_config",
           "read_safetensors_header", "CheckpointError"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as it is."""


def args_from_hf_config(config: dict[str, Any]) -> ModelArgs:
    """ModelArgs from a Hugging Face Llama ``config.json`` dict (transformers 4.x or 5.x)."""
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        raise ValueError(f"unsupported architecture {architectures}: only LlamaForCausalLM")
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"unsupported model_type {config['model_type']!r}: only 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}: only 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag, False):
            raise ValueError(f"unsupported {flag}=True: this Llama has no biases")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in config:
            raise ValueError(f"config.json lacks {key!r}")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters; 4.x keeps them apart.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"unsupported rope type {rope_type!r}: only 'default' and 'llama3'")
    return ModelArgs(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        head_dim=config.get("head_dim"),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope if rope_type == "llama3" else None,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        max_seq_len=config.get("max_position_embeddings", 2048),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
    )


def hf_config(args: ModelArgs, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The inverse of ``args_from_hf_config``: a ``config.json`` dict for ``LlamaForCausalLM``
    (with ``torch_dtype`` when dtype is given)."""
    rope_parameters = {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": args.rope_theta}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        # Both spellings, so transformers 4.x and 5.x read the same RoPE.
        "rope_theta": args.rope_theta,
        "rope_scaling": dict(args.rope_scaling) if args.rope_scaling else None,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": args.tie_word_embeddings,
        "max_position_embeddings": args.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
    }
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def load_config(path: str) -> ModelArgs:
    """ModelArgs from ``path/config.json``."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"missing config: no {CONFIG_NAME} in {path!r}")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    return args_from_hf_config(config)


def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a safetensors file and the byte offset where its data begins.

    Checks that the header parses and that every tensor lies inside the file with the size its
    dtype and shape imply, so a truncated or corrupt file fails here, naming the file.
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"corrupt safetensors file {file}: {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"corrupt or truncated safetensors file {file}: header of {header_len} bytes "
                                  f"in a file of {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"corrupt safetensors file {file}: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {file}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {file}: bad header entry for tensor {name!r}: "
                                  f"{entry!r}") from None
        nbytes = dtype.itemsize * _numel(shape)
        if end - begin != nbytes:
            raise CheckpointError(f"corrupt safetensors file {file}: tensor {name!r} has {end - begin} bytes, "
                                  f"its dtype and shape {shape} need {nbytes}")
        if data_start + end > size:
            raise CheckpointError(f"truncated safetensors file {file}: tensor {name!r} ends at byte "
                                  f"{data_start + end}, the file has {size} bytes")
    return header, data_start


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_tensor(f, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(buf.numpy()) != end - begin:
        raise CheckpointError(f"truncated safetensors file {f.name}: short read")
    return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])   # little-endian, as the format is


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> file holding it."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"missing shard {os.path.basename(shard)} listed in {index}")
        return files
    if os.path.isfile(single):
        names, _ = read_safetensors_header(single)
        return {name: single for name in names}
    if any(os.path.isfile(os.path.join(path, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CheckpointError(f"{path!r} holds only PyTorch .bin weights; convert them to safetensors")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path!r}")


def from_pretrained(path: str, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Llama:
    """Load a Hugging Face Llama directory into a ``Llama`` in eval mode.

    dtype: the parameters' dtype (default: the checkpoint's own); device: where they live.
    Each tensor is read, converted and placed one at a time, so the peak is the model plus one
    tensor. Raises naming the problem: a missing config, an unsupported architecture or rope
    type, a missing or unexpected tensor, a shape mismatch, a truncated or corrupt file.
    """
    args = load_config(str(path))
    files = _weight_files(str(path))
    with torch.device("meta"):
        model = Llama(args)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is missing tensor(s): {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint {path!r} has unexpected tensor(s): {', '.join(unexpected)}")

    state: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        header, data_start = read_safetensors_header(file)
        with open(file, "rb") as f:
            for name in names:
                if name not in header:
                    raise CheckpointError(f"tensor {name!r} is not in {os.path.basename(file)}, "
                                          f"where the index puts it")
                if list(header[name]["shape"]) != list(expected[name]):
                    raise CheckpointError(f"shape mismatch for tensor {name!r}: checkpoint has "
                                          f"{header[name]['shape']}, the config implies {list(expected[name])}")
                t = _read_tensor(f, header[name], data_start)
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter with two
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be an int or like '5GB' / '500MiB', got {size!r}")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000  # Hugging Face: GB = 10^9, GiB = 2^30
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def save_pretrained(model: Llama, path: str, max_shard_size: int | str = "5GB") -> None:
    """Write ``model`` as a Hugging Face directory that ``LlamaForCausalLM.from_pretrained`` loads.

    Shards when the weights exceed max_shard_size (bytes, or a string such as "500MB").
    LoRA layers, if any, must be merged and removed first: only the base tensors are written.
    """
    limit = _parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    # Item tokens' projector (Llama.items) is no part of a Hugging Face checkpoint: minisdpo.items
    # saves it in a file of its own.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("items.")}
    lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if lora_keys:
        raise ValueError(f"the model has LoRA tensors ({lora_keys[0]}, ...): save them with "
                         f"lora.save_adapter, or merge and strip them before save_pretrained")
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"the model mixes dtypes {sorted(map(str, dtypes))}; cast it to one before saving")
    dtype = dtypes.pop()

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        shard_bytes += nbytes

    for stale in os.listdir(path):  # shards of an earlier save would confuse loaders
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config(model.args, dtype), f, indent=2)
