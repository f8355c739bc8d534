"""Does the S-DPO gradient at a run's SFT model point the same way on different rows?

The preference stage starts with a fresh LoRA adapter (B = 0: policy = reference) on the merged
SFT model. This script takes the S-DPO gradient with respect to that adapter on several disjoint
batches of training groups and on one batch of validation groups, and prints the cosine of
every pair. A batch's gradient is the taste the data teaches plus the noise of its groups:
two batches agree (cosine well above 0) only where the first outweighs the second. Cosines near
0 between batches of N groups mean each optimizer step of N groups mostly fits noise, and the
validation loss will not fall until steps average far more groups.

    .venv/bin/python scripts/gradient_agreement.py RUN_DIR [--groups 48] [--batches 3]

RUN_DIR is a run of ``python -m minisdpo.train`` whose SFT stage is done; the data set, K, the
LoRA settings and the dtype are the run's (its config.json). Rows are drawn from the whole
training and validation splits (seeded), not only from the run's subsample.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from minisdpo import data as D
from minisdpo import ops
from minisdpo.batches import build_batch
from minisdpo.checkpoint import from_pretrained
from minisdpo.lora import apply_lora, mark_only_lora_as_trainable
from minisdpo.run import default_dtype, sft_model_dir
from minisdpo.step import StageLoss
from minisdpo.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a run directory whose SFT stage is done (RUN/sft/model)")
    p.add_argument("--groups", type=int, default=48, help="S-DPO groups (prompts) per batch")
    p.add_argument("--batches", type=int, default=3, help="disjoint batches of training groups")
    p.add_argument("--batch-size", type=int, default=8, help="groups per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the rows, their negatives and the adapter's A")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    for name in ("groups", "batches", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main() -> None:
    args = parse_args()
    run = Path(args.run)
    model_dir = sft_model_dir(run)
    if not (run / "config.json").exists() or not (model_dir / "config.json").exists():
        raise SystemExit(f"error: {run} is not a run with a finished SFT stage (no {model_dir}/config.json)")
    cfg = json.loads((run / "config.json").read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    k, domain = cfg["negatives"], cfg["domain"] or D.default_domain(cfg["data"])
    splits = D.load_dataset(cfg["data"], cfg["data_dir"], seed=cfg["seed"])
    tok = Tokenizer.from_dir(str(model_dir))
    dtype = default_dtype(cfg["dtype"], torch.device("cpu"), cfg["model"])
    model = from_pretrained(str(model_dir), dtype=dtype)
    torch.manual_seed(args.seed)
    apply_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=0.0,
               target_modules=[t for t in cfg["lora_targets"].split(",") if t])
    mark_only_lora_as_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    objective = StageLoss(model, ops, packing=cfg["packing"], negatives=k, beta=cfg["beta"])

    def gradient(rows: list[D.Row], seed: int) -> torch.Tensor:
        negatives = D.epoch_negatives(rows, k, seed, 0, fixed=True)
        for s in range(0, len(rows), args.batch_size):
            batch = build_batch(tok, rows[s:s + args.batch_size], negatives[s:s + args.batch_size],
                                cfg["max_len"], domain=domain, packing=cfg["packing"])
            loss, _ = objective(batch, len(rows))
            loss.backward()
        g = torch.cat([p.grad.float().flatten() for p in params])
        for p in params:
            p.grad = None
        return g

    n = args.groups
    train = D.subsample(splits["train"], n * args.batches, seed=args.seed)
    t0 = time.time()
    grads = {f"train{i + 1}": gradient(train[i * n:(i + 1) * n], args.seed + i) for i in range(args.batches)}
    grads["val"] = gradient(D.subsample(splits["val"], n, seed=args.seed), args.seed + args.batches)
    print(f"{cfg['data']}, K = {k}, {n} groups a batch, gradient w.r.t. the fresh adapter at the SFT model "
          f"({dtype}, {time.time() - t0:.0f} s):")
    for (a, ga), (b, gb) in itertools.combinations(grads.items(), 2):
        print(f"  cos({a}, {b}) = {float(ga @ gb / (ga.norm() * gb.norm())):+.4f}")


if __name__ == "__main__":
    main()
