"""Bad input of a researcher bringing their own model: one line naming the key or the fix, exit 2, nothing written."""

import json
import shutil

import pytest
import torch
from cli_runner import run_cli
from eval_fixtures import make_mmvp

import genhancer.trainer
from genhancer.cli import main


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux-vae")
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
    return folder


@pytest.mark.parametrize("key", ["model.weights", "model.backbone"])
def test_a_vae_folder_as_the_clip(vae_folder, tiny_clip, overrides, tmp_path, capsys, key):
    args = [a for a in overrides(tiny_clip, tmp_path / "run") if not a.startswith("model.backbone=")]
    preset = ["model.backbone=openai-clip-vit-l-14-224"] if key == "model.weights" else []
    code, _, err = run_cli(["train", *args, *preset, f"{key}={vae_folder}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "AutoencoderKL" in err[0] and "model.latent_path" in err[0] and not (tmp_path / "run").exists()


def test_weights_of_another_architecture_than_the_preset(tiny_clip, overrides, tmp_path, capsys):
    args = [a for a in overrides(tiny_clip, tmp_path / "run") if not a.startswith("model.backbone=")]
    code, _, err = run_cli(["train", *args, "model.backbone=openai-clip-vit-l-14-224", f"model.weights={tiny_clip}"],
                           capsys)
    assert code == 2 and len(err) == 1
    assert "ViT 2 x 32" in err[0] and "ViT 24 x 1024" in err[0] and f"model.backbone={tiny_clip}" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 5242880000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line(monkeypatch, tiny_clip, overrides, tmp_path, capsys, error):
    def no_memory(*args, **kwargs):
        raise error
    monkeypatch.setattr(genhancer.trainer, "train", no_memory)
    code, _, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and "out of memory" in err[0] and "train.batch_size" in err[0]
    assert "model.denoiser" in err[0] and "\n" not in err[0]


def test_other_runtime_errors_are_not_disguised(monkeypatch, tiny_clip, overrides, tmp_path):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(genhancer.trainer, "train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", *overrides(tiny_clip, tmp_path / "run")])


def test_evaluating_a_model_whose_processor_size_does_not_match(tiny_clip, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_clip, model)
    config = json.loads((model / "preprocessor_config.json").read_text())
    config.update(crop_size={"height": 24, "width": 24}, size={"shortest_edge": 24})
    (model / "preprocessor_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["eval", "mmvp", "--model", model, "--benchmark", make_mmvp(tmp_path / "mmvp"),
                            "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert code == 2 and len(err) == 1
    assert "makes 24px images" in err[0] and "takes 32px" in err[0] and "preprocessor_config.json" in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_compare_on_a_run_folder_says_export_it_first(tiny_clip, overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=1)]) == 0
    code, _, err = run_cli(["eval", "compare", tiny_clip, run, "--mmvp", make_mmvp(tmp_path / "mmvp"),
                            "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and "export it first" in err[0] and f"genhancer export {run}" in err[0]
    assert not (tmp_path / "out").exists()  # found before the base model is evaluated


def test_threads_must_be_positive(tiny_clip, overrides, tmp_path, capsys):
    code, _, err = run_cli(["train", "--threads", "0", *overrides(tiny_clip, tmp_path / "run")], capsys)
    assert code == 2 and "--threads 0" in err[0] and not (tmp_path / "run").exists()


def test_evaluating_a_vae_folder(vae_folder, tmp_path, capsys):
    code, _, err = run_cli(["eval", "mmvp", "--model", vae_folder, "--benchmark", make_mmvp(tmp_path / "mmvp"),
                            "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and "is not a transformers model folder" in err[0]


def test_exporting_onto_a_file(tmp_path, capsys):
    (tmp_path / "model.bin").write_text("mine")
    code, _, err = run_cli(["export", tmp_path / "run", tmp_path / "model.bin"], capsys)
    assert code == 2 and "is a file" in err[0] and (tmp_path / "model.bin").read_text() == "mine"


def test_running_out_of_memory_in_eval_names_its_batch_size(monkeypatch, tmp_path, capsys):
    import genhancer.evaluation.mmvp as mmvp

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(mmvp, "load_benchmark", no_memory)
    code, _, err = run_cli(["eval", "mmvp", "--model", tmp_path, "--benchmark", tmp_path], capsys)
    assert code == 2 and len(err) == 1 and "out of memory" in err[0] and "lower --batch-size" in err[0]


def test_a_run_that_had_to_stop_still_exits_1(monkeypatch, tiny_clip, overrides, tmp_path, capsys):
    from genhancer.errors import TrainingError

    def diverged(*args, **kwargs):
        raise TrainingError("3 non-finite steps in a row up to step 5: the run diverged")
    monkeypatch.setattr(genhancer.trainer, "train", diverged)
    code, _, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run")], capsys)
    assert code == 1 and err == ["error: 3 non-finite steps in a row up to step 5: the run diverged"]


def test_running_out_of_memory_inside_the_training_loop_is_one_line(monkeypatch, tiny_clip, overrides, tmp_path,
                                                                    capsys):
    """The trainer lets an OOM in a step through (it used to wrap it as a TrainingError, exit 1) and closes its log."""
    def no_memory(step, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(genhancer.trainer, "train_step", no_memory)
    code, _, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and "out of memory" in err[0] and "genhancer bench" in err[0]
