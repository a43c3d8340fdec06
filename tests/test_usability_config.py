"""Seeing the configuration: `genhancer config`, the key reference page, and how data.path is read."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from genhancer import config as config_module
from genhancer.cli import build_parser, main
from genhancer.config import RunConfig, load_config
from genhancer.errors import ConfigError
from genhancer.keys import EXTRA_HELP, config_keys, format_value, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def all_fields() -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(getattr(RunConfig(), s.name))]


def test_every_key_has_type_default_and_help():
    keys = config_keys()
    assert [k.name for k in keys] == all_fields()
    assert all(k.help and k.type for k in keys), [k.name for k in keys if not k.help]
    by_name = {k.name: k for k in keys}
    # help is the field line's own comment, read from the source
    assert by_name["model.backbone"].help == "registered preset, local save_pretrained dir, or cached hub id"
    assert by_name["train.max_steps"].type == "int | None" and by_name["train.max_steps"].default is None
    assert by_name["data.crop_scale"].default == (0.9, 1.0) and by_name["optim.betas"].type == "tuple[float, float]"
    # EXTRA_HELP covers exactly the fields whose line has no comment
    source = Path(config_module.__file__).read_text()
    for name in all_fields():
        field = name.split(".")[1]
        line = next(ln for ln in source.splitlines() if re.match(rf"    {field}: ", ln))
        assert ("#" in line) == (name not in EXTRA_HELP), name


def test_config_prints_every_key_with_value_type_default_and_help(capsys):
    assert main(["config", "-c", "openai-clip-vit-l-14-224-stage2", "train.max_steps=7", "data.path=/d"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(None, [], check=False)
    for key in config_keys():
        assert re.search(rf"^{re.escape(key.name)} = ", out, re.M), key.name
    line = next(ln for ln in out.splitlines() if ln.startswith("train.max_steps = "))
    assert line.startswith("train.max_steps = 7 ") and "int | None, default null" in line and "optimizer steps" in line
    line = next(ln for ln in out.splitlines() if ln.startswith("stage.stage = "))
    assert "stage.stage = stage2 " in line and "default stage1" in line  # from the recipe
    line = next(ln for ln in out.splitlines() if ln.startswith("model.condition = "))
    assert "default" not in line.split("#")[1] and cfg.model.condition in line  # unchanged keys show no default
    assert "not ready" not in out


def test_config_changed_only_and_not_ready_note(capsys):
    assert main(["config", "--changed", "train.batch_size=3"]) == 0
    out = capsys.readouterr().out
    keys = [ln.split(" = ")[0] for ln in out.splitlines() if " = " in ln]
    assert keys == ["train.batch_size"]
    assert "# not ready to train yet: data.path is required" in out  # the default source needs a path


def test_config_rejects_a_mistyped_key_in_one_line(capsys):
    assert main(["config", "train.max_stpes=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'train.max_steps'" in err[0]


def test_config_reads_a_run_folders_config_yaml(tmp_path, capsys):
    cfg = load_config(None, ["data.source=synthetic", "train.seed=5"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_module.to_dict(cfg)))
    assert main(["config", "-c", str(tmp_path / "config.yaml"), "--changed"]) == 0
    out = capsys.readouterr().out
    assert "train.seed = 5 " in out and "data.source = synthetic " in out


def test_key_reference_page_is_current_and_complete():
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == reference_markdown() + "\n", "regenerate: genhancer config --reference > docs/config.md"
    for key in config_keys():
        row = f"| `{key.name}` | `{key.type.replace('|', chr(92) + '|')}` | `{format_value(key.default)}` |"
        assert row in page and row.count(" | ") == 2  # an unescaped | inside a cell would split it


def test_train_help_points_at_the_keys():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "genhancer config" in help_text and "model.backbone=DIR" in help_text and "data.path=DIR" in help_text


def test_console_config_subprocess():
    out = subprocess.run([sys.executable, "-m", "genhancer", "config", "--changed", "model.denoiser=flux-tiny"],
                         capture_output=True, text=True, check=True)
    assert "model.denoiser = flux-tiny" in out.stdout and out.stderr == ""


def images(folder: Path, n: int = 3) -> Path:
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (60 * i, 10, 90)).save(folder / ("sub" if i else ".") / f"{i}.jpg")
    return folder


def test_a_folder_of_images_is_read_as_one(tmp_path):
    cfg = load_config(None, [f"data.path={images(tmp_path / 'imgs')}"])
    assert cfg.data.source == "folder"
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    assert load_config(None, [f"data.path={shards}"]).data.source == "webdataset"
    assert load_config(None, [f"data.path={tmp_path / 'imgs'}", "data.source=synthetic"]).data.source == "synthetic"


def test_a_folder_without_shards_or_images_names_both_keys(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"data.source=webdataset\) or at a folder of images \(data.source=folder"):
        load_config(None, [f"data.path={tmp_path / 'notes'}"])


def test_train_on_a_folder_of_images_without_data_source(tiny_clip, overrides, tmp_path, capsys):
    args = [a for a in overrides(tiny_clip, tmp_path / "run", steps=1) if not a.startswith("data.source=")]
    assert main(["train", *args, f"data.path={images(tmp_path / 'imgs', 8)}"]) == 0
    assert "8 image files under" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["source"] == "folder"


def test_recipes_shows_one_recipe(capsys):
    assert main(["recipes", "metaclip-vit-l-14-224-stage1"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["model"]["backbone"] == "metaclip-vit-l-14-224" and shown["stage"]["stage"] == "stage1"
    assert out.rstrip().endswith("genhancer config -c metaclip-vit-l-14-224-stage1")
    assert main(["recipes", "no-such-recipe"]) == 2


def test_config_shows_the_detected_source(tmp_path, capsys):
    assert main(["config", "--changed", f"data.path={images(tmp_path / 'imgs')}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^data.source = folder +# str, default webdataset", out, re.M) and "not ready" not in out


def test_a_closed_pipe_is_no_traceback():
    """`genhancer config | head`: the reader goes away early."""
    proc = subprocess.Popen([sys.executable, "-m", "genhancer", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""
