"""The run's data: SFT records loaded and cut, split by a fixed seed into a training pool, development prompts (tuning,
per-stage figures) and test prompts (the reported figures only), and the pool dealt out in order — first the improver
slice, then one slice per round, then the SFT slice. Anything cut, skipped or reused is logged with a count."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

from sgpo.models import templates
from sgpo.config.schema import Config
from sgpo.data.records import Record, cut_reference, load_records, split_dev

log = logging.getLogger("sgpo")


@dataclass
class Splits:
    train: list[Record]       # the training pool (references cut to the token limit)
    dev: list[Record]         # held out: tuning, improver figures and per-stage head-to-head
    test: list[Record] = field(default_factory=list)       # held out: the reported figures only, never tuned on
    sft: list[Record] = field(default_factory=list)        # the SFT slice (``sft: true``)
    improver: list[Record] = field(default_factory=list)   # the improver slice (reserved for every method)
    rounds: list[list[Record]] = field(default_factory=list)  # the prompts of round 1, 2, ...

    def seen(self, sft: bool) -> list[Record]:
        """The prompts the methods with rounds see, each once, with their references: the SFT slice (when ``sft``),
        the improver slice and every round's. SFT alone trains on these, so that every method sees the same prompts."""
        both = (self.sft if sft else []) + self.improver + [r for rs in self.rounds for r in rs]
        return list({r.id: r for r in both}.values())


def prepare_splits(cfg: Config, tokenizer, load: Callable = load_records) -> Splits:
    """The run's splits. ``load(source, **options)`` → (records, report) reads a data source; without a tokenizer
    (a dry run) references are not cut and prompt lengths not checked."""
    d = cfg.data
    records, report = load(d.sft, need="reference", **d.read_options())
    log.info("data: %s", report.summary())
    cut = fit_to_budget(records, tokenizer, d) if tokenizer is not None else records
    train, dev, *test = split_dev(cut, d.dev_size, d.split_seed, d.test_size)
    if d.prompts:
        extra, rep = load(d.prompts, **d.read_options())
        log.info("round prompts: %s", rep.summary())
        dev_ids = {r.id for r in dev}
        train = [r for r in extra if r.id not in dev_ids]
    warn_held_out(len(cut), len(dev), len(test[0]) if test else 0, len(train), cfg)
    if not dev:
        log.warning("data: no development prompts (data.dev_size=%d, %d records): the run computes no head-to-head "
                    "or improver figures", d.dev_size, len(cut))
    log.info("data: split (seed %d) into %d training, %d development and %d test prompts", d.split_seed, len(train),
             len(dev), len(test[0]) if test else 0)
    return deal(Splits(train, dev, test[0] if test else []), cfg)


def warn_held_out(n: int, dev: int, test: int, pool: int, cfg: Config) -> None:
    """A warning when the test and development splits take most of the ``n`` records and leave a training pool
    (``pool`` prompts) smaller than its slices ask for (``data.test_size``'s default of 200 takes 9 of a 10-row
    file), naming the keys to change and what each split asked for and got. A large test split by choice, the rest
    enough for the slices (``configs/verifiable.yaml``), is not warned about."""
    d = cfg.data
    asked = d.improver_size + cfg.rounds * d.round_size + (d.sft_size if cfg.sft else 0)
    if not n or dev + test <= n / 2 or pool >= asked:
        return
    log.warning("data: the test and development splits take %d of the %d records (test: data.test_size=%d, got %d; "
                "development: data.dev_size=%d, got %d), leaving %d for training where the run's slices ask for %d "
                "prompts: for data this small lower data.test_size and data.dev_size (e.g. --set data.test_size=%d "
                "--set data.dev_size=%d)", dev + test, n, d.test_size, test, d.dev_size, dev, pool, asked,
                max(n // 10, 1 if d.test_size else 0), min(d.dev_size, n // 10))


def fit_to_budget(records: list[Record], tokenizer, d) -> list[Record]:
    """References cut at a sentence boundary under ``data.max_reference_tokens``; prompts longer than
    ``data.max_prompt_tokens`` skipped or kept (the rollouts cut their start), counted either way."""
    cut = cut_references(records, tokenizer, d.max_reference_tokens)
    over = [(r, len(templates.policy_ids(tokenizer, r.prompt)) - d.max_prompt_tokens) for r in cut]
    over = [(r, n) for r, n in over if n > 0]
    if over and d.on_long_prompt == "skip":
        log.warning("data: skipped %d of %d prompts longer than data.max_prompt_tokens=%d", len(over), len(cut),
                    d.max_prompt_tokens)
        long_ids = {r.id for r, _ in over}
        cut = [r for r in cut if r.id not in long_ids]
    elif over:
        log.warning("data: %d of %d prompts are longer than data.max_prompt_tokens=%d and lose their start (the end, "
                    "with the question and the generation prompt, is kept): by %d tokens on average, at most %d",
                    len(over), len(cut), d.max_prompt_tokens, round(sum(n for _, n in over) / len(over)),
                    max(n for _, n in over))
    return cut


def cut_references(records: list[Record], tokenizer, max_tokens: int) -> list[Record]:
    """References as trained: cut at a sentence boundary under ``max_tokens`` tokens. Records with verifiable
    constraints (``fields``: ``instruction_id_list`` and the uncut ``base_response``) get theirs made after the cut
    instead, so that what is trained satisfies its constraints (``verifiable.py``); one that cannot is dropped, and
    the counts per constraint type are logged."""
    from sgpo.data.verifiable import fit_reference, summary_line

    out, outcomes = [], []
    for r in records:
        if "instruction_id_list" not in r.fields or "base_response" not in r.fields:
            out.append(dataclasses.replace(r, reference=cut_reference(r.reference, tokenizer, max_tokens)))
            continue
        text, why = fit_reference(r.fields, tokenizer, max_tokens)
        outcomes.append((r.fields, why))
        if text is not None:
            out.append(dataclasses.replace(r, reference=text))
    if outcomes:
        log.info("data: verifiable references under %d tokens: %s", max_tokens, summary_line(outcomes))
    return out


def deal(s: Splits, cfg: Config) -> Splits:
    """The improver slice, then ``rounds`` slices of ``round_size``, then the SFT slice (``sft_size``; 0 = the whole
    pool, which holds the other slices too, as in the paper: SFT on all the data, then rounds on its prompts), in pool
    order; a pool too small wraps around (its prompts are reused, and the log says how many)."""
    d = cfg.data
    s.improver = take(s.train, 0, d.improver_size)
    cursor = len(s.improver)
    for _ in range(cfg.rounds):
        s.rounds.append(take(s.train, cursor, d.round_size))
        cursor += len(s.rounds[-1])
    s.sft = take(s.train, cursor, d.sft_size or len(s.train))
    if cfg.sft and d.sft_size:
        cursor += len(s.sft)
    elif cfg.sft:
        log.info("data: SFT on the whole training pool (%d prompts, data.sft_size=0), the improver and round prompts "
                 "among them", len(s.sft))
    if cursor > len(s.train):
        log.warning("data: the training pool has %d prompts but its slices take %d (asked → got: %s; a slice is at "
                    "most the whole pool): %d prompts are used more than once", len(s.train), cursor,
                    _asked_and_got(s, cfg), cursor - len(s.train))
    return s


def _asked_and_got(s: Splits, cfg: Config) -> str:
    """What each slice of the pool asked for and what it got, for the reuse warning."""
    d = cfg.data
    parts = [f"the improver slice (data.improver_size) {d.improver_size} → {len(s.improver)}",
             f"{cfg.rounds} rounds (data.round_size) {d.round_size} → {len(s.rounds[0]) if s.rounds else 0} each"]
    if cfg.sft and d.sft_size:
        parts.append(f"the SFT slice (data.sft_size) {d.sft_size} → {len(s.sft)}")
    return ", ".join(parts)


def take(pool: list[Record], start: int, n: int) -> list[Record]:
    """``n`` records from ``pool`` starting at ``start``, wrapping around a small pool (at most the whole pool)."""
    if not pool or n <= 0:
        return []
    return [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
