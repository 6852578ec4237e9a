"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 (started here, stopped by the fixture)."""
import json
import math
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sgpo.eval.judge_openai import JudgeError, OpenAIJudge, parse_openai_spec, swap_order
from sgpo.eval.judge_templates import VERDICT_LABELS, pairwise_template, parse_verdict
from sgpo.eval.judges import failed, make_judge

MARK = "<<winner>>"


def chat_reply(content, top=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": content, "logprob": max(top.values()),
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class Listener(ThreadingHTTPServer):
    request_queue_size = 128  # connections waiting to be accepted (5 by default: a judge opens 32 at once)


class ChatServer:
    """A chat-completions endpoint whose answers come from ``behave(body, n) -> (status, payload, headers)``.

    Serves at most ``max_requests`` requests (later ones get 503) and is shut down when the test ends."""

    def __init__(self, behave, max_requests=200):
        self.behave = behave
        self.max_requests = max_requests
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    outer.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    n = len(outer.requests)
                if n > outer.max_requests:
                    status, payload, headers = 503, {"error": "request budget of the test server spent"}, {}
                else:
                    status, payload, headers = outer.behave(body, n)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

        self.httpd = Listener(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    servers = []

    def start(behave, **kw):
        s = ChatServer(behave, **kw).__enter__()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.__exit__(None, None, None)


def judge_for(server, **kw):
    kw.setdefault("template", "sgpo")
    kw.setdefault("backoff_base", 0.001)
    kw.setdefault("backoff_max", 0.01)
    kw.setdefault("timeout", 5)
    return OpenAIJudge("judge-model", server.base_url, **kw)


def marker_position(body):
    """1 if the marked text is shown first, 2 if second (reads this project's template)."""
    user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    first, second = user.split("[Answer B]", 1)
    first = first.split("[Answer A]", 1)[1]
    assert (MARK in first) != (MARK in second), "exactly one shown text carries the marker"
    return 1 if MARK in first else 2


def test_spec_parsing():
    assert parse_openai_spec("gpt-4o") == ("gpt-4o", None)
    assert parse_openai_spec("m@http://127.0.0.1:8000/v1") == ("m", "http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError):
        parse_openai_spec("")


def test_weighted_preference_mapped_back_through_random_order(serve):
    seen = {1: 0, 2: 0}

    def behave(body, n):
        pos = marker_position(body)
        seen[pos] += 1
        assert body["max_tokens"] == 1 and body["logprobs"] is True
        # the judge puts 80% on the marked text's label, 20% on the other
        top = {"A": math.log(0.8), "B": math.log(0.2)} if pos == 1 else {"B": math.log(0.8), "A": math.log(0.2)}
        top["The"] = math.log(0.001)
        return 200, chat_reply("A" if pos == 1 else "B", top), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=4)
    prompts = [f"question {i}" for i in range(24)]
    marked = [f"answer {i} {MARK}" for i in range(24)]
    plain = [f"answer {i}" for i in range(24)]

    prefs_a = judge.prefer(prompts, marked, plain)
    assert prefs_a == pytest.approx([0.8] * 24, abs=1e-9)
    prefs_b = judge.prefer(prompts, plain, marked)
    assert prefs_b == pytest.approx([0.2] * 24, abs=1e-9)
    # the order really was randomised, both ways
    assert seen[1] > 0 and seen[2] > 0
    assert judge.stats()["by_logprobs"] == 48 and judge.stats()["failed"] == 0
    # the order of an item depends on its content and the seed only
    flips = [swap_order(0, p, x, y) for p, x, y in zip(prompts, marked, plain)]
    assert flips == [swap_order(0, p, x, y) for p, x, y in zip(prompts, marked, plain)]
    assert 0 < sum(flips) < len(flips)
    assert flips != [swap_order(1, p, x, y) for p, x, y in zip(prompts, marked, plain)]


def test_text_label_when_no_logprobs(serve):
    def behave(body, n):
        return 200, chat_reply("A" if marker_position(body) == 1 else "B"), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=1)
    prompts = [f"q{i}" for i in range(10)]
    prefs = judge.prefer(prompts, [f"x{i} {MARK}" for i in range(10)], [f"y{i}" for i in range(10)])
    assert prefs == [1.0] * 10
    assert judge.stats()["by_text"] == 10
    # identical outputs: a tie, and no request
    assert judge.prefer(["q"], ["same"], ["same"]) == [0.5] and len(server.requests) == 10


def test_429_then_success_is_retried(serve):
    def behave(body, n):
        if n == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        return 200, chat_reply("A", {"A": math.log(0.6), "B": math.log(0.4)}), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=1, seed=3)
    p, x, y = "prompt", "first text", "second text"
    [pref] = judge.prefer([p], [x], [y])
    expected = 0.4 if swap_order(3, p, x, y) else 0.6
    assert pref == pytest.approx(expected)
    assert len(server.requests) == 2 and judge.stats()["retries"] == 1 and judge.stats()["failed"] == 0


def test_500_then_success_and_persistent_500_fails(serve):
    def behave(body, n):
        if "always-broken" in json.dumps(body):
            return 500, {"error": "boom"}, {}
        if n == 1:
            return 500, {"error": "boom"}, {}
        return 200, chat_reply("B"), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=1, max_retries=2)
    [pref] = judge.prefer(["ok prompt"], ["a"], ["b"])
    assert pref in (0.0, 1.0) and judge.stats()["failed"] == 0
    before = len(server.requests)
    [pref] = judge.prefer(["always-broken prompt"], ["a"], ["b"])
    assert math.isnan(pref)
    assert len(server.requests) - before == 3  # first try + 2 retries, then given up
    assert judge.stats()["failed"] == 1 and "500" in judge.failures[-1]["reason"]


def test_garbage_replies_are_failed_annotations_not_crashes(serve):
    def behave(body, n):
        user = body["messages"][-1]["content"]
        if "not-json" in user:
            return 200, b"<html>this is not json", {}
        if "no-choices" in user:
            return 200, {"object": "chat.completion"}, {}
        if "chatty" in user:
            return 200, chat_reply("Well, both answers have merit"), {}
        return 200, chat_reply("A"), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=2, max_retries=1)
    prompts = ["not-json", "no-choices", "chatty", "fine"]
    prefs = judge.prefer(prompts, ["a"] * 4, ["b"] * 4)
    assert [math.isnan(v) for v in prefs] == [True, True, True, False]
    assert failed(prefs) == 3 and judge.stats()["failed"] == 3
    assert len(server.requests) == 4  # a malformed 200 reply is not retried
    reasons = " ".join(f["reason"] for f in judge.failures)
    assert "not JSON" in reasons and "not a label" in reasons


def test_auth_error_raises(serve):
    server = serve(lambda body, n: (401, {"error": "bad key"}, {}))
    judge = judge_for(server, concurrency=1)
    with pytest.raises(JudgeError):
        judge.prefer(["p"], ["a"], ["b"])


def test_logprobs_refused_falls_back_to_text(serve):
    def behave(body, n):
        if body.get("logprobs"):
            return 400, {"error": "logprobs not supported"}, {}
        return 200, chat_reply("A" if marker_position(body) == 1 else "B"), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=1)
    assert judge.prefer(["p"], [f"a {MARK}"], ["b"]) == [1.0]


def test_make_judge_request_shape_and_api_key(serve, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = serve(lambda body, n: (200, chat_reply("A"), {}))
    judge = make_judge(f"openai:judge-model@{server.base_url}", template="sgpo", concurrency=1)
    assert isinstance(judge, OpenAIJudge) and judge.template_name == "sgpo:pairwise_label"
    judge.prefer(["What is 2+2?"], ["4"], ["5"])
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "judge-model"
    assert req["headers"].get("Authorization") == "Bearer sk-test"
    roles = [m["role"] for m in req["body"]["messages"]]
    assert roles == ["system", "user"]
    assert "What is 2+2?" in req["body"]["messages"][1]["content"]


def test_arena_verdicts(serve):
    def behave(body, n):
        user = body["messages"][-1]["content"]
        assert body["messages"][0]["role"] == "system" and "[[A>>B]]" in body["messages"][0]["content"]
        if "conflict" in user:
            return 200, chat_reply("Maybe [[A>B]]. On reflection [[B>A]]."), {}
        if "reference_answer" in user:
            return 200, chat_reply("Checked against the reference. My final verdict is [[A=B]]."), {}
        return 200, chat_reply("My own answer is 4. Assistant B is right.\n\nMy final verdict: [[B>>A]]"), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=2)
    out = judge.verdicts(["2+2?", "conflict", "3+3?"], ["5", "x", "6"], ["4", "y", "six"],
                         [None, None, "6"])
    assert out == ["B>>A", None, "A=B"]
    assert judge.stats()["failed"] == 1
    contents = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert any("<assistant_a_answer>\n5\n</assistant_a_answer>" in c and "<user_prompt>\n2+2?\n</user_prompt>" in c
               for c in contents)


def test_parse_verdict():
    assert parse_verdict("final: [[A>>B]]") == "A>>B"
    assert parse_verdict("[[B<A]]") == "A>B"
    assert parse_verdict("[[ B = A ]]") == "A=B"
    assert parse_verdict("[[A<<B]]") == "B>>A"
    assert parse_verdict("[[A>B]] and again [[A>B]]") == "A>B"
    assert parse_verdict("[[A>B]] or [[A=B]]") is None
    assert parse_verdict("A is better") is None
    assert parse_verdict(None) is None
    assert set(VERDICT_LABELS) == {"A>>B", "A>B", "A=B", "B>A", "B>>A"}


def test_template_auto_reads_installed_alpaca_eval(tmp_path, monkeypatch):
    """With an alpaca_eval package on the path, 'auto' uses its weighted template and label tokens."""
    pkg = tmp_path / "alpaca_eval"
    cfg_dir = pkg / "evaluators_configs" / "weighted_alpaca_eval_gpt4_turbo"
    tpl_dir = pkg / "evaluators_configs" / "some_clf"
    cfg_dir.mkdir(parents=True)
    tpl_dir.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (cfg_dir / "configs.yaml").write_text(
        "weighted_alpaca_eval_gpt4_turbo:\n  prompt_template: some_clf/clf.txt\n"
        "  completion_parser_kwargs:\n    numerator_token: m\n    denominator_tokens: [m, M]\n")
    (tpl_dir / "clf.txt").write_text("<|im_start|>system\nBe fair.\n<|im_end|>\n<|im_start|>user\n"
                                     "{instruction} | m: {output_1} | M: {output_2} {\n  json }\n<|im_end|>")
    for name in [m for m in sys.modules if m == "alpaca_eval" or m.startswith("alpaca_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    tpl = pairwise_template("auto")
    assert tpl.name == "alpaca_eval:weighted_alpaca_eval_gpt4_turbo" and tpl.labels == ("m", "M")
    msgs = tpl.messages("Q {output_2}", "one", "two")
    # one-pass filling: a placeholder inside inserted text is not expanded; other braces are kept
    assert msgs[1]["content"] == "Q {output_2} | m: one | M: two {\n  json }"
    assert pairwise_template("sgpo").name == "sgpo:pairwise_label"


def test_template_auto_without_alpaca_eval(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alpaca_eval" else real(name, *a))
    tpl = pairwise_template("auto")
    assert tpl.name == "sgpo:pairwise_label" and tpl.labels == ("A", "B")
    with pytest.raises(ValueError):
        pairwise_template("alpaca_eval")
    text = tpl.messages("INSTR", "OUT1", "OUT2")[1]["content"]
    assert re.search(r"INSTR.*OUT1.*OUT2", text, re.S)


def test_timeout_is_retried(serve):
    import time

    def behave(body, n):
        if n == 1:
            time.sleep(1.0)  # longer than the judge's timeout
        return 200, chat_reply("A"), {}

    server = serve(behave)
    judge = judge_for(server, concurrency=1, timeout=0.3)
    [pref] = judge.prefer(["p"], ["a"], ["b"])
    assert pref in (0.0, 1.0)
    assert judge.stats()["retries"] == 1 and judge.stats()["failed"] == 0


def test_a_run_s_eval_section_sets_an_api_judge_s_concurrency_and_retries():
    from sgpo.config.schema import load
    from sgpo.eval.judges import api_settings, cached_judge

    e = load(None, ["eval.judge_concurrency=16", "eval.judge_retries=2"]).eval
    judge = cached_judge("openai:gpt-4o@http://127.0.0.1:9", e)  # nothing is asked: no request is made
    settings = getattr(judge, "judge", judge).settings
    assert (settings.concurrency, settings.max_retries) == (16, 2)
    assert api_settings("reference", e) == {} and api_settings("lm:sgpo:gemma-3-270m", e) == {}


def test_a_run_s_api_judge_keeps_32_requests_in_flight_by_default(serve):
    """An API judge judges about a thousand pairs a round while every GPU waits: by default a run's eval section
    keeps 32 requests in flight (each request here is answered only once 32 are waiting together)."""
    from sgpo.config.schema import load
    from sgpo.eval.judges import api_settings

    together = threading.Barrier(32, timeout=20)

    def behave(body, n):
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return 500, {"error": "fewer than 32 requests were in flight"}, {}
        return 200, chat_reply("A"), {}

    server = serve(behave)
    settings = api_settings("openai:judge-model", load(None).eval)
    judge = judge_for(server, **{**settings, "max_retries": 0, "timeout": 60})
    prefs = judge.prefer([f"q{i}" for i in range(64)], ["a"] * 64, ["b"] * 64)
    assert judge.stats()["failed"] == 0 and len(prefs) == 64 and len(server.requests) == 64
