"""scripts/blind_reading.py: the hidden order is undone when scoring, bad labels and changed answers are errors."""
import importlib.util
import json
from pathlib import Path

import pytest

from sgpo.data.records import load_records

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("blind_reading", REPO / "scripts" / "blind_reading.py")
blind = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blind)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sheet(tmp_path):
    """Ten prompts; model A's answers are long, B's short."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}?", "response": "ref"}
                                                       for i in range(10)])
    ids = [r.id for r in load_records(prompts)[0]]
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": f"a long and careful answer to {i}"} for i in ids])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "output": "short"} for i in ids])
    out = tmp_path / "sheet"
    assert blind.write_sheet(prompts, a, b, 8, 3, out) == 8
    return out


def label_as(folder: Path, prefer_a: bool) -> None:
    """Label every item the way a reader who prefers A's answers (or B's) would, from what the sheet shows."""
    items = folder.joinpath("sheet.md").read_text().split("\n---\n")
    labels = []
    for item in items:
        first = item.split("**Answer 1**")[1].split("**Answer 2**")[0]
        labels.append("1" if ("long and careful" in first) == prefer_a else "2")
    folder.joinpath("labels.txt").write_text("\n".join(labels) + "\n")


def test_the_sheet_hides_the_order_and_score_undoes_it(sheet):
    key = [json.loads(x) for x in (sheet / "key.jsonl").read_text().splitlines()]
    assert {k["a_first"] for k in key} == {True, False}  # both orders are shown
    label_as(sheet, prefer_a=True)
    res = blind.score([sheet], [])
    assert res["reader"]["win_rate"] == 1.0 and res["decided"] == 8
    assert res["length"]["win_rate"] == 1.0  # the reader always chose the longer answer
    label_as(sheet, prefer_a=False)
    res = blind.score([sheet], [])
    assert res["reader"]["win_rate"] == 0.0 and res["length"]["win_rate"] == 0.0
    pooled = blind.score([sheet, sheet], [])
    assert pooled["decided"] == 16 and pooled["length"]["n"] == 16


def test_ties_count_half_for_the_reader_and_are_left_out_of_agreement(sheet):
    label_as(sheet, prefer_a=True)
    labels = (sheet / "labels.txt").read_text().splitlines()
    (sheet / "labels.txt").write_text("\n".join(["="] * 4 + labels[4:]) + "\n")
    res = blind.score([sheet], [])
    assert res["reader"]["win_rate"] == pytest.approx(0.75) and res["decided"] == 4
    assert res["length"]["n"] == 4


def test_a_bad_label_or_a_changed_answer_is_an_error(sheet, tmp_path):
    (sheet / "labels.txt").write_text("1\n" * 7 + "x\n")
    with pytest.raises(SystemExit, match="item 8: label 'x'"):
        blind.score([sheet], [])
    (sheet / "labels.txt").write_text("1\n" * 7)
    with pytest.raises(SystemExit, match="7 labels for 8 items"):
        blind.score([sheet], [])
    (sheet / "labels.txt").write_text("1\n" * 8)
    ids = [r.id for r in load_records(str(tmp_path / "prompts.jsonl"))[0]]
    write_jsonl(tmp_path / "b.jsonl", [{"id": i, "output": "changed"} for i in ids])
    with pytest.raises(SystemExit, match="answers changed"):
        blind.score([sheet], [])
