"""`genhancer bench` on CPU at tiny size, and its answer to a batch that does not fit."""

import json

import torch

from genhancer.bench import PRESETS
from genhancer.cli import main
from genhancer.enhancer import Enhancer


def bench_args(*extra):
    return ["bench", "--preset", "tiny", "--warmup", "1", "--steps", "2", "data.synthetic_size=8", *extra]


def test_bench_runs_on_cpu_prints_a_table_and_appends_json(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert main(bench_args("--batch-size", "2", "--json", str(out))) == 0
    assert main(bench_args("--batch-size", "2", "--cache", "--json", str(out))) == 0
    printed = capsys.readouterr().out
    assert "s / it (median)" in printed and "images / s" in printed and "peak memory" in printed
    images, cached = [json.loads(line) for line in out.read_text().splitlines()]
    for r in (images, cached):
        assert r["s_per_it"] > 0 and r["images_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["params_head"] > r["params_denoiser"] > 0 and r["mfu"] is None  # MFU: GPU only
        assert "CPU" in r["machine"]
    assert cached["config"]["cache"] and not images["config"]["cache"]
    assert cached["flops_per_image"] < images["flops_per_image"]  # the frozen encoders no longer run


def test_a_stage2_bench_starts_from_a_fresh_head_drawn_where_the_preset_says(tmp_path, build_devices):
    """Stage 2 without a stage-1 run: the bench writes a fresh head first; with model.init_on_device (the paper
    preset's setting) it is drawn on the bench's device, like the run's own model."""
    assert PRESETS["paper"]["model.init_on_device"] and "model.init_on_device" not in PRESETS["tiny"]
    out = tmp_path / "bench.jsonl"
    assert main(bench_args("--batch-size", "2", "--stage", "stage2", "--json", str(out))) == 0
    assert main(bench_args("model.init_on_device=true", "--batch-size", "2", "--stage", "stage2", "--json",
                           str(out))) == 0
    assert [d for d in build_devices if d != "meta"] == ["None", "None", "cpu", "cpu"]  # fresh head, run; twice
    plain, on_device = [json.loads(line) for line in out.read_text().splitlines()]
    assert plain["config"]["stage"] == "stage2" and plain["params_trainable"] < plain["params_head"]
    assert not plain["config"]["init_on_device"] and on_device["config"]["init_on_device"]


def test_a_batch_that_does_not_fit_gets_the_largest_that_does(tmp_path, capsys, monkeypatch):
    forward = Enhancer.forward

    def small_memory(self, batch, draws):  # a device that holds 3 images
        if len(next(iter(batch.values()))) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, batch, draws)

    monkeypatch.setattr(Enhancer, "forward", small_memory)
    assert main(bench_args("--batch-size", "8")) == 2
    err = capsys.readouterr().err
    assert "train.batch_size=8 does not fit" in err and "the largest batch that fits is 3" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: train.batch_size=8")


def test_bench_user_mistakes_are_one_line_errors(capsys):
    assert main(bench_args("--steps", "0")) == 2
    assert main(["bench", "--preset", "huge"]) == 2
    assert "unknown bench preset 'huge'" in capsys.readouterr().err
