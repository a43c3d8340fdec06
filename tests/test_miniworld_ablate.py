"""The miniature ablations: every study maps to valid trainer overrides; tables report mean +- std over seeds."""

import math

import pytest

from genhancer.config import ConfigError
from genhancer.miniworld.ablate import BASE, METRICS, STUDIES, ablate, plot, summarise
from genhancer.miniworld.demo import FAST, run_config


@pytest.mark.parametrize("study", [s for s in STUDIES if s != "denoiser"])
def test_every_variant_is_a_valid_run_config(study, tmp_path):
    for overrides in STUDIES[study].values():
        cfg = run_config(FAST, "base", tmp_path, tmp_path / "run", "stage2", tmp_path, extra=overrides)
        assert cfg.model.latent == "pixel"


def test_paper_variants_are_covered():
    assert len(STUDIES["timesteps"]) == 6 and len(STUDIES["condition"]) == 5
    assert set(STUDIES["finetune"]) == {"LoRA", "full"} and set(STUDIES["stages"]) == {"two-stage", "end-to-end"}


def test_summary_is_mean_and_std_over_seeds(tmp_path):
    rows = [{"variant": BASE, "seed": 0, "final": True, "step": 0, "loss": math.nan, **dict.fromkeys(METRICS, 50.0)}]
    rows += [{"variant": "LoRA", "seed": s, "final": True, "step": 2, "loss": 0.3, **dict.fromkeys(METRICS, v)}
             for s, v in enumerate((40.0, 60.0))]
    table = summarise(rows, [BASE, "LoRA"])
    assert "| LoRA | 50.0 ± 10.0 | 50.0 ± 10.0 | 50.0 ± 10.0 | 2 |" in table
    plot(rows, [BASE, "LoRA"], "finetune", tmp_path / "plot.png")
    plot(rows, [BASE, "LoRA"], "curve", tmp_path / "curve.png")
    assert (tmp_path / "plot.png").is_file() and (tmp_path / "curve.png").is_file()


def test_discrete_study_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="VQ latent"):
        ablate("denoiser", out=tmp_path)
