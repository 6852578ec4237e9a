"""A stand-in OpenAI-compatible judge on 127.0.0.1 (``ChatServer`` of the judge's own tests): ``with JudgeStub() as
stub`` answers like a judge, ``JudgeStub(status=401)`` refuses every request with an OpenAI-style error body.

Like a judge: a one-token request (AlpacaEval's weighted label, a run's check of its judges) gets the label ``A`` with
log-probabilities, a longer one (an Arena-Hard game) a judgment ending in ``[[A>B]]``. ``requests`` records every
request (``path``, ``body``, ``headers``)."""
from __future__ import annotations

import math

from eval.test_judge_openai import ChatServer, chat_reply


def judge_reply(body: dict, n: int):
    if body.get("max_tokens") == 1:
        return 200, chat_reply("A", {"A": math.log(0.7), "B": math.log(0.3)}), {}
    return 200, chat_reply("Both answer; A is a little clearer. [[A>B]]"), {}


def refusal(status: int):
    error = {"error": {"message": "Incorrect API key provided: sk-wrong.\nSee your account.",
                       "type": "invalid_request_error"}}
    return lambda body, n: (status, error, {})


def JudgeStub(status: int = 200, max_requests: int = 5000) -> ChatServer:
    return ChatServer(judge_reply if status == 200 else refusal(status), max_requests=max_requests)
