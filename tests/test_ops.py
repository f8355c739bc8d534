"""Tests of the fused S-DPO ops (minisdpo.ops) against the PyTorch twin (minisdpo.loss).

The reference is the specification (docs/design.md, the op contract): values and logits
gradients through both outputs (loss and logps), every logits dtype, awkward shapes (odd V, V
below and not a multiple of the vector widths, 4, 8 and 16 lanes, T = 1), ignored tokens and sequences,
extreme logits, NaN and inf (NaN exactly where the reference has NaN), strided, offset and
unaligned rows at V = 4096, 32000 and 32001, gradcheck, opcheck, torch.compile (and its fake
kernels' shape checks), the in-place backward op of the linear ops, each CPU code path and the thread
count. Every case
draws fresh random inputs. An independent oracle, F.cross_entropy over the implicit rewards,
checks the group loss of both the reference and the kernels.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_nan
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from minisdpo import loss as torch_loss
from minisdpo import ops

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_inputs(S, T, V, K=1, dtype=torch.float32, device="cpu", seed=0, scale=2.0):
    """Random logits, labels with an ignored prompt prefix, and reference log-probs near the
    policy's so that the implicit rewards z are of order one."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(S, T, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (S, T), generator=g)
    prompt = torch.randint(0, max(T // 2, 1), (S,), generator=g)
    labels[torch.arange(T) < prompt[:, None]] = -100                         # (S, T)
    ref_logps = torch_loss.sequence_logps(logits.double(), labels) + torch.randn(S, generator=g, dtype=torch.float64)
    return logits.to(device), labels.to(device), ref_logps.float().to(device)


def loss_and_grad(fn, logits, labels, ref_logps, K, beta=1.0, **kw):
    """The loss, the logps and the gradient of loss + a random mix of logps (both outputs)."""
    x = logits.detach().clone().requires_grad_()
    loss, logps = fn(x, labels, ref_logps, beta=beta, num_negatives=K, **kw)
    mix = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1), dtype=logps.dtype)
    (loss + (mix.to(logps.device) * logps).sum()).backward()
    return loss.detach(), logps.detach(), x.grad


def tolerances(dtype):
    # float32: within 1e-5 relative; bf16/fp16: the gradient is rounded to the input dtype.
    return {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}.get(dtype, (2e-2, 2e-3))


def check_against_reference(logits, labels, ref_logps, K, beta=1.0, tol=None, fn=ops.sdpo_loss):
    dtype = logits.dtype
    got = loss_and_grad(fn, logits, labels, ref_logps, K, beta)
    # Low precision: the reference in float32 on the upcast inputs; float32: in float64.
    up = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    want = loss_and_grad(torch_loss.sdpo_loss, logits.to(up), labels, ref_logps, K, beta)
    rtol, atol = tol or tolerances(dtype)
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1].double(), want[1].double(), rtol=max(rtol, 1e-5), atol=atol)
    assert got[2].dtype == dtype and got[2].shape == logits.shape
    grad_scale = want[2].abs().max().item()
    torch.testing.assert_close(got[2].double(), want[2].double(), rtol=rtol, atol=atol * grad_scale)


SHAPES = [  # (S, T, V, K)
    (2, 5, 37, 1),      # odd V
    (4, 1, 16, 3),      # T = 1, V one vector
    (8, 3, 7, 7),       # V below the vector width, K = 7
    (4, 3, 3001, 1),    # several 1024-element blocks and a tail
    (8, 4, 250, 3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("S,T,V,K", SHAPES)
def test_sdpo_loss_matches_reference(device, dtype, S, T, V, K):
    logits, labels, ref_logps = make_inputs(S, T, V, K, dtype, device, seed=S * T * V + K)
    check_against_reference(logits, labels, ref_logps, K, beta=0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_token_logps_matches_reference(device, dtype):
    logits, labels, _ = make_inputs(3, 6, 333, dtype=dtype, device=device, seed=5)
    x1 = logits.detach().clone().requires_grad_()
    up = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    x2 = logits.detach().to(up).requires_grad_()
    got, want = ops.token_logps(x1, labels), torch_loss.token_logps(x2, labels)
    w = torch.randn(got.shape, dtype=got.dtype, device=device)
    (w * got).sum().backward()
    (w.to(up) * want).sum().backward()
    rtol, atol = tolerances(dtype)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want.double(), rtol=max(rtol, 1e-5), atol=atol)
    torch.testing.assert_close(x1.grad.double(), x2.grad.double(), rtol=rtol,
                               atol=atol * x2.grad.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_sequence(device):
    logits, labels, ref_logps = make_inputs(4, 5, 40, 1, device=device, seed=2)
    labels[1] = -100
    loss, logps, grad = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 1)
    assert logps[1].item() == 0.0
    assert torch.count_nonzero(grad[1]).item() == 0
    assert torch.count_nonzero(grad[labels == -100]).item() == 0
    check_against_reference(logits, labels, ref_logps, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(device, dtype):
    logits, labels, ref_logps = make_inputs(4, 4, 100, 1, device=device, seed=3)
    logits[0, :, 7] = 1e4
    logits[1, :, 8] = -1e4
    logits[2, :, 9:30] = -float("inf")
    labels[2][labels[2].ge(9) & labels[2].lt(30)] = 3  # a -inf label logit would give -inf
    logits[3, 0, :] = -1e4
    ref_logps = torch_loss.sequence_logps(logits.double(), labels).float() + 0.5
    logits = logits.to(dtype)
    loss, logps, grad = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 1)
    assert torch.isfinite(loss) and torch.isfinite(logps).all() and torch.isfinite(grad).all()
    # The saved float32 log-sum-exp of a row with a 1e4 logit is exact to ulp(1e4)/2 = 5e-4, so
    # log-probs and softmax carry ~5e-4 absolute error there: tolerances of that size.
    check_against_reference(logits, labels, ref_logps, 1, tol=(1e-3, 1e-3) if dtype == torch.float32 else None)


# ----- NaN and inf: the outputs are NaN exactly where the reference's are, and so are the
# gradients (one exception, see nonfinite_inputs: a NaN in an ignored row).

NONFINITE = ["nan_logit", "posinf_logit", "nan_after_neginf", "neginf_logits", "nan_ignored_row",
             "nan_ref_logps", "inf_ref_logps"]


def nonfinite_inputs(case, dtype, device):
    """S = 8 sequences (K = 3: two groups), T = 4, V = 3001 (rows at every alignment, several
    1024-element blocks, a tail); the last token of each sequence always counts. The bad values
    sit in group 0 only, at a row's first element, in its middle and at its last element, so
    that the vector body, the head before the first aligned element and the tail are each hit,
    and group 1 stays finite."""
    logits, labels, ref_logps = make_inputs(8, 4, 3001, 3, torch.float64, seed=20)
    ref_logps = ref_logps.double()
    nan, inf = float("nan"), float("inf")
    if case in ("nan_logit", "posinf_logit"):
        bad = nan if case == "nan_logit" else inf
        for s, v in ((1, 0), (2, 1500), (3, 3000)):
            logits[s, -1, v] = bad
    elif case == "nan_after_neginf":      # a NaN hidden behind -inf must not vanish from the max
        logits[1, -1] = -inf
        logits[1, -1, 2000] = nan
    elif case == "neginf_logits":         # -inf as today: finite unless the label's logit or the row
        labels[1, -1] = 7
        logits[1, -1, 100:2900] = -inf    # a finite label: finite
        logits[2, -1, 7] = -inf
        labels[2, -1] = 7                  # the label's logit is -inf: log-prob -inf
        logits[3, -1] = -inf               # a row of -inf only: NaN, as log_softmax gives
    elif case == "nan_ignored_row":       # never read: everything stays finite
        labels[1, 0] = -100
        logits[1, 0, 10] = nan
    elif case == "nan_ref_logps":
        ref_logps[1] = nan
    elif case == "inf_ref_logps":         # z = +inf in group 0: loss +inf
        ref_logps[2] = -inf
    return logits.to(dtype).to(device), labels.to(device), ref_logps.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", NONFINITE)
def test_nan_and_inf_match_reference(device, dtype, case):
    logits, labels, ref_logps = nonfinite_inputs(case, dtype, device)
    up = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    got = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3)
    want = loss_and_grad(torch_loss.sdpo_loss, logits.to(up), labels, ref_logps, 3)
    rtol, atol = tolerances(dtype)
    if case not in ("nan_ref_logps", "inf_ref_logps"):
        assert not torch.isfinite(got[0]) or case in ("neginf_logits", "nan_ignored_row")
    assert_close_nan(got[0], want[0], rtol, atol, "loss")
    assert_close_nan(got[1], want[1], max(rtol, 1e-5), atol, "logps")
    tok = ops.token_logps(logits, labels)
    assert_close_nan(tok, torch_loss.token_logps(logits.to(up), labels), max(rtol, 1e-5), atol, "token_logps")
    if case == "nan_ignored_row":
        # The reference's log_softmax runs over the ignored row too, and its backward turns the
        # row's NaN into a NaN gradient (0 * NaN); the kernels never read the row: zeros.
        assert torch.isfinite(got[2]).all() and not torch.isfinite(want[2]).all()
        assert torch.count_nonzero(got[2][labels == -100]).item() == 0
        return
    scale = want[2][want[2].isfinite()].abs().max().item()
    assert_close_nan(got[2], want[2], rtol, atol * scale, "grad")
    if case in ("nan_logit", "posinf_logit", "nan_ref_logps"):  # group 1 untouched
        assert torch.isfinite(got[1][4:]).all() and torch.isfinite(got[2][4:]).all()


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("case", ["nan_logit", "posinf_logit", "nan_after_neginf"])
def test_nan_and_inf_every_cpu_path(monkeypatch, capability, case):
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", capability)
    if ops.cpu_capability() != capability:
        pytest.skip(f"this CPU does not support {capability}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits, labels, ref_logps = nonfinite_inputs(case, dtype, "cpu")
        got = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3)
        want = loss_and_grad(torch_loss.sdpo_loss, logits.float(), labels, ref_logps, 3)
        for a, b, what in zip(got, want, ("loss", "logps", "grad")):
            assert torch.equal(a.isnan(), b.isnan()), f"{dtype} {what}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["transposed", "sliced", "vocab_strided"])
def test_non_contiguous_logits(device, view):
    S, T, V, K = 4, 6, 99, 1
    g = torch.Generator().manual_seed(4)
    if view == "transposed":      # (T, S, V) storage seen as (S, T, V)
        logits = torch.randn(T, S, V, generator=g).to(device).transpose(0, 1)
    elif view == "sliced":        # rows of a wider vocabulary, every other token
        logits = torch.randn(S, 2 * T, V + 5, generator=g).to(device)[:, ::2, 2 : V + 2]
    else:                         # the vocabulary is not the fastest axis
        logits = torch.randn(S, V, T, generator=g).to(device).transpose(1, 2)
    assert not logits.is_contiguous() and logits.shape == (S, T, V)
    labels = torch.randint(0, V, (S, T), generator=g).to(device)
    ref_logps = torch_loss.sequence_logps(logits.double(), labels).float() + 1.0
    check_against_reference(logits, labels, ref_logps, K)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [4096, 32000, 32001])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset", "shifted"])
def test_large_vocab_layouts(device, dtype, V, layout):
    """The vector paths at real vocabulary sizes. V = 4096 and 32000 rows are 16-byte aligned
    (and 64-byte for float32), V = 32001 rows start at every offset; "strided" takes every other
    token of a longer sequence (aligned rows stay aligned), "offset" drops each row's first
    element (every row unaligned, the row stride V + 1), "shifted" is contiguous one element past
    the start of its storage (the gradient buffer must not be aligned differently)."""
    S, T, K = 2, 3, 1
    g = torch.Generator().manual_seed(V)
    if layout == "strided":
        logits = torch.randn(S, 2 * T, V, generator=g)[:, ::2]
    elif layout == "offset":
        logits = torch.randn(S, T, V + 1, generator=g)[:, :, 1:]
    elif layout == "shifted":
        logits = torch.randn(S * T * V + 1, generator=g)[1:].view(S, T, V)
    else:
        logits = torch.randn(S, T, V, generator=g)
    logits = (2 * logits).to(dtype).to(device)
    if layout == "shifted":  # .to(device) copies: shift on the device itself
        logits = torch.cat([logits.new_zeros(1), logits.flatten()])[1:].view(S, T, V)
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, 0] = -100
    labels = labels.to(device)
    ref_logps = (torch_loss.sequence_logps(logits.double(), labels) + 0.5).float()
    check_against_reference(logits, labels, ref_logps, K)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    logits, labels, ref_logps = make_inputs(4, 3, 11, 1, torch.float64, device, seed=6, scale=1.0)
    x = logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: ops.sdpo_loss(t, labels, ref_logps, beta=0.5, num_negatives=1), (x,)
    )
    logits, labels, ref_logps = make_inputs(8, 2, 9, 3, torch.float64, device, seed=7, scale=1.0)
    x = logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: ops.sdpo_loss(t, labels, ref_logps, beta=2.0, num_negatives=3), (x,)
    )
    assert torch.autograd.gradcheck(lambda t: ops.token_logps(t, labels), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, labels, ref_logps = make_inputs(4, 3, 21, 1, device=device, seed=8)
    x = logits.detach().requires_grad_()
    torch.library.opcheck(torch.ops.minisdpo.token_logps_fwd, (x, labels, -100))
    torch.library.opcheck(torch.ops.minisdpo.sdpo_fwd, (x, labels, ref_logps, 0.5, 1, -100))
    _, _, lse, _ = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 0.5, 1, -100)
    coef = torch.randn(4, 1, device=device).expand(4, 3)
    torch.library.opcheck(torch.ops.minisdpo.logits_bwd, (coef, logits, labels, lse, -100))
    torch.library.opcheck(torch.ops.minisdpo.logits_bwd_, (logits.clone(), coef, labels, lse, -100))
    logps = torch.randn(4, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.minisdpo.sdpo_group_loss, (logps, ref_logps, 0.5, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_one_negative_is_dpo(device):
    logits, labels, ref_logps = make_inputs(6, 4, 50, 1, device=device, seed=9)
    loss, logps = ops.sdpo_loss(logits, labels, ref_logps, beta=0.3, num_negatives=1)
    dpo = torch_loss.dpo_loss(logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], beta=0.3)
    torch.testing.assert_close(loss, dpo, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 3, 7])
def test_group_loss_is_cross_entropy_over_rewards(device, K):
    """An oracle independent of both implementations: the S-DPO loss of a group is the
    cross-entropy of the implicit rewards beta * (logp - ref_logp) with the chosen response as
    the class (docs/method.md, section 2)."""
    G, beta = 5, 0.7
    g = torch.Generator().manual_seed(K)
    logps = (-30 + 5 * torch.randn(G * (1 + K), generator=g, dtype=torch.float64)).to(device)
    ref_logps = logps.detach() + torch.randn(G * (1 + K), generator=g, dtype=torch.float64).to(device)
    chosen = torch.zeros(G, dtype=torch.long, device=device)
    p = logps.clone().requires_grad_()
    oracle = F.cross_entropy((beta * (p - ref_logps)).view(G, 1 + K), chosen, reduction="none")
    oracle.mean().backward()
    torch.testing.assert_close(torch_loss.preference_loss(logps, ref_logps, beta, K), oracle.detach())
    loss, dlogps = torch.ops.minisdpo.sdpo_group_loss(logps, ref_logps, beta, K)
    torch.testing.assert_close(loss, oracle.detach().mean())
    torch.testing.assert_close(dlogps, p.grad)
    # And the whole fused op: token log-probs by F.cross_entropy too.
    logits, labels, ref_tok = make_inputs(2 * (1 + K), 5, 61, K, torch.float64, device, seed=K)
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    seq = -nll.view(labels.shape).sum(1)
    rewards = beta * (seq - ref_tok.double())
    want = F.cross_entropy(rewards.view(-1, 1 + K), torch.zeros(2, dtype=torch.long, device=device))
    torch.testing.assert_close(ops.sdpo_loss(logits, labels, ref_tok, beta, K)[0], want)


def _bad_inputs(device):
    """(description, call, exception, words the message must contain)."""
    logits, labels, ref_logps = make_inputs(4, 3, 10, 1, device=device, seed=10)
    out_of_range = labels.clone()
    out_of_range[2, 1] = 10
    negative = labels.clone()
    negative[0, 2] = -5
    if device == "cuda":
        # The CUDA kernels check labels with a device-side assert (no host synchronisation): a
        # RuntimeError at the next synchronisation, after which the process's CUDA context is
        # unusable (scripts/gpu_check.sh runs cases 0 and 1 each in its own process).
        def sync(f):
            return lambda: (f(), torch.cuda.synchronize())
        label_cases = [
            ("label >= V", sync(lambda: ops.sdpo_loss(logits, out_of_range, ref_logps)), RuntimeError, "assert"),
            ("label < 0", sync(lambda: ops.token_logps(logits, negative)), RuntimeError, "assert"),
        ]
    else:
        label_cases = [
            ("label >= V", lambda: ops.sdpo_loss(logits, out_of_range, ref_logps), ValueError, "labels[2, 1]"),
            ("label < 0", lambda: ops.token_logps(logits, negative), ValueError, "labels[0, 2]"),
        ]
    return label_cases + [
        ("labels shape", lambda: ops.sdpo_loss(logits, labels[:, :2], ref_logps), ValueError, "labels"),
        ("labels dtype", lambda: ops.sdpo_loss(logits, labels.int(), ref_logps), TypeError, "labels"),
        ("ref_logps shape", lambda: ops.sdpo_loss(logits, labels, ref_logps[:3]), ValueError, "ref_logps"),
        ("ref_logps dtype", lambda: ops.sdpo_loss(logits, labels, ref_logps.long()), TypeError, "ref_logps"),
        ("logits 2-D", lambda: ops.token_logps(logits[0], labels), ValueError, "logits"),
        ("integer logits", lambda: ops.sdpo_loss(logits.long(), labels, ref_logps), TypeError, "logits"),
        ("S vs 1+K", lambda: ops.sdpo_loss(logits, labels, ref_logps, num_negatives=2), ValueError, "num_negatives"),
        ("K < 1", lambda: ops.sdpo_loss(logits[:3], labels[:3], ref_logps[:3], num_negatives=0), ValueError, "num_negatives"),
        ("beta nan", lambda: ops.sdpo_loss(logits, labels, ref_logps, beta=float("nan")), ValueError, "beta"),
        ("beta inf", lambda: ops.sdpo_loss(logits, labels, ref_logps, beta=float("inf")), ValueError, "beta"),
    ]


def _bad_input(name):
    """The case of _bad_inputs (on the CPU) called name."""
    return next(case for case in _bad_inputs("cpu") if case[0] == name)


# Shape errors, which the fake kernels (shape functions) raise too, while torch.compile traces;
# the other errors only the kernels raise, when the graph runs.
SHAPE_ERRORS = ["labels shape", "ref_logps shape", "logits 2-D", "S vs 1+K", "K < 1"]
KERNEL_ERRORS = ["labels dtype", "ref_logps dtype", "integer logits", "beta nan", "beta inf"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(12))
def test_bad_input_raises(device, case):
    name, call, exc, words = _bad_inputs(device)[case]
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_bad_input_of_backward_op():
    logits, labels, ref_logps = make_inputs(4, 3, 10, 1, seed=11)
    _, _, lse, _ = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, 1, -100)
    with pytest.raises(ValueError, match="coef"):
        torch.ops.minisdpo.logits_bwd(torch.ones(4, 2), logits, labels, lse, -100)
    with pytest.raises(TypeError, match="lse"):
        torch.ops.minisdpo.logits_bwd(torch.ones(4, 3), logits, labels, lse.double(), -100)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    logits, labels, ref_logps = make_inputs(4, 5, 64, 1, device=device, seed=12)

    def step(x):
        loss, logps = ops.sdpo_loss(x, labels, ref_logps, beta=0.5, num_negatives=1)
        return loss + 0.01 * logps.mean()

    x1 = logits.detach().clone().requires_grad_()
    x2 = logits.detach().clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True)
    out1, out2 = compiled(x1), step(x2)
    out1.backward()
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("name", SHAPE_ERRORS)
def test_fake_kernels_check_the_shapes(name):
    """Under fake tensors (what torch.compile traces with) the shape errors of _bad_inputs are
    raised by the fake kernels, with the kernels' exception type, naming the argument."""
    _, call, exc, words = _bad_input(name)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(exc, match=words):
            call()


@pytest.mark.parametrize("name", KERNEL_ERRORS)
def test_torch_compile_leaves_the_other_checks_to_the_kernels(name):
    """A bad dtype or beta passes the fake kernels, which are shape functions: the call is traced
    into a graph, and the kernel rejects it when the graph runs, with its own exception and
    message (csrc/sdpo.h, the one place of the argument checks)."""
    _, call, exc, words = _bad_input(name)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with pytest.raises(exc, match=words):
        torch.compile(call, backend=backend, fullgraph=True)()
    assert len(graphs) == 1


IMPORT_SPY = """
import torch
from torch.utils._python_dispatch import TorchDispatchMode

calls = []


class Spy(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        calls.append(str(func))
        return func(*args, **(kwargs or {}))


with Spy():
    import minisdpo.ops
print(calls)
"""


def test_import_runs_no_op():
    """Importing minisdpo.ops registers the ops and runs none of them (nor any other tensor op),
    in a fresh process."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", IMPORT_SPY], cwd=root, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernels_and_fake_kernels_agree_on_the_output_dtypes(dtype):
    """The fake kernels take their dtypes from minisdpo.loss.accumulation_dtype; the kernels
    from ATen's opmath rule (csrc/sdpo_math.h): the same dtypes, float32 for half inputs."""
    logits, labels, ref_logps = make_inputs(2, 3, 10, dtype=dtype, seed=21)
    want = torch_loss.accumulation_dtype(dtype)
    assert want == (torch.float64 if dtype == torch.float64 else torch.float32)
    real = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, 1, -100)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, 1, -100)
    assert [t.dtype for t in real] == [t.dtype for t in fake] == [want, want, want, torch.float64]


def test_fake_kernels_of_the_backward_ops():
    logits, labels, ref_logps = make_inputs(4, 3, 10, 1, seed=11)
    _, _, lse, _ = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, 1, -100)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match="coef"):
            torch.ops.minisdpo.logits_bwd(torch.ones(4, 2), logits, labels, lse, -100)
        with pytest.raises(ValueError, match="lse"):
            torch.ops.minisdpo.logits_bwd_(logits, torch.ones(4, 3), labels, lse[:, :2], -100)
        with pytest.raises(ValueError, match="num_negatives"):
            torch.ops.minisdpo.sdpo_group_loss(torch.zeros(4), ref_logps, 1.0, 2)


@pytest.mark.parametrize("bad", ["group size", "labels shape", "ref_logps shape"])
def test_torch_compile_rejects_a_bad_call_while_tracing(bad):
    """The error comes from the fake kernel while dynamo traces: no graph reaches the backend
    (before the fake kernels checked, tracing succeeded and only the compiled kernel raised)."""
    logits, labels, ref_logps = make_inputs(4, 5, 64, 1, seed=12)
    K, words = 1, "labels"
    if bad == "group size":
        K, words = 2, "num_negatives"
    elif bad == "labels shape":
        labels = labels[:, :4]
    else:
        ref_logps, words = ref_logps[:3], "ref_logps"
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x):
        return ops.sdpo_loss(x, labels, ref_logps, beta=0.5, num_negatives=K)[0]

    torch._dynamo.reset()
    # Dynamo wraps the fake kernel's ValueError, message included, in its TorchRuntimeError.
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=rf"ValueError\('minisdpo: .*{words}"):
        torch.compile(step, backend=backend, fullgraph=True)(logits.requires_grad_())
    assert graphs == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,layout", [(70, "contiguous"), (32001, "contiguous"), (32001, "offset"),
                                      (70, "vocab_strided")])
def test_logits_bwd_in_place(device, dtype, V, layout):
    """logits_bwd_, which the linear ops run on each chunk of logits (csrc/linear.cpp), writes
    into the logits exactly what logits_bwd returns: rows at every alignment ("offset": each
    row's first element dropped), and rows whose elements are not adjacent ("vocab_strided":
    computed aside, then written back)."""
    logits, labels, ref_logps = make_inputs(4, 5, V, 1, dtype, device, seed=13)
    if layout == "offset":
        logits = torch.cat([logits[:, :, :1], logits], 2)[:, :, 1:]
    elif layout == "vocab_strided":
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    _, _, lse, _ = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, 1, -100)
    coef = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(device)
    want = torch.ops.minisdpo.logits_bwd(coef, logits, labels, lse, -100)
    x = logits.clone()
    torch.ops.minisdpo.logits_bwd_(x, coef, labels, lse, -100)
    assert torch.equal(x, want)
    assert torch.count_nonzero(want[labels == -100]).item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_gradient_reuses_the_block_of_the_last_one(dtype):
    """On the CPU a logits' gradient of 32 MiB or more takes the block of the last one freed when
    it fits (csrc/sdpo.cpp, BlockCache): the same memory, holding the old gradient, written over
    in full, ignored rows and sequences included; a small one takes other memory."""
    V = 8 * 2**20 // dtype.itemsize   # 8 MiB rows, 4 x 1 x V = 32 MiB of logits
    ops.empty_cache()
    first, labels, ref = make_inputs(4, 1, V, 1, dtype, seed=14)
    labels[:, 0] = torch.randint(0, V, (4,))
    grad = loss_and_grad(ops.sdpo_loss, first, labels, ref, 1)[2]
    kept = grad.data_ptr()
    assert torch.count_nonzero(grad).item() > 0
    del grad                                           # back into the cache
    logits, labels, ref = make_inputs(4, 1, V, 1, dtype, seed=15)
    labels[1, 0] = -100                                # an ignored row (and sequence): zeros
    got = loss_and_grad(ops.sdpo_loss, logits, labels, ref, 1)[2]
    assert got.data_ptr() == kept
    want = loss_and_grad(torch_loss.sdpo_loss, logits.float(), labels, ref, 1)[2]
    torch.testing.assert_close(got.float(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert torch.count_nonzero(got[1]).item() == 0
    del got
    half = make_inputs(2, 1, V, 1, dtype, seed=16)     # 16 MiB: below the cache's size
    assert loss_and_grad(ops.sdpo_loss, *half, 1)[2].data_ptr() != kept
    again = loss_and_grad(ops.sdpo_loss, logits, labels, ref, 1)[2]
    assert again.data_ptr() == kept
    del again
    ops.empty_cache()


@pytest.mark.parametrize("device", DEVICES)
def test_logits_bwd_in_place_rejects_overlapping_logits(device):
    """An expanded view holds one memory location for several logits, which cannot take
    several gradient values: logits_bwd_ raises instead of racing; the ordinary backward of
    the same view is right."""
    logits, labels, ref_logps = make_inputs(4, 5, 70, 1, device=device, seed=16)
    base = logits[:, :1].detach().clone().requires_grad_()        # (S, 1, V)
    coef = torch.ones(4, 5, device=device)
    expanded = base.detach().expand(4, 5, 70)
    _, _, lse, _ = torch.ops.minisdpo.sdpo_fwd(expanded, labels, ref_logps, 1.0, 1, -100)
    with pytest.raises(RuntimeError, match="more than one element"):
        torch.ops.minisdpo.logits_bwd_(base.detach().clone().expand(4, 5, 70), coef, labels, lse, -100)
    ops.sdpo_loss(base.expand(4, 5, 70), labels, ref_logps)[0].backward()
    want = base.detach().double().requires_grad_()
    torch_loss.sdpo_loss(want.expand(4, 5, 70), labels, ref_logps)[0].backward()
    torch.testing.assert_close(base.grad.double(), want.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# V below one vector of each copy (4, 8, 16 lanes) and between them, a row of 4 blocks of
# kBlock = 1024 and its last one partial; rows 64-byte aligned (1200) and at every offset.
@pytest.mark.parametrize("V", [3, 7, 12, 17, 1200, 1203, 4099])
def test_cpu_capabilities_agree(monkeypatch, capability, dtype, V):
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", capability)
    if ops.cpu_capability() != capability:
        pytest.skip(f"this CPU does not support {capability}")
    logits, labels, ref_logps = make_inputs(8, 3, V, 3, dtype, seed=14)
    got = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3)
    check_against_reference(logits, labels, ref_logps, 3)
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", "default")
    base = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3)
    rtol, atol = (1e-6, 1e-7) if dtype == torch.float32 else (1e-2, 1e-3)
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_capability_request_is_capped_to_the_cpu(monkeypatch):
    """A request above what the CPU runs reports the copy that runs instead, the best below it;
    off x86-64 (aarch64) the portable copy is the only one, whatever the request."""
    order = ["default", "avx2", "avx512"]
    monkeypatch.delenv("MINISDPO_CPU_CAPABILITY", raising=False)
    best = ops.cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert best == "default"
    for want in order:
        monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", want)
        assert ops.cpu_capability() == order[min(order.index(want), order.index(best))]


def test_bad_capability_env(monkeypatch):
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", "sse9")
    with pytest.raises(ValueError, match="MINISDPO_CPU_CAPABILITY"):
        ops.cpu_capability()


def test_independent_of_thread_count():
    logits, labels, ref_logps = make_inputs(8, 8, 2000, 3, seed=15)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
