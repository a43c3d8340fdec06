import pytest
import yaml

from genhancer.config import ConfigError, RunConfig, load_config, to_dict


def test_defaults_are_the_papers_recipe():
    cfg = RunConfig()
    assert cfg.lr == 1e-4 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.01
    assert cfg.optim.eps == 1e-8 and cfg.optim.warmup_steps == 10 and cfg.optim.grad_clip == 1.0
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.precision) == (16, 2, "bf16")
    assert (cfg.stage.lora_r, cfg.stage.lora_alpha, cfg.stage.lora_dropout) == (16, 16, 0.1)
    assert cfg.objective.timestep_sampling == "logit-normal" and cfg.objective.logit_normal_scale == 1.0
    assert (cfg.objective.mask_ratio_min, cfg.objective.mask_ratio_max) == (0.5, 0.9)
    assert cfg.data.crop_scale == (0.9, 1.0) and cfg.model.condition == "cls"
    stage2 = load_config(overrides=["stage.stage=stage2", "data.source=synthetic"])
    assert stage2.lr == 1e-5


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 7, "batch_size": 3}, "data": {"source": "synthetic"}}))
    cfg = load_config(path, ["train.max_steps=9", "optim.lr=3e-4", "data.crop_scale=[0.5,1]",
                             "model.denoiser_arch={hidden: 32}"])
    assert cfg.train.max_steps == 9 and cfg.train.batch_size == 3
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.model.denoiser_arch == {"hidden": 32}
    assert load_config(None, [], base=to_dict(cfg)) == cfg  # round trip through plain dicts


@pytest.mark.parametrize("override, needle", [
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("trian.max_steps=3", "did you mean 'train'"),
    ("train.batch_size=two", "'train.batch_size' must be an integer"),
    ("train.batch_size=1.5", "must be an integer"),
    ("stage.lora_r=0", "stage.lora_r must be >= 1"),
    ("objective.mask_ratio=1.2", "objective.mask_ratio must be in (0, 1)"),
    ("data.crop_scale=[0.9]", "list of 2 values"),
    ("stage.stage=stage3", "stage.stage must be"),
    ("train.resume=yes please", "must be true or false"),
    ("no_equals_sign", "section.key=value"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=synthetic", override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_data_path_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
