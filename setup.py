"""Build of the minisdpo._C extension against the installed torch.

CPU sources (csrc/*.cpp) are always built; the CUDA source (csrc/cuda/*.cu) is added only when
the installed torch was built with CUDA and a CUDA toolkit is present, since a CUDAExtension
cannot be built against a CPU torch. DEBUG=1 gives a debug build (-O0 -g).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

DEBUG = os.environ.get("DEBUG", "0") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
# Portable flags only: never a -march flag for the build machine. Vector code is chosen at run
# time on x86-64 (csrc/cpu_kernels.cpp); scripts/cross_compile_aarch64.py reads this list and
# compiles the same sources with it for aarch64.
CXX_FLAGS = ["-std=c++20", "-fvisibility=hidden"]


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    cxx = (["-O0", "-g"] if DEBUG else ["-O3", "-g0", "-DNDEBUG"]) + CXX_FLAGS
    sources = _sources("csrc/*.cpp")
    use_cuda = (
        cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
        and os.environ.get("MINISDPO_NO_CUDA", "0") != "1"
    )
    if not use_cuda:
        return cpp_extension.CppExtension("minisdpo._C", sources, extra_compile_args={"cxx": cxx})
    # Cover Ampere and Hopper unless the user says otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = (["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"]) + ["-std=c++20"]
    return cpp_extension.CUDAExtension(
        "minisdpo._C",
        sources + _sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
