import pytest

from sgpo.config import schema as config
from sgpo.config.schema import ConfigError


def test_defaults_are_the_embedded_experiment():
    cfg = config.load()
    assert cfg.model.name == "sgpo:smollm2-135m-instruct"
    assert cfg.data.sft == "sgpo:alpaca-eval"
    assert cfg.method == "sgpo" and cfg.sft and cfg.data.test_size >= 200  # a test split of at least 200 prompts


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 3\ndpo:\n  beta: 0.2\n")
    cfg = config.load(p, ["dpo.lr=1e-4", "generation.temperature=0", "improver.target=reference"])
    assert cfg.rounds == 3 and cfg.dpo.beta == 0.2 and cfg.dpo.lr == 1e-4
    assert cfg.generation.temperature == 0.0 and isinstance(cfg.generation.temperature, float)
    assert cfg.improver.target == "reference"


@pytest.mark.parametrize("text, key", [
    ("roundz: 3\n", "roundz"),
    ("dpo:\n  betta: 0.1\n", "dpo.betta"),
    ("dpo:\n  beta: high\n", "dpo.beta"),
    ("rounds: 2.5\n", "rounds"),
    ("model: abc\n", "model"),
    ("method: ppo\n", "method"),
    ("improver:\n  step: 0\n", "improver.step"),
    ("generation:\n  batch_size: 0\n", "generation.batch_size"),
])
def test_errors_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert key in str(e.value)


def test_bad_override_and_newer_version(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        config.load(None, ["rounds"])
    with pytest.raises(ConfigError, match="newer"):
        config.load(None, ["version=99"])
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_dump_roundtrip_and_diff():
    cfg = config.load(None, ["rounds=4"])
    again = config.from_dict(__import__("yaml").safe_load(config.dump(cfg)))
    assert config.to_dict(again) == config.to_dict(cfg)
    assert config.diff(config.to_dict(config.load()), config.to_dict(cfg)) == ["rounds"]


def test_the_config_reference_is_current_and_complete():
    """``docs/config.md`` is what ``python -m sgpo.config.reference`` writes now, and every key has its documentation."""
    from pathlib import Path

    from sgpo.config import reference as config_docs

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == config_docs.markdown(), "docs/config.md is stale: python -m sgpo.config.reference > docs/config.md"
    ks = config_docs.keys()
    assert len(ks) > 50 and all(k.doc for k in ks), [k.name for k in ks if not k.doc]
    beta = next(k for k in ks if k.name == "dpo.beta")
    assert (beta.type, beta.default, beta.allowed) == ("float", 0.5, "> 0")


def test_sgpo_config_prints_a_section_and_names_the_sections_when_wrong(capsys):
    from sgpo.cli.main import main

    assert main(["config", "pairs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pairs.require_finished: str = \"chosen_if_rejected\"") and "pairs.verify" in out
    assert "dpo." not in out
    assert main(["config", "nope"]) == 2
    assert "sections: model, data" in capsys.readouterr().err


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 2\neval:\n  judge: openai: gpt-4o-mini\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}:3:16: not valid YAML: mapping values are not allowed here"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, closest", [
    ("data:\n  round_sise: 3\n", "data.round_size"),   # a typo in its section
    ("round_size: 3\n", "data.round_size"),            # the right name in the wrong section
    ("modle:\n  name: x\n", "model"),                  # a section
    ("eval:\n  judge_concurency: 4\n", "eval.judge_concurrency"),
])
def test_a_mistyped_key_suggests_the_closest_known_one(tmp_path, text, closest):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=rf": did you mean {closest}\? \(known under") as e:
        config.load(p)
    assert "unknown config key" in str(e.value)


def test_a_key_like_no_other_suggests_nothing():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["zzzzqqqq=1"])
    assert "did you mean" not in str(e.value) and "unknown config key 'zzzzqqqq'" in str(e.value)


def test_a_string_override_takes_the_text_given_yaml_or_not():
    # `openai:` is a mapping to YAML; for a string key it is the text, refused for what it says, not for its type
    with pytest.raises(ConfigError) as e:
        config.load(None, ["eval.judge=openai:"])
    assert "expected str" not in str(e.value) and str(e.value).startswith("eval.judge: judge 'openai:' needs a model")
    cfg = config.load(None, ["data.subset=2023", "data.split=yes", "model.chat_template=a: b", "report_to=[tensorboard]"])
    assert (cfg.data.subset, cfg.data.split, cfg.model.chat_template) == ("2023", "yes", "a: b")
    assert cfg.report_to == "tensorboard"  # a YAML list of trackers still reads as one
    assert config.load(None, ["eval.judge=openai:gpt-4o-mini@http://h:8000/v1"]).eval.judge.endswith("@http://h:8000/v1")
    with pytest.raises(ConfigError, match=r"override 'rounds=\[': the value is not valid YAML"):
        config.load(None, ["rounds=["])  # not a YAMLError traceback


def test_a_mapping_where_a_string_goes_says_to_quote_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eval:\n  judge:\n    openai: gpt-4o-mini\n")
    with pytest.raises(ConfigError, match=r"eval.judge: expected a string, got a mapping .*quote the value"):
        config.load(p)


@pytest.mark.parametrize("value, ok", [("1.5", False), ("0", True), ("-0.1", False), ("1.0", True), ("0.9", True)])
def test_vllm_gpu_memory_is_a_fraction(value, ok):
    """A fraction of the GPU, or 0: the launch strategy's default (``sizes.VLLM_SHARES``)."""
    if ok:
        assert config.load(None, [f"generation.vllm_gpu_memory={value}"]).generation.vllm_gpu_memory == float(value)
    else:
        with pytest.raises(ConfigError, match=rf"generation.vllm_gpu_memory: must be in \(0, 1\], got {value}"):
            config.load(None, [f"generation.vllm_gpu_memory={value}"])


def test_judge_prices_are_not_negative():
    assert config.load(None, ["eval.judge_price_input=0.15"]).eval.judge_price_input == 0.15
    with pytest.raises(ConfigError, match="eval.judge_price_output: must be ≥ 0.0, got -1.0"):
        config.load(None, ["eval.judge_price_output=-1"])
