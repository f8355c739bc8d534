#!/usr/bin/env bash
# Run the kernel tests on aarch64 under qemu-user, on an x86-64 Debian machine without an ARM one.
#
# tests/test_cross_build.py only compiles the sources for aarch64; this runs them. It unpacks
# Debian's arm64 Python 3.11 (and the libraries it loads) into WORKDIR, installs aarch64 wheels
# there (torch TORCH_AARCH64, CPU only: the aarch64 wheels of torch 2.13 pull in CUDA 13; numpy,
# pytest, and what minisdpo imports), cross-compiles minisdpo._C against that torch with
# aarch64-linux-gnu-g++, and runs tests/test_ops.py, test_linear_loss.py, test_backends.py and
# test_bench_loss.py with that Python under qemu-aarch64. Left out: the torch.compile tests (no
# aarch64 C compiler inside), and the two that start a second Python (without binfmt_misc,
# qemu-user cannot exec an aarch64 binary). Timings under emulation mean nothing. Not part of
# `make test`: it downloads about 150 MB (the torch wheel most of it) and fills about 800 MB of
# WORKDIR. Manual, as root:
#
#   apt-get install g++-aarch64-linux-gnu qemu-user
#   dpkg --add-architecture arm64 && apt-get update     # apt-get download of :arm64 needs it
#   bash scripts/qemu_aarch64_tests.sh [WORKDIR]         # default /tmp/minisdpo_aarch64
#
# It installs no arm64 package (dpkg -x unpacks them into WORKDIR); `dpkg --remove-architecture
# arm64 && apt-get update` undoes the second line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/minisdpo_aarch64}
PY=${PYTHON:-$ROOT/.venv/bin/python}
TORCH=${TORCH_AARCH64:-2.9.1}

for tool in aarch64-linux-gnu-g++ qemu-aarch64 apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "$tool not found (see the header of $0)" >&2; exit 2; }
done
dpkg --print-foreign-architectures | grep -qx arm64 ||
  { echo "arm64 is not among dpkg's architectures (see the header of $0)" >&2; exit 2; }

mkdir -p "$W/debs" "$W/root" "$W/build" "$W/pkg"
# 1. Python 3.11 for arm64 and the shared libraries of its standard modules; glibc, libstdc++
#    and libgomp come from the cross compiler's packages.
(cd "$W/debs" && apt-get download -q python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
  libpython3.11-stdlib:arm64 zlib1g:arm64 libffi8:arm64 libexpat1:arm64 libbz2-1.0:arm64 \
  liblzma5:arm64 libuuid1:arm64 libcrypt1:arm64 libssl3:arm64 libncursesw6:arm64 libtinfo6:arm64 \
  libreadline8:arm64)
for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$W/root"; done
mkdir -p "$W/root/lib/aarch64-linux-gnu"
cp -a /usr/aarch64-linux-gnu/lib/. "$W/root/lib/aarch64-linux-gnu/"
cp -a /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 "$W/root/lib/"  # the loader's own path

# 2. aarch64 wheels for CPython 3.11.
PLAT=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
      --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: --target "$W/site" -q --no-warn-conflicts)
"$PY" -m pip install "${PLAT[@]}" --no-deps "torch==$TORCH" safetensors tqdm sentencepiece tokenizers
"$PY" -m pip install "${PLAT[@]}" --upgrade filelock typing-extensions sympy networkx jinja2 fsspec \
  mpmath markupsafe numpy pytest iniconfig pluggy packaging pygments

# 3. minisdpo._C for aarch64, against that torch, with setup.py's flags.
TI="$W/site/torch/include"
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
FLAGS=$("$PY" -c "import ast, pathlib
tree = ast.parse(pathlib.Path('$ROOT/setup.py').read_text())
print(' '.join(next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, 'id', None) == 'CXX_FLAGS' for t in n.targets))))")
objs=()
for src in "$ROOT"/csrc/*.cpp; do
  obj="$W/build/$(basename "$src" .cpp).o"
  # shellcheck disable=SC2086
  aarch64-linux-gnu-g++ -O3 -DNDEBUG -fPIC $FLAGS -DTORCH_API_INCLUDE_EXTENSION_H \
    -DTORCH_EXTENSION_NAME=_C -I"$TI" -I"$TI/torch/csrc/api/include" -I"$PYINC" -c "$src" -o "$obj"
  objs+=("$obj")
done
rm -rf "$W/pkg" && mkdir -p "$W/pkg"
git -C "$ROOT" ls-files -z minisdpo tests pyproject.toml | (cd "$ROOT" && xargs -0 cp --parents -t "$W/pkg")
aarch64-linux-gnu-g++ -shared "${objs[@]}" -L"$W/site/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -o "$W/pkg/minisdpo/_C.cpython-311-aarch64-linux-gnu.so"

# 4. The tests, on aarch64 under emulation.
cd "$W/pkg"
PYTHONPATH="$W/pkg:$W/site" qemu-aarch64 -L "$W/root" "$W/root/usr/bin/python3.11" -c \
  'import platform, torch; from minisdpo import ops; print(platform.machine(), torch.__version__, "cpu_capability:", ops.cpu_capability())'
PYTHONPATH="$W/pkg:$W/site" qemu-aarch64 -L "$W/root" "$W/root/usr/bin/python3.11" -m pytest -q \
  -p no:cacheprovider tests/test_ops.py tests/test_linear_loss.py tests/test_backends.py \
  tests/test_bench_loss.py -k "not compile and not import_runs and not bench_json"
