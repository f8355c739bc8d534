"""Benchmarks of the fused S-DPO loss (``python -m minisdpo.bench``) and of one S-DPO training
step (``python -m minisdpo.bench --step``).

Compares the fused op (minisdpo.ops.sdpo_loss) with the plain PyTorch reference
(minisdpo.loss.sdpo_loss), eager and torch.compile'd, forward alone and forward+backward,
against the floor of one vectorised exp per logit, ``torch.exp(logits, out=buf)`` over the same
logits in the same process (DESIGN.md section 7). Times are medians of --repeats runs after
warm-up; ratios are measured side by side. Peak memory of each variant is measured in its own
process: on the CPU the growth of the peak resident set (VmHWM, or ru_maxrss) over its value
once the inputs are allocated; on CUDA torch.cuda.max_memory_allocated over the memory allocated by the inputs.
On CUDA the run also measures the device-to-device copy bandwidth over the logits.

The structure is one function per benchmark (``time_loss``, ``time_floor``, ``peak_memory``)
called by ``main(argv)``.

``--step`` times one S-DPO training step of a LoRA model (r=8 on every projection, as the
S-DPO scripts): the reference's forward pass (adapter disabled, no grad), the policy's forward
pass, the loss and the backward pass; the optimizer is excluded. Two variants of the same
groups (synthetic random-word rows: a prompt of ~300 tokens, 20 candidates of 6-10 tokens):

* ``naive``: the public S-DPO code's layout: 1 + K full prompt + response sequences per group,
  logits at every position, ``minisdpo.loss.sdpo_loss`` (plain PyTorch), for both models;
* ``efficient``: one packed sequence per group (the prompt once), the LM head on the response
  tokens only and fused into the loss (``minisdpo.ops.sdpo_linear_loss``: no logits tensor),
  the reference through the same path (``minisdpo.step``, ``head="linear"``).

Times are medians of --repeats runs of each variant, interleaved, after one warm-up run each;
peak memory is measured per variant in its own process, as above, above the model + inputs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from minisdpo import data as D
from minisdpo import loss as ref
from minisdpo import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("fused", "fused_inplace", "eager", "compiled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minisdpo.bench", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                   help="logits dtypes to run, one table each (default: float32 bfloat16)")
    p.add_argument("--S", type=int, default=16, help="sequences, G * (1 + K) (default 16)")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--V", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--K", type=int, default=3, help="negatives per group (default 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement, median reported (default 5; --step: 5 for the "
                        "small model, 3 for the large one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--step", action="store_true",
                   help="benchmark one S-DPO training step, naive vs efficient, instead of the loss")
    p.add_argument("--models", nargs="+", default=list(STEP_MODELS), choices=list(STEP_MODELS),
                   help="--step: model sizes (default: small large)")
    p.add_argument("--negatives", nargs="+", type=int, default=[3, 7],
                   help="--step: numbers of negatives K (default: 3 7)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run and its memory processes (default: torch's)")
    p.add_argument("--groups", type=int, default=None,
                   help="--step: prompts per step (default: 4 for the small model, 1 for the large)")
    # Internal: the child process of peak_memory.
    p.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if (args.repeats is not None and args.repeats < 1) or args.K < 1:
        p.error("--repeats and --K must be >= 1")
    if min(args.negatives) < 1 or (args.groups is not None and args.groups < 1):
        p.error("--negatives and --groups must be >= 1")
    if args.step:
        if max(args.negatives) > NUM_CANDIDATES - 1:
            p.error(f"--negatives must be <= {NUM_CANDIDATES - 1} (the non-target candidates)")
        return args
    args.repeats = args.repeats or 5
    if args.S % (1 + args.K) != 0:
        p.error(f"--S {args.S} must be a multiple of 1 + --K = {1 + args.K}")
    return args


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


def loss_fn(variant: str) -> Callable:
    if variant == "fused":
        return ops.sdpo_loss
    if variant == "fused_inplace":
        return lambda *a, **k: ops.sdpo_loss(*a, inplace_backward=True, **k)
    if variant == "eager":
        return ref.sdpo_loss
    if variant == "compiled":
        return torch.compile(ref.sdpo_loss)
    raise ValueError(f"unknown variant {variant!r}")


def run_once(fn: Callable, inputs, K: int, backward: bool) -> None:
    logits, labels, ref_logps = inputs
    if not backward:
        with torch.no_grad():
            fn(logits, labels, ref_logps, beta=1.0, num_negatives=K)
        return
    # A fresh leaf on the same storage each run; autograd.grad returns the gradient as the op
    # made it (no accumulation into .grad, which would copy an aliasing in-place gradient).
    # fused_inplace overwrites the logits with their gradient: later runs see gradient values,
    # which cost the same.
    x = logits.detach().requires_grad_()
    loss, _ = fn(x, labels, ref_logps, beta=1.0, num_negatives=K)
    torch.autograd.grad(loss, x)


def median_seconds(fn: Callable[[], None], repeats: int, device: str, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_loss(variant: str, inputs, args: argparse.Namespace) -> dict[str, float]:
    fn = loss_fn(variant)
    out = {}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        if variant == "fused_inplace" and not backward:
            continue  # the same forward as "fused"
        out[mode] = median_seconds(lambda: run_once(fn, inputs, args.K, backward), args.repeats, args.device)
    return out


def time_floor(logits: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """torch.exp(logits, out=buf): one vectorised exp per logit, read and written once. On CUDA
    also dst.copy_(src), whose bandwidth (bytes read + written per second) bounds the kernels."""
    buf = torch.empty_like(logits)
    out = {"exp": median_seconds(lambda: torch.exp(logits, out=buf), args.repeats, args.device)}
    if args.device == "cuda":
        out["copy"] = median_seconds(lambda: buf.copy_(logits), args.repeats, args.device)
        out["copy_GBps"] = 2 * logits.numel() * logits.element_size() / out["copy"] / 1e9
    return out


def peak_rss() -> int:
    """Peak resident set of this process in bytes: VmHWM on Linux (ru_maxrss would carry the
    parent's peak over into a child started by fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_child(args: argparse.Namespace) -> None:
    """Run one forward+backward of one variant and print its peak memory above the inputs."""
    inputs = make_inputs(args, DTYPES[args.dtype[0]])
    fn = loss_fn(args.memory_child)
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(fn, inputs, args.K, backward=True)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = peak_rss()
        run_once(fn, inputs, args.K, backward=True)
        extra = peak_rss() - base
    print(json.dumps({"extra_bytes": extra}))


def peak_memory(variant: str, dtype: str, args: argparse.Namespace) -> int:
    """Bytes above the inputs at the peak of one forward+backward, in a fresh process."""
    cmd = [sys.executable, "-m", "minisdpo.bench", "--memory-child", variant, "--dtype", dtype,
           "--S", str(args.S), "--T", str(args.T), "--V", str(args.V), "--K", str(args.K),
           "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def machine() -> dict[str, str]:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": ops.cpu_capability(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(dtype: str, logits: torch.Tensor, times: dict, floor: dict, memory: dict) -> None:
    mb = logits.numel() * logits.element_size() / 2**20
    print(f"\n## {dtype}: logits {tuple(logits.shape)} = {mb:.0f} MiB")
    floor_line = f"floor torch.exp(logits, out=buf): {floor['exp'] * 1e3:.1f} ms"
    if "copy" in floor:
        floor_line += f"; copy_: {floor['copy'] * 1e3:.2f} ms = {floor['copy_GBps']:.0f} GB/s"
    print(floor_line)
    eager = times["eager"]
    print(f"{'variant':<14} {'fwd ms':>9} {'fwd/floor':>9} {'eager/fwd':>9} "
          f"{'f+b ms':>9} {'f+b/floor':>9} {'eager/f+b':>9} {'peak+ MiB':>10} {'(L+peak+)/2L':>12}")
    for variant, t in times.items():
        fwd = t.get("fwd")
        fb = t["fwd+bwd"]
        cols = [
            f"{fwd * 1e3:9.1f}" if fwd else f"{'-':>9}",
            f"{fwd / floor['exp']:9.2f}" if fwd else f"{'-':>9}",
            f"{eager['fwd'] / fwd:9.2f}" if fwd else f"{'-':>9}",
            f"{fb * 1e3:9.1f}", f"{fb / floor['exp']:9.2f}", f"{eager['fwd+bwd'] / fb:9.2f}",
        ]
        if variant in memory:
            extra = memory[variant] / 2**20
            cols += [f"{extra:10.0f}", f"{(mb + extra) / (2 * mb):12.2f}"]
        print(f"{variant:<14} " + " ".join(cols))


# --------------------------------------------------------------------------------------------
# --step: one S-DPO training step, naive vs efficient

# The small model is what train.py's defaults build (vocab 2048 after its tokenizer);
# intermediate sizes follow train.py's rule, 8/3 * dim rounded up to a multiple of 64.
STEP_MODELS = {
    "small": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=384),
    "large": dict(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, intermediate_size=2752),
}
STEP_DEFAULTS = {"small": {"groups": 4, "repeats": 5}, "large": {"groups": 1, "repeats": 3}}
STEP_VARIANTS = ("naive", "efficient")
NUM_CANDIDATES = 20
MAX_LEN = 512


class WordTokenizer:
    """A synthetic tokenizer: one token per whitespace-separated word, its id a hash of the word
    (ids 0 pad, 1 bos, 2 eos). Enough for timing: the token counts are what matter."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        import zlib
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        raise NotImplementedError("WordTokenizer only encodes")

    def prompt_ids(self, text: str) -> list[int]:
        return self.encode(text, bos=True)


def step_rows(groups: int, K: int, seed: int = 0) -> tuple[list[D.Row], list[list[str]]]:
    """Rows with 10 history titles of 8-12 random words and 20 candidates of 6-10 (a prompt of
    about 300 tokens, responses of 6-10 tokens + EOS), and K negatives per row."""
    import random
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
    title = lambda lo=6, hi=10: " ".join(word() for _ in range(rng.randint(lo, hi)))
    rows, negatives = [], []
    for _ in range(groups):
        cands = tuple(title() for _ in range(NUM_CANDIDATES))
        row = D.Row(tuple(title(8, 12) for _ in range(10)), cands, rng.choice(cands))
        rows.append(row)
        negatives.append(D.sample_negatives(row, K, rng))
    return rows, negatives


def step_setup(model_name: str, K: int, groups: int, dtype: torch.dtype):
    """The LoRA model (adapters non-zero, so policy != reference) and both batches."""
    from minisdpo.lora import apply_lora, mark_only_lora_as_trainable
    from minisdpo.model import Llama, ModelArgs
    from minisdpo.step import build_batch
    torch.manual_seed(0)
    margs = ModelArgs(**STEP_MODELS[model_name])
    model = apply_lora(Llama(margs).to(dtype), r=8, alpha=32.0)
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    tok = WordTokenizer(margs.vocab_size)
    rows, negatives = step_rows(groups, K)
    batches = {v: build_batch(tok, rows, negatives, MAX_LEN, domain="music",
                              packing="none" if v == "naive" else "shared") for v in STEP_VARIANTS}
    return model, batches


def step_once(model, batch: dict, variant: str, K: int) -> torch.Tensor:
    """One S-DPO step without the optimizer: reference, policy, loss, backward. Returns the
    loss (summed over groups), detached."""
    from minisdpo.step import sdpo_loss_sum
    loss_ops, head = (ref, "logits") if variant == "naive" else (ops, "linear")
    loss, _, _ = sdpo_loss_sum(model, batch, loss_ops, 1.0, K, head=head)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def step_memory_child(args: argparse.Namespace) -> None:
    """One step of one variant in this fresh process: its peak memory above model + inputs."""
    model_name, K = args.models[0], args.negatives[0]
    model, batches = step_setup(model_name, K, args.groups, DTYPES[args.dtype[0]])
    base = peak_rss()
    step_once(model, batches[args.memory_child], args.memory_child, K)
    print(json.dumps({"extra_bytes": peak_rss() - base}))


def step_peak_memory(variant: str, model_name: str, K: int, groups: int, args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "minisdpo.bench", "--step", "--memory-child", variant,
           "--models", model_name, "--negatives", str(K), "--groups", str(groups),
           "--dtype", args.dtype[0], "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def time_steps(model, batches: dict, K: int, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, the runs interleaved so that both see the same load."""
    for v in STEP_VARIANTS:
        step_once(model, batches[v], v, K)                       # warm-up
    times: dict[str, list[float]] = {v: [] for v in STEP_VARIANTS}
    for _ in range(repeats):
        for v in STEP_VARIANTS:
            t0 = time.perf_counter()
            step_once(model, batches[v], v, K)
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main_step(args: argparse.Namespace, info: dict) -> dict:
    dtype = args.dtype[0]
    print("# minisdpo.bench --step: one S-DPO training step (reference fwd + policy fwd + loss + "
          "backward, optimizer excluded), naive vs efficient")
    print(f"dtype {dtype}; LoRA r=8 alpha=32 on q,k,v,o,gate,up,down (only LoRA trainable); "
          f"synthetic rows: prompt ~300 tokens, responses 6-10 tokens + EOS; max_len {MAX_LEN}")
    print("naive = 1+K full sequences per group, full logits, minisdpo.loss.sdpo_loss; efficient = "
          "packed prompt, response-only hidden states, minisdpo.ops.sdpo_linear_loss (no logits)")
    print("ms = median of the interleaved runs after 1 warm-up each; peak MB = growth of the peak "
          "RSS (VmHWM) over model + inputs, one step, each variant in its own process")
    print(f"{'config':<10} {'groups':>6} {'tokens n/e':>12} {'naive ms':>10} {'effic. ms':>10} "
          f"{'speedup':>8} {'naive MB':>9} {'effic. MB':>9} {'mem ratio':>9}")
    results = {}
    for model_name in args.models:
        groups = args.groups or STEP_DEFAULTS[model_name]["groups"]
        repeats = args.repeats or STEP_DEFAULTS[model_name]["repeats"]
        for K in args.negatives:
            name = f"{model_name}_K{K}"
            model, batches = step_setup(model_name, K, groups, DTYPES[dtype])
            secs = time_steps(model, batches, K, repeats)
            tokens = {v: batches[v]["num_tokens"] for v in STEP_VARIANTS}
            del model, batches
            peak = ({v: None for v in STEP_VARIANTS} if args.no_memory else
                    {v: step_peak_memory(v, model_name, K, groups, args) / 2**20 for v in STEP_VARIANTS})
            entry = {v: {"ms": secs[v] * 1e3, "peak_mb": peak[v]} for v in STEP_VARIANTS}
            entry["speedup"] = secs["naive"] / secs["efficient"]
            entry["memory_ratio"] = (None if args.no_memory else
                                     peak["naive"] / max(peak["efficient"], 1e-9))
            entry["setup"] = {"model": STEP_MODELS[model_name], "K": K, "groups": groups,
                              "repeats": repeats, "tokens": tokens, "dtype": dtype}
            results[name] = entry
            mem = ("" if args.no_memory else
                   f"{peak['naive']:9.0f} {peak['efficient']:9.0f} {entry['memory_ratio']:9.2f}")
            print(f"{name:<10} {groups:>6} {tokens['naive']:>5}/{tokens['efficient']:<6} "
                  f"{secs['naive'] * 1e3:10.0f} {secs['efficient'] * 1e3:10.0f} "
                  f"{entry['speedup']:8.2f} {mem}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        (step_memory_child if args.step else memory_child)(args)
        return {}
    if args.step:
        info = machine()
        print("command: python -m minisdpo.bench " + " ".join(sys.argv[1:] if argv is None else argv))
        for k, v in info.items():
            print(f"{k}: {v}")
        return main_step(args, info)
    info = machine()
    print("# minisdpo.bench: fused S-DPO loss vs the PyTorch reference")
    print("command: python -m minisdpo.bench " + " ".join(sys.argv[1:] if argv is None else argv))
    for k, v in info.items():
        print(f"{k}: {v}")
    print(f"S={args.S} T={args.T} V={args.V} K={args.K} device={args.device}; "
          f"median of {args.repeats} runs after 2 warm-up runs; the first quarter of each "
          f"sequence is ignored (prompt)")
    print("peak+ = memory above the inputs at the peak of one fwd+bwd, each variant in its own "
          "process (CPU: growth of the peak RSS, VmHWM; CUDA: max_memory_allocated); L = logits bytes; "
          "(L+peak+)/2L <= 1.05 means no more than the logits and their gradient, +5%")
    variants = [v for v in VARIANTS if not (v == "compiled" and args.no_compile)]
    results = {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "memory_child"},
               "results": {}}
    for dtype in args.dtype:
        inputs = make_inputs(args, DTYPES[dtype])
        floor = time_floor(inputs[0], args)
        times = {v: time_loss(v, inputs, args) for v in variants}
        del inputs
        memory = {} if args.no_memory else {v: peak_memory(v, dtype, args) for v in variants}
        report(dtype, _shape_only(args, dtype), times, floor, memory)
        results["results"][dtype] = {"floor_s": floor, "times_s": times, "peak_extra_bytes": memory}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


def _shape_only(args: argparse.Namespace, dtype: str) -> torch.Tensor:
    # report() needs the logits' shape and element size, not their values.
    return torch.empty((args.S, args.T, args.V), dtype=DTYPES[dtype], device="meta")


if __name__ == "__main__":
    main()
