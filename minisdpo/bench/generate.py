"""``python -m minisdpo.bench --generate --model DIR``: batched greedy decoding (``Llama.generate``
with the KV cache) of MovieLens prompts, float32 against bfloat16: the time per answer, the prompt
pass alone, the time per new token, and how often the two dtypes pick the same tokens."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from minisdpo import data as D
from minisdpo.bench.common import DTYPES
from minisdpo.bench.model_step import DATA_SET, MODEL_REPEATS, model_tokenizer
from minisdpo.checkpoint import from_pretrained, load_config
from minisdpo.model import KVCache


def run(args: argparse.Namespace, info: dict) -> dict:
    modes = list(args.dtype or ["float32", "bfloat16"])
    if "autocast" in modes:
        raise SystemExit("--generate: --dtype autocast is not a generation mode (float32, bfloat16)")
    tok, tok_name = model_tokenizer(args.model, load_config(args.model).vocab_size)
    rows = D.load_dataset(DATA_SET)["train"][:args.batch]
    prompts = [D.encode_prompt(tok, row, D.default_domain(DATA_SET)) for row in rows]
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, T), D.padding_id(tok), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, ids in enumerate(prompts):                    # left-padded, as evaluate.py does
        input_ids[b, T - len(ids):] = torch.tensor(ids)
        attention_mask[b, T - len(ids):] = 1
    repeats = args.repeats or MODEL_REPEATS
    print(f"# minisdpo.bench --generate: greedy decoding of {B} {DATA_SET} prompts "
          f"({min(map(len, prompts))}-{T} tokens, left-padded to {T}), {args.new_tokens} new tokens "
          f"each (no early stop at EOS), model.generate with the KV cache, on {args.model}")
    print(f"tokenizer: {tok_name}; ms = median of {repeats} interleaved runs after 1 warm-up each; "
          f"prefill ms = the prompt pass alone")
    models = {m: from_pretrained(args.model, dtype=DTYPES[m]) for m in modes}

    def prefill(model):
        cache = KVCache(model.args, B, T + 1, model.cache_dtype(), "cpu")
        model.prefill(input_ids, attention_mask, cache)

    def generate(model):
        return model.generate(input_ids, args.new_tokens, None, attention_mask=attention_mask)
    outputs = {m: generate(model) for m, model in models.items()}      # warm-up
    for model in models.values():
        prefill(model)
    times: dict[str, dict[str, list[float]]] = {m: {"generate": [], "prefill": []} for m in modes}
    for _ in range(repeats):
        for m, model in models.items():
            for what, fn in (("generate", generate), ("prefill", prefill)):
                t0 = time.perf_counter()
                fn(model)
                times[m][what].append(time.perf_counter() - t0)
    results = {"setup": {"model": args.model, "batch": B, "prompt_tokens": T,
                         "new_tokens": args.new_tokens, "repeats": repeats, "tokenizer": tok_name,
                         "threads": torch.get_num_threads()}, "machine": info}
    print(f"{'dtype':<9} {'gen ms':>8} {'prefill ms':>10} {'decode ms/token':>15} {'new tokens/s':>12} "
          f"{'same tokens as ' + modes[0]:>24}")
    for m in modes:
        gen, pre = (statistics.median(times[m][w]) for w in ("generate", "prefill"))
        per_token = (gen - pre) / max(args.new_tokens - 1, 1)
        same = float((outputs[m] == outputs[modes[0]]).float().mean())
        results[m] = {"ms": gen * 1e3, "prefill_ms": pre * 1e3, "decode_ms_per_token": per_token * 1e3,
                      "tokens_per_s": B * args.new_tokens / gen, "agreement": same}
        print(f"{m:<9} {gen * 1e3:8.0f} {pre * 1e3:10.0f} {per_token * 1e3:15.1f} "
              f"{B * args.new_tokens / gen:12.1f} {same:24.2f}")
    return results


