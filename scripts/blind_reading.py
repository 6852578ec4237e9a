"""Read two models' answers blind, then measure how often each judge agrees with the reader.

A judge validated on strong models' answers (``benchmarks/judge_agreement.py``) may not judge a small model's answers
the same way; reading a sample of the pairs it is asked to decide is the check. ``sheet`` draws N prompts, shows the
two answers of each in a random order as "1" and "2" and keeps the order in a separate key; the reader writes one
label per item into ``labels.txt`` (``1``, ``2`` or ``=`` for "no better one", ``#`` starts a comment). ``score``
prints the reader's win rate of model A and, on the items the reader decided, each judge's agreement with the reader
(ties half), beside "the longer answer wins", with 95% bootstrap CIs.

    python scripts/blind_reading.py sheet --prompts decision.jsonl --a A.jsonl --b B.jsonl --n 24 -o DIR
    python scripts/blind_reading.py score DIR [DIR ...] --judge reference --judge lm:sgpo:gemma-3-270m

Answer files are JSON lines with ``id`` and ``text`` (``sgpo eval``'s generation files) or ``output``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from sgpo.data.records import load_records
from sgpo.eval.winrate import format_win_rate, win_rate
from sgpo.core.files import atomic_write_json, atomic_write_text, read_jsonl, write_jsonl

LABELS = {"1": 0, "2": 1, "=": None}  # which shown answer the reader preferred (index into the shown order)


def read_answers(path: str) -> dict[str, str]:
    return {str(r["id"]): r["text"] if "text" in r else r["output"] for r in read_jsonl(Path(path))}


def digest(*texts: str) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def write_sheet(prompts: str, a_path: str, b_path: str, n: int, seed: int, out: Path) -> int:
    """``sheet.md`` (what the reader sees), ``key.jsonl`` (the hidden order) and an empty ``labels.txt``."""
    records, _ = load_records(prompts)
    a, b = read_answers(a_path), read_answers(b_path)
    both = [r for r in records if r.id in a and r.id in b]
    rng = random.Random(seed)
    chosen = rng.sample(both, min(n, len(both)))
    out.mkdir(parents=True, exist_ok=True)
    sheet, key = [], []
    for k, r in enumerate(chosen, 1):
        a_first = rng.random() < 0.5
        shown = (a[r.id], b[r.id]) if a_first else (b[r.id], a[r.id])
        sheet.append(f"## {k}\n\n**Request**\n\n{r.prompt_text}\n\n**Answer 1**\n\n{shown[0]}\n\n"
                     f"**Answer 2**\n\n{shown[1]}\n")
        key.append({"item": k, "id": r.id, "a_first": a_first, "digest": digest(r.prompt_text, a[r.id], b[r.id])})
    atomic_write_text(out / "sheet.md", "\n---\n\n".join(sheet))
    write_jsonl(out / "key.jsonl", key)
    atomic_write_text(out / "labels.txt", "".join(f"? # item {x['item']}\n" for x in key))
    atomic_write_json(out / "sheet.json", {"prompts": prompts, "a": a_path, "b": b_path, "n": len(key), "seed": seed})
    return len(key)


def read_labels(path: Path, n: int) -> list[int | None]:
    """Per item, which shown answer the reader preferred: 0 (answer 1), 1 (answer 2) or None (no better one)."""
    labels = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    labels = [x for x in labels if x]
    if len(labels) != n:
        raise SystemExit(f"{path}: {len(labels)} labels for {n} items")
    for i, x in enumerate(labels, 1):
        if x not in LABELS:
            raise SystemExit(f"{path}: item {i}: label {x!r} is not 1, 2 or =")
    return [LABELS[x] for x in labels]


def reader_verdicts(folder: Path) -> tuple[list[dict], list[float | None]]:
    """The key rows and, per item, 1.0 when the reader preferred model A's answer, 0.0 for B's, None for no choice."""
    key = read_jsonl(folder / "key.jsonl")
    shown = read_labels(folder / "labels.txt", len(key))
    verdicts = [None if s is None else float((s == 0) == k["a_first"]) for s, k in zip(shown, key)]
    return key, verdicts


def read_sheet(folder: Path) -> tuple[list[float | None], list[tuple[str, str, str, str | None, float]]]:
    """The reader's verdicts of one sheet, and its decided items as (request, A, B, reference, verdict)."""
    meta = json.loads((folder / "sheet.json").read_text())
    key, verdicts = reader_verdicts(folder)
    records = {r.id: r for r in load_records(meta["prompts"])[0]}
    a, b = read_answers(meta["a"]), read_answers(meta["b"])
    for k in key:
        if digest(records[k["id"]].prompt_text, a[k["id"]], b[k["id"]]) != k["digest"]:
            raise SystemExit(f"{folder}: item {k['item']}: the answers changed since the sheet was written")
    decided = [(records[k["id"]].prompt_text, a[k["id"]], b[k["id"]], records[k["id"]].reference, v)
               for k, v in zip(key, verdicts) if v is not None]
    return verdicts, decided


def score(folders: list[Path], judges: list[str]) -> dict:
    """The reader's win rate of A, and each judge's (and length-only) agreement with the reader's decided items,
    over one sheet or several pooled."""
    verdicts, decided = [], []
    for folder in folders:
        v, d = read_sheet(folder)
        verdicts, decided = verdicts + v, decided + d
    res = {"reader": win_rate([0.5 if v is None else v for v in verdicts]), "decided": len(decided)}
    request, a, b, refs, v = (list(x) for x in zip(*decided)) if decided else ([],) * 5
    res["length"] = win_rate([float((len(x) > len(y)) == (z == 1.0)) for x, y, z in zip(a, b, v)])
    for spec in judges:
        from sgpo.eval.judges import judge_for_one_use

        with judge_for_one_use(spec) as judge:  # verdicts cached by content, the judge's model freed afterwards
            prefs = judge.prefer(request, a, b, refs if all(refs) else None)
        res[spec] = win_rate([p if x == 1.0 else 1 - p for p, x in zip(prefs, v)])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("--prompts", required=True)
    s.add_argument("--a", required=True, help="model A's answers")
    s.add_argument("--b", required=True, help="model B's answers")
    s.add_argument("--n", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    c = sub.add_parser("score")
    c.add_argument("folders", nargs="+", help="one sheet, or several to pool")
    c.add_argument("--judge", action="append", default=[])
    args = ap.parse_args()
    if args.command == "sheet":
        n = write_sheet(args.prompts, args.a, args.b, args.n, args.seed, Path(args.output))
        print(f"{n} items -> {args.output}/sheet.md; write one label per item into {args.output}/labels.txt")
        return
    res = score([Path(f) for f in args.folders], args.judge)
    print(f"reader: A preferred {format_win_rate(res['reader'])} (ties half); {res['decided']} items decided")
    for name, w in res.items():
        if name not in ("reader", "decided"):
            print(f"agreement with the reader, {name}: {format_win_rate(w)}")


if __name__ == "__main__":
    main()
