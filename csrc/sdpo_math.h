// The math every minisdpo kernel shares, written once for the host and the device: the
// accumulation dtype, a row's unaligned head, softplus, and the S-DPO loss of one group with
// its gradient.
//
// Included by the CPU kernels (csrc/sdpo.cpp, csrc/cpu_kernels.h) and by the CUDA kernels
// (csrc/cuda/sdpo.cu), where the functions below are __host__ __device__: the logits op, the
// linear op (through the minisdpo::sdpo_group_loss op) and the GPU all run this one group loss.
// The PyTorch twin is minisdpo/loss.py (preference_loss); the derivation docs/method.md,
// sections 2-3.
#pragma once

#include <ATen/OpMathType.h>

#include <math.h>  // exp, log, log1p in the global namespace: the names CUDA device code has too

#include <cstdint>

#ifdef __CUDACC__
#define MINISDPO_HOST_DEVICE __host__ __device__
#else
#define MINISDPO_HOST_DEVICE
#endif

namespace minisdpo {

// Accumulation dtype: float32 for the half types, the input's own dtype for float32 and
// float64 (float64 stays float64 for gradcheck). This is ATen's opmath rule, so the type and
// the ScalarType below cannot disagree; minisdpo/loss.py states the same rule in Python
// (accumulation_dtype, which the fake kernels of minisdpo/ops.py use; tests/test_ops.py checks
// that the two agree).
template <typename T>
using acc_t = at::opmath_type<T>;

inline c10::ScalarType acc_dtype(c10::ScalarType dtype) { return at::toOpMathType(dtype); }

// How many of a row's first V elements, starting at p, come before its first element on an
// N * sizeof(T)-byte boundary (at most V, fewer than N): the row's head, read and written one
// by one; after it every N-element vector access is aligned and none splits a cache line. A row
// of V = 32001 or of an offset view starts anywhere. The CPU rows use N = their copy's lanes
// (16, 8 or 4, csrc/cpu_rows.h), the CUDA kernels 16-byte packs (csrc/cuda/sdpo.cu).
template <int N, typename T>
MINISDPO_HOST_DEVICE inline int64_t lead(const T* p, int64_t V) {
  constexpr uintptr_t kBytes = N * sizeof(T);
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % kBytes;
  const int64_t head = mis == 0 ? 0 : static_cast<int64_t>((kBytes - mis) / sizeof(T));
  return head < V ? head : V;
}

// log(1 + exp(x)) for every x without overflow. NaN stays NaN: `x > 0` is false for NaN and
// log1p(exp(NaN)) is NaN.
MINISDPO_HOST_DEVICE inline double softplus(double x) {
  return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

// 1 / (1 + exp(-x)) for every x without overflow; NaN stays NaN.
MINISDPO_HOST_DEVICE inline double sigmoid(double x) {
  return x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
}

// max(a, b), NaN if either is NaN (std::max and fmax drop a NaN: a NaN reward would vanish).
MINISDPO_HOST_DEVICE inline double max_or_nan(double a, double b) {
  return (a > b || a != a) ? a : b;
}

// One group of 1 + K sequences, chosen first: logp and ref point at its 1 + K policy and
// reference log-probs. Returns the group's loss
//
//   loss_g = softplus(logsumexp_j z_j),   z_j = beta (logp_j - ref_j) - beta (logp_0 - ref_0)
//
// and writes dlogp[i] = scale * d loss_g / d logp_i for i = 0..K (scale: the group's weight in
// the batch loss, 1/G for the mean over groups):
//
//   d loss_g / d logp_j =  beta sigmoid(S) softmax(z)_j   (rejected j),  S = logsumexp_j z_j
//   d loss_g / d logp_0 = -sum_j d loss_g / d logp_j     (= -beta sigmoid(S))
//
// logsumexp follows torch.logsumexp: shifted by the max unless the max is infinite (then
// exp(z) is 0 or inf as it stands), and a NaN anywhere gives NaN, so a NaN log-prob or
// reference log-prob makes the group's loss and gradient NaN, as in minisdpo/loss.py. The
// chosen's derivative is the sum over j, as autograd forms it from the PyTorch twin: an infinite
// z_j (softmax inf / inf = NaN) then makes it NaN there too, not -beta.
MINISDPO_HOST_DEVICE inline double group_loss(const double* logp, const double* ref, double beta,
                                              int64_t K, double scale, double* dlogp) {
  const double r_w = beta * (logp[0] - ref[0]);
  double z_max = -INFINITY;
  for (int64_t j = 1; j <= K; ++j) {
    dlogp[j] = beta * (logp[j] - ref[j]) - r_w;  // z_j, until the last loop
    z_max = max_or_nan(z_max, dlogp[j]);
  }
  const double shift = (z_max == INFINITY || z_max == -INFINITY) ? 0.0 : z_max;
  double sum = 0.0;
  for (int64_t j = 1; j <= K; ++j) {
    dlogp[j] = exp(dlogp[j] - shift);  // exp(z_j - shift), until the last loop
    sum += dlogp[j];
  }
  const double S = shift + log(sum);
  const double c = scale * beta * sigmoid(S);
  double chosen = 0.0;
  for (int64_t j = 1; j <= K; ++j) {
    dlogp[j] = c * (dlogp[j] / sum);
    chosen -= dlogp[j];
  }
  dlogp[0] = chosen;
  return softplus(S);
}

}  // namespace minisdpo
