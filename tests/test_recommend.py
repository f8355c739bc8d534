"""Tests of python -m minisdpo.recommend on a tiny run trained in seconds: both input forms and
both output forms, the ranking against the evaluator's scores for the same rows, the answers
against the evaluator's generation, the choice of the stage, and every error."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import toy_rows

from minisdpo import recommend as R
from minisdpo import train
from minisdpo.checkpoint import from_pretrained
from minisdpo.data import Row
from minisdpo.evaluate import evaluate_generation, judge, ranking_scores
from minisdpo.lora import load_adapter
from minisdpo.tokenizer import Tokenizer

TITLES = [f"Song {chr(65 + i // 10)}{i % 10}" for i in range(40)]
HISTORY = ["Song A1", "Song A2", "Song A3", "Song A4"]
CANDIDATES = ["Song A5", "Song C2", "Song D7", "Song B0", "Song B9"]


def _rows(n: int, seed: int) -> list[dict]:
    return toy_rows(n, seed, TITLES)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    data = tmp_path_factory.mktemp("data")
    for split, n in (("train", 16), ("val", 4), ("test", 2)):
        (data / f"toy-{split}.json").write_text(json.dumps(_rows(n, seed=len(split))))
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(["--data", "json", "--data-dir", str(data), "--domain", "music", "--out", str(out),
                "--model", "scratch", "--dim", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
                "--vocab-size", "300", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2",
                "--lora-r", "4", "--no-progress", "--no-plots", "--seed", "3"])
    return out


def _model(run: Path, stage: str = "sdpo"):
    model = from_pretrained(str(run / "sft" / "model"))
    if stage != "sft":
        load_adapter(model, str(run / stage / "adapter"))
    return model.eval(), Tokenizer.from_dir(run / "sft" / "model", chat_template=False)


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def _check_recommendation(res: dict, candidates: list[str]) -> None:
    """The recommendation is the candidate that judge() finds valid in the answer, or None."""
    rec = res["recommendation"]
    valid = [c for c in candidates if judge(res["answer"], candidates, c)[0]]
    assert (rec is None and not valid) or (valid and judge(res["answer"], candidates, rec) == (True, True))


def test_one_user_on_the_command_line(run_dir, capsys):
    results = R.main([str(run_dir), "--history", *HISTORY, "--candidates", *CANDIDATES, "--json"])
    out = _json_lines(capsys.readouterr().out)
    assert out == results and len(out) == 1
    res = out[0]
    assert set(res) == {"answer", "recommendation", "ranking"} and isinstance(res["answer"], str)
    assert sorted(r["title"] for r in res["ranking"]) == sorted(CANDIDATES)
    scores = [r["score"] for r in res["ranking"]]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    _check_recommendation(res, CANDIDATES)

    R.main([str(run_dir), "--history", *HISTORY, "--candidates", *CANDIDATES, "--top", "2"])
    table = capsys.readouterr().out
    assert "answer:" in table and "recommendation:" in table
    ranked = [line.split(None, 2)[2] for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert ranked == [r["title"] for r in res["ranking"][:2]]


def test_file_input_equals_the_evaluator(run_dir, tmp_path, capsys):
    """JSON lines with mixed candidate counts (and the data sets' keys), then the same users as a
    data set's JSON array on standard input: the ranking is the evaluator's ranking_scores of the
    same rows, sorted, and the answers are its generation's."""
    users = [{"history": HISTORY, "candidates": CANDIDATES},
             {"historyList": "Song B1::Song B2", "itemList": ["Song B3", "Song A0"], "trueSelection": "Song B3"},
             {"history": ["Song C1", "Song C2", "Song C3"], "candidates": CANDIDATES[::-1]},
             {"history": ["Song D1"], "candidates": ["Song D2"]}]
    path = tmp_path / "users.jsonl"
    path.write_text("\n".join(json.dumps(u) for u in users) + "\n\n")
    results = R.main([str(run_dir), "--input", str(path), "--json", "--stage", "sdpo", "--batch-size", "2"])
    assert _json_lines(capsys.readouterr().out) == results

    model, tok = _model(run_dir, "sdpo")
    config = json.loads((run_dir / "config.json").read_text())
    queries = [R.parse_record(u, "test") for u in users]
    for query, res in zip(queries, results):
        _check_recommendation(res, list(query.candidates))
        if len(query.candidates) == 1:  # Row needs two candidates; a lone one is ranked alone
            assert [r["title"] for r in res["ranking"]] == list(query.candidates)
            continue
        # The evaluator's rows need a target; the prompt does not show it, so any candidate serves.
        row = Row(query.history, query.candidates, query.candidates[0])
        scores = ranking_scores(model, tok, [row], "music", batch_size=1, max_len=config["max_len"],
                                progress=False)[0].tolist()
        expected = sorted(zip(query.candidates, scores), key=lambda p: -p[1])
        assert [r["title"] for r in res["ranking"]] == [t for t, _ in expected]
        assert [r["score"] for r in res["ranking"]] == pytest.approx([s for _, s in expected], abs=1e-4)
        gen = evaluate_generation(model, tok, [row], "music", max_len=config["max_len"], progress=False)
        assert gen["answers"] == [res["answer"]]

    # The data sets' format (a JSON array, trueSelection ignored) from standard input.
    array = json.dumps(_rows(2, seed=9))
    again = R.main([str(run_dir), "--json", "--top", "3"], stdin=io.StringIO(array))
    assert len(again) == 2 and all(len(r["ranking"]) == 3 for r in again)


def test_output_file_is_written_whole_or_not_at_all(run_dir, tmp_path, capsys):
    out = tmp_path / "recs.jsonl"
    R.main([str(run_dir), "--history", *HISTORY, "--candidates", *CANDIDATES, "--json", "--output", str(out)])
    assert capsys.readouterr().out == ""
    first = out.read_text()
    assert len(_json_lines(first)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"history": HISTORY, "candidates": CANDIDATES}) + "\n{not json\n")
    with pytest.raises(SystemExit):
        R.main([str(run_dir), "--input", str(bad), "--json", "--output", str(out)])
    assert out.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "recs.jsonl"]  # no temporary file


def test_long_history_is_cut_with_a_warning(run_dir, capsys):
    history = [TITLES[i % len(TITLES)] for i in range(400)]
    config = json.loads((run_dir / "config.json").read_text())
    (res,) = R.main([str(run_dir), "--history", *history, "--candidates", *CANDIDATES, "--json"])
    err = capsys.readouterr().err
    assert "warning: command line: the prompt" in err and f"context of {config['max_len']} tokens" in err
    model, tok = _model(run_dir, "sdpo")
    scores = ranking_scores(model, tok, [Row(tuple(history), tuple(CANDIDATES), CANDIDATES[0])], "music",
                            max_len=config["max_len"], progress=False)[0].tolist()
    assert [r["score"] for r in res["ranking"]] == pytest.approx(sorted(scores, reverse=True), abs=1e-4)


def test_stage_choice(run_dir, tmp_path):
    assert R.choose_stage(run_dir, None)[0] == "sdpo"      # equal metrics: S-DPO first
    assert R.choose_stage(run_dir, "sft") == ("sft", "--stage")
    fake = tmp_path / "fake"
    for stage in ("sft", "sdpo", "dpo"):
        (fake / stage).mkdir(parents=True)
        (fake / stage / "done.json").write_text("{}")
    (fake / "sft" / "model").mkdir()
    (fake / "sft" / "model" / "config.json").write_text("{}")
    assert R.choose_stage(fake, None) == ("sft", "no summary.json to choose by")   # no adapters
    for stage in ("sdpo", "dpo"):
        (fake / stage / "adapter").mkdir()
        (fake / stage / "adapter" / "adapter_config.json").write_text("{}")
    assert R.choose_stage(fake, None)[0] == "sdpo"
    models = {"sft": {"hr@1": 0.2, "valid_ratio": 0.9}, "sdpo": {"hr@1": 0.3, "valid_ratio": 0.5},
              "dpo": {"hr@1": 0.3, "valid_ratio": 0.6}}
    (fake / "summary.json").write_text(json.dumps({"models": models}))
    assert R.choose_stage(fake, None)[0] == "dpo"            # equal hr@1: the higher valid_ratio


def _jsonl(tmp_path: Path, *records) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


ERRORS = [
    # (arguments after RUN_DIR, the message)
    (lambda t: ["--history", "A", "--candidates", "X", "Y", "X"], "candidate 'X' is repeated in --candidates"),
    (lambda t: ["--history", "A", "--candidates", " "], "--candidates[0] is an empty title"),
    (lambda t: ["--history", "A"], "--history needs --candidates"),
    (lambda t: ["--candidates", "A"], "--candidates needs --history"),
    (lambda t: ["--history", "A", "--candidates", "X", "--top", "0"], "--top must be >= 1"),
    (lambda t: ["--input", _jsonl(t, {"history": ["A"], "candidates": []})],
     "in.jsonl: line 1: candidates is empty"),
    (lambda t: ["--input", _jsonl(t, {"history": ["A"], "candidates": ["X"]},
                                  {"history": [], "candidates": ["X"]})],
     "in.jsonl: line 2: history is empty"),
    (lambda t: ["--input", _jsonl(t, {"history": ["A", 7], "candidates": ["X"]})],
     "in.jsonl: line 1: history[1] must be a string, got int (7)"),
    (lambda t: ["--input", _jsonl(t, {"history": ["A"], "itemList": ["X", None]})],
     "in.jsonl: line 1: itemList[1] must be a string, got NoneType (null)"),
    (lambda t: ["--input", _jsonl(t, {"history": ["A"], "candidates": ["X", "Y", "Y"]})],
     "in.jsonl: line 1: candidate 'Y' is repeated"),
    (lambda t: ["--input", _jsonl(t, {"history": ["A"]})], "in.jsonl: line 1: missing key 'candidates'"),
    (lambda t: ["--input", _jsonl(t, "A")], "in.jsonl: line 1: expected an object"),
    (lambda t: ["--input", _jsonl(t, ["A"])], "in.jsonl: row 0: expected an object"),  # a JSON array
    (lambda t: ["--input", str(t / "missing.jsonl")], "missing.jsonl: no such file"),
    (lambda t: ["--input", _jsonl(t)], "no users (the input is empty)"),
    (lambda t: ["--history", "A", "--candidates", "X", "--stage", "dpo"], "--stage dpo: RUN_DIR"),
    (lambda t: ["--history", "A", "--candidates", "X", "--output", str(t / "no" / "x")], "does not exist"),
]


@pytest.mark.parametrize("make_args, message", ERRORS)
def test_errors(run_dir, tmp_path, capsys, make_args, message):
    with pytest.raises(SystemExit) as e:
        R.main([str(run_dir), *make_args(tmp_path)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], captured.err


def test_run_directory_without_a_trained_model(run_dir, tmp_path, capsys):
    args = ["--history", "A", "--candidates", "X"]
    for run, message in ((tmp_path / "nothing", "no such directory"),
                         (tmp_path, "no config.json"),
                         (tmp_path / "untrained", "has no trained model")):
        if run.name == "untrained":
            (run / "sft" / "model").mkdir(parents=True)
            (run / "config.json").write_text((run_dir / "config.json").read_text())
        with pytest.raises(SystemExit) as e:
            R.main([str(run), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_argparse_errors_exit_2(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        R.main([str(run_dir), "--history", "A", "--candidates"])
    assert e.value.code == 2 and "--candidates" in capsys.readouterr().err


def test_recommendation_names_the_one_candidate_in_the_answer(run_dir, monkeypatch, capsys):
    # The tiny model answers blanks; scripted answers check the rule through the command.
    answers = iter([["I would play Song C2 next"], ["Song B9 or Song B0"]])
    monkeypatch.setattr(R, "generate_answers", lambda *args, **kwargs: next(answers))
    argv = [str(run_dir), "--history", *HISTORY, "--candidates", *CANDIDATES]
    (res,) = R.main(argv)
    assert res["recommendation"] == "Song C2"
    assert "recommendation: Song C2" in capsys.readouterr().out
    (res,) = R.main(argv + ["--json"])
    assert res["recommendation"] is None                     # two candidates named: none
    assert json.loads(capsys.readouterr().out)["recommendation"] is None


def test_no_users_on_a_terminal(run_dir, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    with pytest.raises(SystemExit) as e:
        R.main([str(run_dir)], stdin=Terminal())
    assert e.value.code == 2 and "error: no users" in capsys.readouterr().err
