"""``python -m minisdpo.bench --step --model DIR``: one whole S-DPO training step on a real
checkpoint, ours against transformers + PEFT.

Times one S-DPO training step (reference log-probs, policy forward, loss, backward, AdamW step)
on a Hugging Face Llama directory, on the same batch of MovieLens prompts, for ``ours``
(minisdpo.model.Llama + minisdpo.lora, the packed batch, the fused linear loss) and ``hf_peft``
(transformers + PEFT the usual way: 1 + K full sequences per prompt, full-vocabulary logits, the
adapter disabled for the reference model), each in the mode it runs fastest in on the CPU
(``BEST_MODE``; ``--dtype`` sweeps modes), side by side in one process. Both start from the
same adapter, so their losses must agree (to rounding in float32). Peak memory: the peak
resident set of one step of each side in its own process.

With ``--lora-layers N`` two more sides train LoRA on the top N layers only (the same adapter
weights there): ``cached`` runs them from the frozen-prefix cache (``minisdpo.prefix``, built once
for the rows: timed apart, per row) with the reference log-probs of all candidates computed once
per row (timed apart) and read from a ``RefCache``, as ``train.py --lora-layers N`` does;
``uncached_top`` runs the whole model on every step. The JSON then has ``"cached"`` and
``"uncached"`` (today's default step, ``ours``) per group.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch

from minisdpo import data as D
from minisdpo import loss as torch_loss
from minisdpo import ops
from minisdpo.batches import build_batch
from minisdpo.bench.common import WordTokenizer, clear_peak_rss, peak_rss, rss
from minisdpo.bench.synthetic_step import MAX_LEN
from minisdpo.baselines import SASRec, SASRecRecommender
from minisdpo.checkpoint import from_pretrained, load_config
from minisdpo.items import ItemTokenizer, attach, placeholder_id
from minisdpo.lora import (DEFAULT_TARGETS, apply_lora, load_lora_state_dict, lora_state_dict,
                           mark_only_lora_as_trainable, top_layers)
from minisdpo.model import Llama
from minisdpo.prefix import PrefixCache
from minisdpo.step import RefCache, StageLoss
from minisdpo.tokenizer import Tokenizer

MODEL_SIDES = ("ours", "hf_peft")
# Each side's fastest mode on this project's CPU (AVX512-BF16), from sweeps with
# --dtype float32 bfloat16 autocast recorded in docs/benchmarks.md; the default run times these.
# transformers + PEFT runs as fast under autocast as with bfloat16 weights (within 2%, autocast
# ahead in the cleanest sweep): it gets autocast, the mode a Trainer with bf16=True would use.
BEST_MODE = {"ours": "bfloat16", "hf_peft": "autocast", "ours_ref_cached": "bfloat16", "cached": "bfloat16",
             "uncached_top": "bfloat16", "cached_items": "bfloat16"}
MODEL_GROUPS, MODEL_REPEATS = 8, 3
LORA_R, LORA_ALPHA, BETA, LR = 8, 32.0, 1.0, 1e-4
DATA_SET = "movielens"


def model_tokenizer(model_dir: str, vocab_size: int):
    """The checkpoint's own tokenizer (minisdpo.tokenizer.Tokenizer.from_dir), or, for a
    directory without one, the synthetic WordTokenizer over the model's vocabulary: the step's
    cost depends on the token counts, not on which ids they are."""
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
            "prompt_tokens": prompt_lens, "negatives": negatives, "rows": rows, "tok": tok}


def lora_init(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Adapter weights for both sides, under our names: A as LoRA initialises it, B small but
    non-zero, so that the policy differs from the reference and the loss is not just log(1+K)."""
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
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()


def _mode_dtype(mode: str) -> torch.dtype:
    return torch.bfloat16 if mode == "bfloat16" else torch.float32


def build_ours(model_dir: str, mode: str, batches: dict, K: int, lora: dict, dropout: float = 0.0,
               ref_cached: bool = False):
    """Our step: minisdpo.model.Llama + LoRA, the packed batch, the reference log-probs once per
    batch (adapter disabled, no grad), sdpo_linear_loss, backward, AdamW. With ``ref_cached``
    the reference log-probs come from a minisdpo.step.RefCache (train.py --fixed-negatives from
    the second epoch on): filled by the first call, read by the later ones. Returns step() -> loss."""
    model = from_pretrained(model_dir, dtype=_mode_dtype(mode))
    apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=dropout)
    load_lora_state_dict(model, lora)
    mark_only_lora_as_trainable(model)
    cache = dict(ref_cache=RefCache(), keys=[RefCache.key(i, [row.target, *n]) for i, (row, n) in
                                             enumerate(zip(batches["rows"], batches["negatives"]))]
                 ) if ref_cached else {}
    return _our_step(model, mode, batches["packed"], K, cache)


def _our_step(model: torch.nn.Module, mode: str, batch, K: int, refs: dict):
    """step() -> loss of our side: the S-DPO loss with the fused linear head (reference log-probs
    from ``refs``' RefCache when given), backward, AdamW on the trainable parameters."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    objective = StageLoss(model, ops, negatives=K, beta=BETA, head="linear")

    def step() -> float:
        with _mode_context(mode):
            loss, _ = objective(batch, ref_logps=objective.reference(batch, **refs))
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
                    ref_logps = torch_loss.sequence_logps(model(input_ids=ids, attention_mask=mask,
                                                                use_cache=False).logits, labels)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (S, T, V)
                loss, _ = torch_loss.sdpo_loss(logits, labels, ref_logps, beta=BETA, num_negatives=K)
                del logits
            (loss * share).backward()
            total += loss.item() * share
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total
    return step


def build_top(model_dir: str, mode: str, batches: dict, K: int, lora: dict, dropout: float = 0.0,
              lora_layers: int = 4, cached: bool = True, items: bool = False):
    """Our step with LoRA on the top ``lora_layers`` layers (``lora``'s weights there). ``cached``:
    the frozen-prefix cache of the rows and the reference log-probs of all their candidates are
    built first (their times per row in ``step.build_ms_per_row`` and ``step.ref_ms_per_row``),
    then every step runs the top layers on the policy only; else the whole model, reference
    included, as ``build_ours``. ``items``: with item tokens (``minisdpo.items``) after every
    title, their projector entering at the cache's boundary and trained with the adapter (a
    SASRec over the rows' titles with its initial embeddings: the cost is the same). Returns
    step() -> loss."""
    model = from_pretrained(model_dir, dtype=_mode_dtype(mode))
    layers = top_layers(model.args.n_layers, lora_layers)
    apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=dropout, layers=layers)
    own = lora_state_dict(model)
    load_lora_state_dict(model, {name: t for name, t in lora.items() if name in own})
    mark_only_lora_as_trainable(model)
    rows, negatives, tok = batches["rows"], batches["negatives"], batches["tok"]
    if items:
        titles = sorted({t for r in rows for t in (*r.history, *r.candidates)})
        torch.manual_seed(0)
        rec = SASRecRecommender(SASRec(len(titles) + 2), {t: i + 2 for i, t in enumerate(titles)}, {})
        # The run's default item tokens: the user's SASRec representation too, the token before its title.
        attach(model, rec, layers[0], placeholder_id(tok), user=True, before=True)
        tok = ItemTokenizer.of(tok, rec, model.args.vocab_size, before=True)
    extra: dict = {}
    if cached:
        domain = D.default_domain(DATA_SET)
        t0 = time.perf_counter()
        cache = PrefixCache.build(model, tok, rows, domain, MAX_LEN, layers[0], batch_size=4, progress=False)
        t1 = time.perf_counter()
        ref_cache = RefCache()
        StageLoss(model, ops, negatives=K).fill_reference(cache, range(len(rows)), ref_cache, batch_size=4)
        t2 = time.perf_counter()
        extra = {"build_ms_per_row": (t1 - t0) * 1e3 / len(rows), "ref_ms_per_row": (t2 - t1) * 1e3 / len(rows),
                 "cache_mb": cache.nbytes / 2**20}
        batch = cache.batch(range(len(rows)), [[r.target, *n] for r, n in zip(rows, negatives)])
        refs = dict(ref_cache=ref_cache, keys=[RefCache.key(i, [r.target, *n])
                                                   for i, (r, n) in enumerate(zip(rows, negatives))])
    else:
        batch, refs = batches["packed"], {}
    step = _our_step(model, mode, batch, K, refs)
    step.extra = extra
    return step


MODEL_BUILDERS = {"ours": build_ours, "hf_peft": build_hf_peft,
                  "ours_ref_cached": lambda *a, **k: build_ours(*a, **k, ref_cached=True),
                  "cached": build_top, "uncached_top": lambda *a, **k: build_top(*a, **k, cached=False),
                  "cached_items": lambda *a, **k: build_top(*a, **k, items=True)}
TOP_SIDES = ("cached", "uncached_top", "cached_items")


def _builder_kwargs(side: str, args: argparse.Namespace) -> dict:
    extra = {"lora_layers": args.lora_layers} if side in TOP_SIDES else {}
    return {"dropout": args.lora_dropout, **extra}


def _lora_for(model_dir: str) -> dict[str, torch.Tensor]:
    # The adapter tensors' names and shapes from a meta-device model: no weights read.
    with torch.device("meta"):
        shell = apply_lora(Llama(load_config(model_dir)), r=LORA_R, alpha=LORA_ALPHA)
    return lora_init(shell)


def memory_child(args: argparse.Namespace) -> None:
    """One step of one side in this fresh process: the peak resident set during the step (model,
    batch, activations, gradients, optimizer), and its growth over what was resident before."""
    side, mode = args.memory_child, args.dtype[0]
    batches = model_batches(args.model, args.K, args.groups, args.hf_micro_batch)
    step = MODEL_BUILDERS[side](args.model, mode, batches, args.K, _lora_for(args.model),
                                **_builder_kwargs(side, args))
    cleared = clear_peak_rss()
    before = rss() if cleared else peak_rss()
    step()
    peak = peak_rss()
    print(json.dumps({"peak_bytes": peak, "step_bytes": peak - before, "exact": cleared}))


def model_peak_memory(side: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "minisdpo.bench", "--step", "--model", args.model,
           "--memory-child", side, "--dtype", mode, "--K", str(args.K), "--groups", str(args.groups),
           "--hf-micro-batch", str(args.hf_micro_batch), "--lora-dropout", str(args.lora_dropout),
           "--threads", str(torch.get_num_threads())]
    if args.lora_layers:
        cmd += ["--lora-layers", str(args.lora_layers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args: argparse.Namespace, info: dict) -> dict:
    K, groups, repeats = args.K, args.groups, args.repeats
    ours_sides = ("ours",) if args.no_hf_peft else MODEL_SIDES
    sides = (ours_sides + (("ours_ref_cached",) if args.ref_cache else ())
             + (("cached", "uncached_top") if args.lora_layers else ())
             + (("cached_items",) if args.lora_layers and args.item_tokens else ()))
    modes = {side: list(args.dtype) if args.dtype else [BEST_MODE[side]] for side in sides}
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
    first_loss, times, extras = {}, {}, {}
    for r in range(max(len(m) for m in modes.values())):
        round_ = [(side, modes[side][min(r, len(modes[side]) - 1)]) for side in sides]
        round_ = [key for key in round_ if key not in times]
        steps = {}
        for key in round_:
            steps[key] = MODEL_BUILDERS[key[0]](args.model, key[1], batches, K, lora,
                                                **_builder_kwargs(key[0], args))
            extras[key] = getattr(steps[key], "extra", {})
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
    measured = ours_sides + (("cached", "uncached_top") if args.lora_layers else ())
    memory = {} if args.no_memory else {side: model_peak_memory(side, best[side], args) for side in measured}
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
    ours, hf = results["ours"], results.get("hf_peft")
    if hf:
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
    if hf:
        print(f"speedup (hf_peft {hf['dtype']} / ours {ours['dtype']}): {results['speedup']:.2f}x"
              + (f"; peak memory hf_peft / ours: {results['memory_ratio']:.2f}x" if memory else "")
              + f"; |loss difference| {results['loss_diff']:.2e}")
    if "ours_ref_cached" in results and hf:
        results["speedup_ref_cached"] = hf["ms"] / results["ours_ref_cached"]["ms"]
        print(f"speedup with our reference log-probs cached: {results['speedup_ref_cached']:.2f}x")
    if args.lora_layers:
        cached, top = results["cached"], results["uncached_top"]
        results["cached"] = {**cached, "ms_per_group": cached["ms"] / groups, "lora_layers": args.lora_layers,
                             **extras[("cached", best["cached"])]}
        results["uncached_top"] = {**top, "ms_per_group": top["ms"] / groups, "lora_layers": args.lora_layers}
        results["uncached"] = {"ms_per_group": ours["ms"] / groups, "peak_mb": ours["peak_mb"], "lora_layers": "all",
                               "dtype": ours["dtype"]}
        results["cached_speedup"] = ours["ms"] / cached["ms"]
        results["cached_loss_diff"] = abs(cached["loss"] - top["loss"])
        c = results["cached"]
        print(f"LoRA on the top {args.lora_layers} layers: cached {c['ms_per_group']:.0f} ms per group (cache built "
              f"once: {c['build_ms_per_row']:.0f} ms per row, reference of all candidates {c['ref_ms_per_row']:.0f} ms "
              f"per row), uncached {results['uncached_top']['ms_per_group']:.0f} ms per group; today's default "
              f"step (LoRA on every layer) {results['uncached']['ms_per_group']:.0f} ms per group: "
              f"{results['cached_speedup']:.2f}x; |loss cached - uncached| {results['cached_loss_diff']:.2e}")
    if "cached_items" in results:
        items = results["cached_items"]
        results["cached_items"] = {**items, "ms_per_group": items["ms"] / groups, "lora_layers": args.lora_layers,
                                   **extras[("cached_items", best["cached_items"])]}
        results["item_tokens_cost"] = items["ms"] / results["cached"]["ms"]
        print(f"with item tokens (the projector at the boundary, trained): cached "
              f"{results['cached_items']['ms_per_group']:.0f} ms per group, {results['item_tokens_cost']:.2f}x the "
              f"cached step without them")
    return results


def load_vocab(model_dir: str) -> int:
    return load_config(model_dir).vocab_size


