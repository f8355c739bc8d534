"""Benchmarks, side by side in one run: ``python -m minisdpo.bench [--linear | --step [--model DIR] | --generate --model DIR]``.

* no mode flag (``fused_loss``): the fused S-DPO loss (minisdpo.ops) against its plain PyTorch
  twin (minisdpo.loss), eager and compiled, forward and forward+backward, against the floor of
  one exp per logit, with the peak memory of each variant in its own process;
* ``--linear`` (``linear_loss``): the fused linear S-DPO op with a frozen LM head (LoRA), its
  two paths of the hidden states' gradient (the logits recomputed in the backward pass, or d logp
  / d hidden formed in the forward pass), against one ``h @ W^T``, with the peak memory of each;
* ``--step`` (``synthetic_step``): one S-DPO step without the optimizer on a small or larger
  random Llama with LoRA, the public code's layout (1 + K full sequences, full logits) against
  ours (packed prompt, the LM head fused into the loss);
* ``--step --model DIR`` (``model_step``): one whole S-DPO training step on a real checkpoint,
  ours against transformers + PEFT doing it the usual way, each in its fastest mode;
* ``--generate --model DIR`` (``generate``): batched greedy decoding with the KV cache, float32
  against bfloat16.

Times are medians of interleaved runs after warm-up; ``--json PATH`` writes the results.
docs/benchmarks.md holds the figures measured on this project's machine and how to read them.
"""
from __future__ import annotations

import argparse
import sys

import torch

from minisdpo.bench import fused_loss, generate, linear_loss, model_step, synthetic_step
from minisdpo.bench.common import DTYPES, machine, write_json
from minisdpo.bench.synthetic_step import NUM_CANDIDATES, STEP_MODELS

__all__ = ["parse_args", "main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minisdpo.bench", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES) + ["autocast"],
                   help="logits dtypes to run, one table each (default: float32 bfloat16); --step: "
                        "the model's dtype (default float32); --step --model / --generate: the "
                        "modes to try on each side, the fastest per side reported (float32; "
                        "bfloat16 = bfloat16 weights, float32 LoRA; autocast = float32 weights "
                        "under CPU bfloat16 autocast; default: each side's best, model_step.BEST_MODE)")
    p.add_argument("--S", type=int, default=16, help="sequences, G * (1 + K) (default 16)")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--V", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--K", type=int, default=3, help="negatives per group (default 3)")
    p.add_argument("--D", type=int, default=576, help="--linear: hidden size (default 576, SmolLM2-135M's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement, median reported (default 5; --step: 5 for the "
                        "small model, 3 for the large one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    p.add_argument("--capabilities", nargs="+", default=None, metavar="CAP",
                   choices=list(fused_loss.CAPABILITIES) + ["all"],
                   help="time the fused op once per CPU copy of its row kernels (avx512, avx2, default, "
                        "or all), each under MINISDPO_CPU_CAPABILITY=CAP, beside the same floor and "
                        "reference; copies this CPU cannot run are left out (default: the fused op as "
                        "the environment says, one row)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--linear", action="store_true",
                   help="benchmark the fused linear op (sdpo_linear_loss, frozen LM head) by its two "
                        "backward paths instead of the logits loss; --T is then the response length")
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
    p.add_argument("--lora-layers", type=int, default=None, metavar="N",
                   help="--step --model: also time the step with LoRA on the top N layers only, from the "
                        "frozen-prefix cache ('cached', as train.py --lora-layers N) and without it "
                        "('uncached_top'), beside today's default step (LoRA on every layer)")
    p.add_argument("--item-tokens", action="store_true",
                   help="--step --lora-layers N: also time the cached step with item tokens (minisdpo.items) "
                        "after every title, their projector trained at the cache's boundary")
    p.add_argument("--no-hf-peft", action="store_true",
                   help="--step --model: leave out transformers + PEFT (the slowest side; no 'hf_peft' and "
                        "'speedup' keys then)")
    p.add_argument("--generate", action="store_true",
                   help="with --model: time batched greedy decoding (model.generate, KV cache), "
                        "float32 vs bfloat16")
    p.add_argument("--batch", type=int, default=16, help="--generate: prompts per batch (default 16)")
    p.add_argument("--new-tokens", type=int, default=20, help="--generate: tokens per prompt (default 20)")
    # Internal: the child process of peak_memory.
    p.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.linear and (args.step or args.generate or args.model):
        p.error("--linear goes alone, without --step, --generate or --model")
    if args.D < 1:
        p.error("--D must be >= 1")
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
        if args.lora_layers is not None and args.lora_layers < 1:
            p.error("--lora-layers must be >= 1")
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.model and not args.generate:
        args.groups = args.groups or model_step.MODEL_GROUPS
        args.repeats = args.repeats or model_step.MODEL_REPEATS
    if args.memory_child:   # one measurement in a fresh process, started by the parent run
        child = (model_step.memory_child if args.model else synthetic_step.memory_child if args.step
                 else linear_loss.memory_child if args.linear else fused_loss.memory_child)
        child(args)
        return {}
    info = machine()
    print("command: python -m minisdpo.bench " + " ".join(sys.argv[1:] if argv is None else argv))
    for k, v in info.items():
        print(f"{k}: {v}")
    if args.generate:
        results = generate.run(args, info)
    elif args.step:
        results = model_step.run(args, info) if args.model else synthetic_step.run(args)
    elif args.linear:
        results = {"machine": info, **linear_loss.run(args)}
    else:
        results = {"machine": info, **fused_loss.run(args)}
    write_json(results, args.json)
    return results
