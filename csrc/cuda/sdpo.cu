// CUDA kernels of the minisdpo ops (TORCH_LIBRARY_IMPL(minisdpo, CUDA)).
//
// Fused S-DPO loss ("On Softmax Direct Preference Optimization for Recommendation", Chen et al.,
// NeurIPS 2024, arXiv 2406.09215, eq. 11-12; derivation in docs/method.md, reference in
// minisdpo/loss.py, schemas and CPU kernels in csrc/sdpo.cpp). The kernel rules are those of
// DESIGN.md section 3, learned from Liger-Kernel, flash-attn's cross entropy and Cut
// Cross-Entropy: float32 accumulation, only the log-sum-exp per token is saved, the softmax is
// recomputed in the backward pass, p_y - 1 is formed in float32, ignored rows are skipped.
//
// Forward, per token row r = s * T + t (one block per row, all rows in one grid):
//   lse[r] = log sum_v exp(x[v]),  tok[r] = x[y] - lse[r]      (0 and 0 where y is ignored)
// read once with 16-byte loads, UNROLL loads in flight per thread, an online (max, sum) pair
// per thread merged across the block. sdpo_fwd then sums tok per sequence (one block per
// sequence) and forms the group loss (one block), both in float64 and in a fixed order, so the
// result is deterministic and nothing waits on the host.
//
// Backward, per row: g[v] = coef[s, t] * ([v == y] - exp(x[v] - lse[r])), zeros where ignored,
// one read and one write of the row with the same 16-byte vectors (in place: g aliases x).
//
// Labels outside [0, V) cannot be checked on the host without a synchronisation; the kernels
// check them with CUDA_KERNEL_ASSERT (as PyTorch's own nll_loss and gather do): a bad label
// stops the kernel with "device-side assert triggered", raised as a RuntimeError at the next
// synchronising call, and the kernel never reads outside the row.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../sdpo.h"

namespace minisdpo {
namespace {

constexpr int kUnroll = 4;        // 16-byte loads in flight per thread per step
constexpr int kMaxThreads = 512;  // per row block: 4 blocks fill an SM's 2048 threads
constexpr int kSumThreads = 128;  // per-sequence sum and group loss

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// exp(d) = exp2(d * log2(e)): one FMUL and one MUFU.EX2 in float32 (2 ulp). The offsets d are
// differences from the row's running maximum, itself a logit, so they are exact or nearly so
// and lse = max + log(sum) carries only the rounding of that final sum, as on the CPU.
template <typename A>
struct Math;
template <>
struct Math<float> {
  static __device__ __forceinline__ float exp(float d) { return exp2f(d * 1.4426950408889634f); }
  static __device__ __forceinline__ float log(float x) { return logf(x); }
};
template <>
struct Math<double> {
  static __device__ __forceinline__ double exp(double d) { return ::exp(d); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
};

// N elements loaded or stored as one access of N * sizeof(T) bytes (16 when vectorised).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access; 1 when the rows are not 16-byte aligned.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Merge two (max, sum) pairs, sum being relative to exp(max); an empty pair is (-inf, 0).
// A pair with max = -inf has seen only -inf and NaN logits, so its sum is 0 or NaN.
template <typename A>
__device__ __forceinline__ void merge(A& m, A& sum, A other_m, A other_sum) {
  using M = Math<A>;
  const A top = m > other_m ? m : other_m;
  if (top == -INFINITY) {  // no finite element on either side: avoid exp(-inf - -inf) = NaN
    sum += other_sum;      // 0, or NaN if a NaN was seen (it must reach lse)
    return;
  }
  sum = sum * M::exp(m - top) + other_sum * M::exp(other_m - top);
  m = top;
}

// Fold n logits into a thread's (max, sum) pair: one rescale for the n, one exp each.
// fmax drops NaN, so a NaN logit reaches lse through the sum. While nothing but -inf and NaN
// has been seen the offset is 0, not -inf (x - -inf would turn every -inf into NaN).
template <typename A, int n>
__device__ __forceinline__ void accumulate(A& m, A& sum, const A (&x)[n]) {
  using M = Math<A>;
  A top = -INFINITY;
#pragma unroll
  for (int k = 0; k < n; ++k) top = fmax(top, x[k]);
  const A new_m = fmax(m, top);
  const A offset = new_m == -INFINITY ? A(0) : new_m;
  A chunk = 0;
#pragma unroll
  for (int k = 0; k < n; ++k) chunk += M::exp(x[k] - offset);
  sum = sum * M::exp(m - offset) + chunk;
  m = new_m;
}

// Block-wide merge of every thread's pair; the result is valid in thread 0.
// blockDim.x is a multiple of 32 and at most 1024.
template <typename A>
__device__ __forceinline__ void block_merge(A& m, A& sum) {
  __shared__ A sh_m[32];
  __shared__ A sh_sum[32];
  for (int off = 16; off > 0; off >>= 1)
    merge(m, sum, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, sum, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_sum[warp] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    m = lane < warps ? sh_m[lane] : A(-INFINITY);
    sum = lane < warps ? sh_sum[lane] : A(0);
    for (int off = 16; off > 0; off >>= 1)
      merge(m, sum, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, sum, off));
  }
}

// Block-wide sum in a fixed order (deterministic for a given blockDim); valid in thread 0.
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double sh[32];
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / 32) ? sh[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  }
  return x;
}

// Where row r = s * T + t of logits starts, given its first two strides (in elements).
__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t T, int64_t st0, int64_t st1) {
  return (r / T) * st0 + (r % T) * st1;
}

// One block per row: lse and the label's log-prob. N is the elements per load (kVec<T> when
// every row starts 16-byte aligned, else 1); the V % N tail elements are read one by one.
template <typename T, int N>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t T_len,
                   int64_t st0, int64_t st1, int64_t V, int64_t ignore_index,
                   acc_t<T>* __restrict__ tok, acc_t<T>* __restrict__ lse) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  if (y == ignore_index) {  // the whole block leaves before any __syncthreads
    if (threadIdx.x == 0) {
      tok[r] = 0;
      lse[r] = 0;
    }
    return;
  }
  const T* row = logits + row_offset(r, T_len, st0, st1);
  const auto* packs = reinterpret_cast<const Pack<T, N>*>(row);
  const int64_t n_packs = V / N;

  A m = -INFINITY, sum = 0;  // this thread's running max and sum of exp(x - m)
  for (int64_t base = threadIdx.x; base < n_packs; base += int64_t(blockDim.x) * kUnroll) {
    // Issue all loads first, so kUnroll * 16 bytes per thread are in flight at once.
    A x[kUnroll * N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      if (i < n_packs) {
        const Pack<T, N> p = packs[i];
#pragma unroll
        for (int k = 0; k < N; ++k) x[u * N + k] = static_cast<A>(p.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) x[u * N + k] = -INFINITY;
      }
    }
    accumulate(m, sum, x);
  }
  for (int64_t v = n_packs * N + threadIdx.x; v < V; v += blockDim.x) {  // tail, fewer than N
    const A x[1] = {static_cast<A>(row[v])};
    accumulate(m, sum, x);
  }

  block_merge(m, sum);
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT_MSG(y >= 0 && y < V, "minisdpo: a label is outside [0, V) and is not ignore_index");
    const A l = m + Math<A>::log(sum);
    lse[r] = l;
    tok[r] = (y >= 0 && y < V) ? static_cast<A>(row[y]) - l : A(NAN);
  }
}

// One block per sequence: logps[s] = sum_t tok[s, t], in float64 and a fixed order.
template <typename A>
__global__ void sequence_sum_kernel(const A* __restrict__ tok, int64_t T_len, A* __restrict__ logps,
                                    double* __restrict__ logps64) {
  const int64_t s = blockIdx.x;
  double acc = 0.0;
  for (int64_t t = threadIdx.x; t < T_len; t += blockDim.x) acc += static_cast<double>(tok[s * T_len + t]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    logps[s] = static_cast<A>(acc);
    logps64[s] = acc;
  }
}

// One block: loss = mean over groups g of softplus(logsumexp_j z_j),
// z_j = beta * (delta(y_j) - delta(y_w)), delta = logp - ref_logp, in float64.
template <typename A>
__global__ void group_loss_kernel(const double* __restrict__ logps, const double* __restrict__ ref,
                                  double beta, int64_t G, int64_t K, A* __restrict__ loss) {
  double total = 0.0;
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    const int64_t w = g * (1 + K);
    const double r_w = beta * (logps[w] - ref[w]);
    double z_max = -INFINITY;
    for (int64_t j = 1; j <= K; ++j) z_max = fmax(z_max, beta * (logps[w + j] - ref[w + j]) - r_w);
    double sum = 0.0;
    for (int64_t j = 1; j <= K; ++j) sum += exp(beta * (logps[w + j] - ref[w + j]) - r_w - z_max);
    const double lse_z = isinf(z_max) ? z_max : z_max + log(sum);
    // softplus without overflow: max(x, 0) + log1p(exp(-|x|))
    total += fmax(lse_z, 0.0) + log1p(exp(-fabs(lse_z)));
  }
  total = block_sum(total);
  if (threadIdx.x == 0) loss[0] = static_cast<A>(total / static_cast<double>(G));
}

// One block per row: g = coef * (onehot(y) - exp(x - lse)), zeros on ignored rows.
// grad may alias logits (in place); each element is read and then written by the same thread.
template <typename T, int N>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const acc_t<T>* coef, int64_t cs0, int64_t cs1, const T* logits,
                    int64_t xs0, int64_t xs1, T* grad, int64_t gs0, int64_t gs1,
                    const int64_t* __restrict__ labels, const acc_t<T>* __restrict__ lse,
                    int64_t T_len, int64_t V, int64_t ignore_index) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  T* grow = grad + row_offset(r, T_len, gs0, gs1);
  auto* gpacks = reinterpret_cast<Pack<T, N>*>(grow);
  const int64_t n_packs = V / N;

  if (y == ignore_index) {
    Pack<T, N> zero;
#pragma unroll
    for (int k = 0; k < N; ++k) zero.v[k] = static_cast<T>(0);
    for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) gpacks[i] = zero;
    for (int64_t v = n_packs * N + threadIdx.x; v < V; v += blockDim.x) grow[v] = static_cast<T>(0);
    return;
  }
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT_MSG(y >= 0 && y < V, "minisdpo: a label is outside [0, V) and is not ignore_index");
  }

  const T* xrow = logits + row_offset(r, T_len, xs0, xs1);
  const auto* xpacks = reinterpret_cast<const Pack<T, N>*>(xrow);
  const A c = coef[(r / T_len) * cs0 + (r % T_len) * cs1];  // cs1 may be 0 (an expanded view)
  const A l = lse[r];

  for (int64_t base = threadIdx.x; base < n_packs; base += int64_t(blockDim.x) * kUnroll) {
    Pack<T, N> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      if (i < n_packs) p[u] = xpacks[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      if (i < n_packs) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const A prob = Math<A>::exp(static_cast<A>(p[u].v[k]) - l);
          // p_y - 1 is formed in A before the single rounding to T.
          const A onehot = (i * N + k == y) ? A(1) : A(0);
          p[u].v[k] = static_cast<T>(-c * (prob - onehot));
        }
        gpacks[i] = p[u];
      }
    }
  }
  for (int64_t v = n_packs * N + threadIdx.x; v < V; v += blockDim.x) {
    const A prob = Math<A>::exp(static_cast<A>(xrow[v]) - l);
    grow[v] = static_cast<T>(-c * (prob - (v == y ? A(1) : A(0))));
  }
}

// Threads per row block: enough that each thread has about kUnroll loads per row, 32..512.
int row_threads(int64_t n_loads) {
  int threads = 32;
  while (threads < kMaxThreads && int64_t(threads) * kUnroll < n_loads) threads *= 2;
  return threads;
}

// Every row of t starts on a 16-byte boundary (the base and both row strides are multiples).
bool rows_aligned16(const at::Tensor& t) {
  const int64_t es = t.element_size();
  const bool base = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  const bool s0 = t.size(0) <= 1 || (t.stride(0) * es) % 16 == 0;
  const bool s1 = t.size(1) <= 1 || (t.stride(1) * es) % 16 == 0;
  return base && s0 && s1;
}

// The kernels index rows by their first two strides; the V elements of a row must be adjacent.
at::Tensor rows_contiguous(const at::Tensor& logits) {
  return logits.stride(2) == 1 ? logits : logits.contiguous();
}

// Fills tok and lse (S, T) contiguous, of the accumulation dtype. x has adjacent row elements.
void launch_forward(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index,
                    at::Tensor& tok, at::Tensor& lse) {
  const int64_t S = x.size(0), T_len = x.size(1), V = x.size(2), rows = S * T_len;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "minisdpo: S * T = ", rows, " rows exceed the CUDA grid limit");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = rows_aligned16(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minisdpo_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int N = kVec<scalar_t>;
    const int threads = row_threads(vec ? V / N : V);
    auto* kernel = vec ? forward_kernel<scalar_t, N> : forward_kernel<scalar_t, 1>;
    kernel<<<rows, threads, 0, stream>>>(x.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                                         T_len, x.stride(0), x.stride(1), V, ignore_index,
                                         tok.mutable_data_ptr<A>(), lse.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad (S, T, V) may be x itself; both have adjacent row elements.
void launch_backward(const at::Tensor& coef, const at::Tensor& x, const at::Tensor& labels,
                     const at::Tensor& lse, int64_t ignore_index, at::Tensor& grad) {
  const int64_t S = x.size(0), T_len = x.size(1), V = x.size(2), rows = S * T_len;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "minisdpo: S * T = ", rows, " rows exceed the CUDA grid limit");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = rows_aligned16(x) && rows_aligned16(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minisdpo_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int N = kVec<scalar_t>;
    const int threads = row_threads(vec ? V / N : V);
    auto* kernel = vec ? backward_kernel<scalar_t, N> : backward_kernel<scalar_t, 1>;
    kernel<<<rows, threads, 0, stream>>>(
        coef.const_data_ptr<A>(), coef.stride(0), coef.stride(1), x.const_data_ptr<scalar_t>(),
        x.stride(0), x.stride(1), grad.mutable_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
        labels.const_data_ptr<int64_t>(), lse.const_data_ptr<A>(), T_len, V, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> token_logps_fwd_cuda(const at::Tensor& logits,
                                                        const at::Tensor& labels,
                                                        int64_t ignore_index) {
  check_token_logps_fwd(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = rows_contiguous(logits);
  const at::Tensor y = labels.contiguous();
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor tok = at::empty({logits.size(0), logits.size(1)}, opts);
  at::Tensor lse = at::empty({logits.size(0), logits.size(1)}, opts);
  launch_forward(x, y, ignore_index, tok, lse);
  return {tok, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpo_fwd_cuda(const at::Tensor& logits,
                                                             const at::Tensor& labels,
                                                             const at::Tensor& ref_logps,
                                                             double beta, int64_t num_negatives,
                                                             int64_t ignore_index) {
  check_sdpo_fwd(logits, labels, ref_logps, beta, num_negatives);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto [tok, lse] = token_logps_fwd_cuda(logits, labels, ignore_index);
  const int64_t S = logits.size(0), T_len = logits.size(1), G = S / (1 + num_negatives);
  const auto opts = tok.options();
  at::Tensor logps = at::empty({S}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor logps64 = at::empty({S}, opts.dtype(at::kDouble));
  const at::Tensor ref64 = ref_logps.to(at::kDouble).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tok.scalar_type(), "minisdpo_loss_cuda", [&] {
    sequence_sum_kernel<scalar_t><<<S, kSumThreads, 0, stream>>>(
        tok.const_data_ptr<scalar_t>(), T_len, logps.mutable_data_ptr<scalar_t>(),
        logps64.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    group_loss_kernel<scalar_t><<<1, kSumThreads, 0, stream>>>(
        logps64.const_data_ptr<double>(), ref64.const_data_ptr<double>(), beta, G, num_negatives,
        loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, logps, lse};
}

at::Tensor logits_bwd_cuda(const at::Tensor& coef, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index) {
  check_logits_bwd(coef, logits, labels, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = rows_contiguous(logits);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  launch_backward(coef.to(lse.scalar_type()), x, labels.contiguous(), lse.contiguous(), ignore_index,
                  grad);
  return grad;
}

void logits_bwd_inplace_cuda(at::Tensor& logits, const at::Tensor& coef, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index) {
  check_logits_bwd(coef, logits, labels, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (logits.stride(2) != 1) {  // rows not adjacent: compute aside, then write back
    logits.copy_(logits_bwd_cuda(coef, logits, labels, lse, ignore_index));
    return;
  }
  launch_backward(coef.to(lse.scalar_type()), logits, labels.contiguous(), lse.contiguous(),
                  ignore_index, logits);
}

}  // namespace
}  // namespace minisdpo

TORCH_LIBRARY_IMPL(minisdpo, CUDA, m) {
  m.impl("token_logps_fwd", &minisdpo::token_logps_fwd_cuda);
  m.impl("sdpo_fwd", &minisdpo::sdpo_fwd_cuda);
  m.impl("logits_bwd", &minisdpo::logits_bwd_cuda);
  m.impl("logits_bwd_", &minisdpo::logits_bwd_inplace_cuda);
}
