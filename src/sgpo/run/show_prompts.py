"""``sgpo run CONFIG --show-prompts [N]``: the first N rows of ``data.sft`` as the model sees them; nothing is run.

For each row, with its token count and what was cut:

policy input     P(x): the chat template applied (``model.chat_template`` or the tokenizer's own), cut to its last
                 ``data.max_prompt_tokens`` tokens as the rollouts and training cut it
improver input   I(x, y) — I(x, y, y*) under reading B (``improver.sees_reference``), the reference being the one as
                 trained — with a stand-in where the policy's draft goes (no model drafts here), counted without it
reference        y* as trained: cut at a sentence boundary under ``data.max_reference_tokens`` (or, for a row with
                 verifiable constraints, made to meet them), then EOS

Only the tokenizer is loaded, not the model. The rows are read as a run reads them (``data.fields``, ``data.on_error``;
duplicate prompts kept once), in the order of the source.
"""
from __future__ import annotations

from sgpo.models import templates
from sgpo.config.schema import Config, ConfigError
from sgpo.data.records import Record, load_records
from sgpo.models.loading import load_tokenizer
from sgpo.generation.rollout import cut_prompt
from sgpo.data.splits import cut_references
from sgpo.core.text import _SENTENCE_END

DRAFT = "⟨the policy's draft⟩"
"""What the improver input shows where the draft goes; its tokens are not counted."""
TAIL_CHARS = 160
"""How much of a cut-off reference tail is printed."""


def show_prompts(cfg: Config, n: int = 3) -> str:
    """The report ``--show-prompts`` prints: a header, then each of the first ``n`` rows' three inputs."""
    if n < 1:
        raise ConfigError(f"--show-prompts: N must be ≥ 1, got {n}")
    d = cfg.data
    records, report = load_records(d.sft, need="reference", **d.read_options())
    tok = load_tokenizer(cfg.model.name, cfg.model.chat_template)
    shown = records[:n]
    template = (f"model.chat_template={cfg.model.chat_template}" if cfg.model.chat_template
                else "the tokenizer's own chat template")
    lines = [f"show prompts: the first {len(shown)} rows of data.sft ({report.summary()}), rendered with the tokenizer "
             f"of {cfg.model.name} and {template}; method {cfg.method}. Nothing was run; no model was loaded."]
    if d.prompts:
        lines.append(f"(the rounds' prompts come from data.prompts, {d.prompts}: rendered the same way, not shown)")
    for i, r in enumerate(shown, 1):
        lines += ["", f"=== row {i} (id {r.id}) ==="] + row_lines(cfg, tok, r)
    return "\n".join(lines) + "\n"


def row_lines(cfg: Config, tok, record: Record) -> list[str]:
    """One row's three sections; the improver input holds the reference as trained, as in a run."""
    trained = cut_references([record], tok, cfg.data.max_reference_tokens)
    as_trained = trained[0].reference if trained else None
    return (policy_lines(cfg, tok, record) + improver_lines(cfg, tok, record, as_trained)
            + reference_lines(cfg, tok, record, as_trained))


def policy_lines(cfg: Config, tok, record: Record) -> list[str]:
    d = cfg.data
    ids = templates.policy_ids(tok, record.prompt)
    over = len(ids) - d.max_prompt_tokens
    if over <= 0:
        cut = "nothing cut"
    elif d.on_long_prompt == "skip":
        cut = f"{_tokens(over)} too long: the run skips this row (data.on_long_prompt: skip)"
    else:
        cut = f"its first {_tokens(over)} are cut, the end is kept (data.on_long_prompt: truncate); shown as cut"
    shown = ids if d.on_long_prompt == "skip" else cut_prompt(ids, d.max_prompt_tokens)
    return [f"--- policy input P(x): {_tokens(len(ids))} (data.max_prompt_tokens={d.max_prompt_tokens}): {cut}",
            tok.decode(shown)]


def improver_lines(cfg: Config, tok, record: Record, reference: str | None) -> list[str]:
    """I(x, y[, y*]) with ``DRAFT`` standing in for y, counted with an empty draft; ``reference``: as trained."""
    limit, longest = cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens
    instruction, sees = templates.improver_instruction(cfg.improver), cfg.improver.sees_reference
    ref = (reference or "") if sees else ""
    base = len(templates.improver_ids(tok, record.prompt, "", instruction, ref))
    if base > limit:
        cut = f"its first {_tokens(base - limit)} are cut before any draft is added; shown as cut"
    elif base + longest > limit:
        cut = f"a draft over {_tokens(limit - base)} makes it lose its start; shown uncut"
    else:
        cut = "nothing cut"
    shown = templates.improver_ids(tok, record.prompt, DRAFT, instruction, ref)
    name = "I(x, y, y*)" if sees else "I(x, y)"
    return [f"--- improver input {name} (improver.sees_reference: {str(sees).lower()}): {base} tokens without the "
            f"draft, at most {base + longest} with a draft of up to generation.max_new_tokens={longest} "
            f"(data.max_prompt_tokens={limit}): {cut}; {DRAFT} stands for the draft",
            tok.decode(cut_prompt(shown, limit) if base > limit else shown)]


def reference_lines(cfg: Config, tok, record: Record, trained: str | None) -> list[str]:
    """The reference as trained against the one read, and what the cut took off."""
    limit = cfg.data.max_reference_tokens
    original = record.reference.strip()
    total = len(tok(original, add_special_tokens=False)["input_ids"])
    head = f"--- reference y* as trained (data.max_reference_tokens={limit})"
    if trained is None:
        return [f"{head}: none; no reference under {limit} tokens meets this row's constraints, so the run drops it",
                original]
    kept = len(templates.completion_ids(tok, trained, eos=False))
    counts = f"{_tokens(kept)} + EOS {tok.eos_token}"
    verifiable = "instruction_id_list" in record.fields and "base_response" in record.fields
    if verifiable:
        what = f"made from the row's base_response to meet its constraints (the reference read: {_tokens(total)})"
    elif trained == original:
        what = "not cut"
    else:
        at_sentence = trained.endswith(_SENTENCE_END) or original[len(trained):].startswith("\n")
        where = "a sentence boundary" if at_sentence else "the end of a word (no sentence boundary fits)"
        what = f"cut from {total} tokens at {where}; cut off: {_tail(original, trained)}"
    return [f"{head}: {counts}, {what}", trained]


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _tail(original: str, kept: str) -> str:
    """The part of ``original`` after ``kept``, quoted and shortened to ``TAIL_CHARS``."""
    rest = original[len(kept):].strip()
    return repr(rest if len(rest) <= TAIL_CHARS else rest[:TAIL_CHARS] + "…")
