"""The C++ sources compile for aarch64 (Linux on Graviton, macOS on Apple silicon), without an
ARM machine.

The x86-64 code of csrc/cpu_kernels.cpp (the AVX-512 and AVX2 copies of the row kernels, their
target pragmas and __builtin_cpu_supports) is compiled only on x86-64 (docs/design.md section
6); this test cross-compiles every csrc/*.cpp with Debian's aarch64-linux-gnu-g++, and with
clang++ for the same target when it is installed, and checks that the portable row kernels come
out as NEON code (scripts/cross_compile_aarch64.py). It is skipped only when the cross compiler
is absent (CI installs it: .ci/run). Nothing runs on ARM here; scripts/qemu_aarch64_tests.sh
runs the kernel tests on aarch64 under qemu-user, by hand.
"""
import shutil

import pytest
from conftest import load_script


def _script():
    return load_script("cross_compile_aarch64")


def test_every_source_compiles_for_aarch64():
    script = _script()
    if shutil.which(script.GCC) is None:
        pytest.skip(f"{script.GCC} not found (Debian: apt-get install g++-aarch64-linux-gnu): "
                    "the aarch64 build cannot be checked here")
    result = script.cross_compile("all")
    assert result.ok, f"the aarch64 cross-compile failed:\n{result.log}"


def test_the_script_reads_setup_flags():
    """The cross-compile uses setup.py's own flag list, so the two cannot drift apart."""
    flags = _script().setup_cxx_flags()
    assert "-std=c++20" in flags and not any(f.startswith("-march") for f in flags)
