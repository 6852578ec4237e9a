"""A method says only what differs between methods; the recipe asks every method the same questions."""
import ast
from pathlib import Path

import pytest

from sgpo.config.schema import Config
from sgpo.data.records import Record
from sgpo.core.registry import METHODS
from sgpo.methods.base import Method, get_method
from sgpo.data.splits import Splits

SRC = Path(__file__).resolve().parents[1] / "src" / "sgpo"


def splits() -> Splits:
    rec = [Record(f"r{i}", (("user", f"q{i}"),), f"a{i}") for i in range(6)]
    return Splits(train=rec, dev=[], sft=rec[:2], improver=rec[2:4], rounds=[rec[4:5], rec[5:6]])


@pytest.mark.parametrize("name", list(METHODS.names()))
def test_a_method_with_rounds_makes_its_own_pairs(name):
    m, cls = get_method(name), type(get_method(name))
    assert m.name == name and isinstance(m, Method)
    assert m.reference(Config()) in ("round_start", "initial")
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
