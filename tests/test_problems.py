"""Problems: persona data parsing, the persona domains, and the synthetic rewards."""

import csv
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from ppg.judges.base import JudgeRequest
from ppg.problems import (
    PROBLEMS,
    BlockStructured,
    Chatting,
    DelayedPayoff,
    Education,
    LaggedPayoff,
    NoisyIndependent,
    SyntheticPersonaChat,
    Therapy,
    problem_from_name,
)
from ppg.problems.persona_chat import NAMES, fill_placeholders, read_rows, split_turns
from ppg.problems.synthetic import TOPICS
from ppg.subsets import FullPlanning, Greedy, KStepLookahead, Segment

SPC_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthetic_persona_chat"
needs_spc = pytest.mark.skipif(not SPC_DIR.is_dir(), reason=f"{SPC_DIR} not present")
COLUMNS = "user 1 personas,user 2 personas,Best Generated Conversation"


def write_csv(path: Path, header: str, *rows: tuple[str, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header.split(","))
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- Synthetic-Persona-Chat


@needs_spc
@pytest.mark.parametrize("side,split,rows,facts", [
    ("user 2", "train", 1000, 4483), ("user 2", "test", 968, 4345),
    ("user 1", "train", 1000, 4495), ("user 1", "validation", 968, 4368),
])
def test_spc_parses_real_data(side, split, rows, facts):
    contexts = SyntheticPersonaChat(data_dir=str(SPC_DIR), agent_side=side).all_contexts(split)
    assert len(contexts) == rows
    assert sum(len(c.persona) for c in contexts) == facts
    assert all(4 <= len(c.persona) <= 5 for c in contexts)
    # persona facts are the raw column's non-empty lines (checked with the csv module directly)
    file = "valid" if split == "train" else "test"
    column = f"{side} personas"
    with (SPC_DIR / f"Synthetic-Persona-Chat_{file}.csv").open(newline="", encoding="utf-8") as f:
        csv.field_size_limit(sys.maxsize)
        raw = [r[column] for r in csv.DictReader(f)]
    assert contexts[7].persona == [s.strip() for s in raw[7].splitlines() if s.strip()]
    texts = [t for c in contexts for t in (c.opening, *c.user_lines)]
    assert not [t for t in texts if re.search(r"user\s*[12]\s*:", t, re.IGNORECASE)]
    assert not [t for t in texts if "[user" in t.lower()]
    for c in contexts:
        assert c.agent_system_prompt and c.user_system_prompt and c.opening and c.user_lines
        assert c.meta["agent_name"] in c.agent_system_prompt
        assert all(fact in c.agent_system_prompt for fact in c.persona)
        assert all(fact in c.user_system_prompt for fact in c.meta["user_persona"])
    assert len({c.context_id for c in contexts}) == rows


@needs_spc
def test_spc_sides_and_names():
    two = SyntheticPersonaChat(data_dir=str(SPC_DIR)).all_contexts("test")[0]
    one = SyntheticPersonaChat(data_dir=str(SPC_DIR), agent_side="user 1").all_contexts("test")[0]
    # the reference opens "User 1: Hi, I'm [User 1's name]. What's your name?"
    assert two.opening == f"Hi, I'm {two.meta['user_name']}. What's your name?"
    assert two.meta["user_name"] in NAMES and two.meta["agent_name"] != two.meta["user_name"]
    assert one.opening.startswith(f"Hi, I'm {one.meta['user_name']}.")
    assert one.persona == two.meta["user_persona"] and two.persona == one.meta["user_persona"]


@needs_spc
def test_spc_train_and_held_out_are_disjoint():
    problem = SyntheticPersonaChat(data_dir=str(SPC_DIR))
    train = {tuple(c.persona) for c in problem.all_contexts("train")}
    assert problem.path("train").name.endswith("_valid.csv")
    assert problem.path("valid").name.endswith("_test.csv")  # "valid" means the held-out split
    swapped = SyntheticPersonaChat(split="test", data_dir=str(SPC_DIR))
    assert len(swapped.all_contexts("train")) == 968 and len(swapped.all_contexts("test")) == 1000
    assert len(train) > 900


def test_spc_tiny_csv_through_env(tmp_path, monkeypatch):
    conversation = ("* * *\nUser 1: Hi, I'm [user 1 name]!\n[Later]\nUser 2: Hey [name], I'm "
                    "[User 2's name].\nI like maps.\nUser 1: Where is [user 2's hometown]?\n"
                    "User 1: Tell me, User 2.\nUser 2: Bye.\n")
    write_csv(tmp_path / "synthetic_persona_chat" / "Synthetic-Persona-Chat_valid.csv", COLUMNS,
              ("I fish.\nI am tall.", "I like maps.\n\nI hate rain.\n", conversation))
    monkeypatch.setenv("PPG_DATA_DIR", str(tmp_path))
    [context] = SyntheticPersonaChat().all_contexts("train")
    agent, user = context.meta["agent_name"], context.meta["user_name"]
    assert context.persona == ["I like maps.", "I hate rain."]
    assert context.opening == f"Hi, I'm {user}!"
    assert context.user_lines == [f"Where is Springfield? Tell me, {agent}."]
    with pytest.raises(FileNotFoundError, match="Synthetic-Persona-Chat_test.csv.*data_dir"):
        SyntheticPersonaChat().all_contexts("test")


def test_split_turns_and_placeholders():
    assert split_turns("Hi!\n\nHello there.\n\n(They wave.)\n\nBye.") == [
        (1, "Hi!"), (2, "Hello there."), (1, "Bye.")]
    assert split_turns("Hello!\nUser 2: Hi.\n*User 1: Yo\nmore\nUser 1: again") == [
        (1, "Hello!"), (2, "Hi."), (1, "Yo more again")]
    names = {1: "Ana", 2: "Bo"}
    assert fill_placeholders("I'm [name]. Nice to meet you, [name].", 2, names) == \
        "I'm Bo. Nice to meet you, Ana."
    assert fill_placeholders("[User 1] and [user2] in [city]", 1, names) == "Ana and Bo in Portland"


def test_spc_missing_and_malformed_files(tmp_path, monkeypatch):
    missing = r"Synthetic-Persona-Chat_valid\.csv does not exist.*data_dir"
    with pytest.raises(FileNotFoundError, match=missing):
        SyntheticPersonaChat(data_dir=str(tmp_path)).all_contexts("train")
    bad = write_csv(tmp_path / "bad" / "Synthetic-Persona-Chat_valid.csv",
                    "user 1 personas,user 2 personas", ("a", "b"))
    column = r"Synthetic-Persona-Chat_valid\.csv: missing column 'Best Generated Conversation'"
    with pytest.raises(ValueError, match=column):
        read_rows(bad)
    empty = write_csv(tmp_path / "empty" / "Synthetic-Persona-Chat_valid.csv", COLUMNS)
    with pytest.raises(ValueError, match="no data rows"):
        SyntheticPersonaChat(data_dir=str(empty.parent)).all_contexts("train")
    monkeypatch.delenv("PPG_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="PPG_DATA_DIR"):
        SyntheticPersonaChat()
    with pytest.raises(ValueError, match="agent_side"):
        SyntheticPersonaChat(data_dir=str(tmp_path), agent_side="user 3")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SyntheticPersonaChat(data_dir=str(tmp_path)).all_contexts("dev")


# ---------------------------------------------------------------- persona domains


@pytest.mark.parametrize("cls", [Education, Therapy, Chatting])
def test_domain_personas(cls):
    problem = cls()
    train, test = problem.all_contexts("train"), problem.all_contexts("test")
    assert len(problem.records) >= 30
    assert len(train) + len(test) == len(problem.records) and len(test) == len(problem.records) // 5
    assert not {c.context_id for c in train} & {c.context_id for c in test}
    assert len({c.context_id for c in train + test}) == len(problem.records)
    for c in train + test:
        assert c.agent_system_prompt and c.user_system_prompt and c.opening
        assert len(c.user_lines) >= problem.n_turns - 1 and all(c.user_lines)
        assert len(c.persona) >= 3 and all(fact in c.agent_system_prompt for fact in c.persona)
        assert "1-2 sentences" in c.agent_system_prompt and c.meta["name"] in c.agent_system_prompt
    # hand-written openings, not one template
    assert len({c.opening for c in train + test}) == len(problem.records)
    assert type(problem.default_judge()).__name__ == "EmbeddingJudge"


def test_domain_bad_persona_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "x", "name": "Al", "opening": "Hi", "user_lines": ["a"], '
                    '"bio": ["b"]}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:1: missing 'partner'"):
        Chatting(personas=str(path)).all_contexts("train")
    with pytest.raises(ValueError, match="n_turns"):
        Therapy(n_turns=0)


# ---------------------------------------------------------------- synthetic problems


def conversation(problem, lines, index=0):
    """Judge requests for every turn of a conversation whose agent says ``lines``."""
    context = problem.all_contexts("train")[index]
    history, requests = [("user", context.opening)], []
    for turn, line in enumerate(lines):
        requests.append(JudgeRequest(context, list(history), line, turn))
        history += [("assistant", line), ("user", context.user_lines[turn])]
    return requests


def rewards(problem, lines, index=0):
    return torch.tensor([problem.default_judge().score(conversation(problem, lines, index))])


def preferred(subset, tell_rewards, ask_rewards):
    """Which first action the subset's turn-0 credit favors."""
    tell, ask = subset.credit(tell_rewards)[0, 0], subset.credit(ask_rewards)[0, 0]
    return "ask" if ask > tell else "tell"


ASK, TELL = "What about you?", "Sure thing."
LONG = " ".join(["word"] * 30)


def test_delayed_payoff_rewards_and_disagreement():
    problem = DelayedPayoff(n_turns=3)  # feature: the turn-0 line asks a question
    assert rewards(problem, [ASK, TELL, TELL]).tolist() == [[0.5, 0.5, 1.0]]
    assert rewards(problem, [TELL, ASK, ASK]).tolist() == [[0.75, 0.5, 0.0]]
    assert rewards(DelayedPayoff(n_turns=5), [ASK, *[TELL] * 4])[0, -1] == 1.0
    tell, ask = rewards(problem, [TELL, "ok", "ok"]), rewards(problem, [ASK, "ok", "ok"])
    assert preferred(Greedy(), tell, ask) == "tell"  # 0.75 vs 0.50
    assert preferred(KStepLookahead(2), tell, ask) == "tell"  # 1.25 vs 1.00
    assert preferred(FullPlanning(), tell, ask) == "ask"  # 1.25 vs 2.00
    assert (ask.sum() - tell.sum()).item() == pytest.approx(0.75)  # full's choice earns more
    graded = DelayedPayoff(n_turns=3, feature="long", words=25)  # 2 words: x = 0.08
    assert rewards(graded, [TELL, LONG, LONG])[0].tolist() == pytest.approx([0.73, 0.5, 0.08])


def test_noisy_independent_is_deterministic_with_zero_mean_noise():
    problem = NoisyIndependent(n_turns=6, noise=0.5, words=10)
    lines = [f"reply number {i} here" for i in range(6)]
    first = rewards(problem, lines)
    assert torch.equal(first, rewards(NoisyIndependent(n_turns=6, noise=0.5, words=10), lines))
    assert not torch.equal(first, rewards(NoisyIndependent(seed=1), lines))
    judge, context = problem.default_judge(), problem.all_contexts("train")[0]
    requests = [JudgeRequest(context, [("user", "hi")], f"short line {i}", 0) for i in range(4000)]
    noise = [(r - 0.5 * 1.0) / 0.5 - 0.5 for r in judge.score(requests)]  # feature is 1 here
    assert abs(statistics.mean(noise)) < 0.02
    assert statistics.pvariance(noise) == pytest.approx(1 / 12, rel=0.1)
    # a turn's reward depends only on its own line
    changed = rewards(problem, ["something else entirely", *lines[1:]])
    assert torch.equal(changed[0, 1:], first[0, 1:]) and changed[0, 0] != first[0, 0]


def test_noisy_independent_full_credit_is_noisier():
    problem = NoisyIndependent(n_turns=6, noise=0.5)
    batch = torch.cat([rewards(problem, [f"line {b} {t}" for t in range(6)]) for b in range(600)])
    greedy, full = Greedy().credit(batch)[:, 0], FullPlanning().credit(batch)[:, 0]
    assert full.var() / greedy.var() == pytest.approx(6, rel=0.25)
    assert batch.min() >= 0 and batch.max() <= 1


def test_block_structured_rewards():
    problem = BlockStructured(n_turns=6, block_length=3, noise=0.0)
    base = [ASK, TELL, TELL, TELL, ASK, ASK]
    clean = rewards(problem, base)
    assert clean.tolist() == [[0.5, 1, 1, 0.75, 0, 0]]
    noisy = BlockStructured(n_turns=6, block_length=3, noise=0.3)
    reference = rewards(noisy, base)
    assert reference.min() >= 0 and reference.max() <= 1
    assert (reference - 0.7 * clean).sub(0.15).abs().max() <= 0.15  # noise * (u - 0.5)
    other_block = rewards(noisy, [TELL, "changed", "lines?", *base[3:]])
    assert torch.equal(reference[0, 3:], other_block[0, 3:])
    later_block = rewards(noisy, [*base[:3], ASK, "x", "y"])
    assert torch.equal(reference[0, :3], later_block[0, :3])
    tell = rewards(problem, [TELL, "ok", "ok", "ok", "ok", "ok"])
    ask = rewards(problem, [ASK, "ok", "ok", "ok", "ok", "ok"])
    assert preferred(Greedy(), tell, ask) == "tell"
    assert preferred(Segment(length=problem.block_length), tell, ask) == "ask"
    assert preferred(FullPlanning(), tell, ask) == "ask"
    # later blocks are identical here, so full's gain equals Segment's: -0.25 + 2 * 1
    gain = Segment(length=3).credit(ask - tell)[0, 0].item()
    assert gain == pytest.approx(1.75)
    assert FullPlanning().credit(ask - tell)[0, 0].item() == pytest.approx(gain)


def test_lagged_payoff_rewards():
    problem = LaggedPayoff(n_turns=6, noise=0.0)  # cost 0.25 now, 0.75 one turn later
    lines = [ASK, TELL, ASK, ASK, TELL, TELL]
    assert rewards(problem, lines).tolist() == [[0.0, 1.0, 0.0, 0.75, 1.0, 0.25]]
    assert rewards(LaggedPayoff(n_turns=6, delay=2, noise=0.0), lines).tolist() == [
        [0.0, 0.25, 0.75, 0.0, 1.0, 1.0]]
    noisy = rewards(LaggedPayoff(n_turns=6), lines)  # noise 0.5: 0.5 * clean + 0.5 * u
    assert torch.equal(noisy, rewards(LaggedPayoff(n_turns=6), lines))
    offset = noisy - 0.5 * torch.tensor([[0.0, 1.0, 0.0, 0.75, 1.0, 0.25]])
    assert offset.min() >= 0 and offset.max() < 0.5 and len(set(offset[0].tolist())) == 6
    # A turn's line moves its own reward and the one `delay` turns later, nothing else.
    changed = rewards(LaggedPayoff(n_turns=6), [TELL, *lines[1:]])
    assert torch.equal(changed[0, 2:], noisy[0, 2:]) and (changed[0, :2] != noisy[0, :2]).all()


def test_lagged_payoff_k_step_sees_the_payoff_with_fewer_rewards():
    problem = LaggedPayoff(n_turns=6, noise=0.0)
    tell = rewards(problem, [TELL] * 6)
    ask = rewards(problem, [ASK, *[TELL] * 5])
    assert preferred(Greedy(), tell, ask) == "tell"  # -0.25
    assert preferred(KStepLookahead(2), tell, ask) == "ask"  # -0.25 + 0.75
    assert preferred(FullPlanning(), tell, ask) == "ask"
    gain = (ask - tell)[0]
    assert KStepLookahead(2).credit(ask - tell)[0, 0].item() == pytest.approx(0.5)
    assert FullPlanning().credit(ask - tell)[0, 0].item() == pytest.approx(gain.sum().item())
    late = LaggedPayoff(n_turns=6, delay=2, noise=0.0)  # K must reach t + 2
    tell, ask = rewards(late, [TELL] * 6), rewards(late, [ASK, *[TELL] * 5])
    assert preferred(KStepLookahead(2), tell, ask) == "tell"
    assert preferred(KStepLookahead(3), tell, ask) == "ask"
    # Credit noise: with lines that never ask, every reward is 0.25 * 0.5 + 0.5 * u, so the
    # turn-0 credit sums 1 noise term (greedy), 2 (k2) or 6 (full).
    noisy = LaggedPayoff(n_turns=6)
    batch = torch.cat([rewards(noisy, [f"line {b} {t}" for t in range(6)]) for b in range(600)])
    assert batch.min() >= 0.125 and batch.max() < 0.625
    var = {s.name: s.credit(batch)[:, 0].var().item()
           for s in (Greedy(), KStepLookahead(2), FullPlanning())}
    assert var["greedy"] == pytest.approx(0.25 / 12, rel=0.15)
    assert var["k2"] / var["greedy"] == pytest.approx(2, rel=0.25)
    assert var["full"] / var["greedy"] == pytest.approx(6, rel=0.25)


def test_synthetic_contexts():
    for problem in (DelayedPayoff(), NoisyIndependent(n_turns=8), BlockStructured(block_length=2),
                    LaggedPayoff()):
        train, test = problem.all_contexts("train"), problem.all_contexts("test")
        assert (len(train), len(test)) == (16, 4)
        assert not {c.opening for c in train} & {c.opening for c in test}
        assert all(len(c.user_lines) == problem.n_turns for c in train + test)
    block = BlockStructured(n_turns=6, block_length=3).all_contexts("train")[0].user_lines
    assert block[2].startswith("New question:") and block[5].startswith("New question:")
    held_out = {TOPICS[i] for i in range(4, len(TOPICS), 5)}
    for c in BlockStructured(block_length=2).all_contexts("train"):
        assert not any(line.removeprefix("New question: ") in held_out for line in c.user_lines)


@pytest.mark.parametrize("build,argument", [
    (lambda: DelayedPayoff(n_turns=1), "n_turns"),
    (lambda: DelayedPayoff(cost=0), "cost"),
    (lambda: DelayedPayoff(cost=0.8), "cost"),
    (lambda: NoisyIndependent(noise=1.5), "noise"),
    (lambda: NoisyIndependent(feature="loud"), "feature"),
    (lambda: NoisyIndependent(words=0), "words"),
    (lambda: BlockStructured(n_turns=6, block_length=7), "block_length"),
    (lambda: BlockStructured(block_length=1), "block_length"),
    (lambda: LaggedPayoff(n_turns=6, delay=6), "delay"),
    (lambda: LaggedPayoff(delay=0), "delay"),
    (lambda: LaggedPayoff(cost=0), "cost"),
    (lambda: LaggedPayoff(cost=0.5, payoff=0.6), "payoff"),
    (lambda: LaggedPayoff(noise=-0.1), "noise"),
])
def test_synthetic_validation(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_judge_rejects_incomplete_history():
    problem = DelayedPayoff()
    context = problem.all_contexts("train")[0]
    with pytest.raises(ValueError, match="history incomplete"):
        problem.default_judge().score([JudgeRequest(context, [("user", "hi")], "x", 2)])


def test_registry():
    assert set(PROBLEMS) >= {"education", "delayed_payoff", "block_structured", "lagged_payoff"}
    assert problem_from_name("lagged_payoff", n_turns=8, delay=2).delay == 2
    assert problem_from_name("block_structured", block_length=2).block_length == 2
    with pytest.raises(ValueError, match="unknown problem 'nope'"):
        problem_from_name("nope")
