"""The tokenizer in a GGUF file's metadata, rebuilt as a Hugging Face ``tokenizer.json``.

llama.cpp keeps the tokenizer as metadata (``tokenizer.ggml.*``): tokens, token types, merges,
special token ids, and the name of the pre-tokenizer (``tokenizer.ggml.pre``). A byte-level BPE
(``tokenizer.ggml.model`` = "gpt2") is rebuilt with the ``tokenizers`` library, splitting text the
way llama.cpp does for that name (``_PRE_TOKENIZERS``); ``build_tokenizer`` also gives the
``tokenizer_config.json`` (special tokens, BOS/EOS flags, chat template). Used by
``minisdpo.convert``; problems are ``ConvertError``s naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFReader

from minisdpo.gguf_file import ConvertError, read_field, read_int_field

__all__ = ["build_tokenizer"]

# llama.cpp's token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

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


def build_tokenizer(reader: GGUFReader, path: str, max_len: int) -> tuple[Any, dict[str, Any]]:
    """(``tokenizers.Tokenizer``, tokenizer_config dict) from the ``tokenizer.ggml.*`` metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = read_field(reader, "tokenizer.ggml.model", path)
    if kind == "llama":
        raise ConvertError(f"{path}: tokenizer.ggml.model 'llama' (a SentencePiece vocabulary) is not "
                           f"supported yet; convert the weights alone with --no-tokenizer")
    if kind != "gpt2":
        raise ConvertError(f"{path}: tokenizer.ggml.model {kind!r} is not supported: only 'gpt2' "
                           f"(byte-level BPE)")
    pre_name = read_field(reader, "tokenizer.ggml.pre", path, "default")   # llama.cpp's fallback too
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ConvertError(f"{path}: tokenizer.ggml.pre {pre_name!r} is not supported; known: "
                           f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    tokens = list(read_field(reader, "tokenizer.ggml.tokens", path))
    types = list(read_field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens)))
    merges = []
    for m in read_field(reader, "tokenizer.ggml.merges", path):
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

    special = {name: _token_at(tokens, read_int_field(reader, f"tokenizer.ggml.{key}", path, None), key, path)
               for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                 ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))}
    add_bos = bool(read_field(reader, "tokenizer.ggml.add_bos_token", path, pre.add_bos))
    add_eos = bool(read_field(reader, "tokenizer.ggml.add_eos_token", path, False))
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
    template = read_field(reader, "tokenizer.chat_template", path, None)
    if template is not None:
        config["chat_template"] = template
    return tokenizer, config
