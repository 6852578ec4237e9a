"""Error messages for malformed user files: each names the file, the line (or record) and what is wrong."""
import json
import re

import pytest

from sgpo.data.records import DataError, load_records
from sgpo.eval import alpaca_eval, arena_hard


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _annotation(pref=2.0):
    return {"instruction": "q", "output_1": "base", "output_2": "model", "generator_1": "b", "generator_2": "m",
            "preference": pref}


def _judgment(uid, model="m"):
    return {"uid": uid, "model": model, "baseline": "base", "games": [{"verdict": "B>A"}, {"verdict": "A>B"}]}


# --------------------------------------------------------------------------- conversations (sgpo.data.records)
def test_conversation_without_the_assistant_reply_names_file_line_and_role(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}]}]
    p = _jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_records(str(p), need="reference")
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ")
    assert "ends with a 'user' message" in msg
    assert "the last message must be the assistant's reply (the SFT reference)" in msg
    assert "missing field 'response'" not in msg
    # skipped rows are counted under one reason
    recs, rep = load_records(str(p), need="reference", on_error="skip")
    assert len(recs) == 1 and rep.skipped == {"no reference response": 1}


def test_conversation_ending_with_the_user_is_a_valid_prompt(tmp_path):
    p = _jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    (rec,), _ = load_records(str(p))
    assert rec.prompt == (("user", "only a question"),) and rec.reference is None


def test_conversation_with_an_empty_reply_says_so(tmp_path):
    p = _jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "  "}]}])
    with pytest.raises(DataError, match=r"sft\.jsonl:1: the assistant's reply .* is empty"):
        load_records(str(p), need="reference")


def test_conversation_ending_with_a_system_message_names_the_role(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                    {"role": "system", "content": "s"}]}])
    with pytest.raises(DataError) as e:
        load_records(str(p))
    assert str(e.value).startswith(f"{p}:1: ") and "ends with a 'system' message" in str(e.value)


def test_instruction_rows_name_their_own_reference_field(tmp_path):
    p = _jsonl(tmp_path / "i.jsonl", [{"instruction": "do it"}])
    with pytest.raises(DataError, match=r"i\.jsonl:1: missing field 'output'"):
        load_records(str(p), need="reference")


def test_preference_side_ending_with_a_user_message_is_named(tmp_path):
    p = _jsonl(tmp_path / "pref.jsonl", [{"prompt": "q", "chosen": [{"role": "user", "content": "c"}],
                                          "rejected": "r"}])
    with pytest.raises(DataError) as e:
        load_records(str(p), need="preference")
    assert str(e.value).startswith(f"{p}:1: ") and "field 'chosen' ends with a 'user' message" in str(e.value)


def test_message_errors_name_the_field_they_come_from(tmp_path):
    p = _jsonl(tmp_path / "pref.jsonl", [{"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match=r"pref\.jsonl:1: field 'prompt\[0\]' needs 'role' and 'content'"):
        load_records(str(p), need="preference")


# --------------------------------------------------------------------------- AlpacaEval annotations
def test_truncated_annotations_json_names_the_file_line_and_column(tmp_path):
    p = tmp_path / "model.annotations.json"
    p.write_text(json.dumps([_annotation(), _annotation(1.0)], indent=1)[:-40])
    with pytest.raises(ValueError) as e:
        alpaca_eval.main_metrics(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid JSON in the annotations file at line ")
    assert ", column " in msg and "cut short" in msg


def test_annotations_with_a_missing_field_name_the_field_and_record(tmp_path):
    bad = _annotation()
    del bad["output_2"]
    p = tmp_path / "a.json"
    p.write_text(json.dumps([_annotation(), bad]))
    with pytest.raises(ValueError) as e:
        alpaca_eval.main_metrics(p)
    assert str(e.value).startswith(f"{p}[1]: missing field 'output_2'")


def test_annotations_with_a_bad_preference_name_the_field(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([_annotation("two")]))
    with pytest.raises(ValueError, match=r"a\.json\[0\]: field 'preference' .* must be a number"):
        alpaca_eval.main_metrics(p)


def test_annotations_that_are_not_a_list_are_named(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"preference": 2}))
    with pytest.raises(ValueError, match=r"a\.json: the annotations file must hold a JSON list"):
        alpaca_eval.main_metrics(p)


def test_good_annotations_still_score(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([_annotation(2.0), _annotation(1.0), _annotation(None)]))
    m = alpaca_eval.main_metrics(p)
    assert m["n_total"] == 2 and m["win_rate"] == pytest.approx(50.0)


def test_benchmark_prompts_file_with_a_missing_field_is_named(tmp_path):
    p = tmp_path / "outputs.json"
    p.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "r"}]))
    with pytest.raises(ValueError) as e:
        alpaca_eval.load_alpaca_eval(p)
    assert str(e.value).startswith(f"{p}[1]: missing field 'output'")


# --------------------------------------------------------------------------- Arena-Hard judgments
def test_judgments_jsonl_with_a_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "judgments.jsonl"
    p.write_text(json.dumps(_judgment("q1")) + "\n\n" + '{"uid": "q2", "model": "m", "games": [\n')
    with pytest.raises(ValueError) as e:
        arena_hard.main_metrics(p, "v2.0", n_boot=0)
    assert str(e.value).startswith(f"{p}:3: invalid JSON in the judgments file")


def test_judgments_with_a_missing_field_name_the_field_and_line(tmp_path):
    bad = _judgment("q2")
    del bad["model"]
    p = _jsonl(tmp_path / "judgments.jsonl", [_judgment("q1"), bad])
    with pytest.raises(ValueError) as e:
        arena_hard.main_metrics(p, "v2.0", n_boot=0)
    assert str(e.value).startswith(f"{p}:2: missing field 'model'")


def test_judgments_given_as_one_json_list_are_explained(tmp_path):
    p = tmp_path / "judgments.jsonl"
    p.write_text(json.dumps([_judgment("q1"), _judgment("q2")]))
    with pytest.raises(ValueError, match=r"judgments\.jsonl:1: each line of the judgments file must be a JSON object"):
        arena_hard.main_metrics(p, "v2.0", n_boot=0)


def test_answers_file_without_answer_text_names_file_and_line(tmp_path):
    (tmp_path / "model_answer").mkdir()
    _jsonl(tmp_path / "question.jsonl", [{"uid": "q1", "prompt": "p"}])
    answers = _jsonl(tmp_path / "model_answer" / "gpt-4-0314.jsonl", [{"uid": "q1", "choices": []}])
    with pytest.raises(ValueError) as e:
        arena_hard.load_arena_hard_v01(tmp_path)
    assert str(e.value).startswith(f"{answers}:1: missing field 'choices'")


def test_cli_metrics_prints_the_named_error(tmp_path, capsys):
    from sgpo.cli.main import main

    p = tmp_path / "a.json"
    p.write_text('[{"output_1": "a", "output_2": "b", "preference": 2}, {"output_1"')
    assert main(["metrics", "alpaca-eval", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"sgpo: error: {p}: invalid JSON in the annotations file at line 1" in err


def test_a_missing_data_source_says_whether_it_was_looked_for_as_a_file_or_a_hub_dataset(monkeypatch):
    import datasets

    for path in ("data/my_sfts.jsonl", "/nodata", "./data/sft"):  # a suffix, or not shaped as 'owner/name'
        with pytest.raises(DataError, match=rf"^{re.escape(path)}: no such file \(looked for as a local file, from "):
            load_records(path)

    def offline(*args, **kwargs):
        raise ConnectionError("the hub is offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_records("someone/nothing")
    assert str(e.value) == ("someone/nothing: no local file or folder of that name, and as a hub dataset it cannot be "
                            "loaded (ConnectionError: the hub is offline)")
