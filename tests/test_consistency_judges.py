"""Consistency judges: exact per-turn arithmetic against a local server whose answers the test
controls, parse failures, and the local-LM backend (the live `transformers serve` runs are in
test_openai_judge.py, which owns that server)."""

import math
import os

import pytest
import torch
from chat_server import ChatServer, reply

from ppg.judges import (
    JudgeError,
    JudgeRequest,
    LineToLineJudge,
    LocalBackend,
    OpenAIBackend,
    PromptToLineJudge,
    QAConsistencyJudge,
)
from ppg.judges.consistency import parse_questions
from ppg.types import Context

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = {"max_retries": 1, "timeout": 5.0}
PERSONA = ["I work as a nurse at the city hospital.", "I have two dogs."]


def context(persona=PERSONA):
    return Context(context_id="c0", agent_system_prompt="You are Ann. " + " ".join(persona),
                   user_system_prompt="", opening="Hi!", persona=list(persona))


def conversation(lines, replies=None, ctx=None):
    """One JudgeRequest per agent turn of a conversation whose agent says ``lines``."""
    ctx = ctx or context()
    replies = replies or [f"Reply {t}." for t in range(len(lines))]
    history, requests = [("user", ctx.opening)], []
    for turn, line in enumerate(lines):
        requests.append(JudgeRequest(ctx, list(history), line, turn))
        history += [("assistant", line), ("user", replies[turn])]
    return requests


def asked(body) -> str:
    return body["messages"][-1]["content"]


# --- prompt-to-line ------------------------------------------------------------------------------

def test_prompt_to_line_rewards_from_text_and_logprobs():
    top = [{"token": "No", "logprob": -0.2}, {"token": " no", "logprob": -3.0},
           {"token": "Yes", "logprob": -1.5}]
    graded = reply("No", [{"token": "No", "logprob": -0.2, "top_logprobs": top}])

    def respond(n, body):
        line = asked(body).split("The speaker replied:")[1]
        return "Yes." if "cat" in line else graded if "graded" in line else "No"

    with ChatServer(respond) as server:
        judge = PromptToLineJudge(OpenAIBackend(server.url, "m", **FAST))
        rewards = judge.score(conversation(["I walk my dogs.", "My cat is asleep.", "graded line"]))
    p_no, p_yes = math.exp(-0.2) + math.exp(-3.0), math.exp(-1.5)
    assert rewards[:2] == [1.0, 0.0]
    assert rewards[2] == pytest.approx(p_no / (p_no + p_yes), abs=1e-12)
    assert server.count == 3 and judge.stats["parse_failures"] == 0
    # requests run concurrently: find turn 0's by its line, not by arrival order
    body = next(b for b in server.bodies if "I walk my dogs." in asked(b))
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0.0
    assert "- I have two dogs." in asked(body) and '"Hi!"' in asked(body)  # persona and partner's line


def test_prompt_to_line_parse_failures_raise_or_nan():
    def respond(n, body):
        return "Maybe." if "unclear" in asked(body) else "yes"

    lines = ["I hate dogs.", "unclear", "I am a pilot."]
    with ChatServer(respond) as server:
        judge = PromptToLineJudge(OpenAIBackend(server.url, "m", **FAST))
        with pytest.raises(JudgeError, match=r"PromptToLineJudge: 1 of 3 lines got no readable verdict "
                                             r"\(2 parse failures"):
            judge.score(conversation(lines))
        lenient = PromptToLineJudge(OpenAIBackend(server.url, "m", **FAST), on_parse_failure="nan")
        rewards = lenient.score(conversation(lines))
    assert rewards[0] == 0.0 and math.isnan(rewards[1]) and rewards[2] == 0.0
    assert lenient.stats["parse_failures"] == 2 and lenient.stats["unscored"] == 1  # asked twice
    assert lenient.parse_failures == 2


# --- line-to-line --------------------------------------------------------------------------------

def test_line_to_line_sees_history_and_skips_turn_0():
    def respond(n, body):
        text = asked(body)
        newest = text.split("The speaker's newest line:")[1]
        return "Yes" if "Paris" in newest and "Speaker: I live in Rome." in text else "No"

    lines = ["I live in Rome.", "I love my dogs.", "I have lived in Paris all my life."]
    with ChatServer(respond) as server:
        judge = LineToLineJudge(OpenAIBackend(server.url, "m", **FAST))
        assert judge.score(conversation(lines)) == [1.0, 1.0, 0.0]
        assert server.count == 2  # turn 0 has no earlier line: r = 1, nobody asked
        assert "1. Partner: Hi!\n2. Speaker: I live in Rome.\n3. Partner: Reply 0." in asked(server.bodies[0])
        # the same last line without the earlier Rome line is consistent
        assert judge.score(conversation(["I like tea.", "I have lived in Paris all my life."])) == [1.0, 1.0]


def test_line_to_line_question_validation():
    with pytest.raises(ValueError, match="must contain {line}"):
        LineToLineJudge(LocalBackend.__new__(LocalBackend), question="{history} yes or no?")
    with pytest.raises(ValueError, match=r"invalid.*\{history\}, \{line\}"):
        LineToLineJudge(LocalBackend.__new__(LocalBackend), question="{line} {persona}")
    with pytest.raises(ValueError, match="on_parse_failure"):
        PromptToLineJudge(LocalBackend.__new__(LocalBackend), on_parse_failure="half")


# --- Q&A consistency -----------------------------------------------------------------------------

REFERENCES = {"Where do you work?": "At the hospital.", "Do you have pets?": "Two dogs."}


def qa_server(grade_reply=None):
    """Questions, reference answers, in-character answers (a bakery once the agent said so) and
    grades (yes when the answer equals the reference)."""
    def respond(n, body):
        text = asked(body)
        if text.startswith("Here is a description") and "Write 2 short questions" in text:
            return "1. Where do you work?\n2) Do you have pets? I wonder.\nThanks!"
        if text.startswith("Here is a description"):
            return REFERENCES[text.split("description: ")[-1]]
        if text.startswith("(A quick question"):
            said = " ".join(m["content"] for m in body["messages"] if m["role"] == "assistant")
            if "pets" in text:
                return "Two dogs."
            return "At a bakery." if "bakery" in said else "At the hospital."
        question = text.split("Question to a person: ")[1].split("\n")[0]
        given = text.split('The answer they gave: "')[1].split('"')[0]
        if grade_reply and question in grade_reply:
            return grade_reply[question]
        return "Yes" if given == REFERENCES[question] else "No"

    return ChatServer(respond)


def test_qa_consistency_arithmetic_and_question_cache():
    lines = ["I'm a nurse, it keeps me busy.", "These days I work at a bakery.", "Tea?"]
    with qa_server() as server:
        judge = QAConsistencyJudge(OpenAIBackend(server.url, "m", **FAST), n_questions=2)
        assert judge.score(conversation(lines)) == [1.0, 0.5, 0.5]
        # 1 question list + 2 references + 3 turns x 2 answers + 3 distinct grades (identical
        # grade prompts in one batch are asked once: "Two dogs." thrice, the bakery twice)
        assert server.count == 1 + 2 + 6 + 3
        assert list(judge.tests.values()) == [list(REFERENCES.items())]
        assert judge.score(conversation(lines[:1])) == [1.0]
        assert server.count == 12 + 4  # questions are not written again for the same persona
    answer_prompt = server.bodies[-4]["messages"]
    assert answer_prompt[0] == {"role": "system", "content": context().agent_system_prompt}
    assert [m["role"] for m in answer_prompt] == ["system", "user", "assistant", "user"]
    assert answer_prompt[2]["content"] == lines[0]


def test_qa_consistency_parse_failures():
    lines = ["I'm a nurse.", "I work at a bakery."]
    with qa_server(grade_reply={"Do you have pets?": "Hmm, hard to say."}) as server:
        lenient = QAConsistencyJudge(OpenAIBackend(server.url, "m", **FAST), n_questions=2,
                                     on_parse_failure="nan")
        assert lenient.score(conversation(lines)) == [1.0, 0.0]  # mean over the graded question
        # one grade prompt (the same in both turns) asked twice (max_retries=1), unreadable both times
        assert lenient.stats["unscored"] == 2 and lenient.stats["parse_failures"] == 2
        strict = QAConsistencyJudge(OpenAIBackend(server.url, "m", **FAST), n_questions=2)
        with pytest.raises(JudgeError, match="2 of 4 questions got no readable verdict"):
            strict.score(conversation(lines))
    with ChatServer(lambda n, body: "I cannot write questions.") as server:
        judge = QAConsistencyJudge(OpenAIBackend(server.url, "m", **FAST))
        with pytest.raises(JudgeError, match="wrote no readable questions"):
            judge.score(conversation(lines))
        lenient = QAConsistencyJudge(OpenAIBackend(server.url, "m", **FAST), on_parse_failure="nan")
        assert all(math.isnan(r) for r in lenient.score(conversation(lines)))


def test_qa_parse_questions():
    text = "Here are questions:\n1. Where do you live? In a city?\n- Do you work?\n* Do you work?\nEnd."
    assert parse_questions(text, 5) == ["Where do you live?", "Do you work?"]
    assert parse_questions(text, 1) == ["Where do you live?"]
    with pytest.raises(ValueError, match="no question"):
        parse_questions("No questions here.", 3)
    with pytest.raises(ValueError, match="n_questions"):
        QAConsistencyJudge(LocalBackend.__new__(LocalBackend), n_questions=0)


# --- the local-LM backend ------------------------------------------------------------------------

def test_consistency_local_backend_is_exact_and_batched(tokenizer, tiny_model):
    backend = LocalBackend.from_loaded(tiny_model, tokenizer, batch_size=2)
    p2l, l2l = PromptToLineJudge(backend), LineToLineJudge(backend)
    requests = conversation(["I walk my dogs.", "I never had a pet.", "Work was long today."])
    prompts = [p2l.prompt(r) for r in requests]
    logprobs = backend.answer_logprobs(prompts)
    expected = (1 - torch.sigmoid(logprobs[:, 0] - logprobs[:, 1])).tolist()
    assert p2l.score(requests) == pytest.approx(expected, abs=1e-9)
    assert [p2l.score([r])[0] for r in requests] == pytest.approx(expected, abs=1e-5)
    l2l_rewards = l2l.score(requests)
    assert l2l_rewards[0] == 1.0
    second = backend.answer_logprobs([l2l.prompt(requests[1])])[0]
    assert l2l_rewards[1] == pytest.approx(float(1 - torch.sigmoid(second[0] - second[1])), abs=1e-5)
    texts = backend.generate(prompts[:2], max_tokens=3)
    assert len(texts) == 2 and all(t is None or isinstance(t, str) for t in texts)
    assert backend.stats["parse_failures"] == sum(t is None for t in texts)
