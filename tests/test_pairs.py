from sgpo.pairs import Pair, filter_pairs, pair_metrics


def _p(chosen, rejected, cf=True, rf=True):
    return Pair("id", [{"role": "user", "content": "q"}], chosen, rejected, cf, rf)


def test_filters_count_each_reason():
    pairs = [_p("a better answer", "an answer"), _p("same  text", "same text\n"), _p("", "x"), _p("x", " "),
             _p("cut", "fine", cf=False), _p("fine", "cut", rf=False)]
    kept, dropped = filter_pairs(pairs, require_eos=True)
    assert [p.chosen for p in kept] == ["a better answer"]
    assert dropped == {"equal": 1, "empty_chosen": 1, "empty_rejected": 1, "chosen_cut_off": 1,
                       "rejected_cut_off": 1}
    kept, dropped = filter_pairs(pairs, require_eos=False)
    assert len(kept) == 3 and "chosen_cut_off" not in dropped


def test_pair_metrics_names():
    kept, dropped = filter_pairs([_p("one two three", "one two"), _p("x", "x")], require_eos=True)
    m = pair_metrics(kept, dropped)
    assert m["pairs/kept"] == 1 and m["pairs/dropped/equal"] == 1
    assert m["lengths/chosen"] == 3 and m["lengths/rejected"] == 2 and m["pairs/edit_distance"] == 1
