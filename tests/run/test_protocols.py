"""The run's parts and the dry run's counting twins hold to one declared interface each (``SamplerPart``,
``PolicyPart``, ``TrainerPart``, ``JudgePart``; the stages' ``Checkpointed``): every method of the Protocol on both
sides, with the Protocol's parameters (names, kinds, defaults, in order), every attribute there, and no public method
on a twin that its Protocol does not declare. No model is loaded."""
import inspect

import pytest

from sgpo.config.schema import Config, GenerationConfig, ModelConfig
from sgpo.eval.base import Judge, JudgePart, Scorer
from sgpo.eval.cache import CachedJudge
from sgpo.eval.judges import MainProcessJudge
from sgpo.generation.rollout import Sampler, SamplerPart
from sgpo.models.policy import Policy, PolicyPart
from sgpo.run.dry_run import CountingJudge, CountingPolicy, CountingSampler, CountingTrainer, Tally
from sgpo.run.stages import Checkpointed
from sgpo.run.trainer import Trainer, TrainerPart


def members(protocol) -> tuple[dict, set[str]]:
    """The Protocol's methods ({name: function}) and its other members (annotated attributes, properties)."""
    own = vars(protocol)
    methods = {n: v for n, v in own.items() if not n.startswith("_") and inspect.isfunction(v)}
    others = set(own.get("__annotations__", {})) | {n for n, v in own.items() if isinstance(v, property)}
    return methods, others


def shape(fn) -> list[tuple]:
    """What a caller relies on in a signature: each parameter's name, kind and default, in order (not annotations)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def mismatches(protocol, cls, instance=None, twin: bool = False) -> list[str]:
    """How ``cls`` (and ``instance``, for attributes set in ``__init__``) falls short of ``protocol``; a ``twin`` also
    may have no public method the Protocol lacks."""
    methods, others = members(protocol)
    out = []
    for name, fn in methods.items():
        impl = getattr(cls, name, None)  # on the class: a function, never a property's value
        if not inspect.isfunction(impl):
            out.append(f"{cls.__name__}.{name}: missing")
        elif shape(impl) != shape(fn):
            out.append(f"{cls.__name__}.{name}{inspect.signature(impl)} is not "
                       f"{protocol.__name__}.{name}{inspect.signature(fn)}")
    for name in sorted(others):
        if name not in dir(cls) and (instance is None or name not in vars(instance)):
            out.append(f"{cls.__name__}.{name}: missing (attribute)")
    if twin:
        extra = {n for n, v in vars(cls).items() if not n.startswith("_") and inspect.isfunction(v)} - set(methods)
        out += [f"{cls.__name__}.{n}: not in {protocol.__name__}" for n in sorted(extra)]
    return out


def sampler():
    return Sampler(None, GenerationConfig(), 0)


def policy():
    return Policy(ModelConfig(name="owner/model"), None, "cpu", None, None, None)  # loads nothing until asked


def counting_sampler():
    return CountingSampler(Tally(None), "instruction")


def counting_policy():
    return CountingPolicy("owner/model", None, Tally(None))


REAL = [(SamplerPart, Sampler, sampler), (PolicyPart, Policy, policy), (TrainerPart, Trainer, None),
        (JudgePart, CachedJudge, None), (JudgePart, MainProcessJudge, None), (JudgePart, Scorer, None)]
TWINS = [(SamplerPart, CountingSampler, counting_sampler), (PolicyPart, CountingPolicy, counting_policy),
         (TrainerPart, CountingTrainer, None), (JudgePart, CountingJudge, None)]


@pytest.mark.parametrize("protocol, cls, make", REAL, ids=[f"{p.__name__}-{c.__name__}" for p, c, _ in REAL])
def test_the_real_part_implements_its_protocol(protocol, cls, make):
    assert mismatches(protocol, cls, make() if make else None) == []


@pytest.mark.parametrize("protocol, cls, make", TWINS, ids=[f"{p.__name__}-{c.__name__}" for p, c, _ in TWINS])
def test_the_counting_twin_implements_its_protocol(protocol, cls, make):
    assert mismatches(protocol, cls, make() if make else None, twin=True) == []


def test_every_protocol_has_a_real_part_and_a_twin():
    assert {p for p, _, _ in REAL} == {p for p, _, _ in TWINS} == {SamplerPart, PolicyPart, TrainerPart, JudgePart}


def test_the_stages_checkpointed_is_part_of_the_policy_part():
    """``PolicyPart`` declares ``save`` and ``resume_from`` as the stages' ``run.stages.Checkpointed`` does (models/
    may not import run/, so they are written twice): both sides of ``PolicyPart`` are ``Checkpointed``."""
    theirs, _ = members(Checkpointed)
    ours, _ = members(PolicyPart)
    assert {n: shape(f) for n, f in theirs.items()} == {n: shape(ours[n]) for n in theirs}


def test_the_judges_take_what_the_judge_base_class_declares():
    """``Judge``, the base class of every judge kind, is not the run's judge interface (``JudgePart``: ``rows`` and
    ``score`` besides); every judge the run gets still takes its methods' parameters, first and in order, any more
    optional."""
    for cls in (CachedJudge, MainProcessJudge, Scorer, CountingJudge):
        assert issubclass(cls, Judge)
        for name in ("prefer", "verdicts", "stats", "close"):
            base, impl = shape(getattr(Judge, name)), shape(getattr(cls, name))
            assert impl[:len(base)] == base, (cls.__name__, name)
            assert all(default is not inspect.Parameter.empty for _, _, default in impl[len(base):]), (cls, name)


def test_the_dry_runs_twins_are_the_session_parts():
    """The dry run's session is built of the twins (so the checks above are about the parts it runs with)."""
    from sgpo.run.dry_run import dry_session

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        s, _ = dry_session(Config(), Path(tmp))
        assert (type(s.sampler), type(s.policy), type(s.trainer)) == (CountingSampler, CountingPolicy, CountingTrainer)
        assert type(s.evaluator.make_judge("reference")) is CountingJudge
        assert s.evaluator.sampler is s.sampler and s.evaluator.policy is s.policy


class _Renamed(CountingTrainer):
    def reference_pass(self, pairs, reference):  # the Protocol's reference_path
        pass


class _Default(CountingTrainer):
    def train_nll(self, examples, desc, seed, model=0):  # None in the Protocol
        pass


class _Kind(CountingSampler):
    def rollout(self, model, records, role, round_, drafts=None, shard=None):  # keyword-only in the Protocol
        pass


class _Extra(CountingPolicy):
    def unload_all(self) -> None:  # a method the Protocol does not declare
        pass


def test_the_check_catches_a_renamed_missing_or_changed_member():
    assert mismatches(TrainerPart, _Renamed, twin=True)[0].startswith("_Renamed.reference_pass")
    assert mismatches(TrainerPart, _Default, twin=True)[0].startswith("_Default.train_nll")
    assert mismatches(SamplerPart, _Kind, counting_sampler(), twin=True)[0].startswith("_Kind.rollout")
    assert mismatches(PolicyPart, _Extra, counting_policy(), twin=True) == ["_Extra.unload_all: not in PolicyPart"]
    missing = type("Missing", (), {k: v for k, v in vars(CountingTrainer).items() if k != "train_dpo"})
    assert mismatches(TrainerPart, missing, twin=True) == ["Missing.train_dpo: missing"]
    assert mismatches(SamplerPart, CountingSampler, twin=True) == ["CountingSampler.instruction: missing (attribute)"]
