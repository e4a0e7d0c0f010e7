"""`ppg compare` and `ppg evaluate` end to end on the tiny random Llama."""

import csv
import json
import math
import struct
from pathlib import Path

import pytest

import ppg.commands.compare.run as compare_module
from ppg.cli import main
from ppg.commands.compare.policies import parse_policies, subset_args
from ppg.commands.compare.run import compare
from ppg.commands.compare.stats import format_paired, mean_ci, paired_differences, write_csv

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG = [str(CONFIGS / "experiment" / "smoke.yaml"), str(CONFIGS / "model" / "tiny-random.yaml")]
FAST = [
    "--data.init_args.rollouts_per_epoch=2", "--data.init_args.group_size=2",
    "--data.init_args.batch_size=2", "--data.init_args.val_contexts=1",
    "--data.init_args.sampling.max_new_tokens=3", "--data.init_args.progress=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
]


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One comparison (2 classes x 2 seeds, 1 epoch), shared by the tests below."""
    out = tmp_path_factory.mktemp("compare") / "out"
    calls = []
    original = compare_module.train_run

    def counting(*args, **kwargs):
        calls.append(args[1:4])
        return original(*args, **kwargs)

    compare_module.train_run = counting
    try:
        # Through the command line: stacked --config, repeated --overrides.
        main(["compare", "--config", CONFIG[0], "--config", CONFIG[1], "--policies", "greedy,full",
              "--seeds", "2", "--out", str(out), *[arg for o in FAST for arg in ("--overrides", o)]])
    finally:
        compare_module.train_run = original
    return out, calls


def test_compare_writes_csv_with_intervals_and_a_png(compared):
    out, calls = compared
    assert [(label, seed) for label, _, seed in calls] == [("greedy", 0), ("greedy", 1), ("full", 0), ("full", 1)]
    table = _rows(out / "comparison.csv")
    assert [row["policy"] for row in table] == ["greedy", "full"]
    for row in table:
        assert row["seeds"] == "2"
        for key in ("final_reward", "final_reward_turn0", "final_reward_turn2", "reward_auc",
                    "grad_snr", "generated_tokens", "wall_s"):
            for column in (key, f"{key}_ci95"):
                assert math.isfinite(float(row[column])), (row["policy"], column, row[column])
        assert 0.0 <= float(row["final_reward"]) <= 1.0
        assert float(row["generated_tokens"]) > 0 and float(row["wall_s"]) > 0
    assert len(_rows(out / "comparison_runs.csv")) == 4
    # The paired table is computed from the per-run finals: greedy - full on the same seed.
    runs = {(row["policy"], int(row["seed"])): float(row["final_reward"])
            for row in _rows(out / "comparison_runs.csv")}
    paired = {row["policy"]: row for row in _rows(out / "comparison_paired.csv")}
    assert list(paired) == ["greedy", "full"]
    diffs = [runs["greedy", s] - runs["full", s] for s in (0, 1)]
    mean, half = mean_ci(diffs)
    assert paired["greedy"]["best_other"] == "full" and paired["greedy"]["paired_seeds"] == "2"
    assert float(paired["greedy"]["diff_vs_best_other"]) == pytest.approx(mean, abs=1e-12)
    assert float(paired["greedy"]["minus_full"]) == pytest.approx(mean, abs=1e-12)
    assert float(paired["full"]["minus_greedy"]) == pytest.approx(-mean, abs=1e-12)
    if half > 0:
        assert float(paired["greedy"]["diff_vs_best_other_ci95"]) == pytest.approx(half, abs=1e-12)
    assert paired["greedy"]["winner"] == str(mean - half > 0)
    width, height = _png_size(out / "comparison.png")
    assert width >= 600 and height >= 300 and (out / "comparison.png").stat().st_size > 10_000
    # Each run trained its own class, with its seed, into its own folder.
    config = (out / "runs" / "full_seed1" / "version_0" / "config.yaml").read_text()
    assert "ppg.subsets.FullPlanning" in config and "seed_everything: 1" in config


def test_rerun_skips_finished_runs_and_trains_only_missing(compared, monkeypatch, capsys):
    out, _ = compared
    markers = sorted((out / "runs").glob("*/summary.json"))
    assert len(markers) == 4
    stamps = {m: m.stat().st_mtime_ns for m in markers}
    trained = []

    def fake_train(config, label, subset, seed, save_dir, overrides=None):
        trained.append((label, seed))
        done = compare_module.json.loads((out / "runs" / f"full_seed{seed}" / "summary.json").read_text())
        return {**done, "policy": label, "subset": subset.name}

    monkeypatch.setattr(compare_module, "train_run", fake_train)
    # greedy and full are done: nothing is trained; k3 is new: only its two seeds are.
    compare(CONFIG, policies="greedy,full,k3", seeds=2, out=str(out), overrides=FAST)
    assert trained == [("k3", 0), ("k3", 1)]
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps
    assert "already done" in capsys.readouterr().out
    assert [row["policy"] for row in _rows(out / "comparison.csv")] == ["greedy", "full", "k3"]

    # Other overrides than the finished runs were trained with: refuse rather than mix them.
    with pytest.raises(ValueError, match="other configs or overrides"):
        compare(CONFIG, policies="greedy", seeds=1, out=str(out), overrides=[*FAST, "--model.lr=0.1"])


def test_unknown_policy_is_a_one_line_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "train_run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as info:
        main(["compare", "--config", CONFIG[0], "--policies", "greedy,k2,bogus",
              "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ppg: error: unknown policy 'bogus'; valid forms:") and "\n" not in err
    assert "k<K>" in err and "segment<L>" in err
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


@pytest.mark.parametrize(("override", "message"), [
    ("--trainer.check_val_every_n_epoch=2",
     "trainer.check_val_every_n_epoch=2 does not divide trainer.max_epochs=3"),
    ("--data.init_args.val_contexts=0", "data.init_args.val_contexts must be > 0"),
])
def test_held_out_schedule_is_checked_before_training(tmp_path, monkeypatch, capsys, override, message):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the schedule check")

    monkeypatch.setattr(compare_module, "train_run", no_training)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", CONFIG[0], "--config", CONFIG[1], "--policies", "greedy",
              "--out", str(tmp_path), "--overrides", "--trainer.max_epochs=3", "--overrides", override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_held_out_reward_only_after_the_last_epoch(tmp_path):
    """Validating once, after the last of 2 epochs: the final reward is that epoch's, the
    held-out curve has one point at epoch 2, and the figure is written."""
    overrides = [o for o in FAST if "max_epochs" not in o and "check_val" not in o]
    compare(CONFIG, policies="greedy", seeds=1, out=str(tmp_path / "out"),
            overrides=[*overrides, "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=2"])
    summary = json.loads((tmp_path / "out" / "runs" / "greedy_seed0" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["val_epochs"] == [2]
    assert len(summary["val_curve"]) == 1 and len(summary["train_curve"]) == 2
    assert summary["final_reward"] == summary["val_curve"][0]
    assert _png_size(tmp_path / "out" / "comparison.png")[0] > 500


def test_policy_names_map_to_class_paths():
    parsed = dict(parse_policies("Greedy, k3 ,segment2,full,discounted0.9"))
    assert subset_args(parsed["greedy"]) == ["--model.subset=ppg.subsets.Greedy"]
    assert subset_args(parsed["k3"]) == ["--model.subset=ppg.subsets.KStepLookahead",
                                          "--model.subset.init_args.k=3"]
    assert subset_args(parsed["segment2"]) == ["--model.subset=ppg.subsets.Segment",
                                                "--model.subset.init_args.length=2"]
    # A bare `segment` takes the configured problem's block length.
    block = [str(CONFIGS / "base.yaml"), str(CONFIGS / "problem" / "block_structured.yaml")]
    assert [label for label, _ in parse_policies("segment", block)] == ["segment3"]
    with pytest.raises(ValueError, match="segment<L>"):
        parse_policies("segment", [str(CONFIGS / "base.yaml")])
    with pytest.raises(ValueError, match="twice"):
        parse_policies("k2,k2")


def test_mean_ci_is_a_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(mean_ci([0.5])[1])


def test_evaluate_trained_vs_base(compared, tmp_path, capsys):
    out, _ = compared
    run = out / "runs" / "full_seed0"
    main(["evaluate", "--config", CONFIG[0], "--config", CONFIG[1], "--ckpt", str(run),
          "--out", str(tmp_path / "eval"), "--contexts", "2",
          "--overrides", "--data.init_args.sampling.max_new_tokens=3",
          "--overrides=--data.init_args.progress=false", "--overrides", "--trainer.enable_progress_bar=false"])
    table = {row["model"]: row for row in _rows(tmp_path / "eval" / "evaluation.csv")}
    assert set(table) == {"trained", "base", "trained - base"}
    assert all(math.isfinite(float(table["base"][f"reward_turn{t}"])) for t in range(3))
    assert "**agent** (turn 2" in (tmp_path / "eval" / "transcripts_trained.md").read_text()
    assert len((tmp_path / "eval" / "transcripts_base.jsonl").read_text().splitlines()) == 2
    assert "trained - base" in capsys.readouterr().out


T2 = 4.302652729911275  # t(0.975, 2): the 95% interval of 3 paired seeds


def _summaries(finals: dict[str, list[float]]) -> list[dict]:
    return [{"policy": label, "seed": seed, "final_reward": value}
            for label, values in finals.items() for seed, value in enumerate(values)]


def test_paired_differences_exact_numbers_and_winner_rule(tmp_path):
    # k2 has the highest mean, but its paired difference to the best other (full) swings
    # across seeds: +0.10, +0.13, -0.02. The interval holds 0, so no winner.
    rows = paired_differences(_summaries({"greedy": [0.40, 0.42, 0.41], "k2": [0.60, 0.65, 0.55],
                                          "full": [0.50, 0.52, 0.57]}), ["greedy", "k2", "full"])
    k2 = rows[1]
    assert k2["policy"] == "k2" and k2["best_other"] == "full" and k2["paired_seeds"] == 3
    assert k2["diff_vs_best_other"] == pytest.approx(0.07)
    sd = math.sqrt((0.03**2 + 0.06**2 + 0.09**2) / 2)
    assert k2["diff_vs_best_other_ci95"] == pytest.approx(T2 * sd / math.sqrt(3), rel=1e-9)
    # k2 - greedy: 0.20, 0.23, 0.14
    assert k2["minus_greedy"] == pytest.approx(0.19)
    assert k2["minus_greedy_ci95"] == pytest.approx(
        T2 * math.sqrt((0.01**2 + 0.04**2 + 0.05**2) / 2) / math.sqrt(3), rel=1e-9)
    assert [r["winner"] for r in rows] == [False, False, False]
    # greedy and full are compared with the best other by mean: k2.
    assert rows[0]["best_other"] == "k2" and rows[0]["diff_vs_best_other"] == pytest.approx(-0.19)
    assert rows[2]["best_other"] == "k2" and rows[2]["diff_vs_best_other"] == pytest.approx(-0.07)

    # Steadier pairs: +0.10, +0.10, +0.05; mean 0.0833, half-width 0.0717: the interval
    # [0.012, 0.155] excludes 0, so k2 is the winner, and only k2.
    rows = paired_differences(_summaries({"greedy": [0.40, 0.42, 0.41], "k2": [0.60, 0.65, 0.55],
                                          "full": [0.50, 0.55, 0.50]}), ["greedy", "k2", "full"])
    k2 = rows[1]
    half = T2 * math.sqrt((2 * (0.05 / 3) ** 2 + (0.1 / 3) ** 2) / 2) / math.sqrt(3)
    assert k2["diff_vs_best_other"] == pytest.approx(0.25 / 3)
    assert k2["diff_vs_best_other_ci95"] == pytest.approx(half, rel=1e-9)
    assert half == pytest.approx(0.07172, abs=1e-5)
    assert [r["winner"] for r in rows] == [False, True, False]
    assert "k2 - full: 0.083 ± 0.072 (3 paired seeds)  <- winner (interval excludes 0)" in \
        format_paired(rows).splitlines()
    assert "winner" not in format_paired(rows).splitlines()[2]

    # The CSV: one row per class, every pairwise difference as minus_<other> with its _ci95.
    write_csv(rows, tmp_path / "comparison_paired.csv")
    header = (tmp_path / "comparison_paired.csv").read_text().splitlines()[0]
    assert header == ("policy,best_other,paired_seeds,diff_vs_best_other,diff_vs_best_other_ci95,"
                      "winner,minus_k2,minus_k2_ci95,minus_full,minus_full_ci95,minus_greedy,"
                      "minus_greedy_ci95")
    table = _rows(tmp_path / "comparison_paired.csv")
    assert [row["winner"] for row in table] == ["False", "True", "False"]
    assert table[0]["minus_greedy"] == "" and float(table[2]["minus_greedy"]) == pytest.approx(0.32 / 3)


def test_paired_differences_pair_only_shared_seeds_and_need_two():
    # full lacks seed 2: the pairs are seeds 0 and 1 only (diffs 0.1 and 0.2).
    summaries = _summaries({"k2": [0.6, 0.7, 0.1], "full": [0.5, 0.5]})
    k2, full = paired_differences(summaries, ["k2", "full"])
    assert k2["paired_seeds"] == 2 and k2["diff_vs_best_other"] == pytest.approx(0.15)
    assert k2["diff_vs_best_other_ci95"] == pytest.approx(12.706204736 * 0.0707107 / math.sqrt(2),
                                                          rel=1e-6)
    assert full["diff_vs_best_other"] == pytest.approx(-0.15)
    # One seed: no interval, so never a winner however large the difference.
    one = paired_differences(_summaries({"k2": [0.9], "full": [0.1]}), ["k2", "full"])
    assert one[0]["diff_vs_best_other"] == pytest.approx(0.8)
    assert math.isnan(one[0]["diff_vs_best_other_ci95"]) and one[0]["winner"] is False
    # Identical per-seed differences: zero width, still a winner when above 0.
    same = paired_differences(_summaries({"k2": [0.6, 0.7], "full": [0.5, 0.6]}), ["k2", "full"])
    assert same[0]["diff_vs_best_other_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert same[0]["winner"] is True and same[1]["winner"] is False
    # A single class has nothing to be paired with.
    assert paired_differences(_summaries({"k2": [0.6, 0.7]}), ["k2"]) == [{"policy": "k2"}]


def _tool(name: str):
    import importlib.util
    import sys

    module = f"ppg_tool_{name}"
    if module not in sys.modules:  # dataclasses look their module up there
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module, path)
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    return sys.modules[module]


def _study_tool():
    return _tool("study")


def test_results_tables_from_the_comparison_files(tmp_path, capsys):
    from ppg.commands.compare.stats import aggregate

    finals, aucs = {"k2": [0.6, 0.7], "full": [0.5, 0.6]}, {"k2": [0.4, 0.5], "full": [0.3, 0.45]}
    summaries = [{"policy": label, "seed": seed, "final_reward": finals[label][seed],
                  "final_reward_turns": [finals[label][seed]], "reward_auc": aucs[label][seed],
                  "grad_snr": 1.5, "generated_tokens": 100, "wall_s": 10.0}
                 for label in finals for seed in (0, 1)]
    write_csv(aggregate(summaries, ["k2", "full"]), tmp_path / "comparison.csv")
    write_csv([{**s, "snr_full": 1.1, "snr_k2": 1.2 + s["seed"]} for s in summaries],
              tmp_path / "comparison_runs.csv")
    write_csv(paired_differences(summaries, ["k2", "full"]), tmp_path / "comparison_paired.csv")
    _tool("results_tables").main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| k2 | 2 | 0.650 ± 0.635 | 0.650 ± 0.635 | 0.450 ± 0.635 | 1.50 ± 0.00 | 10 ± 0 |" in out
    # Final reward: differences 0.1 and 0.1 (zero width, a winner); AUC: 0.1 and 0.05.
    assert "| k2 − full (best other) | 2 | 0.100 ± 0.000 | **yes** | 0.075 ± 0.318 |" in out
    assert "| full − k2 (best other) | 2 | -0.100 ± 0.000 | no | -0.075 ± 0.318 |" in out
    assert "| 1 | 0.700 | 0.600 | 1.10 | 2.20 |" in out  # seed, finals, SNR full, SNR k2
    with pytest.raises(SystemExit):
        _tool("results_tables").main([str(tmp_path / "missing")])


def test_results_tables_take_seed_snr_from_the_run_that_measured_every_class(tmp_path, capsys):
    # greedy's run did not measure segment (its callback list was greedy, full); segment's did
    runs = [{"policy": "greedy", "seed": 0, "final_reward": 0.4, "snr_greedy": 1.3, "snr_full": 1.0,
             "snr_segment": ""},
            {"policy": "segment", "seed": 0, "final_reward": 0.6, "snr_greedy": 1.1, "snr_full": 1.2,
             "snr_segment": 1.35}]
    out = _tool("results_tables").seed_table(runs)
    assert "| 0 | 0.400 | 0.600 | 1.20 | 1.10 | 1.35 |" in out  # seed, finals, SNR full/greedy/segment


def test_study_tool_dry_run_prints_seed_rounds(capsys):
    study = _study_tool()
    study.main(["--problems", "lagged_payoff,block_structured", "--seeds", "2", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    demo, block = "configs/experiment/demo.yaml", "configs/experiment/study/block_structured.yaml"
    copy = "copy comparison.csv, comparison_runs.csv, comparison_paired.csv, comparison.png ->"
    assert lines == [
        (f"[round 1/2] ppg compare --config {demo} --config "
         "configs/experiment/study/lagged_payoff.yaml --policies greedy,k2,full --seeds 1 "
         "--out runs/study/lagged_payoff"),
        f"[round 1/2] {copy} docs/results/lagged_payoff/",
        (f"[round 1/2] ppg compare --config {demo} --config {block} --policies "
         "greedy,segment,full --seeds 1 --out runs/study/block_structured"),
        f"[round 1/2] {copy} docs/results/block_structured/",
        *[line.replace("round 1/2", "round 2/2").replace("--seeds 1", "--seeds 2")
          for line in lines[:4]],
    ]
    # Every study's configs exist, and the default plan is 5 rounds over all of them.
    root = Path(__file__).resolve().parents[1]
    assert all((root / c).is_file() for s in study.STUDIES.values() for c in s.configs)
    default = study.plan(list(study.STUDIES), study.parse_args([]).seeds, "runs/study")
    assert len(default) == 5 * len(study.STUDIES) and default[-1][2][-3:] == [
        "5", "--out", f"runs/study/{list(study.STUDIES)[-1]}"]


@pytest.mark.parametrize("argv,message", [
    (["--problems", "lagged_payoff,nope"], "--problems: unknown nope"),
    (["--problems", "lagged_payoff,lagged_payoff"], "named twice"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
])
def test_study_tool_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _study_tool().main([*argv, "--dry-run"])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_study_tool_copies_the_contract_files(tmp_path):
    study = _study_tool()
    source = tmp_path / "runs" / "lagged_payoff"
    source.mkdir(parents=True)
    for name in study.FILES[:3]:
        (source / name).write_text(f"{name}\n")
    with pytest.raises(FileNotFoundError, match="lacks comparison.png"):
        study.copy_results(source, tmp_path / "results" / "lagged_payoff")
    (source / "comparison.png").write_bytes(b"\x89PNG")
    copied = study.copy_results(source, tmp_path / "results" / "lagged_payoff")
    assert [p.name for p in copied] == list(study.FILES)
    assert (tmp_path / "results" / "lagged_payoff" / "comparison_paired.csv").read_text() == \
        "comparison_paired.csv\n"


def test_compare_runs_the_lagged_payoff_study_config(tmp_path):
    """The K-step study config stacks on the demo and runs end to end (tiny model, 1 epoch)."""
    config = [str(CONFIGS / "experiment" / "demo.yaml"),
              str(CONFIGS / "experiment" / "study" / "lagged_payoff.yaml"), CONFIG[1]]
    rows = compare(config, policies="k2", seeds=1, out=str(tmp_path / "out"),
                   overrides=[*FAST, "--data.init_args.val_group_size=1"])
    assert [row["policy"] for row in rows] == ["k2"]
    run = _rows(tmp_path / "out" / "comparison_runs.csv")[0]
    turns = [float(run[f"final_reward_turn{t}"]) for t in range(6)]
    assert "final_reward_turn6" not in run
    snr = {name: float(run[f"snr_{name}"]) for name in ("greedy", "k2", "full")}  # GradientNoise
    assert all(math.isfinite(v) and v > 0 for v in snr.values()) and float(run["grad_snr"]) == snr["k2"]
    # Each reward is (1 - 0.5) * clean + 0.5 * u with clean in [0, 1]; turn 0 has no payoff
    # term, so its clean part is at most the cost, 0.25.
    assert all(0.0 <= r < 1.0 for r in turns) and turns[0] < 0.5 * 0.25 + 0.5
    config_yaml = (tmp_path / "out" / "runs" / "k2_seed0" / "version_0" / "config.yaml").read_text()
    assert "ppg.problems.LaggedPayoff" in config_yaml and "max_new_tokens: 3" in config_yaml
