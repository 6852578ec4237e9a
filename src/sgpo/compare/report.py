"""What ``sgpo compare`` writes: ``comparison.md`` (one row per method and seed, the seed spread under it),
``comparison.png`` (one bar per run per judge with its 95% CI) and ``rounds.png`` (per-round curves of the methods
with rounds)."""
from __future__ import annotations

import math
from pathlib import Path

from sgpo.compare.paired import paired_lines, run_dir_of
from sgpo.core.files import atomic_write_text
from sgpo.eval.winrate import format_difference

ROUND_CURVES = (("eval/dev/win_rate_vs_start", "dev win rate vs start"), ("rewards/margins", "DPO reward margin"),
                ("pairs/judge_agreement", "2nd judge prefers chosen"))


def pct(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def rate_cell(score, low, high, n=None) -> str:
    """``x% [low–high]`` (and ``, n=N`` when given)."""
    if score is None:
        return "–"
    return f"{pct(score)}% [{pct(low)}–{pct(high)}]" + (f", n={n}" if n is not None else "")


def judge_names(state: dict, runs) -> list[str]:
    """The judges of the ``test`` figures, the run's main judge (``reference`` when present) first."""
    names: list[str] = []
    for key in runs:
        for name in state["runs"].get(key, {}).get("eval", {}).get("test", {}).get("judges", {}):
            if name not in names:
                names.append(name)
    return sorted(names, key=lambda n: (n != "reference", names.index(n)))


def bench_cells(bench: str, r: dict | None, judges: list[str]) -> list[tuple[str, str]]:
    """(header, cell) of one benchmark's figures for one run."""
    if bench == "test":
        out = []
        for j in judges:
            f = (r or {}).get("judges", {}).get(j)
            out += [(f"{j}: vs start", rate_cell(f["score"], f["ci_low"], f["ci_high"]) if f else "–"),
                    (f"{j}: length-matched", rate_cell(f["lc"], f["lc_ci_low"], f["lc_ci_high"], f["lc_n"])
                     if f and f.get("lc") is not None else "–")]
            out += scorer_cells(j, f)
        return out + [("length (words)", f"{r['length']:.0f}" if r and r.get("length") is not None else "–"),
                      ("finished", f"{pct(r.get('finished'), 0)}%" if r else "–")]
    if bench == "ifeval":
        out = []
        for level, prefix in (("prompt", ""), ("instruction", "instruction_")):
            for mode in ("strict", "loose"):
                head = f"IFEval {level} {mode} (Δ vs start)"
                d = (r or {}).get(f"{prefix}{mode}_diff")  # older comparisons lack the instruction level
                out.append((head, f"{pct(r[prefix + mode])}% ({format_difference(d)})" if d else "–"))
        return out
    return [(f"{bench}: vs start", rate_cell(r["score"], r["ci_low"], r["ci_high"], r["n"]) if r else "–")]


def scorer_cells(judge: str, f: dict | None) -> list[tuple[str, str]]:
    """A scorer judge's own figures of the final model: its mean score, the share of answers scored 1 and, on rows
    with verifiable constraints, the score weighted by their number (for ``ifeval``: the mean share of its
    constraints an answer meets, prompt-level and constraint-level accuracy)."""
    if not f or "score_final" not in f:
        return []
    cell = lambda x: rate_cell(x["score"], x["ci_low"], x["ci_high"]) if x else "–"  # noqa: E731
    out = [(f"{judge}: mean score", cell(f["score_final"])), (f"{judge}: all met", cell(f.get("perfect_final")))]
    return out + ([(f"{judge}: constraints met", cell(f["constraints_final"]))] if "constraints_final" in f else [])


def run_row(entry: dict, benches, judges) -> tuple[list[str], list[str]]:
    """Headers and cells of one run's row."""
    cells = [("method", entry.get("method", "?")), ("seed", str(entry.get("seed", "?")))]
    for b in benches:
        cells += bench_cells(b, entry.get("eval", {}).get(b), judges)
    status = entry.get("status", "not run")
    if status == "failed":
        status = "failed: " + entry.get("error", "").replace("|", "\\|")
    cells += [("DPO steps", str(entry.get("dpo_steps", "–"))), ("pairs", str(entry.get("pairs", "–"))),
              ("generated tokens", f"{entry['generated_tokens']:,}" if "generated_tokens" in entry else "–"),
              ("wall time (min)", f"{entry['time_s'] / 60:.1f}" if "time_s" in entry else "–"), ("status", status)]
    return [h for h, _ in cells], [c for _, c in cells]


def seed_spread(state: dict, plan, judges) -> list[str]:
    """Per method with several finished seeds: each judge's mean test win rate vs start and its spread."""
    lines = []
    for m in dict.fromkeys(m for m, _ in plan.runs()):
        for j in judges:
            tests = [state["runs"].get(f"{m}@{s}", {}).get("eval", {}).get("test", {}) for mm, s in plan.runs()
                     if mm == m]
            xs = [t["judges"][j]["score"] for t in tests if j in t.get("judges", {})]
            if len(xs) >= 2:
                lines.append(f"- {m}, {j}: mean {pct(sum(xs) / len(xs))}% over {len(xs)} seeds, spread "
                             f"{100 * (max(xs) - min(xs)):.1f} points (max − min)")
    return lines


def write_comparison(out: Path, state: dict, plan) -> Path:
    """``comparison.md`` and the charts from the comparison state."""
    keys = [f"{m}@{s}" for m, s in plan.runs()]
    judges = judge_names(state, keys)
    rows = [run_row(state["runs"].get(k, {"method": k.split("@")[0], "seed": k.split("@")[1]}), plan.benchmarks,
                    judges) for k in keys]
    head = rows[0][0]
    lines = ["# Method comparison", "",
             f"Every run starts from `{_start_model(out, keys)}` with the same splits, prompts, references, rounds "
             "and DPO settings; only the method and the seed differ. Win rates: the final model against the start "
             "model on the same prompts, ties half, 95% bootstrap CIs over prompts.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in rows]
    spread = seed_spread(state, plan, judges)
    if spread:
        lines += ["", "Seed spread (read beside the CIs):", *spread]
    paired = paired_lines({k: v for k, v in (state.get("paired") or {}).items() if k in keys}, "sgpo", judges)
    if paired:
        lines += ["", "SGPO against each method of the same seed, paired over the test prompts and the same start "
                  "answers: SGPO's win rate vs start minus the method's, in points, with the paired bootstrap 95% CI "
                  "(a CI that excludes 0 is a difference this n resolves):", *paired]
    lines += ["", *legend(plan.benchmarks, state)]
    for n in state.get("notes", []):
        lines += ["", f"**{n}**"]
    for png in (bars_chart(out, state, keys, judges), rounds_chart(out, keys)):
        if png:
            lines += ["", f"![{png.stem}]({png.name})"]
    path = out / "comparison.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def legend(benches, state) -> list[str]:
    text = ["*DPO steps*: optimizer steps per process (SynPO re-trains on the pairs of earlier rounds, so its pairs and "
            "steps grow with the rounds); *pairs*: preference pairs trained on, summed over rounds; *generated "
            "tokens*: tokens sampled for training (drafts, rewrites, offline rejected sides), not for the figures; "
            "*wall time*: the sum of the run's stage times, evaluation stages included."]
    if "test" in benches:
        text.append("*test*: the run's test split (never trained or tuned on), answered by the start and the final "
                    "model with the same per-prompt seeds; *length-matched*: among answer pairs within ±20% of each "
                    "other's length in words.")
    if "ifeval" in benches:
        lim = state.get("limit")
        n = f"the first {lim}" if lim else "all 541"
        text.append(f"*IFEval*: prompt-level and instruction-level accuracy on {n} prompts, 256 new tokens, greedy; "
                    "Δ: final − start in points with the paired bootstrap 95% CI.")
    return text


def _start_model(out: Path, keys) -> str:
    import yaml

    for k in keys:
        m, s = k.split("@")
        p = run_dir_of(out, m, int(s)) / "config.yaml"
        if p.exists():
            return (yaml.safe_load(p.read_text()) or {}).get("model", {}).get("name", "?")
    return "?"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars_chart(out: Path, state: dict, keys, judges) -> Path | None:
    """One bar per run per judge: the test win rate vs start with its 95% CI."""
    if not judges:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(keys) * len(judges), 3.6))
    width = 0.8 / len(judges)
    for j, name in enumerate(judges):
        xs, ys, err = [], [], [[], []]
        for i, k in enumerate(keys):
            f = state["runs"].get(k, {}).get("eval", {}).get("test", {}).get("judges", {}).get(name)
            if f:
                xs.append(i + (j - (len(judges) - 1) / 2) * width)
                ys.append(100 * f["score"])
                err[0].append(100 * (f["score"] - f["ci_low"]))
                err[1].append(100 * (f["ci_high"] - f["score"]))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)), [k.replace("@", "\nseed ") for k in keys], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test win rate vs start (%)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rounds_chart(out: Path, keys) -> Path | None:
    """Per-round curves of the runs with rounds: dev win rate vs start, reward margin, pair judge agreement."""
    from sgpo.run.report import stage_metrics

    curves = {}
    for k in keys:
        m, s = k.split("@")
        rounds = [(int(n.split("_")[1]), x) for n, x in stage_metrics(run_dir_of(out, m, int(s)))
                  if n.startswith("round_") and n != "round_0"]
        if rounds:
            curves[k] = rounds
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(ROUND_CURVES), figsize=(4 * len(ROUND_CURVES), 3.2))
    for ax, (key, title) in zip(axes, ROUND_CURVES):
        for k, rounds in curves.items():
            pts = [(t, x[key]) for t, x in rounds if key in x]
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=k.replace("@", " seed "))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
    drawn = [ax for ax in axes if ax.get_lines()]
    if drawn:
        drawn[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
