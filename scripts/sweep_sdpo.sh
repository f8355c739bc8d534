#!/usr/bin/env bash
# A short sweep of S-DPO's beta and K on the VALIDATION split (never the test split), from the
# SFT model of an existing run: ./scripts/sweep_sdpo.sh RUN_DIR [OUT_DIR]. Prints one line per
# (beta, K) with the validation metrics; each setting's run stays in OUT_DIR/beta<b>_k<k>.
set -euo pipefail
run=${1:?usage: scripts/sweep_sdpo.sh RUN_DIR [OUT_DIR]}
out=${2:-$run-sweep}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
# K at beta = 1, then beta at the paper's K = 3.
for setting in "1 1" "1 3" "1 7" "0.5 3" "2 3"; do
  read -r beta k <<< "$setting"
  d="$out/beta${beta}_k${k}"
  rm -rf "$d" && mkdir -p "$d"
  cp -r "$run/sft" "$run/tokenizer" "$run/config.json" "$d/" 2>/dev/null || cp -r "$run/sft" "$run/config.json" "$d/"
  "$py" -m minisdpo.train --out "$d" --stage sdpo --negatives "$k" --beta "$beta" --no-progress --no-plots ${SWEEP_ARGS:-} > "$d/log.txt" 2>&1
  "$py" -m minisdpo.train --out "$d" --stage eval --eval-split val --no-progress ${SWEEP_ARGS:-} > "$d/eval.txt" 2>&1
  "$py" - "$d" "$beta" "$k" <<'PY'
import json, sys
d, beta, k = sys.argv[1:]
s = json.load(open(f"{d}/summary.json"))["models"]
val = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"val_loss"' in l and '"sdpo"' in l]
row = lambda m: " ".join(f"{key}={s[m][key]:.4f}" for key in ("hr@1", "valid_ratio", "rank_hr@1", "rank_ndcg@5"))
print(f"beta={beta} K={k} val_loss={val[-1]['val_loss']:.4f} | sft: {row('sft')} | sdpo: {row('sdpo')}", flush=True)
PY
done
