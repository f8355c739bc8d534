#!/usr/bin/env bash
# The paper's sweep over the number of negatives, on the VALIDATION split (never the test split):
#   scripts/sweep_negatives.sh RUN_DIR OUT_DIR [FLAGS...]
# RUN_DIR is a run whose SFT stage is done, with --lora-layers N (its frozen-prefix caches are
# shared, so every K costs only the top layers); FLAGS are that run's flags (data, --lora-layers,
# --limit-train, --sdpo-epochs, ...), repeated so that every K trains from the same SFT model on
# the same rows for the same steps. For each K in $KS (default 1 3 7 15 19) it trains an S-DPO
# adapter in OUT_DIR/k<K> and evaluates it and the SFT model on the run's --limit-val validation
# rows (--stage eval --eval-split val: generation and the ranking of the 20 candidates), then
# prints one line per model; OUT_DIR/sweep.jsonl gets the same as JSON. Only the command line of
# python -m minisdpo.train and the files it writes are used.
set -euo pipefail
run=${1:?usage: scripts/sweep_negatives.sh RUN_DIR OUT_DIR [FLAGS...]}
out=${2:?usage: scripts/sweep_negatives.sh RUN_DIR OUT_DIR [FLAGS...]}
shift 2
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
: > "$out/sweep.jsonl"
for k in ${KS:-1 3 7 15 19}; do
  d="$out/k$k"
  rm -rf "$d" && mkdir -p "$d"
  cp -r "$run/sft" "$run/config.json" "$d/"
  [ -d "$run/cache" ] && ln -s "$(realpath "$run/cache")" "$d/cache"
  "$py" -m minisdpo.train --out "$d" --stage sdpo --negatives "$k" --no-progress --no-plots "$@" > "$d/log.txt" 2>&1
  # The SFT model and the adapter on the validation rows (its prefix cache is the run's, shared).
  "$py" -m minisdpo.train --out "$d" --stage eval --resume --eval-split val --baselines none --negatives "$k" \
      --no-progress --no-plots "$@" >> "$d/log.txt" 2>&1
done
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
results = []
for d in sorted(out.glob("k*"), key=lambda p: int(p.name[1:])):
    if not (d / "summary.json").exists():
        continue
    models = json.loads((d / "summary.json").read_text())["models"]
    done = json.loads((d / "sdpo" / "done.json").read_text())
    if not results:     # the SFT model: the same in every directory
        results.append({"model": "sft", "negatives": 0, **models["sft"]})
    results.append({"model": "sdpo", "negatives": int(d.name[1:]), "best_val_loss": done["best_val_loss"],
                    "start_val_loss": done["start_val_loss"], "train_s": done["train_s"], **models["sdpo"]})
with open(out / "sweep.jsonl", "w") as f:
    for r in results:
        f.write(json.dumps(r) + "\n")
        print(" ".join(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in r.items()), flush=True)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
sdpo = [r for r in results if r["model"] == "sdpo"]
ks = [r["negatives"] for r in sdpo]
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
a.plot(ks, [r["best_val_loss"] - r["start_val_loss"] for r in sdpo], "o-")
a.axhline(0.0, color="gray", ls="--", lw=1)
a.set(xlabel="negatives K", ylabel="validation loss - ln(1 + K)", xticks=ks,
      title="S-DPO validation loss against its start")
for key in ("rank_hr@1", "rank_hr@5", "rank_ndcg@5"):
    line, = b.plot(ks, [r[key] for r in sdpo], "o-", label=f"S-DPO {key}")
    b.axhline(results[0][key], color=line.get_color(), ls=":", lw=1)
b.set(xlabel="negatives K", ylabel="validation metric", xticks=ks,
      title="ranking of the validation rows (dotted: SFT)")
b.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "sweep.png", dpi=110)
print(f"plot: {out / 'sweep.png'}")
PY
