import pytest

from sgpo.models import templates
from sgpo.models.templates import IMPROVER_INSTRUCTION
from sgpo.models.loading import ModelError, load_tokenizer


def test_policy_mode_is_the_chat_template(tiny_tokenizer):
    prompt = (("user", "What is 2+2?"),)
    ids = templates.policy_ids(tiny_tokenizer, prompt)
    text = tiny_tokenizer.decode(ids)
    assert text == tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                                      add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("assistant")


def test_improver_mode_wraps_prompt_and_draft(tiny_tokenizer):
    prompt = (("system", "Be kind."), ("user", "Write a haiku."))
    msgs = templates.improver_messages(prompt, "  an old pond  ", IMPROVER_INSTRUCTION)
    assert msgs[0] == {"role": "system", "content": "Be kind."}
    assert "Write a haiku." in msgs[-1]["content"] and "an old pond" in msgs[-1]["content"]
    assert "{draft}" not in msgs[-1]["content"] and "{prompt}" not in msgs[-1]["content"]
    text = tiny_tokenizer.decode(templates.improver_ids(tiny_tokenizer, prompt, "an old pond", IMPROVER_INSTRUCTION))
    assert "Be kind." in text and "an old pond" in text


def test_completion_ends_with_eos(tiny_tokenizer):
    ids = templates.completion_ids(tiny_tokenizer, "Four.")
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert templates.completion_ids(tiny_tokenizer, "Four.", eos=False)[-1] != tiny_tokenizer.eos_token_id


def test_tokenizer_without_chat_template_is_an_error(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no chat template"):
        load_tokenizer(str(tmp_path))


def test_reading_b_puts_the_reference_in_the_improver_input_in_training_and_rounds(tiny_tokenizer):
    """``improver.sees_reference``: the one switch gives I(x, y, y*) to improver training and to the rounds."""
    from sgpo.config import schema as config
    from sgpo.config.schema import GenerationConfig
    from sgpo.data.records import Record
    from sgpo.methods.improver import ImproverExample, nll_example
    from sgpo.generation.rollout import Sampler

    record = Record("r", (("user", "Name a colour."),), "Blue, like the sky.")
    b = config.load(None, ["improver.sees_reference=true"])
    a = config.load(None, ["improver.sees_reference=false"])
    for cfg, expect in ((b, True), (a, False)):
        instruction = templates.improver_instruction(cfg.improver)
        nll = nll_example(tiny_tokenizer, record, ImproverExample("r", "Red.", "Red, or blue."), instruction)
        req = Sampler(tiny_tokenizer, GenerationConfig(), 0, None, instruction).requests([record], "improver", 1,
                                                                                          {"r": "Red."})[0]
        for ids in (nll.prompt_ids, req.prompt_ids):
            assert ("Blue, like the sky." in tiny_tokenizer.decode(ids)) is expect
        assert "Red." in tiny_tokenizer.decode(req.prompt_ids)


def test_reading_switch_and_instruction_must_agree():
    from sgpo.config import schema as config

    with pytest.raises(config.ConfigError, match="sees_reference"):
        config.load(None, ["improver.sees_reference=true", "improver.instruction=Improve {draft} for {prompt}"])
    with pytest.raises(config.ConfigError, match="sees_reference"):
        config.load(None, ["improver.sees_reference=false",
                           "improver.instruction=Improve {draft} for {prompt} like {reference}"])


def test_a_tokenizer_without_a_chat_template_gets_one_from_a_file_or_another_model(tmp_path):
    """A base model's tokenizer ships no template: the error says what to set; ``model.chat_template`` gives one from
    a Jinja file or borrows another model's, and a checkpoint saved with it keeps it."""
    import shutil

    import pytest

    from sgpo.models.loading import ModelError, load_tokenizer, tiny_random_path
    from sgpo.models.templates import policy_ids

    base = tmp_path / "base"
    shutil.copytree(tiny_random_path(), base)
    (base / "chat_template.jinja").unlink()
    with pytest.raises(ModelError, match="set model.chat_template"):
        load_tokenizer(str(base))
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = load_tokenizer(str(base), str(jinja))
    assert tok.decode(policy_ids(tok, (("user", "Hi"),))) == "<user>Hi\n<assistant>"
    borrowed = load_tokenizer(str(base), str(tiny_random_path()))
    assert borrowed.chat_template == load_tokenizer(str(tiny_random_path())).chat_template
    tok.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(str(tmp_path / "saved")).chat_template == jinja.read_text()
    with pytest.raises(ModelError, match="has no chat template either"):
        load_tokenizer(str(base), str(base))
