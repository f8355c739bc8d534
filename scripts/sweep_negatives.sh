#!/usr/bin/env bash
# The paper's sweep over the number of negatives, on the VALIDATION split (never the test split):
#   scripts/sweep_negatives.sh RUN_DIR OUT_DIR [FLAGS...]
# RUN_DIR is a run whose SFT stage is done, with --lora-layers N (its frozen-prefix caches are
# shared, so every K costs only the top layers); FLAGS are that run's flags (data, --lora-layers,
# --limit-train, --sdpo-epochs, ...), repeated so that every K trains from the same SFT model on
# the same rows for the same steps. For each K in $KS (default 1 3 7 15 19) it trains an S-DPO
# adapter in OUT_DIR/k<K>, then ranks the 20 candidates of $VAL_ROWS validation rows (default
# 300; the cache of those rows is built once, in OUT_DIR/cache) with the SFT model and with
# each adapter, and prints one line per model; OUT_DIR/sweep.jsonl gets the same as JSON.
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
"$py" - "$run" "$out" "${VAL_ROWS:-300}" "$@" <<'PY'
import json, sys, time
from pathlib import Path

import torch

from minisdpo import train
from minisdpo.checkpoint import from_pretrained
from minisdpo.evaluate import evaluate_ranking
from minisdpo.lora import load_adapter
from minisdpo.prefix import PrefixCache
from minisdpo.run import adapter_dir, default_dtype, sft_model_dir
from minisdpo.tokenizer import Tokenizer

run, out, val_rows, flags = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
args = train.build_parser().parse_args(flags + ["--limit-val", str(val_rows)])
train.check_args(args)
splits, domain, _ = train.load_rows(args)
rows = splits["val"]
tok = Tokenizer.from_dir(str(sft_model_dir(run)))
model = from_pretrained(str(sft_model_dir(run)), dtype=default_dtype(args.dtype, torch.device("cpu"), args.model))
layer = train.lora_boundary(model.args, args.lora_layers, "--lora-layers")
t0 = time.time()
prefix = (PrefixCache.build(model, tok, rows, domain, args.max_len, layer, batch_size=args.rank_batch_size,
                            path=out / "cache" / f"val{len(rows)}-layer{layer}", progress=False) if layer else None)
print(f"validation rows: {len(rows)}; prefix cache {time.time() - t0:.0f} s", flush=True)


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
PY
