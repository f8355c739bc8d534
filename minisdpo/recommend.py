"""python -m minisdpo.recommend RUN_DIR: ask a recommender trained by ``minisdpo.train``.

For each user (a history of item titles, oldest first, and the candidate titles to choose from)
it prints the model's generated answer, the recommendation that answer makes under the paper's
rule (exactly one candidate title occurs in it, ``minisdpo.evaluate.named_candidate``; none
otherwise), and the candidates ranked by their summed log-probability logp(title + EOS | prompt),
the quantity S-DPO trains (``minisdpo.evaluate.ranking_scores``).

Everything that makes a prompt comes from the run, so the model reads exactly what it was
trained on: the prompt rule (``minisdpo.data.encode_prompt``, through ``generate_answers`` and
``ranking_scores``, the functions the evaluation uses), the domain, ``max_len`` and the chat
template setting of ``RUN_DIR/config.json``, and the tokenizer saved beside the SFT model.

Users come from ``--history ... --candidates ...`` (one user), or from ``--input FILE`` / standard
input: JSON lines (``{"history": [...], "candidates": [...]}`` per line) or a JSON array of such
objects; the S-DPO data sets' keys (``historyList``, a list or a "::"-joined string, and
``itemList``) work too, so a split file of a data set (``.json`` or ``.json.gz``) can be passed
as it is. Other keys (``trueSelection``, ...) are ignored: at inference there is no target.

Every input is checked before the model is loaded and nothing is written before every user has
been answered; ``--output`` is written to a temporary file and renamed, so an error or an
interruption never leaves half a file. Errors print one ``error: ...`` line and exit with 2.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minisdpo import data as D
from minisdpo.baselines import SASRecRecommender
from minisdpo.checkpoint import from_pretrained, load_config
from minisdpo.evaluate import generate_answers, named_candidate, ranking_scores
from minisdpo.items import PROJECTOR_FILE, ItemTokenizer, attach, load_projector, projector_layout
from minisdpo.lora import load_adapter
from minisdpo.tokenizer import Tokenizer
from minisdpo.run import STAGES, adapter_base, adapter_dir, default_dtype, sft_model_dir

# On equal metrics, the paper's method first.
_PREFERENCE = ("sdpo", "dpo", "sft")
_NAMES = {"sft": "SFT model", "sdpo": "S-DPO adapter", "dpo": "DPO adapter"}


class RecommendError(Exception):
    """A problem with the command line, the run directory or the input: reported in one line."""


@dataclass(frozen=True)
class Query:
    """One user at inference: the history (oldest first) and the candidates, no target.

    ``minisdpo.data.Row`` needs a target among the candidates (it is a training example);
    the prompt never shows the target, and ``generate_answers`` / ``ranking_scores`` read only
    these two fields, so a Query goes through exactly the code paths of a Row.
    """

    history: tuple[str, ...]
    candidates: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisdpo.recommend",
        description="Recommendations from a run of python -m minisdpo.train: for each user, the model's "
                    "generated answer, the candidate it names (the paper's rule: exactly one candidate "
                    "title occurs in the answer), and the candidates ranked by log-likelihood.",
        epilog="Input files: JSON lines, one {\"history\": [...], \"candidates\": [...]} per line, or a JSON "
               "array of them (.json or .json.gz); the data sets' keys historyList / itemList work too. "
               "Scores are summed log-probabilities of title + EOS given the prompt (higher is better).")
    a = p.add_argument
    a("run_dir", metavar="RUN_DIR", help="the --out directory of python -m minisdpo.train")
    a("--stage", choices=STAGES, default=None,
      help="which model answers: 'sft', or the 'sdpo' or 'dpo' adapter on the model it applies to (the SFT "
           "model, or the base model for an adapter trained with --sdpo-init sft-adapter) (default: the "
           "model with the highest hr@1 in RUN_DIR/summary.json, ties broken by valid_ratio, then "
           "sdpo > dpo > sft; without a summary: sdpo when trained, else sft)")
    a("--history", nargs="+", metavar="TITLE", help="one user's history, oldest first")
    a("--candidates", nargs="+", metavar="TITLE", help="the candidates for that user (any number >= 1)")
    a("--input", metavar="FILE", help="users from a file ('-': standard input, which is also read when "
                                      "--history is not given and standard input is not a terminal)")
    a("--top", type=int, default=None, metavar="N", help="list the N best candidates (default: all)")
    a("--json", action="store_true", help="one JSON object per user: {\"answer\", \"recommendation\" (a "
                                          "title or null), \"ranking\": [{\"title\", \"score\"}, ...]}")
    a("--output", metavar="FILE", help="write there (atomically) instead of standard output")
    a("--batch-size", type=int, default=8, help="users per batch, for generation and ranking (default: 8)")
    a("--max-new-tokens", type=int, default=20,
      help="longest generated answer in tokens (default: 20, as the paper)")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
      help="the model's dtype (default: the run's --dtype, else train's rule: bfloat16 on CUDA and, for "
           "a pretrained model, on CPUs with native bfloat16; float32 otherwise)")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------------------------
# Users

def _titles(value: Any, field: str, where: str) -> tuple[str, ...]:
    """A list of titles, each checked as ``Row`` checks them (a prompt lists one per line)."""
    if not isinstance(value, list):
        raise RecommendError(f"{where}: {field} must be a list of titles, got {type(value).__name__}")
    for i, title in enumerate(value):
        if not isinstance(title, str):
            raise RecommendError(f"{where}: {field}[{i}] must be a string, got {type(title).__name__} "
                                 f"({json.dumps(title)})")
        if not title.strip():
            raise RecommendError(f"{where}: {field}[{i}] is an empty title")
        if "\n" in title:
            raise RecommendError(f"{where}: {field}[{i}] {title!r} contains a newline (the prompt lists "
                                 f"one title per line)")
    return tuple(value)


def make_query(history: Any, candidates: Any, where: str, history_field: str = "history",
               candidates_field: str = "candidates") -> Query:
    history = _titles(history, history_field, where)
    candidates = _titles(candidates, candidates_field, where)
    if not history:
        raise RecommendError(f"{where}: {history_field} is empty")
    if not candidates:
        raise RecommendError(f"{where}: {candidates_field} is empty")
    seen = set()
    for title in candidates:
        if title in seen:
            raise RecommendError(f"{where}: candidate {title!r} is repeated in {candidates_field}")
        seen.add(title)
    return Query(history, candidates)


def parse_record(record: Any, where: str) -> Query:
    """One user from a JSON object: history/candidates, or the data sets' historyList/itemList."""
    if not isinstance(record, dict):
        raise RecommendError(f"{where}: expected an object with \"history\" and \"candidates\", "
                             f"got {type(record).__name__}")
    keys = {}
    for field, alias in (("history", "historyList"), ("candidates", "itemList")):
        key = field if field in record else alias if alias in record else None
        if key is None:
            raise RecommendError(f"{where}: missing key {field!r} (or {alias!r})")
        keys[field] = key
    history = record[keys["history"]]
    if keys["history"] == "historyList" and isinstance(history, str):
        # the S-DPO files join the history with "::" (as minisdpo.data reads them)
        history = history.split("::") if history else []
    return make_query(history, record[keys["candidates"]], where, keys["history"], keys["candidates"])


def read_users(path: str, stdin=None) -> tuple[list[Query], list[str]]:
    """The users of a file ('-': standard input) and where each comes from, for messages."""
    if path == "-":
        name, text = "<stdin>", (stdin or sys.stdin).read()
    else:
        name = path
        if not os.path.isfile(path):
            raise RecommendError(f"--input {path}: no such file")
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise RecommendError(f"--input {path}: cannot read it ({e})") from None
    if not text.strip():
        raise RecommendError(f"{name}: no users (the input is empty)")
    queries, wheres = [], []
    if text.lstrip().startswith("["):          # one JSON array, as the data sets' files
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecommendError(f"{name}: not valid JSON ({e})") from None
        for i, record in enumerate(records):
            wheres.append(f"{name}: row {i}")
            queries.append(parse_record(record, wheres[-1]))
    else:                                      # JSON lines
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{name}: line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecommendError(f"{where}: not valid JSON ({e.msg}); expected one object per line "
                                     f"or a JSON array") from None
            wheres.append(where)
            queries.append(parse_record(record, where))
    if not queries:
        raise RecommendError(f"{name}: no users")
    return queries, wheres


def gather_users(args: argparse.Namespace, stdin=None) -> tuple[list[Query], list[str], bool]:
    """(users, where each comes from, whether they came from a file or standard input)."""
    stdin = stdin or sys.stdin
    if args.history is not None or args.candidates is not None:
        if args.input is not None:
            raise RecommendError("give either --input or --history/--candidates, not both")
        if args.history is None:
            raise RecommendError("--candidates needs --history (the user's history, oldest first)")
        if args.candidates is None:
            raise RecommendError("--history needs --candidates (the titles to choose from)")
        query = make_query(args.history, args.candidates, "command line", "--history", "--candidates")
        return [query], ["command line"], False
    path = args.input
    if path is None:
        if stdin.isatty():
            raise RecommendError("no users: give --history ... --candidates ..., --input FILE, "
                                 "or JSON lines on standard input")
        path = "-"
    queries, wheres = read_users(path, stdin)
    return queries, wheres, True


# --------------------------------------------------------------------------------------------
# The run

def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise RecommendError(f"RUN_DIR {run_dir}: no such directory")
    if not path.is_file():
        raise RecommendError(f"RUN_DIR {run_dir}: no config.json, not a run of python -m minisdpo.train")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecommendError(f"{path}: not valid JSON ({e})") from None


def trained_stages(run_dir: Path) -> list[str]:
    """The stages whose training finished (done.json, written last) and whose model is there."""
    found = []
    for stage in STAGES:
        artefact = sft_model_dir(run_dir) / "config.json" if stage == "sft" else \
            adapter_dir(run_dir, stage) / "adapter_config.json"
        if (run_dir / stage / "done.json").is_file() and artefact.is_file():
            found.append(stage)
    # An adapter sits on the SFT model: without it there is nothing to load.
    return found if "sft" in found else []


def choose_stage(run_dir: Path, requested: str | None) -> tuple[str, str]:
    """(stage, why it was chosen)."""
    trained = trained_stages(run_dir)
    if not trained:
        raise RecommendError(f"RUN_DIR {run_dir} has no trained model ({run_dir / 'sft' / 'done.json'} "
                             f"is missing): run python -m minisdpo.train --out {run_dir} first")
    if requested is not None:
        if requested not in trained:
            raise RecommendError(f"--stage {requested}: RUN_DIR {run_dir} has no trained {_NAMES[requested]} "
                                 f"({run_dir / requested / 'done.json'} is missing); it has: "
                                 f"{', '.join(trained)}")
        return requested, "--stage"
    try:
        models = json.loads((run_dir / "summary.json").read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        models = {}
    scored = [s for s in trained if isinstance(models.get(s), dict) and "hr@1" in models[s]]
    if scored:
        best = max(scored, key=lambda s: (models[s]["hr@1"], models[s].get("valid_ratio", 0.0),
                                          -_PREFERENCE.index(s)))
        m = models[best]
        return best, f"best in summary.json: hr@1 {m['hr@1']:.4f}, valid_ratio {m.get('valid_ratio', 0.0):.4f}"
    best = "sdpo" if "sdpo" in trained else "sft"
    return best, "no summary.json to choose by"


def run_domain(config: dict) -> str:
    if config.get("domain"):
        return config["domain"]
    return D.default_domain(config["data"])


def run_dtype(config: dict, flag: str | None, device: torch.device) -> torch.dtype:
    """The dtype the run's stages used: train.setup_env's rule, unless --dtype overrides it."""
    return default_dtype(flag or config.get("dtype"), device, config.get("model", "scratch"))


def load_run_tokenizer(run_dir: Path, config: dict) -> Tokenizer:
    # The run's --chat-template decides, not the file: with 'none' the saved tokenizer config
    # still carries the checkpoint's template, which training ignored.
    try:
        return Tokenizer.from_dir(sft_model_dir(run_dir),
                                  chat_template=config.get("chat_template", "auto") == "auto")
    except (OSError, ValueError) as e:
        raise RecommendError(f"RUN_DIR {run_dir}: cannot load the tokenizer ({e})") from None


def item_tokens(run_dir: Path, config: dict, stage: str) -> tuple[SASRecRecommender, Path, int, int, bool, bool] | None:
    """For a run trained with --item-tokens sasrec: its SASRec (RUN_DIR/sasrec) and the stage's
    projector file, with the layer and placeholder it was trained for; None for a run on titles
    only. A missing file is an error that names it."""
    if config.get("item_tokens", "none") == "none":
        return None
    rec = SASRecRecommender.load(run_dir / "sasrec")
    if rec is None:
        raise RecommendError(f"RUN_DIR {run_dir}: the run reads item tokens (--item-tokens "
                             f"{config['item_tokens']}), but its SASRec ({run_dir / 'sasrec'}) is missing")
    projector = run_dir / stage / PROJECTOR_FILE
    try:
        layer, placeholder, user, before = projector_layout(projector)
    except (OSError, ValueError) as e:
        raise RecommendError(f"RUN_DIR {run_dir}: the {_NAMES[stage]} reads item tokens: {e}") from None
    return rec, projector, layer, placeholder, user, before


def load_model(run_dir: Path, stage: str, dtype: torch.dtype, device: torch.device, items=None):
    # An adapter applies to the run's SFT model, or, when its stage continued the SFT adapter
    # (--sdpo-init sft-adapter), to the base model that stage recorded.
    base = sft_model_dir(run_dir) if stage == "sft" else adapter_base(run_dir, stage)
    if not (base / "config.json").is_file():
        raise RecommendError(f"RUN_DIR {run_dir}: the {_NAMES[stage]} applies to the model {base}, which is "
                             f"not there")
    try:
        model = from_pretrained(str(base), dtype=dtype, device=device)
        if items is not None:
            rec, projector, layer, placeholder, user, before = items
            attach(model, rec, layer, placeholder, user=user, before=before)
            load_projector(model, projector)
        if stage != "sft":
            load_adapter(model, str(adapter_dir(run_dir, stage)))   # LoRA weights on the model's device
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise RecommendError(f"RUN_DIR {run_dir}: cannot load the {_NAMES[stage]} ({e})") from None
    return model.eval()


def check_lengths(tok: Tokenizer, queries: Sequence[Query], wheres: Sequence[str], domain: str,
                  max_len: int, max_new_tokens: int) -> None:
    """Warn where a prompt must be cut to fit the run's context, as training cuts it (on the left,
    its first token kept: the instruction, then the oldest titles go first); fail where no cut
    makes room for a candidate's title."""
    if max_new_tokens + 2 > max_len:
        raise RecommendError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the run's "
                             f"context of {max_len} tokens")
    for query, where in zip(queries, wheres):
        responses = [len(D.encode_response(tok, c)) for c in query.candidates]
        longest = max(responses)
        if longest + 2 > max_len:
            title = query.candidates[responses.index(longest)]
            raise RecommendError(f"{where}: candidate {title!r} is {longest - 1} tokens long, too long for the "
                                 f"run's context of {max_len} tokens")
        prompt = len(D.encode_prompt(tok, query, domain))
        need = prompt + max(longest, max_new_tokens)
        if need > max_len:
            print(f"warning: {where}: the prompt ({prompt} tokens) and an answer do not fit the run's "
                  f"context of {max_len} tokens: its start is cut, as in training", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Answers and output

def recommend(model, tok: Tokenizer, queries: Sequence[Query], domain: str, max_len: int,
              batch_size: int = 8, max_new_tokens: int = 20, top: int | None = None,
              progress: bool = False) -> list[dict]:
    """For each query: {"answer", "recommendation" (a title or None), "ranking": [{"title", "score"}]},
    the ranking best first (stable: equal scores keep the candidates' order), its ``top`` first."""
    answers = generate_answers(model, tok, queries, domain, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, max_len=max_len, progress=progress)
    # ranking_scores scores a batch as one (N, C) tensor: one call per number of candidates.
    scores: list[list[float]] = [[] for _ in queries]
    by_count: dict[int, list[int]] = {}
    for i, query in enumerate(queries):
        by_count.setdefault(len(query.candidates), []).append(i)
    for idx in by_count.values():
        part = ranking_scores(model, tok, [queries[i] for i in idx], domain, batch_size=batch_size,
                              max_len=max_len, progress=progress)
        for i, row in zip(idx, part.tolist()):
            scores[i] = row
    results = []
    for query, answer, row in zip(queries, answers, scores):
        ranking = sorted(zip(query.candidates, row), key=lambda pair: -pair[1])
        results.append({"answer": answer, "recommendation": named_candidate(answer, query.candidates),
                        "ranking": [{"title": t, "score": s} for t, s in ranking[:top]]})
    return results


def format_table(results: Sequence[dict], wheres: Sequence[str] | None = None) -> str:
    """Per user: a heading (with where the user came from, when given), the answer in quotes,
    the recommendation, then the ranking with its log-probabilities."""
    blocks = []
    for n, res in enumerate(results, 1):
        rec = res["recommendation"]
        lines = [f"user {n}" + (f" ({wheres[n - 1]})" if wheres else ""),
                 f"  answer:         {json.dumps(res['answer'], ensure_ascii=False)}",
                 f"  recommendation: {rec if rec is not None else '-- (the answer names no single candidate)'}",
                 f"  {'rank':>4}  {'log-prob':>9}  title"]
        lines += [f"  {k:>4}  {item['score']:>9.3f}  {item['title']}" for k, item in enumerate(res["ranking"], 1)]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def format_json(results: Sequence[dict]) -> str:
    return "".join(json.dumps(res, ensure_ascii=False) + "\n" for res in results)


def check_output(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise RecommendError(f"--output {path}: is a directory")
    if not out.parent.is_dir():
        raise RecommendError(f"--output {path}: directory {out.parent} does not exist")
    return out


def write_atomic(path: Path, text: str) -> None:
    """A temporary file beside it, then a rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------

def run(argv: list[str] | None = None, stdin=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    for flag in ("top", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise RecommendError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    output = check_output(args.output) if args.output else None
    run_dir = Path(args.run_dir)
    config = read_config(run_dir)
    stage, why = choose_stage(run_dir, args.stage)
    queries, wheres, from_file = gather_users(args, stdin)
    try:
        domain, max_len = run_domain(config), int(config["max_len"])
    except (KeyError, ValueError, TypeError) as e:
        raise RecommendError(f"{run_dir / 'config.json'}: no usable domain or max_len ({e})") from None
    tok = load_run_tokenizer(run_dir, config)
    items = item_tokens(run_dir, config, stage)
    if items is not None:   # item token ids continue the SFT model's vocabulary
        tok = ItemTokenizer.of(tok, items[0], load_config(str(sft_model_dir(run_dir))).vocab_size, items[5])
    check_lengths(tok, queries, wheres, domain, max_len, args.max_new_tokens)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = run_dtype(config, args.dtype, device)
    print(f"recommend: {run_dir}, {_NAMES[stage]} ({why}), {len(queries)} user(s), domain {domain}, "
          f"{str(dtype).removeprefix('torch.')} on {device}", file=sys.stderr)
    model = load_model(run_dir, stage, dtype, device, items)
    results = recommend(model, tok, queries, domain, max_len, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, top=args.top,
                        progress=from_file and not args.no_progress)
    text = format_json(results) if args.json else format_table(results, wheres if from_file else None)
    if output is not None:
        write_atomic(output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return results


def main(argv: list[str] | None = None, stdin=None) -> list[dict]:
    """The command line; an error prints one ``error: ...`` line and exits with status 2."""
    try:
        return run(argv, stdin)
    except RecommendError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
