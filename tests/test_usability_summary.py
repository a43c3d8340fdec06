"""A run says what it built before its first step, and what is off; the CPU thread count."""

import importlib.util
import platform
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPModel

from genhancer import summary, threads
from genhancer.cli import main
from genhancer.config import load_config
from genhancer.summary import LARGE_FOR_CPU, notes


def summary_of(capsys) -> dict[str, str]:
    out = capsys.readouterr().out
    head = out.split("skipped ")[0]  # the summary comes before the run's end-of-run lines
    return {line[:12].strip(): line[12:] for line in head.splitlines() if re.match(r"^[a-z]+ +\S", line)}


def number(text: str, before: str) -> int:
    return int(re.search(rf"([\d,]+) {before}", text).group(1).replace(",", ""))


def test_the_summary_names_everything_built(tiny_clip, overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--threads", "1", *overrides(tiny_clip, run, steps=3, train__grad_accum=2)]) == 0
    lines = summary_of(capsys)
    assert list(lines) == ["backbone", "trainable", "denoiser", "latent", "images", "steps", "device", "output"]
    clip = CLIPModel.from_pretrained(tiny_clip)
    assert number(lines["backbone"], "parameters") == sum(p.numel() for p in clip.parameters())
    vision = sum(p.numel() for p in clip.vision_model.parameters())
    assert f"vision tower {vision:,}" in lines["backbone"] and "(clip, 32px)" in lines["backbone"]
    head = number(lines["denoiser"], "parameters")
    assert lines["denoiser"].startswith("flux-tiny: ") and number(lines["trainable"], "parameters") == head
    assert "encoder frozen" in lines["trainable"] and lines["denoiser"].endswith("drawn on the CPU from train.seed=0")
    assert lines["latent"] == "pixel, target (3, 16, 16)"
    assert lines["images"].startswith("64 synthetic images")
    # 64 images / batch 4 = 16 micro-batches per epoch; 3 steps x 2 micro-batches = 6 of them
    assert lines["steps"].startswith("3 optimizer steps = 0.375 epoch(s) of 16 micro-batches; global batch 8")
    assert lines["device"] == "cpu, 1 torch thread(s); precision fp32"
    assert lines["output"] == str(run)


def test_stage2_summary_counts_lora_apart(tiny_clip, overrides, tmp_path, capsys):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main(["train", *overrides(tiny_clip, s1, steps=1)]) == 0
    capsys.readouterr()
    assert main(["train", *overrides(tiny_clip, s2, stage="stage2", steps=1, stage__init_from=s1,
                                     stage__lora_r=2)]) == 0
    lines = summary_of(capsys)
    clip = CLIPModel.from_pretrained(tiny_clip)
    lora = number(lines["backbone"], "LoRA")
    # r x (in + out) per linear layer of the vision encoder: 2 layers x (4 attention 32->32, fc1 32->64, fc2 64->32)
    assert lora == 2 * 2 * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    assert number(lines["trainable"], "parameters") == lora and "lora on the encoder" in lines["trainable"]
    assert lines["denoiser"].endswith(f"; weights from {s1}")
    assert number(lines["backbone"], "parameters") == sum(p.numel() for p in clip.parameters())


def cpu_acc():
    return SimpleNamespace(device=torch.device("cpu"))


def test_the_head_is_said_to_be_drawn_where_the_run_draws_it():
    cfg = load_config(None, ["train.seed=7", "data.source=synthetic"])
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert summary._head_origin(cfg, gpu) == "drawn on the CPU from train.seed=7"  # the default: same start anywhere
    cfg.model.init_on_device = True
    assert summary._head_origin(cfg, gpu) == "drawn on cuda:0 (model.init_on_device) from train.seed=7"
    assert summary._head_origin(cfg, cpu_acc()) == "drawn on the CPU from train.seed=7"


def test_notes_say_what_is_off(monkeypatch):
    cfg = load_config(None, ["data.source=synthetic", "train.precision=fp32", "train.trackers=[]"])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert notes(cfg, cpu_acc(), 1000) == []
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    [line] = notes(cfg, cpu_acc(), 1000)
    assert "mixed_precision=fp16 is overridden by train.precision=fp32" in line
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(summary, "cpu_bf16", lambda: True)  # a CPU with bf16 instructions
    cfg = load_config(None, ["data.source=synthetic", "train.trackers=[]"])  # the recipe defaults: bf16, flux-paper
    bf16, big = notes(cfg, cpu_acc(), LARGE_FOR_CPU + 1)
    assert "usually faster" in bf16 and "train.precision=fp32" in bf16
    assert "model.denoiser=flux-tiny" in big and "flux-paper" in big
    assert notes(cfg, SimpleNamespace(device=torch.device("cuda")), LARGE_FOR_CPU + 1) == []
    frozen = load_config(None, ["data.source=synthetic", "train.trackers=[]", "train.precision=fp32",
                                "train.frozen_bf16=true"])
    assert notes(frozen, cpu_acc(), 1000) == []  # what the switch is for
    monkeypatch.setattr(summary, "cpu_bf16", lambda: False)  # one without: every bf16 product emulated
    emulated, _ = notes(cfg, cpu_acc(), LARGE_FOR_CPU + 1)
    assert emulated.startswith("train.precision=bf16 on a CPU without bf16 instructions") and "35x" in emulated
    [line] = notes(frozen, cpu_acc(), 1000)
    assert line.startswith("train.frozen_bf16=true on a CPU without") and "train.frozen_bf16=false" in line
    assert notes(frozen, SimpleNamespace(device=torch.device("cuda")), 1000) == []


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() != "x86_64", reason="x86 Linux")
def test_cpu_bf16_agrees_with_the_cpu_flags():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags  # oneDNN's bf16 floor on x86
    if avx512_core or "amx_bf16" in flags:
        assert threads.cpu_bf16() is True
    else:
        assert threads.cpu_bf16() is False


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_missing_default_tracker_is_one_line(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = load_config(None, ["data.source=synthetic", "train.precision=fp32"])
    assert cfg.train.trackers == ["tensorboard"]
    [line] = notes(cfg, cpu_acc(), 1000)
    assert "tensorboard not installed" in line and "train.trackers=[]" in line


def test_thread_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.6, 0.0, 0.0))
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)
    assert threads.default_threads() == 2  # two CPUs busy with other work
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.default_threads() == 1
    before = torch.get_num_threads()
    try:
        if not torch.cuda.is_available():
            assert threads.set_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_images_line_of_shards_and_caches(tmp_path):
    from genhancer import summary

    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    cfg = load_config(None, [f"data.path={tmp_path}/{{00000..00002}}.tar"])
    assert summary._images(cfg, None, 8) == f"3 .tar shards at {tmp_path}/{{00000..00002}}.tar (image count unknown " \
                                            "until read)"
    cfg.data.source = "cache"
    assert summary._images(cfg, 5, 8).startswith("40 cached samples per epoch")


def test_machine_line_names_the_cpu_kernels_and_bf16(monkeypatch):
    from genhancer import bench

    capability = torch.backends.cpu.get_cpu_capability()
    for native in (True, False):
        monkeypatch.setattr(bench, "cpu_bf16", lambda native=native: native)
        line = bench.machine()
        assert f"({capability} kernels{'' if native else ', bf16 emulated'})," in line
