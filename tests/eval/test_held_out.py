"""The reported test-split figures: the right sides compared, length matching, the start-answer cache."""
from sgpo.data.records import Record
from sgpo.eval.held_out import judge_name, length_matched, model_hash, versus


class LongerWins:
    name = "longer"

    def __init__(self):
        self.calls = []

    def prefer(self, prompts, a, b, references=None):
        self.calls.append(len(a))
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]


def test_versus_compares_final_against_start_and_pre_rounds():
    recs = [Record(str(i), (("user", f"q{i}"),), "ref") for i in range(10)]
    texts = {"final": {r.id: "a fairly long answer here" for r in recs},
             "start": {r.id: "short" for r in recs},
             "pre_rounds": {r.id: "a much longer answer than the final one is" for r in recs}}
    m = versus(LongerWins(), "longer", recs, texts)
    assert m["eval/test/longer/win_rate_vs_start"] == 1.0 and m["eval/test/longer/win_rate_vs_start_n"] == 10
    assert m["eval/test/longer/win_rate_vs_pre_rounds"] == 0.0
    # "a fairly long answer here" (5 words) vs "short" (1): not length-matched; vs 9 words: not matched either
    assert m["eval/test/longer/win_rate_vs_start_length_matched_n"] == 0
    texts["start"] = {r.id: "a fairly long reply there" if int(r.id) % 2 else "short" for r in recs}
    m = versus(LongerWins(), "longer", recs, texts)
    assert m["eval/test/longer/win_rate_vs_start_length_matched_n"] == 5


def test_length_matched_and_names():
    assert length_matched("one two three four five", "one two three four")
    assert not length_matched("one two three four five", "one two three")
    assert judge_name("reference") == "reference"
    assert judge_name("lm:sgpo:gemma-3-270m") == "lm_gemma-3-270m"
    assert judge_name("hf:/models/judge-7b") == "hf_judge-7b"


def test_model_hash_follows_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("notes")
    h = model_hash(tmp_path)
    (tmp_path / "README.md").write_text("other notes")
    assert model_hash(tmp_path) == h
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert model_hash(tmp_path) != h


def test_a_hub_name_is_keyed_by_its_name():
    assert model_hash("org/model-a") == model_hash("org/model-a") != model_hash("org/model-b")


def test_answer_cache_keeps_vllm_answers_apart(tiny_path, tiny_tokenizer):
    import dataclasses

    from sgpo.config.schema import Config
    from sgpo.data.records import Record
    from sgpo.core.files import content_hash
    from sgpo.eval.held_out import answer_key, model_hash
    from sgpo.generation.rollout import Sampler

    cfg, recs = Config(), [Record("a", (("user", "hi"),))]
    engine = Sampler(tiny_tokenizer, cfg.generation, cfg.seed, backend="engine")
    vllm = dataclasses.replace(engine, backend="vllm")
    assert answer_key(tiny_path, engine, cfg.data.max_prompt_tokens, recs) != answer_key(tiny_path, vllm, cfg.data.max_prompt_tokens, recs)
    # the engine's key is the one earlier versions wrote: their caches stay valid
    assert answer_key(tiny_path, engine, cfg.data.max_prompt_tokens, recs) == content_hash(
        [model_hash(tiny_path), engine.settings().__dict__, cfg.seed, cfg.data.max_prompt_tokens, ["a"]])
