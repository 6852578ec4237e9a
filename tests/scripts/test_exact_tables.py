"""scripts/exact_tables.py: the tables of an exact-judge comparison come from compare.json and the runs' round
metrics, one row per finished run (SGPO named by its reading when two comparisons are read), unfinished runs left out."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def figure(x):
    return {"score": x, "ci_low": x - 0.05, "ci_high": x + 0.05, "n": 400}


def comparison(folder: Path, methods: dict) -> Path:
    """A comparison directory as ``sgpo compare`` leaves it, with ``methods``: {method@seed: final constraint share}."""
    runs = {}
    for key, x in methods.items():
        ifeval = {"constraints_final": figure(x), "perfect_final": figure(x - 0.1), "constraints_start": figure(0.4),
                  **({"constraints_pre_rounds": figure(0.55)} if not key.startswith("sft") else {}),
                  **figure(0.6)}
        runs[key] = {"status": "done", "eval": {"test": {"judges": {"ifeval": ifeval, "reference": figure(0.7)},
                                                         "length": 50.0, "finished": 0.8}}}
        m, s = key.split("@")
        (folder / m / f"seed_{s}" / "round_1").mkdir(parents=True)
        (folder / m / f"seed_{s}" / "round_1" / "metrics.json").write_text(json.dumps(
            {"pairs/score/n": 60, "pairs/score/chosen_better": 0.5, "pairs/score/tie": 0.45,
             "pairs/score/rejected_better": 0.05, "pairs/score/margin": 0.3, "pairs/judge_agreement": 0.8}))
    runs["spin@2"] = {"status": "failed"}
    paired = {"sft@1": {"ifeval constraints": {"diff": 0.027, "ci_low": -0.008, "ci_high": 0.06, "n": 400}}}
    (folder / "compare.json").write_text(json.dumps({"runs": runs, "paired": paired}))
    return folder


def test_one_row_per_finished_run_and_the_paired_differences(tmp_path):
    b = comparison(tmp_path / "b", {"sgpo@1": 0.575, "sft@1": 0.548})
    a = comparison(tmp_path / "a", {"sgpo@1": 0.51})
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "exact_tables.py"), str(b), str(a)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert "| sgpo (B) | 1 | " in res.stdout and "| sgpo (A) | 1 | " in res.stdout
    accuracy = [r for r in rows if "57.5 [52.5–62.5]" in r]
    assert len(accuracy) == 1 and accuracy[0].startswith("| sgpo (B) | 1 |") and "55.0 [50.0–60.0]" in accuracy[0]
    assert "| sgpo (B) − sft | 1 | – | +2.7 [-0.8, +6.0] | – | 400 |" in res.stdout
    assert "| sft | 1 | 70.0 [65.0–75.0] | 50 | 80% |" in res.stdout  # the reference judge's column
    assert "spin" not in res.stdout  # a failed run has no row
    assert sum("| 1 | 60 | 50.0% | 45.0% | 5.0% | +0.300 | 80% |" in r for r in rows) == 3
