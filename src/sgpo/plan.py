"""The plan of a run, computed from its config alone (no model, no tokenizer): what ``--dry-run`` prints.

Per stage: prompts, generations, supervised (NLL) examples and steps, DPO pairs and steps, the reference model.
Counts are upper bounds where filtering decides (pairs dropped as degenerate, prompts skipped as too long). The
training pool is counted when the SFT data is local or embedded; a hub dataset is not downloaded for a plan.
"""
from __future__ import annotations

import math
from pathlib import Path

from .config import Config
from .methods import get_method


def pool_size(cfg: Config) -> int | None:
    """Prompts in the SFT data (before long-prompt filtering), or None when counting would need a download."""
    src = cfg.data.sft
    if not (src.startswith("sgpo:") or Path(src).exists()):
        return None
    from .data import load_records

    records, _ = load_records(src, split=cfg.data.split, on_error=cfg.data.on_error, need="reference")
    return len(records)


def _cap(n: int, pool: int | None) -> int:
    return n if pool is None else min(n, pool)


def _dev_generations(cfg: Config, dev: int) -> int:
    n = min(max(cfg.eval.head_to_head_size, cfg.eval.improver_size), dev)
    return n + min(cfg.eval.improver_size, n) if n else 0


def _sft_stage(cfg: Config, method, train: int | None, dev_gen: int) -> dict:
    n_sft = cfg.data.sft_size if cfg.sft else 0
    if not method.has_rounds:  # SFT alone trains on the prompts the other methods see (Splits.seen)
        n_sft += cfg.data.improver_size + cfg.rounds * cfg.data.round_size
    n_sft = _cap(n_sft, train)
    st = {"stage": "sft", "what": "NLL on the references of its training slices", "prompts": n_sft,
          "sft_examples": n_sft, "sft_steps": math.ceil(n_sft / cfg.train.batch_size) * cfg.train.epochs}
    if not method.has_rounds:
        st["generations"] = dev_gen
    return st


def plan(cfg: Config, pool: int | None = -1) -> dict:
    """The stages of a run of ``cfg`` with their sizes, and totals. ``pool=-1``: count it (see ``pool_size``)."""
    method = get_method(cfg.method)
    total = pool_size(cfg) if pool == -1 else pool
    dev = cfg.data.dev_size if total is None else min(cfg.data.dev_size, max(total - 1, 0))
    test = cfg.data.test_size if total is None else min(cfg.data.test_size, max(total - dev - 1, 0))
    train = None if total is None else total - dev - test
    rounds = cfg.rounds if method.has_rounds else 0
    dev_gen = _dev_generations(cfg, dev)
    stages = [{"stage": "round_0", "what": "start model on the development slice", "prompts": dev,
               "generations": dev_gen}]

    if cfg.sft or method.runs_sft:
        stages.append(_sft_stage(cfg, method, train, dev_gen))

    n_imp = _cap(cfg.data.improver_size, train)
    if method.trains_improver:
        per = cfg.improver.chain if cfg.improver.target != "reference" else 1
        examples = n_imp * per * cfg.improver.experimental.drafts_per_prompt
        examples += round(cfg.improver.mix_policy * examples)
        gens = n_imp * cfg.improver.experimental.drafts_per_prompt
        gens += dev_gen
        stages.append({"stage": "improver", "what": f"improver role of the policy ({cfg.improver.target} targets)",
                       "prompts": n_imp, "generations": gens, "sft_examples": examples,
                       "sft_steps": math.ceil(examples / cfg.train.batch_size) * cfg.train.epochs})

    if method.has_prepare:
        p = dict(method.plan_prepare(cfg))
        if "sft_examples" in p:  # trained on the improver slice of the pool
            p["sft_examples"] = p["prompts"] = _cap(p["sft_examples"], train)
            p["sft_steps"] = math.ceil(p["sft_examples"] / cfg.train.batch_size) * cfg.train.epochs
        stages.append({"stage": "prepare", "prompts": None, **p})

    n_round = _cap(cfg.data.round_size, train)
    for t in range(1, rounds + 1):
        p = method.plan_round(cfg, t)
        pairs = p.get("pairs", 0)
        stages.append({"stage": f"round_{t}", "what": f"pairs by {method.name}, reference = "
                       f"{'π_0' if method.reference(cfg) == 'initial' else 'π_t (round start)'}",
                       "prompts": n_round, "pairs": pairs,
                       "generations": p.get("generations", 0) + min(cfg.eval.head_to_head_size, dev),
                       "dpo_steps": math.ceil(pairs / cfg.dpo.batch_size) * cfg.dpo.epochs})

    if test:
        stages.append({"stage": "test", "what": "start (cached by hash), pre-rounds and final model answer the test "
                       "split", "prompts": test, "generations": test * (3 if rounds else 2)})
    totals = {}
    for key in ("generations", "sft_steps", "dpo_steps", "pairs"):
        vals = [s.get(key) for s in stages if key in s]
        totals[key] = None if any(v is None for v in vals) else sum(vals)
    return {"method": method.name, "model": cfg.model.name, "pool": total, "train_pool": train, "dev": dev,
            "rounds": rounds, "stages": stages, "totals": totals,
            "tokens": {"max_prompt": cfg.data.max_prompt_tokens, "max_new": cfg.generation.max_new_tokens,
                       "max_reference": cfg.data.max_reference_tokens}}


def _v(x) -> str:
    return "?" if x is None else (f"{x:,}" if isinstance(x, int) else str(x))


def format_plan(p: dict) -> str:
    pool = "not counted (hub dataset)" if p["pool"] is None else f"{p['pool']:,} prompts"
    lines = [f"plan: method {p['method']} on {p['model']} | SFT data: {pool}; {p['dev']} held out for development"
             f" | {p['rounds']} rounds | tokens: prompt ≤ {p['tokens']['max_prompt']}, response ≤ "
             f"{p['tokens']['max_new']}, reference ≤ {p['tokens']['max_reference']}",
             "", f"{'stage':<10} {'prompts':>9} {'generations':>12} {'SFT ex.':>9} {'SFT steps':>10} "
             f"{'pairs ≤':>9} {'DPO steps ≤':>12}  what"]
    for s in p["stages"]:
        lines.append(f"{s['stage']:<10} {_v(s.get('prompts')):>9} {_v(s.get('generations', 0)):>12} "
                     f"{_v(s.get('sft_examples', '')):>9} {_v(s.get('sft_steps', '')):>10} "
                     f"{_v(s.get('pairs', '')):>9} {_v(s.get('dpo_steps', '')):>12}  {s.get('what', '')}")
    t = p["totals"]
    lines += ["", f"total: {_v(t['generations'])} generations, {_v(t['sft_steps'])} SFT/improver steps, "
              f"{_v(t['dpo_steps'])} DPO steps over {_v(t['pairs'])} pairs", "(steps with one process: divide by the "
              "number of processes for data-parallel runs; '?' = depends on the size of a hub dataset)"]
    return "\n".join(lines)
