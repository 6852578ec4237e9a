"""AlpacaEval 2.0 metrics: raw and length-controlled win rates against published reference numbers."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from sgpo.eval import alpaca_eval
from sgpo.eval.alpaca_eval import load_alpaca_eval, load_lc_inputs, metrics_from_annotations, raw_metrics

LC_TOLERANCE = 0.15            # points, against the reference pipeline run on the same inputs
LC_LEADERBOARD_TOLERANCE = 0.5  # points, against the published leaderboard (other inputs upstream)


@pytest.fixture
def alpaca_dir(shared_data):
    return shared_data / "alpaca_eval"


def _annotation_files(alpaca_dir):
    return sorted(alpaca_dir.glob("*.annotations.json"))


def _record(pref, baseline="b" * 10, model="m" * 10, i=0):
    return {"instruction": f"q{i}", "output_1": baseline, "output_2": model,
            "generator_1": "base", "generator_2": "model", "preference": pref}


def test_raw_metrics_hand_made():
    prefs = [2, 1, 1.5, 0, 1.75, float("nan"), 1.25]
    out = raw_metrics([_record(p) for p in prefs])
    p = np.array([1, 0, 0.5, 0.5, 0.75, 0.25])
    assert out["n_total"] == 6
    assert out["win_rate"] == pytest.approx(100 * p.mean())
    assert out["standard_error"] == pytest.approx(100 * np.std(p, ddof=1) / math.sqrt(6))
    assert out["discrete_win_rate"] == pytest.approx(100 * np.mean([1, 0, 0.5, 0.5, 1, 0]))
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"]) == (2, 2, 2)


def test_every_shared_model_reproduces_reference_and_leaderboard(alpaca_dir):
    expected = pd.read_csv(alpaca_dir / "lc_expected.csv", index_col=0)
    leaderboard = pd.read_csv(alpaca_dir / "leaderboard.csv", index_col=0)
    files = _annotation_files(alpaca_dir)
    models = [f.name.removesuffix(".annotations.json") for f in files]
    assert sorted(models) == sorted(expected.index), "every annotation file needs a row of lc_expected.csv"

    table = []
    for model, path in zip(models, files):
        annotations = json.loads(path.read_text(encoding="utf-8"))
        got = metrics_from_annotations(annotations, alpaca_dir)
        ref, board = expected.loc[model], leaderboard.loc[model]
        for key in ("win_rate", "standard_error", "discrete_win_rate"):
            assert got[key] == pytest.approx(ref[key], abs=1e-6), (model, key)
        for key in ("n_wins", "n_wins_base", "n_draws", "n_total"):
            assert got[key] == ref[key], (model, key)
        assert int(got["avg_length"]) == board["avg_length"], model
        table.append({
            "model": model,
            "raw-ref": got["win_rate"] - ref["win_rate"],
            "raw-board": got["win_rate"] - board["win_rate"],
            "lc": got["length_controlled_winrate"],
            "lc-ref": got["length_controlled_winrate"] - ref["lc_reference_pipeline"],
            "lc-board": got["length_controlled_winrate"] - board["length_controlled_winrate"],
            "lc_se-ref": got["lc_standard_error"] - ref["lc_standard_error_reference_pipeline"],
            "C": got["lc_selected_C"], "C-ref": ref["cv_selected_C"],
        })
    table = pd.DataFrame(table).set_index("model")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\nAlpacaEval metrics minus reference values:\n", table.to_string(float_format=lambda x: f"{x:.3g}"))
    largest = table[["raw-ref", "raw-board", "lc-ref", "lc-board", "lc_se-ref"]].abs().agg(["max", "idxmax"])
    print("largest absolute deviations:\n", largest.to_string())
    assert table["raw-board"].abs().max() < 1e-6
    assert table["lc-ref"].abs().max() < LC_TOLERANCE
    assert table["lc_se-ref"].abs().max() < 0.02
    assert table["lc-board"].abs().max() < LC_LEADERBOARD_TOLERANCE


def test_lc_is_absent_for_a_partial_set(alpaca_dir):
    annotations = json.loads((alpaca_dir / "claude-2.1.annotations.json").read_text(encoding="utf-8"))[:100]
    got = metrics_from_annotations(annotations, alpaca_dir)
    assert got["length_controlled_winrate"] is None and got["lc_standard_error"] is None
    assert "805" in got["lc_absent_reason"] and "100" in got["lc_absent_reason"]
    assert got["n_total"] == 100
    assert got["win_rate"] == pytest.approx(100 * np.mean([a["preference"] - 1 for a in annotations]))


def test_lc_is_absent_when_records_are_out_of_benchmark_order(alpaca_dir):
    annotations = json.loads((alpaca_dir / "claude-2.1.annotations.json").read_text(encoding="utf-8"))
    instructions = [a["instruction"] for a in annotations]
    swapped = [annotations[1], annotations[0], *annotations[2:]]
    got = metrics_from_annotations(swapped, alpaca_dir, benchmark_instructions=instructions)
    assert got["length_controlled_winrate"] is None
    assert "order" in got["lc_absent_reason"]


def test_baseline_against_itself_has_lc_50():
    annotations = [dict(_record(1.5), generator_2="base") for _ in range(3)]
    got = metrics_from_annotations(annotations, data_dir=None)
    assert got["length_controlled_winrate"] == 50.0 and got["win_rate"] == 50.0


def test_offline_without_data_dir_names_the_option(monkeypatch, tmp_path):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_lc_inputs(None)


def test_lc_inputs_difficulty_table_agrees_with_gamed_rows(alpaca_dir):
    theta, gamed = load_lc_inputs(alpaca_dir)
    assert len(theta) == 805
    assert set(gamed["not_gamed_baseline"]) == {False}
    per_index = gamed.drop_duplicates("index").set_index("index")["instruction_difficulty"].sort_index()
    np.testing.assert_allclose(per_index.to_numpy(), theta, atol=1e-12)


def test_load_alpaca_eval_from_a_file(alpaca_dir):
    records = load_alpaca_eval(alpaca_dir / "baseline_gpt4_1106_preview.outputs.json")
    assert len(records) == 805
    assert set(records[0]) == {"instruction", "output", "dataset"}


def test_load_alpaca_eval_from_the_installed_package(alpaca_dir):
    try:
        alpaca_eval._packaged_benchmark_path()
    except FileNotFoundError:
        pytest.skip("the package holding the AlpacaEval set is not installed")
    packaged = load_alpaca_eval()
    shared = load_alpaca_eval(alpaca_dir / "baseline_gpt4_1106_preview.outputs.json")
    assert [r["instruction"] for r in packaged] == [r["instruction"] for r in shared]
    assert [r["output"] for r in packaged] == [r["output"] for r in shared]
