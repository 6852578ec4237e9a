"""Judges that are programs: ``ifeval`` (IFEval's own checkers on a row's constraints) and ``python:MODULE:FUNCTION``
(a user's scorer), wherever a judge serves — with rows, through the cache and into the round's exact pair figures."""
import json
import math
import sys

import pytest

from sgpo.eval.base import JudgeError, prefer
from sgpo.eval.judges import make_judge
from sgpo.methods.pairs import Pair, score_metrics


def _row(ids, kwargs, prompt="Write a poem about the sea."):
    return {"prompt": prompt, "reference": None, "instruction_id_list": ids, "kwargs": kwargs}


LOWER_END = _row(["change_case:english_lowercase", "startend:end_checker"],
                 [{}, {"end_phrase": "Is there anything else I can help with?"}])


def _official(rows, responses, loose):
    """IFEval's own evaluation: InputExamples read by the package's reader from its data file, its test functions
    (``random`` seeded as the judge seeds it: one row's checker draws a random letter, see ``seeded_random``)."""
    from sgpo.eval.ifeval import ifeval_data_path, ifeval_module, seeded_random

    m = ifeval_module()
    test = m.test_instruction_following_loose if loose else m.test_instruction_following_strict
    out = []
    for ex, r in zip(m.read_prompt_list(str(ifeval_data_path())), responses):
        with seeded_random():
            followed = test(ex, {ex.prompt: r}).follow_instruction_list
        out.append(sum(followed) / len(followed))
    return out


@pytest.mark.parametrize("loose", [False, True])
def test_ifeval_judge_scores_ifeval_s_own_rows_as_the_official_evaluation(loose):
    from sgpo.eval.ifeval import load_ifeval_prompts

    rows = load_ifeval_prompts()
    # responses that follow some instructions and not others: the prompt itself, lowercased, capitalised, wrapped
    kinds = [lambda p: p, str.lower, str.upper, lambda p: f'"{p}"', lambda p: f"<<Title>>\n\n{p}\n\nP.S. done",
             lambda p: json.dumps({"answer": p})]
    responses = [kinds[i % len(kinds)](r["prompt"]) for i, r in enumerate(rows)]
    judge = make_judge("ifeval-loose" if loose else "ifeval")
    got = judge.score([r["prompt"] for r in rows], responses, rows)
    want = _official(rows, responses, loose)
    assert len(got) == len(want) == 541
    assert got == want
    assert 0 < sum(got) < len(got)  # some followed, some not: the comparison means something


def test_ifeval_judge_prefers_the_response_that_follows_more_constraints():
    judge = make_judge("ifeval")
    good = "the sea is wide and grey. is there anything else i can help with?"
    half = "The sea is wide and grey. Is there anything else I can help with?"   # capitals: one of two
    assert judge.score(["p"] * 3, [good, half, "The Sea."], [LOWER_END] * 3) == [1.0, 0.5, 0.0]
    assert prefer(judge, ["p", "p", "p"], [good, half, half], [half, good, half], None, [LOWER_END] * 3) == [1.0, 0.0,
                                                                                                               0.5]


def test_ifeval_judge_says_when_a_row_has_no_constraints():
    judge = make_judge("ifeval")
    with pytest.raises(JudgeError, match="no verifiable instructions.*sgpo:verifiable-instructions"):
        judge.score(["Tell me a joke."], ["ha"], [{"prompt": "Tell me a joke.", "reference": "x"}])
    with pytest.raises(JudgeError, match="reads each prompt's row"):
        prefer(judge, ["p"], ["a"], ["b"])  # no rows at all


def test_exact_pair_figures_of_hand_made_pairs():
    """Chosen sides that satisfy their constraints, rejected sides that do not: every kept pair is chosen_better."""
    judge = make_judge("ifeval")
    pairs = [Pair(f"r{i}", [{"role": "user", "content": "p"}], "all lower case here. is there anything else i can "
                  "help with?", "ALL CAPS HERE.") for i in range(3)]
    dropped = Pair("r3", [{"role": "user", "content": "p"}], "ALL CAPS.", "lower. Is there anything else I can help "
                   "with?", meta={"dropped": "repetition"})
    rows = {f"r{i}": LOWER_END for i in range(4)}
    m = score_metrics(judge, pairs + [dropped], rows)
    assert m["pairs/score/chosen_better"] == 1.0 and m["pairs/score/tie"] == 0.0
    assert m["pairs/score/rejected_better"] == 0.0 and m["pairs/score/margin"] == 1.0 and m["pairs/score/n"] == 3
    assert m["pairs/score/dropped/rejected_better"] == 1.0 and m["pairs/score/dropped/n"] == 1
    assert score_metrics(make_judge("reference"), pairs, rows) == {}  # a pairwise judge has no scores


def test_the_cache_key_covers_the_row_a_scorer_reads(tmp_path):
    cache = tmp_path / "verdicts.jsonl"
    text = "THE SEA. IS THERE ANYTHING ELSE I CAN HELP WITH?"
    capitals = _row(["change_case:english_capital"], [{}])
    judge = make_judge("ifeval", cache=str(cache))
    assert judge.score(["p", "p"], [text, text], [LOWER_END, capitals]) == [0.5, 1.0]
    again = make_judge("ifeval", cache=str(cache))
    assert again.score(["p", "p"], [text, text], [LOWER_END, capitals]) == [0.5, 1.0]
    assert again.stats()["hits"] == 2 and again.stats()["misses"] == 0  # read back, each under its own row


SCORER = '''
def final_number(prompt, response, row):
    """1 when the response's last number is the row's answer."""
    import re
    numbers = re.findall(r"-?\\d+", response)
    return float(bool(numbers) and numbers[-1] == str(row["answer"]))

def words(prompt, response, row):
    return "many" if len(response.split()) > 3 else 0
'''


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_scorer", None)


def test_python_scorer_scores_with_the_row(scorer_module):
    judge = make_judge("python:my_scorer:final_number")
    rows = [{"prompt": "2+2?", "reference": "4", "answer": 4}] * 2
    assert judge.score(["2+2?"] * 2, ["It is 4", "It is 5"], rows) == [1.0, 0.0]
    assert prefer(judge, ["2+2?"], ["so 4"], ["so 5"], None, rows[:1]) == [1.0]


def test_python_scorer_errors_are_named(scorer_module):
    with pytest.raises(ValueError, match="module 'no_such_module' not found"):
        make_judge("python:no_such_module:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        make_judge("python:my_scorer:missing")
    with pytest.raises(ValueError, match="needs a module and a function"):
        make_judge("python:")
    judge = make_judge("python:my_scorer:words")
    with pytest.raises(JudgeError, match=r"returned 'many' \(str\) for row 2"):
        judge.score(["a", "b"], ["one", "one two three four"], [{}, {}])


def test_python_scorer_cache_id_changes_with_its_source(scorer_module):
    first = make_judge("python:my_scorer:final_number").cache_id
    (scorer_module / "my_scorer.py").write_text(SCORER.replace("numbers[-1]", "numbers[0]"))
    sys.modules.pop("my_scorer", None)
    second = make_judge("python:my_scorer:final_number").cache_id
    assert first != second and first.startswith("python:my_scorer:final_number@")


def test_scores_compare_to_preferences_with_ties_and_failures():
    from sgpo.eval.base import compare_scores

    got = compare_scores([1.0, 0.5, 0.2, math.nan], [0.5, 0.5, 0.9, 1.0])
    assert got[:3] == [1.0, 0.5, 0.0] and math.isnan(got[3])
