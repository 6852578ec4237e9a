"""Registries (name → factory), the config choices drawn from them, and the judge interface every judge implements."""
import pytest

from sgpo.config import schema as config
from sgpo.core import registry
from sgpo.config.schema import ConfigError
from sgpo.eval.base import Judge
from sgpo.eval.cache import CachedJudge
from sgpo.eval.judges import ReferenceJudge, make_judge
from sgpo.core.registry import LOSSES, METHODS, Registry

ALL = [registry.METHODS, registry.LOSSES, registry.JUDGES, registry.BENCHMARKS, registry.COMPARE_BENCHMARKS,
       registry.TRACKERS]


def test_names_in_declaration_order_and_factories_imported_only_when_asked_for():
    widgets = Registry("widget", "sgpo.core", {"hash": "files:content_hash", "broken": "no_such_module:x"})
    assert widgets.names() == ("hash", "broken") and list(widgets) == ["hash", "broken"]
    assert "hash" in widgets and "other" not in widgets
    from sgpo.core.files import content_hash

    assert widgets.get("hash") is content_hash
    with pytest.raises(ModuleNotFoundError):  # a bad entry only fails when it is asked for
        widgets.get("broken")


def test_unknown_name_names_the_kind_and_the_known_names():
    with pytest.raises(ValueError, match=r"unknown widget 'c' \(known: a, b\)"):
        Registry("widget", "sgpo", {"a": "files:content_hash", "b": "files:read_jsonl"}).get("c")
    from sgpo.eval.benchmark import benchmark_items
    from sgpo.methods.base import get_method

    with pytest.raises(ValueError, match="unknown method 'ppo' .*sgpo, spin, synpo, dpo, sft"):
        get_method("ppo")
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu' .*alpaca_eval, arena_hard_v0.1"):
        benchmark_items("mmlu")
    with pytest.raises(ValueError, match="unknown judge 'gpt' .*reference, openai, hf, reward, lm"):
        make_judge("gpt:4")


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.kind + ":" + r.package)
def test_every_entry_resolves_to_a_callable(reg):
    assert reg.names() and all(callable(reg.get(name)) for name in reg)


def test_config_choices_are_the_registries_names():
    assert config.CHOICES["method"] == METHODS.names() == ("sgpo", "spin", "synpo", "dpo", "sft")
    assert config.CHOICES["dpo.loss"] == LOSSES.names()
    with pytest.raises(ConfigError, match="method: 'ppo' is not one of " + ", ".join(METHODS.names())):
        config.load(None, ["method=ppo"])
    with pytest.raises(ConfigError, match="dpo.loss: 'kto' is not one of " + ", ".join(LOSSES.names())):
        config.load(None, ["dpo.loss=kto"])
    assert config.load(None, [f"method={METHODS.names()[-1]}", f"dpo.loss={LOSSES.names()[-1]}"]).dpo.loss == "norm"


P, A, B, R = ["Name a colour."], ["Blue is a colour."], ["I like turtles."], ["Blue."]


def test_reference_judge_is_a_judge_with_its_spec_and_frees_its_model():
    judge = make_judge("reference")
    assert isinstance(judge, ReferenceJudge) and isinstance(judge, Judge) and judge.spec == "reference"
    assert judge.prefer(P, A, B, R) == [1.0] and judge.stats() == {}
    assert not judge.gives_verdicts
    with pytest.raises(NotImplementedError):
        judge.verdicts(P, A, B)
    judge.close()
    assert judge.model is None


@pytest.mark.parametrize("kind", ["hf", "lm", "lm-fluency"])
def test_local_judges_are_judges_with_their_spec_and_close_frees_their_model(kind, tiny_path):
    spec = f"{kind}:{tiny_path}"
    judge = make_judge(spec, device="cpu", dtype="float32")
    assert isinstance(judge, Judge) and judge.spec == spec
    assert len(judge.prefer(P, A, B)) == 1
    judge.close()
    assert getattr(judge, "model", None) is None and getattr(judge, "scorer", None) is None
    with pytest.raises(ValueError, match="needs a model"):
        make_judge(f"{kind}:")


def test_openai_judge_is_a_judge_that_gives_verdicts(tmp_path):
    spec = "openai:judge-model@http://127.0.0.1:9/v1"  # built without a request
    judge = make_judge(spec, cache=str(tmp_path / "c.jsonl"), template="sgpo")
    assert isinstance(judge, CachedJudge) and judge.spec == spec and judge.judge.spec == spec
    assert judge.gives_verdicts and judge.template_name == "sgpo:pairwise_label"
    assert judge.stats() == {"requests": 0, "retries": 0, "failed": 0, "by_logprobs": 0, "by_text": 0,
                             "identical": 0, "hits": 0, "misses": 0}


class Longer(Judge):
    name = "longer"

    def __init__(self):
        self.closed = False

    def prefer(self, prompts, a, b, references=None):
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]

    def close(self):
        self.closed = True


def test_cached_judge_forwards_explicitly_and_reports_its_statistics(tmp_path):
    assert not hasattr(CachedJudge, "__getattr__")
    inner = Longer()
    inner.extra = "not forwarded"
    judge = CachedJudge(inner, tmp_path / "c.jsonl")
    assert judge.name == "longer" and not judge.gives_verdicts and judge.template_name is None
    with pytest.raises(AttributeError):
        judge.extra
    judge.prefer(["p", "q"], ["aa", "a"], ["b", "bb"])
    judge.prefer(["p", "r"], ["aa", "a"], ["b", "b"])
    assert judge.stats() == {"hits": 1, "misses": 3}
    with pytest.raises(NotImplementedError):
        judge.verdicts(["p"], ["a"], ["b"])
    judge.close()
    assert inner.closed and judge.cache._file is None


@pytest.mark.parametrize("key", ["eval.judge", "eval.second_judge", "pairs.verify"])
def test_a_judge_spec_of_no_known_kind_is_refused_when_the_config_loads(key):
    from sgpo.config import schema as config

    with pytest.raises(config.ConfigError, match=rf"{key}: unknown judge 'gpt4' \(known: reference, openai"):
        config.load(None, [f"{key}=gpt4"])
    with pytest.raises(config.ConfigError, match=rf"{key}: judge 'hf' needs a model"):
        config.load(None, [f"{key}=hf"])
    assert config.load(None, [f"{key}=lm-pmi:some/model"])


def test_a_file_s_hash_is_computed_once_until_the_file_changes(tmp_path, monkeypatch):
    """The embedded model's cache key hashes a ~100 MB file: once per process, again when the file changes."""
    import hashlib
    import os

    from sgpo.models import loading as models

    f = tmp_path / "model.gguf"
    f.write_bytes(b"one")
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    first = models._sha256(f)
    assert models._sha256(f) == first and len(reads) == 1
    f.write_bytes(b"two")
    os.utime(f, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert models._sha256(f) == real(b"two").hexdigest() != first and len(reads) == 2
