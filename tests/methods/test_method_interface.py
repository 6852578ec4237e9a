"""A method says only what differs between methods; the recipe asks every method the same questions."""
import ast
import logging
from pathlib import Path

import pytest

from sgpo.config.schema import CHOICES, Config, key_type
from sgpo.data.records import Record
from sgpo.core.registry import METHODS
from sgpo.methods.base import Method, Reference, get_method, ignored_settings, warn_ignored
from sgpo.data.splits import Splits

SRC = Path(__file__).resolve().parents[2] / "src" / "sgpo"


def splits() -> Splits:
    rec = [Record(f"r{i}", (("user", f"q{i}"),), f"a{i}") for i in range(6)]
    return Splits(train=rec, dev=[], sft=rec[:2], improver=rec[2:4], rounds=[rec[4:5], rec[5:6]])


@pytest.mark.parametrize("name", list(METHODS.names()))
def test_a_method_with_rounds_makes_its_own_pairs(name):
    m, cls = get_method(name), type(get_method(name))
    assert m.name == name and isinstance(m, Method)
    assert isinstance(m.reference(Config()), Reference)
    if m.rounds(splits()):
        assert cls.make_pairs is not Method.make_pairs, f"{name} has rounds but makes no pairs"


def test_sft_alone_trains_on_what_the_others_see_and_has_no_rounds():
    sft, data = get_method("sft"), splits()
    assert sft.rounds(data) == []
    assert [r.id for r in sft.sft_prompts(data, Config())] == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert get_method("sgpo").sft_prompts(data, Config(sft=False)) is None


def test_the_base_refuses_pairs_it_was_not_taught():
    with pytest.raises(NotImplementedError, match="makes no pairs"):
        Method().make_pairs(None)


def test_the_recipe_names_no_method():
    """No method's name or attribute is tested outside its own module."""
    text = (SRC / "run" / "recipe.py").read_text()
    tree = ast.parse(text)
    for node in ast.walk(tree):  # no comparison with a method's name or with the configured method
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            assert not any(isinstance(x, ast.Constant) and x.value in METHODS.names() for x in sides), ast.unparse(node)
            assert not any(isinstance(x, ast.Attribute) and x.attr == "method" for x in sides), ast.unparse(node)
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attrs & {"trains_improver", "runs_sft", "has_rounds", "has_prepare", "self_improving"}


def with_set(**sections) -> Config:
    """A default config with ``section={key: value}`` set."""
    cfg = Config()
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def test_the_reference_is_a_declared_value_read_from_the_config_where_the_method_honours_it():
    assert get_method("sgpo").reference(Config()) is Reference.ROUND_START
    assert get_method("sgpo").reference(with_set(dpo={"reference": "initial"})) is Reference.INITIAL
    assert get_method("dpo").reference(Config()) is Reference.INITIAL
    assert [r.value for r in Reference] == list(CHOICES["dpo.reference"])  # the config's names, unchanged


@pytest.mark.parametrize("name", list(METHODS.names()))
def test_what_a_method_ignores_is_a_key_and_really_ignored(name):
    m = get_method(name)
    assert all(key_type(k) is not None for k in m.ignores), m.ignores
    if "dpo.reference" in m.ignores or "dpo" in m.ignores:  # its reference does not follow the config
        other = next(v for v in CHOICES["dpo.reference"] if v != Config().dpo.reference)
        assert m.reference(with_set(dpo={"reference": other})) is m.reference(Config())
    assert ignored_settings(m, Config()) == []  # nothing set: nothing said


def test_a_set_key_the_method_ignores_is_warned_about_once(caplog):
    cfg = with_set(dpo={"reference": "initial"})
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        warn_ignored(get_method("spin"), cfg)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "dpo.reference=initial is set but method 'spin' does not use it (its reference is the round's start model)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        warn_ignored(get_method("sgpo"), cfg)       # SGPO honours dpo.reference
        warn_ignored(get_method("spin"), Config())  # left at its default
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_keys_with_the_same_reason_share_a_line_and_a_section_stands_for_its_keys():
    cfg = with_set(dpo={"reference": "initial", "beta": 0.1}, improver={"step": 0.25},
                   data={"preference": "prefs.jsonl"})
    assert ignored_settings(get_method("sft"), cfg) == [
        "dpo.beta=0.1, dpo.reference=initial are set but method 'sft' does not use them (it has no preference rounds)",
        "improver.step=0.25 is set but method 'sft' does not use it (it trains no improver)",
        "data.preference=prefs.jsonl is set but method 'sft' does not use it (only method dpo reads a preference set)"]
    assert ignored_settings(get_method("dpo"), cfg) == [
        "dpo.reference=initial is set but method 'dpo' does not use it (its reference is the pre-rounds model)",
        "improver.step=0.25 is set but method 'dpo' does not use it (it trains no improver)"]
    assert ignored_settings(get_method("sgpo"), cfg) == [
        "data.preference=prefs.jsonl is set but method 'sgpo' does not use it (only method dpo reads a preference set)"]
