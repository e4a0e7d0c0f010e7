"""`ppg evaluate --eval_judges`: held-out conversations graded again by evaluation judges behind a
local server whose verdicts the test controls; per-turn means and intervals checked exactly."""

import csv
import json
import math
from pathlib import Path

from chat_server import ChatServer

from ppg.cli import main
from ppg.commands.compare.stats import mean_ci

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG = [str(CONFIGS / "experiment" / "smoke.yaml"), str(CONFIGS / "model" / "tiny-random.yaml")]
FAST = ["--data.init_args.rollouts_per_epoch=2", "--data.init_args.group_size=2",
        "--data.init_args.batch_size=2", "--data.init_args.val_contexts=1",
        "--data.init_args.sampling.max_new_tokens=4", "--data.init_args.progress=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.max_epochs=1"]


def verdict(line: str) -> str:
    """The server's rule: a line of odd length contradicts."""
    return "Yes" if len(line) % 2 else "No"


def respond(n, body):
    text = body["messages"][-1]["content"]
    for marker in ("The speaker replied: \"", "The speaker's newest line: \""):
        if marker in text:
            return verdict(text.split(marker, 1)[1].rsplit('"', 1)[0])
    return "?"


def test_consistency_evaluate_reports_eval_judges(tmp_path, capsys):
    main(["fit", "--config", CONFIG[0], "--config", CONFIG[1], *FAST,
          f"--trainer.logger.init_args.save_dir={tmp_path}"])
    with ChatServer(respond) as server:
        files = []
        for name in ("PromptToLineJudge", "LineToLineJudge"):
            path = tmp_path / f"{name}.yaml"
            backend = {"class_path": "ppg.judges.OpenAIBackend",
                       "init_args": {"base_url": server.url, "model": "m", "max_retries": 0}}
            path.write_text(json.dumps({"data": {"init_args": {"judge": {
                "class_path": f"ppg.judges.{name}", "init_args": {"backend": backend}}}}}))
            files.append(str(path))
        out = tmp_path / "eval"
        main(["evaluate", "--config", CONFIG[0], "--config", CONFIG[1], "--ckpt", str(tmp_path / "smoke"),
              "--out", str(out), "--contexts", "3", "--eval_judges", json.dumps(files),
              "--overrides", "--data.init_args.sampling.max_new_tokens=4",
              "--overrides=--data.init_args.progress=false", "--overrides", "--trainer.enable_progress_bar=false"])
    with (out / "evaluation_metrics.csv").open() as handle:
        rows = {(r["model"], r["metric"], r["turn"]): r for r in csv.DictReader(handle)}
    expected = {}
    for label in ("trained", "base"):
        records = [json.loads(line) for line in (out / f"transcripts_{label}.jsonl").read_text().splitlines()]
        assert len(records) == 3
        for record in records:
            lines = [text for role, text in record["messages"] if role == "assistant"]
            p2l = [0.0 if verdict(line) == "Yes" else 1.0 for line in lines]
            assert record["eval_rewards"]["prompt_to_line"][:len(lines)] == p2l
            assert record["eval_rewards"]["line_to_line"][:len(lines)] == [1.0] + p2l[1:]
        expected[label] = [r["eval_rewards"]["prompt_to_line"] for r in records]
        for turn in range(3):
            mean, half = mean_ci([values[turn] for values in expected[label]])
            row = rows[(label, "prompt_to_line", str(turn))]
            assert float(row["mean"]) == mean and int(row["n"]) == 3
            assert (row["ci95"] == "" and math.isnan(half)) or float(row["ci95"]) == half
        assert rows[(label, "line_to_line", "0")]["mean"] == "1.0"
        assert rows[(label, "prompt_to_line", "all")]["unscored"] == "0"
    differences = [a[0] - b[0] for a, b in zip(expected["trained"], expected["base"])]
    assert float(rows[("trained - base", "prompt_to_line", "0")]["mean"]) == mean_ci(differences)[0]
    printed = capsys.readouterr().out
    assert "prompt_to_line" in printed and "line_to_line" in printed and " ± " in printed
