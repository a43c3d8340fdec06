"""Fault injection, part 2: full disks, checkpoint pruning, non-finite losses and gradients, bad data, and
environment faults, on tiny in-process runs (no real kill needed here)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from genhancer import checkpoint as ckpt_io
from genhancer import trainer
from genhancer.checkpoint import list_checkpoints, save_checkpoint, verify
from genhancer.cli import main
from genhancer.enhancer import Enhancer
from genhancer.errors import CheckpointError


def cli(args, capsys) -> tuple[int, str, list[str]]:
    """Exit code, stdout, and the stderr lines that start with ``error:``."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [line for line in err.splitlines() if line.startswith("error:")]


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(ckpt / "weights.safetensors")),
            **{f"optimizer.{k}": v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()}}


def same(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


# ----------------------------------------------------------------------------------------------- disk full


def disk_fills_at(monkeypatch, call: int) -> None:
    """The ``call``-th safetensors write (1-based) writes half a file, then the disk is full."""
    real, calls = ckpt_io.save_file, []

    def save_file(tensors, filename, *a, **kw):
        calls.append(filename)
        real(tensors, filename, *a, **kw)
        if len(calls) == call:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", save_file)


@pytest.mark.parametrize("call, step, kept", [(3, 2, "the previous checkpoint {prev} is intact"),
                                              (2, 1, "no earlier checkpoint exists")])
def test_disk_full_during_a_write_keeps_the_previous_checkpoint_and_stops(tiny_clip, overrides, tmp_path, capsys,
                                                                          monkeypatch, call, step, kept):
    # writes: step 1 weights (1), step 1 optimizer (2), step 2 weights (3)
    disk_fills_at(monkeypatch, call)
    run = tmp_path / "run"
    code, out, err = cli(["train", *overrides(tiny_clip, run, steps=2, train__save_every=1)], capsys)
    assert code == 2 and len(err) == 1, err
    prev = ckpt(run, 1)
    assert err[0] == (f"error: checkpoint of step {step} not written: the disk is full; {kept.format(prev=prev)}. "
                      "Free space under train.output_dir and rerun with --resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == (["step-0000001"] if step == 2 else [])
    if step == 2:
        assert verify(prev) is None and json.loads((prev / "state.json").read_text())["step"] == 1
        monkeypatch.undo()  # space freed: the run continues from the intact checkpoint
        code, out, err = cli(["train", *overrides(tiny_clip, run, steps=2, train__save_every=1), "--resume"], capsys)
        assert code == 0 and not err and f"resumed from {prev} at step 1" in out
        assert [p.name for p in list_checkpoints(run)] == ["step-0000001", "step-0000002"]


def test_disk_full_writing_state_json_leaves_no_temporary_folder(tmp_path, monkeypatch):
    w, opt = {"a": torch.ones(3)}, {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0]}]}
    first = save_checkpoint(tmp_path, 1, w, opt, {}, keep_last=3)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.json, "dump", full)
    with pytest.raises(CheckpointError, match=f"the disk is full; the previous checkpoint {first} is intact"):
        save_checkpoint(tmp_path, 2, w, opt, {}, keep_last=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"] and verify(first) is None


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
        code, out, err = cli([*args, "--resume"], capsys)
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
        code, out, err = cli(["train", *overrides(tiny_clip, run, steps=3, train__batch_size=2), "--resume"], capsys)
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
    code, out, err = cli(["train", *overrides(tiny_clip, run, steps=5, train__save_every=1,
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
    code, out, err = cli(["train", *overrides(tiny_clip, run, steps=20, train__max_consecutive_nonfinite=2)],
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
    code, out, err = cli(["train", *overrides(tiny_clip, run, steps=2, data__source="folder", data__path=images)],
                         capsys)  # 2 steps x 4 = exactly one epoch: every file seen once
    assert code == 0 and not err
    assert "skipped 2 of 8 samples (25.0%): empty-file 1, not-an-image 1" in out
    report = json.loads((run / "data_report.json").read_text())
    assert (report["seen"], report["skipped"], report["by_reason"]) == (8, 2, {"empty-file": 1, "not-an-image": 1})


def test_too_many_bad_files_stop_the_run_with_one_line(tiny_clip, overrides, tmp_path, capsys):
    images = image_folder(tmp_path / "images", good=20, empty=180)  # 200 samples: the check's minimum
    code, out, err = cli(["train", *overrides(tiny_clip, tmp_path / "run", steps=5, data__source="folder",
                                              data__path=images, train__batch_size=200)], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: skipped 180 of 200 samples (90.0%): empty-file 180, more than "
                      "data.max_skip_fraction=0.05: remove or repair the unreadable files, or raise "
                      "data.max_skip_fraction")


# ----------------------------------------------------------------------------------------------- environment


def test_output_dir_inside_a_file_is_refused_before_any_work(tiny_clip, overrides, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    code, _, err = cli(["train", *overrides(tiny_clip, blocker / "run")], capsys)
    assert code == 2 and len(err) == 1 and "is a file" in err[0] and str(blocker) in err[0], err


@pytest.mark.parametrize("change", ["model.denoiser_arch={depth_double: 2}", "model.denoiser_arch={ctx_dim: 32}",
                                    "stage.stage=e2e"])
def test_resume_with_other_model_settings_is_refused(tiny_clip, overrides, tmp_path, capsys, change):
    """More tensors, other shapes, or other trainable parameters than the checkpoint holds: one line, exit 2."""
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_clip, run, steps=2, train__save_every=2)]) == 0
    code, _, err = cli(["train", *overrides(tiny_clip, run, steps=4), change, "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "step-0000002" in err[0] and "same" in err[0], err
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
