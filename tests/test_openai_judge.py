"""OpenAIJudge against a real `transformers serve` process and a scripted local HTTP server."""

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from chat_server import ChatServer, reply

from ppg.judges import JudgeError, JudgeRequest, OpenAIJudge
from ppg.judges.openai_compatible import ReplyError, parse_reply
from ppg.types import Context

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = {"max_retries": 2, "timeout": 5.0}


def request(line, persona=("I have two dogs.", "I work as a nurse.")):
    context = Context(context_id="c0", agent_system_prompt="", user_system_prompt="", opening="Hi!",
                      persona=list(persona))
    return JudgeRequest(context=context, history=[("user", "Hi!")], line=line, turn=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- parsing and validation (no server) --------------------------------------------------------

@pytest.mark.parametrize("content, verdict, expected", [
    ("No.", "yes_no", 1.0), (" yes, it does", "yes_no", 0.0), ("**No**", "yes_no", 1.0),
    ("Answer: YES", "yes_no", 0.0), ("7", "score", 0.7), ("Score: 10/10", "score", 1.0),
    ("0", "score", 0.0),
])
def test_parse_reply_text(content, verdict, expected):
    assert parse_reply(reply(content), verdict) == expected


@pytest.mark.parametrize("body, verdict", [
    (reply("Maybe."), "yes_no"), (reply("Nope"), "yes_no"), (reply("11"), "score"),
    (reply("7.5"), "score"), (reply("seven"), "score"), ({"choices": []}, "yes_no"),
    ({"error": "overloaded"}, "yes_no"), (reply(None), "yes_no"), ("not a dict", "yes_no"),
])
def test_parse_reply_rejects(body, verdict):
    with pytest.raises(ReplyError):
        parse_reply(body, verdict)


def test_parse_reply_uses_logprobs():
    top = [{"token": "No", "logprob": -0.2}, {"token": " no", "logprob": -3.0},
           {"token": "Yes", "logprob": -1.5}, {"token": "Maybe", "logprob": -4.0}]
    positions = [{"token": " ", "logprob": -0.01, "top_logprobs": []},
                 {"token": "No", "logprob": -0.2, "top_logprobs": top}]
    p_no, p_yes = sum(pow(2.718281828459045, x) for x in (-0.2, -3.0)), pow(2.718281828459045, -1.5)
    assert parse_reply(reply("No", positions), "yes_no") == pytest.approx(p_no / (p_no + p_yes))
    # logprobs that do not start with a verdict fall back to the text
    other = [{"token": "Well", "logprob": -0.1, "top_logprobs": top}]
    assert parse_reply(reply("no", other), "yes_no") == 1.0


@pytest.mark.parametrize("kwargs, name", [
    ({"base_url": "localhost:8000"}, "base_url"), ({"model": ""}, "model"),
    ({"verdict": "stars"}, "verdict"), ({"concurrency": 0}, "concurrency"),
    ({"timeout": 0}, "timeout"), ({"max_retries": -1}, "max_retries"),
    ({"prompt": "no line here"}, "prompt"), ({"max_tokens": 0}, "max_tokens"),
])
def test_openai_judge_validation(kwargs, name):
    arguments = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=name):
        OpenAIJudge(**arguments)


def test_request_body_and_url():
    judge = OpenAIJudge("http://127.0.0.1:9/v1/", "m", verdict="score", system="Be strict.",
                        extra_body={"max_tokens": None, "max_completion_tokens": 4, "seed": 1})
    assert judge.url == "http://127.0.0.1:9/v1/chat/completions"
    body = judge.body(request("I walk my dogs."))
    assert "max_tokens" not in body and body["max_completion_tokens"] == 4 and body["seed"] == 1
    assert "logprobs" not in body  # integer scores are read from text only
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "I walk my dogs." in body["messages"][1]["content"] and "- I work as a nurse." in body["messages"][1]["content"]


# --- a scripted local server -------------------------------------------------------------------

def test_malformed_reply_retried_then_error():
    with ChatServer(lambda n, body: (200, b'{"choices": [{"message": {"content": "I think so'), ) as server:
        judge = OpenAIJudge(server.url, "m", **FAST)
        with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*3 attempt.*not JSON") as error:
            judge.score([request("x")])
    assert server.count == 3
    assert "\n" not in str(error.value)


def test_unparseable_verdict_then_recovery(tmp_path):
    answers = {1: b'{"choices": [{"message": {"content": "Perhaps."}}]}'}
    good = json.dumps(reply("No.")).encode()
    with ChatServer(lambda n, body: (200, answers.get(n, good))) as server:
        judge = OpenAIJudge(server.url, "m", cache_dir=str(tmp_path), **FAST)
        assert judge.score([request("x")]) == [1.0]
    assert server.count == 2 and judge.stats["parse_failures"] == 1


def test_retryable_status_then_success_and_fatal_status():
    good = json.dumps(reply("yes")).encode()
    with ChatServer(lambda n, body: (503, b'{"error": "busy"}') if n == 1 else (200, good)) as server:
        assert OpenAIJudge(server.url, "m", **FAST).score([request("x")]) == [0.0]
        assert server.count == 2
    with ChatServer(lambda n, body: (400, b'{"error": "unknown field logprobs"}')) as server:
        with pytest.raises(JudgeError, match="rejected the request: HTTP 400.*logprobs"):
            OpenAIJudge(server.url, "m", **FAST).score([request("x")])
        assert server.count == 1  # a client error is not retried


def test_concurrency_limit_and_in_batch_dedup():
    good = json.dumps(reply("No")).encode()
    with ChatServer(lambda n, body: (200, good), delay=0.15) as server:
        judge = OpenAIJudge(server.url, "m", concurrency=2, **FAST)
        lines = [f"line {i}" for i in range(6)]
        assert judge.score([request(line) for line in lines + lines[:2]]) == [1.0] * 8
    assert server.count == 6
    assert server.max_active == 2


def test_timeout_is_a_failure():
    with ChatServer(lambda n, body: (200, b"{}"), delay=1.0) as server:
        judge = OpenAIJudge(server.url, "m", timeout=0.2, max_retries=0)
        with pytest.raises(JudgeError, match="1 attempt.*timed out"):
            judge.score([request("x")])


# --- a real `transformers serve` ---------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("the serving extra is not installed (pip install 'transformers[serving]')")
    from ppg.models.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir())
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir,
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited early:\n{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready after 120 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.25)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": model_dir, "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_real_server_scores_and_caches(served, tmp_path):
    judge = OpenAIJudge(served["url"], served["model"], cache_dir=str(tmp_path), concurrency=2, **FAST)
    requests = [request("After my shift at the hospital I walk my dogs."), request("I have never owned a pet.")]
    first = judge.score(requests)
    assert len(first) == 2 and all(0.0 <= value <= 1.0 for value in first)
    assert judge.stats["requests"] == 2
    assert judge.score(requests) == first
    assert judge.stats["requests"] == 2 and judge.stats["cache_hits"] == 2
    # the cache is on disk: a fresh judge with the same settings asks nothing either
    fresh = OpenAIJudge(served["url"], served["model"], cache_dir=str(tmp_path), **FAST)
    assert fresh.score(requests[:1]) == first[:1]
    assert fresh.stats == {"requests": 0, "cache_hits": 1, "http_errors": 0, "parse_failures": 0}
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_real_server_score_verdict(served):
    judge = OpenAIJudge(served["url"], served["model"], verdict="score", max_retries=1)
    try:
        value = judge.score([request("I work as a nurse.")])[0]
    except JudgeError as error:  # a 135M model may never produce an integer: the error must say so
        assert "no integer 0-10" in str(error)
    else:
        assert 0.0 <= value <= 1.0


def test_openai_user_talks_to_the_real_server(served):
    from ppg.rollout.users import OpenAIUser

    user = OpenAIUser(served["url"], served["model"], max_tokens=12, temperature=0.0, max_retries=1)
    context = Context("c", "You are Ann.", "You are a curious person who asks questions.", "Hi!")
    replies = user.respond([context, context], [[("user", "Hi!"), ("assistant", "Hello, I am Ann.")]] * 2, 0)
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    assert replies[0] == replies[1]  # temperature 0: identical conversations are asked once


def _consistency_requests():
    from test_consistency_judges import conversation

    return conversation(["I work nights at the hospital.", "My dogs wait for me at home.",
                         "I have never had a pet."])


def _checked_live(judge, rewards, asked):
    """Every reward is in [0, 1] or NaN (no readable verdict), and the counters add up."""
    assert len(rewards) == 3
    assert all(math.isnan(r) or 0.0 <= r <= 1.0 for r in rewards)
    assert judge.stats["http_errors"] == 0
    # an unreadable reply is asked again, except after the last attempt of an unscored item
    stats = judge.stats
    assert stats["requests"] == asked + stats["parse_failures"] - stats["unscored"]
    assert stats["unscored"] == sum(math.isnan(r) for r in rewards)


def test_prompt_to_line_real_server(served):
    from ppg.judges import OpenAIBackend, PromptToLineJudge

    judge = PromptToLineJudge(OpenAIBackend(served["url"], served["model"], max_retries=1),
                              on_parse_failure="nan")
    rewards = judge.score(_consistency_requests())
    _checked_live(judge, rewards, asked=3)


def test_line_to_line_real_server(served):
    from ppg.judges import LineToLineJudge, OpenAIBackend

    judge = LineToLineJudge(OpenAIBackend(served["url"], served["model"], max_retries=1),
                            on_parse_failure="nan")
    rewards = judge.score(_consistency_requests())
    assert rewards[0] == 1.0
    _checked_live(judge, rewards, asked=2)


def test_qa_consistency_real_server(served):
    from ppg.judges import OpenAIBackend, QAConsistencyJudge

    judge = QAConsistencyJudge(OpenAIBackend(served["url"], served["model"], max_retries=1),
                               n_questions=2, answer_tokens=16, question_tokens=60,
                               on_parse_failure="nan")
    rewards = judge.score(_consistency_requests())
    assert len(judge.tests) == 1  # one persona: its questions written once
    questions = len(next(iter(judge.tests.values())))
    assert all(math.isnan(r) or 0.0 <= r <= 1.0 for r in rewards) and len(rewards) == 3
    assert judge.stats["http_errors"] == 0 and judge.stats["requests"] >= 1 + questions * (1 + 3)


def test_stopped_server_raises_judge_error(served):
    """Runs last in this module: it stops the shared server."""
    judge = OpenAIJudge(served["url"], served["model"], **FAST)
    assert 0.0 <= judge.score([request("I love my dogs.")])[0] <= 1.0
    served["process"].terminate()
    served["process"].wait(timeout=15)
    with pytest.raises(JudgeError) as error:
        judge.score([request("I am a nurse.")])
    message = str(error.value)
    assert served["url"] in message and "3 attempt" in message and "\n" not in message
    assert judge.stats["requests"] == 1 + 3
