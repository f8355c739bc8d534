"""Tests of the fused S-DPO ops (minisdpo.ops) against the PyTorch reference (minisdpo.loss).

The reference is the specification (DESIGN.md section 3): values and logits gradients through
both outputs (loss and logps), every logits dtype, awkward shapes (odd V, V below and not a
multiple of the 16-lane vector width, T = 1), ignored tokens and sequences, extreme logits,
strided views, gradcheck, opcheck, torch.compile, the in-place backward, each CPU code path and
the thread count. Every case draws fresh random inputs.
"""
import pytest
import torch

from minisdpo import loss as ref
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
    ref_logps = ref.sequence_logps(logits.double(), labels) + torch.randn(S, generator=g, dtype=torch.float64)
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


def check_against_reference(logits, labels, ref_logps, K, beta=1.0, tol=None):
    dtype = logits.dtype
    got = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, K, beta)
    # Low precision: the reference in float32 on the upcast inputs; float32: in float64.
    up = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    want = loss_and_grad(ref.sdpo_loss, logits.to(up), labels, ref_logps, K, beta)
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
    got, want = ops.token_logps(x1, labels), ref.token_logps(x2, labels)
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
    ref_logps = ref.sequence_logps(logits.double(), labels).float() + 0.5
    logits = logits.to(dtype)
    loss, logps, grad = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 1)
    assert torch.isfinite(loss) and torch.isfinite(logps).all() and torch.isfinite(grad).all()
    # The saved float32 log-sum-exp of a row with a 1e4 logit is exact to ulp(1e4)/2 = 5e-4, so
    # log-probs and softmax carry ~5e-4 absolute error there: tolerances of that size.
    check_against_reference(logits, labels, ref_logps, 1, tol=(1e-3, 1e-3) if dtype == torch.float32 else None)


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
    ref_logps = ref.sequence_logps(logits.double(), labels).float() + 1.0
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
    _, _, lse = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 0.5, 1, -100)
    coef = torch.randn(4, 1, device=device).expand(4, 3)
    torch.library.opcheck(torch.ops.minisdpo.logits_bwd, (coef, logits, labels, lse, -100))
    torch.library.opcheck(torch.ops.minisdpo.logits_bwd_, (logits.clone(), coef, labels, lse, -100))


@pytest.mark.parametrize("device", DEVICES)
def test_one_negative_is_dpo(device):
    logits, labels, ref_logps = make_inputs(6, 4, 50, 1, device=device, seed=9)
    loss, logps = ops.sdpo_loss(logits, labels, ref_logps, beta=0.3, num_negatives=1)
    dpo = ref.dpo_loss(logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], beta=0.3)
    torch.testing.assert_close(loss, dpo, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(12))
def test_bad_input_raises(device, case):
    name, call, exc, words = _bad_inputs(device)[case]
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_bad_input_of_backward_op():
    logits, labels, ref_logps = make_inputs(4, 3, 10, 1, seed=11)
    _, _, lse = torch.ops.minisdpo.sdpo_fwd(logits, labels, ref_logps, 1.0, 1, -100)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(device, dtype):
    logits, labels, ref_logps = make_inputs(4, 5, 70, 1, dtype, device, seed=13)
    _, _, want = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 1)
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1  # a non-leaf: its storage is free to take the gradient
    loss, logps = ops.sdpo_loss(x, labels, ref_logps, num_negatives=1, inplace_backward=True)
    mix = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1), dtype=logps.dtype)
    (loss + (mix.to(device) * logps).sum()).backward()
    torch.testing.assert_close(leaf.grad, want, rtol=0, atol=0)
    assert torch.equal(x.detach(), want)  # written into the logits' own storage

    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1
    ops.token_logps(x, labels, inplace_backward=True).sum().backward()
    y = logits.detach().clone().requires_grad_()
    ops.token_logps(y, labels).sum().backward()
    torch.testing.assert_close(leaf.grad, y.grad, rtol=0, atol=0)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_capabilities_agree(monkeypatch, capability, dtype):
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", capability)
    if ops.cpu_capability() != capability:
        pytest.skip(f"this CPU does not support {capability}")
    logits, labels, ref_logps = make_inputs(8, 3, 1200, 3, dtype, seed=14)
    got = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3)
    check_against_reference(logits, labels, ref_logps, 3)
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", "default")
    base = loss_and_grad(ops.sdpo_loss, logits, labels, ref_logps, 3)
    rtol, atol = (1e-6, 1e-7) if dtype == torch.float32 else (1e-2, 1e-3)
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


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
