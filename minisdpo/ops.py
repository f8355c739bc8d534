"""The fused S-DPO loss: public wrappers around the C++/CUDA ops of ``minisdpo._C``.

The only Python file that touches ``torch.ops.minisdpo``. It registers the ops' autograd
formulas (``torch.library.register_autograd``) and fake kernels (``torch.library.register_fake``,
for torch.compile), and exposes the same two functions as ``minisdpo.loss``, the plain PyTorch
reference, with the same signatures. The method is S-DPO ("On Softmax Direct Preference
Optimization for Recommendation", Chen et al., NeurIPS 2024, arXiv 2406.09215); the gradient
derivation is docs/method.md and DESIGN.md section 1:

    dL/dlogp(y_j) =  beta * sigma(S) * w_j / G     (rejected j; S = logsumexp z, w = softmax z)
    dL/dlogp(y_w) = -beta * sigma(S) / G           (chosen)
    dlogp(y)/dlogits[t, v] = [v == y_t] - softmax(logits_t)[v]

so the gradient of the logits is one coefficient per sequence, computed here from the saved
sequence log-probs (G-sized work, torch ops, no host synchronisation), times (onehot - softmax),
which the ``logits_bwd`` kernel writes in one pass from the saved per-token log-sum-exp.

``sdpo_linear_loss`` and ``linear_token_logps`` take the hidden states and the LM-head weight
instead of the logits (csrc/linear.cpp): the logits only ever exist one chunk of tokens at a
time, in the forward pass and again in the backward pass, which also forms the gradients of the
hidden states and of the weight chunk by chunk.
"""
from __future__ import annotations

import threading

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.minisdpo)

__all__ = ["sdpo_loss", "token_logps", "sdpo_linear_loss", "linear_token_logps", "cpu_capability"]

_ops = torch.ops.minisdpo


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# inplace_backward is an argument of the Python wrappers, not of the ops: the wrapper sets it
# here for the duration of the op call, and setup_context (which runs inside that call) keeps it.
_inplace = threading.local()


def _take_inplace_flag() -> bool:
    return getattr(_inplace, "on", False)


class _InplaceBackward:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        _inplace.on = self.on

    def __exit__(self, *exc) -> None:
        _inplace.on = False


def _logits_grad(ctx, coef: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 lse: torch.Tensor) -> torch.Tensor:
    """coef (S, T) * (onehot - softmax) on counted tokens, zeros elsewhere: the logits' gradient."""
    if ctx.inplace:
        # Opt-in: the logits are dead after the loss, so their storage takes the gradient.
        _ops.logits_bwd_(logits, coef, labels, lse, ctx.ignore_index)
        return logits
    return _ops.logits_bwd(coef, logits, labels, lse, ctx.ignore_index)


# ----- token_logps_fwd: (logits, labels, ignore_index) -> (token_logps (S, T), lse (S, T))


@torch.library.register_fake("minisdpo::token_logps_fwd")
def _token_logps_fwd_fake(logits, labels, ignore_index):
    S, T, _ = logits.shape
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty((S, T), dtype=acc), logits.new_empty((S, T), dtype=acc)


def _token_logps_setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.inplace = _take_inplace_flag()
    ctx.mark_non_differentiable(lse)


def _token_logps_backward(ctx, grad_tok, grad_lse):
    # d token_logp[s, t] / d logits[s, t, :] = onehot - softmax: the coefficient is grad_tok.
    logits, labels, lse = ctx.saved_tensors
    coef = grad_tok.to(_acc_dtype(logits.dtype))
    return _logits_grad(ctx, coef, logits, labels, lse), None, None


torch.library.register_autograd(
    "minisdpo::token_logps_fwd", _token_logps_backward, setup_context=_token_logps_setup
)


# ----- sdpo_fwd: (logits, labels, ref_logps, beta, K, ignore_index) -> (loss (), logps (S,), lse)


@torch.library.register_fake("minisdpo::sdpo_fwd")
def _sdpo_fwd_fake(logits, labels, ref_logps, beta, num_negatives, ignore_index):
    S, T, _ = logits.shape
    acc = _acc_dtype(logits.dtype)
    return (
        logits.new_empty((), dtype=acc),
        logits.new_empty((S,), dtype=acc),
        logits.new_empty((S, T), dtype=acc),
    )


def _sdpo_setup(ctx, inputs, output):
    logits, labels, ref_logps, beta, num_negatives, ignore_index = inputs
    _, logps, lse = output
    ctx.save_for_backward(logits, labels, lse, logps, ref_logps)
    ctx.beta, ctx.num_negatives, ctx.ignore_index = beta, num_negatives, ignore_index
    ctx.inplace = _take_inplace_flag()
    ctx.mark_non_differentiable(lse)


def _sequence_coef(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    num_negatives: int,
    grad_loss: torch.Tensor,
    grad_logps: torch.Tensor,
) -> torch.Tensor:
    """c_s = grad_loss * dL/dlogp_s + grad_logps_s (S,), in float64: it is G-sized work, and
    logp - ref_logp cancels most digits of two large float32 numbers."""
    k1 = 1 + num_negatives
    rewards = beta * (logps.double() - ref_logps.double())   # beta * delta(y), (S,)
    rewards = rewards.view(-1, k1)                            # (G, 1+K)
    z = rewards[:, 1:] - rewards[:, :1]                       # (G, K)
    groups = z.shape[0]
    scale = beta * torch.sigmoid(torch.logsumexp(z, dim=-1, keepdim=True)) / groups  # (G, 1)
    d_loss = torch.cat([-scale, scale * torch.softmax(z, dim=-1)], dim=-1)  # (G, 1+K)
    return grad_loss.double() * d_loss.reshape(-1) + grad_logps.double()  # (S,)


def _sdpo_backward(ctx, grad_loss, grad_logps, grad_lse):
    logits, labels, lse, logps, ref_logps = ctx.saved_tensors
    c = _sequence_coef(logps, ref_logps, ctx.beta, ctx.num_negatives, grad_loss, grad_logps)
    coef = c.to(_acc_dtype(logits.dtype)).unsqueeze(1).expand(logits.shape[:2])  # (S, T) view
    return _logits_grad(ctx, coef, logits, labels, lse), None, None, None, None, None


torch.library.register_autograd("minisdpo::sdpo_fwd", _sdpo_backward, setup_context=_sdpo_setup)


# ----- logits_bwd / logits_bwd_: coef * (onehot - softmax)


@torch.library.register_fake("minisdpo::logits_bwd")
def _logits_bwd_fake(coef, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("minisdpo::logits_bwd_")
def _logits_bwd_inplace_fake(logits, coef, labels, lse, ignore_index):
    return None


# ----- the LM head fused in (csrc/linear.cpp): linear_token_logps_fwd, sdpo_linear_fwd, linear_bwd


@torch.library.register_fake("minisdpo::linear_token_logps_fwd")
def _linear_token_logps_fwd_fake(hidden, weight, labels, ignore_index, chunk_rows):
    S, R, _ = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty((S, R), dtype=acc), hidden.new_empty((S, R), dtype=acc)


@torch.library.register_fake("minisdpo::sdpo_linear_fwd")
def _sdpo_linear_fwd_fake(hidden, weight, labels, ref_logps, beta, num_negatives, ignore_index,
                          chunk_rows):
    S, R, _ = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((S,), dtype=acc),
        hidden.new_empty((S, R), dtype=acc),
    )


@torch.library.register_fake("minisdpo::linear_bwd")
def _linear_bwd_fake(coef, hidden, weight, labels, lse, ignore_index, chunk_rows, hidden_grad,
                     weight_grad):
    acc = _acc_dtype(hidden.dtype)
    grad_h = hidden.new_empty(hidden.shape if hidden_grad else (0,))
    grad_w = weight.new_empty(weight.shape if weight_grad else (0,), dtype=acc)
    return grad_h, grad_w


def _linear_grads(ctx, coef: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of hidden and weight for the token coefficients coef (S, R); only those that
    autograd asks for are computed (the LM head is frozen under LoRA: no weight gradient)."""
    hidden, weight, labels, lse = ctx.saved_tensors[:4]
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h, grad_w = _ops.linear_bwd(coef, hidden, weight, labels, lse, ctx.ignore_index,
                                     ctx.chunk_rows, need_h, need_w)
    # The weight gradient is accumulated in float32 over the chunks, rounded once here.
    return (grad_h if need_h else None), (grad_w.to(weight.dtype) if need_w else None)


def _linear_token_logps_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, chunk_rows = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
    ctx.mark_non_differentiable(lse)


def _linear_token_logps_backward(ctx, grad_tok, grad_lse):
    coef = grad_tok.to(_acc_dtype(ctx.saved_tensors[0].dtype)).contiguous()
    return *_linear_grads(ctx, coef), None, None, None


torch.library.register_autograd(
    "minisdpo::linear_token_logps_fwd", _linear_token_logps_backward,
    setup_context=_linear_token_logps_setup,
)


def _sdpo_linear_setup(ctx, inputs, output):
    hidden, weight, labels, ref_logps, beta, num_negatives, ignore_index, chunk_rows = inputs
    _, logps, lse = output
    ctx.save_for_backward(hidden, weight, labels, lse, logps, ref_logps)
    ctx.beta, ctx.num_negatives = beta, num_negatives
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
    ctx.mark_non_differentiable(lse)


def _sdpo_linear_backward(ctx, grad_loss, grad_logps, grad_lse):
    hidden, _, labels, _, logps, ref_logps = ctx.saved_tensors
    c = _sequence_coef(logps, ref_logps, ctx.beta, ctx.num_negatives, grad_loss, grad_logps)
    coef = c.to(_acc_dtype(hidden.dtype)).unsqueeze(1).expand(labels.shape)  # (S, R) view
    return *_linear_grads(ctx, coef), None, None, None, None, None, None


torch.library.register_autograd(
    "minisdpo::sdpo_linear_fwd", _sdpo_linear_backward, setup_context=_sdpo_linear_setup
)


def _check_chunk_rows(chunk_rows: int) -> None:
    if not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"chunk_rows must be an int >= 0 (0: automatic), got {chunk_rows!r}")


# ----- public API (same names and signatures as minisdpo.loss)


def sdpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 1.0,
    num_negatives: int = 1,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused S-DPO loss (mean over groups) and the policy's sequence log-probs.

    logits (S, T, V) float32/bfloat16/float16/float64, any strides, S = G * (1 + K), sequences
    group-major (chosen first); labels (S, T) int64, ignore_index where a token does not count;
    ref_logps (S,) the frozen reference's log-probs (no gradient). Returns (loss (), logps (S,))
    in float32 (float64 for float64 logits); both are differentiable w.r.t. logits.
    inplace_backward=True writes the logits' gradient into the logits' own storage (saves one
    logits-sized buffer; the logits must not be used after the loss).
    """
    with _InplaceBackward(inplace_backward):
        loss, logps, _ = _ops.sdpo_fwd(
            logits, labels, ref_logps, float(beta), num_negatives, ignore_index
        )
    return loss, logps


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """log softmax(logits[s, t])[labels[s, t]] per token, 0 where ignored: (S, T) float32
    (float64 for float64 logits), differentiable w.r.t. logits."""
    with _InplaceBackward(inplace_backward):
        tok, _ = _ops.token_logps_fwd(logits, labels, ignore_index)
    return tok


def sdpo_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 1.0,
    num_negatives: int = 1,
    ignore_index: int = -100,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sdpo_loss(hidden @ weight.T, labels, ...)`` without the (S, R, V) logits.

    hidden (S, R, D) float32/bfloat16/float16/float64, S = G * (1 + K), sequences group-major;
    weight (V, D) the LM head's weight, same dtype; labels (S, R) int64, ignore_index where a
    token does not count (those rows cost nothing); ref_logps (S,) the reference's log-probs (no
    gradient). Returns (loss (), logps (S,)) in float32 (float64 for float64 input), both
    differentiable w.r.t. hidden and weight. The logits are formed ``chunk_rows`` counted tokens
    at a time (0: as many as fit in 64 MiB, counting a float32 copy for half dtypes), and again
    in the backward pass; the weight's gradient is accumulated in float32 over the chunks.
    """
    _check_chunk_rows(chunk_rows)
    loss, logps, _ = _ops.sdpo_linear_fwd(
        hidden, weight, labels, ref_logps, float(beta), num_negatives, ignore_index, chunk_rows
    )
    return loss, logps


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """``token_logps(hidden @ weight.T, labels)`` without the logits: (S, R) float32 (float64
    for float64 input), 0 where ignored, differentiable w.r.t. hidden and weight. Arguments as
    in ``sdpo_linear_loss``."""
    _check_chunk_rows(chunk_rows)
    tok, _ = _ops.linear_token_logps_fwd(hidden, weight, labels, ignore_index, chunk_rows)
    return tok


def cpu_capability() -> str:
    """The CPU code path the next call will take: 'default', 'avx2' or 'avx512' (the best the
    CPU supports, capped by the environment variable MINISDPO_CPU_CAPABILITY)."""
    return _ops.cpu_capability()
