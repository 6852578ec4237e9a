"""The final model's card (``RUN/final/README.md``, a Hugging Face model card) and ``sgpo push``.

The card says what the model is: base model, method, the recipe's key settings, the data, the pairs of every round
and the reported figures with their CIs, all read from the run directory (``config.yaml``, ``summary.json``, the
stages' ``metrics.json``). Its YAML header is ``huggingface_hub``'s ``ModelCardData``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sgpo.run.report import stage_metrics, figures_table, win_cell

# embedded names and the hub ids of what they hold
HUB_MODELS = {"sgpo:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_DATASETS = {"sgpo:alpaca-eval": "tatsu-lab/alpaca_eval"}
METHODS = {
    "sgpo": "Self-Generated Preference Optimization (SGPO, arXiv 2507.20181): the model is both the policy and a "
            "self-improver; each round the improver rewrites the policy's own answers a step towards the SFT "
            "references, and DPO trains on the (rewrite, original) pairs.",
    "spin": "SPIN (arXiv 2401.01335): each round DPO prefers the SFT reference over the policy's own answer.",
    "synpo": "SynPO (arXiv 2410.06961): a separately trained refiner improves the policy's answers; DPO on "
             "(refined, original) pairs, accumulated over rounds.",
    "dpo": "DPO on an offline preference set.",
    "sft": "Supervised fine-tuning on the references.",
}
SETTINGS = ["method", "rounds", "sft", "seed", "model.lora_r", "dpo.loss", "dpo.beta", "dpo.lr", "dpo.reference",
            "train.lr", "improver.target", "improver.step", "improver.sees_reference", "pairs.require_finished",
            "generation.max_new_tokens", "generation.temperature", "data.sft", "data.prompts", "data.test_size",
            "eval.judge", "eval.second_judge"]


class PushError(Exception):
    """``sgpo push`` cannot upload; the message says why in one line."""


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _hub_id(name, known: dict) -> str | None:
    """The hub id of a model or dataset name: embedded names mapped, ``owner/name`` that is not a local path kept."""
    if not name:
        return None
    name = str(name)
    if name in known:
        return known[name]
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def _header(cfg: dict):
    from huggingface_hub import ModelCardData

    datasets = sorted({d for d in (_hub_id(_get(cfg, k), HUB_DATASETS) for k in ("data.sft", "data.prompts")) if d})
    return ModelCardData(base_model=_hub_id(_get(cfg, "model.name"), HUB_MODELS), library_name="transformers",
                         pipeline_tag="text-generation", datasets=datasets or None,
                         tags=list(dict.fromkeys(["sgpo", cfg.get("method", "sgpo"), "preference-optimization"])))


def _pairs_table(stages: list[tuple[str, dict]]) -> list[str]:
    rounds = [(n, m) for n, m in stages if n.startswith("round_") and n != "round_0" and "pairs/kept" in m]
    if not rounds:
        return []
    lines = ["## Pairs per round", "", "| round | candidates | kept | dropped | second judge prefers chosen | "
             "DPO steps | reward margin |", "|---|---|---|---|---|---|---|"]
    for name, m in rounds:
        dropped = ", ".join(f"{k.split('/')[-1]} {v}" for k, v in m.items() if k.startswith("pairs/dropped/") and v)
        lines.append(f"| {name.split('_')[1]} | {m.get('pairs/candidates', '–')} | {m['pairs/kept']} | "
                     f"{dropped or 'none'} | {win_cell(m, 'pairs/judge_agreement')} | {m.get('dpo/steps', 0)} | "
                     f"{m.get('rewards/margins', float('nan')):.3f} |")
    return lines + [""]


def card_text(run_dir: str | Path) -> str:
    """The model card of the run in ``run_dir`` (its YAML header and body)."""
    import yaml

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    method = cfg.get("method", "sgpo")
    lines = [f"# {run_dir.name}: {method.upper()} on {_get(cfg, 'model.name')}", "", METHODS.get(method, ""), "",
             "Trained with sgpo; the run directory that holds this model keeps the full config (`config.yaml`), "
             "every round's pairs and the report.", "", "## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | `{_get(cfg, k)}` |" for k in SETTINGS if _get(cfg, k) not in (None, "")]
    lines += [""] + _pairs_table(stage_metrics(run_dir))
    table = figures_table(summary)
    lines += table or ["## Results", "", "No test-split figures were computed for this run.", ""]
    if table:
        lines += [f"Test prompts: the {_get(cfg, 'data.test_size')} held out of `{_get(cfg, 'data.sft')}` by a fixed "
                  "seeded split (`data.split_seed`), never trained or tuned on.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(REPO_ID_OR_PATH)",
              "model = AutoModelForCausalLM.from_pretrained(REPO_ID_OR_PATH)", "```",
              ""]
    return f"---\n{_header(cfg).to_yaml()}\n---\n\n" + "\n".join(lines)


def write_card(run_dir: str | Path) -> Path:
    """Write ``final/README.md`` (the run must have its ``final/`` model)."""
    from huggingface_hub import ModelCard

    out = Path(run_dir) / "final" / "README.md"
    ModelCard(card_text(run_dir)).save(out)
    return out


def push(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload ``RUN/final`` (model, tokenizer, card) to the hub repository ``repo_id``; returns its URL."""
    final = Path(run_dir) / "final"
    if not (final / "config.json").exists():
        raise PushError(f"{final}: no final model here (is {run_dir} a finished run?)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PushError("cannot push: the hub is offline (HF_HUB_OFFLINE=1); unset it to upload")
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise PushError("cannot push: not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)")
    if not (final / "README.md").exists():
        write_card(run_dir)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(final), repo_id=repo_id, commit_message="Upload sgpo run")
    except Exception as e:  # network, authorisation, a repository name the hub refuses
        raise PushError(f"cannot push to {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return str(getattr(commit, "repo_url", f"https://huggingface.co/{repo_id}"))
