"""Recommenders that are not language models, as yardsticks: popularity and SASRec.

Both read the same rows as the language models (``minisdpo.data.Row``: a history, 20 candidates,
the target), train on the training split and rank each row's candidates by a score; a row is a
hit at k when its target is among the k best-scored candidates. They answer the question the
language model's tables cannot answer alone: how much of a row's target a recommender that knows
nothing of titles and prompts already finds.

* ``Popularity``: a candidate's score is the number of training rows whose target it is. Ties
  are broken by the number of training histories the item occurs in, then by a fixed order drawn
  from the seed (one random key per title, independent of the rows scored), so the ranking is a
  strict order: no two candidates tie, and its HR@1 is the fraction of rows whose target comes
  first in that order.
* ``SASRec`` (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), in plain
  PyTorch: item-ID embeddings plus learned position embeddings, causal self-attention blocks
  (pre-LayerNorm, one head, a ReLU feed-forward layer), a final LayerNorm; an item's score is the
  dot product of the last position's output with the item's embedding (input and output
  embeddings are shared, as in the paper). ``train_sasrec`` trains it on the training rows,
  history -> target, with cross-entropy over the whole catalogue (every item of the training
  histories and targets, plus one unknown id for items never seen in training), Adam at lr 1e-3
  and batch 256 (the setup the S-DPO paper gives for its traditional baselines), and chooses the
  number of epochs on the validation split: after every epoch it measures HR@1 on the validation
  rows and keeps the best epoch's weights, stopping after ``patience`` epochs without a gain or at
  ``max_epochs``. Equal scores (two unknown candidates, say) count against the target, the
  pessimistic rule of ``minisdpo.evaluate.rank_metrics``. Two choices made on the validation
  splits: the embeddings start small (standard deviation dim^-1/2: the first softmax is nearly
  flat; with unit-variance embeddings the first epochs went far worse and the curve collapsed
  after its peak), and there is no dropout by default (dropout 0.2 makes an epoch about 1.5 times
  as long and, for the same training time, did no better; docs/results.md, section "Baselines").

Metrics (``evaluate_scores``): hr@1, hr@5 and ndcg@5 (1 / log2(1 + rank) when rank <= 5), the
target's rank being 1 + the number of other candidates scored at least as high; with ``hits``,
one bool per row, "target ranked first", for paired tests against other models.

This module imports nothing from the model, LoRA or training side of the package: only the rows
(``minisdpo.data``). ``python -m minisdpo.baselines`` trains both on a data set and prints their
metrics on the validation and test splits (``--help``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from minisdpo import data as D

__all__ = ["BASELINES", "MAX_EPOCHS", "PATIENCE", "evaluate_scores", "Popularity", "SASRec", "SASRecRecommender",
           "train_sasrec", "parse_baselines", "run_baselines", "main"]

BASELINES = ("pop", "sasrec")
# SASRec's epochs in python -m minisdpo.baselines: at most MAX_EPOCHS, stopping after PATIENCE
# epochs without a better validation HR@1 (docs/results.md, section "Baselines").
MAX_EPOCHS, PATIENCE = 10, 2

PAD, UNKNOWN = 0, 1   # SASRec's reserved ids: left padding, and an item never seen in training
SASREC_WEIGHTS, SASREC_CONFIG = "model.safetensors", "config.json"   # SASRecRecommender.save


# --------------------------------------------------------------------------------------------
# Metrics

def _target_index(rows: Sequence[D.Row]) -> torch.Tensor:
    return torch.tensor([row.candidates.index(row.target) for row in rows])


def evaluate_scores(scores: torch.Tensor, rows: Sequence[D.Row]) -> dict:
    """hr@1, hr@5, ndcg@5 and n of candidate scores (N, C), candidates in row order, and
    ``hits``: per row, whether the target is ranked first.

    The target's rank is 1 + the number of other candidates scored at least as high (ties
    count against the target).
    """
    if scores.dim() != 2 or scores.shape[0] != len(rows) or not rows:
        raise ValueError(f"scores must be (N, C) with N = {len(rows)} rows > 0, got {tuple(scores.shape)}")
    target = scores.gather(1, _target_index(rows).view(-1, 1))                # (N, 1)
    rank = (scores >= target).sum(1).double()                                  # (N,), counts itself
    gain = torch.where(rank <= 5, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))
    return {"hr@1": (rank <= 1).double().mean().item(), "hr@5": (rank <= 5).double().mean().item(),
            "ndcg@5": gain.mean().item(), "n": len(rows), "hits": (rank <= 1).tolist()}


def _check_train(train: Sequence[D.Row]) -> None:
    if not train:
        raise ValueError("the training split is empty: a baseline learns from its rows")


# --------------------------------------------------------------------------------------------
# Popularity

class Popularity:
    """Candidates ranked by how often they were a training row's target (module docstring)."""

    def __init__(self, train: Sequence[D.Row], seed: int = 0):
        _check_train(train)
        self.seed = seed
        self.target_counts = Counter(row.target for row in train)
        self.history_counts = Counter(title for row in train for title in row.history)

    def key(self, title: str) -> tuple[int, int, float]:
        """The item's place in the order: (target count, history count, seeded random key);
        a larger key ranks higher."""
        return (self.target_counts[title], self.history_counts[title],
                random.Random(f"popularity:{self.seed}:{title}").random())

    def scores(self, rows: Sequence[D.Row]) -> torch.Tensor:
        """(N, C) float64 scores: each candidate's position in the order of ``key`` among the
        titles of ``rows`` (larger is better; no ties between different titles)."""
        titles = sorted({c for row in rows for c in row.candidates}, key=self.key)
        place = {title: float(i) for i, title in enumerate(titles)}
        return torch.tensor([[place[c] for c in row.candidates] for row in rows], dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# SASRec

def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # F.dropout draws a mask even at p = 0, one of the costliest ops of a step here.
    return F.dropout(x, p, True) if training and p > 0 else x


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a ReLU feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)   # (B, H, L, d)
        x = x + _dropout(self.proj(att.transpose(1, 2).reshape(B, L, dim)), p, self.training)
        h = _dropout(F.relu(self.ff1(self.norm2(x))), p, self.training)
        return x + _dropout(self.ff2(h), p, self.training)


class SASRec(nn.Module):
    """SASRec over item ids: ``forward(seqs)`` maps left-padded id sequences (B, L) (0 = padding)
    to the last position's representation (B, dim); ``logits`` scores it against every item."""

    def __init__(self, num_items: int, dim: int = 64, blocks: int = 2, heads: int = 1, max_len: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.max_len = max_len
        self.items = nn.Embedding(num_items, dim, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.dropout = dropout
        # Small embeddings: an item's input features (scaled by sqrt(dim)) start at unit size,
        # and its first scores, the final LayerNorm's output (norm ~ sqrt(dim)) dotted with
        # its embedding, at about 1, not sqrt(dim): a flat softmax to start from.
        with torch.no_grad():
            nn.init.normal_(self.items.weight, std=dim ** -0.5)
            nn.init.normal_(self.positions.weight, std=dim ** -0.5)
            self.items.weight[PAD] = 0

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        B, L = seqs.shape
        if L > self.max_len:
            raise ValueError(f"sequences of {L} items exceed max_len={self.max_len}")
        real = seqs != PAD                                                          # (B, L)
        x = self.items(seqs) * math.sqrt(self.items.embedding_dim)
        x = x + self.positions.weight[self.max_len - L:]   # left padding: the last item is always at max_len - 1
        x = _dropout(x, self.dropout, self.training) * real.unsqueeze(-1)
        causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
        # A position sees itself and the real items before it; a padding position sees only itself
        # (its output is never read by a real position, and a row with no key would give NaN).
        mask = (causal & real.unsqueeze(1)) | torch.eye(L, dtype=torch.bool, device=seqs.device)
        mask = mask.unsqueeze(1)                                                    # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.norm(x[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, num_items) scores of every item; the padding id can never be predicted."""
        out = hidden @ self.items.weight.T
        out[:, PAD] = float("-inf")
        return out


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """``n`` intra-op threads inside the block, the previous number after it.

    SASRec's tensors are small (256 rows of 10 items of dim 64): a second thread saves little, and
    on a busy machine every parallel region waits for a thread that does not get a core
    (docs/results.md, "Baselines", measures both).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SASRecRecommender:
    """A trained ``SASRec`` with its vocabulary: titles in, candidate scores out (computed on
    ``threads`` intra-op threads)."""

    def __init__(self, model: SASRec, vocab: dict[str, int], info: dict, threads: int = 1):
        self.model, self.vocab, self.info, self.threads = model, vocab, info, threads

    def save(self, directory: str | Path, key: dict | None = None) -> None:
        """Write the model (``model.safetensors``), its vocabulary and ``info`` into
        ``directory``, with ``key``: what trained it, for a later ``load`` to check."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        m = self.model
        config = {"num_items": m.items.num_embeddings, "dim": m.items.embedding_dim, "blocks": len(m.blocks),
                  "heads": m.blocks[0].heads, "max_len": m.max_len, "dropout": m.dropout,
                  "vocab": sorted(self.vocab, key=self.vocab.get), "info": self.info, "key": key}
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(directory / SASREC_WEIGHTS))
        tmp = directory / (SASREC_CONFIG + ".tmp")
        tmp.write_text(json.dumps(config) + "\n")
        tmp.replace(directory / SASREC_CONFIG)         # written last: the directory is complete

    @classmethod
    def load(cls, directory: str | Path, key: dict | None = None, threads: int = 1) -> SASRecRecommender | None:
        """A recommender written by ``save``, or None when ``directory`` holds none, or one
        trained otherwise than ``key`` says (when given)."""
        directory = Path(directory)
        try:
            config = json.loads((directory / SASREC_CONFIG).read_text())
        except (OSError, ValueError):
            return None
        if key is not None and config.get("key") != key:
            return None
        model = SASRec(config["num_items"], config["dim"], config["blocks"], config["heads"], config["max_len"],
                       config["dropout"])
        model.load_state_dict(load_file(str(directory / SASREC_WEIGHTS)))
        model.eval()
        vocab = {title: i + 2 for i, title in enumerate(config["vocab"])}
        return cls(model, vocab, config["info"], threads)

    def encode(self, rows: Sequence[D.Row]) -> torch.Tensor:
        """(N, max_len) ids of the rows' histories: the last max_len items, left-padded, unknown
        titles as the unknown id."""
        L = self.model.max_len
        seqs = torch.zeros(len(rows), L, dtype=torch.long)
        for i, row in enumerate(rows):
            ids = [self.vocab.get(t, UNKNOWN) for t in row.history[-L:]]
            seqs[i, L - len(ids):] = torch.tensor(ids)
        return seqs

    def candidate_ids(self, rows: Sequence[D.Row]) -> torch.Tensor:
        return torch.tensor([[self.vocab.get(c, UNKNOWN) for c in row.candidates] for row in rows])

    @torch.no_grad()
    def scores(self, rows: Sequence[D.Row], batch_size: int = 1024) -> torch.Tensor:
        """(N, C) float32 scores of the rows' candidates (larger is better)."""
        return self._scores(self.encode(rows), self.candidate_ids(rows), batch_size)

    @torch.no_grad()
    def _scores(self, seqs: torch.Tensor, cands: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        with _threads(self.threads):
            out = torch.cat([self.model.logits(self.model(seqs[i:i + batch_size])).gather(1, cands[i:i + batch_size])
                             for i in range(0, len(seqs), batch_size)])
        self.model.train(was_training)
        return out


def train_sasrec(train: Sequence[D.Row], val: Sequence[D.Row], *, dim: int = 64, blocks: int = 2,
                 heads: int = 1, max_len: int = D.MAX_HISTORY, dropout: float = 0.0, lr: float = 1e-3,
                 batch_size: int = 256, max_epochs: int = MAX_EPOCHS, patience: int = PATIENCE, seed: int = 0,
                 threads: int = 1, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> SASRecRecommender:
    """SASRec trained on ``train`` (history -> target, cross-entropy over the catalogue), its
    epochs chosen by HR@1 on ``val`` (module docstring), on ``threads`` intra-op threads (one by
    default: see ``_threads``). The result's ``info`` holds the chosen epoch, the epochs
    trained, the validation HR@1 of each and the training seconds.
    """
    _check_train(train)
    if not val:
        raise ValueError("the validation split is empty: SASRec chooses its epochs on it")
    for name, value in (("dim", dim), ("blocks", blocks), ("heads", heads), ("max_len", max_len),
                        ("batch_size", batch_size), ("max_epochs", max_epochs), ("patience", patience),
                        ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    start = time.time()
    titles = sorted({t for row in train for t in (*row.history, row.target)})
    vocab = {title: i + 2 for i, title in enumerate(titles)}                  # 0 padding, 1 unknown
    torch.manual_seed(seed)
    model = SASRec(len(vocab) + 2, dim, blocks, heads, max_len, dropout)
    rec = SASRecRecommender(model, vocab, {}, threads)
    seqs, targets = rec.encode(train), torch.tensor([vocab[row.target] for row in train])
    val_seqs, val_cands = rec.encode(val), rec.candidate_ids(val)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    best, best_state, curve, since_best = -1.0, None, [], 0
    bar = tqdm(total=max_epochs, desc="sasrec", unit="epoch", disable=not progress)
    for epoch in range(1, max_epochs + 1):
        model.train()
        with _threads(threads):
            for idx in torch.randperm(len(train), generator=order).split(batch_size):
                loss = F.cross_entropy(model.logits(model(seqs[idx])), targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        hr1 = evaluate_scores(rec._scores(val_seqs, val_cands), val)["hr@1"]
        curve.append(hr1)
        bar.update(1)
        bar.set_postfix(val_hr1=f"{hr1:.4f}", loss=f"{loss.item():.3f}")
        if hr1 > best:
            best, best_state, since_best = hr1, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    rec.info = {"epoch": curve.index(best) + 1, "epochs_trained": len(curve), "val_hr@1_curve": curve,
                "train_s": time.time() - start, "items": len(vocab)}
    if log:
        log(f"[sasrec] {len(curve)} epochs; epoch {rec.info['epoch']} kept (validation HR@1 {best:.4f})")
    return rec


# --------------------------------------------------------------------------------------------
# Both on a data set

def parse_baselines(text: str) -> tuple[str, ...]:
    """The names of a ``--baselines`` value: a comma-separated subset of BASELINES, or "none"."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise ValueError(f"unknown baseline {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"expected a comma-separated list of {', '.join(BASELINES)}, or 'none'")
    return tuple(dict.fromkeys(names))


def run_baselines(names: Sequence[str], train: Sequence[D.Row], val: Sequence[D.Row],
                  evaluate: dict[str, Sequence[D.Row]], seed: int = 0, progress: bool = True,
                  log: Callable[[str], None] | None = None, sasrec: SASRecRecommender | None = None,
                  **sasrec_kwargs) -> dict:
    """Train the baselines ``names`` on ``train`` (SASRec chooses its epochs on ``val``) and
    score each split of ``evaluate`` (a name -> rows mapping). ``sasrec``: a SASRec trained
    already (``train_sasrec``), used instead of training one.

    Returns ``{split: {name: metrics}}`` for the splits of ``evaluate`` (metrics as
    ``evaluate_scores``, with ``hits``), plus ``"seconds": {name: training and scoring time}``
    and ``"info": {name: ...}`` (SASRec's chosen epoch and validation curve).
    """
    _check_train(train)
    result: dict = {split: {} for split in evaluate}
    result["seconds"], result["info"] = {}, {}
    for name in names:
        start = time.time()
        if name == "pop":
            scorer = Popularity(train, seed).scores
            result["info"][name] = {}
        elif name == "sasrec":
            rec = sasrec or train_sasrec(train, val, seed=seed, progress=progress, log=log, **sasrec_kwargs)
            scorer, result["info"][name] = rec.scores, rec.info
        else:
            raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
        for split, rows in evaluate.items():
            result[split][name] = evaluate_scores(scorer(rows), rows)
        # Training and scoring: a SASRec trained before counts its own training seconds.
        result["seconds"][name] = time.time() - start + (sasrec.info.get("train_s", 0.0)
                                                         if name == "sasrec" and sasrec is not None else 0.0)
    return result


# --------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisdpo.baselines", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Popularity and SASRec, trained on the whole training split, evaluated (HR@1, HR@5, "
                    "NDCG@5 over each row's candidates) on the validation and test splits.")
    a = p.add_argument
    a("--data", choices=("movielens", "lastfm", "json"), default="movielens", help="data set")
    a("--data-dir", default=None, help="directory of the data files; without it, movielens is read from "
                                       "the copy in the recbole wheel")
    a("--domain", choices=D.DOMAINS, default=None,
      help="accepted so that python -m minisdpo.train's data flags work here too; the baselines read "
           "no prompts, so it changes nothing")
    a("--baselines", default=",".join(BASELINES), help="comma-separated baselines to run")
    a("--limit-val", type=int, default=0, help="use at most N validation rows (0: all)")
    a("--limit-test", type=int, default=0, help="evaluate on at most N test rows (0: all); the same rows "
                                                "as python -m minisdpo.train with the same --seed")
    a("--max-epochs", type=int, default=MAX_EPOCHS, help="SASRec: at most this many epochs")
    a("--patience", type=int, default=PATIENCE, help="SASRec: stop after this many epochs without a better "
                                              "validation HR@1")
    a("--seed", type=int, default=0, help="random seed (MovieLens's split, the subsamples, the baselines)")
    a("--threads", type=int, default=1, help="SASRec's intra-op threads (its tensors are small: on a busy "
                                             "machine more threads are slower)")
    a("--json", default=None, help="also write the metrics to this JSON file")
    a("--no-progress", action="store_true", help="no progress bars")
    return p


def _fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        names = parse_baselines(args.baselines)
    except ValueError as e:
        raise _fail(f"--baselines: {e}") from None
    if not names:
        raise _fail(f"--baselines none leaves nothing to run; name {', '.join(BASELINES)} or both")
    for name in ("limit_val", "limit_test"):
        if getattr(args, name) < 0:
            raise _fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_epochs", "patience", "threads"):
        if getattr(args, name) < 1:
            raise _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    start = time.time()
    where = f"--data {args.data}" + (f" --data-dir {args.data_dir}" if args.data_dir else "")
    try:
        splits = D.load_dataset(args.data, args.data_dir, seed=args.seed)
    except (OSError, ValueError, TypeError) as e:  # the message names the file and row
        raise _fail(f"{where}: {e}") from None
    for split, limit in (("val", args.limit_val), ("test", args.limit_test)):
        if limit:
            splits[split] = D.subsample(splits[split], limit, seed=args.seed)
    for split, why in (("train", "the baselines learn from it"), ("val", "SASRec chooses its epochs on it"),
                       ("test", "the baselines are evaluated on it")):
        if not splits[split]:
            raise _fail(f"{where}: the {split} split is empty; {why}")
    load_s = time.time() - start
    log = (lambda msg: tqdm.write(msg, file=sys.stderr))
    log(f"data {args.data}: {len(splits['train'])} train / {len(splits['val'])} val / "
        f"{len(splits['test'])} test rows")
    res = run_baselines(names, splits["train"], splits["val"], {"val": splits["val"], "test": splits["test"]},
                        seed=args.seed, progress=not args.no_progress, log=log,
                        max_epochs=args.max_epochs, patience=args.patience, threads=args.threads)
    report = {split: {name: {k: m[k] for k in ("hr@1", "hr@5", "ndcg@5", "n")} for name, m in res[split].items()}
              for split in ("val", "test")}
    report["seconds"] = {"load": load_s, **res["seconds"], "total": time.time() - start}
    if "sasrec" in res["info"]:
        info = res["info"]["sasrec"]
        report["sasrec"] = {"epoch": info["epoch"], "epochs_trained": info["epochs_trained"],
                            "val_hr@1_curve": info["val_hr@1_curve"]}
    lines = [f"{'split':<6} {'model':<7} {'hr@1':>8} {'hr@5':>8} {'ndcg@5':>8} {'rows':>7}"]
    for split in ("val", "test"):
        for name, m in report[split].items():
            lines.append(f"{split:<6} {name:<7} {m['hr@1']:>8.4f} {m['hr@5']:>8.4f} {m['ndcg@5']:>8.4f} {m['n']:>7}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    if "sasrec" in report:
        lines.append(f"sasrec: epoch {report['sasrec']['epoch']} of {report['sasrec']['epochs_trained']} "
                     f"kept by validation HR@1")
    print("\n".join(lines), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)
    return report


if __name__ == "__main__":
    main()
