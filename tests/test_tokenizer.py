"""minisdpo.tokenizer on a real Llama-2-layout SentencePiece model, and training a small one."""
import json
import os
import random
import sysconfig

import pytest
import torch

from minisdpo.tokenizer import Tokenizer, train_tokenizer

REAL_MODEL = os.path.join(sysconfig.get_paths()["purelib"], "mistral_common", "data", "tokenizer.model.v1")
needs_real = pytest.mark.skipif(not os.path.isfile(REAL_MODEL), reason="mistral-common's tokenizer.model.v1 absent")

TEXTS = ["Júpiter Maçã", "Ke$ha", "Sigur Rós - Hoppípolla", "Beyoncé & Jay-Z", "  two  spaces ",
         "日本語 🎸", "AC/DC: Back in Black (1980)", ""]


@pytest.fixture(scope="module")
def real():
    return Tokenizer(REAL_MODEL)


@needs_real
def test_real_model_layout(real):
    assert real.vocab_size == 32000
    assert (real.bos_id, real.eos_id) == (1, 2)
    assert real.pad_id == 0  # no pad piece: the documented unk fallback
    assert [real.sp.IdToPiece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


@needs_real
@pytest.mark.parametrize("text", TEXTS)
def test_real_model_round_trip(real, text):
    ids = real.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert real.encode(text) == ids[1:-1]
    # SentencePiece drops the one space it prefixes; Llama's tokenizer decodes the same way.
    assert real.decode(ids) == text
    assert real.decode(torch.tensor(ids)) == text


@needs_real
def test_real_model_pieces(real):
    # Independent of the wrapper: the pieces a Llama-2 vocabulary is known to produce.
    assert [real.sp.IdToPiece(i) for i in real.encode("Hello world")] == ["▁Hello", "▁world"]
    # An emoji outside the vocabulary falls back to its UTF-8 bytes.
    pieces = [real.sp.IdToPiece(i) for i in real.encode("🎸")]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0xB8>"]
    assert real.sp.PieceToId("<0x00>") == 3


@needs_real
def test_save_and_from_dir(real, tmp_path):
    path = real.save(tmp_path)
    assert os.path.basename(path) == "tokenizer.model"
    again = Tokenizer.from_dir(tmp_path)
    assert all(again.encode(t) == real.encode(t) for t in TEXTS)


@needs_real
def test_bad_input(real, tmp_path):
    with pytest.raises(TypeError, match="text"):
        real.encode(b"bytes")
    with pytest.raises(ValueError, match="ids outside"):
        real.decode([5, 32000])
    with pytest.raises(ValueError, match="ids outside"):
        real.decode([-1])
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "nothing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


def corpus(n=10000, seed=0):
    rng = random.Random(seed)
    words = ("the of and rock band love song night Júpiter Maçã Ke$ha Mägo Oz Björk 2012 live remix "
             "feat blue city dream heart user listened next").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tokenizer(corpus(), 320, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_trained_layout(trained):
    assert trained.vocab_size == 320
    assert [trained.sp.IdToPiece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [trained.sp.IdToPiece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (1, 2, 0)
    assert len(trained.encode("rock band love song")) < len("rock band love song") / 2  # merges learned


@pytest.mark.parametrize("text", TEXTS + ["Qüéstion ¿unseen? Ωmega"])
def test_trained_round_trip_with_byte_fallback(trained, text):
    ids = trained.encode(text, bos=True, eos=True)
    assert 0 not in ids  # byte fallback: nothing is unknown
    assert trained.decode(ids) == text


def test_training_is_deterministic(trained, tmp_path):
    again = train_tokenizer(corpus(), 320, tmp_path / "again.model")
    assert again.sp.serialized_model_proto() == trained.sp.serialized_model_proto()


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus(100), 200, tmp_path / "t.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus(100), 100000, tmp_path / "t.model")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], 300, tmp_path / "t.model")


def test_whole_pieces_are_single_tokens(tmp_path):
    titles = ["The Usual Suspects", "Júpiter Maçã", "Ke$ha", "12 Angry Men", "Heat"]
    prompt = "This user has watched:\n{}\nAnswer:"
    texts = [prompt.format("\n".join(random.Random(i).sample(titles, 3))) for i in range(50)]
    tok = train_tokenizer(texts, 1000, tmp_path / "t.model", whole_pieces=titles)
    for title in titles:
        ids = tok.encode(title)
        assert [tok.sp.IdToPiece(i) for i in ids][-1] == title.replace(" ", "\u2581")
        assert tok.decode(ids) == title
    # In running text a title is one token too, and decoding gives the text back.
    text = prompt.format("Heat\nThe Usual Suspects")
    pieces = [tok.sp.IdToPiece(i) for i in tok.encode(text)]
    assert "The\u2581Usual\u2581Suspects" in pieces and "Heat" in pieces
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 262, tmp_path / "u.model", whole_pieces=titles)


# ----------------------------------------------------------------------- tokenizer.json + chat

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json with Llama-3-style special tokens and chat template,
    as a Hugging Face directory (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(2000), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("json_tok")
    tk.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
              "chat_template": LLAMA3_STYLE_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_json_tokenizer_interface(json_dir, tmp_path):
    tok = Tokenizer.from_dir(json_dir)
    assert tok.kind == "tokenizers"
    assert (tok.bos_id, tok.eos_id) == (0, 1)       # the special tokens, named by tokenizer_config.json
    assert tok.pad_id == tok.eos_id                 # no pad token: EOS pads (masked anyway)
    assert tok.vocab_size == len(json.loads((json_dir / "tokenizer.json").read_text())["model"]["vocab"])
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:-1] and 1 not in ids[1:-1]
        assert tok.decode(ids) == text               # byte-level: exact, specials skipped
    again = Tokenizer(tok.save(tmp_path))
    assert os.path.basename(again.path) == "tokenizer.json"
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)
    assert again.chat_template == tok.chat_template


def test_json_tokenizer_matches_transformers(json_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(json_dir)
    tok = Tokenizer.from_dir(json_dir)
    for text in TEXTS + corpus(50, seed=1):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Which song next?\nAnswer:"}]
    assert tok.render_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes BOS itself: prompt_ids adds no second one.
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tok.prompt_ids(messages[0]["content"]) == list(want)
    assert tok.prompt_ids("x")[0] == tok.bos_id and tok.prompt_ids("x").count(tok.bos_id) == 1


def test_chat_template_off_and_errors(json_dir, tmp_path):
    plain = Tokenizer.from_dir(json_dir, chat_template=False)
    assert plain.chat_template is None
    assert plain.prompt_ids("rock band") == [plain.bos_id] + plain.encode("rock band")
    with pytest.raises(ValueError, match="no chat template"):
        plain.render_chat([{"role": "user", "content": "x"}])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((json_dir / "tokenizer.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_a_token|>"}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        Tokenizer.from_dir(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer.model or tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "empty")


def test_smollm2_prompts_equal_transformers_chat_template(smollm2_dir):
    """The real instruct tokenizer: prompts rendered and tokenised exactly as transformers does."""
    transformers = pytest.importorskip("transformers")
    from minisdpo import data as D
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tok = Tokenizer.from_dir(smollm2_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    rows = D.load_dataset("movielens")["test"][:20]
    for row in rows:
        text = D.format_prompt(row, "movies")
        messages = [{"role": "user", "content": text}]
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert D.encode_prompt(tok, row, "movies") == list(want)
        assert tok.decode(D.encode_response(tok, row.target)) == row.target   # EOS = <|im_end|> skipped
    for title in ("Júpiter Maçã", "Sigur Rós", "Amélie (2001)", "日本語 🎸"):
        assert tok.decode(tok.encode(title)) == title
