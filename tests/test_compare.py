"""minisdpo.compare: every pair of models across runs, from the answers files."""
import json

import pytest

from minisdpo.compare import main
from minisdpo.evaluate import mcnemar


def _record(path, hits, rows="digest-a", valid=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hits": hits, "metrics": {"hr@1": sum(hits) / len(hits), "valid_ratio": valid},
                                "key": {"rows": rows}}))
    return path


def test_pairs_across_runs(tmp_path, capsys):
    sft = [True, False, False, True, False, False]
    sdpo = [True, True, True, False, False, True]
    pop = [False, False, True, True, True, False]
    text = [False, True, False, True, False, False]
    _record(tmp_path / "items" / "answers_sft.json", sft, valid=0.5)
    _record(tmp_path / "items" / "answers_sdpo.json", sdpo)
    _record(tmp_path / "items" / "answers_pop.json", pop)
    _record(tmp_path / "text" / "answers_sdpo.json", text)
    lines = main([str(tmp_path / "items"), f"text-sdpo={tmp_path / 'text' / 'answers_sdpo.json'}"])
    assert capsys.readouterr().out.splitlines() == lines
    # Files of a directory in the order of the run's table, then the labelled file.
    assert [line.split()[0] for line in lines[1:5]] == ["items/pop", "items/sft", "items/sdpo", "text-sdpo"]
    assert lines[3].split()[1:] == ["0.6667", "1.0000"] and lines[2].split()[1:] == ["0.3333", "0.5000"]
    pairs = [line for line in lines if " vs " in line]
    assert len(pairs) == 6   # every pair of 4 models once
    assert pairs[3].startswith("items/sdpo vs items/sft hr@1:")
    t = mcnemar(sdpo, text)
    assert pairs[5] == (f"text-sdpo vs items/sdpo hr@1: {t['diff']:+.4f} ({t['c']} rows hit only by text-sdpo, "
                        f"{t['b']} only by items/sdpo; McNemar p = {t['p_value']:.3f})")
    assert t["b"] == 3 and t["c"] == 1
    assert lines[-1] == "rows: 6"


@pytest.mark.parametrize("make, message", [
    (lambda d: [str(d / "missing")], "missing: no such file or directory"),
    (lambda d: [str(_record(d / "a" / "answers_sft.json", [True])), str(_record(d / "b" / "answers_sft.json", [False], "digest-b"))],
     "evaluated on other rows than"),
    (lambda d: [str(_record(d / "a" / "answers_sft.json", [True])), str(_record(d / "c" / "a" / "answers_sft.json", [True]))],
     "a second model named 'a/sft'"),
    (lambda d: [str((d / "empty").mkdir() or d / "empty")], "no answers_*.json"),
    (lambda d: [str(_record(d / "a" / "answers_sft.json", [True]).parent), f"x={d / 'a'}"], "a label names one file"),
    (lambda d: [str(d / "bad.json"), (d / "bad.json").write_text("{}") and ""], "not an answers file"),
])
def test_errors_are_one_line(tmp_path, capsys, make, message):
    argv = [a for a in make(tmp_path) if a]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
