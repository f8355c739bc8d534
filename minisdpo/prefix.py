"""The frozen-prefix cache: run the frozen layers once per row, train and score on the top ones.

With LoRA on the top N of a model's layers only (``--lora-layers N``; ``minisdpo.lora``'s
``layers=``), the residual stream that enters layer b = n_layers - N is a fixed function of the
row: the embedding and layers 0..b-1 never change. ``PrefixCache.build`` runs them once, without
gradients, on each row's packed sequence ``[prompt, c_1, ..., c_C]`` holding all its candidates
(``minisdpo.batches.packed_batch``: block mask, per-segment positions), and keeps those
boundary states. Since a candidate's segment attends only to the prompt and to itself, the
states of ``[prompt, r_0, ..., r_K]`` for *any* responses of the row are a selection of the
cached ones: ``PrefixCache.batch(row_ids, responses)`` returns the same ``PackedBatch`` that
``packed_batch`` builds, plus those states (``boundary``), and ``minisdpo.step`` runs the model
from layer b on. So one cache serves SFT (the target's segment), S-DPO and DPO with any K up to
C - 1, their reference log-probs, and the ranking of all C candidates, for every model whose
layers below b are the ones that built it. (The prompt of a row is the same in every use,
cut for its longest candidate: ``minisdpo.data.encode_group``.)

The states are kept in the model's dtype in one (tokens, dim) tensor: in memory, or, with
``path``, in a file under the run directory that is memory-mapped (the operating system keeps it
in memory when it fits), written once and reused by a resumed run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from minisdpo.batches import PackedBatch, pack_groups, packed_batch
from minisdpo.data import Row, TokenizerLike, encode_group, padding_id
from minisdpo.model import KVCache

__all__ = ["PrefixCache"]

_META, _HIDDEN, _INDEX = "meta.json", "hidden.bin", "index.pt"


def _fingerprint(rows: Sequence[Row], domain: str, max_len: int, layer: int, source: str) -> str:
    """What the cached states depend on besides the model's weights (named by ``source``)."""
    h = hashlib.sha256(json.dumps([domain, max_len, layer, source]).encode())
    for row in rows:
        h.update(json.dumps([row.history, row.candidates]).encode())
    return h.hexdigest()


class PrefixCache:
    """The residual stream entering layer ``layer`` at every position of each row's packed
    ``[prompt, c_1, ..., c_C]``. Build it with ``PrefixCache.build``; ``batch`` gives packed
    batches of any responses of its rows, with their states attached."""

    def __init__(self, rows: Sequence[Row], tok: TokenizerLike, domain: str, max_len: int, layer: int,
                 hidden: torch.Tensor, index: dict[str, torch.Tensor]):
        self.rows, self.tok, self.domain, self.max_len, self.layer = list(rows), tok, domain, max_len, layer
        self.hidden = hidden                       # (tokens, dim), the model's dtype
        self.ids = index["ids"]                    # (tokens,) the input ids: batches are built from them
        self.offsets = index["offsets"]            # (N + 1,) where each row's positions start
        self.starts = index["starts"]              # (N, C) where each candidate's segment starts in its row
        self.lengths = index["lengths"]            # (N, C) its fed-in tokens (the title; EOS is not fed in)
        self.prompt_lens = index["prompt_lens"]    # (N,)
        self.reused = False                        # True when read back from a file built earlier

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    # ---------------------------------------------------------------------------------- build

    @classmethod
    def build(cls, model: Any, tok: TokenizerLike, rows: Sequence[Row], domain: str, max_len: int, layer: int,
              *, batch_size: int = 8, path: str | Path | None = None, source: str = "",
              progress: bool = True, desc: str = "prefix cache",
              on_batch: Callable[[list[int], torch.Tensor, PackedBatch, torch.Tensor, KVCache], None] | None = None,
              kv_slots: int = 0) -> PrefixCache:
        """Run ``model``'s embedding and layers 0..layer-1 over every row with all its candidates.

        ``model`` is called as ``model(input_ids, position_ids=..., mask=..., stop_layer=layer)``
        (minisdpo.model.Llama) and must return (G, L, dim). With ``path``, the states go to a
        memory-mapped file in that directory, which a later call with the same rows, domain,
        max_len, layer and ``source`` (a name for the weights below ``layer``) reads back
        instead of building again.

        ``on_batch(row_ids, prompt_lens, batch, states, kv)``, when given, is called after each
        batch's pass with the rows' indices, their prompts' lengths (G,) (a packed row's prompt is
        its first positions), their ``PackedBatch``, the states entering ``layer`` (G, L, dim) and
        a ``KVCache`` holding the keys and values of layers 0..layer-1 at slots 0..L-1, followed
        by ``kv_slots`` free slots: what ``Llama.generate(..., first_layer=layer)`` continues
        from. The pass is then always run (a cache on file is built again).
        """
        if not rows:
            raise ValueError("rows is empty")
        n_layers = model.args.n_layers if hasattr(model, "args") else None
        if not isinstance(layer, int) or layer < 1 or (n_layers is not None and layer > n_layers):
            raise ValueError(f"layer must be an int in [1, {n_layers}] (the first layer that is not "
                             f"frozen), got {layer!r}")
        n_cands = len(rows[0].candidates)
        if any(len(r.candidates) != n_cands for r in rows):
            raise ValueError("every row must have the same number of candidates for the prefix cache")
        param = next(model.parameters())
        dim, dtype, device = model.args.dim, param.dtype, param.device
        fingerprint = _fingerprint(rows, domain, max_len, layer, source)
        if not isinstance(kv_slots, int) or kv_slots < 0:
            raise ValueError(f"kv_slots must be an int >= 0, got {kv_slots!r}")
        if path is not None:
            path = Path(path)
        if path is not None and on_batch is None:
            cached = cls._load(path, fingerprint, rows, tok, domain, max_len, layer, dim, dtype)
            if cached is not None:
                return cached

        # The layout of every packed row, before any forward pass: sizes the buffer.
        prompt_lens, lengths = [], []
        for row in rows:
            prompt, responses = encode_group(tok, row, row.candidates, max_len, domain)
            prompt_lens.append(len(prompt))
            lengths.append([len(r) - 1 for r in responses])      # r[:-1] is fed in
        prompt_lens_t, lengths_t = torch.tensor(prompt_lens), torch.tensor(lengths)      # (N,), (N, C)
        row_lens = prompt_lens_t + lengths_t.sum(1)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = row_lens.cumsum(0)
        starts = prompt_lens_t[:, None] + lengths_t.cumsum(1) - lengths_t                 # (N, C)
        total = int(offsets[-1])

        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            with open(path / _HIDDEN, "wb") as f:
                f.truncate(total * dim * torch.empty(0, dtype=dtype).element_size())
            hidden = torch.from_file(str(path / _HIDDEN), shared=True, size=total * dim, dtype=dtype).view(total, dim)
        else:
            hidden = torch.empty(total, dim, dtype=dtype)
        ids = torch.empty(total, dtype=torch.long)

        t0 = time.time()
        order = sorted(range(len(rows)), key=lambda i: int(row_lens[i]))     # similar lengths together
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
                idx = order[start:start + batch_size]
                part = [rows[i] for i in idx]
                b = packed_batch(tok, part, [r.candidates for r in part], max_len, domain=domain)
                G, L = b.input_ids.shape
                kv = None if on_batch is None else KVCache(model.args, G, L + kv_slots, model.cache_dtype(), device)
                h = model(b.input_ids.to(device), position_ids=b.position_ids.to(device), mask=b.mask.to(device),
                          stop_layer=layer, cache=kv)                         # (G, L, dim)
                for g, i in enumerate(idx):
                    a, n = int(offsets[i]), int(row_lens[i])
                    # The layout above must be packed_batch's: segment c starts where index says.
                    seg_starts = b.index[g * n_cands:(g + 1) * n_cands, 1] - g * L
                    if not torch.equal(seg_starts, starts[i]):
                        raise RuntimeError("the prefix cache's layout disagrees with packed_batch's")
                    hidden[a:a + n] = h[g, :n].to("cpu", dtype)
                    ids[a:a + n] = b.input_ids[g, :n]
                if on_batch is not None:
                    on_batch(idx, prompt_lens_t[idx], b, h, kv)
        model.train(was_training)
        build_s = time.time() - t0
        index = {"ids": ids, "offsets": offsets, "starts": starts, "lengths": lengths_t, "prompt_lens": prompt_lens_t}
        if path is not None:
            torch.save(index, path / _INDEX)
            meta = {"fingerprint": fingerprint, "layer": layer, "rows": len(rows), "tokens": total, "dim": dim,
                    "dtype": str(dtype).removeprefix("torch."), "build_s": build_s}
            tmp = path / (_META + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, path / _META)            # written last: the cache is complete
        return cls(rows, tok, domain, max_len, layer, hidden, index)

    @classmethod
    def _load(cls, path: Path, fingerprint: str, rows, tok, domain, max_len, layer, dim, dtype
              ) -> PrefixCache | None:
        try:
            meta = json.loads((path / _META).read_text())
        except (OSError, ValueError):
            return None
        if (meta.get("fingerprint"), meta.get("dim"), meta.get("dtype")) != (
                fingerprint, dim, str(dtype).removeprefix("torch.")):
            return None
        index = torch.load(path / _INDEX, weights_only=True)
        hidden = torch.from_file(str(path / _HIDDEN), shared=False, size=meta["tokens"] * dim,
                                 dtype=dtype).view(meta["tokens"], dim)
        cache = cls(rows, tok, domain, max_len, layer, hidden, index)
        cache.reused = True
        return cache

    # ---------------------------------------------------------------------------------- use

    def batch(self, row_ids: Sequence[int], responses: Sequence[Sequence[str]]) -> PackedBatch:
        """``packed_batch`` of rows ``row_ids`` with ``responses[g]`` (titles among row g's
        candidates, in any order), with ``boundary`` (G, L, dim), the cached states at its
        positions, and ``boundary_layer`` set: the model runs from that layer on. Built from the
        token ids the cache keeps (a response is its fed-in ids and EOS): no tokenizer call."""
        if len(row_ids) != len(responses):
            raise ValueError(f"responses has {len(responses)} lists for {len(row_ids)} rows")
        groups, sources = [], []
        for i, titles in zip(row_ids, responses):
            candidates = self.rows[i].candidates
            offset, prompt_len = int(self.offsets[i]), int(self.prompt_lens[i])
            pieces, fed = [torch.arange(offset, offset + prompt_len)], []
            for t in titles:
                if t not in candidates:
                    raise ValueError(f"response {t!r} is not a candidate of row {i}")
                c = candidates.index(t)
                start = offset + int(self.starts[i, c])
                pieces.append(torch.arange(start, start + int(self.lengths[i, c])))
                fed.append(self.ids[pieces[-1]].tolist() + [self.tok.eos_id])
            groups.append((self.ids[pieces[0]].tolist(), fed))
            sources.append(torch.cat(pieces))
        b = pack_groups(groups, padding_id(self.tok))
        G, L = b.input_ids.shape
        # Padding positions take any state: they attend to themselves only and predict nothing.
        src = torch.stack([torch.cat([pos, pos[:1].expand(L - len(pos))]) for pos in sources])       # (G, L)
        boundary = self.hidden.index_select(0, src.flatten()).view(G, L, -1)
        return replace(b, boundary=boundary, boundary_layer=self.layer)
