"""Fault injection, part 2: checkpoint pruning, non-finite losses, gradients and updates, bad data, resume
mistakes, and config and environment faults, on tiny in-process runs (no real kill needed here). A real full disk
is in ``test_reliability_disk.py``, two runs in one folder in ``test_reliability_lock.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from PIL import Image
from safetensors.torch import load_file

from genhancer import checkpoint as ckpt_io
from genhancer import trainer
from genhancer.checkpoint import list_checkpoints, save_checkpoint, verify
from genhancer.cli import main
from genhancer.enhancer import Enhancer
from genhancer.errors import CheckpointError


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(ckpt / "weights.safetensors")),
            **{f"optimizer.{k}": v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()}}


def same(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


# ----------------------------------------------------------------------------------------------- pruning


def fake_state(step: int) -> tuple[dict, dict]:
    return ({"w": torch.full((4,), float(step))},
            {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(4)}},
             "param_groups": [{"lr": 1e-3, "params": [0]}]})


def names(run: Path) -> list[int]:
    return [int(p.name[5:]) for p in list_checkpoints(run)]


def test_keep_last_counts_complete_checkpoints_and_never_deletes_the_newest_complete_one(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, *fake_state(step), {}, keep_last=2)
        assert names(tmp_path) == list(range(max(1, step - 1), step + 1))
    # a damaged checkpoint does not count towards keep_last: 4 stays with 6 as the two complete ones
    (ckpt(tmp_path, 5) / "weights.safetensors").write_bytes(b"torn")
    save_checkpoint(tmp_path, 6, *fake_state(6), {}, keep_last=2)
    assert names(tmp_path) == [4, 5, 6]
    # older than the oldest kept complete checkpoint: deleted, damaged or not
    save_checkpoint(tmp_path, 7, *fake_state(7), {}, keep_last=2)
    assert names(tmp_path) == [6, 7]
    save_checkpoint(tmp_path, 8, *fake_state(8), {}, keep_last=1)
    assert names(tmp_path) == [8] and ckpt_io.latest_checkpoint(tmp_path) == ckpt(tmp_path, 8)
    assert torch.equal(load_file(str(ckpt(tmp_path, 8) / "weights.safetensors"))["w"], torch.full((4,), 8.0))


def test_leftovers_of_a_killed_write_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, *fake_state(1), {}, keep_last=3)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000002").mkdir()  # killed while writing step 2
    (root / ".tmp-step-0000002" / "weights.safetensors").write_bytes(b"half")
    (root / "step-0000003").mkdir()  # a folder with no state.json (e.g. copied in part)
    assert ckpt_io.latest_checkpoint(tmp_path, quiet=True) == ckpt(tmp_path, 1)
    save_checkpoint(tmp_path, 2, *fake_state(2), {}, keep_last=3)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002", "step-0000003"]
    (ckpt(tmp_path, 3) / "state.json").write_text("{}")  # valid JSON, but no manifest: not a checkpoint
    assert verify(ckpt(tmp_path, 3)) == "state.json has no manifest of the checkpoint's files"
    assert ckpt_io.latest_checkpoint(tmp_path, quiet=True) == ckpt(tmp_path, 2)


def test_no_usable_checkpoint_is_reported_not_loaded(tmp_path):
    save_checkpoint(tmp_path, 1, *fake_state(1), {}, keep_last=2)
    (ckpt(tmp_path, 1) / "state.json").unlink()
    with pytest.warns(UserWarning, match="state.json missing"):
        assert ckpt_io.latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no usable checkpoint"), pytest.warns(UserWarning):
        ckpt_io.resolve_checkpoint(tmp_path)


def test_resume_with_every_checkpoint_damaged_starts_over_and_says_so(tiny_clip, overrides, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *overrides(tiny_clip, run, steps=2, train__save_every=2)]
    assert main(args) == 0
    before = (run / "metrics.jsonl").read_text()
    (ckpt(run, 2) / "state.json").write_text("{")
    with pytest.warns(UserWarning, match="step-0000002: state.json missing or unreadable"):
        code, out, err = run_cli([*args, "--resume"], capsys)
    assert code == 0 and not err
    assert f"no usable checkpoint under {run / 'checkpoints'} (see the warnings above): starting from step 0" in out
    assert verify(ckpt(run, 2)) is None
    assert (run / "metrics.jsonl").read_text().count("\n") == 2  # restarted, not appended to the old records
    assert [json.loads(x)["loss"] for x in before.splitlines()] == \
        [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_another_batch_size_warns_that_it_is_not_exact(tiny_clip, overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=2, train__save_every=2)]) == 0
    with pytest.warns(UserWarning, match=r"resuming .*step-0000002 with train.batch_size 4 -> 2: the run continues"):
        code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=3, train__batch_size=2), "--resume"],
                                 capsys)
    assert code == 0 and not err and "resumed from" in out


# ----------------------------------------------------------------------------------------------- non-finite


class _InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison(monkeypatch, nan_loss=(), inf_grad=()) -> None:
    """Make the loss NaN / the gradient infinite at the given 0-based optimizer steps."""
    current = {}
    step_generator, forward = trainer.step_generator, Enhancer.forward

    def tracking_step_generator(seed, step, micro):
        current["step"] = step
        return step_generator(seed, step, micro)

    def poisoned_forward(self, batch, draws):
        loss = forward(self, batch, draws)
        if current["step"] in nan_loss:
            return loss * float("nan")
        return _InfGrad.apply(loss) if current["step"] in inf_grad else loss

    monkeypatch.setattr(trainer, "step_generator", tracking_step_generator)
    monkeypatch.setattr(Enhancer, "forward", poisoned_forward)


def test_non_finite_loss_or_gradient_skips_the_update_and_is_counted(tiny_clip, overrides, tmp_path, capsys,
                                                                    monkeypatch):
    poison(monkeypatch, nan_loss={1}, inf_grad={3})  # steps 2 and 4 as logged (1-based)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=5, train__save_every=1,
                                                  train__keep_last=10, optim__lr=1e-2)], capsys)
    assert code == 0 and not err
    assert "step 2: non-finite loss, update skipped" in out and "step 4: non-finite gradient, update skipped" in out
    assert same(ckpt(run, 1), ckpt(run, 2)) and same(ckpt(run, 3), ckpt(run, 4))  # no update, Adam state too
    assert not same(ckpt(run, 2), ckpt(run, 3)) and not same(ckpt(run, 4), ckpt(run, 5))
    assert json.loads((run / "data_report.json").read_text())["nonfinite_steps"] == 2
    assert "non-finite steps skipped: 2" in out
    counters = json.loads((ckpt(run, 5) / "state.json").read_text())["counters"]
    assert counters == {"nonfinite": 0, "skipped_steps": 2}
    grads = [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not np.isfinite(grads[3]) and np.isfinite(grads[2])


def test_too_many_non_finite_steps_in_a_row_stop_naming_the_step_and_checkpoint(tiny_clip, overrides, tmp_path,
                                                                                capsys, monkeypatch):
    poison(monkeypatch, nan_loss=set(range(2, 100)))  # diverges from step 3 on
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=20, train__max_consecutive_nonfinite=2)],
                             capsys)
    assert code == 1 and len(err) == 1, err
    good = ckpt(run, 4)  # written after two skipped steps: it holds the weights of step 2
    assert err[0].startswith(f"error: 3 non-finite steps in a row up to step 5: the run diverged; "
                             f"last good checkpoint: {good}. ")
    assert verify(good) is None and same(good, ckpt(run, 2))
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000004"]


# ----------------------------------------------------------------------------------------------- bad data


def image_folder(root: Path, good: int, empty: int = 0, junk: int = 0) -> Path:
    root.mkdir()
    rng = np.random.RandomState(0)
    for i in range(good):
        Image.fromarray(rng.randint(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"good-{i:03d}.png")
    for i in range(empty):
        (root / f"empty-{i:03d}.jpg").write_bytes(b"")
    for i in range(junk):
        (root / f"junk-{i:03d}.png").write_bytes(b"this is not an image at all")
    return root


def test_run_over_bad_files_finishes_and_reports_skips_by_reason(tiny_clip, overrides, tmp_path, capsys):
    images = image_folder(tmp_path / "images", good=6, empty=1, junk=1)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=2, data__source="folder", data__path=images)],
                             capsys)  # 2 steps x 4 = exactly one epoch: every file seen once
    assert code == 0 and not err
    assert "skipped 2 of 8 samples (25.0%): empty-file 1, not-an-image 1" in out
    report = json.loads((run / "data_report.json").read_text())
    assert (report["seen"], report["skipped"], report["by_reason"]) == (8, 2, {"empty-file": 1, "not-an-image": 1})


def test_too_many_bad_files_stop_the_run_with_one_line(tiny_clip, overrides, tmp_path, capsys):
    images = image_folder(tmp_path / "images", good=20, empty=180)  # 200 samples: the check's minimum
    code, out, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run", steps=5, data__source="folder",
                                                  data__path=images, train__batch_size=200)], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: skipped 180 of 200 samples (90.0%): empty-file 180, more than "
                      "data.max_skip_fraction=0.05: remove or repair the unreadable files, or raise "
                      "data.max_skip_fraction")


# ----------------------------------------------------------------------------------------------- environment


def test_output_dir_inside_a_file_is_refused_before_any_work(tiny_clip, overrides, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    code, _, err = run_cli(["train", *overrides(tiny_clip, blocker / "run")], capsys)
    assert code == 2 and len(err) == 1 and "is a file" in err[0] and str(blocker) in err[0], err


@pytest.mark.filterwarnings("ignore:resuming")  # another stage is named as a changed setting, then refused
@pytest.mark.parametrize("change", ["model.denoiser_arch={depth_double: 2}", "model.denoiser_arch={ctx_dim: 32}",
                                    "stage.stage=e2e"])
def test_resume_with_other_model_settings_is_refused(tiny_clip, overrides, tmp_path, capsys, change):
    """More tensors, other shapes, or other trainable parameters than the checkpoint holds: one line, exit 2."""
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=2, train__save_every=2)]) == 0
    code, _, err = run_cli(["train", *overrides(tiny_clip, run, steps=4), change, "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "step-0000002" in err[0] and "same" in err[0], err
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]


# ----------------------------------------------------------------------------------------------- second pass


def finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in tensors(ckpt).values() if t.is_floating_point())


@pytest.mark.parametrize("settings, reason", [(dict(optim__eps=0, optim__lr=10), "update"),
                                              (dict(optim__lr=1e6), None)], ids=["eps=0,lr=10", "lr=1e6"])
def test_a_non_finite_update_is_skipped_and_only_finite_weights_are_saved(tiny_clip, overrides, tmp_path, capsys,
                                                                          settings, reason):
    """eps=0 makes AdamW divide 0 by 0 where a gradient is 0; lr=1e6 blows the weights up until the loss is NaN."""
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=20, train__save_every=1, train__keep_last=20,
                                                  train__max_consecutive_nonfinite=2, **settings)], capsys)
    assert code == 1 and len(err) == 1, err
    named = Path(err[0].split("last good checkpoint: ")[1].split(". ")[0])
    assert verify(named) is None and finite(named)
    assert list_checkpoints(run) and all(finite(c) for c in list_checkpoints(run))
    if reason == "update":  # no step could apply: every checkpoint still holds the initial weights
        assert "step 1: non-finite update, update skipped" in out
        assert err[0].endswith("Raise optim.eps or lower optim.lr")
        assert named == ckpt(run, 2) and same(ckpt(run, 1), ckpt(run, 2))


def tar_shard(path: Path, samples: int) -> Path:
    """A webdataset shard whose samples have a caption and metadata, but no image."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for ext, data in (("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("source", ["16 empty files", "an image-less shard"])
def test_batches_without_a_readable_image_are_skipped_until_the_limit_stops_the_run(tiny_clip, overrides, tmp_path,
                                                                                    capsys, source):
    if source == "16 empty files":
        data = dict(data__source="folder", data__path=image_folder(tmp_path / "images", good=0, empty=16))
        reason = "empty-file"
    else:
        data = dict(data__source="webdataset", data__path=tar_shard(tmp_path / "shard.tar", 4))
        reason = "no-image"
    run = tmp_path / "run"
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=5, train__save_every=10, **data)], capsys)
    # the first 0.05 x 200 = 10 bad samples are allowed before the share is judged: step 3 passes that
    assert code == 2 and err == [f"error: skipped 12 of 12 samples (100.0%): {reason} 12, more than "
                                 "data.max_skip_fraction=0.05: remove or repair the unreadable files, or raise "
                                 "data.max_skip_fraction"]
    assert "step 1: no readable image in its batch, update skipped" in out
    assert not run.exists()  # no checkpoint yet: the run leaves no config.yaml or empty metrics.jsonl behind
    code, out, err = run_cli(["train", *overrides(tiny_clip, run, steps=2, data__max_skip_fraction=1,
                                                  train__save_every=1, **data)], capsys)
    assert code == 0 and not err
    report = json.loads((run / "data_report.json").read_text())
    assert (report["skipped"], report["empty_steps"], report["nonfinite_steps"]) == (8, 2, 0)
    assert same(ckpt(run, 1), ckpt(run, 2))  # nothing learned, the Adam state untouched


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nine_bad_files_of_ten_train_on_the_good_one_and_resume_bit_exactly(tiny_clip, overrides, tmp_path, capsys,
                                                                            grad_accum):
    """Batches of 5 over 1 good and 9 empty files: one micro-batch of each epoch has no image. With grad_accum=1 its
    step is skipped; with 2 this process trains on the good image alongside a weightless stand-in."""
    images = image_folder(tmp_path / "images", good=1, empty=9)
    steps = 4 // grad_accum

    def args(run, n):
        return ["train", *overrides(tiny_clip, run, steps=n, train__save_every=1, train__batch_size=5,
                                    train__grad_accum=grad_accum, data__source="folder", data__path=images,
                                    data__max_skip_fraction=1, train__keep_last=10)]

    whole, split = tmp_path / "whole", tmp_path / "split"
    code, out, _ = run_cli(args(whole, steps), capsys)
    assert code == 0 and f"skipped {images / 'empty-000.jpg'} (empty-file)" in out
    assert run_cli(args(split, steps - 1), capsys)[0] == 0
    assert run_cli([*args(split, steps), "--resume"], capsys)[0] == 0
    assert same(ckpt(whole, steps), ckpt(split, steps))
    losses = [json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((whole / "data_report.json").read_text())
    if grad_accum == 1:
        assert sum(np.isnan(losses)) == 2 and report["empty_steps"] == 2
    else:
        assert np.isfinite(losses).all() and report["empty_steps"] == 0
    assert not same(ckpt(whole, 1), ckpt(whole, steps))  # the good image was learned from


def test_max_skip_fraction_0_stops_at_the_first_bad_sample(tiny_clip, overrides, tmp_path, capsys):
    images = image_folder(tmp_path / "images", good=7, empty=1)
    code, out, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run", steps=2, data__source="folder",
                                                  data__path=images, data__max_skip_fraction=0)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: skipped 1 of 4 samples (25.0%): empty-file 1, "
                                                             "more than data.max_skip_fraction=0.0"), err
    assert f"skipped {images / 'empty-000.jpg'} (empty-file)" in out


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_into_a_folder_without_a_run_is_refused(tiny_clip, overrides, tmp_path, capsys, where):
    run = tmp_path / "typo"
    if where == "empty":
        run.mkdir()
    code, _, err = run_cli(["train", *overrides(tiny_clip, run), "--resume"], capsys)
    assert code == 2 and err == [f"error: nothing to resume in {run}: check train.output_dir, or drop --resume to "
                                 "start a new run"]
    assert run.exists() == (where == "empty") and (where == "missing" or not any(run.iterdir()))


def test_resume_names_a_changed_setting_and_thread_count(tiny_clip, overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=2)]) == 0
    threads = torch.get_num_threads()  # the CLI's: OMP_NUM_THREADS (tests/conftest.py)
    try:
        with pytest.warns(UserWarning, match=rf"resuming .*step-0000002 with optim.lr 0.0001 -> 0.001, CPU threads "
                                             rf"{threads} -> {threads + 1} .*: the run continues, but it no longer "
                                             "matches an uninterrupted run"):
            code, _, err = run_cli(["train", *overrides(tiny_clip, run, steps=3, optim__lr=1e-3), "--resume",
                                    "--threads", str(threads + 1)], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and not err


@pytest.mark.parametrize("setting, message", [
    ("optim.betas=[1.5,0.999]", "optim.betas must both be in [0, 1), e.g. optim.betas=[0.9,0.999]; got [1.5, 0.999]"),
    ("optim.eps=-1", "optim.eps must be >= 0 (the default is 1e-8), got -1.0"),
    ("optim.weight_decay=-5", "optim.weight_decay must be >= 0 (the default is 0.01), got -5.0"),
    ("model.denoiser_arch={patch_size: 5}", "a (C, H, W) latent with sides divisible by the patch size 5 is needed"),
    ("model.denoiser_arch.hidden=30", "hidden 30 / heads 4 must equal sum(axes_dim) 16"),
    ("train.precision=fp16", "train.precision=fp16 needs a GPU (the CPU has no fp16 loss scaling)"),
])
def test_impossible_settings_are_one_line_before_any_model_and_leave_no_files(tiny_clip, overrides, tmp_path, capsys,
                                                                              monkeypatch, setting, message):
    def no_model(*a, **kw):
        raise AssertionError("the model was built before the settings were checked")

    monkeypatch.setattr(trainer, "_build", no_model)  # the shape check builds on the meta device only
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *overrides(tiny_clip, run), setting], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not run.exists()


def test_a_wrong_data_path_is_refused_before_any_model_is_built(tiny_clip, overrides, tmp_path, capsys, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was built before data.path was checked")

    monkeypatch.setattr(trainer, "_build", no_model)
    for source in ("folder", "webdataset"):
        code, _, err = run_cli(["train", *overrides(tiny_clip, tmp_path / "run", data__source=source,
                                                    data__path=tmp_path / "nowhere")], capsys)
        assert code == 2 and len(err) == 1 and str(tmp_path / "nowhere") in err[0], err


def test_stage2_refuses_a_damaged_newest_stage1_checkpoint_and_another_backbone(tiny_clip, overrides, tmp_path,
                                                                               capsys):
    from eval_fixtures import save_tiny_clip

    stage1 = tmp_path / "stage1"
    assert main(["train", *overrides(tiny_clip, stage1, steps=2, train__save_every=1)]) == 0
    stage2 = ["train", *overrides(tiny_clip, tmp_path / "stage2", stage="stage2", steps=1),
              f"stage.init_from={stage1}"]
    other = save_tiny_clip(tmp_path / "other-clip", seed=1, image_size=32)
    code, _, err = run_cli([*stage2, f"model.backbone={other}"], capsys)
    assert code == 2 and err == [f"error: stage.init_from was trained on another backbone (model.backbone={tiny_clip}, "
                                 "model.weights=None): use the stage-1 run's backbone and weights"]
    (ckpt(stage1, 2) / "weights.safetensors").write_bytes(b"torn")
    code, _, err = run_cli(stage2, capsys)
    assert code == 2 and err == [f"error: the newest checkpoint {ckpt(stage1, 2)} is unusable: weights.safetensors "
                                 "truncated; pass an older checkpoint folder explicitly to use it, or rerun the "
                                 "stage-1 run with --resume"]
    code, _, err = run_cli([*stage2[:-1], f"stage.init_from={ckpt(stage1, 1)}"], capsys)
    assert code == 0 and not err
