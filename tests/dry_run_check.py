"""The dry run of a finished run's config against what the run did, stage by stage."""
import json
from pathlib import Path

from sgpo.config import schema as config
from sgpo.run.dry_run import dry_run
from sgpo.core.files import read_jsonl

NOT_GENERATED = ("examples", "pairs", "candidates", "pair_stats", "preference")


def assert_dry_run_matches(run: Path, pairs_exact: bool = False) -> dict:
    """Generations (the rows of every generation shard), SFT examples and steps exactly; pairs, DPO steps and improver
    examples and steps as upper bounds (``pairs_exact``: equal, when no pair was filtered). Returns the dry run."""
    d = dry_run(config.load(run / "config.yaml"))
    rows = {r["stage"]: r for r in d["stages"]}
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert list(rows) == list(manifest)
    for name, row in rows.items():
        if name == "final":
            assert row["checkpoints"] == 1
            continue
        m = json.loads((run / name / "metrics.json").read_text())
        made = sum(len(read_jsonl(f)) for f in (run / name).glob("*.jsonl") if f.stem not in NOT_GENERATED)
        assert row["generations"] == made, (name, row, made)
        if name == "sft":
            assert (m["nll/examples"], m["nll/steps"]) == (row["nll_examples"], row["nll_steps"])
        elif "nll/examples" in m:
            assert m["nll/examples"] <= row["nll_examples"] and m["nll/steps"] <= row["nll_steps"], name
        if name.startswith("round_") and name != "round_0":
            done = (m.get("pairs/kept", 0), m.get("dpo/steps", 0))
            assert done[0] <= row["pairs"] and done[1] <= row["dpo_steps"], name
            assert not pairs_exact or done == (row["pairs"], row["dpo_steps"]), name
    return d
