"""A readable report of a run directory: per-stage metrics table, plots (PNG), the headline number."""
from __future__ import annotations

import json
import math
from pathlib import Path

from sgpo.core.files import atomic_write_text

TABLE_KEYS = [
    ("pairs/candidates", "candidates", "{:.0f}"),
    ("improver/template_leak_rate", "template leak", "{:.0%}"),
    ("improver/echo_rate", "echo", "{:.0%}"),
    ("pairs/kept", "pairs", "{:.0f}"),
    ("pairs/judge_agreement", "2nd judge prefers chosen", "{:.0%}"),
    ("pairs/judge_agreement_reference", "ref. judge prefers chosen", "{:.0%}"),
    ("pairs/chosen_finished_rate", "chosen finished", "{:.0%}"),
    ("pairs/rejected_finished_rate", "rejected finished", "{:.0%}"),
    ("lengths/chosen", "len chosen", "{:.0f}"),
    ("lengths/rejected", "len rejected", "{:.0f}"),
    ("pairs/edit_distance", "edit dist", "{:.1f}"),
    ("dpo/loss", "DPO loss", "{:.3f}"),
    ("rewards/margins", "margin", "{:.3f}"),
    ("rewards/accuracies", "reward acc", "{:.2f}"),
    ("improver/changed_rate", "improver changed", "{:.0%}"),
    ("improver/win_rate", "improver win", "{:.0%}"),
    ("improver/win_rate_changed", "improver win (changed)", "{:.0%}"),
    ("improver/win_rate_len20", "improver win ±20% len", "{:.0%}"),
    ("improver/length_change", "improver len change", "{:+.0%}"),
    ("eval/dev/win_rate_vs_start", "vs start", "{:.1%}"),
    ("eval/dev/length", "dev length", "{:.0f}"),
]


def stage_metrics(run_dir: Path) -> list[tuple[str, dict]]:
    """(stage, metrics) in run order: round_0, sft, improver, round_1, ..."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob("*/metrics.json"):
        name = p.parent.name
        order = {"round_0": (0, 0), "sft": (1, 0), "improver": (2, 0)}.get(name)
        if order is None and name.startswith("round_"):
            order = (3, int(name.split("_")[1]))
        if order is not None:
            found.append((order, name, json.loads(p.read_text())))
    return [(n, m) for _, n, m in sorted(found)]


def _fmt(v, f):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    stages = stage_metrics(run_dir)
    lines = [f"# sgpo run report: `{run_dir.name}`", ""]
    summary = run_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        lines += figures_table(s)
        if "eval/dev/win_rate_vs_start" in s:
            lines += [f"**Final model vs start model**, head-to-head on {s['eval/dev/win_rate_vs_start_n']} held-out "
                      f"development prompts: **{100 * s['eval/dev/win_rate_vs_start']:.1f}%** "
                      f"(95% CI {100 * s['eval/dev/win_rate_vs_start_ci_low']:.1f}–"
                      f"{100 * s['eval/dev/win_rate_vs_start_ci_high']:.1f}; ties count half).", ""]
    keys = [k for k in TABLE_KEYS if any(k[0] in m for _, m in stages)]
    lines += ["| stage | " + " | ".join(k[1] for k in keys) + " | time (s) |",
              "|---|" + "---|" * (len(keys) + 1)]
    for name, m in stages:
        t = m.get(f"time/{name}_s")
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k), f) for k, _, f in keys) + f" | {_fmt(t, '{:.0f}')} |")
    lines += ["", "Improver figures are measured on held-out development prompts (round_0 is the zero-shot start "
              "model): *changed* = rewrites that differ from the draft, *win* = the judge prefers the rewrite over "
              "the draft (ties half; 95% CIs in metrics.json), *±20% len* = the win rate among rewrites within 20% "
              "of the draft's length, *len change* = mean relative length change of rewrite vs draft.", ""]
    for png in _plots(run_dir, stages):
        lines += [f"![{png.stem}]({png.name})", ""]
    lines += _samples(run_dir, [n for n, _ in stages if n.startswith("round_") and n != "round_0"])
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def win_cell(s: dict, key: str) -> str:
    if key not in s:
        return "–"
    return (f"{100 * s[key]:.1f}% [{100 * s[key + '_ci_low']:.1f}–{100 * s[key + '_ci_high']:.1f}], "
            f"n={s[key + '_n']}")


def figures_table(s: dict) -> list[str]:
    """The reported figures: final against start and pre-rounds models on the test prompts, per judge."""
    judges = sorted({k.split("/")[2] for k in s if k.startswith("eval/test/") and k.count("/") == 3})
    if not judges:
        return []
    lines = ["## Test split: the final model against the start and pre-rounds models", "",
             "| judge | vs start | vs start, length-matched | vs pre-rounds | vs pre-rounds, length-matched |",
             "|---|---|---|---|---|"]
    for j in judges:
        base = f"eval/test/{j}/win_rate_vs_"
        lines.append(f"| {j} | " + " | ".join(win_cell(s, base + x) for x in (
            "start", "start_length_matched", "pre_rounds", "pre_rounds_length_matched")) + " |")
    lengths = ", ".join(f"{label.replace('_', '-')} {s[f'eval/test/length_{label}']:.0f} words "
                        f"({s[f'eval/test/finished_{label}']:.0%} finished)"
                        for label in ("start", "pre_rounds", "final") if f"eval/test/length_{label}" in s)
    return lines + ["", f"Win rates of the final model, ties half, 95% bootstrap CI over prompts. Mean answer length: "
                        f"{lengths}. Length-matched: answer pairs within ±20% of each other's length.", ""]


def _samples(run_dir: Path, rounds: list[str], per_round: int = 2, chars: int = 300) -> list[str]:
    """A few kept pairs of every round, to read beside the numbers."""
    from sgpo.core.files import read_jsonl

    lines = []
    for name in rounds:
        path = run_dir / name / "pairs.jsonl"
        rows = read_jsonl(path)[:per_round] if path.exists() else []
        for row in rows:
            def cut(t):
                t = t.strip().replace("\n", " / ")
                return t if len(t) <= chars else t[:chars] + " …"
            lines += [f"**{name}**, request: {cut(row['prompt'][-1]['content'])}", "",
                      f"- chosen: {cut(row['chosen'])}", f"- rejected: {cut(row['rejected'])}", ""]
    return (["## Sample pairs", ""] + lines) if lines else []


def _plots(run_dir: Path, stages) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    names = [n for n, _ in stages]
    panels = [("eval/dev/win_rate_vs_start", "win rate vs start (dev)"), ("rewards/margins", "DPO reward margin"),
              ("rewards/accuracies", "DPO reward accuracy"), ("eval/dev/length", "response length (words)"),
              ("improver/changed_rate", "improver: changed"), ("improver/win_rate", "improver: win vs draft"),
              ("pairs/judge_agreement", "2nd judge prefers chosen"),
              ("improver/template_leak_rate", "rewrites leaking the template")]
    panels = [p for p in panels if any(p[0] in m for _, m in stages)]
    if not panels:
        return made
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        xs = [i for i, (_, m) in enumerate(stages) if key in m]
        ys = [stages[i][1][key] for i in xs]
        lo = [stages[i][1].get(key + "_ci_low") for i in xs]
        hi = [stages[i][1].get(key + "_ci_high") for i in xs]
        if all(v is not None for v in lo + hi) and xs:
            err = [[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3)
        else:
            ax.plot(xs, ys, "o-")
        if key.endswith("win_rate") or key.endswith("vs_start") or key.endswith("agreement"):
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    p = run_dir / "metrics.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    return made
