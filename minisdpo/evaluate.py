"""The paper's metrics: HitRatio@1 and ValidRatio by generation; ranking metrics by likelihood.

Generation (S-DPO, Chen et al., NeurIPS 2024, sec. 4; LLaRA, Liao et al., SIGIR 2024): greedy
decoding of at most 20 new tokens from the prompt; the answer is the generated text up to EOS.
A row is *valid* when exactly one of its candidate titles occurs in the answer as a substring,
and a *hit* when it is valid and that candidate is the target. Both ratios are over all rows.
The match is case-sensitive and exact, as in the public S-DPO code (``evaluate_batch.py``:
``can in selection``). When one candidate is a substring of another ("Beck" and "Jeff Beck"),
an answer naming the longer one contains both, so the row is invalid: this is the paper's rule,
kept as it is so that figures compare with the paper's.

Ranking (an addition, not in the paper): each candidate is scored by its summed response
log-probability logp(title + EOS | prompt), the quantity S-DPO trains; the target's rank is
1 + the number of other candidates scoring at least as high (ties count against the target,
the pessimistic rule). Reported: rank_hr@1, rank_hr@5 and rank_ndcg@5 (1 / log2(1 + rank) when
rank <= 5, else 0), averaged over rows. The 20 candidates of a row share one pass over its
prompt (``minisdpo.batches.packed_batch``) and the LM head runs on their tokens only
(``minisdpo.step.StageLoss.token_logps``), which scores exactly as 20 separate prompt + title
passes; ``python -m minisdpo.train`` scores them with its loss backend's LM head, by default the
fused one of ``minisdpo.ops``.

Prompts and responses are tokenised by ``minisdpo.data`` exactly as in training. Models that
share their bottom layers (the SFT model and the adapters on its top layers) generate from one
pass of those layers, the pass that builds the rows' frozen-prefix cache for the ranking
(``generate_answers_shared``): train.py's evaluation.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from minisdpo import loss
from minisdpo.batches import collate, packed_batch
from minisdpo.data import Row, TokenizerLike, encode_group, encode_prompt, padding_id
from minisdpo.loss import LossBackend, sequence_logps
from minisdpo.prefix import PrefixCache
from minisdpo.step import StageLoss, response_logits

__all__ = ["judge", "named_candidate", "generate_answers", "generate_answers_shared", "shares_bottom", "judge_answers",
           "evaluate_generation", "mcnemar", "paired_line", "ranking_scores", "evaluate_ranking", "rank_metrics"]


def named_candidate(answer: str, candidates: Sequence[str]) -> str | None:
    """The one candidate the answer names under the paper's rule (see the module docstring), or
    None when it names none or several: the recommendation of a generated answer."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be str, got {type(answer).__name__}")
    found = [c for c in candidates if c in answer]
    return found[0] if len(found) == 1 else None


def judge(answer: str, candidates: Sequence[str], target: str) -> tuple[bool, bool]:
    """(valid, hit) of one generated answer under the paper's rule (see the module docstring)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be str, got {type(answer).__name__}")
    if target not in candidates:
        raise ValueError(f"target {target!r} is not among the candidates")
    named = named_candidate(answer, candidates)
    return named is not None, named == target


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """The model in eval mode (no dropout) inside the block, its previous mode after it."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def _check_common(rows: Sequence[Row], batch_size: int) -> None:
    if not rows:
        raise ValueError("rows is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _answer(tok: TokenizerLike, new: list[int]) -> str:
    """The decoded text of generated ids up to the first EOS."""
    return tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)


def _check_new(new: torch.Tensor, rows: int, max_new_tokens: int) -> None:
    if new.dim() != 2 or new.shape[0] != rows or new.shape[1] > max_new_tokens:
        raise RuntimeError(f"model.generate returned shape {tuple(new.shape)}, expected "
                           f"({rows}, <= {max_new_tokens})")


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


@torch.no_grad()
def generate_answers(model: Any, tok: TokenizerLike, rows: Sequence[Row], domain: str,
                     batch_size: int = 16, max_new_tokens: int = 20,
                     max_len: int | None = None, progress: bool = True) -> list[str]:
    """The model's answer to each row's prompt by batched greedy decoding, in the order of ``rows``.

    Only ``row.history`` and ``row.candidates`` are read (the prompt shows no target), so the rows
    of a recommender at inference, which have no target, serve as well as ``Row``s.
    Prompts are left-padded (with attention_mask 0 on the padding) and passed to
    ``model.generate(input_ids, max_new_tokens, eos_id, attention_mask=...)``, which returns the
    new tokens only; an answer is the decoded text up to the first EOS. With ``max_len``, a
    prompt is cut as in training (``encode_group``). Rows are batched by prompt length to save
    padding. ``generate_answers_shared`` gives the same answers for several models at once.
    """
    _check_common(rows, batch_size)
    _check_max_new_tokens(max_new_tokens)
    device, pad_id = _device(model), padding_id(tok)
    prompts = [encode_prompt(tok, row, domain) if max_len is None else
               encode_group(tok, row, row.candidates, max_len, domain)[0] for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(rows)
    with _eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[start:start + batch_size]
            T = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), T), dtype=torch.long)
            for b, i in enumerate(idx):
                n = len(prompts[i])
                input_ids[b, T - n:] = torch.tensor(prompts[i], dtype=torch.long)
                attention_mask[b, T - n:] = 1
            new = model.generate(input_ids.to(device), max_new_tokens, tok.eos_id,
                                 attention_mask=attention_mask.to(device))
            _check_new(new, len(idx), max_new_tokens)
            for b, i in enumerate(idx):
                answers[i] = _answer(tok, new[b].tolist())
    return answers


def shares_bottom(a: Any, b: Any, layer: int) -> bool:
    """Whether two ``minisdpo.model.Llama``s compute the same residual stream entering ``layer``:
    the same (or equal) tensors in their embedding, layers 0..layer-1 and item tokens added
    below ``layer``, under the same names."""
    def bottom(model: Any) -> dict[str, torch.Tensor]:
        items = getattr(model, "items", None)
        keep = ("model.embed_tokens.", *(f"model.layers.{i}." for i in range(layer)),
                *(("items.",) if items is not None and items.layer < layer else ()))
        return {k: t for k, t in [*model.named_parameters(), *model.named_buffers()] if k.startswith(keep)}
    x, y = bottom(a), bottom(b)
    return x.keys() == y.keys() and all(t is y[k] or (t.shape == y[k].shape and torch.equal(t, y[k]))
                                        for k, t in x.items())


@torch.no_grad()
def generate_answers_shared(models: Sequence[Any], tok: TokenizerLike, rows: Sequence[Row], domain: str,
                            layer: int, max_len: int, batch_size: int = 16, max_new_tokens: int = 20,
                            progress: bool = True, path: str | None = None,
                            source: str = "") -> tuple[list[list[str]], PrefixCache]:
    """``generate_answers`` of several models that share their bottom layers (a model and
    adapters on its layers from ``layer`` on), from one pass of those layers over the rows.

    That pass is the one that builds the rows' frozen-prefix cache at ``layer``
    (``PrefixCache.build`` with ``path`` and ``source``; returned for the ranking): each packed
    row ``[prompt, c_1, ..., c_C]`` runs through layers 0..layer-1 once, keeping their keys and
    values, and each model then runs only its own layers over the prompt before decoding
    (``Llama.generate``'s ``first_layer``). The prompts are cut as in the cache (``max_len``,
    ``encode_group``), so the answers are ``generate_answers``'s with the same ``max_len``, up to
    the rounding of a differently batched pass. ``models`` are ``minisdpo.model.Llama``s whose
    bottom layers are equal (``shares_bottom``, else ValueError).
    Returns (one list of answers per model, in the order of ``rows``; the cache).
    """
    _check_common(rows, batch_size)
    _check_max_new_tokens(max_new_tokens)
    if not models:
        raise ValueError("models is empty")
    n = models[0].args.n_layers
    if not isinstance(layer, int) or not 1 <= layer < n:
        raise ValueError(f"layer must be an int in [1, {n - 1}], got {layer!r}")
    for m, model in enumerate(models[1:], 1):
        if not shares_bottom(models[0], model, layer):
            raise ValueError(f"models[{m}] differs from models[0] below layer {layer}: they must share "
                             f"their embedding and layers 0..{layer - 1} (shares_bottom)")
    answers: list[list[str]] = [[""] * len(rows) for _ in models]

    def generate(idx: list[int], lens: torch.Tensor, batch: Any, states: torch.Tensor, kv: Any) -> None:
        # Each packed row starts with its prompt: the prompts, right-padded, are its first T positions.
        T = int(lens.max())
        mask = (torch.arange(T)[None] < lens[:, None]).to(states.device)         # (G, T)
        ids = batch.input_ids[:, :T].to(states.device)
        for m, model in enumerate(models):
            new = model.generate(ids, max_new_tokens, tok.eos_id, attention_mask=mask, cache=kv,
                                 first_layer=layer, hidden=states[:, :T])
            _check_new(new, len(idx), max_new_tokens)
            for g, i in enumerate(idx):
                answers[m][i] = _answer(tok, new[g].tolist())

    cache = PrefixCache.build(models[0], tok, rows, domain, max_len, layer, batch_size=batch_size, path=path,
                              source=source, progress=progress, desc="generate", on_batch=generate,
                              kv_slots=max_new_tokens)
    return answers, cache


def judge_answers(answers: Sequence[str], rows: Sequence[Row]) -> dict[str, Any]:
    """HR@1 and ValidRatio of ``answers`` to ``rows`` by the paper's rule (``judge``): {"hr@1",
    "valid_ratio", "n", "answers", "hits"}, ``hits`` one bool per row."""
    judged = [judge(a, row.candidates, row.target) for a, row in zip(answers, rows, strict=True)]
    n = len(rows)
    return {"hr@1": sum(h for _, h in judged) / n, "valid_ratio": sum(v for v, _ in judged) / n,
            "n": n, "answers": list(answers), "hits": [h for _, h in judged]}


def evaluate_generation(model: Any, tok: TokenizerLike, rows: Sequence[Row], domain: str,
                        batch_size: int = 16, max_new_tokens: int = 20,
                        max_len: int | None = None, progress: bool = True) -> dict[str, Any]:
    """``judge_answers`` of the answers of ``generate_answers`` (same arguments)."""
    return judge_answers(generate_answers(model, tok, rows, domain, batch_size, max_new_tokens, max_len, progress),
                         rows)


def mcnemar(hits_a: Sequence[bool], hits_b: Sequence[bool]) -> dict[str, float]:
    """Paired comparison of two models' hits on the same rows: McNemar's exact test.

    Only the rows where the two disagree carry information: ``b`` rows hit by A alone, ``c`` by
    B alone. Under "equally good" each disagreement is a fair coin, so the two-sided p-value is
    the binomial probability of a split at least as uneven as (b, c).
    Returns {"diff": HR(B) - HR(A), "b", "c", "p_value"}.
    """
    if len(hits_a) != len(hits_b) or not hits_a:
        raise ValueError(f"need two equally long, non-empty lists of hits, got {len(hits_a)} and {len(hits_b)}")
    b = sum(1 for x, y in zip(hits_a, hits_b) if x and not y)
    c = sum(1 for x, y in zip(hits_a, hits_b) if y and not x)
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"diff": (c - b) / len(hits_a), "b": b, "c": c, "p_value": min(1.0, 2 * tail)}


def paired_line(a: str, b: str, test: dict[str, float]) -> str:
    """One line of a results table for ``test = mcnemar(hits of b, hits of a)``: model a against b."""
    return (f"{a} vs {b} hr@1: {test['diff']:+.4f} ({test['c']} rows hit only by {a}, {test['b']} only by {b}; "
            f"McNemar p = {test['p_value']:.3f})")


def rank_metrics(scores: torch.Tensor, target_index: torch.Tensor) -> dict[str, float]:
    """rank_hr@1, rank_hr@5, rank_ndcg@5 from candidate scores (N, C) and the targets' columns (N,).

    Ties are broken pessimistically: rank = 1 + #{other candidates with score >= the target's}.
    """
    target_score = scores.gather(1, target_index.view(-1, 1))              # (N, 1)
    rank = (scores >= target_score).sum(1).double()                        # (N,), counts itself
    gain = torch.where(rank <= 5, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))
    return {"rank_hr@1": (rank <= 1).double().mean().item(),
            "rank_hr@5": (rank <= 5).double().mean().item(),
            "rank_ndcg@5": gain.mean().item()}


def _check_candidates(rows: Sequence[Row]) -> int:
    n_cands = len(rows[0].candidates)
    if any(len(r.candidates) != n_cands for r in rows):
        raise ValueError("every row must have the same number of candidates for ranking")
    return n_cands


@torch.no_grad()
def ranking_scores(model: Any, tok: TokenizerLike, rows: Sequence[Row], domain: str,
                   batch_size: int = 8, max_len: int = 512, progress: bool = True,
                   prefix: PrefixCache | None = None, backend: LossBackend = loss) -> torch.Tensor:
    """logp(title + EOS | prompt) of every candidate, (N, C) float32, candidates in row order.

    ``batch_size`` counts rows: each forward pass packs batch_size prompts with all their
    candidates (``minisdpo.batches.packed_batch``, prompts cut as in training); with 20 candidates
    a packed row holds about 1/14 of the tokens of 20 separate sequences, hence the larger
    default than the unpacked path's 2. ``model`` is called as ``model(input_ids,
    position_ids=..., mask=..., return_hidden=True)`` and must have ``lm_head``
    (minisdpo.model.Llama has both). Rows are batched by prompt length to save padding. As in
    ``generate_answers``, only ``row.history`` and ``row.candidates`` are read. With ``prefix``,
    a frozen-prefix cache of exactly these rows (``minisdpo.prefix``), the model runs only the
    layers above its boundary; its layers below must be the ones that built the cache.
    ``backend``: ``minisdpo.loss`` scores the response tokens' logits; ``minisdpo.ops`` scores
    them from the final hidden states with its fused LM head (``StageLoss``'s "linear" head),
    which never forms the (B * C, R, V) logits and skips the padding of short titles.
    """
    _check_common(rows, batch_size)
    n_cands = _check_candidates(rows)
    scorer = StageLoss(model, backend)
    if prefix is not None and (len(prefix.rows) != len(rows) or any(a != b for a, b in zip(prefix.rows, rows))):
        raise ValueError("prefix must be a PrefixCache of exactly these rows, in this order")
    device = _device(model)
    order = sorted(range(len(rows)), key=lambda i: len(encode_prompt(tok, rows[i], domain)))
    scores = torch.empty(len(rows), n_cands)
    with _eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="rank", disable=not progress):
            idx = order[start:start + batch_size]
            part = [rows[i] for i in idx]
            batch = (prefix.batch(idx, [r.candidates for r in part]) if prefix is not None
                     else packed_batch(tok, part, [r.candidates for r in part], max_len, domain=domain))
            logps = scorer.token_logps(batch.to(device)).sum(-1)                  # (B*C,)
            scores[idx] = logps.float().cpu().view(len(idx), n_cands)             # (B, C)
    return scores


@torch.no_grad()
def _ranking_scores_unpacked(model: Any, tok: TokenizerLike, rows: Sequence[Row], domain: str,
                             batch_size: int = 2, max_len: int = 512) -> torch.Tensor:
    """``ranking_scores`` the slow way, kept as the tests' oracle: one full prompt + title sequence
    per candidate (``minisdpo.batches.collate``), logits everywhere."""
    _check_common(rows, batch_size)
    n_cands = _check_candidates(rows)
    device, pad_id = _device(model), padding_id(tok)
    all_scores = []
    for start in range(0, len(rows), batch_size):
        pairs = []
        for row in rows[start:start + batch_size]:
            prompt, responses = encode_group(tok, row, row.candidates, max_len, domain)
            pairs.extend((prompt, r) for r in responses)
        batch = collate(pairs, pad_id).to(device)
        logits = response_logits(model, batch)                                    # (B*C, T, V)
        logps = sequence_logps(logits, batch.labels)                              # (B*C,)
        all_scores.append(logps.float().cpu().view(-1, n_cands))                 # (B, C)
    return torch.cat(all_scores)                                                 # (N, C)


def evaluate_ranking(model: Any, tok: TokenizerLike, rows: Sequence[Row], domain: str,
                     batch_size: int = 8, max_len: int = 512, progress: bool = True,
                     prefix: PrefixCache | None = None, backend: LossBackend = loss) -> dict[str, float]:
    """Ranking metrics from the summed log-prob of each candidate's response (title + EOS),
    scored by ``ranking_scores`` (same arguments).
    Returns {"rank_hr@1", "rank_hr@5", "rank_ndcg@5", "n"}.
    """
    scores = ranking_scores(model, tok, rows, domain, batch_size, max_len, progress, prefix, backend)  # (N, C)
    target_index = torch.tensor([row.candidates.index(row.target) for row in rows])
    return {**rank_metrics(scores, target_index), "n": len(rows)}
