"""The tables of a comparison run under an exact judge (``eval.judge: ifeval``), as markdown, from what ``sgpo compare``
left in its directory: ``compare.json`` (every run's test figures, IFEval's, the paired differences) and each run's
round and improver metrics. Nothing is generated or judged.

    python scripts/exact_tables.py runs/verifiable-compare [runs/verifiable-compare-a ...]

Run ``sgpo compare ... --eval test,ifeval --test-judge reference`` first: the test benchmark then holds every model's
prompt- and constraint-level accuracy and the reference judge's figures, and the paired figures their differences.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sgpo.eval.winrate import format_difference

JUDGE = "ifeval"
LEVELS = (("perfect", "prompt-level"), ("constraints", "constraint-level"))
MODELS = (("start", "start"), ("pre_rounds", "entering round 1"), ("final", "final"))


def cell(f: dict | None) -> str:
    """``55.9 [51.9–59.8]`` (percent) or a dash."""
    if not f:
        return "–"
    return f"{100 * f['score']:.1f} [{100 * f['ci_low']:.1f}–{100 * f['ci_high']:.1f}]"


def diff_cell(d: dict | None) -> str:
    return format_difference(d) if d and d.get("n") else "–"


class Run:
    """One finished run of a comparison: its key (``method@seed``), its entry in ``compare.json``, the name of SGPO's
    reading in that comparison (empty for one comparison) and its directory."""

    def __init__(self, key: str, entry: dict, reading: str, folder: Path):
        self.method, self.seed = key.split("@")
        self.entry, self.reading, self.folder = entry, reading, folder

    def label(self) -> list[str]:
        name = f"{self.method} ({self.reading})" if self.method == "sgpo" and self.reading else self.method
        return [name, self.seed]

    def test(self) -> dict:
        return self.entry.get("eval", {}).get("test", {})


def accuracy_table(runs: list[Run]) -> list[str]:
    """Held-out test accuracy of every model of every run, strict, with 95% CIs."""
    head = ["method", "seed"] + [f"{name}: {m}" for _, name in LEVELS for _, m in MODELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        j = run.test().get("judges", {}).get(JUDGE, {})
        cells = [cell(j.get(f"{what}_{model}")) for what, _ in LEVELS for model, _ in MODELS]
        lines.append("| " + " | ".join([*run.label(), *cells]) + " |")
    return lines


def paired_table(states: list[tuple[dict, str]]) -> list[str]:
    """SGPO's final model minus each other method's, paired over the test prompts."""
    keys = ((" all met", "prompt-level"), (" constraints", "constraint-level"), (" score", "mean share met"))
    head = ["SGPO − method", "seed"] + [name for _, name in keys] + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for state, reading in states:
        for key, by_judge in (state.get("paired") or {}).items():
            method, seed = key.split("@")
            d = [by_judge.get(JUDGE + k) for k, _ in keys]
            n = next((x["n"] for x in d if x), "–")
            lines.append("| " + " | ".join([f"sgpo ({reading}) − {method}" if reading else f"sgpo − {method}", seed,
                                            *map(diff_cell, d), str(n)]) + " |")
    return lines


def ifeval_table(runs: list[Run]) -> list[str]:
    """IFEval's 541 prompts: each final model, its difference from the start model."""
    cols = [(p, m) for p in ("", "instruction_") for m in ("strict", "loose")]
    head = ["method", "seed"] + [f"{'instruction' if p else 'prompt'} {m}" for p, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = None
    for run in runs:
        r = run.entry.get("eval", {}).get("ifeval")
        if not r:
            continue
        start = start or [f"{100 * r[f'start_{p}{m}']:.1f}" for p, m in cols]
        cells = [f"{100 * r[p + m]:.1f} ({diff_cell(r[f'{p}{m}_diff'])})" for p, m in cols]
        lines.append("| " + " | ".join([*run.label(), *cells]) + " |")
    return lines + (["| start model | – | " + " | ".join(start) + " |"] if start else [])


def judges_table(runs: list[Run]) -> list[str]:
    """The other judges' win rates of each final model against the start model on the test prompts."""
    names = list(dict.fromkeys(n for run in runs for n in run.test().get("judges", {}) if n != JUDGE))
    head = ["method", "seed"] + [f"{n}: final vs start" for n in names] + ["length (words)", "finished"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        t = run.test()
        cells = [cell(t.get("judges", {}).get(n)) for n in names]
        lines.append("| " + " | ".join([*run.label(), *cells, f"{t.get('length', 0):.0f}",
                                        f"{100 * t.get('finished', 0):.0f}%"]) + " |")
    return lines


def rounds_table(runs: list[Run]) -> list[str]:
    """Per round, the exact judge on the pairs trained on (chosen against rejected) and the second judge's agreement."""
    head = ["method", "seed", "round", "kept pairs", "chosen better", "tie", "rejected better", "margin",
            "2nd judge prefers chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for path in sorted(run.folder.glob("round_[1-9]*/metrics.json")):
            m = json.loads(path.read_text())
            if "pairs/score/n" not in m:
                continue
            share = [f"{100 * m[f'pairs/score/{k}']:.1f}%" for k in ("chosen_better", "tie", "rejected_better")]
            agree = m.get("pairs/judge_agreement")
            lines.append("| " + " | ".join([*run.label(), path.parent.name.split("_")[1],
                                            str(m["pairs/score/n"]), *share, f"{m['pairs/score/margin']:+.3f}",
                                            "–" if agree is None else f"{100 * agree:.0f}%"]) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comparisons", nargs="+", type=Path, help="comparison directories (sgpo compare -o)")
    ap.add_argument("--readings", default="B,A", help="the name of SGPO's reading in each directory, in order")
    args = ap.parse_args()
    readings = args.readings.split(",") if len(args.comparisons) > 1 else [""]
    states = [(json.loads((d / "compare.json").read_text()), r) for d, r in zip(args.comparisons, readings)]
    runs = [Run(k, e, r, d / k.split("@")[0] / f"seed_{k.split('@')[1]}")
            for d, (s, r) in zip(args.comparisons, states) for k, e in s["runs"].items() if e.get("status") == "done"]
    sections = [("Held-out test split, strict (percent, 95% CI)", accuracy_table(runs)),
                ("SGPO minus each method, paired over the test prompts (points, 95% CI)", paired_table(states)),
                ("IFEval, 541 prompts (percent; in brackets: final − start, points, paired 95% CI)", ifeval_table(runs)),
                ("Other judges on the test split (win rate vs start, ties half)", judges_table(runs)),
                ("Pairs trained on, by the exact judge", rounds_table(runs))]
    for title, lines in sections:
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
