"""minisdpo.tokenizer on a real Llama-2-layout SentencePiece model, and training a small one."""
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
