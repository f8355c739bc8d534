"""``python -m minisdpo.bench --linear``: the fused linear S-DPO op, its two backward paths.

``minisdpo.ops.sdpo_linear_loss`` with the LM head frozen (LoRA), by each path of the hidden
states' gradient (``minisdpo.ops.GRAD_PATHS``):

* ``recompute``: the forward pass keeps the log-sum-exp of each counted token and drops the
  logits; the backward pass forms them again chunk by chunk, turns them into their gradient and
  multiplies it by W (the op's only path before; still the path of a trainable LM head);
* ``saved``: the forward pass also turns each chunk of logits into onehot - softmax and keeps
  its product with W, each token's d logp / d hidden; the backward pass scales it (what ``auto``,
  the public functions, does with a frozen head).

Per variant: ``fwd`` (the forward pass under autograd, as in training, without the backward
pass), ``fwd+bwd`` (``torch.autograd.grad`` of the loss w.r.t. hidden). Beside them ``mm``, one
``h @ W^T`` over all counted tokens: ``recompute`` does three products of that size, ``saved``
two. Times are medians of --repeats rounds after 2 warm-up rounds, each round running every
variant once in turn (interleaved, in one process, so that the machine's load moves them
alike); peak memory is measured per variant in its own process, as in fused_loss, three
processes per variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from minisdpo import ops
from minisdpo.bench.common import DTYPES, clear_peak_rss, peak_rss, rss

VARIANTS = ("recompute", "saved")


def make_inputs(args: argparse.Namespace, dtype: torch.dtype):
    """Hidden states of unit scale, a weight whose logits are of unit scale, labels with the last
    tokens of most sequences ignored (responses of T/2 to T tokens, padded), reference log-probs
    near the policy's."""
    g = torch.Generator(device=args.device).manual_seed(0)
    # normal_ in place: no temporary, which would leave the peak memory above the inputs.
    hidden = torch.empty(args.S, args.T, args.D, device=args.device, dtype=dtype).normal_(generator=g)
    weight = torch.empty(args.V, args.D, device=args.device, dtype=dtype).normal_(std=args.D**-0.5, generator=g)
    labels = torch.randint(0, args.V, (args.S, args.T), generator=g, device=args.device)
    length = torch.randint(args.T // 2, args.T + 1, (args.S,), generator=g, device=args.device)
    labels[torch.arange(args.T, device=args.device) >= length[:, None]] = -100
    ref_logps = -torch.log(torch.tensor(float(args.V))) * length + torch.randn(
        args.S, generator=g, device=args.device)
    return hidden, weight, labels, ref_logps


def run_once(variant: str, inputs, K: int, backward: bool) -> None:
    """One forward pass under autograd (hidden requires a gradient, the weight does not), and
    with ``backward`` the gradient of the loss w.r.t. hidden."""
    hidden, weight, labels, ref_logps = inputs
    h = hidden.detach().requires_grad_()
    loss, _ = ops._sdpo_linear_loss(h, weight, labels, ref_logps, 1.0, K, grad_path=variant)
    if backward:
        torch.autograd.grad(loss, h)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, repeats: int, device: str, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each fn over ``repeats`` rounds, every round calling each fn once."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_child(args: argparse.Namespace) -> None:
    """One forward+backward of one variant, the first in this fresh process: the growth of the
    peak memory over what is resident once the inputs are made (CPU: the peak is reset there,
    /proc/self/clear_refs, where Linux allows it). A warm-up run first would leave freed chunks
    with the C allocator, which would hide the next run's, for one variant and not the other."""
    inputs = make_inputs(args, DTYPES[args.dtype[0]])
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(args.memory_child, inputs, args.K, backward=True)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = rss() if clear_peak_rss() else peak_rss()
        run_once(args.memory_child, inputs, args.K, backward=True)
        extra = peak_rss() - base
    print(json.dumps({"extra_bytes": extra}))


def peak_memory(variant: str, dtype: str, args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "minisdpo.bench", "--linear", "--memory-child", variant,
           "--dtype", dtype, "--S", str(args.S), "--T", str(args.T), "--V", str(args.V),
           "--D", str(args.D), "--K", str(args.K), "--device", args.device,
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def peak_memories(dtype: str, args: argparse.Namespace, runs: int = 3) -> dict[str, list[int]]:
    """peak_memory of each variant ``runs`` times, the variants' processes interleaved."""
    out = {v: [] for v in VARIANTS}
    for _ in range(runs):
        for v in VARIANTS:
            out[v].append(peak_memory(v, dtype, args))
    return out


def run(args: argparse.Namespace) -> dict:
    print("# minisdpo.bench --linear: sdpo_linear_loss with a frozen LM head, its two backward paths")
    print(f"S={args.S} T={args.T} D={args.D} V={args.V} K={args.K} device={args.device}; "
          f"responses of T/2 to T tokens (the rest ignored); median of {args.repeats} interleaved "
          f"rounds after 2 warm-up rounds")
    print("fwd = forward under autograd; fwd+bwd = forward + grad of the loss w.r.t. hidden; "
          "mm = one h @ W^T over the counted tokens; peak+ = growth of the peak memory (CPU: VmHWM; "
          "CUDA: max_memory_allocated) over what is resident once the inputs are made, during the first "
          "fwd+bwd of a fresh process: the median of 3 processes per variant, interleaved (each run)")
    results = {}
    for dtype in args.dtype:
        inputs = make_inputs(args, DTYPES[dtype])
        hidden, weight, labels, _ = inputs
        counted = hidden[labels != -100]                                    # (N, D)
        fns = {"mm": lambda: torch.mm(counted, weight.t())}
        for v in VARIANTS:
            fns[f"{v} fwd"] = lambda v=v: run_once(v, inputs, args.K, backward=False)
            fns[f"{v} fwd+bwd"] = lambda v=v: run_once(v, inputs, args.K, backward=True)
        times = interleaved_medians(fns, args.repeats, args.device)
        n = counted.shape[0]
        del inputs, hidden, weight, labels, counted, fns
        memory = {} if args.no_memory else peak_memories(dtype, args)
        print(f"\n## {dtype}: {n} counted tokens of {args.S * args.T}; logits of the counted tokens "
              f"{n * args.V * DTYPES[dtype].itemsize / 2**20:.0f} MiB; mm {times['mm'] * 1e3:.1f} ms")
        print(f"{'variant':<10} {'fwd ms':>9} {'f+b ms':>9} {'f+b/mm':>7} {'peak+ MiB':>10}")
        for v in VARIANTS:
            fb = times[f"{v} fwd+bwd"]
            mem = (f"{statistics.median(memory[v]) / 2**20:10.1f} "
                   f"({', '.join(f'{m / 2**20:.1f}' for m in memory[v])})" if v in memory else f"{'-':>10}")
            print(f"{v:<10} {times[f'{v} fwd'] * 1e3:9.1f} {fb * 1e3:9.1f} {fb / times['mm']:7.2f} {mem}")
        ratio = times["recompute fwd+bwd"] / times["saved fwd+bwd"]
        print(f"recompute / saved, fwd+bwd: {ratio:.2f}")
        results[dtype] = {"times_s": times, "peak_extra_bytes": memory, "counted": n}
    return {"config": {k: v for k, v in vars(args).items() if k != "memory_child"}, "results": results}
