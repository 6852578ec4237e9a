"""scripts/decision_prompts.py: development prompts plus unused pool prompts, never a test prompt or one a stage uses."""
import json
import subprocess
import sys
from pathlib import Path

from sgpo.config import schema as config
from sgpo.models.loading import load_tokenizer, resolve
from sgpo.data.splits import prepare_splits

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def test_decision_prompts_avoid_the_test_split_and_every_stage(tmp_path):
    out = tmp_path / "decision.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "decision_prompts.py"), str(out), "--config", str(SMOKE),
                    "--n", "30"], check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cfg = config.load(SMOKE)
    s = prepare_splits(cfg, load_tokenizer(resolve(cfg.model.name)))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 30
    assert ids[:len(s.dev)] == [r.id for r in s.dev]
    assert not set(ids) & ({r.id for r in s.test} | {r.id for r in s.seen(True)})
    assert all(r["prompt"] and r["response"] for r in rows)
