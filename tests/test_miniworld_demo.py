"""The miniature world's demo (``--fast``) end to end, and the CLI's handling of mistakes."""

import json

import pytest

from genhancer.config import ConfigError


@pytest.mark.slow
def test_fast_demo_runs_end_to_end(tmp_path):
    from genhancer.miniworld.demo import demo

    out = demo(tmp_path / "demo", fast=True)
    for name in ("report.md", "radar.png", "loss_curves.png", "reconstructions.png", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["mmvp"]) == {"Original", "GenHancer"}
    assert (out / "enhanced" / "config.json").is_file()
    report = (out / "report.md").read_text()
    assert report.index("## Summary") < report.index("probe") < report.index("MMVP-VLM, large")
    assert "| oracle |" in report and "Original encoder, stage-1 denoiser" in report and str(out / "enhanced") in report
    assert set(results["reconstruction_mse"]) == {"own", "other"} and results["threads"] == 1
    assert f"| `stage1_steps` | {results['recipe']['stage1_steps']} |" in report and "{" not in report  # no dict repr

    from genhancer.miniworld.incentive import read_costs

    costs = read_costs(out / "runs" / "stage1", n=8, repeats=1)
    assert costs["own_loss"] > 0 and set(costs["swap"]) >= {"direction", "text", "background"}


def test_demo_refuses_a_non_empty_folder(tmp_path):
    from genhancer.miniworld.demo import demo

    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        demo(tmp_path, fast=True)


@pytest.mark.parametrize("argv, message", [
    (["miniworld", "generate", "--out", "x", "--num", "0"], "--num must be > 0"),
    (["miniworld", "ablate", "nothing"], "unknown study"),
    (["miniworld", "probe", "--model", "/nonexistent"], "not a save_pretrained CLIP folder"),
    (["miniworld", "incentive", "--encoder", "/nonexistent"], "'none' to measure the oracle only"),
    (["miniworld", "demo", "--threads", "0"], "--threads must be > 0"),
    (["miniworld", "probe", "--first-seed", "-1"], "--first-seed must be >= 0, got -1"),
    (["miniworld", "ablate", "head", "--seed-from", "-1"], "--seed-from must be >= 0, got -1"),
    (["miniworld", "generate", "--out", "x", "--first-seed", "-5"], "--first-seed must be >= 0, got -5"),
])
def test_cli_mistakes_are_one_line_errors(argv, message, capsys):
    from genhancer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_benchmark_refuses_a_negative_first_seed_and_writes_nothing(tmp_path, capsys):
    from genhancer.cli import main

    assert main(["miniworld", "benchmark", "--out", str(tmp_path / "b"), "--first-seed", "-1"]) == 2
    assert "--first-seed must be >= 0" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_benchmark_first_seed_draws_both_versions_fresh(tmp_path):
    """``--first-seed N``: the standard version's pairs from N on, the large one's from N + 1,000,000 (the held-out
    default: each from its split)."""
    import csv

    from genhancer.cli import main
    from genhancer.miniworld.benchmark import make_pair
    from genhancer.miniworld.scenes import ATTRIBUTES, FRESH, SPLITS, phrase

    def first_pair(folder):
        with open(folder / "Questions.csv") as f:
            return [row["Statement"] for row in csv.DictReader(f)][:2]

    attribute = next(iter(ATTRIBUTES))
    expected = lambda seed: [phrase(s, {attribute}) for s in make_pair(seed, attribute)]  # noqa: E731
    assert main(["miniworld", "benchmark", "--out", str(tmp_path / "fresh"), "--parts", "1",
                 "--first-seed", str(FRESH)]) == 0
    assert first_pair(tmp_path / "fresh" / "mmvp") == expected(FRESH)
    assert first_pair(tmp_path / "fresh" / "mmvp-large" / "part-00") == expected(FRESH + 1_000_000)
    assert main(["miniworld", "benchmark", "--out", str(tmp_path / "held"), "--parts", "1"]) == 0
    assert first_pair(tmp_path / "held" / "mmvp") == expected(SPLITS["mmvp"])
    assert first_pair(tmp_path / "held" / "mmvp-large" / "part-00") == expected(SPLITS["mmvp-large"])


def test_write_world_refuses_an_unknown_split_before_writing(tmp_path):
    from genhancer.miniworld.demo import FAST, write_world

    with pytest.raises(ConfigError, match="unknown split 'probe': choose 'held-out' .* or 'val'"):
        write_world(tmp_path / "w", FAST, "probe")
    assert not (tmp_path / "w").exists()


def test_generate_writes_images_with_labels_and_captions(tmp_path):
    from genhancer.cli import main

    assert main(["miniworld", "generate", "--out", str(tmp_path), "--num", "3", "--size", "32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1, 2] and all((tmp_path / r["file"]).is_file() for r in rows)
    assert rows[0]["attributes"]["shape"] in rows[0]["caption"]


def test_library_and_cli_caption_at_the_same_rates(tmp_path):
    """``write_folder``'s default is the CLI's: the per-attribute rates the shipped base was pretrained with."""
    from genhancer.cli import main
    from genhancer.miniworld.scenes import write_folder

    write_folder(tmp_path / "lib", 40, size=16)
    assert main(["miniworld", "generate", "--out", str(tmp_path / "cli"), "--num", "40", "--size", "16"]) == 0
    assert (tmp_path / "lib" / "labels.jsonl").read_text() == (tmp_path / "cli" / "labels.jsonl").read_text()


def test_both_stages_and_the_incentive_use_the_recipes_timesteps(tmp_path):
    """The recipe's logit-normal m and s reach the trainer's config of each stage and the incentive's stage 1."""
    from dataclasses import replace

    from genhancer.miniworld.demo import FULL, run_config
    from genhancer.miniworld.incentive import DEMO, IncentiveRecipe

    recipe = replace(FULL, logit_normal_mean=0.7, logit_normal_scale=0.3)
    for stage in ("stage1", "stage2"):
        objective = run_config(recipe, "base", tmp_path, tmp_path / stage, stage).objective
        assert (objective.logit_normal_mean, objective.logit_normal_scale) == (0.7, 0.3)
    measured = IncentiveRecipe.stage1_of(recipe)
    assert (measured.logit_normal_mean, measured.logit_normal_scale) == (0.7, 0.3)
    assert (DEMO.logit_normal_mean, DEMO.logit_normal_scale) == (FULL.logit_normal_mean, FULL.logit_normal_scale)
