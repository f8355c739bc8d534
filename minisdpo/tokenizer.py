"""A thin SentencePiece tokenizer, as Llama and Llama 2 use, and training one for a small corpus.

Follows the Llama-2 ``tokenizer.model`` layout (Touvron et al., 2023; Kudo & Richardson,
"SentencePiece", 2018): BPE with byte fallback, so any UTF-8 text encodes without <unk>; ids
unk 0, bos 1, eos 2; a space prefix before the first word; no text normalisation.

Llama has no padding token. ``pad_id`` is the model's own pad piece when it has one, otherwise
the unk id (0), as Llama fine-tuning code commonly does: padded positions are masked out of
attention and of the loss, so any id works, and 0 never collides with EOS (which ends answers).
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

__all__ = ["Tokenizer", "train_tokenizer"]

MODEL_NAME = "tokenizer.model"


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SentencePiece model at {path!r}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from None
        self.path = path

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> "Tokenizer":
        """The ``tokenizer.model`` of a Hugging Face checkpoint directory."""
        return cls(os.path.join(os.fspath(checkpoint_dir), MODEL_NAME))

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor); control tokens such as BOS/EOS decode to nothing."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids outside [0, {self.vocab_size}): {bad[:5]}")
        return self.sp.DecodeIds(ids)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/tokenizer.model``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), MODEL_NAME)
        with open(path, "wb") as f:
            f.write(self.sp.serialized_model_proto())
        return path


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike,
                    whole_pieces: Sequence[str] = ()) -> Tokenizer:
    """Train a Llama-2-style BPE SentencePiece model on ``texts``, write it to ``path``, load it.

    Deterministic (one thread, no sampling of the input) and fast on some 10k short texts.
    vocab_size counts every piece: it must exceed the 259 reserved ones (unk, bos, eos and 256
    bytes) plus ``whole_pieces``, and be reachable from the corpus. ``whole_pieces`` are strings
    that each become one piece of their own (SentencePiece's user-defined symbols), such as the
    item titles of a catalogue, so that a small model copies a title as one token.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 259:
        raise ValueError(f"vocab_size must be an int above 259 (3 specials + 256 byte pieces), got {vocab_size!r}")
    whole_pieces = sorted(set(whole_pieces))
    if any(not isinstance(w, str) or not w for w in whole_pieces):
        raise ValueError("whole_pieces must be non-empty strings")
    if vocab_size <= 259 + len(whole_pieces):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces beside the 259 reserved "
                         f"ones and {len(whole_pieces)} whole_pieces")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts is empty: nothing to train a tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.99995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
            max_sentence_length=1 << 16, minloglevel=2,
            # SentencePiece matches its pieces with spaces written as the meta symbol U+2581.
            user_defined_symbols=[w.replace(" ", "\u2581") for w in whole_pieces],
            # Whole pieces leave little text to learn merges from: then vocab_size is a maximum.
            hard_vocab_limit=not whole_pieces,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {e}") from None
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(path)
