"""``sgpo run CONFIG --show-prompts [N]``: the first N rows as the model sees them — the policy input and the improver
input in the chat template, the reference as trained — with token counts and what was cut; the tokenizer alone is
loaded and nothing runs."""
import json
from pathlib import Path

import pytest

from sgpo.config import schema as config
from sgpo.models import templates
from sgpo.cli.main import main
from sgpo.data.records import load_records
from sgpo.core.text import cut_reference

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test (the tokenizer may load)."""
    import transformers

    from sgpo.models import loading as models

    def refuse(*args, **kwargs):
        raise AssertionError(f"--show-prompts loaded a model: {args}")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def show(capsys, *args: str) -> str:
    assert main(["run", *args]) == 0
    return capsys.readouterr().out


def test_smoke_config_shows_three_rows_in_the_chat_template_with_their_counts(no_model, capsys, tmp_path,
                                                                             tiny_tokenizer):
    run_dir = tmp_path / "run"
    out = show(capsys, SMOKE, "--show-prompts", "-o", str(run_dir))
    assert not run_dir.exists()  # nothing ran
    cfg = config.load(SMOKE)
    records = load_records(cfg.data.sft, need="reference")[0][:3]
    assert out.count("=== row ") == 3  # the default N
    limit = cfg.data.max_reference_tokens
    for r, block in zip(records, out.split("=== row ")[1:]):
        assert r.id in block.splitlines()[0]
        # the policy input as the model sees it: the chat template's markers around the request, and its length
        policy_ids = templates.policy_ids(tiny_tokenizer, r.prompt)
        assert f"--- policy input P(x): {len(policy_ids)} tokens" in block
        assert f"<|im_start|>user\n{r.prompt_text}<|im_end|>\n<|im_start|>assistant\n" in block
        # reading B (the default): the improver input holds the reference as trained, not the one read
        kept = cut_reference(r.reference, tiny_tokenizer, limit)
        assert f"### Expert response\n{kept}<|im_end|>" in block
        bare = templates.improver_ids(tiny_tokenizer, r.prompt, "", templates.improver_instruction(cfg.improver), kept)
        assert f"I(x, y, y*) (improver.sees_reference: true): {len(bare)} tokens without the draft" in block
        # AlpacaEval's references are far longer than the smoke config's 24 tokens: each is reported cut
        total = len(tiny_tokenizer(r.reference.strip(), add_special_tokens=False)["input_ids"])
        assert total > limit
        kept_ids = tiny_tokenizer(kept, add_special_tokens=False)["input_ids"]
        assert (f"reference y* as trained (data.max_reference_tokens={limit}): {len(kept_ids)} tokens + EOS "
                f"<|im_end|>, cut from {total} tokens") in block
        assert block.rstrip().endswith(kept)


def test_the_flag_may_come_before_the_config_path(no_model, capsys):
    """``--show-prompts`` takes an optional N: a config path written after it is the config, not a bad N."""
    assert show(capsys, "--show-prompts", SMOKE) == show(capsys, SMOKE, "--show-prompts")
    assert show(capsys, "--show-prompts", "2", SMOKE).count("=== row ") == 2
    assert main(["run", SMOKE, "--show-prompts", "other.yaml"]) == 2
    assert "--show-prompts takes a number of rows, not 'other.yaml'" in capsys.readouterr().err


def test_reading_a_keeps_the_reference_out_of_the_improver_input(no_model, capsys):
    out = show(capsys, SMOKE, "--show-prompts", "1", "--set", "improver.sees_reference=false")
    assert out.count("=== row ") == 1
    assert "--- improver input I(x, y) (improver.sees_reference: false)" in out
    assert "### Draft response\n⟨the policy's draft⟩<|im_end|>" in out and "### Expert response" not in out


def test_a_long_prompt_is_reported_cut_and_a_short_reference_uncut(no_model, capsys, tmp_path, tiny_tokenizer):
    data = tmp_path / "d.jsonl"
    question = "Please answer this: " + " ".join(f"w{i}" for i in range(60)) + "?"
    data.write_text(json.dumps({"prompt": question, "response": "Yes."}) + "\n")
    args = [SMOKE, "--show-prompts", "5", "--set", f"data.sft={data}", "--set", "data.max_prompt_tokens=40"]
    out = show(capsys, *args)
    n = len(templates.policy_ids(tiny_tokenizer, (("user", question),)))
    assert out.count("=== row ") == 1  # N larger than the data: every row
    assert (f"--- policy input P(x): {n} tokens (data.max_prompt_tokens=40): its first {n - 40} tokens are cut, "
            "the end is kept") in out
    assert "<|im_start|>user" not in out.split("--- policy input")[1].split("--- improver")[0]  # shown as cut
    yes = len(tiny_tokenizer("Yes.", add_special_tokens=False)["input_ids"])
    assert f"(data.max_reference_tokens=24): {yes} token{'s' if yes > 1 else ''} + EOS <|im_end|>, not cut\nYes." in out
    out = show(capsys, *args, "--set", "data.on_long_prompt=skip")
    assert f"{n - 40} tokens too long: the run skips this row (data.on_long_prompt: skip)" in out
    assert "<|im_start|>user" in out.split("--- policy input")[1].split("--- improver")[0]  # a skipped row: whole


def test_n_below_one_is_a_one_line_error(capsys):
    assert main(["run", SMOKE, "--show-prompts", "0"]) == 2
    assert capsys.readouterr().err.strip() == "sgpo: error: --show-prompts: N must be ≥ 1, got 0"
