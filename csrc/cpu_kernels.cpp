// The CPU row kernels compiled once per instruction set, and the run-time choice between them.
//
// ATen's approach (aten/src/ATen/native/cpu, CPU_CAPABILITY): the same source is compiled for
// several instruction sets and the best one the CPU supports is picked at run time. Here the
// copies live in one file, each in its own namespace, because setup.py compiles every
// csrc/*.cpp with the same portable flags (never a -march flag for the build machine: the built
// extension must run on a CPU without AVX-512). Per architecture (docs/design.md section 6):
//
// * x86-64: three copies, AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and the x86-64 baseline,
//   SSE2 (4 lanes); the first two under a target pragma (`#pragma GCC target` for GCC,
//   `#pragma clang attribute` for clang, which ignores the GCC one), chosen at run time with
//   `__builtin_cpu_supports`.
// * anything else (aarch64: Linux on Graviton, macOS on Apple silicon): the portable copy only,
//   4 lanes, which is one NEON register on aarch64 (NEON is part of its baseline, so the
//   compiler emits NEON for it without any flag). Nothing x86-specific is compiled there.
#include "cpu_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define MINISDPO_X86_64 1
#else
#define MINISDPO_X86_64 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
// Vector types wider than the baseline change the (internal) calling convention of the inline
// helpers; they never cross a non-inlined boundary, so the warning is noise.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC in ISO C++ mode turns off a*b+c -> fma contraction; the row kernels want it where the
// target has FMA (the polynomial exp is a chain of multiply-adds). Clang contracts within an
// expression by default (-ffp-contract=on), which covers every `p * r + c` of the kernels.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

#if MINISDPO_X86_64

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
namespace minisdpo::cpu::avx512 {
constexpr int64_t kLanes = 16;
#include "cpu_rows.h"
}  // namespace minisdpo::cpu::avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace minisdpo::cpu::avx2 {
constexpr int64_t kLanes = 8;
#include "cpu_rows.h"
}  // namespace minisdpo::cpu::avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // MINISDPO_X86_64

namespace minisdpo::cpu::baseline {
constexpr int64_t kLanes = 4;
#include "cpu_rows.h"
}  // namespace minisdpo::cpu::baseline

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

namespace minisdpo::cpu {

namespace {

Capability supported_capability() {
#if MINISDPO_X86_64
  // libgcc's checks (compiler-rt's with clang) include the OS's support (XCR0) for the wider
  // registers.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Capability::kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::kAVX2;
#endif
  return Capability::kDefault;
}

// float64 (gradcheck): plain scalar loops, the same one-pass online max and sum, and the same
// NaN and inf rules as row_lse in cpu_rows.h (offset 0 while the max is -inf, so that a NaN
// after only -inf still reaches the sum; a +inf adds exp(inf - inf) = NaN).
double row_lse_f64(const double* x, int64_t V) {
  double m = -INFINITY, sum = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] > m) {
      sum *= std::exp(m - x[i]);
      m = x[i];
    }
    sum += std::exp(x[i] - (m == -INFINITY ? 0.0 : m));
  }
  return m + std::log(sum);
}

void row_grad_f64(const double* x, double* g, int64_t V, double lse, double coef, int64_t y) {
  const double g_y = -coef * (std::exp(x[y] - lse) - 1.0);
  for (int64_t i = 0; i < V; ++i) g[i] = -coef * std::exp(x[i] - lse);
  g[y] = g_y;
}

}  // namespace

Capability current_capability() {
  static const Capability supported = supported_capability();
  const char* env = std::getenv("MINISDPO_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return supported;
  const std::string want(env);
  Capability requested;
  if (want == "default") {
    requested = Capability::kDefault;
  } else if (want == "avx2") {
    requested = Capability::kAVX2;
  } else if (want == "avx512") {
    requested = Capability::kAVX512;
  } else {
    TORCH_CHECK_VALUE(false, "minisdpo: MINISDPO_CPU_CAPABILITY must be default, avx2 or avx512, got '",
                      want, "'");
  }
  // Never run instructions the CPU lacks: a request above what it supports is capped.
  return std::min(requested, supported);
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAVX512:
      return "avx512";
    case Capability::kAVX2:
      return "avx2";
    default:
      return "default";
  }
}

template <typename T>
RowKernels<T> row_kernels(Capability c) {
  if constexpr (std::is_same_v<T, double>) {
    return {&row_lse_f64, &row_grad_f64};
  } else {
    switch (c) {
#if MINISDPO_X86_64
      case Capability::kAVX512:
        return avx512::table<T>();
      case Capability::kAVX2:
        return avx2::table<T>();
#endif
      default:  // also every capability off x86-64, where supported_capability() caps it
        return baseline::table<T>();
    }
  }
}

template RowKernels<float> row_kernels<float>(Capability);
template RowKernels<double> row_kernels<double>(Capability);
template RowKernels<c10::BFloat16> row_kernels<c10::BFloat16>(Capability);
template RowKernels<c10::Half> row_kernels<c10::Half>(Capability);

}  // namespace minisdpo::cpu
