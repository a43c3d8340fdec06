"""The miniature ablations: every study maps to valid trainer overrides; tables report mean +- std over seeds."""

import math

import pytest

from genhancer.config import ConfigError
from genhancer.miniworld.ablate import (BASE, METRICS, STUDIES, VQ_CONFIG, VQ_DIR, ablate, for_stage, plot, resolve,
                                        summarise)
from genhancer.miniworld.demo import FAST, run_config


@pytest.mark.parametrize("study", [s for s in STUDIES if s != "denoiser"])
def test_every_variant_is_a_valid_run_config(study, tmp_path):
    for overrides in STUDIES[study].values():
        for stage in ("stage1", "stage2"):
            cfg = run_config(FAST, "base", tmp_path, tmp_path / "run", stage, tmp_path if stage == "stage2" else None,
                             extra=for_stage(overrides, stage))
            assert cfg.model.latent == "pixel"


def test_scoped_overrides_reach_only_their_stage(tmp_path):
    overrides = STUDIES["timesteps"]["logit-normal s=0.1 + 25% uniform in stage 1"]
    scoped = ("a.b=1", "stage1:c.d=2", "stage2:e.f=3", "g.h={x: 1}")
    assert for_stage(scoped, "stage1") == ("a.b=1", "c.d=2", "g.h={x: 1}")
    cfgs = {stage: run_config(FAST, "base", tmp_path, tmp_path / stage, stage, extra=for_stage(overrides, stage))
            for stage in ("stage1", "stage2")}
    assert (cfgs["stage1"].objective.uniform_share, cfgs["stage2"].objective.uniform_share) == (0.25, 0.0)
    assert cfgs["stage1"].objective.logit_normal_scale == cfgs["stage2"].objective.logit_normal_scale == 0.1


def test_paper_variants_are_covered():
    paper = [v for v in STUDIES["timesteps"] if "% uniform" not in v and "m=" not in v]  # + the demo's s, varied
    assert len(paper) == 6 and len(STUDIES["condition"]) == 5
    assert [o[-1] for v, o in STUDIES["timesteps"].items() if v not in paper] == [
        "objective.uniform_share=0.1", "objective.uniform_share=0.25", "stage1:objective.uniform_share=0.25",
        "objective.logit_normal_mean=0.5", "objective.logit_normal_mean=1.5", "objective.logit_normal_mean=2"]
    assert set(STUDIES["finetune"]) == {"LoRA", "full"} and set(STUDIES["stages"]) == {"two-stage", "end-to-end"}
    assert set(STUDIES["head"]) == {"frozen", "trained"}


def test_summary_is_mean_and_std_over_seeds(tmp_path):
    rows = [{"variant": BASE, "seed": 0, "final": True, "step": 0, "loss": math.nan, **dict.fromkeys(METRICS, 50.0)}]
    rows += [{"variant": "LoRA", "seed": s, "final": True, "step": 2, "loss": 0.3, **dict.fromkeys(METRICS, v)}
             for s, v in enumerate((40.0, 60.0))]
    table = summarise(rows, [BASE, "LoRA"])
    assert "| LoRA | " + " | ".join(["50.0 ± 10.0"] * 5 + ["50.0000 ± 10.0000"] * 2) + " | 2 |" in table
    rows[0].update(recon_own=math.nan, recon_other=math.nan)  # the base has no head to reconstruct with
    assert "| base (not tuned) | " + " | ".join(["50.0 ± 0.0"] * 5 + ["-"] * 2) + " | 1 |" in summarise(rows, [BASE])
    plot(rows, [BASE, "LoRA"], "finetune", tmp_path / "plot.png")
    plot(rows, [BASE, "LoRA"], "curve", tmp_path / "curve.png")
    assert (tmp_path / "plot.png").is_file() and (tmp_path / "curve.png").is_file()


def test_denoiser_study_builds_continuous_and_discrete_configs(tmp_path):
    """Table 6: both variants are valid run configs of the same recipe; the discrete one reads the ablation's VQ."""
    import torch
    from diffusers import VQModel

    from genhancer.enhancer import build_head
    from genhancer.latents import PixelSpace, VQSpace
    from genhancer.objectives import MaskedTokens

    variants = STUDIES["denoiser"]
    assert len(variants) == 2
    cfgs = {}
    for name, overrides in variants.items():
        for stage in ("stage1", "stage2"):
            cfg = run_config(FAST, "base", tmp_path, tmp_path / "run", stage, tmp_path if stage == "stage2" else None,
                             extra=resolve(overrides, tmp_path / "vq"))
            cfgs[name] = cfg
            assert VQ_DIR not in repr(cfg)
    cont, disc = cfgs.values()
    assert (cont.model.latent, cont.model.denoiser) == ("pixel", "flux-mini")
    assert (disc.model.latent, disc.model.denoiser) == ("vq", "perceiver-tiny")
    assert disc.model.latent_path == str(tmp_path / "vq")
    for field in ("optim", "train", "objective"):
        a, b = vars(getattr(cont, field)).copy(), vars(getattr(disc, field)).copy()
        assert a == b  # same stage recipe; only the latent space and the head differ
    # comparable heads over the same 64 tokens: 8 x 8 VQ codes vs 8 x 8 patches of the 32 px pixel space
    vq = VQSpace(VQModel.from_config(VQ_CONFIG))
    assert vq.target_shape(64) == (8, 8)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    heads = [build_head(c.model.denoiser, c.model.denoiser_arch, 64, space)
             for c, space in ((cont, PixelSpace(2)), (disc, vq))]
    assert 0.7 < n(heads[1]) / n(heads[0]) < 1.3
    objective = MaskedTokens(disc.objective)
    draws = objective.draw(2, (8, 8), torch.Generator().manual_seed(0))
    loss = objective.loss(heads[1], torch.randint(0, 256, (2, 8, 8)), torch.randn(2, 1, 64), draws)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_unknown_study_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown study"):
        ablate("nope", out=tmp_path)


def test_unknown_variant_is_rejected_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown variant 'LoRa' of study 'finetune': choose among 'LoRA', 'full'"):
        ablate("finetune", out=tmp_path, variants=("LoRa",))
    assert not any(tmp_path.iterdir())


def test_a_fast_study_runs_end_to_end_with_the_demos_protocol(tmp_path):
    """One variant of the discrete study (its own VQ tokenizer, stage 1 from the encoder cache, stage 2, export,
    scoring): a base row and one row per seed, a table and a plot; the cache is removed after stage 1."""
    import json

    out = ablate("denoiser", seeds=1, out=tmp_path, fast=True, variants=("discrete (perceiver-tiny)",), seed_from=3)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == [BASE, "discrete (perceiver-tiny)"] and rows[1]["seed"] == 3
    assert all(set(METRICS) <= set(r) for r in rows) and rows[1]["step"] == 2
    assert "| discrete (perceiver-tiny) |" in (out / "table.md").read_text() and (out / "plot.png").is_file()
    run = out / "runs" / "discrete_(perceiver-tiny)-seed3"
    assert "seed: 3" in (run / "stage2" / "config.yaml").read_text()  # the run trained with that seed
    assert (run / "stage1").is_dir() and not (run / "cache").exists()
    assert "source: cache" in (run / "stage1" / "config.yaml").read_text()
    assert math.isnan(rows[0]["recon_own"]) and 0 < rows[1]["recon_own"] and 0 < rows[1]["recon_other"]
    assert (run / "reconstructions.png").is_file()
    import torch

    from genhancer.miniworld.ablate import RECON_SCENES
    from genhancer.miniworld.demo import reconstruction_figure
    from genhancer.miniworld.scenes import SPLITS, render_many, scene_from_seed

    scenes = render_many([scene_from_seed(SPLITS["probe"] + i) for i in range(RECON_SCENES)])  # held-out: probe seeds
    mse = reconstruction_figure(run / "stage2", torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255,
                                tmp_path / "check.png", FAST.recon_steps)
    assert mse == {"own": rows[1]["recon_own"], "other": rows[1]["recon_other"]}


def test_unknown_split_is_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="unknown split 'test': choose 'held-out' .* or 'val'"):
        ablate("finetune", out=tmp_path, split="test")
    assert not any(tmp_path.iterdir())


def test_a_val_study_is_scored_on_val_seeds_only(tmp_path):
    """``split="val"``: the large benchmark's pairs start at the first val seed (no held-out benchmark is written),
    and the probes are the val split's: scores equal to the probes run on val, and unlike the held-out ones."""
    import csv

    import numpy as np

    from genhancer.miniworld import ablate as ablation
    from genhancer.miniworld.base import shipped_base
    from genhancer.miniworld.benchmark import make_pair
    from genhancer.miniworld.demo import BLIND, write_world
    from genhancer.miniworld.probes import run_probes
    from genhancer.miniworld.scenes import ATTRIBUTES, SPLITS, phrase

    world = write_world(tmp_path, FAST, "val")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmvp-large-val", "train"]
    with open(world["mmvp-large"] / "part-00" / "Questions.csv") as f:
        first = [row["Statement"] for row in csv.DictReader(f)][:2]
    attribute = next(iter(ATTRIBUTES))
    assert first == [phrase(s, {attribute}) for s in make_pair(SPLITS["val"], attribute)]

    base = shipped_base()
    val = ablation._score(base, world["mmvp-large"], FAST, "val")
    probes = run_probes([base], FAST.probe_train, FAST.probe_test, FAST.probe_pairs, split="val")[0]
    assert val["blind_probe"] == float(np.mean([probes["linear"][a] for a in BLIND]))
    assert val["blind_pairs"] == probes["blind_pairs"]["average"]
    assert run_probes([base], FAST.probe_train, FAST.probe_test, FAST.probe_pairs,
                      first_seed=SPLITS["val"])[0] == probes  # a first seed draws what that split draws
    held_out = ablation._score(base, world["mmvp-large"], FAST, "held-out")
    assert {k: v for k, v in held_out.items() if k != "mmvp_large"} != {k: v for k, v in val.items()
                                                                        if k != "mmvp_large"}
