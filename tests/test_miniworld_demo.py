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
])
def test_cli_mistakes_are_one_line_errors(argv, message, capsys):
    from genhancer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


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
