"""The CUDA source compiles, for Ampere (sm_80) and Hopper (sm_90), without a GPU.

The CUDA kernels (csrc/cuda/sdpo.cu) are built only against a CUDA torch, which CI machines
lack; this test compiles the file with nvcc and torch's headers (scripts/check_cuda_compile.py,
docs/design.md section 6) so that a syntax, type or template error fails CI with nvcc's message.
It is skipped only when nvcc is absent. Whether the kernels compute the right numbers is
tests/test_ops.py's job, on a machine with a GPU (scripts/gpu_check.sh).
"""
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_source_compiles_for_sm80_and_sm90():
    checker = load_script("check_cuda_compile")
    nvcc = checker.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA source cannot be compile-checked here")
    result = checker.compile_cuda(ROOT / "csrc" / "cuda" / "sdpo.cu", ("90", "80"), nvcc)
    assert result.ok, f"nvcc failed on csrc/cuda/sdpo.cu:\n{result.log}"
