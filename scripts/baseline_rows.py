"""The baselines' rows for docs/results.md's tables: popularity and SASRec on the very test rows
that each table's language models were evaluated on.

``python -m minisdpo.train --limit-test N --seed S`` evaluates the test rows
``minisdpo.data.subsample(test, N, seed=S)``. This script trains popularity and SASRec once, as
``python -m minisdpo.baselines`` does with the same flags (the whole training split, SASRec's
epochs chosen on the whole validation split), and prints their HR@1, HR@5 and NDCG@5 on the
validation split, the whole test split and the test subsample of each ``--limits`` value: the
rows a table of N test rows shows.

    .venv/bin/python scripts/baseline_rows.py --data lastfm --data-dir ../shared/data/lastfm --limits 200,300,1000
"""
from __future__ import annotations

import argparse

from minisdpo import baselines as B
from minisdpo import data as D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=("movielens", "lastfm", "json"), default="movielens")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limits", default="200,300,1000", help="comma-separated test subsample sizes")
    p.add_argument("--seed", type=int, default=0, help="the runs' --seed")
    p.add_argument("--max-epochs", type=int, default=B.MAX_EPOCHS)
    p.add_argument("--patience", type=int, default=B.PATIENCE)
    args = p.parse_args()
    try:
        limits = [int(n) for n in args.limits.split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"error: --limits must be comma-separated integers, got {args.limits!r}") from None
    if any(n < 1 for n in limits):
        raise SystemExit(f"error: --limits must be >= 1, got {args.limits!r}")
    splits = D.load_dataset(args.data, args.data_dir, seed=args.seed)
    evaluate = {"val": splits["val"], "test": splits["test"]}
    evaluate |= {f"test {n}": D.subsample(splits["test"], n, seed=args.seed) for n in limits}
    res = B.run_baselines(B.BASELINES, splits["train"], splits["val"], evaluate, seed=args.seed,
                          max_epochs=args.max_epochs, patience=args.patience, log=print)
    print(f"{'rows':<10} {'model':<7} {'hr@1':>8} {'hr@5':>8} {'ndcg@5':>8} {'n':>6} {'hits@1':>7}")
    for split in evaluate:
        for name, m in res[split].items():
            print(f"{split:<10} {name:<7} {m['hr@1']:>8.4f} {m['hr@5']:>8.4f} {m['ndcg@5']:>8.4f} {m['n']:>6} "
                  f"{sum(m['hits']):>7}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


if __name__ == "__main__":
    main()
