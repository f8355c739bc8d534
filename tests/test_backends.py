"""minisdpo.loss and minisdpo.ops as loss backends: the Protocols of minisdpo.loss (LossBackend,
LinearLossBackend) hold for the two module objects, with the signatures they declare. The
names come from the Protocols themselves, so a function added to one is checked too."""
import inspect

import pytest

from minisdpo import loss, ops
from minisdpo.loss import LinearLossBackend, LossBackend


def declared_names(protocol):
    """The names ``protocol`` declares itself (not those it inherits)."""
    return sorted(n for n in vars(protocol) if not n.startswith("_"))


SHARED = declared_names(LossBackend)
LINEAR = declared_names(LinearLossBackend)


def declared(protocol, name):
    """The signature ``protocol`` declares for ``name``, less ``self``: a module function's."""
    sig = inspect.signature(getattr(protocol, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def test_ops_is_a_linear_backend_and_loss_a_plain_one():
    assert isinstance(ops, LossBackend) and isinstance(ops, LinearLossBackend)
    assert isinstance(loss, LossBackend) and not isinstance(loss, LinearLossBackend)


def test_protocols_declare_public_functions_of_the_modules():
    # Functions only (a data member would make isinstance check nothing but its presence), and
    # part of each module's public API.
    assert SHARED and LINEAR and not set(SHARED) & set(LINEAR)
    for protocol, names in ((LossBackend, SHARED), (LinearLossBackend, LINEAR)):
        assert all(inspect.isfunction(vars(protocol)[n]) for n in names)
    assert set(SHARED) <= set(loss.__all__) and set(SHARED + LINEAR) <= set(ops.__all__)


@pytest.mark.parametrize("name", SHARED)
def test_shared_signatures_are_the_same_in_both_modules(name):
    want = declared(LossBackend, name)
    assert inspect.signature(getattr(loss, name)) == want
    assert inspect.signature(getattr(ops, name)) == want


@pytest.mark.parametrize("name", LINEAR)
def test_linear_signatures_are_the_ops_ones(name):
    assert inspect.signature(getattr(ops, name)) == declared(LinearLossBackend, name)
    assert not hasattr(loss, name)
