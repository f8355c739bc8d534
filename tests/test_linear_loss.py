"""Tests of the fused linear S-DPO ops (minisdpo.ops.sdpo_linear_loss / linear_token_logps,
csrc/linear.cpp) against the PyTorch twin on materialised logits,
``minisdpo.loss.sdpo_loss(hidden @ weight.T, ...)``.

Values and gradients of hidden and weight through both outputs (loss and logps, and each alone),
float32 within 1e-5 and bfloat16 within its precision, on every device, by both paths of the
hidden states' gradient (ops.GRAD_PATHS: "saved", d logp / d hidden formed in the forward pass,
and "recompute", the logits formed again in the backward pass), with the LM head frozen and
trainable, the two paths also against each other; odd V, one-token responses, all-ignored
sequences and groups, K = 1, 3, 7; several chunks (chunk_rows forced small) and the automatic
chunk; NaN and inf (NaN exactly where the PyTorch twin has NaN); only the requested gradients, and
the path "auto" takes; no tensor as large as the logits, inside the ops included; one host
synchronisation per forward and backward pass; gradcheck in float64, opcheck, torch.compile of
a caller (and its fake kernels' shape checks), and bad input named in the error.
"""
import pytest
import torch
from conftest import assert_close_nan
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from minisdpo import loss as torch_loss
from minisdpo import ops


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def make_inputs(S, R, D, V, K=1, dtype=torch.float32, seed=0, device="cpu"):
    """Hidden states and a weight whose logits are of order 2, labels with ignored padding at the
    end of some sequences (position 0 always counts), reference log-probs near the policy's
    (rewards z of order one)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, R, D, generator=g, dtype=torch.float64)
    weight = 2 * torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    labels = torch.randint(0, V, (S, R), generator=g)
    length = torch.randint(1, R + 1, (S,), generator=g)
    labels[torch.arange(R) >= length[:, None]] = -100                       # (S, R)
    ref_logps = torch_loss.sequence_logps(hidden @ weight.T, labels) + torch.randn(S, generator=g, dtype=torch.float64)
    return (hidden.to(dtype).to(device), weight.to(dtype).to(device), labels.to(device),
            ref_logps.float().to(device))


# The paths of the hidden states' gradient (ops.GRAD_PATHS), each with the LM head frozen (the
# LoRA case) and trainable: "saved" with a trainable head takes the hidden states' gradient from
# the saved d logp / d hidden and the weight's from recomputed logits. "auto" is "saved" with a
# frozen head and "recompute" with a trainable one (test_auto_path).
PATHS = [("saved", False), ("recompute", False), ("saved", True), ("recompute", True)]
PATH_IDS = [f"{p}-{'weight' if w else 'frozen'}" for p, w in PATHS]


def run(fn, hidden, weight, labels, ref_logps, K, beta=1.0, weight_grad=True, objective="both", **kw):
    """loss, logps and the gradients of hidden and weight (None with a frozen weight) of
    ``objective``: loss + a random mix of logps ("both"), the loss alone ("loss") or the mix of
    logps alone ("logps": the loss is not differentiated)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight_grad)
    loss, logps = fn(h, w, labels, ref_logps, beta, K, **kw)
    mix = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mixed = (mix.to(logps.dtype).to(logps.device) * logps).sum()
    {"both": loss + mixed, "loss": loss, "logps": mixed}[objective].backward()
    return loss.detach(), logps.detach(), h.grad, w.grad


def linear(h, w, labels, ref_logps, beta, K, grad_path="auto", **kw):
    return ops._sdpo_linear_loss(h, w, labels, ref_logps, beta=beta, num_negatives=K, grad_path=grad_path, **kw)


def materialised(h, w, labels, ref_logps, beta, K):
    return torch_loss.sdpo_loss(h @ w.T, labels, ref_logps, beta=beta, num_negatives=K)


def assert_all_close(got, want, rtol, atol):
    """loss, logps and the gradients close; a gradient that one side lacks (a frozen weight) the
    other lacks too."""
    for name, a, b in zip(("loss", "logps", "grad hidden", "grad weight"), got, want):
        assert (a is None) == (b is None), f"{name}: {a is None} vs {b is None}"
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("S, R, D, V, K, chunk_rows", [
    (2, 5, 16, 37, 1, 3),        # several chunks, a partial last one
    (4, 1, 8, 101, 3, 0),        # one-token responses, automatic chunk
    (8, 7, 24, 257, 7, 5),
    (6, 4, 32, 2049, 1, 1),      # one row per chunk
    (12, 9, 16, 513, 3, 64),     # one chunk covers everything
    (2, 4, 8, 32001, 1, 3),      # a real vocabulary, rows at every alignment
])
def test_sdpo_linear_matches_the_pytorch_twin_float32(device, grad_path, weight_grad, S, R, D, V, K, chunk_rows):
    hidden, weight, labels, ref_logps = make_inputs(S, R, D, V, K, seed=S * V, device=device)
    got = run(linear, hidden, weight, labels, ref_logps, K, beta=0.7, weight_grad=weight_grad,
              grad_path=grad_path, chunk_rows=chunk_rows)
    # The PyTorch twin in float64 on the same (float32-valued) inputs: the truth to 1e-5.
    want = run(materialised, hidden.double(), weight.double(), labels, ref_logps, K, beta=0.7,
               weight_grad=weight_grad)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.float32 and (got[3] is None or got[3].dtype == torch.float32)
    # grad hidden = g @ W sums V float32 products: its rounding grows with V.
    tol = 1e-5 if V < 10000 else 1e-4
    assert_all_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("K", [1, 3, 7])
def test_sdpo_linear_matches_the_pytorch_twin_bfloat16(device, grad_path, weight_grad, K):
    hidden, weight, labels, ref_logps = make_inputs(2 * (1 + K), 6, 32, 301, K, dtype=torch.bfloat16, seed=K,
                                                    device=device)
    paths = dict(weight_grad=weight_grad)
    got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, chunk_rows=7, **paths)
    want = run(materialised, hidden, weight, labels, ref_logps, K, **paths)          # the same, in bf16
    truth = run(materialised, hidden.double(), weight.double(), labels, ref_logps, K, **paths)
    assert got[2].dtype == torch.bfloat16 and (got[3] is None or got[3].dtype == torch.bfloat16)
    # Both round the logits to bf16; ours accumulates the weight gradient in float32 over the
    # chunks, so it is at least as close to the float64 truth as the plain bf16 autograd, and
    # so is the hidden states' gradient of either path.
    assert_all_close(got, want, rtol=3e-2, atol=3e-2)
    assert_all_close(got, truth, rtol=3e-2, atol=3e-2)
    for i in (2, 3) if weight_grad else (2,):
        err = lambda g: (g[i].double() - truth[i]).abs().max()
        assert err(got) <= 1.5 * err(want) + 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_linear_token_logps_matches_reference(device, grad_path, weight_grad, dtype, tol):
    hidden, weight, labels, _ = make_inputs(5, 6, 16, 211, dtype=dtype, seed=3, device=device)
    mix = torch.randn(5, 6, dtype=torch.float64, device=device)
    # The incoming gradient of an ignored token is never read: NaN there changes nothing.
    nan_ignored = mix.masked_fill(labels == -100, float("nan"))
    grads = []
    for fn, up, grad_tok in (
        (lambda h, w: ops._linear_token_logps(h, w, labels, chunk_rows=4, grad_path=grad_path), dtype, nan_ignored),
        (lambda h, w: torch_loss.token_logps(h @ w.T, labels), torch.float64, mix),
    ):
        h = hidden.detach().to(up).requires_grad_()
        w = weight.detach().to(up).requires_grad_(weight_grad)
        tok = fn(h, w)
        tok.backward(grad_tok.to(tok.dtype))
        grads.append((tok.detach(), h.grad, w.grad))
    assert (grads[0][2] is None) == (not weight_grad)
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)
    assert grads[0][0].dtype == torch.float32
    assert (grads[0][0][labels == -100] == 0).all()
    assert (grads[0][1][labels == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_ignored_sequences_and_rows(device, grad_path, weight_grad):
    K = 3
    hidden, weight, labels, ref_logps = make_inputs(12, 5, 16, 97, K, seed=5, device=device)
    paths = dict(weight_grad=weight_grad)
    labels[2] = -100                                        # a whole sequence ignored
    labels[8:12] = -100                                     # a whole group (the third) ignored
    got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, chunk_rows=2, **paths)
    want = run(materialised, hidden.double(), weight.double(), labels, ref_logps, K, **paths)
    assert_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[1][2] == 0 and (got[1][8:] == 0).all()
    assert (got[2][labels == -100] == 0).all()              # ignored rows get no gradient
    # Everything ignored: logps 0, zero gradients, and no chunk at all.
    labels[:] = -100
    got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, **paths)
    want = run(materialised, hidden.double(), weight.double(), labels, ref_logps, K, **paths)
    assert_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[1] == 0).all() and (got[2] == 0).all() and (got[3] is None or (got[3] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path", ["saved", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["nan_hidden", "posinf_hidden", "nan_weight", "nan_ref_logps",
                                  "nan_ignored_hidden"])
def test_nan_and_inf_match_reference(device, grad_path, dtype, case):
    """As tests/test_ops.py's test of the same name, through the LM head: a NaN or +inf in a
    counted token's hidden state makes its logits row NaN or +inf (so its lse NaN), a NaN in
    the weight reaches every counted row, a NaN ref_logps its group; group 1 stays finite
    except through the weight. A NaN in an ignored token's hidden state is never read. The
    weight is trainable ("saved": the hidden states' gradient from the saved d logp / d hidden,
    the weight's from recomputed logits)."""
    K = 3
    hidden, weight, labels, ref_logps = make_inputs(8, 4, 16, 257, K, dtype=torch.float64, seed=21)
    ref_logps = ref_logps.double()
    if case == "nan_hidden":
        hidden[1, 0, 3] = float("nan")
    elif case == "posinf_hidden":
        hidden[2, 0, 5] = float("inf")
    elif case == "nan_weight":
        weight[7, 2] = float("nan")
    elif case == "nan_ref_logps":
        ref_logps[3] = float("nan")
    else:
        labels[1, -1] = -100
        hidden[1, -1, 4] = float("nan")
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    labels, ref_logps = labels.to(device), ref_logps.to(device)
    up = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, chunk_rows=5)
    want = run(materialised, hidden.to(up), weight.to(up), labels, ref_logps, K)
    # The hidden states' gradient alone, the weight frozen: the same as with it trainable.
    frozen = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, chunk_rows=5,
                 weight_grad=False)
    assert_close_nan(frozen[2], got[2], 0, 0, "grad hidden, frozen weight")
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    assert_close_nan(got[0], want[0], tol, tol, "loss")
    assert_close_nan(got[1], want[1], tol, tol, "logps")
    tok = ops.linear_token_logps(hidden, weight, labels, chunk_rows=5)
    assert_close_nan(tok, torch_loss.token_logps(hidden.to(up) @ weight.to(up).T, labels), tol, tol, "token_logps")
    if case == "nan_ignored_hidden":
        # The reference forms and differentiates the ignored row's logits (0 * NaN = NaN in its
        # backward); the fused op never forms them.
        assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()
        assert not torch.isfinite(want[3]).all()
        return
    # Hidden gradients of counted rows only: the PyTorch twin differentiates the ignored rows'
    # logits too, which holds NaN where the weight does (the fused op gives them zeros).
    counted = labels != -100
    assert (got[2][~counted] == 0).all()
    for g, w, what in ((got[2][counted], want[2][counted], "grad hidden"), (got[3], want[3], "grad weight")):
        finite = w[w.isfinite()]
        scale = finite.abs().max().item() if finite.numel() else 1.0
        assert_close_nan(g, w, tol, tol * scale, what)
    if case != "nan_weight":
        assert torch.isfinite(got[1][4:]).all() and torch.isfinite(got[2][4:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_chunking_does_not_change_the_result(device, grad_path, weight_grad):
    hidden, weight, labels, ref_logps = make_inputs(8, 6, 16, 129, 3, seed=7, device=device)
    results = [run(linear, hidden, weight, labels, ref_logps, 3, grad_path=grad_path, chunk_rows=c,
                   weight_grad=weight_grad) for c in (1, 4, 0)]
    for other in results[1:]:
        assert_all_close(other, results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("objective", ["both", "loss", "logps"])
def test_saved_path_equals_the_recompute_path(device, dtype, tol, objective):
    """The fast path (d logp / d hidden formed in the forward pass, no logits in the backward
    pass) against its slow twin (the logits recomputed), the LM head frozen: the same loss and
    logps bit for bit, the same gradient of hidden up to rounding, whichever outputs are
    differentiated; and both against the PyTorch twin."""
    K = 3
    hidden, weight, labels, ref_logps = make_inputs(8, 6, 24, 301, K, dtype=dtype, seed=31, device=device)
    labels[5] = -100
    paths = dict(weight_grad=False, objective=objective)
    saved = run(linear, hidden, weight, labels, ref_logps, K, grad_path="saved", chunk_rows=5, **paths)
    slow = run(linear, hidden, weight, labels, ref_logps, K, grad_path="recompute", chunk_rows=5, **paths)
    assert torch.equal(saved[0], slow[0]) and torch.equal(saved[1], slow[1])
    assert_all_close(saved, slow, rtol=tol, atol=tol)
    up = torch.float64 if dtype == torch.float32 else dtype
    want = run(materialised, hidden.to(up), weight.to(up), labels, ref_logps, K, **paths)
    assert_all_close(saved, want, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    assert (saved[2][labels == -100] == 0).all()


def under_autocast(fn):
    def call(*args, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args, **kw)
    return call


@pytest.mark.parametrize("backward", ["outside", "inside"])
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_under_cpu_autocast(grad_path, weight_grad, backward):
    """float32 inputs under CPU bfloat16 autocast (python -m minisdpo.bench --step --dtype
    autocast), the backward pass outside the autocast region or inside it: the chunks' matrix
    products run in bfloat16, as the twin's h @ W^T does; the gradients keep the inputs' dtype
    and are close to the twin's under the same autocast."""
    K = 3
    hidden, weight, labels, ref_logps = make_inputs(8, 5, 32, 301, K, seed=39)
    kw = dict(weight_grad=weight_grad)
    if backward == "outside":
        got = run(under_autocast(linear), hidden, weight, labels, ref_logps, K, grad_path=grad_path, chunk_rows=7, **kw)
        want = run(under_autocast(materialised), hidden, weight, labels, ref_logps, K, **kw)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, chunk_rows=7, **kw)
            want = run(materialised, hidden, weight, labels, ref_logps, K, **kw)
    assert got[2].dtype == torch.float32 and (got[3] is None or got[3].dtype == torch.float32)
    assert_all_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_gradient_of_the_returned_logps(grad_path, weight_grad):
    """logps, the second output, has a gradient of its own: alone (the loss not differentiated,
    so a NaN loss does not reach it) and beside the loss's, through either path."""
    K = 1
    hidden, weight, labels, ref_logps = make_inputs(6, 4, 16, 67, K, seed=33)
    paths = dict(weight_grad=weight_grad, objective="logps")
    want = run(materialised, hidden.double(), weight.double(), labels, ref_logps, K, **paths)
    got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, **paths)
    assert_all_close(got, want, rtol=1e-5, atol=1e-5)
    ref_logps[0] = float("nan")                      # the loss NaN, logps and their gradient not
    got = run(linear, hidden, weight, labels, ref_logps, K, grad_path=grad_path, **paths)
    assert got[0].isnan() and torch.isfinite(got[2]).all()
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-5, atol=1e-5)


def test_only_requested_gradients():
    hidden, weight, labels, ref_logps = make_inputs(4, 5, 16, 67, 1, seed=9)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    materialised(h64, w64, labels, ref_logps, 1.0, 1)[0].backward()
    h = hidden.clone().requires_grad_()
    ops.sdpo_linear_loss(h, weight, labels, ref_logps)[0].backward()   # frozen LM head (LoRA)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    assert weight.grad is None
    w = weight.clone().requires_grad_()
    ops.sdpo_linear_loss(hidden, w, labels, ref_logps)[0].backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grad_path"):
        ops._sdpo_linear_loss(hidden, weight, labels, ref_logps, grad_path="fast")


class IntoFusedOps(TorchDispatchMode):
    """Sees every op the calls under it run, the ATen calls inside the linear ops included: those
    ops are CompositeExplicitAutograd (csrc/linear.cpp), so their kernel is run here with the
    mode active, and each at:: call it makes comes back through the mode. Subclasses record."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "minisdpo" and torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), torch._C.DispatchKey.CompositeExplicitAutograd):
            with self:
                out = func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def record(self, func, args, kwargs, out):
        raise NotImplementedError


class LargestTensor(IntoFusedOps):
    """Records the largest tensor any op makes, C++ calls inside the fused ops included."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.ops = set()

    def record(self, func, args, kwargs, out):
        self.ops.add(str(func))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())


@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_no_full_logits(grad_path, weight_grad):
    S, R, D, V, C = 8, 16, 8, 1000, 10
    hidden, weight, labels, ref_logps = make_inputs(S, R, D, V, 3, seed=11)
    h, w = hidden.requires_grad_(), weight.requires_grad_(weight_grad)
    mode = LargestTensor()
    with mode:
        loss, _ = linear(h, w, labels, ref_logps, 1.0, 3, grad_path=grad_path, chunk_rows=C)
        loss.backward()
    assert "aten.mm.default" in mode.ops            # the spy sees inside the fused op
    # A chunk of logits (C rows of V) or the weight's gradient (V, D) at most, never S * R * V.
    assert mode.numel <= max(C * V, V * D)
    assert mode.numel < S * R * V // 10


class OpLog(IntoFusedOps):
    """The ops run, in order, and the host synchronisations among them: a value read on the
    host (item, nonzero, ...) or a copy to the CPU."""

    SYNC = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
            "aten.is_nonzero.default", "aten.equal.default", "aten.allclose.default", "aten.tolist.default"}

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = [], []

    def record(self, func, args, kwargs, out):
        self.ops.append(str(func))
        to_cpu = str(func).startswith(("aten.to.", "aten._to_copy.", "aten.copy_.")) and (
            kwargs.get("device") == torch.device("cpu") or any(isinstance(a, torch.device) for a in args))
        if str(func) in self.SYNC or to_cpu:
            self.syncs.append(str(func))


@pytest.mark.parametrize("op", ["sdpo", "token"])
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_one_host_synchronisation(op, grad_path, weight_grad):
    """The labels are checked and the counted tokens gathered once per forward pass, with one
    copy to the host (their number, and the first bad label if any); the backward pass reuses
    the forward pass's rows and synchronises nothing. On a GPU, test_one_host_synchronisation_cuda
    counts the synchronisations themselves."""
    hidden, weight, labels, ref_logps = make_inputs(8, 6, 16, 97, 3, seed=35)
    h, w = hidden.requires_grad_(), weight.requires_grad_(weight_grad)
    log = OpLog()
    with log:
        if op == "sdpo":
            out = linear(h, w, labels, ref_logps, 1.0, 3, grad_path=grad_path, chunk_rows=7)[0]
        else:
            out = ops._linear_token_logps(h, w, labels, chunk_rows=7, grad_path=grad_path).sum()
        forward = list(log.syncs)
        out.backward()
    assert "aten.mm.default" in log.ops             # the log sees inside the fused op
    assert len(forward) == 1 and forward[0].startswith("aten.to.")
    assert log.syncs == forward


@pytest.mark.parametrize("weight_grad", [False, True])
def test_auto_path(weight_grad):
    """"auto" (the public functions) forms d logp / d hidden in the forward pass when the weight
    is frozen, and then forms no logits in the backward pass: no matrix product there, no
    linear_bwd; with a trainable weight it recomputes them (linear_bwd); without autograd it
    forms no d logp / d hidden at all."""
    hidden, weight, labels, ref_logps = make_inputs(4, 5, 16, 67, 1, seed=37)
    h, w = hidden.requires_grad_(), weight.requires_grad_(weight_grad)
    log = OpLog()
    with log:
        loss, _ = ops.sdpo_linear_loss(h, w, labels, ref_logps, chunk_rows=3)
        forward = list(log.ops)
        loss.backward()
    backward = log.ops[len(forward):]
    assert ("minisdpo.logits_bwd_.default" in forward) == (not weight_grad)
    assert ("minisdpo.linear_bwd.default" in backward) == weight_grad
    assert ("aten.mm.default" in backward) == weight_grad
    for no_autograd in ("no_grad", "no requires_grad"):
        log = OpLog()
        with log, torch.set_grad_enabled(no_autograd != "no_grad"):
            ops.sdpo_linear_loss(hidden.detach() if no_autograd != "no_grad" else h, weight, labels, ref_logps)
        assert "minisdpo.logits_bwd_.default" not in log.ops and "aten.mm.default" in log.ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_one_host_synchronisation_cuda(grad_path, weight_grad):
    """torch.cuda's sync debug mode warns at each synchronising call: one per forward and
    backward pass (the count of counted tokens and the label check)."""
    import warnings
    hidden, weight, labels, ref_logps = make_inputs(8, 6, 16, 97, 3, seed=35, device="cuda")
    h, w = hidden.requires_grad_(), weight.requires_grad_(weight_grad)
    linear(h, w, labels, ref_logps, 1.0, 3, grad_path=grad_path, chunk_rows=7)[0].backward()  # warm up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss, _ = linear(h, w, labels, ref_logps, 1.0, 3, grad_path=grad_path, chunk_rows=7)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(c.message) for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("grad_path, weight_grad", PATHS, ids=PATH_IDS)
def test_gradcheck_float64(grad_path, weight_grad):
    hidden, weight, labels, ref_logps = make_inputs(4, 3, 5, 11, 1, dtype=torch.float64, seed=13)
    labels[1] = -100
    h, w = hidden.requires_grad_(), weight.requires_grad_(weight_grad)
    inputs = (h, w) if weight_grad else (h,)

    def both(h, w=w):
        return ops._sdpo_linear_loss(h, w, labels, ref_logps.double(), beta=0.5, chunk_rows=2, grad_path=grad_path)

    def tok(h, w=w):
        return ops._linear_token_logps(h, w, labels, chunk_rows=3, grad_path=grad_path)

    assert torch.autograd.gradcheck(both, inputs)
    assert torch.autograd.gradcheck(tok, inputs)


def test_opcheck():
    hidden, weight, labels, ref_logps = make_inputs(4, 3, 8, 23, 1, seed=15)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    for save_dtok in (False, True):
        torch.library.opcheck(torch.ops.minisdpo.linear_token_logps_fwd, (h, w, labels, -100, 2, save_dtok))
        torch.library.opcheck(torch.ops.minisdpo.sdpo_linear_fwd,
                              (h, w, labels, ref_logps, 0.5, 1, -100, 2, save_dtok))
    coef = torch.randn(4, 3)
    _, lse, rows, _ = torch.ops.minisdpo.linear_token_logps_fwd(hidden, weight, labels, -100, 0, False)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.minisdpo.linear_bwd,
                              (coef, hidden.detach(), weight.detach(), labels, rows, lse, -100, 2, *flags))


@pytest.mark.parametrize("weight_grad", [True, False])
def test_torch_compile_of_a_caller(weight_grad):
    """A compiled caller (the number of counted tokens is a data-dependent size while tracing)
    equals the eager one, by either path ("auto": "saved" with the head frozen)."""
    hidden, weight, labels, ref_logps = make_inputs(4, 5, 8, 31, 1, seed=17)
    proj = torch.randn(8, 8, dtype=torch.float32) / 8**0.5

    def step(x, w):
        x = torch.tanh(x @ proj)
        loss, logps = ops.sdpo_linear_loss(x, w, labels, ref_logps, chunk_rows=3)
        return loss + 0.1 * logps.sum() + 0.01 * ops.linear_token_logps(x, w, labels).sum()

    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (compiled, step):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
        out = fn(x, w)
        out.backward()
        outs.append((out.detach(), x.grad, w.grad))
    assert (outs[0][2] is None) == (not weight_grad)
    for a, b in zip(*outs):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# case: (the change to good arguments, the exception, words of its message)
BAD = {
    "hidden dtype": (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "hidden"),
    "hidden dims": (dict(hidden=torch.zeros(6, 4)), ValueError, "hidden"),
    "weight dtype": (dict(weight=torch.zeros(11, 4, dtype=torch.float64)), TypeError, "weight"),
    "weight D": (dict(weight=torch.zeros(11, 5)), ValueError, "weight"),
    "labels dtype": (dict(labels=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "labels"),
    "labels shape": (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    "label too large": (dict(labels=torch.tensor([[0, 1, 2], [3, 11, -100]])), ValueError,
                        r"labels\[1, 1\] = 11 is outside \[0, V\) = \[0, 11\)"),
    "label negative": (dict(labels=torch.tensor([[0, -3, 2], [3, 1, -100]])), ValueError,
                       r"labels\[0, 1\] = -3 is outside \[0, V\) = \[0, 11\)"),
    # Several bad labels: the first in the order of the positions is named.
    "labels bad twice": (dict(labels=torch.tensor([[0, 1, 2], [-5, 1, 12]])), ValueError, r"labels\[1, 0\] = -5 "),
    "ref_logps shape": (dict(ref_logps=torch.zeros(3)), ValueError, "ref_logps"),
    "S not a multiple": (dict(num_negatives=2), ValueError, "num_negatives"),
    "beta": (dict(beta=float("inf")), ValueError, "beta"),
    "chunk_rows": (dict(chunk_rows=-1), ValueError, "chunk_rows"),
}


@pytest.mark.parametrize("grad_path", ["saved", "recompute"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_argument(case, grad_path):
    kwargs = dict(hidden=torch.zeros(2, 3, 4, requires_grad=True), weight=torch.zeros(11, 4),
                  labels=torch.tensor([[0, 1, 2], [3, 4, -100]]), ref_logps=torch.zeros(2), grad_path=grad_path)
    change, exc, pattern = BAD[case]
    kwargs.update(change)
    with pytest.raises(exc, match=pattern):
        ops._sdpo_linear_loss(**kwargs)
    if not {"ref_logps", "num_negatives", "beta"} & change.keys():
        for key in ("ref_logps", "num_negatives", "beta"):
            kwargs.pop(key, None)
        with pytest.raises(exc, match=pattern):
            ops._linear_token_logps(**kwargs)


@pytest.mark.parametrize("case", ["hidden dims", "weight D", "labels shape", "ref_logps shape", "S not a multiple"])
def test_fake_kernels_check_the_shapes(case):
    """Under fake tensors (torch.compile's tracing) a bad shape raises from the fake kernels,
    which are shape functions, naming the argument; dtypes, beta and the label range are left to
    the kernels (tests/test_ops.py shows a compiled call rejected by them)."""
    kwargs = dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(11, 4),
                  labels=torch.tensor([[0, 1, 2], [3, 4, -100]]), ref_logps=torch.zeros(2))
    change, _, pattern = BAD[case]
    kwargs.update(change)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match=pattern):
            ops.sdpo_linear_loss(**kwargs)
