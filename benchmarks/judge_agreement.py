"""How often does a local judge agree with GPT-4 Turbo? Decisive cross-model pairs from AlpacaEval 2.0 annotations.

A pair is one instruction and the outputs of two models where GPT-4 Turbo (the ``weighted_alpaca_eval_gpt4_turbo``
annotator) preferred one model's output to the GPT-4 Turbo baseline (preference > 1.5) and the other's not
(preference < 1.5): the first output is taken as the better one. Which one is shown as A is drawn at random.

Sampling (fixed by ``--seed``): the instructions are shuffled and split in two halves, TUNING and HELD-OUT (no
instruction is in both). Within a half two strata are drawn, each with at most one pair per instruction, chosen
uniformly among that instruction's candidates:

* ``all``      any decisive pair (``--pairs`` per half);
* ``matched``  length-matched pairs only (``--matched-pairs`` per half): character lengths (of the full outputs)
               within ``--tolerance`` (10%) of the longer one, |len(a) - len(b)| <= 0.1 * max(len(a), len(b)).

Length-matched pairs are about 6% of decisive pairs, hence their own stratum. For each judge and stratum the table
gives n, the agreement (a tie counts 1/2) and its 95% percentile bootstrap interval (``--bootstrap`` resamples of the
pairs), beside the length-only baseline ("the longer output wins"). Judges are ``make_judge`` specs (the
``reference`` judge gets the baseline GPT-4 Turbo output as its reference) or ``length``. Prints the table and
writes one JSON (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/judge_agreement.py --half tuning --pairs 24 --matched-pairs 48 \\
        --judges length,reference,lm-pmi:sgpo:gemma-3-270m,lm-fluency:sgpo:gemma-3-270m,hf:sgpo:gemma-3-270m

Measured (seed 0, 1 thread; agreement % [95% CI]; "matched" = length-matched stratum). Chosen on TUNING:
``lm-surprisal`` (the ``lm:`` default). Every other Gemma-3-270M score agreed *less* often than chance on matched pairs
(fluency 16.7, mix 16.7, pmi 39.6, pmi-sum 39.6, label-token ``hf:`` 54.2 [39.6, 68.8]); surprisal is fluency's
opposite. HELD-OUT, frozen (its held-out numbers are the fluency run's preferences reversed; the frozen judge
reproduced them pair for pair on a 24-pair prefix):

    judge                        tuning all (24)    tuning matched (48)   held-out all (24)   held-out matched (80)
    length only (longer wins)    89.6 [77.1, 100]   57.3 [43.8, 69.8]     83.3 [66.7, 95.8]   53.8 [42.5, 65.0]
    reference (MiniLM, baseline) 77.1 [60.4, 91.7]  61.5 [47.9, 75.0]     45.8 [25.0, 66.7]   60.0 [50.0, 70.0]
    lm:sgpo:gemma-3-270m         79.2 [62.5, 91.7]  83.3 [72.9, 93.8]     75.0 [58.3, 91.7]   67.5 [56.2, 77.5]

Caveat: on held-out matched pairs with no FuseChat model in them, surprisal agrees 50.0% (n = 24): much of its signal
may be a style difference between model families rather than quality.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from _common import REPO, process_peak_rss_bytes, setup_env

DEFAULT_DIR = REPO.parent / "shared" / "data" / "alpaca_eval"


@dataclass(frozen=True)
class Pair:
    index: int          # instruction index
    instruction: str
    a: str
    b: str
    label: int          # 1: a is the better output (GPT-4 Turbo's call), 0: b is
    model_a: str
    model_b: str
    reference: str      # the GPT-4 Turbo baseline output for this instruction
    matched: bool


def load_annotations(directory: str | Path) -> dict[str, list[dict]]:
    """``{model: records}`` from every ``<model>.annotations.json`` (record i = instruction i)."""
    files = sorted(Path(directory).glob("*.annotations.json"))
    if not files:
        raise FileNotFoundError(f"no *.annotations.json in {directory}")
    return {f.name[:-len(".annotations.json")]: json.loads(f.read_text(encoding="utf-8")) for f in files}


def length_matched(x: str, y: str, tolerance: float = 0.1) -> bool:
    return abs(len(x) - len(y)) <= tolerance * max(len(x), len(y), 1)


def candidates(annotations: dict[str, list[dict]], index: int) -> list[tuple[str, str]]:
    """(winner, loser) model pairs for one instruction: the winner beat the baseline, the loser lost to it."""
    def pref(m):
        p = annotations[m][index]["preference"]
        return 1.5 if p == 0 else p  # legacy 0 is a draw
    winners = [m for m in sorted(annotations) if pref(m) > 1.5]
    losers = [m for m in sorted(annotations) if pref(m) < 1.5]
    return [(w, l) for w in winners for l in losers]


def make_pair(annotations, index: int, winner: str, loser: str, rng: random.Random, tolerance: float) -> Pair:
    rec_w, rec_l = annotations[winner][index], annotations[loser][index]
    swap = rng.random() < 0.5
    (ma, ra), (mb, rb) = ((loser, rec_l), (winner, rec_w)) if swap else ((winner, rec_w), (loser, rec_l))
    return Pair(index, rec_w["instruction"], ra["output_2"], rb["output_2"], 0 if swap else 1, ma, mb,
                rec_w["output_1"], length_matched(ra["output_2"], rb["output_2"], tolerance))


def build_pairs(annotations, *, seed: int = 0, n_all: int = 100, n_matched: int = 100,
                tolerance: float = 0.1) -> dict[str, dict[str, list[Pair]]]:
    """``{half: {stratum: pairs}}`` for halves ``tuning`` / ``heldout`` and strata ``all`` / ``matched``."""
    rng = random.Random(seed)
    n_inst = min(len(recs) for recs in annotations.values())
    order = list(range(n_inst))
    rng.shuffle(order)
    halves = {"tuning": order[0::2], "heldout": order[1::2]}
    out: dict[str, dict[str, list[Pair]]] = {}
    for half, indices in halves.items():
        strata: dict[str, list[Pair]] = {"all": [], "matched": []}
        for index in indices:
            cands = candidates(annotations, index)
            for stratum, limit in (("all", n_all), ("matched", n_matched)):
                pool = cands if stratum == "all" else [
                    (w, l) for w, l in cands
                    if length_matched(annotations[w][index]["output_2"], annotations[l][index]["output_2"],
                                      tolerance)]
                if pool and len(strata[stratum]) < limit:
                    # one generator per (stratum, instruction): a larger sample extends a smaller one
                    pick = random.Random(f"{seed}:{stratum}:{index}")
                    w, l = pool[pick.randrange(len(pool))]
                    strata[stratum].append(make_pair(annotations, index, w, l, pick, tolerance))
        out[half] = strata
    return out


def credits(preferences, labels) -> list[float]:
    """1 when the judge picks GPT-4 Turbo's choice, 0 when it picks the other, 1/2 for a tie (0.5)."""
    out = []
    for p, y in zip(preferences, labels):
        if math.isnan(p) or abs(p - 0.5) < 1e-9:  # NaN (a failed annotation) counts as a tie
            out.append(0.5)
        else:
            out.append(1.0 if (p > 0.5) == (y == 1) else 0.0)
    return out


def bootstrap_ci(values, *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def summarise(values, resamples: int = 2000, seed: int = 0) -> dict:
    lo, hi = bootstrap_ci(values, resamples=resamples, seed=seed)
    return {"n": len(values), "agreement": sum(values) / len(values) if values else float("nan"),
            "ci95": [lo, hi]}


def length_preferences(pairs) -> list[float]:
    return [1.0 if len(p.a) > len(p.b) else 0.0 if len(p.a) < len(p.b) else 0.5 for p in pairs]


def judge_preferences(judge, pairs, batch: int = 8, log=None) -> tuple[list[float], float]:
    """The judge's preferences on ``pairs`` (in batches, with progress) and the seconds it took."""
    log = log or (lambda msg: print(msg, flush=True))
    out: list[float] = []
    t0 = time.perf_counter()
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        out.extend(judge.prefer([p.instruction for p in chunk], [p.a for p in chunk], [p.b for p in chunk],
                                [p.reference for p in chunk]))
        log(f"  {judge.spec}: {len(out)}/{len(pairs)} pairs, {time.perf_counter() - t0:.0f} s")
    return out, time.perf_counter() - t0


def evaluate(spec: str, strata: dict[str, list[Pair]], resamples: int, judge_kwargs: dict) -> dict:
    """One judge on both strata of one half: n, agreement, CI per stratum, seconds per pair."""
    from sgpo.eval.judges import make_judge

    result: dict = {"judge": spec}
    judge = None if spec == "length" else make_judge(spec, **judge_kwargs.get(spec.partition(":")[0], {}))
    for stratum, pairs in strata.items():
        if judge is None:
            prefs, seconds = length_preferences(pairs), 0.0
        else:
            prefs, seconds = judge_preferences(judge, pairs)
        result[stratum] = summarise(credits(prefs, [p.label for p in pairs]), resamples)
        result[stratum]["seconds_per_pair"] = seconds / max(len(pairs), 1)
        result[stratum]["preferences"] = prefs
    return result


def table(half: str, rows: list[dict]) -> str:
    def cell(s):
        return f"{s['n']:>4} {100 * s['agreement']:5.1f}% [{100 * s['ci95'][0]:5.1f}, {100 * s['ci95'][1]:5.1f}]"
    header = (f"{'judge':<34} {'all pairs: n, agreement, 95% CI':<32} {'length-matched: n, agreement, 95% CI':<36} "
              "s/pair")
    lines = [f"{half.upper()} half", header]
    for r in rows:
        seconds = sum(r[s]["seconds_per_pair"] * r[s]["n"] for s in ("all", "matched"))
        per_pair = seconds / max(r["all"]["n"] + r["matched"]["n"], 1)
        lines.append(f"{r['judge']:<34} {cell(r['all']):<32} {cell(r['matched']):<36} {per_pair:.2f}")
    return "\n".join(lines)


def pair_record(p: Pair) -> dict:
    """What the JSON keeps of a pair: no texts (the annotations' licence), enough to find them again."""
    return {"index": p.index, "model_a": p.model_a, "model_b": p.model_b, "label": p.label, "matched": p.matched,
            "len_a": len(p.a), "len_b": len(p.b)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--annotations-dir", default=str(DEFAULT_DIR))
    ap.add_argument("--pairs", type=int, default=100, help="pairs per half in the 'all' stratum")
    ap.add_argument("--matched-pairs", type=int, default=100, help="pairs per half in the length-matched stratum")
    ap.add_argument("--tolerance", type=float, default=0.1, help="length-matched: |la - lb| <= tol * max(la, lb)")
    ap.add_argument("--judges", default="length,reference", help="comma-separated: length or make_judge specs")
    ap.add_argument("--half", choices=("tuning", "heldout", "both"), default="tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON path (default: judge_agreement_<half>.json here)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_env()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sample = build_pairs(load_annotations(args.annotations_dir), seed=args.seed, n_all=args.pairs,
                         n_matched=args.matched_pairs, tolerance=args.tolerance)
    kwargs = {"hf": {"device": args.device, "dtype": "float32"}, "reward": {"device": args.device},
              "reference": {"device": args.device}}
    kwargs.update({k: kwargs["hf"] for k in ("lm", "lm-fluency", "lm-pmi", "lm-pmi-sum", "lm-mix")})
    halves = ("tuning", "heldout") if args.half == "both" else (args.half,)
    report: dict = {"config": vars(args), "halves": {}}
    for half in halves:
        rows = [evaluate(spec, sample[half], args.bootstrap, kwargs) for spec in args.judges.split(",") if spec]
        pairs = {stratum: [pair_record(p) for p in ps] for stratum, ps in sample[half].items()}
        report["halves"][half] = {"rows": rows, "pairs": pairs}
        print(table(half, rows))
    report["peak_rss_gb"] = process_peak_rss_bytes() / 1e9
    print(f"peak RSS {report['peak_rss_gb']:.2f} GB")
    out = Path(args.out or f"judge_agreement_{args.half}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
