"""User mistakes: one line naming the fix, exit code 2, no trace, nothing written."""

import subprocess
import sys

import pytest
from cli_runner import run_cli

from genhancer.cli import main


@pytest.mark.parametrize("extra, needle", [
    ({"model__backbone": "no-such-clip"}, "neither a local folder nor in the Hugging Face cache"),
    ({"model__backbone": "openai-clip-vit-l-14-224"}, "hf download openai/clip-vit-large-patch14"),
    ({"train__max_stpes": 3}, "did you mean 'train.max_steps'"),
    ({"model__latent_downsample": 3}, "not divisible"),
    ({"model__denoiser": "flux-tiniest"}, "did you mean 'flux-tiny'"),
    ({"stage__stage": "stage2"}, "stage.init_from=RUN_DIR"),
    ({"model__latent": "flux-vae"}, "model.latent_path=DIR"),
])
def test_train_errors(tiny_clip, overrides, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *overrides(tiny_clip, out, **extra)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_empty_dataset(tiny_clip, overrides, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run", data__source="folder",
                                                data__path=tmp_path / "empty")], capsys)
    assert code == 2 and "no images found" in err[0] and not (tmp_path / "run").exists()


def test_existing_run_needs_resume_and_export_needs_empty_folder(tiny_clip, overrides, tmp_path, capsys):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main(["train", *overrides(tiny_clip, s1, steps=2)]) == 0
    code, _, err = run_cli(["train", *overrides(tiny_clip, s1, steps=2)], capsys)
    assert code == 2 and "--resume" in err[0]
    code, _, err = run_cli(["export", s1, tmp_path / "x"], capsys)
    assert code == 2 and "stage-1 run leaves the encoder unchanged" in err[0] and not (tmp_path / "x").exists()
    assert main(["train", *overrides(tiny_clip, s2, stage="stage2", steps=2, stage__init_from=s1)]) == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = run_cli(["export", s2, busy], capsys)
    assert code == 2 and "not empty" in err[0] and [p.name for p in busy.iterdir()] == ["keep.txt"]
    code, _, err = run_cli(["export", tmp_path / "nowhere", tmp_path / "y"], capsys)
    assert code == 2 and "no usable checkpoint" in err[0]


def test_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genhancer", "train", "data.source=synthetic",
                           "model.backbone=nope", f"train.output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_fsdp_is_refused_up_front(tiny_clip, overrides, tmp_path):
    from types import SimpleNamespace

    from genhancer.config import ConfigError, load_config
    from genhancer.trainer import train

    cfg = load_config(None, overrides(tiny_clip, tmp_path / "run"))
    fake = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"))
    with pytest.raises(ConfigError, match="deepspeed-zero2-8gpu.yaml"):
        train(cfg, accelerator=fake)
    assert not (tmp_path / "run").exists()
