import json

import pytest

from sgpo.data.records import DataError, cut_reference, load_records, split_dev


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_and_shapes(tmp_path):
    rows = [{"prompt": "Hi?", "response": "Hello."},
            {"instruction": "Add", "input": "1+1", "output": "2"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                          {"role": "assistant", "content": "Blue."}]}]
    recs, rep = load_records(str(_jsonl(tmp_path / "a.jsonl", rows)), need="reference")
    assert [r.reference for r in recs] == ["Hello.", "2", "Blue."]
    assert recs[1].prompt_text == "Add\n\n1+1"
    assert recs[2].prompt == (("system", "Be brief."), ("user", "Name a colour."))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    assert [r.reference for r in load_records(str(tmp_path / "b.json"))[0]] == ["Hello.", "2", "Blue."]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]),
                   tmp_path / "c.parquet")
    assert [r.reference for r in load_records(str(tmp_path / "c.parquet"))[0]] == ["r1", "r2"]
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "response": "a"}]).save_to_disk(str(tmp_path / "hf"))
    assert load_records(str(tmp_path / "hf"))[0][0].reference == "a"


def test_preference_rows(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": [{"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}]
    recs, _ = load_records(str(_jsonl(tmp_path / "p.jsonl", rows)), need="preference")
    assert (recs[0].chosen, recs[0].rejected) == ("good", "bad")
    assert (recs[1].prompt_text, recs[1].chosen, recs[1].rejected) == ("q", "c", "r")


def test_malformed_row_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "broken"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_records(str(p))
    recs, rep = load_records(str(p), on_error="skip")
    assert len(recs) == 1 and sum(rep.skipped.values()) == 1


@pytest.mark.parametrize("row, field", [({"response": "x"}, "prompt"), ({"prompt": 3}, "prompt"),
                                        ({"prompt": "   "}, "prompt"), ({"messages": []}, "messages")])
def test_missing_or_bad_field_is_named(tmp_path, row, field):
    p = _jsonl(tmp_path / "f.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_records(str(p))
    assert "f.jsonl:1" in str(e.value) and f"'{field}'" in str(e.value)


def test_sft_data_needs_a_reference_and_empty_is_an_error(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"prompt": "only a prompt"}])
    assert load_records(str(p))[0][0].reference is None
    with pytest.raises(DataError, match="q.jsonl:1: missing field 'response'"):
        load_records(str(p), need="reference")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_duplicates_counted_and_split_is_fixed(tmp_path):
    rows = [{"prompt": f"p{i % 10}", "response": "r"} for i in range(12)]
    recs, rep = load_records(str(_jsonl(tmp_path / "d.jsonl", rows)))
    assert len(recs) == 10 and rep.skipped["duplicate prompt"] == 2
    a = split_dev(recs, 3, seed=7)
    b = split_dev(recs, 3, seed=7)
    assert [r.id for r in a[1]] == [r.id for r in b[1]] and len(a[1]) == 3 and len(a[0]) == 7
    assert not {r.id for r in a[0]} & {r.id for r in a[1]}


def test_embedded_default_data():
    recs, _ = load_records("sgpo:arena-hard-v2", need="reference")
    assert len(recs) == 750 and all(r.reference for r in recs)
    alp, _ = load_records("sgpo:alpaca-eval", need="reference")
    assert len(alp) >= 800


def test_cut_reference_at_sentence_boundary(tiny_tokenizer):
    text = "First sentence here. Second one follows! " + "word " * 200
    cut = cut_reference(text, tiny_tokenizer, 20)
    assert cut == "First sentence here. Second one follows!"
    assert len(tiny_tokenizer(cut)["input_ids"]) <= 20
    assert cut_reference("Short.", tiny_tokenizer, 20) == "Short."


def test_a_column_mapping_reads_data_as_people_have_it(tmp_path):
    from sgpo.config import schema as config
    from sgpo.data.records import DataError, load_records

    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "What is 2+2?", "answer": "4."}\n{"question": "Name a colour.", "answer": "Red."}\n'
                    '{"question": ["not", "text"], "answer": "x"}\n{"query": "no question here", "answer": "y"}\n')
    fields = config.load(None, ["data.fields.prompt=question", "data.fields.response=answer"]).data.fields
    assert fields == {"prompt": "question", "response": "answer"}
    records, report = load_records(str(path), need="reference", fields=fields, on_error="skip")
    assert [(r.prompt_text, r.reference) for r in records] == [("What is 2+2?", "4."), ("Name a colour.", "Red.")]
    assert sum(report.skipped.values()) == 2
    with pytest.raises(DataError, match=r"qa.jsonl:3: field 'question' \(read as 'prompt'\)"):
        load_records(str(path), need="reference", fields=fields)
    (tmp_path / "q4.jsonl").write_text(path.read_text().splitlines()[3] + "\n")
    with pytest.raises(DataError, match=r"q4.jsonl:1: missing field 'question' \(data.fields reads it as 'prompt'\)"):
        load_records(str(tmp_path / "q4.jsonl"), fields=fields)
    with pytest.raises(config.ConfigError, match="data.fields: 'query' is not an accepted field name"):
        config.load(None, ["data.fields={query: question}"])


def test_a_hub_dataset_s_configuration_is_asked_for_by_name(monkeypatch):
    import datasets

    from sgpo.data.records import load_records

    asked = []

    def load_dataset(name, subset=None, split=None):
        asked.append((name, subset, split))
        return datasets.Dataset.from_list([{"prompt": "Hi", "response": "Hello."}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records, _ = load_records("someone/qa", split="train_sft", subset="en", need="reference")
    assert asked == [("someone/qa", "en", "train_sft")] and records[0].reference == "Hello."
    load_records("someone/qa")
    assert asked[-1] == ("someone/qa", None, "train")  # no subset: the dataset's default
