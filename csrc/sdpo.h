// Shared declarations of the minisdpo ops and their argument checks.
//
// Included by csrc/sdpo.cpp (schemas + CPU kernels), csrc/linear.cpp (the linear ops) and
// csrc/cuda/sdpo.cu (CUDA kernels), so every device rejects the same bad input with the same
// message, each naming the argument; the fake kernels of minisdpo/ops.py check the same
// conditions with torch._check_value / torch._check_type while torch.compile traces. The op
// contract is docs/design.md, the op contract; the math is docs/method.md (S-DPO, Chen et al.,
// NeurIPS 2024, arXiv 2406.09215) and csrc/sdpo_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "sdpo_math.h"

namespace minisdpo {

// logits (S, T, V): a floating tensor of one of the four supported dtypes, any strides.
inline void check_logits(const at::Tensor& logits) {
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                   "minisdpo: logits must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK_VALUE(logits.dim() == 3, "minisdpo: logits must be 3-D (S, T, V), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) > 0, "minisdpo: logits must have a vocabulary V > 0, got shape ",
                    logits.sizes());
}

// labels (S, T) int64 on the logits' device. The range [0, V) is checked inside the kernels,
// where the labels are read anyway (no host synchronisation on a GPU).
inline void check_labels(const at::Tensor& labels, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "minisdpo: labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                        labels.size(1) == logits.size(1),
                    "minisdpo: labels must have shape (S, T) = (", logits.size(0), ", ",
                    logits.size(1), ") to match logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "minisdpo: labels must be on ",
                    logits.device(), " like logits, got ", labels.device());
}

// ref_logps (S,): the frozen reference's sequence log-probs, any floating dtype. `like` is
// the tensor whose first dimension is S (logits, hidden or logps), named `like_name`.
inline void check_ref_logps(const at::Tensor& ref_logps, const at::Tensor& like,
                            const char* like_name) {
  TORCH_CHECK_TYPE(at::isFloatingType(ref_logps.scalar_type()),
                   "minisdpo: ref_logps must be a floating tensor, got ", ref_logps.scalar_type());
  TORCH_CHECK_VALUE(ref_logps.dim() == 1 && ref_logps.size(0) == like.size(0),
                    "minisdpo: ref_logps must have shape (S,) = (", like.size(0), ",) to match ",
                    like_name, " ", like.sizes(), ", got ", ref_logps.sizes());
  TORCH_CHECK_VALUE(ref_logps.device() == like.device(), "minisdpo: ref_logps must be on ",
                    like.device(), " like ", like_name, ", got ", ref_logps.device());
}

// beta finite, num_negatives >= 1, S = G * (1 + K) with G >= 1; S is `like`.size(0).
inline void check_group(const at::Tensor& like, const char* like_name, double beta,
                        int64_t num_negatives) {
  TORCH_CHECK_VALUE(std::isfinite(beta), "minisdpo: beta must be finite, got ", beta);
  TORCH_CHECK_VALUE(num_negatives >= 1, "minisdpo: num_negatives must be >= 1, got ",
                    num_negatives);
  const int64_t S = like.size(0);
  TORCH_CHECK_VALUE(S > 0 && S % (1 + num_negatives) == 0, "minisdpo: the number of sequences S = ",
                    like_name, ".size(0) = ", S,
                    " must be a positive multiple of 1 + num_negatives = ", 1 + num_negatives);
}

// logps (S,) floating: the policy's sequence log-probs given to the group loss.
inline void check_group_loss(const at::Tensor& logps, const at::Tensor& ref_logps, double beta,
                             int64_t num_negatives) {
  TORCH_CHECK_TYPE(at::isFloatingType(logps.scalar_type()),
                   "minisdpo: logps must be a floating tensor, got ", logps.scalar_type());
  TORCH_CHECK_VALUE(logps.dim() == 1, "minisdpo: logps must be 1-D (S,), got shape ",
                    logps.sizes());
  check_ref_logps(ref_logps, logps, "logps");
  check_group(logps, "logps", beta, num_negatives);
}

// coef (S, T) float32/float64, any strides (an expanded (S, 1) view is fine).
inline void check_coef(const at::Tensor& coef, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
                   "minisdpo: coef must be float32 or float64, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == logits.size(0) &&
                        coef.size(1) == logits.size(1),
                    "minisdpo: coef must have shape (S, T) = (", logits.size(0), ", ",
                    logits.size(1), "), got ", coef.sizes());
  TORCH_CHECK_VALUE(coef.device() == logits.device(), "minisdpo: coef must be on ",
                    logits.device(), " like logits, got ", coef.device());
}

// lse (S, T) as saved by the forward pass: float32 (float64 for float64 logits).
inline void check_lse(const at::Tensor& lse, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_dtype(logits.scalar_type()), "minisdpo: lse must be ",
                   acc_dtype(logits.scalar_type()), " for ", logits.scalar_type(), " logits, got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == logits.size(0) &&
                        lse.size(1) == logits.size(1),
                    "minisdpo: lse must have shape (S, T) = (", logits.size(0), ", ",
                    logits.size(1), "), got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == logits.device(), "minisdpo: lse must be on ",
                    logits.device(), " like logits, got ", lse.device());
}

// All checks of each op, in one place per op.
inline void check_token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels) {
  check_logits(logits);
  check_labels(labels, logits);
}

inline void check_sdpo_fwd(const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& ref_logps, double beta, int64_t num_negatives) {
  check_logits(logits);
  check_labels(labels, logits);
  check_ref_logps(ref_logps, logits, "logits");
  check_group(logits, "logits", beta, num_negatives);
}

inline void check_logits_bwd(const at::Tensor& coef, const at::Tensor& logits,
                             const at::Tensor& labels, const at::Tensor& lse) {
  check_logits(logits);
  check_labels(labels, logits);
  check_coef(coef, logits);
  check_lse(lse, logits);
}

// The CPU implementations (TORCH_LIBRARY_IMPL CPU in sdpo.cpp; the CUDA ones are in
// cuda/sdpo.cu). inplace_backward is read by the autograd formula (minisdpo/ops.py) only.
std::tuple<at::Tensor, at::Tensor> token_logps_fwd_cpu(const at::Tensor& logits,
                                                       const at::Tensor& labels,
                                                       int64_t ignore_index,
                                                       bool inplace_backward);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpo_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_logps, double beta,
    int64_t num_negatives, int64_t ignore_index, bool inplace_backward);
std::tuple<at::Tensor, at::Tensor> sdpo_group_loss_cpu(const at::Tensor& logps,
                                                       const at::Tensor& ref_logps, double beta,
                                                       int64_t num_negatives);
at::Tensor logits_bwd_cpu(const at::Tensor& coef, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index);
void logits_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& coef, const at::Tensor& labels,
                            const at::Tensor& lse, int64_t ignore_index);

}  // namespace minisdpo
