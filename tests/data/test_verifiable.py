"""``sgpo:verifiable-instructions``: AlpacaEval's instructions with verifiable constraints, references made to satisfy
them after the run's cut and checked by IFEval's checkers; none of IFEval's prompts among them."""
import pytest

from sgpo.data.records import load_records
from sgpo.data.records import package_data_dir
from sgpo.data.verifiable import TYPES, failing, fit_reference, iter_rows, summary_line

ALPACA = package_data_dir("eval_framework") / "tasks" / "alpaca_eval" / "data" / "alpaca_eval_gpt4_baseline.json"


@pytest.fixture(scope="module")
def rows():
    return [row for row, _ in iter_rows(ALPACA)]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from sgpo.models.loading import load_tokenizer

    return load_tokenizer("sgpo:smollm2-135m-instruct")


def test_the_rows_are_the_same_every_time_and_one_per_instruction(rows):
    again = [row for row, _ in iter_rows(ALPACA)]
    assert again == rows and len(rows) == 805
    assert len({r["base_prompt"] for r in rows}) == len({r["prompt"] for r in rows}) == 805
    assert {k for r in rows for k in r["instruction_id_list"]} == set(TYPES)  # every type is drawn
    assert all(1 <= len(r["instruction_id_list"]) <= 2 for r in rows)
    # case changes and highlights only where the answer holds no code (a highlight once wrapped a ``` fence)
    touchy = {"change_case:english_lowercase", "change_case:english_capital",
              "detectable_format:number_highlighted_sections"}
    assert not [r for r in rows if touchy & set(r["instruction_id_list"]) and "`" in r["base_response"]]


def test_constraints_are_compatible_by_ifeval_s_conflict_table(rows):
    from sgpo.eval.ifeval import ifeval_module

    table = ifeval_module().instructions_registry.INSTRUCTION_CONFLICTS
    for r in rows:
        ids = r["instruction_id_list"]
        assert len(set(ids)) == len(ids)
        for a in ids:
            for b in ids:
                assert a == b or (b not in table[a] and a not in table[b]), (a, b)
        # the wording is IFEval's own, after the instruction
        assert r["prompt"].startswith(r["base_prompt"] + "\n\n")


def test_no_ifeval_prompt_is_in_the_data(rows):
    from sgpo.eval.ifeval import load_ifeval_prompts

    ifeval = {r["prompt"].strip() for r in load_ifeval_prompts()}
    assert len(ifeval) == 541
    assert not ifeval & ({r["prompt"].strip() for r in rows} | {r["base_prompt"] for r in rows})


def test_every_trained_reference_passes_its_checkers_after_the_cut(smollm2_tokenizer):
    """What the run trains (the reference made after the cut to data.max_reference_tokens) meets every constraint and
    fits the budget; the rows that cannot are dropped with a reason, and most survive."""
    records, _ = load_records("sgpo:verifiable-instructions", need="reference")
    sample = records[::4]  # 202 rows: every type, in seconds
    outcomes = []
    for r in sample:
        text, why = fit_reference(r.fields, smollm2_tokenizer, 96)
        outcomes.append((r.fields, why))
        if text is None:
            assert why
            continue
        assert len(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]) <= 96
        assert failing(r.fields, text) == []
    kept = sum(1 for _, why in outcomes if not why)
    assert kept >= 0.8 * len(sample)
    assert summary_line(outcomes).startswith(f"{kept} of {len(sample)} rows kept (")


def test_a_reference_that_cannot_be_made_is_dropped_with_its_reason(smollm2_tokenizer):
    fields = {"instruction_id_list": ["length_constraints:number_sentences"],
              "kwargs": [{"relation": "at least", "num_sentences": 30}], "base_prompt": "Say hi.",
              "base_response": "Hi. Hello there."}
    assert fit_reference(fields, smollm2_tokenizer, 96) == (None, "fails length_constraints:number_sentences after "
                                                                   "the cut")
    fields = {**fields, "instruction_id_list": ["combination:repeat_prompt"],
              "kwargs": [{"prompt_to_repeat": "word " * 200}]}
    assert fit_reference(fields, smollm2_tokenizer, 96) == (None, "does not fit")
    line = summary_line([(fields, "does not fit"), (fields, "")])
    assert line == "1 of 2 rows kept (repeat_prompt 1/2); dropped: 1 does not fit"


def test_the_run_s_splits_train_only_references_that_pass(smollm2_tokenizer):
    from sgpo.config.schema import Config
    from sgpo.data.splits import fit_to_budget

    records, _ = load_records("sgpo:verifiable-instructions", need="reference")
    cfg = Config()
    cut = fit_to_budget(records[:40], smollm2_tokenizer, cfg.data)
    assert 30 <= len(cut) <= 40
    for r in cut:
        assert r.fields["instruction_id_list"] and failing(r.fields, r.reference) == []
        assert r.row()["instruction_id_list"] == r.fields["instruction_id_list"]
