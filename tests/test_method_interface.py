"""Every method declares, in its own class, what the recipe asks of it; what it declares it implements."""
import pytest

from sgpo.config import Config
from sgpo.methods import METHODS, Method, get_method

DECLARED = ("trains_improver", "runs_sft", "has_rounds", "has_prepare", "self_improving")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_declares_every_flag_itself(name):
    m = get_method(name)
    assert m.name == name and isinstance(m, Method)
    own = vars(type(m))
    missing = [k for k in DECLARED if k not in own]
    assert not missing, f"{name} leaves {missing} to the base class"
    assert all(isinstance(own[k], bool) for k in DECLARED)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_what_a_method_declares_it_implements(name):
    m, cls = get_method(name), type(get_method(name))
    overrides = lambda attr: getattr(cls, attr) is not getattr(Method, attr)  # noqa: E731
    assert m.has_prepare == overrides("prepare"), name
    if m.has_rounds and not m.self_improving:
        assert overrides("make_pairs"), f"{name} has rounds but makes no pairs"
    assert m.reference(Config()) in ("round_start", "initial")
    plan = m.plan_round(Config(), 1)
    assert set(plan) >= {"generations", "pairs"}


def test_the_base_refuses_what_was_not_declared():
    with pytest.raises(NotImplementedError, match="no prepare stage"):
        get_method("spin").prepare(None)
    with pytest.raises(NotImplementedError, match="makes no pairs"):
        get_method("sgpo").make_pairs(None)


def test_only_sgpo_is_self_improving_and_trains_its_own_improver():
    assert {n for n in METHODS if get_method(n).self_improving} == {"sgpo"}
    assert {n for n in METHODS if get_method(n).trains_improver} == {"sgpo"}
    assert {n for n in METHODS if not get_method(n).has_rounds} == {"sft"}
