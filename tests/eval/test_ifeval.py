"""IFEval through the official checkers, on hand-made responses; NLTK's Punkt model rebuilt offline."""
import pytest

from sgpo.eval.ifeval import evaluate_ifeval, load_ifeval_prompts, prepare_punkt, score_ifeval


@pytest.fixture(scope="module")
def nltk_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nltk")


def row(instruction, kwargs=None, prompt=None):
    return {"key": 0, "prompt": prompt or f"task with {instruction} {kwargs}", "instruction_id_list": [instruction],
            "kwargs": [kwargs or {}]}


def score_one(r, response, nltk_dir):
    [res] = evaluate_ifeval([r], {r["prompt"]: response}, cache_dir=nltk_dir)
    return res.strict[0], res.loose[0]


def test_prompts_load_from_the_installed_package():
    rows = load_ifeval_prompts()
    assert len(rows) == 541
    assert all(len(r["instruction_id_list"]) == len(r["kwargs"]) >= 1 for r in rows)
    assert len({r["prompt"] for r in rows}) == 541
    assert load_ifeval_prompts(limit=5) == rows[:5]


def test_punkt_model_rebuilt_offline(nltk_dir):
    import nltk

    root = prepare_punkt(nltk_dir)
    assert str(root).startswith(str(nltk_dir)) and nltk.data.path[0] == str(root)
    found = nltk.data.find("tokenizers/punkt_tab/english/")
    assert str(root) in str(found)
    tok = nltk.data.load("tokenizers/punkt/english.pickle")  # what the checkers ask for
    # the trained abbreviations are in effect: "Dr." and "U.S." do not end sentences
    assert tok.tokenize("Dr. Smith met the U.S. team. They won.") == ["Dr. Smith met the U.S. team.", "They won."]
    assert nltk.word_tokenize("It's DONE, isn't it?") == ["It", "'s", "DONE", ",", "is", "n't", "it", "?"]
    assert prepare_punkt(nltk_dir) == root  # written once, then reused


@pytest.mark.parametrize("instruction,kwargs,good,bad", [
    ("punctuation:no_comma", {}, "No commas in here at all.", "Well, here is a comma."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith met the U.S. team. They won.", "One. Two. Three. Four."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "one two three four five six", "too short"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY, VERY important.", "This is not important."),
    ("detectable_format:title", {}, "<<A Day Out>>\nWe went to the sea.", "A Day Out\nWe went to the sea."),
    ("keywords:existence", {"keywords": ["banana", "kite"]}, "A banana flew a kite.", "An apple flew a kite."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* only one"),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?", "Done."),
    ("detectable_format:json_format", {}, '{"a": 1}', "a: 1"),
])
def test_checker_passes_and_fails(nltk_dir, instruction, kwargs, good, bad):
    r = row(instruction, kwargs)
    assert score_one(r, good, nltk_dir) == (True, True)
    assert score_one(r, bad, nltk_dir) == (False, False)


def test_sentence_count_uses_punkt_abbreviations(nltk_dir):
    # three naive '.'-splits but two Punkt sentences: "at least 3" fails, "less than 3" passes
    text = "Dr. Smith went to Washington. He sat down."
    assert score_one(row("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3}),
                     text, nltk_dir) == (False, False)
    assert score_one(row("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}),
                     text, nltk_dir) == (True, True)


def test_loose_forgives_a_preamble_line(nltk_dir):
    r = row("change_case:english_lowercase")
    assert score_one(r, "Sure! Here it is:\nall in lower case here.", nltk_dir) == (False, True)
    assert score_one(r, "", nltk_dir) == (False, False)  # an empty response follows nothing


def test_scores_aggregate_prompt_and_instruction_level(nltk_dir):
    rows = [
        {"key": 1, "prompt": "p1", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
         "kwargs": [{}, {}]},
        {"key": 2, "prompt": "p2", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 3, "prompt": "p3", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    ]
    responses = {
        "p1": "Intro line\nno commas and lower case",  # strict: comma ok, lower fails; loose: both ok
        "p2": "a, b",  # fails both ways
        "p3": "all lower",  # passes
    }
    s = score_ifeval(rows, responses, cache_dir=nltk_dir)
    assert s["n"] == 3
    assert s["prompt_strict"] == pytest.approx(1 / 3)
    assert s["prompt_loose"] == pytest.approx(2 / 3)
    assert s["instruction_strict"] == pytest.approx(2 / 4)
    assert s["instruction_loose"] == pytest.approx(3 / 4)
    with pytest.raises(KeyError):
        score_ifeval(rows, {"p1": "x"}, cache_dir=nltk_dir)


def test_full_set_runs_and_trivial_responses_score_low(nltk_dir):
    rows = load_ifeval_prompts()
    empty = score_ifeval(rows, {r["prompt"]: "" for r in rows}, cache_dir=nltk_dir)
    assert empty == {"prompt_strict": 0.0, "prompt_loose": 0.0, "instruction_strict": 0.0,
                     "instruction_loose": 0.0, "n": 541}
    # one fixed sentence follows some instructions (no commas, few words ...) but far from all
    fixed = score_ifeval(rows, {r["prompt"]: "I do not know." for r in rows}, cache_dir=nltk_dir)
    assert 0.0 < fixed["prompt_strict"] <= fixed["prompt_loose"] < 0.5
    assert fixed["prompt_strict"] < fixed["instruction_strict"] <= fixed["instruction_loose"]
