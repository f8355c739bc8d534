"""Cross-compile every csrc/*.cpp for aarch64, without an ARM machine.

The extension must build on aarch64 (Linux on Graviton, macOS on Apple silicon): its x86-64
code, the AVX-512 and AVX2 copies of the row kernels and their run-time choice, is compiled only
on x86-64, and elsewhere the portable copy alone (csrc/cpu_kernels.cpp, docs/design.md section 6).
This script keeps that true without an ARM machine. It compiles each csrc/*.cpp (a new file is
picked up by itself) to an aarch64 object with Debian's cross compiler
(``apt-get install g++-aarch64-linux-gnu``), with setup.py's flags (its ``CXX_FLAGS``, read from
the file, plus -O3 and what torch.utils.cpp_extension adds), against the installed torch's
headers and Python's. When clang++ is installed too, it checks them once more with clang for
the same target (clang is the compiler of macOS, where GCC's pragmas do not exist): the file with
the architecture-specific code, csrc/cpu_kernels.cpp, compiled to an object, the others for
syntax and types only (-fsyntax-only; their code generation is GCC's part). Then it
checks, in the disassembly of the objects, that the portable row kernels are NEON code: ``fmla``
on 4 float32 lanes in both, and no scalar select (``fcsel``) in row_grad, whose only selects are
vexp's clamps (a vector type wider than NEON's registers turns those into scalar code).

What it does not do: run anything on ARM (scripts/qemu_aarch64_tests.sh runs the tests under
qemu-user, by hand), or use an aarch64 torch (the headers are the installed x86-64 wheel's, which
hold the same declarations), or build for macOS itself (no Apple SDK).

    python scripts/cross_compile_aarch64.py [--compiler gcc|clang|all] [--keep DIR]

Exit status 0 when every compile and check passes, 1 when one fails (the compiler's messages are
printed), 2 when aarch64-linux-gnu-g++ is absent.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GCC = "aarch64-linux-gnu-g++"
OBJDUMP = "aarch64-linux-gnu-objdump"
TARGET = "aarch64-linux-gnu"
# The portable row kernels, whose float32 copies must hold NEON multiply-adds on 4 lanes; the
# second must hold no scalar select.
NEON_FUNCTIONS = ("baseline::row_lse<float>", "baseline::row_grad<float>")
NO_SCALAR_SELECT = "baseline::row_grad<float>"
NEON_FMA = re.compile(r"\bfmla\s+v\d+\.4s")
SCALAR_SELECT = re.compile(r"\bfcsel\b")


@dataclass
class Result:
    ok: bool
    seconds: float
    log: str  # one section per compile and check


def setup_cxx_flags() -> list[str]:
    """setup.py's CXX_FLAGS, read from the file (importing it would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CXX_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("setup.py has no CXX_FLAGS list")


def compile_flags() -> list[str]:
    """What setup.py's release build passes (python's -fPIC -Wall and torch's defines
    included), minus anything for the build machine's architecture."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [
        *(f"-I{d}" for d in includes),
        "-O3", "-DNDEBUG", "-fPIC", "-Wall",
        *setup_cxx_flags(),
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
    ]


def compilers(which: str) -> list[tuple[str, list[str]]]:
    """(name, command prefix) of each compiler to run: GCC's cross compiler, and clang++ for the
    aarch64 target when installed ("all"); FileNotFoundError when a named one is absent."""
    out = []
    if which in ("gcc", "all"):
        if shutil.which(GCC) is None:
            raise FileNotFoundError(f"{GCC} not found (Debian: apt-get install g++-aarch64-linux-gnu)")
        out.append(("gcc", [GCC]))
    if which in ("clang", "all"):
        clang = shutil.which("clang++")
        if clang is not None:
            out.append(("clang", [clang, f"--target={TARGET}"]))
        elif which == "clang":
            raise FileNotFoundError("clang++ not found")
    return out


def neon_check(obj: Path) -> tuple[bool, str]:
    """Whether each of NEON_FUNCTIONS in the object holds an fmla on 4 float32 lanes, and
    NO_SCALAR_SELECT no fcsel."""
    objdump = shutil.which(OBJDUMP)
    if objdump is None:
        return True, f"{OBJDUMP} not found: the NEON check is skipped"
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(obj)], capture_output=True,
                          text=True, check=True).stdout
    # Functions start at lines like "0000000000000000 <float minisdpo::cpu::baseline::row_lse<float>(...)>:".
    bodies: dict[str, str] = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        head = block.split("\n", 1)[0]
        for name in NEON_FUNCTIONS:
            if name + "(" in head:
                bodies[name] = block
    missing = [n for n in NEON_FUNCTIONS if n not in bodies]
    scalar = [n for n, body in bodies.items() if not NEON_FMA.search(body)]
    selects = len(SCALAR_SELECT.findall(bodies.get(NO_SCALAR_SELECT, "")))
    if missing or scalar or selects:
        return False, (f"NEON check FAILED: not found {missing}; no fmla on .4s lanes in {scalar}; "
                       f"{selects} scalar selects (fcsel) in {NO_SCALAR_SELECT}")
    return True, (f"NEON check ok: {', '.join(NEON_FUNCTIONS)} hold fmla on 4 float32 lanes, "
                  f"{NO_SCALAR_SELECT} no scalar select")


def cross_compile(which: str = "all", keep: Path | None = None, jobs: int | None = None) -> Result:
    """Compile every csrc/*.cpp for aarch64 with each compiler; raises FileNotFoundError when
    the GCC cross compiler is absent."""
    start = time.perf_counter()
    chosen = compilers(which)
    flags = compile_flags()
    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    with tempfile.TemporaryDirectory(prefix="minisdpo_aarch64_") as tmp:
        out_dir = keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)

        def one(task):
            (name, prefix), src = task
            obj = out_dir / f"{src.stem}.{name}.o"
            full = name == "gcc" or src.name == "cpu_kernels.cpp"
            mode = ["-c", "-o", str(obj)] if full else ["-fsyntax-only"]
            cmd = [*prefix, *flags, *mode, str(src)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            what = "" if full else " (syntax only)"
            log = f"--- {name} {src.relative_to(ROOT)}{what}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
            ok = proc.returncode == 0
            if ok and src.name == "cpu_kernels.cpp":
                neon_ok, msg = neon_check(obj)
                ok &= neon_ok
                log += msg + "\n"
            return ok, log

        tasks = [(c, s) for c in chosen for s in sources]
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            results = list(pool.map(one, tasks))
    log = "\n".join(r[1] for r in results)
    if which == "all" and len(chosen) == 1:
        log += "\nclang++ not found: compiled with GCC only\n"
    return Result(all(r[0] for r in results), time.perf_counter() - start, log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiler", choices=("gcc", "clang", "all"), default="all",
                        help="gcc: aarch64-linux-gnu-g++; clang: clang++ --target=aarch64-linux-gnu; "
                             "all: both, clang when installed (default)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="write the objects to DIR and keep them")
    parser.add_argument("--jobs", type=int, default=None, help="compiles at once (default: the CPU count)")
    args = parser.parse_args()
    try:
        result = cross_compile(args.compiler, args.keep, args.jobs)
    except FileNotFoundError as err:
        print(f"skipped: {err}", file=sys.stderr)
        return 2
    print(result.log)
    status = "ok" if result.ok else "FAILED"
    print(f"{status}: csrc/*.cpp for aarch64 in {result.seconds:.1f} s")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
