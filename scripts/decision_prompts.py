"""Write the decision prompts of a config: its development prompts and the training-pool prompts no stage uses (after
the improver, round and SFT slices), up to N in all — never a test prompt. Alternatives to a default are compared on
these (``sgpo eval --model RUN/final --versus ... --prompts FILE --judge ...``), so that the test split stays for
reporting only.

    python scripts/decision_prompts.py decision.jsonl [--config CONFIG] [--n 200] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json

from sgpo.config import schema as config
from sgpo.models.loading import load_tokenizer, resolve
from sgpo.data.splits import prepare_splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--config")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = config.load(args.config, args.set)
    s = prepare_splits(cfg, load_tokenizer(resolve(cfg.model.name)))
    used = {r.id for r in s.seen(True)} | {r.id for r in s.test}
    unused = [r for r in s.train if r.id not in used]
    chosen = (s.dev + unused)[:args.n]
    with open(args.output, "w") as f:
        for r in chosen:
            f.write(json.dumps({"id": r.id, "prompt": r.prompt_text, "response": r.reference}) + "\n")
    print(f"{len(chosen)} decision prompts ({len(s.dev)} development, {len(chosen) - len(s.dev)} of the "
          f"{len(unused)} unused pool prompts) -> {args.output}")


if __name__ == "__main__":
    main()
