"""The fused S-DPO loss: public wrappers around the C++/CUDA ops of ``minisdpo._C``.

The only Python file that touches ``torch.ops.minisdpo``. It registers the ops' autograd
formulas (``torch.library.register_autograd``) and fake kernels (``torch.library.register_fake``,
for torch.compile), and exposes the same two functions as ``minisdpo.loss``, their plain PyTorch
twin, with the same signatures, and two more with the LM head fused in: this module is a
``minisdpo.loss.LinearLossBackend``. The loss and its gradients, step by step, are
docs/method.md.

The forward kernels compute the group loss and, in the same pass, its derivative with respect to
each sequence's log-prob (the ``dlogps`` output, csrc/sdpo_math.h); the backward pass multiplies
it by the incoming gradient (S-sized work, torch ops, no host synchronisation) to get one
coefficient per sequence, and the ``logits_bwd`` kernel turns that into the logits' gradient in
one pass from the saved per-token log-sum-exp.

``sdpo_linear_loss`` and ``linear_token_logps`` take the hidden states and the LM-head weight
instead of the logits (csrc/linear.cpp): the logits only ever exist one chunk of tokens at a
time. With the LM head frozen, the forward pass also forms each counted token's d logp / d hidden
from its chunk, and the backward pass scales it by the token's coefficient: the logits are formed
once. When the weight needs a gradient, the backward pass forms them again, chunk by chunk, for
the gradients of the weight and of the hidden states.

The argument checks are the kernels' (csrc/sdpo.h, one place for every device). The fake
kernels are shape functions: each checks with ``torch._check_value`` only the shapes its outputs
rest on, so that torch.compile rejects mismatched shapes while it traces, and leaves dtypes,
devices, beta and the label range to the kernels, which check them when the compiled graph
runs. Their output dtypes follow ``minisdpo.loss.accumulation_dtype``.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.minisdpo)
from .loss import accumulation_dtype

__all__ = ["sdpo_loss", "token_logps", "sdpo_linear_loss", "linear_token_logps", "cpu_capability", "empty_cache"]

_ops = torch.ops.minisdpo


# ----- the fake kernels' shape checks


def _rows(x: torch.Tensor, name: str, **same_rows: torch.Tensor) -> tuple:
    """(S, T) of x (logits or hidden), 3-D; each of same_rows (labels, coef, lse) is (S, T)."""
    torch._check_value(x.dim() == 3, lambda: f"minisdpo: {name} must be 3-D, got shape {tuple(x.shape)}")
    S, T = x.shape[:2]
    for t_name, t in same_rows.items():
        torch._check_value(t.shape == (S, T), lambda: (
            f"minisdpo: {t_name} must have shape ({S}, {T}) like {name}, got {tuple(t.shape)}"))
    return S, T


def _linear_rows(hidden: torch.Tensor, weight: torch.Tensor, **same_rows: torch.Tensor) -> tuple:
    """(S, R) of hidden, as _rows; weight (V, D) with hidden's D."""
    S, R = _rows(hidden, "hidden", **same_rows)
    torch._check_value(weight.dim() == 2 and weight.shape[1] == hidden.shape[2], lambda: (
        f"minisdpo: weight must have shape (V, D) with D = hidden.size(2) = {hidden.shape[2]}, "
        f"got {tuple(weight.shape)}"))
    return S, R


def _groups(S, ref_logps: torch.Tensor, num_negatives: int) -> None:
    """ref_logps (S,); the S sequences make whole groups of 1 + num_negatives."""
    torch._check_value(ref_logps.shape == (S,), lambda: (
        f"minisdpo: ref_logps must have shape ({S},), got {tuple(ref_logps.shape)}"))
    torch._check_value(num_negatives >= 1, lambda: f"minisdpo: num_negatives must be >= 1, got {num_negatives}")
    torch._check_value(S % (1 + num_negatives) == 0, lambda: (
        f"minisdpo: S = {S} sequences must be a multiple of 1 + num_negatives = {1 + num_negatives}"))


def _loss_outputs(lse: torch.Tensor) -> tuple:
    """The forward ops' (loss (), logps (S,), lse (S, T), dlogps (S,) float64), given lse."""
    S = lse.shape[0]
    return lse.new_empty(()), lse.new_empty((S,)), lse, lse.new_empty((S,), dtype=torch.float64)


# ----- autograd helpers


def _sequence_coef(dlogps: torch.Tensor, grad_loss: torch.Tensor | None,
                   grad_logps: torch.Tensor | None) -> torch.Tensor | None:
    """c_s = grad_loss * dL/dlogp_s + grad_logps_s (S,), in float64 (logp - ref_logp cancels most
    digits of two large numbers). dlogps = dL/dlogp came from the forward kernel. An output
    that no gradient reaches (None) adds nothing: a NaN loss that is not differentiated does
    not poison the gradient of logps. None when neither output is differentiated."""
    c = None
    if grad_loss is not None:
        c = grad_loss.double() * dlogps
    if grad_logps is not None:
        c = grad_logps.double() if c is None else c + grad_logps.double()
    return c


# ----- token_logps_fwd: (logits, labels, ignore_index) -> (token_logps, lse)


@torch.library.register_fake("minisdpo::token_logps_fwd")
def _token_logps_fwd_fake(logits, labels, ignore_index):
    S, T = _rows(logits, "logits", labels=labels)
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty((S, T), dtype=acc), logits.new_empty((S, T), dtype=acc)


def _token_logps_setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _token_logps_backward(ctx, grad_tok, grad_lse):
    # d token_logp[s, t] / d logits[s, t, :] = onehot - softmax: the coefficient is grad_tok.
    if grad_tok is None:
        return None, None, None
    logits, labels, lse = ctx.saved_tensors
    coef = grad_tok.to(lse.dtype)
    return _ops.logits_bwd(coef, logits, labels, lse, ctx.ignore_index), None, None


torch.library.register_autograd(
    "minisdpo::token_logps_fwd", _token_logps_backward, setup_context=_token_logps_setup
)


# ----- sdpo_fwd: (logits, labels, ref_logps, beta, K, ignore_index)
#                 -> (loss (), logps (S,), lse (S, T), dlogps (S,) float64)


@torch.library.register_fake("minisdpo::sdpo_fwd")
def _sdpo_fwd_fake(logits, labels, ref_logps, beta, num_negatives, ignore_index):
    _, lse = _token_logps_fwd_fake(logits, labels, ignore_index)
    _groups(logits.shape[0], ref_logps, num_negatives)
    return _loss_outputs(lse)


def _sdpo_setup(ctx, inputs, output):
    logits, labels, ref_logps, beta, num_negatives, ignore_index = inputs
    _, _, lse, dlogps = output
    ctx.save_for_backward(logits, labels, lse, dlogps)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse, dlogps)
    ctx.set_materialize_grads(False)


def _sdpo_backward(ctx, grad_loss, grad_logps, grad_lse, grad_dlogps):
    logits, labels, lse, dlogps = ctx.saved_tensors
    c = _sequence_coef(dlogps, grad_loss, grad_logps)
    if c is None:
        return (None,) * 6
    coef = c.to(lse.dtype).unsqueeze(1).expand(logits.shape[:2])  # (S, T) view
    return _ops.logits_bwd(coef, logits, labels, lse, ctx.ignore_index), None, None, None, None, None


torch.library.register_autograd("minisdpo::sdpo_fwd", _sdpo_backward, setup_context=_sdpo_setup)


# ----- sdpo_group_loss: (logps (S,), ref_logps, beta, K) -> (loss (), dlogps (S,)), float64;
# used inside sdpo_linear_fwd (csrc/linear.cpp), not differentiated itself.


@torch.library.register_fake("minisdpo::sdpo_group_loss")
def _sdpo_group_loss_fake(logps, ref_logps, beta, num_negatives):
    torch._check_value(logps.dim() == 1, lambda: f"minisdpo: logps must be 1-D, got shape {tuple(logps.shape)}")
    _groups(logps.shape[0], ref_logps, num_negatives)
    return (logps.new_empty((), dtype=torch.float64),
            logps.new_empty(logps.shape, dtype=torch.float64))


# ----- logits_bwd / logits_bwd_: coef * (onehot - softmax)


@torch.library.register_fake("minisdpo::logits_bwd")
def _logits_bwd_fake(coef, logits, labels, lse, ignore_index):
    _rows(logits, "logits", labels=labels, coef=coef, lse=lse)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("minisdpo::logits_bwd_")
def _logits_bwd_inplace_fake(logits, coef, labels, lse, ignore_index):
    _rows(logits, "logits", labels=labels, coef=coef, lse=lse)
    return None


# ----- the LM head fused in (csrc/linear.cpp): linear_token_logps_fwd, sdpo_linear_fwd, linear_bwd
#
# The forward ops also return rows (N,), the flat positions of the counted tokens, whose number N
# only the labels' values fix (a data-dependent size under torch.compile), and, with save_dtok,
# dtok (N, D): d token_logp / d hidden of each counted token. The backward pass then either
# scales dtok by each token's coefficient ("saved", no logits at all) or recomputes the logits
# chunk by chunk ("recompute", linear_bwd: the weight's gradient needs it). docs/method.md,
# section 6.


def _counted_outputs(hidden: torch.Tensor, save_dtok: bool) -> tuple:
    """The fake rows (N,) and dtok ((N, D), or (0,) without save_dtok), N data-dependent."""
    n = torch.library.get_ctx().new_dynamic_size()
    rows = hidden.new_empty((n,), dtype=torch.long)
    return rows, hidden.new_empty((n, hidden.shape[2]) if save_dtok else (0,))


@torch.library.register_fake("minisdpo::linear_token_logps_fwd")
def _linear_token_logps_fwd_fake(hidden, weight, labels, ignore_index, chunk_rows, save_dtok):
    S, R = _linear_rows(hidden, weight, labels=labels)
    acc = accumulation_dtype(hidden.dtype)
    return (hidden.new_empty((S, R), dtype=acc), hidden.new_empty((S, R), dtype=acc),
            *_counted_outputs(hidden, save_dtok))


@torch.library.register_fake("minisdpo::sdpo_linear_fwd")
def _sdpo_linear_fwd_fake(hidden, weight, labels, ref_logps, beta, num_negatives, ignore_index,
                          chunk_rows, save_dtok):
    S, R = _linear_rows(hidden, weight, labels=labels)
    _groups(S, ref_logps, num_negatives)   # every shape check before the data-dependent size
    lse = hidden.new_empty((S, R), dtype=accumulation_dtype(hidden.dtype))
    return *_loss_outputs(lse), *_counted_outputs(hidden, save_dtok)


@torch.library.register_fake("minisdpo::linear_bwd")
def _linear_bwd_fake(coef, hidden, weight, labels, rows, lse, ignore_index, chunk_rows, hidden_grad,
                     weight_grad):
    _linear_rows(hidden, weight, labels=labels, coef=coef, lse=lse)
    acc = accumulation_dtype(hidden.dtype)
    grad_h = hidden.new_empty(hidden.shape if hidden_grad else (0,))
    grad_w = weight.new_empty(weight.shape if weight_grad else (0,), dtype=acc)
    return grad_h, grad_w


def _linear_grads(ctx, coef: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of hidden and weight for the token coefficients coef (S, R) (the accumulation
    dtype, any strides); only those that autograd asks for are computed (the LM head is frozen
    under LoRA: no weight gradient). The hidden states' gradient comes from the saved dtok when
    the forward pass made it, else from recomputed logits, as the weight's always does."""
    hidden, weight, labels, rows, lse, dtok = ctx.saved_tensors[:6]
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    saved = need_h and ctx.save_dtok
    grad_h = grad_w = None
    if saved:
        # dL/dh of token rows[i] = coef of that token * dtok[i]; ignored tokens get zeros.
        S, R, D = hidden.shape
        c = coef.reshape(S * R).index_select(0, rows).unsqueeze(1)            # (N, 1)
        grad_h = hidden.new_zeros((S * R, D)).index_copy_(0, rows, (c * dtok).to(hidden.dtype))
        grad_h = grad_h.view(S, R, D)
    if need_w or (need_h and not saved):
        gh, gw = _ops.linear_bwd(coef, hidden, weight, labels, rows, lse, ctx.ignore_index,
                                 ctx.chunk_rows, need_h and not saved, need_w)
        grad_h = gh if need_h and not saved else grad_h
        # The weight gradient is accumulated in float32 over the chunks, rounded once here.
        grad_w = gw.to(weight.dtype) if need_w else None
    return grad_h, grad_w


def _save_linear(ctx, hidden, weight, labels, rows, lse, dtok, ignore_index, chunk_rows,
                 save_dtok, *more: torch.Tensor) -> None:
    ctx.save_for_backward(hidden, weight, labels, rows, lse, dtok, *more)
    ctx.ignore_index, ctx.chunk_rows, ctx.save_dtok = ignore_index, chunk_rows, save_dtok
    ctx.set_materialize_grads(False)


def _linear_token_logps_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, chunk_rows, save_dtok = inputs
    _, lse, rows, dtok = output
    _save_linear(ctx, hidden, weight, labels, rows, lse, dtok, ignore_index, chunk_rows, save_dtok)
    ctx.mark_non_differentiable(lse, rows, dtok)


def _linear_token_logps_backward(ctx, grad_tok, grad_lse, grad_rows, grad_dtok):
    if grad_tok is None:
        return (None,) * 6
    coef = grad_tok.to(ctx.saved_tensors[4].dtype)   # lse's: the accumulation dtype
    return *_linear_grads(ctx, coef), None, None, None, None


torch.library.register_autograd(
    "minisdpo::linear_token_logps_fwd", _linear_token_logps_backward,
    setup_context=_linear_token_logps_setup,
)


def _sdpo_linear_setup(ctx, inputs, output):
    hidden, weight, labels, ref_logps, beta, num_negatives, ignore_index, chunk_rows, save_dtok = inputs
    _, _, lse, dlogps, rows, dtok = output
    _save_linear(ctx, hidden, weight, labels, rows, lse, dtok, ignore_index, chunk_rows, save_dtok,
                 dlogps)
    ctx.mark_non_differentiable(lse, dlogps, rows, dtok)


def _sdpo_linear_backward(ctx, grad_loss, grad_logps, grad_lse, grad_dlogps, grad_rows, grad_dtok):
    labels, lse, dlogps = ctx.saved_tensors[2], ctx.saved_tensors[4], ctx.saved_tensors[6]
    c = _sequence_coef(dlogps, grad_loss, grad_logps)
    if c is None:
        return (None,) * 9
    coef = c.to(lse.dtype).unsqueeze(1).expand(labels.shape)  # (S, R) view
    return *_linear_grads(ctx, coef), *(None,) * 7


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused S-DPO loss (mean over groups) and the policy's sequence log-probs.

    logits (S, T, V) float32/bfloat16/float16/float64, any strides, S = G * (1 + K), sequences
    group-major (chosen first); labels (S, T) int64, ignore_index where a token does not count;
    ref_logps (S,) the frozen reference model's log-probs (no gradient). Returns (loss (), logps (S,))
    in float32 (float64 for float64 logits); both are differentiable w.r.t. logits.
    """
    loss, logps, _, _ = _ops.sdpo_fwd(logits, labels, ref_logps, float(beta), num_negatives, ignore_index)
    return loss, logps


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """log softmax(logits[s, t])[labels[s, t]] per token, 0 where ignored: (S, T) float32
    (float64 for float64 logits), differentiable w.r.t. logits."""
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
    token does not count (those rows cost nothing); ref_logps (S,) the reference model's log-probs (no
    gradient). Returns (loss (), logps (S,)) in float32 (float64 for float64 input), both
    differentiable w.r.t. hidden and weight. The logits are formed ``chunk_rows`` counted tokens
    at a time (0: as many as fit in 64 MiB, counting a float32 copy for half dtypes). When
    autograd will want the gradient of hidden but not of weight (a frozen LM head), the forward
    pass also forms each counted token's d logp / d hidden and the backward pass only scales it;
    otherwise the backward pass forms the logits again, and the weight's gradient is accumulated
    in float32 over the chunks.
    """
    return _sdpo_linear_loss(hidden, weight, labels, ref_logps, beta, num_negatives, ignore_index,
                             chunk_rows)


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """``token_logps(hidden @ weight.T, labels)`` without the logits: (S, R) float32 (float64
    for float64 input), 0 where ignored, differentiable w.r.t. hidden and weight. Arguments and
    the backward pass as in ``sdpo_linear_loss``."""
    return _linear_token_logps(hidden, weight, labels, ignore_index, chunk_rows)


# How the linear ops get the hidden states' gradient: "saved" forms d logp / d hidden of each
# counted token in the forward pass, whenever autograd records the call and hidden requires a
# gradient; "recompute" forms the logits again in the backward pass; "auto" (the public
# functions) is "saved" unless the weight requires a gradient too, which needs the recomputed
# logits anyway. The tests compare the two; the benchmark times them (docs/benchmarks.md).
GRAD_PATHS = ("auto", "saved", "recompute")


def _save_dtok(hidden: torch.Tensor, weight: torch.Tensor, grad_path: str) -> bool:
    if grad_path not in GRAD_PATHS:
        raise ValueError(f"grad_path must be one of {GRAD_PATHS}, got {grad_path!r}")
    if grad_path == "recompute" or not (torch.is_grad_enabled() and hidden.requires_grad):
        return False
    return grad_path == "saved" or not weight.requires_grad


def _sdpo_linear_loss(hidden, weight, labels, ref_logps, beta=1.0, num_negatives=1, ignore_index=-100,
                      chunk_rows=0, grad_path="auto"):
    """sdpo_linear_loss with the path of the hidden states' gradient chosen (GRAD_PATHS)."""
    _check_chunk_rows(chunk_rows)
    loss, logps, *_ = _ops.sdpo_linear_fwd(
        hidden, weight, labels, ref_logps, float(beta), num_negatives, ignore_index, chunk_rows,
        _save_dtok(hidden, weight, grad_path),
    )
    return loss, logps


def _linear_token_logps(hidden, weight, labels, ignore_index=-100, chunk_rows=0, grad_path="auto"):
    """linear_token_logps with the path of the hidden states' gradient chosen (GRAD_PATHS)."""
    _check_chunk_rows(chunk_rows)
    tok, *_ = _ops.linear_token_logps_fwd(hidden, weight, labels, ignore_index, chunk_rows,
                                          _save_dtok(hidden, weight, grad_path))
    return tok


def empty_cache() -> None:
    """Free the block of memory the CPU backward pass of ``sdpo_loss`` / ``token_logps`` keeps
    for the next logits' gradient: the block of the last large gradient freed, reused by the next
    one of about its size, so that a training step does not pay the page faults of a fresh
    logits-sized buffer (csrc/sdpo.cpp, ``BlockCache``)."""
    _ops.empty_cache()


def cpu_capability() -> str:
    """The CPU code path the next call will take: 'default', 'avx2' or 'avx512' (the best the
    CPU supports, capped by the environment variable MINISDPO_CPU_CAPABILITY)."""
    return _ops.cpu_capability()
