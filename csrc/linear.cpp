// The fused linear S-DPO ops: the loss from hidden states and the LM-head weight, without the
// full logits. Why that works, and the gradients: docs/method.md, the LM head fused in.
//
// One chunk of counted tokens at a time, the forward pass computes the chunk's logits h_c @ W^T
// and reduces them with the existing row kernel (token_logps_fwd, which keeps the log-sum-exp
// per token). With save_dtok (the hidden states need a gradient and the weight does not: LoRA's
// frozen LM head), it then turns the chunk into onehot - softmax in place (logits_bwd_ with a
// coefficient of 1) and keeps dtok_c = (onehot - softmax) @ W, each token's d logp / d hidden:
// the backward pass only scales it by the token's coefficient (minisdpo/ops.py), and the logits
// are formed once. Otherwise the chunk is dropped, and linear_bwd recomputes it, turns it into
// its gradient in place (logits_bwd_) and multiplies out the gradients of the hidden states
// (g_c @ W) and of the weight (g_c^T @ h_c, accumulated in float32). The idea is Liger-Kernel's
// FusedLinearCrossEntropy (and Apple's Cut Cross-Entropy), written here from scratch.
//
// Peak extra memory is one chunk of logits plus the gradients of hidden and weight (or dtok,
// the size of the counted hidden states), independent of S * R * V. Only counted tokens
// (label != ignore_index) are gathered into the chunks: ignored ones cost nothing. The chunks
// cover whole rows of the vocabulary, since the row kernels need a whole row to form the
// log-sum-exp. The forward pass finds the counted tokens and checks their labels once
// (counted_rows: one host synchronisation on a GPU) and returns their positions, which the
// backward pass reuses: no synchronisation there.
//
// Implemented once for every device (CompositeExplicitAutograd): at::mm / addmm_ for the chunk
// matmuls and the minisdpo row kernels called through the dispatcher, which picks the CPU
// or the CUDA kernel. Autograd and fake kernels are registered in minisdpo/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "sdpo.h"

namespace minisdpo {

namespace {

// The default chunk: as many rows of logits as fit in this many bytes.
constexpr int64_t kChunkBytes = int64_t{64} << 20;

// Rows (tokens) per chunk: chunk_rows if > 0, else as many as fit in kChunkBytes, counting
// the logits in the input dtype and their float32 copy where the weight gradient needs one.
int64_t rows_per_chunk(int64_t chunk_rows, int64_t V, const at::Tensor& hidden) {
  if (chunk_rows > 0) return chunk_rows;
  const int64_t row_bytes = V * (hidden.element_size() + (hidden.element_size() < 4 ? 4 : 0));
  return std::max<int64_t>(1, kChunkBytes / row_bytes);
}

// The flat positions r = s * R + t of the counted tokens (label != ignore_index), in
// increasing order, after checking that their labels lie in [0, V). The one host
// synchronisation of the linear ops on a GPU: the count N (the output's size, which the chunk
// loops need on the host) and the first bad label, if any, reach the host together in one copy of
// three integers; the check and the gathering of the positions run on the device.
at::Tensor counted_rows(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const int64_t n = labels.numel(), R = labels.size(1);
  const auto lopts = labels.options().dtype(at::kLong);
  if (n == 0) return at::empty({0}, lopts);
  const at::Tensor flat = labels.reshape({-1});                                     // (n,)
  const at::Tensor counted = flat.ne(ignore_index);
  const at::Tensor bad = counted.logical_and(flat.lt(0).logical_or(flat.ge(V)));
  const at::Tensor pos = at::arange(n, lopts);
  const at::Tensor first_bad = at::where(bad, pos, n).amin();                       // n: none
  const at::Tensor bad_label = flat.index_select(0, first_bad.clamp_max(n - 1).reshape({1}));
  const at::Tensor summary = at::stack({counted.sum(), first_bad, bad_label.squeeze(0)});
  const at::Tensor host = summary.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  const int64_t* h = host.const_data_ptr<int64_t>();
  const int64_t N = h[0], r = h[1];
  if (r < n) check_label(h[2], r / R, r % R, V, ignore_index);
  // A permutation of the positions, the counted ones first (in order), then the ignored ones:
  // slot = the counted (or ignored) positions up to and including this one, less one.
  const at::Tensor c = counted.to(at::kLong);
  const at::Tensor slot = at::where(counted, c.cumsum(0) - 1, (1 - c).cumsum(0) + (N - 1));
  return at::empty({n}, lopts).index_copy_(0, slot, pos).slice(0, 0, N);           // (N,)
}

// The existing row kernels, called through the dispatcher (CPU or CUDA implementation).
std::tuple<at::Tensor, at::Tensor> call_token_logps_fwd(const at::Tensor& logits,
                                                        const at::Tensor& labels,
                                                        int64_t ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minisdpo::token_logps_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(logits, labels, ignore_index);
}

// The group loss of csrc/sdpo_math.h on the logps' device (sdpo_group_loss: CPU or CUDA).
std::tuple<at::Tensor, at::Tensor> call_sdpo_group_loss(const at::Tensor& logps,
                                                        const at::Tensor& ref_logps, double beta,
                                                        int64_t num_negatives) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minisdpo::sdpo_group_loss", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, double, int64_t)>();
  return op.call(logps, ref_logps, beta, num_negatives);
}

void call_logits_bwd_(at::Tensor& logits, const at::Tensor& coef, const at::Tensor& labels,
                      const at::Tensor& lse, int64_t ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minisdpo::logits_bwd_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t)>();
  op.call(logits, coef, labels, lse, ignore_index);
}

}  // namespace

// tok (S, R) = log softmax(hidden @ weight^T)[labels] per token and its lse (S, R), both in the
// accumulation dtype, 0 where ignored; rows (N,) the flat positions of the counted tokens
// (counted_rows), which the backward pass reuses; and, with save_dtok, dtok (N, D) in hidden's
// dtype: row i is d tok / d hidden of the token at rows[i], (onehot(y) - softmax(x)) @ weight,
// the hidden states' gradient up to the token's coefficient (docs/method.md, section 6).
// Without save_dtok, dtok is empty, shape (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logps_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    int64_t ignore_index, int64_t chunk_rows, bool save_dtok) {
  check_linear(hidden, weight, labels);
  const int64_t S = hidden.size(0), R = hidden.size(1), D = hidden.size(2), V = weight.size(0);
  const auto opts = hidden.options().dtype(acc_dtype(hidden.scalar_type()));
  at::Tensor tok = at::zeros({S * R}, opts);
  at::Tensor lse = at::zeros({S * R}, opts);
  const at::Tensor rows = counted_rows(labels, V, ignore_index);  // (N,)
  const int64_t N = rows.size(0), C = rows_per_chunk(chunk_rows, V, hidden);
  at::Tensor dtok = save_dtok ? at::empty({N, D}, hidden.options())   // (N, D) or (0,)
                              : at::empty({0}, hidden.options());
  const at::Tensor h = hidden.reshape({S * R, D});                 // (S*R, D)
  const at::Tensor y = labels.reshape({S * R});
  const at::Tensor wt = weight.t();                                // (D, V)
  const at::Tensor one = at::ones({1, 1}, opts);                   // the coefficient of dtok
  for (int64_t start = 0; start < N; start += C) {
    const int64_t end = std::min(N, start + C);
    const at::Tensor r = rows.slice(0, start, end);                              // (n,)
    const at::Tensor yr = y.index_select(0, r).unsqueeze(0);                     // (1, n)
    at::Tensor logits = at::mm(h.index_select(0, r), wt).unsqueeze(0);          // (1, n, V)
    auto [t, l] = call_token_logps_fwd(logits, yr, ignore_index);
    tok.index_copy_(0, r, t.squeeze(0));
    lse.index_copy_(0, r, l.squeeze(0));
    if (save_dtok) {
      call_logits_bwd_(logits, one.expand({1, end - start}), yr, l, ignore_index);  // onehot - p
      // Not mm_out: under autocast the logits (and this product) are bfloat16, dtok hidden's dtype.
      dtok.slice(0, start, end).copy_(at::mm(logits.squeeze(0), weight));       // (n, D)
    }
  }
  return {tok.view({S, R}), lse.view({S, R}), rows, dtok};
}

// The S-DPO loss from the token log-probs: the group loss of the logits op (sdpo_group_loss,
// csrc/sdpo_math.h), on the device of hidden. Returns (loss (), logps (S,), lse (S, R),
// dlogps (S,) float64) like sdpo_fwd, then rows and dtok as linear_token_logps_fwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpo_linear_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& ref_logps, double beta, int64_t num_negatives, int64_t ignore_index,
    int64_t chunk_rows, bool save_dtok) {
  check_sdpo_linear_fwd(hidden, weight, labels, ref_logps, beta, num_negatives);
  auto [tok, lse, rows, dtok] =
      linear_token_logps_fwd(hidden, weight, labels, ignore_index, chunk_rows, save_dtok);
  // logp(y) summed in double, in a fixed order: independent of chunks and threads.
  const at::Tensor logps = tok.to(at::kDouble).sum(1);  // (S,)
  auto [loss, dlogps] = call_sdpo_group_loss(logps, ref_logps, beta, num_negatives);
  return {loss.to(tok.scalar_type()), logps.to(tok.scalar_type()), lse, dlogps, rows, dtok};
}

// Gradients of hidden (S, R, D) (hidden's dtype) and of weight (V, D) (accumulation dtype) for
// the token-level coefficients coef (S, R): dL/dlogits = coef * (onehot - softmax), the logits
// recomputed chunk by chunk from the rows and lse the forward pass saved. An output not asked
// for (hidden_grad / weight_grad false) is returned empty, shape (0,).
std::tuple<at::Tensor, at::Tensor> linear_bwd(const at::Tensor& coef, const at::Tensor& hidden,
                                              const at::Tensor& weight, const at::Tensor& labels,
                                              const at::Tensor& rows, const at::Tensor& lse,
                                              int64_t ignore_index, int64_t chunk_rows,
                                              bool hidden_grad, bool weight_grad) {
  check_linear_bwd(coef, hidden, weight, labels, rows, lse);
  const auto acc = acc_dtype(hidden.scalar_type());
  const int64_t S = hidden.size(0), R = hidden.size(1), D = hidden.size(2), V = weight.size(0);
  at::Tensor grad_h = hidden_grad ? at::zeros({S * R, D}, hidden.options())
                                  : at::empty({0}, hidden.options());
  at::Tensor grad_w = weight_grad ? at::zeros({V, D}, hidden.options().dtype(acc))
                                  : at::empty({0}, hidden.options().dtype(acc));
  if (!hidden_grad && !weight_grad) return {grad_h, grad_w};
  const at::Tensor h = hidden.reshape({S * R, D});                 // (S*R, D)
  const at::Tensor y = labels.reshape({S * R});
  const at::Tensor c = coef.reshape({S * R});   // a copy of an expanded (S, 1) view: S*R floats
  const at::Tensor l = lse.reshape({S * R});
  const bool half = hidden.element_size() < 4;
  const int64_t N = rows.size(0), C = rows_per_chunk(chunk_rows, V, hidden);
  for (int64_t start = 0; start < N; start += C) {
    const at::Tensor r = rows.slice(0, start, std::min(N, start + C));  // (n,)
    const at::Tensor hc = h.index_select(0, r);                         // (n, D)
    at::Tensor g = at::mm(hc, weight.t()).unsqueeze(0);                 // (1, n, V): the logits
    call_logits_bwd_(g, c.index_select(0, r).unsqueeze(0), y.index_select(0, r).unsqueeze(0),
                     l.index_select(0, r).unsqueeze(0), ignore_index);  // now their gradient
    g = g.squeeze(0);                                                   // (n, V)
    // Under autocast the chunk's products are bfloat16: .to gives them the gradients' dtypes
    // (a no-op otherwise).
    if (hidden_grad) grad_h.index_copy_(0, r, at::mm(g, weight).to(grad_h.scalar_type()));
    // The weight gradient sums over every chunk: accumulate in float32 (addmm_ needs one
    // dtype, so half-precision chunks are widened first).
    if (weight_grad) {
      if (half || g.scalar_type() != acc) grad_w.addmm_(g.t().to(acc), hc.to(acc));  // (V, D)
      else grad_w.addmm_(g.t(), hc);
    }
  }
  return {hidden_grad ? grad_h.view({S, R, D}) : grad_h, grad_w};
}

}  // namespace minisdpo

TORCH_LIBRARY_FRAGMENT(minisdpo, m) {
  // Returns (tok, lse, rows, dtok).
  m.def(
      "linear_token_logps_fwd(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, "
      "int chunk_rows, bool save_dtok) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (loss, logps, lse, dlogps, rows, dtok).
  m.def(
      "sdpo_linear_fwd(Tensor hidden, Tensor weight, Tensor labels, Tensor ref_logps, float beta, "
      "int num_negatives, int ignore_index, int chunk_rows, bool save_dtok) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_bwd(Tensor coef, Tensor hidden, Tensor weight, Tensor labels, Tensor rows, "
      "Tensor lse, int ignore_index, int chunk_rows, bool hidden_grad, bool weight_grad) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minisdpo, CompositeExplicitAutograd, m) {
  m.impl("linear_token_logps_fwd", &minisdpo::linear_token_logps_fwd);
  m.impl("sdpo_linear_fwd", &minisdpo::sdpo_linear_fwd);
  m.impl("linear_bwd", &minisdpo::linear_bwd);
}
