// The CPU row kernels of minisdpo, with run-time choice of the instruction set.
//
// One row is the V logits of one token. csrc/cpu_kernels.cpp compiles the same row kernels
// (csrc/cpu_rows.h) once per instruction set, each copy in its own namespace, the way ATen
// builds one copy of its kernels per CPU_CAPABILITY; the extension is built without -march. On
// x86-64 there are three copies (AVX-512, AVX2 + FMA, the SSE2 baseline), each under its own
// target pragma, and the copy to run is chosen at run time from what the CPU supports
// (`__builtin_cpu_supports`); on any other architecture (aarch64) only the portable copy is
// built, and it is the one that runs. Either way the choice is capped by the environment
// variable MINISDPO_CPU_CAPABILITY (default | avx2 | avx512), which is read at every call so
// that tests can cover each copy; a request above what the CPU supports (avx2 on aarch64)
// runs, and reports, the best copy below it.
#pragma once

#include <cstdint>

#include "sdpo_math.h"  // acc_t

namespace minisdpo::cpu {

enum class Capability { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// The capability the next call will use: the best the CPU supports, capped by the env var.
Capability current_capability();
const char* capability_name(Capability c);

// lse(x, V): log sum_v exp(x[v]) in one pass over the row (online max and sum), with the
// NaN and inf semantics of torch.log_softmax: NaN if the row holds a NaN or a +inf, -inf if
// every element is -inf.
// grad(x, g, V, lse, coef, y): g[v] = coef * ([v == y] - exp(x[v] - lse)); g may alias x.
template <typename T>
struct RowKernels {
  acc_t<T> (*lse)(const T* x, int64_t V);
  void (*grad)(const T* x, T* g, int64_t V, acc_t<T> lse, acc_t<T> coef, int64_t y);
};

// T is float, double, c10::BFloat16 or c10::Half. float64 has one portable scalar copy.
template <typename T>
RowKernels<T> row_kernels(Capability c);

}  // namespace minisdpo::cpu
