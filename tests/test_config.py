import pytest

from sgpo import config
from sgpo.config import ConfigError


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
    """``docs/config.md`` is what ``python -m sgpo.config_docs`` writes now, and every key has its documentation."""
    from pathlib import Path

    from sgpo import config_docs

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_docs.markdown(), "docs/config.md is stale: python -m sgpo.config_docs > docs/config.md"
    ks = config_docs.keys()
    assert len(ks) > 50 and all(k.doc for k in ks), [k.name for k in ks if not k.doc]
    beta = next(k for k in ks if k.name == "dpo.beta")
    assert (beta.type, beta.default, beta.allowed) == ("float", 0.5, "> 0")


def test_sgpo_config_prints_a_section_and_names_the_sections_when_wrong(capsys):
    from sgpo.cli import main

    assert main(["config", "pairs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pairs.require_finished: str = \"chosen_if_rejected\"") and "pairs.verify" in out
    assert "dpo." not in out
    assert main(["config", "nope"]) == 2
    assert "sections: model, data" in capsys.readouterr().err
