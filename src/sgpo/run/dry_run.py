"""``--dry-run``: the run's own recipe and data slicing, walked with parts that count the work instead of doing it.

No model, tokenizer or hub dataset is loaded: the sampler answers with placeholder texts, the trainer counts examples
and optimizer steps, the judges count their calls, the current model counts its checkpoint writes. Everything else —
the stage list, the methods, the gates, the dealing of prompts — is the code a real run executes, in a temporary
run directory. Local and embedded data are read (their sizes are real); a hub dataset is stood in for by as many
placeholder rows as the slices ask for, and the whole-pool SFT slice it would give is "not counted". Before the walk,
what a real run would refuse at its start is refused here too (``preflight``): a data path that is neither on disk nor
a hub dataset id (the run's own rule, ``records.source_kind``), a model that is neither, a tracker not installed.

Counts are for one process. Pairs, DPO steps and judge calls are upper bounds (the gates decide; cached verdicts are
free). Improver examples are what the improver targets make of placeholder drafts built to let every chain run its
full length; a few references (multi-line ones) still end their chain early, so the count can fall a little short of
the bound (measured: 23 of the default's 557 pool prompts).
"""
from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sgpo.core import distributed
from sgpo.config.schema import Config
from sgpo.models.templates import improver_instruction
from sgpo.data.records import LoadReport, Record, is_hub_id, load_records, missing_source, source_kind
from sgpo.eval.judges import Judge
from sgpo.eval.evaluator import Evaluator
from sgpo.core.files import write_jsonl
from sgpo.generation.engine import Generation
from sgpo.methods.base import get_method
from sgpo.run.stages import RunDir, Stages
from sgpo.run.session import Session
from sgpo.data.splits import prepare_splits
from sgpo.training.sft import NLLExample

COLUMNS = [("prompts", "prompts"), ("generations", "generations"), ("nll_examples", "NLL ex."),
           ("nll_steps", "NLL steps"), ("pairs", "pairs ≤"), ("dpo_steps", "DPO steps ≤"),
           ("checkpoints", "ckpt writes")]


@dataclass
class Tally:
    """Counts per stage (the stage running when the work was asked for)."""
    stages: Stages
    rows: dict = field(default_factory=dict)     # stage → Counter
    ids: dict = field(default_factory=dict)      # stage → record ids the stage's work touched
    uncounted: list = field(default_factory=list)  # data sources stood in for by placeholders

    def add(self, key: str, n: int = 1, stage: str | None = None) -> None:
        self.rows.setdefault(stage or self.stages.current, Counter())[key] += n

    def touch(self, ids) -> None:
        self.ids.setdefault(self.stages.current, set()).update(ids)


def placeholder(record: Record, role: str) -> str:
    """A stand-in response: the record's reference as one sentence (its sentence ends removed), a numbered marker after
    every word — every step of an interpolation chain towards the reference has an edit left to make, and no word
    4-gram repeats (the repetition gate keeps it) — or a short text when it has none."""
    if not record.reference:
        return f"«{role}» response to {record.id}"
    words = [w.rstrip(".!?。:") or w for w in record.reference.split()]
    return " ".join(f"{w} «{role}{i}»" for i, w in enumerate(words))


class CountingSampler:
    """The sampler's interface (``SamplerPart``): every requested response is counted and answered with a placeholder;
    one process, no vLLM engine."""
    backend = "engine"
    dist = engine = None

    def __init__(self, tally: Tally, instruction: str):
        self.tally, self.instruction = tally, instruction

    def identity(self) -> list:
        return []

    def rollout(self, model, records, role: str, round_: int, *, drafts=None, shard=None) -> dict[str, Generation]:
        self.tally.add("generations", len(records))
        self.tally.add("rollouts", int(bool(records)))
        self.tally.touch(r.id for r in records)
        out = {r.id: Generation(placeholder(r, role), (), True) for r in records}
        if shard is not None:  # later stages read some shards (the start model's development answers)
            write_jsonl(shard, [{"id": i, "text": g.text, "finished": True} for i, g in out.items()])
        return out

    def rewrite(self, model, records, drafts, round_: int, *, role: str = "improver", shard_dir=None,
                samples: int = 1) -> dict[str, Generation]:
        """Every try counted (a real rewrite samples again only a rewrite equal to its draft)."""
        self.tally.add("generations", len(records) * (samples - 1))
        return self.rollout(model, records, role, round_, drafts=drafts)  # no later stage reads a rewrite shard

    def close(self) -> None:
        pass


class CountingPolicy:
    """The current model's interface (``PolicyPart``) with no model: paths move as in a real run; checkpoint writes
    are counted."""
    tokenizer = None

    def __init__(self, name: str, run: RunDir, tally: Tally):
        self.path = self.start_path = name
        self.run, self.tally = run, tally

    model = generator = property(lambda self: None)

    def load(self, path):
        return None

    def model_at(self, path):
        return None

    def generator_at(self, path):
        return str(path)

    def unload(self) -> None:
        pass

    def trained(self, exported=None) -> None:
        pass

    def adopt(self, path: str) -> None:
        self.path = str(path)

    def resume_from(self, stage: str) -> None:
        self.path = str(self.run.path(stage, "model"))

    def save(self, stage: str) -> None:
        self.tally.add("checkpoints", 1, stage)
        self.path = str(self.run.path(stage) if stage == "final" else self.run.path(stage, "model"))


class CountingTrainer:
    """The trainer's interface (``TrainerPart``): examples, pairs and optimizer steps counted, with the training
    checkpoints a real call writes (every ``checkpoint_every`` steps and after the last)."""

    def __init__(self, cfg: Config, tally: Tally):
        self.cfg, self.tally = cfg, tally

    def policy_examples(self, records: list[Record]) -> list[NLLExample]:
        self.tally.touch(r.id for r in records)
        return [NLLExample((), (), "policy") for _ in records]

    def improver_examples(self, examples, records: list[Record]) -> list[NLLExample]:
        self.tally.touch(e.record_id for e in examples)
        return [NLLExample((), (), "improver") for _ in examples]

    def _steps(self, n: int, batch_size: int, epochs: int, every: int) -> int:
        steps = epochs * math.ceil(n / batch_size)
        writes = (steps // every + (steps % every > 0)) if every else int(steps > 0)
        self.tally.add("checkpoints", writes)
        self.tally.add("train_checkpoints", writes)  # of those: training checkpoints (optimizer state included)
        return steps

    def train_nll(self, examples: list[NLLExample], desc: str, seed: int, model=None) -> dict:
        t = self.cfg.train
        self.tally.add("nll_examples", len(examples))
        steps = self._steps(len(examples), t.batch_size, t.epochs, t.checkpoint_every)
        self.tally.add("nll_steps", steps)
        return {"nll/loss": 0.0, "nll/steps": steps, "nll/examples": len(examples)}

    def train_separate(self, examples: list[NLLExample], desc: str, seed: int, out: Path) -> dict:
        m = self.train_nll(examples, desc, seed)
        self.tally.add("checkpoints", 1)  # the separate model itself
        return m

    def train_dpo(self, pairs, desc: str, seed: int) -> dict:
        d = self.cfg.dpo
        self.tally.add("pairs", len(pairs))
        steps = self._steps(len(pairs), d.batch_size, d.epochs, d.checkpoint_every)
        self.tally.add("dpo_steps", steps)
        return {"dpo/loss": 0.0, "dpo/steps": steps}

    def reference_pass(self, pairs, reference_path: str) -> None:
        self.tally.touch(p.record_id for p in pairs)
        for p in pairs:
            p.ref_chosen_logp = p.ref_rejected_logp = 0.0


class CountingJudge(Judge):
    """A judge that counts its calls (before any cache) and prefers the first candidate: the interface of the judges
    a run's evaluator makes (``JudgePart``)."""

    def __init__(self, spec: str, tally: Tally):
        from sgpo.core.judge_spec import is_scorer

        self.spec = self.name = spec
        self.tally = tally
        self.gives_scores = self.reads_rows = is_scorer(spec)

    def prefer(self, prompts, a, b, references=None, rows=None) -> list[float]:
        self.tally.add(f"judge:{self.spec}", len(prompts))
        self.tally.add(f"prompt_chars:{self.spec}", sum(len(p) for p in prompts))  # what an API judge is sent
        return [1.0] * len(prompts)

    def score(self, prompts, responses, rows) -> list[float]:
        """A scorer's calls (one per response), each scoring 1."""
        self.tally.add(f"judge:{self.spec}", len(prompts))
        return [1.0] * len(prompts)


DATA_KEYS = ("data.sft", "data.prompts", "data.preference")  # the last read by method dpo only
TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt")  # model.chat_template as a file


def preflight(cfg: Config) -> None:
    """Refuse, in one line, what a real run would refuse at its start: a data source that is neither on disk nor a hub
    dataset id (``records.source_kind``: the run's rule), a model (``model.name``, ``model.chat_template``) that is neither
    an embedded model, a local folder nor a hub model id, a tracker (``report_to``) that is not installed."""
    from sgpo.config.schema import get
    from sgpo.models.loading import ModelError
    from sgpo.core.trackers import require_installed

    for key in DATA_KEYS[:2] + (DATA_KEYS[2:] if cfg.method == "dpo" else ()):
        if get(cfg, key) and source_kind(get(cfg, key)) == "missing":
            raise missing_source(get(cfg, key), key)
    check_model_name(cfg.model.name, "model.name")
    template = cfg.model.chat_template
    if template and Path(template).suffix in TEMPLATE_SUFFIXES and not Path(template).is_file():
        raise ModelError(f"model.chat_template: {template}: no such file (looked for as a Jinja file, from "
                         f"{Path.cwd()})")
    if template and not Path(template).is_file():
        check_model_name(template, "model.chat_template")
    require_installed(cfg.report_to)


def check_model_name(name: str, key: str) -> None:
    """A ``ModelError`` naming ``key`` unless ``name`` is an embedded model, a local path or a hub model id (as
    ``loading.resolve`` and ``from_pretrained`` take it; whether the hub has it is not asked)."""
    from sgpo.models.loading import EMBEDDED_GEMMA3, EMBEDDED_SMOLLM2, TINY_RANDOM, ModelError

    embedded = (EMBEDDED_SMOLLM2, EMBEDDED_GEMMA3, TINY_RANDOM)
    if name.startswith("sgpo:") and name not in embedded:
        raise ModelError(f"{key}: unknown embedded model '{name}' (known: {', '.join(embedded)})")
    if not name.startswith("sgpo:") and not Path(name).exists() and not is_hub_id(name):
        raise ModelError(f"{key}: {name}: no such folder (looked for as a local folder, from {Path.cwd()}; not a hub "
                         "model id, which is 'name' or 'owner/name')")


def placeholder_loader(cfg: Config, tally: Tally):
    """``load_records`` for local and embedded data; a hub dataset becomes as many placeholder rows as the run's slices
    ask for (its size is not known without downloading it), and at least twice the held-out splits (a real hub dataset
    is not assumed to be mostly test prompts)."""
    d = cfg.data
    held_out = d.dev_size + d.test_size
    wanted = max(held_out + d.improver_size + cfg.rounds * d.round_size + d.sft_size + 1, 2 * held_out + 1)

    def load(source: str, **options):
        if source_kind(source) != "hub":
            return load_records(source, **options)
        tally.uncounted.append(source)
        n = wanted if options.get("need") != "preference" else cfg.rounds * d.round_size
        records = [Record(f"{source}#{i}", (("user", f"request {i}"),), f"reference {i} of {source}.",
                          f"chosen {i}.", f"rejected {i}.") for i in range(n)]
        return records, LoadReport(f"{source} (not downloaded: {n} placeholder rows)", n)

    return load


def dry_session(cfg: Config, root: Path) -> tuple[Session, Tally]:
    """A session whose parts count: the real run directory and stages (in ``root``), counting stand-ins for the rest."""
    run = RunDir(root)
    dist = distributed.Dist(None)
    stages = Stages(run, dist, cfg.seed)
    tally = Tally(stages)
    sampler = CountingSampler(tally, improver_instruction(cfg.improver))
    policy = CountingPolicy(cfg.model.name, run, tally)
    evaluator = Evaluator(cfg, sampler, policy, stages, make_judge=lambda spec: CountingJudge(spec, tally))
    return Session(cfg, run, stages, dist, sampler, policy, CountingTrainer(cfg, tally), evaluator,
                   load=placeholder_loader(cfg, tally)), tally


def dry_run(cfg: Config) -> dict:
    """Walk the recipe of ``cfg`` counting: {"stages": [{stage, counts…, judges}], "totals", "uncounted"}."""
    from sgpo.run.recipe import run_stages

    preflight(cfg)
    quiet = logging.getLogger("sgpo")
    level, quiet.level = quiet.level, logging.WARNING  # the stages' own log lines would report placeholder figures
    try:
        with tempfile.TemporaryDirectory(prefix="sgpo-dry-run-") as tmp:
            s, tally = dry_session(cfg, Path(tmp))
            data = prepare_splits(cfg, None, load=s.load)
            run_stages(s, get_method(cfg.method), data)
    finally:
        quiet.level = level
    stages = []
    for name in s.run.manifest["stages"]:  # every stage the run would record, in order
        row = tally.rows.get(name, Counter())
        stages.append({"stage": name, "prompts": len(tally.ids.get(name, ())),
                       **{k: row[k] for k, _ in COLUMNS if k != "prompts"},
                       "train_checkpoints": row["train_checkpoints"],
                       "judges": {k[6:]: v for k, v in row.items() if k.startswith("judge:")}})
    whole_pool = bool(tally.uncounted) and cfg.data.sft_size == 0
    rollouts = sum(row["rollouts"] for row in tally.rows.values())
    chars = Counter()
    for row in tally.rows.values():
        chars.update({k[len("prompt_chars:"):]: v for k, v in row.items() if k.startswith("prompt_chars:")})
    return {"method": cfg.method, "model": cfg.model.name, "stages": stages, "uncounted": tally.uncounted,
            "whole_pool_sft": whole_pool, "train": len(data.train), "dev": len(data.dev), "test": len(data.test),
            "rollouts": rollouts, "vllm_engine_starts": vllm_engine_starts(cfg, rollouts),
            "judge_prompt_chars": dict(chars)}


def vllm_engine_starts(cfg: Config, rollouts: int) -> int:
    """vLLM engines a process starts in the run when it generates with vLLM: one, kept for every rollout (its weights
    loaded anew when the model changes); none with the built-in engine or nothing to generate. ``auto`` is counted as
    vLLM (what it picks on CUDA with vLLM installed): the plan is for the machine the run is meant for."""
    return int(rollouts > 0 and cfg.generation.backend != "engine")


def generation_line(p: dict, cfg: Config) -> list[str]:
    """What generates the rollouts, and how many vLLM engines that starts."""
    backend = cfg.generation.backend
    if backend == "engine" or not p["vllm_engine_starts"]:
        return [f"Generation: {p['rollouts']} rollouts with the built-in engine (generation.backend={backend}): no vLLM "
                "engine."]
    which = ": vLLM on CUDA when installed, else the built-in engine" if backend == "auto" else ""
    return [f"Generation (generation.backend={backend}{which}): {p['rollouts']} rollouts; with vLLM "
            f"{p['vllm_engine_starts']} engine start per process",
            "for the whole run, which loads each new model's weights from its checkpoint folder "
            f"(at most {max(0, p['rollouts'] - 1)} loads)."]


def _cell(row: dict, key: str, whole_pool: bool) -> str:
    if whole_pool and row["stage"] == "sft" and key in ("prompts", "nll_examples", "nll_steps", "checkpoints"):
        return "whole pool"
    v = row.get(key, 0)
    return f"{v:,}" if v else "-"


def format_dry_run(p: dict, cfg: Config) -> str:
    """The dry run as a table: one row per stage, a total, and what the counts mean."""
    d, whole = cfg.data, p["whole_pool_sft"]
    lines = [f"dry run: method {p['method']} on {p['model']} | {p['train']:,} training, {p['dev']:,} development, "
             f"{p['test']:,} test prompts | tokens: prompt ≤ {d.max_prompt_tokens}, response ≤ "
             f"{cfg.generation.max_new_tokens}, reference ≤ {d.max_reference_tokens}", "",
             f"{'stage':<18}" + "".join(f"{label:>13}" for _, label in COLUMNS) + "  judge calls"]
    for row in p["stages"]:
        judges = ", ".join(f"{k} {v:,}" for k, v in row["judges"].items())
        lines.append(f"{row['stage']:<18}" + "".join(f"{_cell(row, k, whole):>13}" for k, _ in COLUMNS)
                     + f"  {judges}")
    total = {"stage": "total", **{k: sum(r.get(k, 0) for r in p["stages"]) for k, _ in COLUMNS if k != "prompts"}}
    judges = Counter()
    for r in p["stages"]:
        judges.update(r["judges"])
    lines.append(f"{'total':<18}{'':>13}" + "".join(
        f"{('?' if whole and (k.startswith('nll') or k == 'checkpoints') else _cell(total, k, False)):>13}"
        for k, _ in COLUMNS[1:])
        + "  " + ", ".join(f"{k} {v:,}" for k, v in judges.items()))
    lines += ["", "Counts for one process (data-parallel runs share them out). Upper bounds: pairs and DPO steps (the "
              "gates decide),", "judge calls (cached verdicts are free). Improver examples are counted on placeholder "
              "drafts (a real chain stops", "where it reaches the reference)."]
    lines += generation_line(p, cfg)
    from sgpo.models.sizes import memory_lines  # each strategy's vLLM share and what it leaves to training (issue 35, item 6)

    lines += memory_lines(cfg)
    lines += checkpoint_lines(p["stages"], cfg, whole)
    lines += api_judge_lines(p, judges, cfg)
    from sgpo.eval.preflight import dry_run_lines  # a judge whose API key is missing (issue 36, item 2)

    lines += dry_run_lines(cfg)
    if p["uncounted"]:
        lines.append("Not downloaded: " + ", ".join(dict.fromkeys(p["uncounted"])) + " (looked for as hub datasets: no "
                     "local file or folder of that name; placeholder rows as many as the slices ask for"
                     + ("; the SFT slice is the whole pool, not counted)" if whole else ")"))
    return "\n".join(lines)


CHARS_PER_TOKEN = 4        # English text in OpenAI's tokenizers, about
SECONDS_PER_REQUEST = (3, 8)  # an API judge's request, the range eval.judge_concurrency's doc cites
LABEL_TOKENS = 1           # a pairwise verdict is one label token (``judge_openai``: max_tokens 1)


def template_tokens() -> int:
    """Tokens of the pairwise judge template an API judge fills in (the one ``judge_openai`` uses), placeholders
    empty, with a few tokens of chat framing a message; estimated at ``CHARS_PER_TOKEN``."""
    from sgpo.eval.judge_templates import fill, pairwise_template, parse_chatml

    messages = parse_chatml(pairwise_template("auto").text)
    empty = {"instruction": "", "output_1": "", "output_2": ""}
    return sum(len(fill(m["content"], empty)) // CHARS_PER_TOKEN + 4 for m in messages)


def _tokens(n: float) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e6 else f"{n / 1e3:,.1f}k" if n >= 1e3 else f"{n:,.0f}"


def api_judge_lines(p: dict, calls: Counter, cfg: Config) -> list[str]:
    """For every API judge (``openai:``): the tokens its calls send and receive, their price at ``eval.
    judge_price_input``/``_output`` and the wall time at ``eval.judge_concurrency`` — estimates, upper bounds with
    the calls."""
    from sgpo.core.judge_spec import parse_judge_spec

    e, answer = cfg.eval, cfg.generation.max_new_tokens
    lines = []
    for spec, n in calls.items():
        if parse_judge_spec(spec)[0] != "openai" or not n:
            continue
        prompts = p["judge_prompt_chars"].get(spec, 0) / CHARS_PER_TOKEN
        frame = template_tokens()
        sent, received = prompts + n * (frame + 2 * answer), n * LABEL_TOKENS
        low, high = (_duration(n * s / e.judge_concurrency) for s in SECONDS_PER_REQUEST)
        lines += [f"API judge {spec}: estimates for the {n:,} calls counted (upper bounds, like the calls):",
                  f"  sent ≤ {_tokens(sent)} tokens: prompts {_tokens(prompts)} (~{CHARS_PER_TOKEN} characters a token"
                  + ("; hub data on placeholder rows, not its real length" if p["uncounted"] else "")
                  + f"), answers ≤ 2 × {answer} a call (generation.max_new_tokens), the judge template ~{frame} a call",
                  f"  received ≤ {_tokens(received)} tokens (one label token a call)", "  " + _price(sent, received, e),
                  f"  wall time {low} – {high} at {e.judge_concurrency} requests in flight (eval.judge_concurrency) and "
                  f"{SECONDS_PER_REQUEST[0]}–{SECONDS_PER_REQUEST[1]} s a request; a rate limit (HTTP 429) makes it "
                  "longer"]
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:,.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:,.1f} h"


def _price(sent: float, received: float, e) -> str:
    if not (e.judge_price_input or e.judge_price_output):
        return ("cost: set eval.judge_price_input and eval.judge_price_output (USD per million tokens, from the "
                "provider's price list) to see it")
    cost = (sent * e.judge_price_input + received * e.judge_price_output) / 1e6
    return (f"cost ≤ ${cost:,.2f} at ${e.judge_price_input:g} / ${e.judge_price_output:g} per million tokens sent / "
            "received (eval.judge_price_input / eval.judge_price_output)")


def checkpoint_lines(stages: list[dict], cfg: Config, whole_pool: bool) -> list[str]:
    """The bytes of one checkpoint of each kind and of all the writes counted (``sizes``: estimates)."""
    from sgpo.models.loading import dtype_name
    from sgpo.models.sizes import GB, checkpoint_bytes, parameter_count

    params, how = parameter_count(cfg.model.name)
    minutes = cfg.train.checkpoint_minutes or cfg.dpo.checkpoint_minutes
    uncounted = whole_pool and cfg.train.checkpoint_every > 0  # SFT's steps, so its checkpoints by steps, unknown
    stages = [r for r in stages if not (uncounted and r["stage"] == "sft")]
    counted = "Checkpoint writes count those by steps" + (" (the SFT stage's are not counted)" if uncounted else "")
    counted += "; checkpoint_minutes adds at most one per that many minutes of training." if minutes else "."
    if params is None:
        return [counted, f"Checkpoint sizes: the parameter count of {cfg.model.name} is unknown here."]
    dtype = dtype_name(cfg.model.dtype, cfg.model.device)
    folder, train = checkpoint_bytes(params, dtype, cfg.model.lora_r > 0)
    sharded = checkpoint_bytes(params, dtype, cfg.model.lora_r > 0, sharded=True)[1]
    n_train = sum(r["train_checkpoints"] for r in stages)
    n_models = sum(r["checkpoints"] for r in stages) - n_train
    state = "weights" if cfg.model.lora_r else "weights, AdamW moments" + (", fp32 masters" if dtype != "float32" else "")
    total = (n_models * folder + n_train * train) / GB
    return [counted, f"Checkpoint sizes (estimates: {params / 1e9:.2f}B parameters, {how}; {dtype} weights here):",
            f"  a model folder {folder / GB:.1f} GB; a training checkpoint {train / GB:.1f} GB ({state};",
            ("  split over the processes under ZeRO-3/FSDP" if cfg.model.lora_r else f"  {sharded / GB:.1f} GB under "
             "ZeRO-3/FSDP, split over the processes: fp32 masters and moments, no bf16 weights")
            + "; a training call keeps only its latest);",
            f"  the writes counted: {n_models} model folders + {n_train} training checkpoints = {total:,.1f} GB."]
