"""A run given other runs (``sft_from``, what ``sgpo compare`` passes: the other methods of the same seed) takes an
identical SFT stage's model instead of training it again — and ends exactly where training it would have."""
import json

import pytest
from cli_runs import REPO, SETS, load_weights, write_data

from sgpo.config import schema as config
from sgpo.run import recipe

pytestmark = pytest.mark.slow  # six shrunken smoke runs in this process


def _run(out, data, method, sft_from=(), extra=()):
    cfg = config.load(str(REPO / "configs" / "smoke.yaml"), [f"data.sft={data}", f"method={method}", *SETS, *extra])
    recipe.run(cfg, out, sft_from=sft_from)
    return json.loads((out / "sft" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    """An sgpo run whose SFT the tests' runs may take, and its data."""
    root = tmp_path_factory.mktemp("donor")
    data = write_data(root / "d.jsonl")
    _run(root / "sgpo", data, "sgpo")
    return root / "sgpo", data


def test_an_identical_sft_is_taken_from_another_run_and_the_run_ends_as_if_it_had_trained_it(tmp_path, donor):
    sgpo, data = donor
    fresh = _run(tmp_path / "spin_fresh", data, "spin")
    reused = _run(tmp_path / "spin_reused", data, "spin", sft_from=[tmp_path / "nope", sgpo])
    assert reused["sft/reused"] == 1 and "sft/reused" not in fresh
    assert reused["nll/loss"] == fresh["nll/loss"]  # the donor's training figures, which a fresh SFT reproduces
    for stage in ("sft/model", "round_1/model", "final"):
        a, b = load_weights(tmp_path / "spin_fresh" / stage), load_weights(tmp_path / "spin_reused" / stage)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
    pairs = [(tmp_path / r / "round_1" / "pairs.jsonl").read_text() for r in ("spin_fresh", "spin_reused")]
    assert pairs[0] == pairs[1]


def test_an_sft_under_other_settings_or_of_method_sft_is_trained_afresh(tmp_path, donor):
    sgpo, data = donor
    assert "sft/reused" not in _run(tmp_path / "lr", data, "spin", [sgpo], ["train.lr=2e-3"])
    assert "sft/reused" not in _run(tmp_path / "sft", data, "sft", [sgpo])  # SFT on more prompts
