"""The training loop shared by the SFT, S-DPO and DPO stages of ``python -m minisdpo.train``.

``train_stage(model, spec, cfg, data, env=..., out=..., backend=...)`` trains the model's
trainable parameters (a LoRA adapter, or every weight of a small model from scratch) in place.
``cfg`` is the run's configuration, ``python -m minisdpo.train``'s parsed flags (``LoopConfig``
lists what the loop reads); ``spec`` what differs between stages. Each micro-batch's loss is a
``minisdpo.step.StageLoss``, made once per stage:

* the rows of an optimizer step are ``cfg.batch_size * cfg.grad_accum * env.world``, in an order
  shuffled per epoch by (seed, stage, epoch); each process takes every ``world``-th of them in
  micro-batches of ``cfg.batch_size``, and the loss of each micro-batch is divided by the terms
  of the whole step (response tokens for SFT, groups for S-DPO: ``StageLoss``'s ``n_terms``), so
  accumulation and data parallelism give the gradient of one big batch;
* AdamW (``cfg.adam_betas``, default 0.9/0.95; the public S-DPO scripts use PyTorch's default
  0.9/0.999), linear warm-up then cosine decay, gradient clipping;
* S-DPO negatives drawn anew every epoch, or once with ``cfg.fixed_negatives`` (then the frozen
  reference model's log-probs of a group are computed once, ``minisdpo.step.RefCache``);
* with a frozen-prefix cache of the split (``StageData.train_prefix`` / ``val_prefix``,
  ``minisdpo.prefix``) every batch runs only the layers above the cache's boundary, and the
  reference log-probs of all of a row's candidates are computed once, when the row is first
  met, whatever its negatives;
* the validation loss (fixed negatives) every ``spec.eval_every`` (else ``cfg.eval_every``)
  steps, or every such fraction of the stage's steps when it is below 1 (as Hugging Face's
  ``eval_steps``), and at the end keeps the best parameters, which are restored when the stage
  ends: model selection on the validation split only;
* every ``cfg.ckpt_every`` steps an atomic ``OUT/<stage>/state.pt`` (parameters, optimizer,
  schedule, step, best, RNG) from which a resumed run continues with the same results;
* a non-finite loss or gradient norm stops the stage before the update, naming the step.

Per-step records go to ``OUT/metrics.jsonl``. ``train.py`` keeps the command line, the stages'
order and the report.
"""
from __future__ import annotations

import math
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minisdpo import data as D
from minisdpo.loss import metrics as preference_metrics, start_loss
from minisdpo.run import append_jsonl, atomic_save, truncate_metrics
from minisdpo.batches import build_batch, group_responses
from minisdpo.prefix import PrefixCache
from minisdpo.step import RefCache, StageLoss

__all__ = ["Env", "LoopConfig", "StageSpec", "StageData", "barrier", "log", "lr_lambda", "eval_interval",
           "sft_terms", "validation_loss", "train_stage"]


@dataclass
class Env:
    """This process: its rank among ``world`` data-parallel processes, device and compute dtype."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def main(self) -> bool:
        return self.rank == 0


class LoopConfig(Protocol):
    """What the loop reads of the run's configuration: the flags of ``python -m minisdpo.train``
    of the same names (their help says what each means)."""

    batch_size: int
    grad_accum: int
    max_len: int
    packing: str
    beta: float
    warmup: float
    clip: float
    weight_decay: float
    max_steps: int
    eval_every: float
    ckpt_every: int
    fixed_negatives: bool
    adam_betas: Sequence[float]
    seed: int
    no_progress: bool
    item_lr_scale: float


@dataclass(frozen=True)
class StageSpec:
    name: str                 # "sft", "sdpo" or "dpo"
    lr: float
    epochs: float
    negatives: int = 0        # K negatives per prompt; 0 for SFT
    eval_every: float | None = None   # this stage's validation interval (None: cfg.eval_every)


@dataclass(frozen=True)
class StageData:
    """The rows a stage trains and validates on, and how they become tokens."""

    tok: Any                  # minisdpo.data.TokenizerLike
    domain: str
    train: Sequence[D.Row]
    val: Sequence[D.Row]
    # Frozen-prefix caches of exactly these rows at the boundary of the model's LoRA layers
    # (None: the whole model runs on every batch).
    train_prefix: PrefixCache | None = None
    val_prefix: PrefixCache | None = None


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


def log(env: Env, msg: str) -> None:
    if env.main:
        tqdm.write(msg)


def lr_lambda(step: int, total: int, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 0 (the schedule of the public scripts)."""
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def eval_interval(every: float, total: int) -> int:
    """Steps between validations for an ``eval_every`` of N steps, or of a fraction 0 < N < 1
    of the stage's ``total`` steps (rounded up, as Hugging Face's Trainer does); 0: none."""
    if every < 0 or (every >= 1 and every != int(every)):
        raise ValueError(f"eval_every must be 0, a fraction in (0, 1) or a whole number of steps, got {every!r}")
    if 0 < every < 1:
        return max(1, math.ceil(every * total))
    return int(every)


def sft_terms(tok: Any, rows: Sequence[D.Row]) -> int:
    """Response tokens (title + EOS) of the rows: the SFT loss is their mean."""
    return sum(len(D.encode_response(tok, r.target)) for r in rows)


def _batch(cfg: LoopConfig, data: StageData, prefix: PrefixCache | None, rows: Sequence[D.Row],
           ids: Sequence[int], negatives, device: torch.device):
    """The batch of rows[i] for i in ids (negatives: one list per id, or None for SFT)."""
    part = [rows[i] for i in ids]
    if prefix is not None:
        return prefix.batch(ids, group_responses(part, negatives)).to(device)
    return build_batch(data.tok, part, negatives, cfg.max_len, domain=data.domain, packing=cfg.packing).to(device)


def micro_batch(objective: StageLoss, cfg: LoopConfig, data: StageData, prefix: PrefixCache | None,
                rows: Sequence[D.Row], ids: Sequence[int], negatives: Sequence[Sequence[str]] | None,
                ref_cache: RefCache | None, n_terms: int, device: torch.device, key=lambda i: i):
    """The loss of rows[i] for i in ids (their ``negatives[i]``, None for SFT) over ``n_terms``, a
    training or a validation micro-batch alike: the batch, the reference's log-probs (read from
    ``ref_cache`` under ``key(i)`` when given; with a prefix cache every candidate of a row is
    put there at once), the loss. Returns (loss, logps, ref_logps, batch)."""
    negs = [negatives[i] for i in ids] if negatives else None
    if negs and ref_cache is not None and prefix is not None:
        objective.fill_reference(prefix, ids, ref_cache, key=key, batch_size=cfg.batch_size, device=device)
    batch = _batch(cfg, data, prefix, rows, ids, negs, device)
    ref = None
    if negs:
        keys = ([RefCache.key(key(i), [rows[i].target, *negatives[i]]) for i in ids]
                if ref_cache is not None else None)
        ref = objective.reference(batch, ref_cache, keys)
    loss, logps = objective(batch, n_terms, ref)
    return loss, logps, ref, batch


@torch.no_grad()
def validation_loss(objective: StageLoss, cfg: LoopConfig, data: StageData, env: Env,
                    ref_cache: RefCache | None = None) -> float:
    """Mean loss on the validation rows (fixed negatives), for choosing the best checkpoint."""
    model, k = objective.model, objective.negatives
    model.eval()
    rows = data.val
    negatives = D.epoch_negatives(rows, k, cfg.seed, 0, fixed=True) if k else None
    total, terms = 0.0, 0
    for start in range(0, len(rows), cfg.batch_size):
        ids = range(start, min(start + cfg.batch_size, len(rows)))
        # n_terms 1: the batch's sum, divided below
        value, *_ = micro_batch(objective, cfg, data, data.val_prefix, rows, ids, negatives, ref_cache, 1,
                                env.device, key=lambda i: ("val", i))
        total += float(value)
        terms += len(ids) if k else sft_terms(data.tok, [rows[i] for i in ids])
    model.train()
    return total / terms


def _weighted_mean(items: list[tuple[int, dict]]) -> dict:
    if not items:
        return {}
    n = sum(w for w, _ in items)
    return {k: sum(w * s[k] for w, s in items) / n for k in items[0][1]}


def _all_reduce_floats(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def train_stage(model: torch.nn.Module, spec: StageSpec, cfg: LoopConfig, data: StageData, *, env: Env,
                out: Path, backend) -> dict:
    """Train ``model``'s trainable parameters in place; returns the stage's summary (steps,
    examples_seen, best_step, best_val_loss, start_val_loss for a preference stage, and train_s:
    the seconds of its steps, those a resumed stage kept from before the interruption included).
    Resumes from OUT/<stage>/state.pt when it exists."""
    stage_dir = out / spec.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    rows = data.train
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    steps_per_epoch = math.ceil(len(rows) / global_batch)
    total = max(1, int(math.ceil(spec.epochs * steps_per_epoch)))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The item tokens' projector (minisdpo.items) at --item-lr-scale times the stage's rate.
    groups = [{"params": [p for n, p in params if n.startswith("items.") == item], "lr": spec.lr * scale}
              for item, scale in ((False, 1.0), (True, cfg.item_lr_scale))]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.adam_betas))
    every = eval_interval(cfg.eval_every if spec.eval_every is None else spec.eval_every, total)
    objective = StageLoss(model, backend, packing=cfg.packing, negatives=spec.negatives, beta=cfg.beta)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, cfg.warmup))
    state_path, best_path = stage_dir / "state.pt", stage_dir / "best.pt"
    metrics_path = out / "metrics.jsonl"

    step, best = 0, {"val_loss": math.inf, "step": -1}
    done_s = 0.0     # seconds of the steps a resumed stage kept from before the interruption
    if state_path.exists():
        try:
            # Tensors and plain values only: a state.pt from elsewhere cannot run code here.
            state = torch.load(state_path, weights_only=True)
        except pickle.UnpicklingError as e:
            raise SystemExit(f"error: --resume: {state_path} holds more than tensors and plain values, so it "
                             f"was not written by minisdpo's trainer; refusing to load it ({str(e).splitlines()[0]})"
                             ) from None
        with torch.no_grad():
            for (n, p) in params:
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = state["step"], state["best"]
        done_s = state.get("train_s", 0.0)
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
                         "rng": torch.get_rng_state(), "train_s": done_s + time.time() - t_start}, state_path)
        barrier(env)

    def validate(step: int) -> None:
        nonlocal best
        val = validation_loss(objective, cfg, data, env, val_cache)
        record = {"stage": spec.name, "step": step, "val_loss": val}
        if val < best["val_loss"]:
            best = {"val_loss": val, "step": step}
            if env.main:
                atomic_save({n: p.detach().cpu() for n, p in params}, best_path)
        if env.main:
            append_jsonl(metrics_path, record)
        log(env, f"[{spec.name}] step {step}: validation loss {val:.4f} (best {best['val_loss']:.4f} "
                 f"at step {best['step']})")

    # The validation negatives are always fixed; the training ones when cfg.fixed_negatives, or
    # any with a prefix cache, which computes the reference log-probs of all candidates at once.
    prefix = data.train_prefix
    val_cache = RefCache() if spec.negatives else None
    ref_cache = RefCache() if spec.negatives and (cfg.fixed_negatives or prefix is not None) else None
    model.train()
    bar = tqdm(total=total, initial=step, desc=spec.name, disable=cfg.no_progress or not env.main,
               dynamic_ncols=True)
    negatives_epoch, negatives = -1, None
    t_start = time.time()
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != negatives_epoch:
            negatives_epoch = epoch
            negatives = (D.epoch_negatives(rows, spec.negatives, cfg.seed, epoch, fixed=cfg.fixed_negatives)
                         if spec.negatives else None)
            order = list(range(len(rows)))
            random.Random(f"order:{cfg.seed}:{spec.name}:{epoch}").shuffle(order)
        chosen = order[index * global_batch:(index + 1) * global_batch]
        n_terms = len(chosen) if spec.negatives else sft_terms(data.tok, [rows[i] for i in chosen])
        mine = chosen[env.rank::env.world]
        t0 = time.time()
        loss, stats_acc, tokens = 0.0, [], 0
        for m in range(0, len(mine), cfg.batch_size):
            part = mine[m:m + cfg.batch_size]
            value, logps, ref, batch = micro_batch(objective, cfg, data, prefix, rows, part, negatives, ref_cache,
                                                   n_terms, env.device)
            value.backward()
            loss += float(value.detach())
            tokens += batch.num_tokens
            if negatives:
                stats_acc.append((len(part), preference_metrics(logps.detach(), ref, cfg.beta, spec.negatives)))
        stats = _weighted_mean(stats_acc)
        if env.world > 1:
            for _, p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            loss, tokens = _all_reduce_floats([loss, float(tokens)])
            stats = dict(zip(stats, _all_reduce_floats([v / env.world for v in stats.values()])))
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.clip or float("inf"))
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
        if every and step % every == 0 and step < total:
            validate(step)
        if step % cfg.ckpt_every == 0 or step == total:
            if step == total:
                validate(step)
            checkpoint(step)
    bar.close()
    if best_path.exists() and best["step"] != step:
        log(env, f"[{spec.name}] restoring the best checkpoint (step {best['step']})")
        saved = torch.load(best_path, weights_only=True)
        with torch.no_grad():
            for n, p in params:
                p.copy_(saved[n])
    seen = sum(min(global_batch, len(rows) - (s % steps_per_epoch) * global_batch) for s in range(total))
    info = {"steps": total, "examples_seen": seen, "best_step": best["step"], "best_val_loss": best["val_loss"],
            "train_s": done_s + time.time() - t_start}
    if spec.negatives:
        # A preference stage starts with the policy equal to its reference (a zero adapter on
        # the SFT model, or the SFT adapter and its frozen copy), where the loss of every group
        # is exactly ln(1 + K): the bar its validation loss must get under.
        info["start_val_loss"] = start_loss(spec.negatives)
        if math.isfinite(best["val_loss"]) and best["val_loss"] > info["start_val_loss"]:
            log(env, f"[{spec.name}] warning: the best validation loss ({best['val_loss']:.4f}, step "
                     f"{best['step']}) is above the start's ln(1+K) = {info['start_val_loss']:.4f}: on the "
                     f"validation rows this stage made the SFT model's preferences worse, not better")
    return info
