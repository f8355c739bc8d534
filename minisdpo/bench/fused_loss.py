"""``python -m minisdpo.bench``: the fused S-DPO loss against its plain PyTorch twin.

Compares the fused op (minisdpo.ops.sdpo_loss) with the plain PyTorch twin
(minisdpo.loss.sdpo_loss), eager and torch.compile'd, forward alone and forward+backward,
against the floor of one vectorised exp per logit, ``torch.exp(logits, out=buf)`` over the same
logits in the same process (docs/design.md section 7). Times are medians of --repeats rounds after
two warm-up rounds, each round running the floor and every variant once (in a shuffled order), so
that ratios are measured side by side under the same load. ``--capabilities`` times the fused op
once per CPU copy of its row kernels (``fused[avx2]``: under MINISDPO_CPU_CAPABILITY=avx2), beside
the same floor and reference, which run ATen's own copy (ATEN_CPU_CAPABILITY caps that one, at
startup). Peak memory of each variant is measured in its own process: on the CPU the growth of
the peak resident set (VmHWM, or ru_maxrss) over its value once the inputs are allocated; on CUDA
torch.cuda.max_memory_allocated over the memory allocated by the inputs.
On CUDA the run also measures the device-to-device copy bandwidth over the logits.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
from typing import Callable, Iterator

import torch

from minisdpo import loss as torch_loss
from minisdpo import ops
from minisdpo.bench.common import DTYPES, interleaved_medians, peak_rss

VARIANTS = ("fused", "eager", "compiled")
# The copies of the row kernels, best first (csrc/cpu_kernels.cpp); "all" in --capabilities.
CAPABILITIES = ("avx512", "avx2", "default")
CAPABILITY_ENV = "MINISDPO_CPU_CAPABILITY"


def make_inputs(args: argparse.Namespace, dtype: torch.dtype):
    """Logits of unit scale, labels with the first quarter of each sequence ignored (a prompt),
    reference log-probs near the policy's."""
    g = torch.Generator(device=args.device).manual_seed(0)
    # normal_ in place: no float32 temporary, so the memory baseline is the logits themselves.
    logits = torch.empty(args.S, args.T, args.V, device=args.device, dtype=dtype).normal_(generator=g)
    labels = torch.randint(0, args.V, (args.S, args.T), generator=g, device=args.device)
    labels[:, : args.T // 4] = -100
    ref_logps = torch.full((args.S,), -10.4 * (args.T - args.T // 4), device=args.device)
    ref_logps += torch.randn(args.S, generator=g, device=args.device)
    return logits, labels, ref_logps


def variant_capability(variant: str) -> str | None:
    """"fused[avx2]" -> "avx2"; None for a variant that runs whatever the environment says."""
    return variant[len("fused["):-1] if variant.startswith("fused[") else None


@contextlib.contextmanager
def capability(cap: str | None) -> Iterator[None]:
    """MINISDPO_CPU_CAPABILITY=cap while inside (the ops read it at every call, the backward's
    included); nothing for cap None."""
    if cap is None:
        yield
        return
    old = os.environ.get(CAPABILITY_ENV)
    os.environ[CAPABILITY_ENV] = cap
    try:
        yield
    finally:
        if old is None:
            del os.environ[CAPABILITY_ENV]
        else:
            os.environ[CAPABILITY_ENV] = old


def supported_capabilities(requested: list[str]) -> list[str]:
    """The capabilities of `requested` ("all": every one) that this CPU runs as themselves: a
    request above what the CPU supports is capped to a lower copy, which would be timed twice."""
    wanted = CAPABILITIES if "all" in requested else requested
    out = []
    for cap in dict.fromkeys(wanted):
        with capability(cap):
            if ops.cpu_capability() == cap:
                out.append(cap)
    return out


def loss_fn(variant: str) -> Callable:
    if variant == "fused" or variant_capability(variant) is not None:
        return ops.sdpo_loss
    if variant == "eager":
        return torch_loss.sdpo_loss
    if variant == "compiled":
        return torch.compile(torch_loss.sdpo_loss)
    raise ValueError(f"unknown variant {variant!r}")


def run_once(fn: Callable, inputs, K: int, backward: bool) -> None:
    logits, labels, ref_logps = inputs
    if not backward:
        with torch.no_grad():
            fn(logits, labels, ref_logps, beta=1.0, num_negatives=K)
        return
    # A fresh leaf on the same storage each run; autograd.grad returns the gradient as the op
    # made it (no accumulation into .grad).
    x = logits.detach().requires_grad_()
    loss, _ = fn(x, labels, ref_logps, beta=1.0, num_negatives=K)
    torch.autograd.grad(loss, x)


def run_variant(variant: str, fn: Callable, inputs, K: int, backward: bool) -> None:
    with capability(variant_capability(variant)):
        run_once(fn, inputs, K, backward)


def time_all(variants: list[str], inputs, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """The floor and every variant's fwd and fwd+bwd, interleaved: ({"exp": s[, "copy": s,
    "copy_GBps": x]}, {variant: {"fwd": s, "fwd+bwd": s}}, {"variant mode": [s, ...]}, the last
    every timed run, for the spread behind each median). The floor is
    torch.exp(logits, out=buf): one vectorised exp per logit, read and written once; on CUDA also
    dst.copy_(src), whose bandwidth (bytes read + written per second) bounds the kernels; on the
    CPU also torch.exp(logits) into a fresh tensor ("exp_fresh"), whose page faults every
    backward pass pays for its fresh logits-sized gradient."""
    logits = inputs[0]
    buf = torch.empty_like(logits)
    fns = {"floor exp": lambda: torch.exp(logits, out=buf)}
    if args.device == "cpu":
        fns["floor exp_fresh"] = lambda: torch.exp(logits)
    if args.device == "cuda":
        fns["floor copy"] = lambda: buf.copy_(logits)
    for variant in variants:
        fn = loss_fn(variant)
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            fns[f"{variant} {mode}"] = functools.partial(run_variant, variant, fn, inputs, args.K, backward)
    samples: dict[str, list[float]] = {}
    med = interleaved_medians(fns, args.repeats, args.device, samples=samples)
    floor = {"exp": med["floor exp"]}
    if args.device == "cpu":
        floor["exp_fresh"] = med["floor exp_fresh"]
    if args.device == "cuda":
        floor["copy"] = med["floor copy"]
        floor["copy_GBps"] = 2 * logits.numel() * logits.element_size() / floor["copy"] / 1e9
    times = {v: {mode: med[f"{v} {mode}"] for mode in ("fwd", "fwd+bwd")} for v in variants}
    return floor, times, samples


def memory_child(args: argparse.Namespace) -> None:
    """Run one forward+backward of one variant and print its peak memory above the inputs."""
    inputs = make_inputs(args, DTYPES[args.dtype[0]])
    fn = loss_fn(args.memory_child)
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_variant(args.memory_child, fn, inputs, args.K, backward=True)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = peak_rss()
        run_variant(args.memory_child, fn, inputs, args.K, backward=True)
        extra = peak_rss() - base
    print(json.dumps({"extra_bytes": extra}))


def peak_memory(variant: str, dtype: str, args: argparse.Namespace) -> int:
    """Bytes above the inputs at the peak of one forward+backward, in a fresh process."""
    cmd = [sys.executable, "-m", "minisdpo.bench", "--memory-child", variant, "--dtype", dtype,
           "--S", str(args.S), "--T", str(args.T), "--V", str(args.V), "--K", str(args.K),
           "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def report(dtype: str, logits: torch.Tensor, times: dict, floor: dict, memory: dict) -> None:
    mb = logits.numel() * logits.element_size() / 2**20
    print(f"\n## {dtype}: logits {tuple(logits.shape)} = {mb:.0f} MiB")
    floor_line = f"floor torch.exp(logits, out=buf): {floor['exp'] * 1e3:.1f} ms"
    if "exp_fresh" in floor:
        floor_line += (f"; into a fresh tensor, torch.exp(logits): {floor['exp_fresh'] * 1e3:.1f} ms "
                       f"= {floor['exp_fresh'] / floor['exp']:.2f}x (its page faults)")
    if "copy" in floor:
        floor_line += f"; copy_: {floor['copy'] * 1e3:.2f} ms = {floor['copy_GBps']:.0f} GB/s"
    print(floor_line)
    eager = times["eager"]
    print(f"{'variant':<14} {'fwd ms':>9} {'fwd/floor':>9} {'eager/fwd':>9} "
          f"{'f+b ms':>9} {'f+b/floor':>9} {'eager/f+b':>9} {'peak+ MiB':>10} {'(L+peak+)/2L':>12}")
    for variant, t in times.items():
        fwd, fb = t["fwd"], t["fwd+bwd"]
        cols = [
            f"{fwd * 1e3:9.1f}", f"{fwd / floor['exp']:9.2f}", f"{eager['fwd'] / fwd:9.2f}",
            f"{fb * 1e3:9.1f}", f"{fb / floor['exp']:9.2f}", f"{eager['fwd+bwd'] / fb:9.2f}",
        ]
        if variant in memory:
            extra = memory[variant] / 2**20
            cols += [f"{extra:10.0f}", f"{(mb + extra) / (2 * mb):12.2f}"]
        print(f"{variant:<14} " + " ".join(cols))


def run(args: argparse.Namespace) -> dict:
    """The tables of ``python -m minisdpo.bench``: one per logits dtype."""
    print("# minisdpo.bench: fused S-DPO loss vs its PyTorch twin")
    print(f"S={args.S} T={args.T} V={args.V} K={args.K} device={args.device}; "
          f"median of {args.repeats} interleaved rounds after 2 warm-up rounds; the first quarter of each "
          f"sequence is ignored (prompt)")
    print("peak+ = memory above the inputs at the peak of one fwd+bwd, each variant in its own "
          "process (CPU: growth of the peak RSS, VmHWM; CUDA: max_memory_allocated); L = logits bytes; "
          "(L+peak+)/2L <= 1.05 means no more than the logits and their gradient, +5%")
    fused = ["fused"]
    if args.capabilities:
        caps = supported_capabilities(args.capabilities)
        fused = [f"fused[{cap}]" for cap in caps]
        skipped = [c for c in (CAPABILITIES if "all" in args.capabilities else args.capabilities)
                   if c not in caps]
        print(f"fused[CAP] = the fused op under {CAPABILITY_ENV}=CAP (its row kernels' copy); the floor "
              f"and the reference run ATen's copy (aten_cpu_capability above)"
              + (f"; not supported here, left out: {', '.join(skipped)}" if skipped else ""))
    variants = fused + [v for v in VARIANTS[1:] if not (v == "compiled" and args.no_compile)]
    results = {"config": {k: v for k, v in vars(args).items() if k != "memory_child"}, "results": {}}
    for dtype in args.dtype:
        inputs = make_inputs(args, DTYPES[dtype])
        floor, times, samples = time_all(variants, inputs, args)
        del inputs
        memory = {} if args.no_memory else {v: peak_memory(v, dtype, args) for v in variants}
        report(dtype, _shape_only(args, dtype), times, floor, memory)
        results["results"][dtype] = {"floor_s": floor, "times_s": times, "peak_extra_bytes": memory,
                                     "samples_s": samples}
    return results


def _shape_only(args: argparse.Namespace, dtype: str) -> torch.Tensor:
    # report() needs the logits' shape and element size, not their values.
    return torch.empty((args.S, args.T, args.V), dtype=DTYPES[dtype], device="meta")


