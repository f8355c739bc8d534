"""minisdpo.loss and minisdpo.ops as loss backends: the Protocols of minisdpo.loss (LossBackend,
LinearLossBackend) hold for the two module objects, with the signatures they declare."""
import inspect

import pytest

from minisdpo import loss, ops
from minisdpo.loss import LinearLossBackend, LossBackend

SHARED = ["token_logps", "sdpo_loss"]
LINEAR = ["linear_token_logps", "sdpo_linear_loss"]


def declared(protocol, name):
    """The signature ``protocol`` declares for ``name``, less ``self``: a module function's."""
    sig = inspect.signature(getattr(protocol, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def test_ops_is_a_linear_backend_and_loss_a_plain_one():
    assert isinstance(ops, LossBackend) and isinstance(ops, LinearLossBackend)
    assert isinstance(loss, LossBackend) and not isinstance(loss, LinearLossBackend)


def test_protocols_declare_the_backend_functions_only():
    def members(protocol):
        return {n for n in vars(protocol) if not n.startswith("_")}
    assert members(LossBackend) == set(SHARED)
    assert members(LinearLossBackend) == set(LINEAR)   # and LossBackend's, by inheritance


@pytest.mark.parametrize("name", SHARED)
def test_shared_signatures_are_the_same_in_both_modules(name):
    want = declared(LossBackend, name)
    assert inspect.signature(getattr(loss, name)) == want
    assert inspect.signature(getattr(ops, name)) == want


@pytest.mark.parametrize("name", LINEAR)
def test_linear_signatures_are_the_ops_ones(name):
    assert inspect.signature(getattr(ops, name)) == declared(LinearLossBackend, name)
    assert not hasattr(loss, name)
