// CUDA kernels of the minisdpo ops (TORCH_LIBRARY_IMPL(minisdpo, CUDA)); the schemas and the CPU
// kernels are in csrc/sdpo.cpp, what the ops compute, and the gradient, in docs/method.md. The
// kernel rules are those of docs/design.md, the op contract, learned from Liger-Kernel,
// flash-attn's cross entropy and Cut Cross-Entropy: float32 accumulation, only the log-sum-exp
// per token is saved, the softmax is recomputed in the backward pass, p_y - 1 is formed in
// float32, ignored rows are skipped.
//
// Forward: one block per token row r = s * T + t, all rows in one grid, which gives the row's
// lse and its label's log-prob tok (0 and 0 where the label is ignored). The row is read once
// with 16-byte loads, kUnroll loads in flight per thread, into an online (max, sum) pair per
// thread merged across the block. A row that does not start on a 16-byte boundary (V = 32001,
// an offset view) reads its first few elements one by one (lead, csrc/sdpo_math.h), then
// 16-byte loads. sdpo_fwd then sums tok per sequence (one block per sequence) and forms the
// group loss and d loss / d logp (one block, group_loss of csrc/sdpo_math.h, the CPU's
// function), both in float64 and in a fixed order, so the result is deterministic and nothing
// waits on the host.
//
// NaN and inf as torch.log_softmax and minisdpo/loss.py: a NaN or a +inf in a counted row makes
// its lse NaN (through the sum, see accumulate), a NaN log-prob or ref_logps makes its group's
// loss NaN (group_loss), a row of -inf only has lse = -inf.
//
// Backward: one block per row, zeros where ignored, one read and one write of the row with the
// same 16-byte vectors (in place: the gradient aliases the logits).
//
// Labels outside [0, V) cannot be checked on the host without a synchronisation; the kernels
// check them with CUDA_KERNEL_ASSERT (as PyTorch's own nll_loss and gather do): a bad label
// stops the kernel with "device-side assert triggered", raised as a RuntimeError at the next
// synchronising call, and the kernel never reads outside the row.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/MemoryOverlap.h>

#include <cstdint>

#include "../sdpo.h"  // the checks, and csrc/sdpo_math.h: acc_t, group_loss

namespace minisdpo {
namespace {

constexpr int kUnroll = 4;        // 16-byte loads in flight per thread per step
constexpr int kMaxThreads = 512;  // per row block: 4 blocks fill an SM's 2048 threads
constexpr int kSumThreads = 128;  // per-sequence sum and group loss

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

// Elements per 16-byte access.
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
// fmax drops NaN, so a NaN logit reaches lse through the sum (exp(NaN) = NaN). While nothing
// but -inf and NaN has been seen the offset is 0, not -inf (x - -inf would turn every -inf into
// NaN). A +inf logit raises the max to +inf and adds exp(inf - inf) = NaN: lse is NaN, as
// torch.log_softmax gives.
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

// One block per row: lse and the label's log-prob. N is the elements per load (kVec<T>; 1 only
// for data not aligned to its element size). The row's head (the elements before its first
// N-aligned one) and tail (after the last whole pack), fewer than N each, are read one by one.
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
  const int64_t head = lead<N>(row, V);
  const auto* packs = reinterpret_cast<const Pack<T, N>*>(row + head);
  const int64_t n_packs = (V - head) / N;
  const int64_t body_end = head + n_packs * N;

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
  // Head and tail, fewer than N elements each: one element per thread.
  for (int64_t i = threadIdx.x; i < head + (V - body_end); i += blockDim.x) {
    const A x[1] = {static_cast<A>(row[i < head ? i : body_end + (i - head)])};
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

// One block: loss = mean over the G groups of group_loss (csrc/sdpo_math.h, the function the
// CPU runs in group_losses of csrc/sdpo.cpp), dlogps[s] = d loss / d logp_s, in float64. The
// groups are spread over the threads and their losses summed in a fixed order (block_sum).
template <typename L>
__global__ void group_loss_kernel(const double* __restrict__ logps, const double* __restrict__ ref,
                                  double beta, int64_t G, int64_t K, L* __restrict__ loss,
                                  double* __restrict__ dlogps) {
  double total = 0.0;
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    const int64_t w = g * (1 + K);
    total += group_loss(logps + w, ref + w, beta, K, 1.0 / static_cast<double>(G), dlogps + w);
  }
  total = block_sum(total);
  if (threadIdx.x == 0) loss[0] = static_cast<L>(total / static_cast<double>(G));
}

// g = coef * (onehot(y) - exp(x - lse)) over one row, by the block: the first `head` elements
// one by one, then N-element packs of x and g (both N-aligned after head), then the tail.
// g may alias x (in place): each element is read and then written by the same thread.
template <typename T, int N>
__device__ __forceinline__ void grad_row(const T* xrow, T* grow, int64_t V, int64_t head,
                                         acc_t<T> c, acc_t<T> l, int64_t y) {
  using A = acc_t<T>;
  const auto* xpacks = reinterpret_cast<const Pack<T, N>*>(xrow + head);
  auto* gpacks = reinterpret_cast<Pack<T, N>*>(grow + head);
  const int64_t n_packs = (V - head) / N;
  const int64_t body_end = head + n_packs * N;

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
          const A onehot = (head + i * N + k == y) ? A(1) : A(0);
          p[u].v[k] = static_cast<T>(-c * (prob - onehot));
        }
        gpacks[i] = p[u];
      }
    }
  }
  for (int64_t i = threadIdx.x; i < head + (V - body_end); i += blockDim.x) {
    const int64_t v = i < head ? i : body_end + (i - head);
    const A prob = Math<A>::exp(static_cast<A>(xrow[v]) - l);
    grow[v] = static_cast<T>(-c * (prob - (v == y ? A(1) : A(0))));
  }
}

// One block per row: g = coef * (onehot(y) - exp(x - lse)), zeros on ignored rows.
// grad may alias logits (in place). A row whose x and g start at different offsets from a
// 16-byte boundary cannot use the same packs for both and is done one element at a time
// (a strided view whose row stride is not a multiple of 16 bytes; launch_backward gives a
// contiguous x a gradient of the same alignment).
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
  const int64_t head = lead<N>(grow, V);

  if (y == ignore_index) {
    auto* gpacks = reinterpret_cast<Pack<T, N>*>(grow + head);
    const int64_t n_packs = (V - head) / N, body_end = head + n_packs * N;
    Pack<T, N> zero;
#pragma unroll
    for (int k = 0; k < N; ++k) zero.v[k] = static_cast<T>(0);
    for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) gpacks[i] = zero;
    for (int64_t i = threadIdx.x; i < head + (V - body_end); i += blockDim.x)
      grow[i < head ? i : body_end + (i - head)] = static_cast<T>(0);
    return;
  }
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT_MSG(y >= 0 && y < V, "minisdpo: a label is outside [0, V) and is not ignore_index");
  }

  const T* xrow = logits + row_offset(r, T_len, xs0, xs1);
  const A c = coef[(r / T_len) * cs0 + (r % T_len) * cs1];  // cs1 may be 0 (an expanded view)
  const A l = lse[r];
  if (lead<N>(xrow, V) == head) {
    grad_row<T, N>(xrow, grow, V, head, c, l, y);
  } else {
    grad_row<T, 1>(xrow, grow, V, 0, c, l, y);
  }
}

// Threads per row block: enough that each thread has about kUnroll loads per row, 32..512.
int row_threads(int64_t n_loads) {
  int threads = 32;
  while (threads < kMaxThreads && int64_t(threads) * kUnroll < n_loads) threads *= 2;
  return threads;
}

// 16-byte packs need data aligned to its element size (always so for tensors torch allocates;
// a from_blob pointer may not be); every row then has its own head up to a 16-byte boundary.
bool element_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0;
}

// A fresh gradient for x whose rows sit at the same offset from a 16-byte boundary as x's, so
// that the backward kernel reads and writes them with the same packs: for a contiguous x at an
// offset (a slice), a plain empty tensor would start every row at another offset. 16 extra
// bytes at most; the gradient is then a view at that storage offset.
at::Tensor empty_aligned_like(const at::Tensor& x) {
  const int64_t shift = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16) /
                        x.element_size();
  if (shift == 0 || !x.is_contiguous()) return at::empty(x.sizes(), x.options());
  return at::empty({x.numel() + shift}, x.options()).narrow(0, shift, x.numel()).view(x.sizes());
}

// Fills tok and lse (S, T) contiguous, of the accumulation dtype. x has adjacent row elements.
void launch_forward(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index,
                    at::Tensor& tok, at::Tensor& lse) {
  const int64_t S = x.size(0), T_len = x.size(1), V = x.size(2), rows = S * T_len;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "minisdpo: S * T = ", rows, " rows exceed the CUDA grid limit");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = element_aligned(x);
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
  const bool vec = element_aligned(x) && element_aligned(grad);
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

// loss () of dtype L (the accumulation dtype, or float64) and dlogps (S,) float64 from the
// float64 sequence log-probs: one block, group_loss_kernel.
template <typename L>
void launch_group_loss(const at::Tensor& logps64, const at::Tensor& ref_logps, double beta,
                       int64_t num_negatives, at::Tensor& loss, at::Tensor& dlogps) {
  const int64_t G = logps64.size(0) / (1 + num_negatives);
  const at::Tensor ref64 = ref_logps.to(at::kDouble).contiguous();
  group_loss_kernel<L><<<1, kSumThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logps64.const_data_ptr<double>(), ref64.const_data_ptr<double>(), beta, G, num_negatives,
      loss.mutable_data_ptr<L>(), dlogps.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpo_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_logps, double beta,
    int64_t num_negatives, int64_t ignore_index) {
  check_sdpo_fwd(logits, labels, ref_logps, beta, num_negatives);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto [tok, lse] = token_logps_fwd_cuda(logits, labels, ignore_index);
  const int64_t S = logits.size(0), T_len = logits.size(1);
  const auto opts = tok.options();
  at::Tensor logps = at::empty({S}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor logps64 = at::empty({S}, opts.dtype(at::kDouble));
  at::Tensor dlogps = at::empty({S}, opts.dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tok.scalar_type(), "minisdpo_loss_cuda", [&] {
    sequence_sum_kernel<scalar_t><<<S, kSumThreads, 0, stream>>>(
        tok.const_data_ptr<scalar_t>(), T_len, logps.mutable_data_ptr<scalar_t>(),
        logps64.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_group_loss<scalar_t>(logps64, ref_logps, beta, num_negatives, loss, dlogps);
  });
  return {loss, logps, lse, dlogps};
}

// The group loss of summed sequence log-probs (the linear op's, csrc/linear.cpp): loss () and
// dlogps (S,), float64.
std::tuple<at::Tensor, at::Tensor> sdpo_group_loss_cuda(const at::Tensor& logps,
                                                        const at::Tensor& ref_logps, double beta,
                                                        int64_t num_negatives) {
  check_sdpo_group_loss(logps, ref_logps, beta, num_negatives);
  const c10::cuda::CUDAGuard guard(logps.device());
  const at::Tensor logps64 = logps.to(at::kDouble).contiguous();
  at::Tensor loss = at::empty({}, logps64.options());
  at::Tensor dlogps = at::empty({logps.size(0)}, logps64.options());
  launch_group_loss<double>(logps64, ref_logps, beta, num_negatives, loss, dlogps);
  return {loss, dlogps};
}

at::Tensor logits_bwd_cuda(const at::Tensor& coef, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index) {
  check_logits_bwd(coef, logits, labels, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = rows_contiguous(logits);
  at::Tensor grad = empty_aligned_like(x);
  launch_backward(coef.to(lse.scalar_type()), x, labels.contiguous(), lse.contiguous(), ignore_index,
                  grad);
  return grad;
}

void logits_bwd_inplace_cuda(at::Tensor& logits, const at::Tensor& coef, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index) {
  check_logits_bwd(coef, logits, labels, lse);
  // An expanded view (one memory location for several elements) cannot take a gradient that
  // differs per element, and blocks writing its rows would race.
  at::assert_no_internal_overlap(logits);
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
  m.impl("sdpo_group_loss", &minisdpo::sdpo_group_loss_cuda);
  m.impl("logits_bwd", &minisdpo::logits_bwd_cuda);
  m.impl("logits_bwd_", &minisdpo::logits_bwd_inplace_cuda);
}
