// Shared declarations of the minisdpo ops and their argument checks.
//
// Included by csrc/sdpo.cpp (schemas + CPU kernels), csrc/linear.cpp (the linear ops) and
// csrc/cuda/sdpo.cu (CUDA kernels), so every device rejects the same bad input with the same
// message, each naming the argument. These are the only argument checks: the fake kernels of
// minisdpo/ops.py are shape functions that check only the shapes their outputs rest on. The op
// contract is docs/design.md, the op contract; the math is docs/method.md (S-DPO, Chen et al.,
// NeurIPS 2024, arXiv 2406.09215) and csrc/sdpo_math.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "sdpo_math.h"

namespace minisdpo {

// x (logits or hidden): a floating tensor of one of the four supported dtypes, 3-D, its sizes
// named `dims` in the message ("(S, T, V)").
inline void check_input(const at::Tensor& x, const char* name, const char* dims) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                   "minisdpo: ", name, " must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK_VALUE(x.dim() == 3, "minisdpo: ", name, " must be 3-D ", dims, ", got shape ",
                    x.sizes());
}

// t (labels, coef, lse) has the first two sizes of `like` (logits or hidden), named `rows` in
// the message ("(S, T)"), and lies on like's device.
inline void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name, const char* rows) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1),
                    "minisdpo: ", name, " must have shape ", rows, " = (", like.size(0), ", ",
                    like.size(1), ") to match ", like_name, " ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), "minisdpo: ", name, " must be on ", like.device(),
                    " like ", like_name, ", got ", t.device());
}

// labels (S, T) int64. The range [0, V) is checked by check_label: the logits ops check it where
// they read the labels anyway (no host synchronisation: on a GPU a device-side assert,
// csrc/cuda/sdpo.cu); the linear ops check it once per forward pass, on the device, and bring
// the first bad label to the host with the count of counted tokens, which they need there anyway
// (one synchronisation per forward pass, none in the backward pass: counted_rows in
// csrc/linear.cpp).
inline void check_labels(const at::Tensor& labels, const at::Tensor& like, const char* like_name,
                         const char* rows) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "minisdpo: labels must be int64, got ",
                   labels.scalar_type());
  check_rows(labels, "labels", like, like_name, rows);
}

// labels[s, t] = y, counted (not ignore_index), lies in [0, V).
inline void check_label(int64_t y, int64_t s, int64_t t, int64_t V, int64_t ignore_index) {
  TORCH_CHECK_VALUE(y >= 0 && y < V, "minisdpo: labels[", s, ", ", t, "] = ", y,
                    " is outside [0, V) = [0, ", V, ") and is not ignore_index = ", ignore_index);
}

// t (S, T) of the accumulation dtype of `like`: lse as the forward pass saved it, and the
// linear ops' coef.
inline void check_acc(const at::Tensor& t, const char* name, const at::Tensor& like,
                      const char* like_name, const char* rows) {
  const auto acc = acc_dtype(like.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "minisdpo: ", name, " must be ", acc, " for ",
                   like.scalar_type(), " ", like_name, ", got ", t.scalar_type());
  check_rows(t, name, like, like_name, rows);
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

// ref_logps as above, beta finite, num_negatives >= 1, S = G * (1 + K) with G >= 1.
inline void check_group(const at::Tensor& ref_logps, const at::Tensor& like,
                        const char* like_name, double beta, int64_t num_negatives) {
  check_ref_logps(ref_logps, like, like_name);
  TORCH_CHECK_VALUE(std::isfinite(beta), "minisdpo: beta must be finite, got ", beta);
  TORCH_CHECK_VALUE(num_negatives >= 1, "minisdpo: num_negatives must be >= 1, got ",
                    num_negatives);
  const int64_t S = like.size(0);
  TORCH_CHECK_VALUE(S > 0 && S % (1 + num_negatives) == 0, "minisdpo: the number of sequences S = ",
                    like_name, ".size(0) = ", S,
                    " must be a positive multiple of 1 + num_negatives = ", 1 + num_negatives);
}

// hidden (S, R, D); weight (V, D) of the same dtype and device; labels (S, R).
inline void check_linear(const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& labels) {
  check_input(hidden, "hidden", "(S, R, D)");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(),
                   "minisdpo: weight must have the dtype of hidden (", hidden.scalar_type(),
                   "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(2) && weight.size(0) > 0,
                    "minisdpo: weight must have shape (V, D) with V > 0 and D = hidden.size(2) = ",
                    hidden.size(2), ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), "minisdpo: weight must be on ",
                    hidden.device(), " like hidden, got ", weight.device());
  check_labels(labels, hidden, "hidden", "(S, R)");
}

// The checks of each op, one function per op.
inline void check_token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels) {
  check_input(logits, "logits", "(S, T, V)");
  TORCH_CHECK_VALUE(logits.size(2) > 0, "minisdpo: logits must have a vocabulary V > 0, got shape ",
                    logits.sizes());
  check_labels(labels, logits, "logits", "(S, T)");
}

inline void check_sdpo_fwd(const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& ref_logps, double beta, int64_t num_negatives) {
  check_token_logps_fwd(logits, labels);
  check_group(ref_logps, logits, "logits", beta, num_negatives);
}

// logps (S,) floating: the policy's sequence log-probs given to the group loss.
inline void check_sdpo_group_loss(const at::Tensor& logps, const at::Tensor& ref_logps,
                                  double beta, int64_t num_negatives) {
  TORCH_CHECK_TYPE(at::isFloatingType(logps.scalar_type()),
                   "minisdpo: logps must be a floating tensor, got ", logps.scalar_type());
  TORCH_CHECK_VALUE(logps.dim() == 1, "minisdpo: logps must be 1-D (S,), got shape ",
                    logps.sizes());
  check_group(ref_logps, logps, "logps", beta, num_negatives);
}

// coef (S, T) float32/float64, any strides (an expanded (S, 1) view is fine); lse (S, T) as
// the forward pass saved it.
inline void check_logits_bwd(const at::Tensor& coef, const at::Tensor& logits,
                             const at::Tensor& labels, const at::Tensor& lse) {
  check_token_logps_fwd(logits, labels);
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
                   "minisdpo: coef must be float32 or float64, got ", coef.scalar_type());
  check_rows(coef, "coef", logits, "logits", "(S, T)");
  check_acc(lse, "lse", logits, "logits", "(S, T)");
}

inline void check_sdpo_linear_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                  const at::Tensor& labels, const at::Tensor& ref_logps,
                                  double beta, int64_t num_negatives) {
  check_linear(hidden, weight, labels);
  check_group(ref_logps, hidden, "hidden", beta, num_negatives);
}

// rows (N,) int64 as the forward pass saved it: the flat positions of the counted tokens.
inline void check_linear_bwd(const at::Tensor& coef, const at::Tensor& hidden,
                             const at::Tensor& weight, const at::Tensor& labels,
                             const at::Tensor& rows, const at::Tensor& lse) {
  check_linear(hidden, weight, labels);
  check_acc(coef, "coef", hidden, "hidden", "(S, R)");
  check_acc(lse, "lse", hidden, "hidden", "(S, R)");
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "minisdpo: rows must be int64, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.size(0) <= labels.numel(),
                    "minisdpo: rows must be 1-D with at most S * R = ", labels.numel(),
                    " elements, got shape ", rows.sizes());
  TORCH_CHECK_VALUE(rows.device() == hidden.device(), "minisdpo: rows must be on ",
                    hidden.device(), " like hidden, got ", rows.device());
}

// The kernels index rows by their first two strides; the V elements of a row must be adjacent.
inline at::Tensor rows_contiguous(const at::Tensor& logits) {
  return logits.stride(2) == 1 ? logits : logits.contiguous();
}

// The CPU implementations (TORCH_LIBRARY_IMPL CPU in sdpo.cpp; the CUDA ones are in
// cuda/sdpo.cu).
std::tuple<at::Tensor, at::Tensor> token_logps_fwd_cpu(const at::Tensor& logits,
                                                       const at::Tensor& labels,
                                                       int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpo_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_logps, double beta,
    int64_t num_negatives, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor> sdpo_group_loss_cpu(const at::Tensor& logps,
                                                       const at::Tensor& ref_logps, double beta,
                                                       int64_t num_negatives);
at::Tensor logits_bwd_cpu(const at::Tensor& coef, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index);
void logits_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& coef, const at::Tensor& labels,
                            const at::Tensor& lse, int64_t ignore_index);

}  // namespace minisdpo
