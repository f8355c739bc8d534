"""Benchmarks of the fused S-DPO loss (``python -m minisdpo.bench``) and of one S-DPO training
step (``python -m minisdpo.bench --step``).

Compares the fused op (minisdpo.ops.sdpo_loss) with the plain PyTorch reference
(minisdpo.loss.sdpo_loss), eager and torch.compile'd, forward alone and forward+backward,
against the floor of one vectorised exp per logit, ``torch.exp(logits, out=buf)`` over the same
logits in the same process (docs/design.md section 7). Times are medians of --repeats runs after
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

``--step --model DIR`` times one whole S-DPO training step (reference log-probs, policy forward,
loss, backward, AdamW step) on a Hugging Face Llama directory, on the same batch of MovieLens
prompts, for ``ours`` (minisdpo.model.Llama + minisdpo.lora, the packed batch, the fused linear
loss) and ``hf_peft`` (transformers + PEFT the usual way: 1 + K full sequences per prompt,
full-vocabulary logits, the adapter disabled for the reference), each in the mode it runs
fastest in on the CPU (``BEST_MODE``; ``--dtype`` sweeps modes), side by side in one process.
Both start from the same adapter, so their losses must agree (to rounding in float32). Peak
memory: the peak resident set of one step of each side in its own process.

``--generate --model DIR`` times batched greedy decoding (``Llama.generate`` with the KV cache)
of MovieLens prompts in float32 and bfloat16.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch

from minisdpo import data as D
from minisdpo import loss as ref
from minisdpo import ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("fused", "fused_inplace", "eager", "compiled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minisdpo.bench", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES) + ["autocast"],
                   help="logits dtypes to run, one table each (default: float32 bfloat16); --step: "
                        "the model's dtype (default float32); --step --model / --generate: the "
                        "modes to try on each side, the fastest per side reported (float32; "
                        "bfloat16 = bfloat16 weights, float32 LoRA; autocast = float32 weights "
                        "under CPU bfloat16 autocast; default: each side's best, MODEL_MODES)")
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
    p.add_argument("--model", metavar="DIR",
                   help="--step: time one S-DPO training step on this Hugging Face Llama directory, "
                        "ours vs transformers + PEFT (K = --K, --groups default 8, MovieLens rows); "
                        "--generate: greedy decoding on it")
    p.add_argument("--hf-micro-batch", type=int, default=2, metavar="N",
                   help="--step --model: transformers + PEFT runs N prompts ((1 + K) * N sequences) per "
                        "forward pass, accumulating gradients over the --groups prompts, as its "
                        "activations for all of them at once outgrow a small machine (~19 GB in "
                        "bfloat16 for 8 prompts at K=3); 0: all at once (default 2)")
    p.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                   help="--step --model: LoRA dropout on both sides (default 0, so that both compute "
                        "the same loss; train.py's default is 0.1)")
    p.add_argument("--ref-cache", action="store_true",
                   help="--step --model: also time our step with the reference log-probs cached "
                        "(minisdpo.step.RefCache, as train.py --fixed-negatives after the first epoch)")
    p.add_argument("--generate", action="store_true",
                   help="with --model: time batched greedy decoding (model.generate, KV cache), "
                        "float32 vs bfloat16")
    p.add_argument("--batch", type=int, default=16, help="--generate: prompts per batch (default 16)")
    p.add_argument("--new-tokens", type=int, default=20, help="--generate: tokens per prompt (default 20)")
    # Internal: the child process of peak_memory.
    p.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.generate and not args.model:
        p.error("--generate needs --model DIR")
    if args.model and not (args.step or args.generate):
        p.error("--model goes with --step or --generate")
    if "autocast" in (args.dtype or []) and not args.model:
        p.error("--dtype autocast only applies to --step --model and --generate")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if (args.repeats is not None and args.repeats < 1) or args.K < 1:
        p.error("--repeats and --K must be >= 1")
    if min(args.negatives) < 1 or (args.groups is not None and args.groups < 1):
        p.error("--negatives and --groups must be >= 1")
    if args.model:
        if args.batch < 1 or args.new_tokens < 1 or args.hf_micro_batch < 0:
            p.error("--batch and --new-tokens must be >= 1, --hf-micro-batch >= 0")
        if not 0 <= args.lora_dropout < 1:
            p.error("--lora-dropout must be in [0, 1)")
        return args
    if args.dtype is None:
        args.dtype = ["float32"] if args.step else ["float32", "bfloat16"]
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
    from minisdpo.batches import build_batch
    from minisdpo.model import Llama, ModelArgs
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
            tokens = {v: batches[v].num_tokens for v in STEP_VARIANTS}
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


# --------------------------------------------------------------------------------------------
# --step --model DIR: one S-DPO training step on a real checkpoint, ours vs transformers + PEFT

MODEL_SIDES = ("ours", "hf_peft")
MODEL_MODES = ("float32", "bfloat16", "autocast")
# Each side's fastest mode on this project's CPU (AVX512-BF16), from sweeps with
# --dtype float32 bfloat16 autocast recorded in docs/benchmarks.md; the default run times these.
# transformers + PEFT runs as fast under autocast as with bfloat16 weights (within 2%, autocast
# ahead in the cleanest sweep): it gets autocast, the mode a Trainer with bf16=True would use.
BEST_MODE = {"ours": "bfloat16", "hf_peft": "autocast"}
MODEL_GROUPS, MODEL_REPEATS = 8, 3
LORA_R, LORA_ALPHA, BETA, LR = 8, 32.0, 1.0, 1e-4
DATA_SET = "movielens"


def model_tokenizer(model_dir: str, vocab_size: int):
    """The checkpoint's own tokenizer (minisdpo.tokenizer.Tokenizer.from_dir), or, for a
    directory without one, the synthetic WordTokenizer over the model's vocabulary: the step's
    cost depends on the token counts, not on which ids they are."""
    from minisdpo.tokenizer import Tokenizer
    try:
        tok = Tokenizer.from_dir(model_dir)
    except (FileNotFoundError, ValueError):
        return WordTokenizer(vocab_size), "WordTokenizer (synthetic: the directory has no tokenizer)"
    if not hasattr(tok, "prompt_ids"):   # an older Tokenizer: the plain [BOS] + text prompt
        tok.prompt_ids = lambda text: tok.encode(text, bos=True)
    return tok, f"{type(tok).__name__}.from_dir ({os.path.basename(getattr(tok, 'path', model_dir))})"


def model_batches(model_dir: str, K: int, groups: int, micro: int = 0, seed: int = 0) -> dict:
    """The first ``groups`` MovieLens training rows with K seeded negatives each, in both
    layouts: ``packed`` (ours) and ``plain`` (1 + K right-padded full sequences per row), the
    latter also in micro-batches of ``micro`` prompts (0: one batch)."""
    from minisdpo.batches import build_batch
    from minisdpo.checkpoint import load_config
    import random
    args = load_config(model_dir)
    tok, tok_name = model_tokenizer(model_dir, args.vocab_size)
    rows = D.load_dataset(DATA_SET)["train"][:groups]
    if len(rows) < groups:
        raise ValueError(f"{DATA_SET} has only {len(rows)} training rows, fewer than --groups {groups}")
    rng = random.Random(seed)
    negatives = [D.sample_negatives(row, K, rng) for row in rows]
    domain = D.default_domain(DATA_SET)
    packed = build_batch(tok, rows, negatives, MAX_LEN, domain=domain, packing="shared")
    plain = build_batch(tok, rows, negatives, MAX_LEN, domain=domain, packing="none")
    # transformers + PEFT's micro-batches: ``micro`` prompts each, padded to their own longest
    # sequence, as a data loader with gradient accumulation would give them.
    micro = micro or groups
    plain_micro = [build_batch(tok, rows[i:i + micro], negatives[i:i + micro], MAX_LEN, domain=domain,
                               packing="none") for i in range(0, groups, micro)]
    prompt_lens = [len(D.encode_prompt(tok, row, domain)) for row in rows]
    return {"packed": packed, "plain": plain, "plain_micro": plain_micro, "tokenizer": tok_name,
            "prompt_tokens": prompt_lens, "negatives": negatives}


def lora_init(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Adapter weights for both sides, under our names: A as LoRA initialises it, B small but
    non-zero, so that the policy differs from the reference and the loss is not just log(1+K)."""
    from minisdpo.lora import lora_state_dict
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(lora_state_dict(model).items()):
        if ".lora_A." in name:
            bound = 1.0 / t.shape[1] ** 0.5
            out[name] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
        else:
            out[name] = torch.randn(t.shape, generator=g) * 0.02
    return out


def _mode_context(mode: str):
    import contextlib
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()


def _mode_dtype(mode: str) -> torch.dtype:
    return torch.bfloat16 if mode == "bfloat16" else torch.float32


def build_ours(model_dir: str, mode: str, batches: dict, K: int, lora: dict, dropout: float = 0.0,
               ref_cached: bool = False):
    """Our step: minisdpo.model.Llama + LoRA, the packed batch, the reference log-probs once per
    batch (adapter disabled, no grad), sdpo_linear_loss, backward, AdamW. With ``ref_cached``
    the reference log-probs come from a minisdpo.step.RefCache (train.py --fixed-negatives from
    the second epoch on): filled by the first call, read by the later ones. Returns step() -> loss."""
    from minisdpo.checkpoint import from_pretrained
    from minisdpo.lora import apply_lora, load_lora_state_dict, mark_only_lora_as_trainable
    from minisdpo.step import RefCache, sdpo_loss_sum
    model = from_pretrained(model_dir, dtype=_mode_dtype(mode))
    apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=dropout)
    load_lora_state_dict(model, lora)
    mark_only_lora_as_trainable(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = batches["packed"]
    groups = batch.labels.shape[0] // (1 + K)
    cache = dict(ref_cache=RefCache(), ref_keys=[RefCache.key(i, n) for i, n in
                                                 enumerate(batches["negatives"])]) if ref_cached else {}

    def step() -> float:
        with _mode_context(mode):
            loss, _, _ = sdpo_loss_sum(model, batch, ops, BETA, K, head="linear", **cache)
            loss = loss / groups
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def build_hf_peft(model_dir: str, mode: str, batches: dict, K: int, lora: dict, dropout: float = 0.0):
    """transformers + PEFT the usual way: LlamaForCausalLM + get_peft_model, 1 + K right-padded
    full sequences per prompt, full-vocabulary logits, log_softmax gathered at the response
    tokens (minisdpo.loss), the reference under ``disable_adapter()`` and no_grad, the S-DPO
    loss (minisdpo.loss), backward, AdamW. Returns step() -> loss."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from minisdpo.lora import DEFAULT_TARGETS
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=_mode_dtype(mode))
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=dropout, bias="none",
                        target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    with warnings.catch_warnings():        # PEFT calls a deprecated transformers property
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, config)   # adapters of a bfloat16 base kept in float32
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in lora.items():
            params["base_model.model." + name.replace(".weight", ".default.weight")].copy_(t)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    micro_batches = batches["plain_micro"]
    groups = batches["plain"].labels.shape[0] // (1 + K)

    def step() -> float:
        total = 0.0
        for batch in micro_batches:         # gradient accumulation: the mean over all groups
            ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
            share = labels.shape[0] / (1 + K) / groups
            with _mode_context(mode):
                with model.disable_adapter(), torch.no_grad():
                    ref_logps = ref.sequence_logps(model(input_ids=ids, attention_mask=mask,
                                                         use_cache=False).logits, labels)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (S, T, V)
                loss, _ = ref.sdpo_loss(logits, labels, ref_logps, beta=BETA, num_negatives=K)
                del logits
            (loss * share).backward()
            total += loss.item() * share
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total
    return step


MODEL_BUILDERS = {"ours": build_ours, "hf_peft": build_hf_peft,
                  "ours_ref_cached": lambda *a, **k: build_ours(*a, **k, ref_cached=True)}


def _lora_for(model_dir: str) -> dict[str, torch.Tensor]:
    # The adapter tensors' names and shapes from a meta-device model: no weights read.
    from minisdpo.checkpoint import load_config
    from minisdpo.lora import apply_lora
    from minisdpo.model import Llama
    with torch.device("meta"):
        shell = apply_lora(Llama(load_config(model_dir)), r=LORA_R, alpha=LORA_ALPHA)
    return lora_init(shell)


def _clear_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux: "5" into /proc/self/clear_refs), so the
    next peak_rss() is the peak of what runs after; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    except (OSError, StopIteration):
        return peak_rss()


def model_memory_child(args: argparse.Namespace) -> None:
    """One step of one side in this fresh process: the peak resident set during the step (model,
    batch, activations, gradients, optimizer), and its growth over what was resident before."""
    side, mode = args.memory_child, args.dtype[0]
    batches = model_batches(args.model, args.K, args.groups, args.hf_micro_batch)
    step = MODEL_BUILDERS[side](args.model, mode, batches, args.K, _lora_for(args.model),
                                dropout=args.lora_dropout)
    cleared = _clear_peak_rss()
    before = _rss() if cleared else peak_rss()
    step()
    peak = peak_rss()
    print(json.dumps({"peak_bytes": peak, "step_bytes": peak - before, "exact": cleared}))


def model_peak_memory(side: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "minisdpo.bench", "--step", "--model", args.model,
           "--memory-child", side, "--dtype", mode, "--K", str(args.K), "--groups", str(args.groups),
           "--hf-micro-batch", str(args.hf_micro_batch), "--lora-dropout", str(args.lora_dropout),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main_model_step(args: argparse.Namespace, info: dict) -> dict:
    K, groups, repeats = args.K, args.groups, args.repeats
    sides = MODEL_SIDES + (("ours_ref_cached",) if args.ref_cache else ())
    modes = {side: list(args.dtype) if args.dtype else [BEST_MODE[side.split("_ref")[0]]] for side in sides}
    batches = model_batches(args.model, K, groups, args.hf_micro_batch)
    packed, plain = batches["packed"], batches["plain"]
    print(f"# minisdpo.bench --step --model: one S-DPO training step (reference log-probs, policy "
          f"forward, loss, backward, AdamW step) on {args.model}")
    print(f"{DATA_SET} train rows 0..{groups - 1}, K={K} seeded negatives, beta={BETA}, max_len "
          f"{MAX_LEN}; tokenizer: {batches['tokenizer']}; prompt tokens {min(batches['prompt_tokens'])}-"
          f"{max(batches['prompt_tokens'])}")
    print(f"LoRA r={LORA_R} alpha={LORA_ALPHA:g} dropout {args.lora_dropout:g} on q,k,v,o,gate,up,down, "
          f"the same initial adapter on both sides (B non-zero); AdamW lr {LR:g}"
          + ("; with dropout the two sides draw different masks, so their losses differ"
             if args.lora_dropout else ""))
    print(f"ours: packed {tuple(packed.input_ids.shape)} ({packed.num_tokens} real tokens), "
          f"LM head on {tuple(packed.labels.shape)} response slots, sdpo_linear_loss")
    shapes = " + ".join(str(tuple(b.input_ids.shape)) for b in batches["plain_micro"])
    print(f"hf_peft: right-padded sequences {shapes}, in {len(batches['plain_micro'])} micro-batch(es) "
          f"of {args.hf_micro_batch or groups} prompts with gradient accumulation ({plain.num_tokens} "
          f"real tokens), full logits (vocabulary {load_vocab(args.model)}), minisdpo.loss.sdpo_loss")
    print(f"ms = median of {repeats} interleaved runs after 1 warm-up each; loss = the warm-up "
          f"step's (same batch, same adapter); peak MB = peak RSS (VmHWM) of one step in its own "
          f"process, step MB = its growth over the model + batch")
    lora = _lora_for(args.model)
    # One round per mode, the two sides interleaved within it: both see the same load, and only
    # two models (and one transformers step's activations, ~10 GB in float32) are alive at once.
    first_loss, times = {}, {}
    for r in range(max(len(m) for m in modes.values())):
        round_ = [(side, modes[side][min(r, len(modes[side]) - 1)]) for side in sides]
        round_ = [key for key in round_ if key not in times]
        steps = {}
        for key in round_:
            steps[key] = MODEL_BUILDERS[key[0]](args.model, key[1], batches, K, lora,
                                                dropout=args.lora_dropout)
            first_loss[key] = steps[key]()                                    # warm-up
            times[key] = []
        for _ in range(repeats):
            for key, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - t0)
        del steps
        gc.collect()
        print("  round " + ", ".join(f"{side} {mode}: {statistics.median(times[(side, mode)]) * 1e3:.0f} ms"
                                    for side, mode in round_), flush=True)
    medians = {key: statistics.median(t) for key, t in times.items()}
    best = {side: min(modes[side], key=lambda m: medians[(side, m)]) for side in sides}
    memory = {} if args.no_memory else {side: model_peak_memory(side, best[side], args)
                                        for side in MODEL_SIDES}
    print(f"{'side':<15} {'mode':<9} {'ms':>9} {'runs ms':<24} {'loss':>9} {'peak MB':>8} {'step MB':>8}")
    results: dict = {}
    for side, mode in ((side, mode) for side in sides for mode in modes[side]):
        t = times[(side, mode)]
        chosen = best[side] == mode
        mem = memory.get(side) if chosen else None
        peak_mb = mem["peak_bytes"] / 2**20 if mem else None
        step_mb = mem["step_bytes"] / 2**20 if mem else None
        runs = " ".join(f"{x * 1e3:.0f}" for x in t)
        print(f"{side:<15} {mode:<9} {medians[(side, mode)] * 1e3:9.0f} {runs:<24} "
              f"{first_loss[(side, mode)]:9.5f} "
              + (f"{peak_mb:8.0f} {step_mb:8.0f}" if mem else f"{'-':>8} {'-':>8}")
              + ("  <- fastest" if chosen and len(modes[side]) > 1 else ""))
        entry = {"ms": medians[(side, mode)] * 1e3, "runs_ms": [x * 1e3 for x in t],
                 "loss": first_loss[(side, mode)], "dtype": mode}
        results.setdefault("tried", {}).setdefault(side, {})[mode] = entry
        if chosen:
            results[side] = {**entry, "peak_mb": peak_mb, "step_mb": step_mb}
    ours, hf = results["ours"], results["hf_peft"]
    results["speedup"] = hf["ms"] / ours["ms"]
    results["memory_ratio"] = (hf["peak_mb"] / ours["peak_mb"]) if memory else None
    results["loss_diff"] = abs(hf["loss"] - ours["loss"])
    results["setup"] = {"model": args.model, "K": K, "groups": groups, "repeats": repeats,
                        "tokenizer": batches["tokenizer"], "threads": torch.get_num_threads(),
                        "tokens": {"ours": packed.num_tokens, "hf_peft": plain.num_tokens},
                        "hf_micro_batch": args.hf_micro_batch or groups,
                        "shapes": {"ours": list(packed.input_ids.shape),
                                   "hf_peft": [list(b.input_ids.shape) for b in batches["plain_micro"]]}}
    results["machine"] = info
    print(f"speedup (hf_peft {hf['dtype']} / ours {ours['dtype']}): {results['speedup']:.2f}x"
          + (f"; peak memory hf_peft / ours: {results['memory_ratio']:.2f}x" if memory else "")
          + f"; |loss difference| {results['loss_diff']:.2e}")
    if "ours_ref_cached" in results:
        results["speedup_ref_cached"] = hf["ms"] / results["ours_ref_cached"]["ms"]
        print(f"speedup with our reference log-probs cached: {results['speedup_ref_cached']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


def load_vocab(model_dir: str) -> int:
    from minisdpo.checkpoint import load_config
    return load_config(model_dir).vocab_size


# --------------------------------------------------------------------------------------------
# --generate --model DIR: batched greedy decoding with the KV cache, float32 vs bfloat16

def main_generate(args: argparse.Namespace, info: dict) -> dict:
    from minisdpo.checkpoint import from_pretrained, load_config
    modes = list(args.dtype or ["float32", "bfloat16"])
    if "autocast" in modes:
        raise SystemExit("--generate: --dtype autocast is not a generation mode (float32, bfloat16)")
    tok, tok_name = model_tokenizer(args.model, load_config(args.model).vocab_size)
    rows = D.load_dataset(DATA_SET)["train"][:args.batch]
    prompts = [D.encode_prompt(tok, row, D.default_domain(DATA_SET)) for row in rows]
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, T), D.padding_id(tok), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, ids in enumerate(prompts):                    # left-padded, as evaluate.py does
        input_ids[b, T - len(ids):] = torch.tensor(ids)
        attention_mask[b, T - len(ids):] = 1
    repeats = args.repeats or MODEL_REPEATS
    print(f"# minisdpo.bench --generate: greedy decoding of {B} {DATA_SET} prompts "
          f"({min(map(len, prompts))}-{T} tokens, left-padded to {T}), {args.new_tokens} new tokens "
          f"each (no early stop at EOS), model.generate with the KV cache, on {args.model}")
    print(f"tokenizer: {tok_name}; ms = median of {repeats} interleaved runs after 1 warm-up each; "
          f"prefill ms = the prompt pass alone")
    models = {m: from_pretrained(args.model, dtype=DTYPES[m]) for m in modes}

    def prefill(model):
        from minisdpo.model import KVCache
        cache = KVCache(model.args, B, T + 1, model.cache_dtype(), "cpu")
        model.prefill(input_ids, attention_mask, cache)

    def generate(model):
        return model.generate(input_ids, args.new_tokens, None, attention_mask=attention_mask)
    outputs = {m: generate(model) for m, model in models.items()}      # warm-up
    for model in models.values():
        prefill(model)
    times: dict[str, dict[str, list[float]]] = {m: {"generate": [], "prefill": []} for m in modes}
    for _ in range(repeats):
        for m, model in models.items():
            for what, fn in (("generate", generate), ("prefill", prefill)):
                t0 = time.perf_counter()
                fn(model)
                times[m][what].append(time.perf_counter() - t0)
    results = {"setup": {"model": args.model, "batch": B, "prompt_tokens": T,
                         "new_tokens": args.new_tokens, "repeats": repeats, "tokenizer": tok_name,
                         "threads": torch.get_num_threads()}, "machine": info}
    print(f"{'dtype':<9} {'gen ms':>8} {'prefill ms':>10} {'decode ms/token':>15} {'new tokens/s':>12} "
          f"{'same tokens as ' + modes[0]:>24}")
    for m in modes:
        gen, pre = (statistics.median(times[m][w]) for w in ("generate", "prefill"))
        per_token = (gen - pre) / max(args.new_tokens - 1, 1)
        same = float((outputs[m] == outputs[modes[0]]).float().mean())
        results[m] = {"ms": gen * 1e3, "prefill_ms": pre * 1e3, "decode_ms_per_token": per_token * 1e3,
                      "tokens_per_s": B * args.new_tokens / gen, "agreement": same}
        print(f"{m:<9} {gen * 1e3:8.0f} {pre * 1e3:10.0f} {per_token * 1e3:15.1f} "
              f"{B * args.new_tokens / gen:12.1f} {same:24.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.model and not args.generate:
        args.groups = args.groups or MODEL_GROUPS
        args.repeats = args.repeats or MODEL_REPEATS
    if args.memory_child:
        (model_memory_child if args.model else step_memory_child if args.step else memory_child)(args)
        return {}
    if args.step or args.generate:
        info = machine()
        print("command: python -m minisdpo.bench " + " ".join(sys.argv[1:] if argv is None else argv))
        for k, v in info.items():
            print(f"{k}: {v}")
        if args.generate:
            return main_generate(args, info)
        return main_model_step(args, info) if args.model else main_step(args, info)
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
