"""Where the fused loss's CPU time goes, per copy of the row kernels: the ops one by one.

``python -m minisdpo.bench`` times the whole fused op, forward and forward+backward, as a user
runs it. This script splits that up, for each CPU copy of the row kernels (MINISDPO_CPU_CAPABILITY)
beside the same exp floor, all interleaved round by round (minisdpo.bench.common):

* ``fwd``: the forward op, ``torch.ops.minisdpo.token_logps_fwd`` (one lse per counted row);
* ``bwd fresh``: the backward op, ``logits_bwd``, into a fresh logits-sized gradient, as autograd
  runs it: its time includes the page faults of that new buffer;
* ``bwd in place``: ``logits_bwd_`` over a buffer that stays allocated, without page faults:
  the row kernel and memory alone (the buffer's values change from call to call; the cost of
  the exp does not depend on them);
* ``exp fresh``: ``torch.exp(logits)``, the floor into a fresh tensor: the same page faults.

    python scripts/kernel_breakdown.py [--dtype float32] [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import functools

import torch

from minisdpo.bench.common import DTYPES, interleaved_medians, machine
from minisdpo.bench.fused_loss import capability, make_inputs, supported_capabilities


def run_op(cap: str, fn, *args) -> None:
    with capability(cap):
        fn(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--K", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--capabilities", nargs="+", default=["all"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = "cpu"
    for k, v in machine().items():
        print(f"{k}: {v}")
    logits, labels, ref_logps = make_inputs(args, DTYPES[args.dtype])
    _, _, lse, _ = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, args.K, -100)
    coef = torch.full(labels.shape, -0.01, dtype=lse.dtype)
    out = torch.empty_like(logits)
    inplace = logits.clone()
    fns = {"floor exp(out=buf)": lambda: torch.exp(logits, out=out),
           "floor exp fresh": lambda: torch.exp(logits)}
    ops = torch.ops.minisdpo
    for cap in supported_capabilities(args.capabilities):
        fns[f"{cap} fwd"] = functools.partial(run_op, cap, ops.token_logps_fwd, logits, labels, -100)
        fns[f"{cap} bwd fresh"] = functools.partial(run_op, cap, ops.logits_bwd, coef, logits, labels, lse, -100)
        fns[f"{cap} bwd in place"] = functools.partial(run_op, cap, ops.logits_bwd_, inplace, coef, labels,
                                                       lse, -100)
    med = interleaved_medians(fns, args.repeats, "cpu")
    floor = med["floor exp(out=buf)"]
    mb = logits.numel() * logits.element_size() / 2**20
    print(f"\n{args.dtype} logits {tuple(logits.shape)} = {mb:.0f} MiB; median of {args.repeats} "
          f"interleaved rounds after 2 warm-up rounds")
    print(f"{'measurement':<24} {'ms':>8} {'/floor':>7}")
    for name, t in med.items():
        print(f"{name:<24} {t * 1e3:8.1f} {t / floor:7.2f}")


if __name__ == "__main__":
    main()
