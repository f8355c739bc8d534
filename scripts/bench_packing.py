"""Packed layout vs concatenated layout: time and token counts on a tiny random Llama.

Measures (docs/design.md section 7: medians of several runs, both variants side by side in one
process) on MovieLens-100K rows with a BPE tokenizer trained on MovieLens titles and prompts:

1. ranking: ``minisdpo.evaluate.ranking_scores`` (20 candidates packed behind one prompt pass,
   LM head on their tokens only) against the unpacked path (20 prompt + title sequences, logits
   everywhere), and the largest difference of their scores;
2. one S-DPO micro-batch (8 rows, K=3), forward + backward: ``packed_batch`` + ``response_hidden``
   + LM head on response tokens, against ``sdpo_batch`` + a full forward; both through
   ``minisdpo.loss.sdpo_loss``.

    .venv/bin/python scripts/bench_packing.py [--rows 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time

import torch

from minisdpo import data as D
from minisdpo.batches import packed_batch, sdpo_batch, sdpo_responses
from minisdpo.evaluate import _ranking_scores_unpacked, ranking_scores
from minisdpo.loss import sdpo_loss
from minisdpo.model import Llama, ModelArgs
from minisdpo.step import response_hidden
from minisdpo.tokenizer import train_tokenizer


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50, help="test rows to rank")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    domain = "movies"
    splits = D.load_dataset("movielens")
    titles = sorted({t for row in splits["train"] for t in (*row.history, *row.candidates)})
    prompts = [D.format_prompt(row, domain) for row in D.subsample(splits["train"], 200)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(titles + prompts, 2048, f"{tmp}/tokenizer.model")
    torch.manual_seed(0)
    margs = ModelArgs(vocab_size=tok.vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                      intermediate_size=352, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Llama(margs).float()
    print(f"# bench_packing  {datetime.date.today()}  {platform.processor() or platform.machine()}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"# model: dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads ({margs.n_kv_heads} kv), "
          f"vocab {margs.vocab_size}, float32; medians of {args.repeats} runs")

    # 1. ranking
    model.eval()
    rows = D.subsample(splits["test"], args.rows)
    P = statistics.mean(len(D.encode_prompt(tok, r, domain)) for r in rows)
    T = statistics.mean(len(D.encode_response(tok, c)) for r in rows for c in r.candidates)
    print(f"\n## ranking {len(rows)} test rows x {len(rows[0].candidates)} candidates "
          f"(mean prompt {P:.0f} tokens, mean title + EOS {T:.1f})")
    packed = ranking_scores(model, tok, rows, domain, batch_size=2, progress=False)
    unpacked = _ranking_scores_unpacked(model, tok, rows, domain, batch_size=2)
    print(f"max |packed - unpacked| score: {(packed - unpacked).abs().max().item():.2e} "
          f"(scores around {unpacked.mean().item():.1f})")
    t_unpacked = median_time(lambda: _ranking_scores_unpacked(model, tok, rows, domain, batch_size=2),
                             args.repeats)
    print(f"unpacked (batch_size 2 rows = 40 sequences): {t_unpacked:.2f} s")
    for bs in (2, 8):
        t = median_time(lambda: ranking_scores(model, tok, rows, domain, batch_size=bs, progress=False),
                        args.repeats)
        print(f"packed   (batch_size {bs} rows):               {t:.2f} s  ({t_unpacked / t:.1f}x faster)")

    # 2. one S-DPO micro-batch, forward + backward
    model.train()
    k, g = 3, 8
    rows = D.subsample(splits["train"], g, seed=1)
    negs = D.epoch_negatives(rows, k, seed=0, epoch=0)
    pb = packed_batch(tok, rows, sdpo_responses(rows, negs), 512, domain=domain)
    cb = sdpo_batch(tok, rows, negs, 512, domain=domain)
    ref_logps = torch.full((g * (1 + k),), -30.0)

    def step_packed() -> None:
        model.zero_grad(set_to_none=True)
        logits = model.lm_head(response_hidden(model, pb))                          # (S, R, V)
        sdpo_loss(logits, pb.labels, ref_logps, 1.0, k)[0].backward()

    def step_concat() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(cb.input_ids, attention_mask=cb.attention_mask)             # (S, T, V)
        sdpo_loss(logits, cb.labels, ref_logps, 1.0, k)[0].backward()

    counted = int((cb.labels != -100).sum())
    print(f"\n## S-DPO micro-batch: {g} rows, K={k} ({g * (1 + k)} sequences, {counted} response tokens)")
    print(f"concatenated: input {tuple(cb.input_ids.shape)} = {cb.input_ids.numel()} positions "
          f"({int(cb.attention_mask.sum())} real); LM head rows {cb.input_ids.numel()}")
    print(f"packed:       input {tuple(pb.input_ids.shape)} = {pb.input_ids.numel()} positions "
          f"({pb.num_tokens} real); LM head rows {pb.index.numel()}")
    step_packed(), step_concat()                                                   # warm up
    t_c, t_p = [], []
    for _ in range(max(args.repeats, 5)):                                          # interleaved
        t_c.append(median_time(step_concat, 1))
        t_p.append(median_time(step_packed, 1))
    tc, tp = statistics.median(t_c), statistics.median(t_p)
    print(f"forward + backward: concatenated {tc * 1e3:.0f} ms, packed {tp * 1e3:.0f} ms ({tc / tp:.1f}x faster)")


if __name__ == "__main__":
    main()
