"""Judges: rule, embedding (MiniLM), local LM yes/no extraction, combined, and judge_eval metrics."""

import json
import os

import pytest
import torch

from ppg.judges import CombinedJudge, EmbeddingJudge, JudgeRequest, LMJudge, RuleJudge
from ppg.problems.base import Context

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PERSONA = ["I have two dogs.", "I work as a nurse at the city hospital.", "I love baking bread."]

RULES_MODULE = '''
from ppg.judges import Judge
from ppg.judges.rule import RuleJudge

def half(request):
    return 0.5

def too_big(request):
    return 2.0

def keyword_judge():
    return RuleJudge(keywords=["dog", "cat"])


class HistoryJudge(Judge):
    """0 when the line says "never" after an earlier agent line, NaN (no verdict) for "only"."""

    stats = {"parse_failures": 3}

    def score(self, requests):
        return [float("nan") if "only" in r.line else float(not ("never" in r.line and r.turn > 0))
                for r in requests]


def history_judge():
    return HistoryJudge()
'''


def request(line, persona=PERSONA, history=(), turn=0):
    context = Context(context_id="c0", agent_system_prompt="You are a person.", user_system_prompt="",
                      opening="Hi!", persona=list(persona))
    return JudgeRequest(context=context, history=list(history), line=line, turn=turn)


@pytest.fixture()
def rules_module(tmp_path, monkeypatch):
    (tmp_path / "ppg_test_rules.py").write_text(RULES_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ppg_test_rules"


# --- RuleJudge ---------------------------------------------------------------------------------

def test_rule_keywords_fraction_and_regex():
    judge = RuleJudge(keywords=["Dog", "bread", "piano"])
    assert judge.score([request("My dog ate the BREAD."), request("Nothing here.")]) == [2 / 3, 0.0]
    regex = RuleJudge(regex=r"\bnurse\b")
    assert regex.score([request("I am a nurse."), request("I am a nursery teacher.")]) == [1.0, 0.0]
    both = RuleJudge(keywords=["dog"], regex=r"\?$")
    assert both.score([request("A dog?")]) == [1.0]
    assert both.score([request("A dog.")]) == [0.5]


def test_rule_callable_by_dotted_path(rules_module):
    assert RuleJudge(function=f"{rules_module}.half").score([request("x")]) == [0.5]
    assert RuleJudge(function=lambda r: float("dog" in r.line)).score([request("dog")]) == [1.0]
    with pytest.raises(ValueError, match="outside"):
        RuleJudge(function=f"{rules_module}.too_big").score([request("x")])
    with pytest.raises(ValueError, match="cannot be imported"):
        RuleJudge(function=f"{rules_module}.missing")
    with pytest.raises(ValueError, match="at least one"):
        RuleJudge()
    with pytest.raises(ValueError, match="invalid regex"):
        RuleJudge(regex="(")


# --- EmbeddingJudge ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedding_judge():
    return EmbeddingJudge()


def test_embedding_on_persona_beats_off_topic(embedding_judge):
    lines = ["After my hospital shift I walk both of my dogs.",
             "The quarterly tax forms are due at the end of April."]
    on_topic, off_topic = embedding_judge.score([request(line) for line in lines])
    assert 0.0 <= off_topic < on_topic <= 1.0
    assert on_topic - off_topic > 0.5


def test_embedding_calibration_and_batching(embedding_judge):
    requests = [request(line) for line in ("I bake sourdough.", "Stocks fell today.", "My dogs bark.")]
    cosines = embedding_judge.similarities(requests)
    low, high = embedding_judge.low, embedding_judge.high
    expected = [min(1.0, max(0.0, (c - low) / (high - low))) for c in cosines]
    assert embedding_judge.score(requests) == pytest.approx(expected, abs=1e-9)
    small_batches = EmbeddingJudge(batch_size=1)
    assert small_batches.similarities(requests) == pytest.approx(cosines, abs=1e-5)
    # Without persona facts the agent's system prompt is the reference.
    assert 0.0 <= embedding_judge.score([request("I am a person.", persona=[])])[0] <= 1.0


def test_embedding_validation(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddingJudge(batch_size=0)
    with pytest.raises(ValueError, match="low"):
        EmbeddingJudge(low=0.5, high=0.2)
    with pytest.raises(ValueError, match="model_dir"):
        EmbeddingJudge(model_dir=str(tmp_path / "absent"))


# --- LMJudge -----------------------------------------------------------------------------------

def test_lm_judge_yes_no_extraction_is_exact(tokenizer, tiny_model):
    judge = LMJudge.from_loaded(tiny_model, tokenizer)
    yes_ids, no_ids = judge.backend.answer_ids()
    assert {tokenizer.decode([i]).strip().lower() for i in yes_ids} == {"yes"}
    assert {tokenizer.decode([i]).strip().lower() for i in no_ids} == {"no"}
    assert tokenizer.encode(" yes", add_special_tokens=False)[0] in yes_ids
    # An untied lm_head with zero weights: the logits are its bias whatever the input.
    head = torch.nn.Linear(tiny_model.config.hidden_size, len(tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    bias = torch.zeros(len(tokenizer))
    yes_logits = torch.linspace(1.0, 2.0, len(yes_ids))
    no_logits = torch.linspace(0.5, 3.0, len(no_ids))
    bias[yes_ids], bias[no_ids] = yes_logits, no_logits
    with torch.no_grad():
        head.bias.copy_(bias)
    tiny_model.lm_head = head
    p_yes, p_no = yes_logits.double().exp().sum(), no_logits.double().exp().sum()
    expected = float(p_no / (p_yes + p_no))
    scores = judge.score([request("I have two dogs."), request("I hate dogs and never bake.")])
    assert scores == pytest.approx([expected, expected], abs=1e-6)
    masses = judge.answer_probabilities([request("x")])[0]
    partition = bias.double().exp().sum()
    assert masses.tolist() == pytest.approx([float(p_yes / partition), float(p_no / partition)], abs=1e-6)


def test_lm_judge_batch_matches_single(tokenizer, tiny_model):
    judge = LMJudge.from_loaded(tiny_model, tokenizer, batch_size=3)
    requests = [request("Hi."), request("I work long night shifts at the hospital and then walk my dogs."),
                request("Bread.", history=[("user", "What do you bake?")], turn=1)]
    batched = judge.score(requests)
    single = [judge.score([r])[0] for r in requests]
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in batched)
    assert judge.score([]) == []


def test_lm_judge_validation():
    with pytest.raises(ValueError, match="question"):
        LMJudge(question="Persona: {persona}. Contradiction? yes or no.")
    with pytest.raises(ValueError, match="question"):
        LMJudge(question="{line} {unknown}")
    with pytest.raises(ValueError, match="quantization"):
        LMJudge(quantization="fp3")
    with pytest.raises(ValueError, match="batch_size"):
        LMJudge(batch_size=0)
    with pytest.raises(ValueError, match="does not exist"):
        LMJudge(model="./no/such/model")


# --- CombinedJudge -----------------------------------------------------------------------------

def test_combined_weighted_mean():
    keywords = RuleJudge(keywords=["dog", "bread"])
    regex = RuleJudge(regex="dog")
    combined = CombinedJudge([keywords, regex], weights=[3.0, 1.0])
    assert combined.score([request("my dog"), request("bread"), request("none")]) == pytest.approx(
        [(3 * 0.5 + 1) / 4, 3 * 0.5 / 4, 0.0])
    assert CombinedJudge([keywords, regex]).score([request("dog")]) == pytest.approx([0.75])
    assert CombinedJudge([keywords, regex], weights=[0, 2]).score([request("bread")]) == [0.0]


@pytest.mark.parametrize("weights, message", [([1.0], "weights has 1"), ([1.0, -1.0], "weights"),
                                              ([0.0, 0.0], "weights")])
def test_combined_weight_validation(weights, message):
    with pytest.raises(ValueError, match=message):
        CombinedJudge([RuleJudge(regex="a"), RuleJudge(regex="b")], weights=weights)


def test_combined_needs_judges():
    with pytest.raises(ValueError, match="judges"):
        CombinedJudge([])


# --- judge_eval --------------------------------------------------------------------------------

SIX_LINES = [  # keyword judge ["dog", "cat"] -> reward in the comment
    ("consistent", "My dog and my cat sleep together."),  # 1.0
    ("consistent", "I walk the dog every morning."),  # 0.5
    ("contradicting", "I only have a cat."),  # 0.5
    ("contradicting", "I have never had pets."),  # 0.0
    ("off_topic", "The weather is nice."),  # 0.0
    ("off_topic", "Raining cats and dogs, as they say."),  # 1.0
]


def mann_whitney(positives, negatives):
    """AUROC by hand: P(positive > negative) + 0.5 P(tie)."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)


def test_judge_eval_metrics_by_hand(tmp_path, rules_module, capsys):
    from ppg.commands.judge_eval import judge_eval

    data = tmp_path / "six.jsonl"
    data.write_text("\n".join(json.dumps({"persona": ["I have a dog and a cat."], "line": line, "label": label})
                              for label, line in SIX_LINES))
    out = tmp_path / "eval" / "result.json"
    report = judge_eval(judges=[f"{rules_module}.keyword_judge"], data=str(data), out=str(out))
    metrics = report["judges"][f"{rules_module}.keyword_judge"]
    assert metrics["scores"] == [1.0, 0.5, 0.5, 0.0, 0.0, 1.0]
    assert metrics["vs_contradicting"] == {"accuracy": 0.75, "auroc": pytest.approx(0.875), "n": 4}
    assert metrics["vs_off_topic"] == {"accuracy": 0.75, "auroc": pytest.approx(0.625), "n": 4}
    assert metrics["overall"]["accuracy"] == pytest.approx(4 / 6)
    assert metrics["overall"]["auroc"] == pytest.approx(mann_whitney([1.0, 0.5], [0.5, 0.0, 0.0, 1.0]))
    assert metrics["overall"]["auroc"] == pytest.approx(0.75)
    assert metrics["mean"] == pytest.approx({"consistent": 0.75, "contradicting": 0.25, "off_topic": 0.5})
    assert json.loads(out.read_text())["counts"] == {"consistent": 2, "contradicting": 2, "off_topic": 2}
    assert "acc/ctr" in capsys.readouterr().out


def test_auroc_matches_mann_whitney_with_ties():
    from ppg.commands.judge_eval import evaluate_scores

    generator = torch.Generator().manual_seed(0)
    scores = (torch.randint(0, 5, (30,), generator=generator) / 4).tolist()
    labels = [("consistent", "contradicting", "off_topic")[i % 3] for i in range(30)]
    metrics = evaluate_scores(scores, labels)
    positives = [s for s, label in zip(scores, labels) if label == "consistent"]
    negatives = [s for s, label in zip(scores, labels) if label == "contradicting"]
    assert metrics["vs_contradicting"]["auroc"] == pytest.approx(mann_whitney(positives, negatives))


def test_packaged_labelled_set_is_balanced():
    from ppg.commands.judge_eval import LABELS, load_labelled

    rows = load_labelled()
    assert len(rows) >= 60
    counts = {label: sum(row["label"] == label for row in rows) for label in LABELS}
    assert len(set(counts.values())) == 1
    assert all(row["persona"] and row["line"] for row in rows)


def test_packaged_line_to_line_set_is_balanced_pairs():
    from ppg.commands.judge_eval import LABELLED_SETS, load_labelled

    rows = load_labelled(LABELLED_SETS["line_to_line"])
    assert len(rows) >= 30 and sum(row["label"] == "consistent" for row in rows) == len(rows) // 2
    for good, bad in zip(rows[::2], rows[1::2]):  # each history once with each label
        assert (good["label"], bad["label"]) == ("consistent", "contradicting")
        assert good["history"] == bad["history"] and good["persona"] == bad["persona"]
        assert sum(role == "assistant" for role, _ in good["history"]) >= 2
        assert [role for role, _ in good["history"]][:2] == ["user", "assistant"]


def test_judge_eval_line_to_line_leaves_out_unscored(rules_module, capsys):
    import ppg.commands.judge_eval as judge_eval_module
    from ppg.commands.judge_eval import LABELLED_SETS, load_labelled

    report = judge_eval_module.judge_eval(judges=[f"{rules_module}.history_judge"], labelled="line_to_line")
    metrics = report["judges"][f"{rules_module}.history_judge"]
    rows = load_labelled(LABELLED_SETS["line_to_line"])
    unscored = sum("only" in row["line"] for row in rows)
    assert unscored > 0 and metrics["unscored"] == unscored
    assert metrics["overall"]["n"] == len(rows) - unscored
    assert metrics["mean"]["off_topic"] is None and metrics["stats"] == {"parse_failures": 3}
    assert f"{unscored} line(s) without a readable verdict were left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="labelled must be one of persona_lines, line_to_line"):
        judge_eval_module.judge_eval(judges=["embedding"], labelled="lines")


def test_judge_eval_validation(tmp_path):
    from ppg.commands.judge_eval import judge_eval, load_labelled

    with pytest.raises(ValueError, match="unknown judge"):
        judge_eval(judges=["oracle"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"persona": ["x"], "line": "y", "label": "maybe"}))
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_labelled(bad)
