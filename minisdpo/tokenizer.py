"""Tokenizers of real checkpoints behind one interface, chat templates, and training a small one.

Two formats, as Hugging Face checkpoint directories ship them:

- ``tokenizer.model``: SentencePiece (Kudo & Richardson, 2018), as Llama, Llama 2 and Mistral
  use: BPE with byte fallback, ids unk 0, bos 1, eos 2, a space prefix before the first word.
- ``tokenizer.json``: the ``tokenizers`` library's file, as Llama 3, SmolLM and most newer
  models use (byte-level BPE). Its special tokens are named in ``tokenizer_config.json``
  beside it (``bos_token``, ``eos_token``, ``pad_token``), as transformers reads them.

Both give the same interface: ``encode``/``decode``, ``bos_id``/``eos_id``/``pad_id`` and
``vocab_size``. ``encode`` never adds special tokens by itself (a ``tokenizer.json``
post-processor that would add BOS is not run): callers decide, so a prompt gets exactly one
BOS whatever the format.

Instruct models are trained on their chat template (a Jinja template in
``tokenizer_config.json``); ``render_chat`` renders it as transformers does (a sandboxed
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` and the
special tokens in scope), and ``prompt_ids`` is the one rule that turns an instruction into
the ids a model reads: the rendered template with the assistant's turn opened when the
tokenizer has a template, else ``[BOS] + encode(text)``.

Llama has no padding token. ``pad_id`` is the model's own pad token when it has one, otherwise
the unk id (SentencePiece) or EOS (``tokenizer.json``): padded positions are masked out of
attention and of the loss, so any id works.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable, Sequence

import sentencepiece as spm

__all__ = ["Tokenizer", "train_tokenizer"]

MODEL_NAME = "tokenizer.model"
JSON_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A SentencePiece ``tokenizer.model`` or a ``tokenizers`` ``tokenizer.json``.

    ``chat_template=False`` ignores the checkpoint's chat template (prompts are then plain text
    after BOS); with ``True`` the template of ``tokenizer_config.json`` is used when there is one.
    """

    def __init__(self, path: str | os.PathLike, chat_template: bool = True):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path!r}")
        self.path = path
        config_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
        self.config: dict[str, Any] = {}
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    self.config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path!r} is not valid JSON: {e}") from None
        if path.endswith(".json"):
            self._init_json(path)
        else:
            self._init_sentencepiece(path)
        template = self.config.get("chat_template")
        jinja_path = os.path.join(os.path.dirname(path), CHAT_TEMPLATE_NAME)
        if template is None and os.path.isfile(jinja_path):  # transformers 5 writes it apart
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        template = template if chat_template else None
        if isinstance(template, list):  # several named templates: transformers uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self._compiled_template = None

    def _init_sentencepiece(self, path: str) -> None:
        self.kind = "sentencepiece"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def _init_json(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.kind = "tokenizers"
        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise ValueError(f"{path!r} is not a tokenizers file: {e}") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

        def special(name: str) -> int | None:
            text = _token_text(self.config.get(name))
            if text is None:
                return None
            i = self.tk.token_to_id(text)
            if i is None:
                raise ValueError(f"{name} {text!r} of {CONFIG_NAME} is not in the vocabulary of {path!r}")
            return i

        self.bos_id, self.eos_id, pad = special("bos_token"), special("eos_token"), special("pad_token")
        if self.eos_id is None:
            raise ValueError(f"no eos_token in {CONFIG_NAME} beside {path!r}: answers could not end")
        self.pad_id = pad if pad is not None else self.eos_id

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike, chat_template: bool = True) -> "Tokenizer":
        """The tokenizer of a Hugging Face checkpoint directory: ``tokenizer.model`` when there is
        one (the SentencePiece original), else ``tokenizer.json``."""
        d = os.fspath(checkpoint_dir)
        for name in (MODEL_NAME, JSON_NAME):
            if os.path.isfile(os.path.join(d, name)):
                return cls(os.path.join(d, name), chat_template=chat_template)
        raise FileNotFoundError(f"no {MODEL_NAME} or {JSON_NAME} in {d!r}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if bos and self.bos_id is None:
            raise ValueError(f"{self.path!r} has no BOS token")
        if self.kind == "sentencepiece":
            ids = self.sp.EncodeAsIds(text)
        else:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor); special tokens such as BOS/EOS decode to nothing."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids outside [0, {self.vocab_size}): {bad[:5]}")
        if self.kind == "sentencepiece":
            return self.sp.DecodeIds(ids)
        return self.tk.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template rendered for ``messages`` ([{"role", "content"}, ...])."""
        if self.chat_template is None:
            raise ValueError(f"the tokenizer at {self.path!r} has no chat template")
        if self._compiled_template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
            self._compiled_template = env.from_string(self.chat_template)
        tokens = {name: _token_text(self.config.get(name)) or ""
                  for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return self._compiled_template.render(messages=list(messages),
                                              add_generation_prompt=add_generation_prompt, **tokens)

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a model reads for the instruction ``text``, its answer to follow: the chat
        template with the assistant's turn opened, or ``[BOS] + encode(text)`` without one
        (no BOS when the tokenizer has none). The template writes its own special tokens."""
        return self.prompt_pieces(text)[0]

    def prompt_pieces(self, text: str, sep: str | None = None) -> list[list[int]]:
        """``prompt_ids`` cut at every ``sep`` in ``text``: the ids of the pieces between the
        separators, each piece encoded on its own (BOS goes with the first), so that the
        caller can put ids of its own where the separators were. No ``sep``: one piece."""
        if self.chat_template is not None:
            rendered, bos = self.render_chat([{"role": "user", "content": text}]), False
        else:
            rendered, bos = text, self.bos_id is not None
        pieces = [rendered] if sep is None else rendered.split(sep)
        return [self.encode(piece, bos=bos and i == 0) for i, piece in enumerate(pieces)]

    def save(self, directory: str | os.PathLike) -> str:
        """Write the tokenizer file (and ``tokenizer_config.json`` when it has one) into
        ``directory``; returns the tokenizer file's path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MODEL_NAME if self.kind == "sentencepiece" else JSON_NAME)
        if self.kind == "sentencepiece":
            with open(path, "wb") as f:
                f.write(self.sp.serialized_model_proto())
        else:
            self.tk.save(path)
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if config:
            with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
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
