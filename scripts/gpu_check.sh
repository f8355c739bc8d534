#!/usr/bin/env bash
# GPU check of minisdpo's CUDA kernels (csrc/cuda/sdpo.cu): build, CUDA tests, benchmark.
#
# For a machine with one NVIDIA GPU, a CUDA build of torch, nvcc, pytest and no network: it
# checks that nvcc's CUDA major version is torch's and that pytest and setuptools import, then
# rebuilds the extension in place from scratch (--force: never a stale _C*.so; only this GPU's
# architecture, to be quick), runs the CUDA half of tests/test_ops.py (NaN/inf cases, V = 4096,
# 32000 and 32001 in float32 and bfloat16 with aligned strided views, offset rows and the
# in-place backward) and of tests/test_linear_loss.py (sdpo_linear_loss / linear_token_logps),
# two demos that fail the script when they show the wrong thing, then
# `python -m minisdpo.bench --device cuda` at 8192 tokens (S=32 sequences x T=256, K=3) for
# V = 32000, 32001 (unaligned rows) and 128256, float32 and bfloat16, and prints a table of the
# fused kernels' bandwidth against the device's copy bandwidth (the targets of docs/design.md,
# the op contract: forward >= 80% of copy counting one read of the counted rows, backward >= 80%
# counting one read and one write).
#
#   bash scripts/gpu_check.sh             # logs under $OUT if set, else ./gpu_check_logs
#   PYTHON=python3 MAX_JOBS=16 FULL=1 bash scripts/gpu_check.sh
#
# FULL=1 adds the torch.compile'd reference and the per-process peak-memory runs to the
# benchmark (a few minutes more). Each step has a time limit; the script stops at the first
# failing step, except that the test step's failure is reported and the benchmark still runs.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG_DIR=${OUT:-gpu_check_logs}
mkdir -p "$LOG_DIR"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOG_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s; log: $LOG_DIR/$name.log"
  if [ $rc -ne 0 ]; then tail -n 40 "$LOG_DIR/$name.log"; fi
  return $rc
}

# --- fail fast without a GPU, a CUDA torch or nvcc
if ! "$PYTHON" - <<'EOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"gpu_check: torch {torch.__version__} is a CPU build; a CUDA build is needed")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
major, minor = torch.cuda.get_device_capability()
print(f"gpu_check: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
  exit 1
fi
# The nvcc the build will use: torch.utils.cpp_extension's CUDA_HOME ($CUDA_HOME, else the
# nvcc on PATH, else /usr/local/cuda).
NVCC="$("$PYTHON" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")')/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  echo "gpu_check: nvcc not found (PATH or \$CUDA_HOME/bin): the CUDA kernels cannot be built" >&2
  exit 1
fi
# A CUDA 12 torch with a CUDA 13 nvcc (or the reverse) fails only halfway through the build, or
# builds kernels the runtime cannot load: compare the major versions first.
nvcc_major=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\)\..*/\1/p')
torch_major=$("$PYTHON" -c 'import torch; print(torch.version.cuda.split(".")[0])')
if [ -z "$nvcc_major" ] || [ "$nvcc_major" != "$torch_major" ]; then
  echo "gpu_check: $NVCC is CUDA ${nvcc_major:-?}, torch was built with CUDA $torch_major: install the matching toolkit (or set CUDA_HOME)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import pytest, setuptools' 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import pytest and setuptools (the build and the tests need them)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv >"$LOG_DIR/nvidia-smi.csv" 2>&1 || true

# --- build, for this GPU's architecture only
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export TORCH_CUDA_ARCH_LIST
step build 420 "$PYTHON" setup.py build_ext --inplace --force || exit 1
if ! "$PYTHON" -c 'import torch, minisdpo.ops; x = torch.zeros(2, 1, 4, device="cuda"); y = torch.zeros(2, 1, dtype=torch.long, device="cuda"); torch.ops.minisdpo.token_logps_fwd(x, y, -100); torch.cuda.synchronize()'; then
  echo "gpu_check: the built extension has no working CUDA kernels (see $LOG_DIR/build.log)" >&2
  exit 1
fi

# --- CUDA tests. A label outside [0, V) stops a CUDA kernel with a device-side assert (no host
# synchronisation inside the ops), which leaves the process's CUDA context unusable: the two
# bad-label cases run each in its own process, after the others.
step test_ops_cuda 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda and not bad_input_raises" || status=1
step test_linear_cuda 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_linear_loss.py -k cuda || status=1
step test_ops_cuda_bad_input 120 "$PYTHON" -m pytest -q -p no:cacheprovider \
  $(for i in $(seq 2 11); do echo "tests/test_ops.py::test_bad_input_raises[$i-cuda]"; done) || status=1
for i in 0 1; do
  step "test_ops_cuda_bad_label_$i" 120 "$PYTHON" -m pytest -q -p no:cacheprovider "tests/test_ops.py::test_bad_input_raises[$i-cuda]" \
    || { status=1; echo "   (a bad label on CUDA is a device-side assert, raised at the next synchronisation)"; }
done
# What a bad label does on CUDA, shown directly: a RuntimeError naming the device-side assert.
# No error, or another one, fails the script.
step bad_label_demo 120 "$PYTHON" -c '
import sys, torch, minisdpo.ops as ops
x = torch.randn(2, 3, 10, device="cuda"); y = torch.zeros(2, 3, dtype=torch.long, device="cuda"); y[1, 2] = 10
try:
    ops.token_logps(x, y); torch.cuda.synchronize()
except RuntimeError as e:
    print("RuntimeError:", str(e).splitlines()[0])
    sys.exit(0 if "assert" in str(e) else "WRONG: the error does not name the device-side assert")
sys.exit("WRONG: no error raised for a label outside [0, V)")
' || status=1
cat "$LOG_DIR/bad_label_demo.log"
# A diverged run must not log a healthy loss: a NaN reference log-prob gives a NaN loss, a NaN
# logit a NaN log-prob, on the GPU as in minisdpo.loss.
step nan_demo 120 "$PYTHON" -c '
import sys, torch, minisdpo.ops as ops
x = torch.randn(4, 3, 40, device="cuda"); y = torch.randint(0, 40, (4, 3), device="cuda")
ref = torch.tensor([float("nan"), 0.0, 0.0, 0.0], device="cuda")
loss, logps = ops.sdpo_loss(x, y, ref)
x[2, 1, 5] = float("nan")
tok = ops.token_logps(x, y)
print("loss with a NaN ref_logps:", loss.item(), "; token log-prob with a NaN logit:", tok[2, 1].item())
sys.exit(0 if loss.isnan() and tok[2, 1].isnan() and torch.isfinite(logps).all() else "WRONG: NaN swallowed")
' || status=1
cat "$LOG_DIR/nan_demo.log"

# --- benchmark: 8192 tokens, two vocabularies, float32 and bfloat16
BENCH_FLAGS=(--device cuda --S 32 --T 256 --K 3 --dtype float32 bfloat16 --repeats 10)
if [ "${FULL:-0}" != "1" ]; then BENCH_FLAGS+=(--no-compile --no-memory); fi
for V in 32000 32001 128256; do
  step "bench_V$V" 300 "$PYTHON" -m minisdpo.bench "${BENCH_FLAGS[@]}" --V "$V" --json "$LOG_DIR/bench_V$V.json" \
    || { status=1; continue; }
  cat "$LOG_DIR/bench_V$V.log"
done

# --- the table: effective bandwidth of the fused kernels against copy_
"$PYTHON" - "$LOG_DIR" <<'EOF' | tee "$LOG_DIR/summary.txt"
import glob, json, sys

print("\nfused kernels vs copy bandwidth (8192 tokens, a quarter of each sequence ignored)")
print("fwd GB/s = counted rows' logits bytes / fwd time; bwd = (f+b) - fwd, moving counted rows "
      "read + all rows written; copy = (read + write) / copy_ time")
head = f"{'V':>7} {'dtype':<9} {'logits MiB':>10} {'copy GB/s':>9} {'fwd ms':>7} {'fwd GB/s':>8} {'%copy':>6} " \
       f"{'bwd ms':>7} {'bwd GB/s':>8} {'%copy':>6} {'eager/fused f+b':>15}"
print(head)
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_V*.json")):
    data = json.load(open(path))
    cfg = data["config"]
    S, T, V = cfg["S"], cfg["T"], cfg["V"]
    counted = S * (T - T // 4)  # minisdpo.bench ignores the first quarter of each sequence
    for dtype, res in data["results"].items():
        es = 4 if dtype == "float32" else 2
        row_bytes = V * es
        t, copy = res["times_s"], res["floor_s"]["copy_GBps"]
        fwd = t["fused"]["fwd"]
        bwd = t["fused"]["fwd+bwd"] - fwd
        fwd_bw = counted * row_bytes / fwd / 1e9
        moved = (counted + S * T) * row_bytes  # backward: read counted rows, write every row
        bwd_bw = moved / bwd / 1e9
        print(f"{V:>7} {dtype:<9} {S * T * row_bytes / 2**20:>10.0f} {copy:>9.0f} {fwd * 1e3:>7.3f} {fwd_bw:>8.0f} "
              f"{100 * fwd_bw / copy:>5.0f}% {bwd * 1e3:>7.3f} {bwd_bw:>8.0f} {100 * bwd_bw / copy:>5.0f}% "
              f"{t['eager']['fwd+bwd'] / t['fused']['fwd+bwd']:>15.2f}")
EOF

echo
if [ $status -eq 0 ]; then echo "gpu_check: all steps passed"; else echo "gpu_check: some step FAILED (see above)"; fi
exit $status
