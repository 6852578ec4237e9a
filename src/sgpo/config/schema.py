"""Typed configuration. Every field documents itself; YAML files and ``--set key=value`` overrides fill it.

Unknown keys and wrong types are errors that name the key (``ConfigError``).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sgpo.core.judge_spec import parse_judge_spec
from sgpo.core.registry import LOSSES, METHODS

CONFIG_VERSION = 1


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "sgpo:smollm2-135m-instruct"
    "HF hub name, local path, or an embedded model (sgpo:smollm2-135m-instruct, sgpo:tiny-random)."
    chat_template: str = ""
    "The chat template both roles are rendered through: empty = the tokenizer's own; else a Jinja file, or a model or tokenizer whose template to use (base models such as Llama-3-8B ship none: e.g. meta-llama/Meta-Llama-3-8B-Instruct). Saved with every checkpoint."
    device: str = "auto"
    "auto (GPU when present), cpu, cuda, cuda:1 ..."
    dtype: str = "auto"
    "auto (bf16 on GPUs that support it, fp32 on CPU), float32, bfloat16, float16."
    lora_r: int = 0
    "LoRA rank; 0 = full fine-tuning. With LoRA the adapter is merged at the end of every round."
    lora_alpha: int = 32
    "LoRA alpha."
    lora_dropout: float = 0.0
    "LoRA dropout."
    gradient_checkpointing: bool = False
    "Trade compute for memory in training (slower; useful for 7B+ on GPUs)."


@dataclass
class DataConfig:
    sft: str = "sgpo:alpaca-eval"
    "SFT data (prompts with references): a JSONL/JSON/Parquet file, an HF dataset name or directory, or sgpo:alpaca-eval (AlpacaEval's 805 instructions with GPT-4 Turbo's answers) / sgpo:arena-hard-v2 (750 questions with o3-mini's answers), shipped in a package."
    split: str = "train"
    "Split name for HF datasets."
    subset: str = ""
    "Configuration (subset) name for HF datasets that have several; empty = the dataset's default."
    fields: dict = field(default_factory=dict)
    "Column mapping for every data source of the run: accepted name → the source's column, e.g. {prompt: question, response: answer}. Accepted names: prompt, response, completion, messages, instruction, input, output, chosen, rejected (docs/data.md)."
    prompts: str = ""
    "Optional prompt-only data for the preference rounds (same formats); empty = the training pool of `sft`."
    test_size: int = 200
    "Prompts held out for reporting only (the test split, fixed seed): the final figures; never trained or tuned on."
    dev_size: int = 48
    "Prompts held out of training (fixed seed split) for development: tuning, improver figures and per-stage head-to-head."
    sft_size: int = 128
    "Prompts of the training pool for the SFT step (`sft: true`), after the improver and round slices; 0 = the whole pool (the improver and round prompts among them, as in the paper). Costs one training step per train.batch_size prompts."
    improver_size: int = 48
    "Prompts of the training pool used to build improver-training data."
    round_size: int = 48
    "Prompts per preference round (each round takes the next slice of the training pool)."
    max_prompt_tokens: int = 384
    "Longest model input (tokens, chat template included), in generation and in training alike."
    on_long_prompt: str = "truncate"
    "What to do with a longer prompt: truncate (keep its last max_prompt_tokens tokens, where the question and the generation prompt are; the log says how many were cut and by how much) or skip (drop it, counted)."
    max_reference_tokens: int = 96
    "References are cut at a sentence boundary under this many tokens (then EOS is trained after them)."
    preference: str = ""
    "Preference data for method dpo (prompt/chosen/rejected, plain or conversational; a file or an HF dataset name, e.g. HuggingFaceH4/ultrafeedback_binarized). Empty = built offline: each SFT reference (chosen) against the pre-rounds model's own answer (rejected), the pre-rounds model being the model entering round 1 (after SFT)."
    preference_split: str = "train"
    "Split of `preference` for HF datasets (ultrafeedback_binarized: train_prefs)."
    on_error: str = "raise"
    "A malformed row: raise (error naming file, line and field) or skip (skipped rows counted by reason)."
    split_seed: int = 1234
    "Seed of the fixed training/development split."

    def read_options(self) -> dict:
        """How every data source of a run is read (``records.load_records``'s options)."""
        return {"split": self.split, "subset": self.subset, "fields": self.fields, "on_error": self.on_error}


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    "Longest generated response (tokens). Every rollout's cost grows with it."
    temperature: float = 0.7
    "Sampling temperature; 0 = greedy."
    top_p: float = 1.0
    "Nucleus sampling threshold."
    batch_size: int = 64
    "Sequences decoded together (per process): larger is faster, on CPU too, and costs KV-cache memory."
    backend: str = "auto"
    "Generation backend: engine (built in), vllm (vLLM's offline LLM.generate in a process of its own, one engine per process for the whole run: ~25 s to start on CPU, then each new model's weights loaded into it), auto (vllm on CUDA when installed, else engine: on CPU the two measured alike)."
    vllm_gpu_memory: float = 0.0
    "vllm backend on a GPU: the fraction of GPU memory vLLM may take; 0 = the launch strategy's default (0.3 with one GPU or DDP, 0.35 ZeRO-2, 0.5 ZeRO-3, FSDP and LoRA: sizes.VLLM_SHARES; the dry run prints what each leaves to training). Its engine stays up for the whole run and keeps this share while training runs (it is not put to sleep): leave training the rest."


@dataclass
class ImproverExperimentalConfig:
    """Research knobs of the improver, not measured to help (docs/improver.md). Each costs generation time."""
    drafts_per_prompt: int = 1
    "Drafts sampled per improver-training prompt; each gives its own improvement examples (×N improver-stage drafts)."
    rewrite_samples: int = 1
    "Rewrite tries per draft (rounds and improver figures): a rewrite equal to its draft is sampled again, the first that differs is kept (no judge involved)."


@dataclass
class ImproverConfig:
    target: str = "interpolate"
    "How improver targets are built from (draft, reference): interpolate, reference (full jump)."
    step: float = 0.5
    "Fraction of the draft→reference edit script applied per improvement step (interpolate)."
    chain: int = 2
    "Improvement steps from draft towards reference; every (y_k → y_k+1) is a training example (more steps: more examples to train on)."
    mix_policy: float = 0.5
    "Policy SFT examples (prompt → reference) per improver example, to keep the policy role."
    sees_reference: bool = True
    "Reading B of the paper's 'referencing SFT outputs' (arXiv 2507.20181; measured against reading A in docs/results-cpu.md): the improver's input holds the SFT reference too, I(x, y, y*), in improver training and in the rounds. False = reading A: the reference only shapes the training targets."
    instruction: str = ""
    "The improver instruction; {prompt}, {draft} and (reading B only) {reference} are filled in. Empty = the built-in one of the reading (sgpo/models/templates.py). Rendered in the model's chat template."
    experimental: ImproverExperimentalConfig = field(default_factory=ImproverExperimentalConfig)


@dataclass
class _ClipAndCheckpoint:
    """The fields both training sections (``train``, ``dpo``) end with. A section inherits them before the class of
    its own fields, ``TrainConfig(_ClipAndCheckpoint, _TrainFields)``: dataclasses put the last base's fields first,
    so a section's own keys come first in the YAML and the reference."""
    max_grad_norm: float = 1.0
    "Gradient clipping."
    checkpoint_every: int = 50
    "Write a resumable training checkpoint (model, optimizer, scheduler, RNG) every this many steps; 0 = only at the end."
    checkpoint_minutes: float = 0.0
    "Also write one when this many minutes have passed since the last (0 = off): at paper scale a step count is a poor clock (a ZeRO-3 checkpoint of an 8B model is ~96 GB: fp32 masters and moments, 12 bytes a parameter)."


@dataclass
class _TrainFields:
    epochs: int = 1
    "Passes over the examples."
    batch_size: int = 4
    "Examples per optimizer step, all processes together (each process takes a disjoint slice of every batch)."
    lr: float = 2e-5
    "Peak learning rate (AdamW, linear warm-up then constant)."
    warmup_steps: int = 0
    "Linear warm-up steps."
    weight_decay: float = 0.0
    "AdamW weight decay."


@dataclass
class TrainConfig(_ClipAndCheckpoint, _TrainFields):
    """Supervised (NLL) training: SFT and improver training."""


@dataclass
class _DPOFields:
    beta: float = 0.5
    "DPO temperature β: larger keeps the policy nearer the reference model. The paper configs set 0.1."
    lr: float = 5e-6
    "Learning rate."
    epochs: int = 1
    "Passes over a round's pairs."
    batch_size: int = 4
    "Pairs per optimizer step, all processes together (each process takes a disjoint slice of every batch)."
    loss: str = "sigmoid"
    "Preference loss: a name of sgpo.core.registry.LOSSES, described in sgpo/training/losses.py (sigmoid is DPO's)."
    reference: str = "round_start"
    "Reference model: round_start (the model at the start of each round) or initial (the pre-rounds model π0, the model entering round 1: after SFT and the method's stages before the rounds)."
    improver_nll_coef: float = 0.0
    "Weight of an improver NLL term (draft → chosen in improver mode) added to the DPO loss."


@dataclass
class DPOConfig(_ClipAndCheckpoint, _DPOFields):
    """Preference (DPO-family) training: the rounds' pairs."""


@dataclass
class PairsConfig:
    require_finished: str = "chosen_if_rejected"
    "Which cut-off sides drop a pair (gates.py): chosen_if_rejected (a chosen side cut off where the rejected side finished), chosen, both, none. A cut-off side is trained without EOS."
    verify: str = ""
    "Optional judge spec; keep only pairs it prefers chosen over rejected (off when empty)."


@dataclass
class EvalConfig:
    judge: str = "reference"
    "Judge for the figures of a run (improver win rate, final-vs-start head-to-head)."
    second_judge: str = "lm:sgpo:gemma-3-270m"
    "A judge independent of the policy and of the references (empty = off): pairs/judge_agreement every round and the test-split figures beside `judge`. Validated against GPT-4 Turbo's annotations in docs/judges.md."
    improver_size: int = 32
    "Development prompts on which the improver's figures are measured: zero-shot (round_0) and after improver training; each round measures it on its own candidates (0 = off). Costs one rewrite rollout and its judging per measurement."
    head_to_head_size: int = 32
    "Development prompts for the per-stage head-to-head win rate against the start model (0 = off)."
    agreement_size: int = 500
    "Pairs per round on which the second judge's agreement (pairs/judge_agreement) is measured, at most: a fixed sample of the round's pairs; 500 gives a 95% CI of about ±4 points, at paper scale a round has 10,000 pairs (one judge call each)."
    judge_concurrency: int = 32
    "API judges (openai:): requests in flight at once. At 3-8 s a request, 32 in flight ask 240-640 a minute: a round's ~1,000 calls in 2-4 minutes instead of 12-35 at 4, while every GPU waits. That is about the 500 requests a minute OpenAI publishes for gpt-4o-mini-class models at usage tier 1 (5,000 from tier 2); its token limit (200k a minute at tier 1, about 2k tokens a request) or a lower quota answers HTTP 429, retried with back-off (judge_retries, Retry-After honoured). Lower it for a small quota or a local server."
    judge_retries: int = 6
    "API judges (openai:): tries per request after a failure (rate limit, server error), with exponential back-off up to a minute."
    judge_price_input: float = 0.0
    "API judges (openai:): USD per million tokens sent, from the provider's price list, for the dry run's cost estimate (0 = not set: the dry run gives the tokens and wall time only). Read by nothing else."
    judge_price_output: float = 0.0
    "API judges (openai:): USD per million tokens received (a pairwise verdict is one token), for the dry run's cost estimate, like judge_price_input."


@dataclass
class Config:
    version: int = CONFIG_VERSION
    "Config format version."
    method: str = "sgpo"
    "Alignment method: a name of sgpo.core.registry.METHODS (see sgpo/methods)."
    seed: int = 0
    "Run seed: sampling seeds are derived from (seed, round, prompt id, role)."
    rounds: int = 2
    "Self-generated preference rounds T."
    report_to: str = "none"
    "Experiment trackers: none, or tensorboard, wandb, trackio, mlflow (several: a list, or names separated by commas). Logs go under RUN/logs; see sgpo/core/trackers.py for what is logged."
    collective_timeout_minutes: float = 360.0
    "Under a launcher: how long a process waits at a collective (a barrier, the main process's judge verdicts, a rollout's results) for the others before the run fails. NCCL's default of 10 minutes is shorter than one rollout or judge pass at paper scale."
    sft: bool = True
    "Run SFT on the references first (data.sft_size prompts): the paper starts every method from an SFT model; here it also teaches the model to finish within the budget."
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    improver: ImproverConfig = field(default_factory=ImproverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


FIELD_NAMES = ("prompt", "response", "completion", "messages", "instruction", "input", "output", "chosen", "rejected")
CHOICES = {
    "method": METHODS.names(),
    "improver.target": ("interpolate", "reference"),
    "dpo.reference": ("round_start", "initial"),
    "generation.backend": ("auto", "engine", "vllm"),
    "dpo.loss": LOSSES.names(),
    "data.on_long_prompt": ("truncate", "skip"),
    "data.on_error": ("raise", "skip"),
    "pairs.require_finished": ("none", "chosen_if_rejected", "chosen", "both"),
}


AT_LEAST = {
    "rounds": 0, "data.dev_size": 0, "data.test_size": 0, "data.sft_size": 0, "data.improver_size": 0, "data.round_size": 1, "data.max_prompt_tokens": 1,
    "data.max_reference_tokens": 1, "improver.chain": 1, "improver.mix_policy": 0.0,
    "improver.experimental.drafts_per_prompt": 1, "improver.experimental.rewrite_samples": 1,
    "generation.max_new_tokens": 1, "generation.batch_size": 1, "generation.temperature": 0.0,
    "train.batch_size": 1, "train.epochs": 0, "train.warmup_steps": 0, "train.checkpoint_every": 0,
    "train.checkpoint_minutes": 0.0, "dpo.batch_size": 1, "dpo.epochs": 0, "dpo.improver_nll_coef": 0.0,
    "dpo.checkpoint_every": 0, "dpo.checkpoint_minutes": 0.0,
    "eval.improver_size": 0, "eval.head_to_head_size": 0, "eval.agreement_size": 1, "eval.judge_concurrency": 1,
    "eval.judge_retries": 0, "eval.judge_price_input": 0.0, "eval.judge_price_output": 0.0,
}
IN_RANGE = {"collective_timeout_minutes": (0, float("inf")), "improver.step": (0, 1), "generation.top_p": (0, 1), "dpo.beta": (0, float("inf")),
            "train.lr": (0, float("inf")), "dpo.lr": (0, float("inf")), "generation.vllm_gpu_memory": (0, 1)}
ZERO_IS_DEFAULT = {"generation.vllm_gpu_memory"}  # 0 = a default decided at run time (IN_RANGE otherwise)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    if key == "report_to" and isinstance(value, list):  # a YAML list of trackers
        value = ",".join(map(str, value))
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(typ, value, key + ".")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{key}: expected a mapping of names to column names, got {value!r}")
        return dict(value)
    if typ in (int, float, str, bool):
        if typ is str and isinstance(value, dict):  # `judge: openai:` or `a: b: c` unquoted
            raise ConfigError(f"{key}: expected a string, got a mapping ({value!r}): YAML reads a value with ': ' "
                              "in it or ending in ':' as a key and its value; quote the value")
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} ({value!r})")
        return value
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        closest = closest_key(prefix + str(unknown[0]))
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'"
                          + (f": did you mean {closest}?" if closest else "") + f" (known under '{prefix or '.'}': {', '.join(sorted(names))})")
    obj = cls()
    for k, v in values.items():
        setattr(obj, k, _coerce(prefix + k, hints[k], v))
    return obj


def dotted_keys(cls=None, prefix: str = "") -> list[str]:
    """Every key of ``cls`` (default ``Config``) as a dotted name, sections included (``data``, ``data.sft``, …)."""
    out = []
    for f in dataclasses.fields(cls or Config):
        typ = typing.get_type_hints(cls or Config)[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(typ):
            out += dotted_keys(typ, prefix + f.name + ".")
    return out


def closest_key(key: str) -> str | None:
    """The known key a mistyped one most likely meant: one of the same name in another section (``round_size`` →
    ``data.round_size``), else the closest dotted name or last part by ``difflib``; None when nothing is close."""
    known = dotted_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != key]
    if same_leaf:
        return same_leaf[0]
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if near:
        return near[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[near[0]] if near else None


def key_type(dotted: str):
    """The type of the config key ``dotted`` (None when there is no such key)."""
    cls = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def validate(cfg: Config) -> Config:
    from sgpo.core.trackers import TrackerError, names as tracker_names

    if cfg.version > CONFIG_VERSION:
        raise ConfigError(f"version: this config is from a newer sgpo (version {cfg.version}; "
                          f"this sgpo reads up to {CONFIG_VERSION})")
    for key, allowed in CHOICES.items():
        v = get(cfg, key)
        if v not in allowed:
            raise ConfigError(f"{key}: '{v}' is not one of {', '.join(allowed)}")
    try:
        tracker_names(cfg.report_to)
    except TrackerError as e:
        raise ConfigError(str(e)) from None
    for key, lo in AT_LEAST.items():
        if get(cfg, key) < lo:
            raise ConfigError(f"{key}: must be ≥ {lo}, got {get(cfg, key)}")
    for key, (lo, hi) in IN_RANGE.items():
        if not (lo < get(cfg, key) <= hi or (key in ZERO_IS_DEFAULT and get(cfg, key) == 0)):
            raise ConfigError(f"{key}: must be in ({lo}, {hi}], got {get(cfg, key)}")
    if cfg.improver.instruction and ("{reference}" in cfg.improver.instruction) != cfg.improver.sees_reference:
        raise ConfigError("improver.instruction: " + ("improver.sees_reference needs a {reference} placeholder in it"
                          if cfg.improver.sees_reference else "it has a {reference} placeholder but "
                          "improver.sees_reference is false (set it to true for reading B)"))
    if cfg.improver.sees_reference and cfg.dpo.improver_nll_coef > 0:
        raise ConfigError("dpo.improver_nll_coef: not available with improver.sees_reference (the pairs do not carry "
                          "the references the improver input would need)")
    for key in ("eval.judge", "eval.second_judge", "pairs.verify"):
        if get(cfg, key):
            try:
                parse_judge_spec(get(cfg, key))
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
    unknown = sorted(set(cfg.data.fields) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"data.fields: '{unknown[0]}' is not an accepted field name ({', '.join(FIELD_NAMES)})")
    if cfg.pairs.verify and cfg.pairs.verify == cfg.eval.second_judge:
        raise ConfigError("pairs.verify: the judge that selects pairs cannot also be eval.second_judge, the judge of "
                          "their agreement")
    return cfg


def get(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    return validate(_build(Config, values or {}))


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None = all defaults: the embedded default experiment) and apply ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error(str(p), e)) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
    for item in overrides:
        apply_override(values, item)
    return from_dict(values)


def yaml_error(where: str, e: "yaml.YAMLError") -> str:
    """A YAML syntax error in one line: ``FILE:LINE:COLUMN: not valid YAML: what`` (1-based, where the parser
    stopped), with what it was reading when the parser says."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return f"{where}{at}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def apply_override(values: dict, item: str) -> None:
    """``key=value`` (``--set``) into the nested ``values``. The value is read as YAML (numbers, booleans, lists), but
    a string key takes any value that is not a string or a list as the text given: ``eval.judge=openai:`` is the
    text ``openai:``, not a mapping."""
    key, eq, raw = item.partition("=")
    if not eq or not key:
        raise ConfigError(f"override '{item}' must look like key=value")
    node = values
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    text = key_type(key.strip()) is str
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        if not text:
            raise ConfigError(f"override '{item}': the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
        value = raw.strip()
    if text and not isinstance(value, (str, list)):
        value = raw.strip()
    node[parts[-1]] = value


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += diff(a, b, prefix + k + ".")
        elif a != b:
            keys.append(prefix + k)
    return keys
