"""A run given other runs (``sft_from``, what ``sgpo compare`` passes: the other methods of the same seed) takes an
identical SFT stage's model instead of training it again — and ends exactly where training it would have."""
import json

import pytest
from cli_runs import REPO, SETS, load_weights, write_data

from sgpo.config import schema as config
from sgpo.run import recipe

pytestmark = pytest.mark.slow  # nine shrunken smoke runs in this process


def _run(out, data, method, sft_from=(), extra=()):
    sets = [f"data.sft={data}", f"method={method}", *SETS, "data.sft_size=3", *extra]
    cfg = config.load(str(REPO / "configs" / "smoke.yaml"), sets)
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
    assert "time/sft/training_s" not in reused  # nothing trained, and no earlier run of this process counted
    for stage in ("sft/model", "round_1/model", "final"):
        a, b = load_weights(tmp_path / "spin_fresh" / stage), load_weights(tmp_path / "spin_reused" / stage)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
    pairs = [(tmp_path / r / "round_1" / "pairs.jsonl").read_text() for r in ("spin_fresh", "spin_reused")]
    assert pairs[0] == pairs[1]


def test_an_sft_under_other_settings_or_of_method_sft_is_trained_afresh(tmp_path, donor):
    sgpo, data = donor
    assert "sft/reused" not in _run(tmp_path / "lr", data, "spin", [sgpo], ["train.lr=2e-3"])
    assert "sft/reused" not in _run(tmp_path / "sft", data, "sft", [sgpo])  # SFT on more prompts: 3 + the others


def test_on_the_whole_pool_method_sft_trains_the_same_sft_and_shares_it(tmp_path, donor):
    """With data.sft_size=0 method sft's prompts (every prompt the others see) are the others' SFT slice, in order."""
    _, data = donor
    whole = ["data.sft_size=0"]
    sft = _run(tmp_path / "sft", data, "sft", extra=whole)
    fresh = _run(tmp_path / "spin_fresh", data, "spin", extra=whole)
    a, b = load_weights(tmp_path / "sft" / "sft" / "model"), load_weights(tmp_path / "spin_fresh" / "sft" / "model")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the same SFT, trained twice
    assert sft["nll/examples"] == fresh["nll/examples"]
    reused = _run(tmp_path / "spin_reused", data, "spin", [tmp_path / "sft"], whole)
    assert reused["sft/reused"] == 1 and reused["nll/loss"] == fresh["nll/loss"]
    assert _run(tmp_path / "sft_reused", data, "sft", [tmp_path / "spin_fresh"], whole)["sft/reused"] == 1
