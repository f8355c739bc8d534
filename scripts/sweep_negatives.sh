#!/usr/bin/env bash
# The paper's sweep over the number of negatives, on the VALIDATION split (never the test split):
#   scripts/sweep_negatives.sh RUN_DIR OUT_DIR [FLAGS...]
# RUN_DIR is a run whose SFT stage is done, with --lora-layers N (its frozen-prefix caches are
# shared, so every K costs only the top layers); FLAGS are that run's flags (data, --lora-layers,
# --limit-train, --sdpo-epochs, ...), repeated so that every K trains from the same SFT model on
# the same rows for the same steps. For each K in $KS (default 1 3 7 15 19) it trains an S-DPO
# adapter in OUT_DIR/k<K>, then ranks the 20 candidates of $VAL_ROWS validation rows (default:
# the run's --limit-val; their prefix cache is the run's, or built beside it) with the SFT model
# and with each adapter, and prints one line per model; OUT_DIR/sweep.jsonl gets the same as JSON.
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
done
"$py" - "$run" "$out" "${VAL_ROWS:-0}" "$@" <<'PY'
import json, sys
from pathlib import Path

import torch

from minisdpo import config, train
from minisdpo.checkpoint import from_pretrained
from minisdpo.evaluate import evaluate_ranking
from minisdpo.lora import load_adapter
from minisdpo.run import adapter_dir, default_dtype, sft_model_dir
from minisdpo.tokenizer import Tokenizer
from minisdpo.trainer import Env, StageData

run, out, val_rows, flags = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
args = config.build_parser().parse_args(flags + (["--limit-val", str(val_rows)] if val_rows else []))
config.check_args(args)
splits, domain, _ = train.load_rows(args)
rows = splits["val"]
tok = Tokenizer.from_dir(str(sft_model_dir(run)))
model = from_pretrained(str(sft_model_dir(run)), dtype=default_dtype(args.dtype, torch.device("cpu"), args.model))
layer = train.lora_boundary(model.args.n_layers, args.lora_layers, "--lora-layers")
# The run's own cache of these rows when it has one (the same rows: read back), else built there.
data = StageData(tok, domain, splits["train"], rows)
prefix = train.prefix_cache(model, rows, "val", layer, args, data, Env(), run, {}) if layer else None


def rank(model):
    return evaluate_ranking(model, tok, rows, domain, batch_size=args.rank_batch_size, max_len=args.max_len,
                            progress=False, prefix=prefix)


results = [{"model": "sft", "negatives": 0, **rank(model)}]
for d in sorted(out.glob("k*"), key=lambda p: int(p.name[1:])):
    k = int(d.name[1:])
    if not (adapter_dir(d, "sdpo") / "adapter_config.json").exists():
        continue
    load_adapter(model, str(adapter_dir(d, "sdpo")))   # into the same LoRA layers after the first
    done = json.loads((d / "sdpo" / "done.json").read_text())
    results.append({"model": "sdpo", "negatives": k, "best_val_loss": done["best_val_loss"],
                    "start_val_loss": done["start_val_loss"], "train_s": done["train_s"], **rank(model)})
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
      title=f"ranking of {results[0]['n']} validation rows (dotted: SFT)")
b.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "sweep.png", dpi=110)
print(f"plot: {out / 'sweep.png'}")
PY
