// The minisdpo ops: their schemas (TORCH_LIBRARY) and their CPU implementations.
//
// What the ops compute, and the gradient, step by step: docs/method.md (the PyTorch twin is
// minisdpo/loss.py, the group loss csrc/sdpo_math.h). The forward pass reads each counted row of
// logits once and keeps only its float32 log-sum-exp; the backward pass recomputes the softmax
// from it and writes the logits' gradient in one pass. Ignored rows are skipped in the forward
// pass and zeroed in the backward pass. Rows are spread over threads with at::parallel_for; the
// per-row vector code is in cpu_rows.h, chosen per CPU by cpu_kernels.cpp.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "sdpo.h"

// An importable, empty Python module: importing minisdpo._C runs the registrations below.
// PyMODINIT_FUNC is already extern "C" in C++ (clang warns about a second one).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace minisdpo {

namespace {

// Enough rows per task that a task does at least ~32k elements of work (ATen's GRAIN_SIZE).
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / V); }

// The logits' gradient, from a cache of one block. A fresh logits-sized buffer costs mostly
// page faults on first touch: about as much as the backward pass itself in 2 MB pages, and
// several times more when Linux compacts memory to find them (docs/benchmarks.md). A training
// loop asks for a gradient of about the same size every step, so the block of the last large
// gradient freed is kept, and the next one that fits it (between half its size and all of it)
// takes it, its pages already in memory; the block kept before is freed. Large buffers only
// (glibc serves smaller ones from memory it keeps anyway); empty_cache() frees the block.
class BlockCache {
 public:
  static constexpr size_t kMinBytes = size_t{32} << 20;
  static constexpr size_t kHuge = size_t{2} << 20;

  // A block of at least `bytes` (a multiple of 2 MB), its size in *size.
  void* take(size_t bytes, size_t* size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (block_ != nullptr && size_ >= bytes && size_ / 2 <= bytes) {
        void* p = block_;
        *size = size_;
        block_ = nullptr;
        return p;
      }
    }
    *size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHuge, *size) == 0, "minisdpo: out of memory allocating ",
                *size, " bytes for the logits' gradient");
#ifdef __linux__
    // Ask Linux for transparent huge pages over the block, as PyTorch does for every allocation
    // under THP_MEM_ALLOC_ENABLE=1; a no-op where THP is off.
    madvise(p, *size, MADV_HUGEPAGE);
#endif
    return p;
  }

  // Called when the tensor of a block taken above is freed: keep it, free the one kept before.
  void give(void* p, size_t size) {
    void* old = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = block_;
      block_ = p;
      size_ = size;
    }
    std::free(old);
  }

  void clear() {
    void* old = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = block_;
      block_ = nullptr;
      size_ = 0;
    }
    std::free(old);
  }

 private:
  std::mutex mu_;
  void* block_ = nullptr;
  size_t size_ = 0;
};

// Never destroyed: a gradient may be freed after static destructors have run.
BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache;
  return *cache;
}

// An uninitialised contiguous tensor like `like`, from the block cache when it is large.
at::Tensor gradient_like(const at::Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes < BlockCache::kMinBytes) return at::empty(like.sizes(), like.options());
  size_t size = 0;
  void* p = block_cache().take(bytes, &size);
  return at::from_blob(
      p, like.sizes(), [size](void* q) { block_cache().give(q, size); },
      like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Per row r = s * T + t: lse[r] and tok[r] = logits[s, t, y] - lse[r] (0 for both if ignored).
template <typename T>
void forward_rows(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index,
                  acc_t<T>* tok, acc_t<T>* lse) {
  using A = acc_t<T>;
  const auto kernels = cpu::row_kernels<T>(cpu::current_capability());
  const int64_t S = x.size(0), Tn = x.size(1), V = x.size(2);
  const int64_t st0 = x.stride(0), st1 = x.stride(1);
  const T* base = x.const_data_ptr<T>();
  const auto lab = labels.accessor<int64_t, 2>();
  at::parallel_for(0, S * Tn, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = r / Tn, t = r % Tn, y = lab[s][t];
      if (y == ignore_index) {  // skipped entirely: the row is never read
        tok[r] = 0;
        lse[r] = 0;
        continue;
      }
      check_label(y, s, t, V, ignore_index);
      const T* row = base + s * st0 + t * st1;
      const A l = kernels.lse(row, V);
      lse[r] = l;
      tok[r] = static_cast<A>(row[y]) - l;
    }
  });
}

// grad[s, t, :] = coef[s, t] * (onehot(y) - exp(x[s, t, :] - lse[s, t])), zeros where ignored.
// grad may be x itself (in-place backward); both have adjacent row elements.
template <typename T>
void backward_rows(const at::Tensor& coef, const at::Tensor& x, const at::Tensor& labels,
                   const at::Tensor& lse, int64_t ignore_index, at::Tensor& grad) {
  using A = acc_t<T>;
  const auto kernels = cpu::row_kernels<T>(cpu::current_capability());
  const int64_t S = x.size(0), Tn = x.size(1), V = x.size(2);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), gs0 = grad.stride(0), gs1 = grad.stride(1);
  const T* xbase = x.const_data_ptr<T>();
  T* gbase = grad.mutable_data_ptr<T>();
  const auto lab = labels.accessor<int64_t, 2>();
  const auto c = coef.accessor<A, 2>();  // any strides, an expanded (S, 1) view included
  const auto l = lse.accessor<A, 2>();
  at::parallel_for(0, S * Tn, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = r / Tn, t = r % Tn, y = lab[s][t];
      T* grow = gbase + s * gs0 + t * gs1;
      if (y == ignore_index) {
        std::memset(static_cast<void*>(grow), 0, V * sizeof(T));  // +0.0 in every dtype
        continue;
      }
      check_label(y, s, t, V, ignore_index);
      kernels.grad(xbase + s * xs0 + t * xs1, grow, V, l[s][t], c[s][t], y);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logps_fwd_cpu(const at::Tensor& logits,
                                                       const at::Tensor& labels,
                                                       int64_t ignore_index) {
  check_token_logps_fwd(logits, labels);
  const at::Tensor x = rows_contiguous(logits);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor tok = at::empty({logits.size(0), logits.size(1)}, opts);
  at::Tensor lse = at::empty({logits.size(0), logits.size(1)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_logps_fwd", [&] {
    forward_rows<scalar_t>(x, labels, ignore_index, tok.mutable_data_ptr<acc_t<scalar_t>>(),
                           lse.mutable_data_ptr<acc_t<scalar_t>>());
  });
  return {tok, lse};
}

namespace {

// loss = mean over the G groups of group_loss (csrc/sdpo_math.h), dlogp[s] = d loss / d logp_s;
// G-sized work in float64, in a fixed order. The CUDA twin is group_loss_kernel.
double group_losses(const double* logp, const double* ref, double beta, int64_t K, int64_t G,
                    double* dlogp) {
  double total = 0.0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t w = g * (1 + K);
    total += group_loss(logp + w, ref + w, beta, K, 1.0 / static_cast<double>(G), dlogp + w);
  }
  return total / static_cast<double>(G);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpo_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_logps, double beta,
    int64_t num_negatives, int64_t ignore_index) {
  check_sdpo_fwd(logits, labels, ref_logps, beta, num_negatives);
  auto [tok, lse] = token_logps_fwd_cpu(logits, labels, ignore_index);
  const int64_t S = logits.size(0), Tn = logits.size(1), G = S / (1 + num_negatives);

  // logp(y) = sum_t tok[s, t], summed in double in a fixed order: the result does not depend
  // on the number of threads.
  const at::Tensor tok64 = tok.to(at::kDouble);
  const at::Tensor ref64 = ref_logps.to(at::kDouble).contiguous();
  const double* tp = tok64.const_data_ptr<double>();
  at::Tensor logps64 = at::zeros({S}, tok64.options());
  double* lp = logps64.mutable_data_ptr<double>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t < Tn; ++t) lp[s] += tp[s * Tn + t];

  // The loss and, in the same pass, d loss / d logp_s: the backward pass needs nothing else.
  at::Tensor dlogps = at::empty({S}, tok64.options());
  const double loss = group_losses(lp, ref64.const_data_ptr<double>(), beta, num_negatives, G,
                                   dlogps.mutable_data_ptr<double>());
  const auto opts = tok.options();
  return {at::scalar_tensor(loss, opts), logps64.to(opts.dtype()), lse, dlogps};
}

// The S-DPO loss of sequence log-probs (S,) that are already summed (the linear op's): loss ()
// and dlogps (S,), both float64.
std::tuple<at::Tensor, at::Tensor> sdpo_group_loss_cpu(const at::Tensor& logps,
                                                       const at::Tensor& ref_logps, double beta,
                                                       int64_t num_negatives) {
  check_sdpo_group_loss(logps, ref_logps, beta, num_negatives);
  const at::Tensor lp = logps.to(at::kDouble).contiguous();
  const at::Tensor rp = ref_logps.to(at::kDouble).contiguous();
  const int64_t S = logps.size(0), G = S / (1 + num_negatives);
  at::Tensor dlogps = at::empty({S}, lp.options());
  const double loss = group_losses(lp.const_data_ptr<double>(), rp.const_data_ptr<double>(), beta,
                                   num_negatives, G, dlogps.mutable_data_ptr<double>());
  return {at::scalar_tensor(loss, lp.options()), dlogps};
}

at::Tensor logits_bwd_cpu(const at::Tensor& coef, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index) {
  check_logits_bwd(coef, logits, labels, lse);
  const at::Tensor x = rows_contiguous(logits);
  at::Tensor grad = gradient_like(logits);
  const at::Tensor c = coef.to(lse.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "logits_bwd", [&] {
    backward_rows<scalar_t>(c, x, labels, lse, ignore_index, grad);
  });
  return grad;
}

void logits_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& coef, const at::Tensor& labels,
                            const at::Tensor& lse, int64_t ignore_index) {
  check_logits_bwd(coef, logits, labels, lse);
  // An expanded view (one memory location for several elements) cannot take a gradient that
  // differs per element, and threads writing its rows would race.
  at::assert_no_internal_overlap(logits);
  if (logits.stride(2) != 1) {  // rows not adjacent: compute aside, then write back
    logits.copy_(logits_bwd_cpu(coef, logits, labels, lse, ignore_index));
    return;
  }
  const at::Tensor c = coef.to(lse.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logits_bwd_", [&] {
    backward_rows<scalar_t>(c, logits, labels, lse, ignore_index, logits);
  });
}

// The CPU capability the next call will use (default | avx2 | avx512), for tests and benchmarks.
std::string cpu_capability() { return cpu::capability_name(cpu::current_capability()); }

// Free the block the CPU backward pass keeps for the next gradient (BlockCache above).
void empty_cache() { block_cache().clear(); }

}  // namespace minisdpo

TORCH_LIBRARY(minisdpo, m) {
  m.set_python_module("minisdpo.ops");  // where the fake kernels and autograd are registered
  m.def("token_logps_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  // Returns (loss, logps, lse, dlogps): dlogps = d loss / d logps (S,) float64, computed with the
  // loss, is all the backward pass needs besides lse.
  m.def(
      "sdpo_fwd(Tensor logits, Tensor labels, Tensor ref_logps, float beta, int num_negatives, "
      "int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sdpo_group_loss(Tensor logps, Tensor ref_logps, float beta, int num_negatives) "
      "-> (Tensor, Tensor)");
  m.def("logits_bwd(Tensor coef, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  // The same, written into the logits' own storage: the linear ops' chunks (csrc/linear.cpp).
  m.def(
      "logits_bwd_(Tensor(a!) logits, Tensor coef, Tensor labels, Tensor lse, int ignore_index) "
      "-> ()");
  m.def("cpu_capability() -> str", &minisdpo::cpu_capability);
  m.def("empty_cache() -> ()", &minisdpo::empty_cache);
}

TORCH_LIBRARY_IMPL(minisdpo, CPU, m) {
  m.impl("token_logps_fwd", &minisdpo::token_logps_fwd_cpu);
  m.impl("sdpo_fwd", &minisdpo::sdpo_fwd_cpu);
  m.impl("sdpo_group_loss", &minisdpo::sdpo_group_loss_cpu);
  m.impl("logits_bwd", &minisdpo::logits_bwd_cpu);
  m.impl("logits_bwd_", &minisdpo::logits_bwd_inplace_cpu);
}
