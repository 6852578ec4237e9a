"""Each pair gate drops what it should and keeps what it should (fixed examples)."""
import pytest

from sgpo.models import templates
from sgpo.methods.gates import Gates, TemplateMarkers, echoes, repetitive
from sgpo.methods.pairs import Pair, candidate_metrics, filter_pairs, judge_agreement, pair_metrics

REQUEST = "Write a short poem about the autumn leaves falling in the park"
GOOD = "Golden leaves drift down,\nthe park grows quiet and bare,\nautumn breathes softly."
OK = "Leaves fall in the park. It is autumn. They are red and yellow."


def gates(finished="chosen_if_rejected", instruction=templates.IMPROVER_INSTRUCTION):
    return Gates(TemplateMarkers.of(instruction), finished)


def reason(chosen, rejected, cf=True, rf=True, **kw):
    return gates(**kw).drop_reason(REQUEST, chosen, rejected, cf, rf)


def test_markers_come_from_the_configured_instruction():
    m = TemplateMarkers.of(templates.IMPROVER_INSTRUCTION)
    assert "request" in m.labels and "draft response" in m.labels
    assert "reply with the improved response only" in m.phrases
    other = TemplateMarkers.of("Improve this answer.\n\nQUESTION: {prompt}\nANSWER: {draft}")
    assert "question" in other.labels and "answer" in other.labels
    assert other.leaks("QUESTION: why?\nANSWER: because") and not m.leaks("QUESTION: why?")
    assert "expert response" in TemplateMarkers.of(templates.REFERENCED_INSTRUCTION).labels


@pytest.mark.parametrize("leaky", [
    "### Request\nWrite a poem\n\n### Draft response\nLeaves fall.",
    "Golden leaves.\n### Draft response\nLeaves fall.",
    "**Draft response:** leaves fall in the park",
    "Here it is. Reply with the improved response only. Leaves fall.",
])
def test_template_leak_is_dropped_on_either_side(leaky):
    assert reason(leaky, OK) == "template_leak"
    assert reason(GOOD, leaky) == "template_leak"


def test_ordinary_words_of_the_template_are_not_a_leak():
    # "request" and "draft" in running text, or a heading the template does not have, are fine
    text = "Thank you for the request. My first draft response was too long, so here is a better poem."
    assert reason(text, OK) is None
    assert reason("### Poem\n" + GOOD, OK) is None


def test_unfinished_chosen():
    assert reason(GOOD, OK, cf=False) == "chosen_unfinished"          # rejected finished: cut chosen dropped
    assert reason(GOOD, OK, cf=False, rf=False) is None               # both cut: kept under the default
    assert reason(GOOD, OK, cf=False, rf=False, finished="chosen") == "chosen_unfinished"
    assert reason(GOOD, OK, rf=False) is None
    assert reason(GOOD, OK, rf=False, finished="both") == "rejected_unfinished"
    assert reason(GOOD, OK, cf=False, finished="none") is None


def test_repetition():
    loop = "The leaves fall down and the leaves fall down and the leaves fall down and the leaves fall down."
    assert repetitive(loop) and reason(loop, OK) == "repetition"
    lines = "Leaves are red.\nLeaves are red.\nLeaves are red.\nThe end."
    assert repetitive(lines)
    assert not repetitive(GOOD) and not repetitive(OK)
    assert reason(OK, loop) is None  # a rewrite that fixes a loop is a good pair


def test_prompt_echo():
    echo = "Write a short poem about the autumn leaves falling in the park. Leaves."
    assert echoes(echo, REQUEST) and not echoes(GOOD, REQUEST)
    assert reason(echo, OK) == "prompt_echo"
    assert reason(echo, echo + " More.") is None  # both sides restate the request: not what the gate is for
    assert not echoes("Write a poem", "Write a poem")  # shorter than the minimum run


def test_echo_copied_from_the_reference_is_kept():
    # a reference that restates the request (seen in real rounds: "A word that represents people reacting to
    # unpleasant events is ...") is the target's style; a chosen side that copies it is not an echo
    request = "Give me a word that represents people reacting to unpleasant events"
    reference = 'A word that represents people reacting to unpleasant events is "resilience": coping and recovering.'
    draft = "Words for reactions to bad things include shock and anger."
    g = Gates(TemplateMarkers.of(templates.REFERENCED_INSTRUCTION))
    assert g.drop_reason(request, reference, draft, True, True) == "prompt_echo"  # no reference given
    assert g.drop_reason(request, reference, draft, True, True, reference) is None
    echo = request + ". " + draft  # the request prepended, where the reference does not do that
    assert g.drop_reason(request, echo, draft, True, True, "Resilience: the ability to recover.") == "prompt_echo"
    pairs = [Pair("a", [{"role": "user", "content": request}], reference, draft),
             Pair("b", [{"role": "user", "content": request}], echo, draft)]
    refs = {"a": reference, "b": "Resilience: the ability to recover."}
    kept, dropped = filter_pairs(pairs, g, refs)
    assert [p.record_id for p in kept] == ["a"] and dropped == {"prompt_echo": 1}
    assert candidate_metrics(pairs, g.markers, refs)["improver/echo_rate"] == pytest.approx(1 / 2)
    assert candidate_metrics(pairs, g.markers)["improver/echo_rate"] == pytest.approx(1.0)


def test_filter_counts_and_rates():
    def p(c, r, cf=True, rf=True):
        return Pair("x", [{"role": "user", "content": REQUEST}], c, r, cf, rf)

    cands = [p(GOOD, OK), p(OK, OK), p("### Request\nhi", OK), p(GOOD, OK, cf=False),
             p("Write a short poem about the autumn leaves falling in the park. Leaves.", OK)]
    kept, dropped = filter_pairs(cands, gates())
    assert [x.chosen for x in kept] == [GOOD]
    assert dropped == {"equal": 1, "template_leak": 1, "chosen_unfinished": 1, "prompt_echo": 1}
    assert [x.meta["dropped"] for x in cands] == [None, "equal", "template_leak", "chosen_unfinished", "prompt_echo"]
    m = pair_metrics(kept, dropped)
    assert m["pairs/kept"] == 1 and m["pairs/dropped/prompt_echo"] == 1 and m["pairs/dropped/repetition"] == 0
    assert m["pairs/chosen_finished_rate"] == 1.0
    c = candidate_metrics(cands, gates().markers)
    assert c["improver/template_leak_rate"] == pytest.approx(1 / 5) and c["improver/echo_rate"] == pytest.approx(1 / 5)


class LongerWins:
    name = "longer"

    def prefer(self, prompts, a, b, references=None):
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]


def test_judge_agreement_is_computed_on_the_right_sides():
    def p(c, r):
        return Pair("x", [{"role": "user", "content": "q"}], c, r)

    better = [p("a long and careful answer " * (i + 2), "short") for i in range(12)]
    assert judge_agreement(better, LongerWins())["pairs/judge_agreement"] > 0.5
    swapped = [p(x.rejected, x.chosen) for x in better]
    m = judge_agreement(swapped, LongerWins())
    assert m["pairs/judge_agreement"] < 0.5 and m["pairs/judge_agreement_n"] == 12
    assert m["pairs/judge_agreement_ci_low"] <= m["pairs/judge_agreement"] <= m["pairs/judge_agreement_ci_high"]


def test_restating_the_question_is_not_an_echo():
    # answers that open by restating part of the question (seen in real rounds) are kept
    request = "explain what the theory of sexual selection is and give an example."
    answer = "The theory of sexual selection is a concept in evolutionary biology that Darwin proposed."
    assert not echoes(answer, request)
    assert echoes("Explain what the theory of sexual selection is and give an example: " + answer, request)
