"""Compile-check csrc/cuda/sdpo.cu with nvcc, without a GPU and with a CPU-only torch.

A CUDAExtension cannot be built against a CPU torch (docs/design.md section 6), but the CUDA source
can still be compiled to an object file, which catches every syntax, type and template error
of the kernels and of their host wrappers. This mirrors what torch.utils.cpp_extension passes
to nvcc for the real build (its COMMON_NVCC_FLAGS, the C++ ABI flag, -std=c++20, -O3), plus a
stub of the one header only CUDA wheels ship (``c10/cuda/impl/cuda_cmake_macros.h``).

To stay fast, the first architecture is compiled fully (host and device code) and the others
device-only (``-cubin``: no second host compile), all nvcc processes in parallel.

    python scripts/check_cuda_compile.py [--arch 80 --arch 90] [--source csrc/cuda/sdpo.cu]

Exit status 0 when every compile succeeds; nvcc's messages are printed otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "sdpo.cu"
DEFAULT_ARCHS = ("90", "80")


@dataclass
class CompileResult:
    ok: bool
    seconds: float
    log: str  # nvcc's output, one section per architecture


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda*; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]
    for home in homes:
        candidate = Path(home) / "bin" / "nvcc"
        if home and candidate.is_file():
            return str(candidate)
    return None


def nvcc_flags(stub_dir: str) -> list[str]:
    """The flags torch.utils.cpp_extension would pass for this extension, minus -gencode."""
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [stub_dir, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [
        *(f"-I{d}" for d in includes),
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-std=c++20",
        "-O3",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "--compiler-options",
        "-fPIC",
    ]


def compile_cuda(
    source: Path = SOURCE, archs: tuple[str, ...] = DEFAULT_ARCHS, nvcc: str | None = None
) -> CompileResult:
    """Compile source for each sm_<arch>; raises FileNotFoundError when nvcc is absent."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda*)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minisdpo_nvcc_") as tmp:
        # Only CUDA wheels ship this generated header; its one line is all c10/cuda needs.
        stub = Path(tmp, "stub", "c10", "cuda", "impl")
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags = nvcc_flags(str(Path(tmp, "stub")))
        procs = []
        for i, arch in enumerate(archs):
            gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
            if i == 0:  # host code once, with the first architecture's device code
                mode = ["-c", "-o", str(Path(tmp, f"sdpo_sm{arch}.o"))]
            else:
                mode = ["-cubin", "-o", str(Path(tmp, f"sdpo_sm{arch}.cubin"))]
            cmd = [nvcc, *flags, gencode, *mode, str(source)]
            procs.append((arch, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        ok, logs = True, []
        for arch, proc in procs:
            out, _ = proc.communicate()
            ok &= proc.returncode == 0
            logs.append(f"--- sm_{arch}: exit {proc.returncode}\n{out}")
    return CompileResult(ok, time.perf_counter() - start, "\n".join(logs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability digits, e.g. 90 (repeatable)")
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()
    archs = tuple(args.arch) if args.arch else DEFAULT_ARCHS
    try:
        result = compile_cuda(args.source, archs)
    except FileNotFoundError as err:
        print(f"skipped: {err}", file=sys.stderr)
        return 2
    print(result.log)
    status = "ok" if result.ok else "FAILED"
    print(f"{status}: {args.source} for sm_{', sm_'.join(archs)} in {result.seconds:.1f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
