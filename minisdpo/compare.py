"""python -m minisdpo.compare PATH...: every pair of models, across runs, with McNemar's test.

A run of ``minisdpo.train`` writes each evaluated model's hits to ``OUT/answers_NAME.json``, the
baselines' included, and its table pairs each language model with SFT and with each baseline.
This command pairs models of different runs as well (item tokens against text-only, two seeds,
two recipes): each PATH is a run directory (all its ``answers_*.json``) or one such file, and it
prints each model's HR@1 and ValidRatio, then every pair with ``minisdpo.evaluate.mcnemar``
(a run directory's models in the order of its table: baselines, SFT, S-DPO, DPO).

A model is named ``RUN/NAME`` (RUN the run directory's name), or ``LABEL`` when given as
``LABEL=PATH``. The pairs are only meaningful on the same rows in the same order, so every file
must name the digest of the same evaluation rows; anything else is one ``error: ...`` line and
exit status 2.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from minisdpo.evaluate import mcnemar, paired_line


class CompareError(Exception):
    pass


# A run directory's models in the order of minisdpo.train's table (others after, by name), so
# that each pair reads "later vs earlier": S-DPO vs SFT, SFT vs popularity.
TABLE_ORDER = ("pop", "sasrec", "zero-shot", "sft", "sdpo", "dpo")


def _table_order(path: Path) -> tuple[int, str]:
    name = path.stem.removeprefix("answers_")
    return (TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER), name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisdpo.compare", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="[LABEL=]PATH",
                   help="a run directory of minisdpo.train (all its answers_*.json) or one answers_NAME.json, "
                        "optionally named LABEL (a file only)")
    return p


def read_records(specs: list[str]) -> dict[str, dict]:
    """{model name: record} from ``[LABEL=]PATH`` specs, in the order given; each record has
    "hits", "metrics" and "key" (whose "rows" is the digest of the evaluation rows)."""
    files: list[tuple[str, Path]] = []
    for spec in specs:
        label, sep, path_text = spec.partition("=")
        path = Path(path_text if sep else spec)
        if path.is_dir():
            if sep:
                raise CompareError(f"{spec}: a label names one file, not a run directory")
            found = sorted(path.glob("answers_*.json"), key=_table_order)
            if not found:
                raise CompareError(f"{path}: no answers_*.json (is it a run directory of minisdpo.train "
                                   "that reached its evaluation?)")
            files += [(f"{path.resolve().name}/{f.stem.removeprefix('answers_')}", f) for f in found]
        elif path.is_file():
            files.append((label if sep else f"{path.resolve().parent.name}/{path.stem.removeprefix('answers_')}", path))
        else:
            raise CompareError(f"{path}: no such file or directory")
    records: dict[str, dict] = {}
    for name, path in files:
        if name in records:
            raise CompareError(f"{path}: a second model named {name!r} (name one of them with LABEL=PATH)")
        try:
            record = json.loads(path.read_text())
            hits, metrics, rows = record["hits"], record["metrics"], record["key"]["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CompareError(f"{path}: not an answers file of minisdpo.train ({type(e).__name__}: {e})") from None
        first = next(iter(records.values()), None)
        if first is not None and (rows != first["rows"] or len(hits) != len(first["hits"])):
            raise CompareError(f"{path}: evaluated on other rows than {first['path']} (pairs need the same rows)")
        records[name] = {"hits": [bool(h) for h in hits], "metrics": metrics, "rows": rows, "path": path}
    return records


def compare(records: dict[str, dict]) -> list[str]:
    """The lines of the table: each model's HR@1 and ValidRatio, then every pair (a vs b with a
    after b in the order given, as ``minisdpo.train`` puts S-DPO against SFT)."""
    width = max(6, *map(len, records))
    lines = [f"{'model':<{width}} {'hr@1':>8} {'valid_ratio':>12}"]
    for name, r in records.items():
        hr = sum(r["hits"]) / len(r["hits"])
        lines.append(f"{name:<{width}} {hr:>8.4f} {r['metrics'].get('valid_ratio', 1.0):>12.4f}")
    for (b, rb), (a, ra) in itertools.combinations(records.items(), 2):
        lines.append(paired_line(a, b, mcnemar(rb["hits"], ra["hits"])))
    lines.append(f"rows: {len(next(iter(records.values()))['hits'])}")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    """The command line; an error prints one ``error: ...`` line and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        lines = compare(read_records(args.paths))
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
