"""The incentive measurement: what the reconstruction loss pays for each attribute, on cases with known answers."""

import numpy as np
import pytest

from genhancer.miniworld import scenes
from genhancer.miniworld.incentive import FAST, IncentiveRecipe, measure, oracle_condition, table

TINY = IncentiveRecipe(train_images=200, val_images=48, steps=300, batch_size=16, size=32, latent_downsample=1,
                       denoiser="flux-tiny", denoiser_arch={"patch_size": 4}, logit_normal_mean=1.0, repeats=2)


@pytest.fixture
def invisible_mark():
    """A world whose dot is not drawn: the mark attribute does not change a single pixel."""
    old = scenes.WORLD
    scenes.use_style(scenes.Style(dot=0.0))
    yield
    scenes.use_style(old)


def test_oracle_condition_codes_each_attribute_in_its_own_slots():
    a = scenes.scene_from_seed(5)
    b = a.with_(direction=scenes.other_value(a, "direction", np.random.default_rng(0)))
    ca, cb = oracle_condition([a])[0, 0], oracle_condition([b])[0, 0]
    changed = (ca != cb).nonzero().flatten().tolist()
    assert list(scenes.ATTRIBUTES)[0] == "direction"  # its one-hot code comes first
    assert len(changed) == 2 and all(i < 4 for i in changed)
    assert ca[:4].sum() == 1 and cb[:4].sum() == 1


def test_an_attribute_that_changes_no_pixel_has_no_swap_cost(invisible_mark):
    scene = scenes.scene_from_seed(3)
    assert np.array_equal(np.asarray(scenes.render(scene.with_(mark="dot"), 32)),
                          np.asarray(scenes.render(scene.with_(mark="none"), 32)))
    result = measure(TINY, progress=lambda *_: None)
    swap = result["oracle"]["swap"]
    assert abs(swap["mark"]) < 0.3  # nothing to pay for: only the head's sensitivity to an unused input
    assert swap["colour"] > 10 * max(abs(swap["mark"]), 0.05)  # a large visible attribute is paid for
    assert result["oracle"]["other_scene"] > swap["colour"] > 0
    assert "| oracle |" in table(result)


def test_the_encoders_condition_is_compared_with_zeros_and_other_scenes():
    from genhancer.miniworld.base import shipped_base

    result = measure(FAST, encoder=str(shipped_base()),
                     encoder_swaps=False, progress=lambda *_: None)
    enc = result["encoder"]
    assert np.isfinite([enc["own_loss"], enc["zeros_loss"], enc["other_scene"]]).all()
    assert enc["gain_over_zeros"] == pytest.approx(100 * (enc["zeros_loss"] - enc["own_loss"]) / enc["own_loss"])


def test_cli_measures_and_writes_the_table(tmp_path, capsys):
    from genhancer.cli import main

    assert main(["miniworld", "incentive", "--fast", "--encoder", "none", "--out", str(tmp_path)]) == 0
    assert "| oracle |" in capsys.readouterr().out
    assert "| oracle |" in (tmp_path / "incentive.md").read_text() and (tmp_path / "incentive.json").is_file()
