"""docs/eval.md's commands run as written (issue 36, item 4), and `sgpo eval` checks its judge against the benchmark
before it loads a model or generates.

The doc's commands run on the tiny random model with a stand-in judge server (`judge_stub.py`) in place of the API
judge, answers cut to 2 tokens. AlpacaEval runs on all 805 instructions, so the length-controlled fit runs too.
Arena-Hard v0.1 / v2.0 and IFEval run on their first 8 prompts (`--limit 8`): on these benchmarks nothing depends on
the count, and every prompt costs generation time on a 2-core machine."""
import json
import re
import shlex
from pathlib import Path

import pytest

from judge_stub import JudgeStub
from sgpo.cli.main import build_parser, main
from cli_runs import sgpo

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "eval.md"
API_JUDGES = ("openai:gpt-4-1106-preview", "openai:gpt-4.1")


def doc_commands() -> list[list[str]]:
    """The `sgpo ...` commands of the doc's bash blocks (continued lines joined), as argument lists without `sgpo`."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("sgpo ")]


def as_run_here(args: list[str], tiny: str, judge: str, data: Path, out: Path) -> list[str]:
    """A doc command with its placeholders filled for this machine: the tiny model, the stub judge, the shared data,
    answers of 2 tokens, output under ``out``; `--limit 8` for every benchmark but AlpacaEval."""
    names = {"RUN/final": tiny, "OTHER_MODEL": tiny, "LC_DIR": str(data / "alpaca_eval"),
             "ARENA_V01_DIR": str(data / "arena_hard_v0.1"), **{j: judge for j in API_JUDGES}}
    run = [names.get(a, str(out / a) if a.startswith("evals/") else a) for a in args]
    if "--max-new-tokens" in run:
        run[run.index("--max-new-tokens") + 1] = "2"
    if run[0] == "eval" and run[run.index("--benchmark") + 1] != "alpaca_eval":
        run += ["--limit", "8"]
    return run


@pytest.mark.slow
def test_the_doc_s_commands_run_on_a_tiny_model(tmp_path, shared_data, tiny_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    commands = doc_commands()
    benchmarks = [c[c.index("--benchmark") + 1] + ("+versus" if "--versus" in c else "") for c in commands
                  if c[0] == "eval"]
    assert benchmarks == ["alpaca_eval", "arena_hard_v0.1", "arena_hard_v2.0", "ifeval", "ifeval+versus"]
    assert [c[:2] for c in commands if c[0] == "metrics"] == [["metrics", "alpaca-eval"], ["metrics", "arena-hard"]]
    rows, asked = {}, {}
    with JudgeStub() as stub:
        judge = f"openai:stub@{stub.base_url}"
        for args in commands:
            before = len(stub.requests)
            res = sgpo(*as_run_here(args, tiny_path, judge, shared_data, tmp_path), env={"OPENAI_API_KEY": "sk-t"})
            assert res.returncode == 0, (args, res.stderr[-3000:])
            name = args[-1] if args[0] == "eval" else f"metrics {args[1]}"
            rows[name], asked[name] = json.loads(res.stdout), len(stub.requests) - before
    ae = rows["evals/alpaca_eval"]
    assert ae["n"] == ae["n_total"] == 805 and ae["failed_annotations"] == 0 and ae["judge"] == judge
    assert isinstance(ae["length_controlled_winrate"], float) and "lc_absent_reason" not in ae
    assert asked["evals/alpaca_eval"] == 1 + 805  # the judge's check, then one label per instruction
    for name in ("evals/arena_hard_v0.1", "evals/arena_hard_v2.0"):
        assert rows[name]["n"] == 8 and 0 <= rows[name]["score"] <= 100
        assert asked[name] == 1 + 2 * 8  # the check, then two games per question
    assert rows["evals/ifeval"]["n"] == 8 and asked["evals/ifeval"] == 0
    assert rows["evals/ifeval_versus"]["prompt_strict_diff"]["diff"] == 0  # the same model against itself
    # the saved files give the same figures again, without a model or a judge
    assert rows["metrics alpaca-eval"]["length_controlled_winrate"] == pytest.approx(ae["length_controlled_winrate"])
    assert rows["metrics arena-hard"]["score"] == pytest.approx(rows["evals/arena_hard_v0.1"]["score"])


def eval_error(capsys, *args) -> str:
    """``sgpo eval --model /nowhere/model ARGS`` in this process: its one-line error (the model is never loaded)."""
    assert main(["eval", "--model", "/nowhere/model", "--max-new-tokens", "2", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sgpo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("benchmark", ["alpaca_eval", "arena_hard_v2.0"])
def test_the_reference_default_is_refused_before_a_model_is_loaded(benchmark, tmp_path, capsys):
    out = tmp_path / "e"
    line = eval_error(capsys, "--benchmark", benchmark, "-o", str(out))
    assert line.startswith("sgpo: error: --judge reference: the reference judge compares two candidates")
    assert f"against the {benchmark} baseline" in line and "openai:gpt-" in line
    assert not out.exists()  # nothing generated, not even the folder


def test_a_scorer_is_refused_for_a_benchmark_with_a_baseline(tmp_path, capsys):
    line = eval_error(capsys, "--benchmark", "arena_hard_v2.0", "--judge", "ifeval", "-o", str(tmp_path / "e"))
    assert "--judge ifeval: a scorer" in line and "arena_hard_v2.0" in line


def test_a_refused_api_judge_stops_sgpo_eval_before_a_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with JudgeStub(status=401) as stub:
        line = eval_error(capsys, "--benchmark", "arena_hard_v2.0", "--judge", f"openai:j@{stub.base_url}",
                          "-o", str(tmp_path / "e"))
    assert f"judge openai:j@{stub.base_url} (--judge): {stub.base_url}/chat/completions answered HTTP 401" in line
    assert len(stub.requests) == 1


def test_missing_lc_inputs_stop_alpaca_eval_before_a_model_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    (tmp_path / "empty").mkdir()
    with JudgeStub() as stub:
        line = eval_error(capsys, "--benchmark", "alpaca_eval", "--judge", f"openai:j@{stub.base_url}",
                          "--data-dir", str(tmp_path / "empty"), "-o", str(tmp_path / "e"))
    assert "no gamed-baseline rows (gamed_baseline_rows.csv or df_gamed.csv) in" in line
    assert not (tmp_path / "e").exists()


def test_sgpo_eval_help_lists_every_judge_kind_of_the_registry(monkeypatch):
    from sgpo.core.registry import JUDGES

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no name is broken at a hyphen
    monkeypatch.setitem(JUDGES._entries, "brand-new", "judges:ReferenceJudge")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["eval"].format_help()
    judge_help = next(line for line in text.splitlines() if line.strip().startswith("--judge"))
    for kind in JUDGES.names():
        assert re.search(rf"[ :,]{re.escape(kind)}[,( ]", judge_help), (kind, judge_help)
    assert "brand-new" in judge_help
