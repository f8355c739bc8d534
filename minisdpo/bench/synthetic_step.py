"""``python -m minisdpo.bench --step``: one S-DPO training step, the public code's layout against ours.

Times one S-DPO step of a LoRA model (r=8 on every projection, as the S-DPO scripts): the
reference model's forward pass (adapter disabled, no grad), the policy's forward pass, the loss
and the backward pass; the optimizer is excluded. Two variants of the same groups (synthetic
random-word rows: a prompt of ~300 tokens, 20 candidates of 6-10 tokens):

* ``naive``: the public S-DPO code's layout: 1 + K full prompt + response sequences per group,
  logits at every position, ``minisdpo.loss.sdpo_loss`` (plain PyTorch), for both models;
* ``efficient``: one packed sequence per group (the prompt once), the LM head on the response
  tokens only and fused into the loss (``minisdpo.ops.sdpo_linear_loss``: no logits tensor),
  the reference model through the same path (``minisdpo.step``, ``head="linear"``).

Times are medians of --repeats runs of each variant, interleaved, after one warm-up run each;
peak memory is measured per variant in its own process, above the model + inputs.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

import torch

from minisdpo import data as D
from minisdpo import loss as torch_loss
from minisdpo import ops
from minisdpo.batches import build_batch
from minisdpo.bench.common import DTYPES, WordTokenizer, peak_rss
from minisdpo.lora import apply_lora, mark_only_lora_as_trainable
from minisdpo.model import Llama, ModelArgs
from minisdpo.step import StageLoss

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


def step_rows(groups: int, K: int, seed: int = 0) -> tuple[list[D.Row], list[list[str]]]:
    """Rows with 10 history titles of 8-12 random words and 20 candidates of 6-10 (a prompt of
    about 300 tokens, responses of 6-10 tokens + EOS), and K negatives per row."""
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
    loss (the mean over groups), detached."""
    backend, head, packing = (torch_loss, "logits", "none") if variant == "naive" else (ops, "linear", "shared")
    loss, _ = StageLoss(model, backend, packing=packing, negatives=K, head=head)(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def memory_child(args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> dict:
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
    return results


