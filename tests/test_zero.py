"""DeepSpeed ZeRO-2 (the shipped accelerate config, 2 CPU processes over gloo) trains as one plain process does,
and its checkpoints resume in either mode."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from genhancer.backends import zero
from genhancer.cli import main
from genhancer.config import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs/accelerate/deepspeed-zero2-8gpu.yaml"


def fake_accelerator(stage=2, **zero_extra):
    ds = {"zero_optimization": {"stage": stage, **zero_extra}, "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}}
    return SimpleNamespace(num_processes=8, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))


def with_section(name):
    acc = fake_accelerator()
    acc.state.deepspeed_plugin.deepspeed_config[name] = {"type": "AdamW", "params": {"lr": 1e-4}}
    return acc


def test_run_config_is_written_into_deepspeed_config(tiny_clip, overrides, tmp_path):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "r", train__batch_size=16, train__grad_accum=2,
                                      train__precision="bf16", optim__grad_clip=0.5))
    acc = fake_accelerator()
    assert zero.configure(acc, cfg) == "DeepSpeed ZeRO-2: optimizer states and gradients sharded over 8 processes"
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (16, 2, 256)
    assert ds["gradient_clipping"] == 0.5
    # weights stay fp32 (bf16 by autocast), so checkpoints hold the exact weights
    assert ds["bf16"] == {"enabled": False} and ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


@pytest.mark.parametrize("acc, match", [(fake_accelerator(stage=3), "zero_stage 1 or 2"),
                                        (fake_accelerator(stage=0), "zero_stage 1 or 2"),
                                        (fake_accelerator(offload_optimizer={"device": "cpu"}), "device to none"),
                                        (with_section("optimizer"), "remove it")])
def test_unsupported_deepspeed_settings_are_refused(tiny_clip, overrides, tmp_path, acc, match):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "r"))
    with pytest.raises(ConfigError, match=match):
        zero.configure(acc, cfg)


def test_fp16_is_refused_with_deepspeed(tiny_clip, overrides, tmp_path):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "r", train__precision="fp16"))
    with pytest.raises(ConfigError, match="train.precision=bf16"):
        zero.accelerator_kwargs(cfg)


def test_missing_deepspeed_names_the_install(tiny_clip, overrides, tmp_path, monkeypatch):
    cfg = load_config(None, overrides(tiny_clip, tmp_path / "r"))
    monkeypatch.setattr(zero.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        zero.accelerator_kwargs(cfg)


def test_scalar_parameters_get_a_dimension_only_while_the_engine_is_built():
    module = torch.nn.Module()
    module.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
    with zero.scalars_as_vectors(module):
        assert module.logit_scale.shape == (1,)
        module.logit_scale.data.copy_(torch.tensor([1.5]))  # what a broadcast from rank 0 does
    assert module.logit_scale.shape == () and module.logit_scale.item() == 1.5


def launch(args, nproc):
    """``genhancer train`` in this process (nproc 1: its imports are already paid for) or under accelerate with
    the shipped ZeRO-2 config."""
    if nproc == 1:
        assert main(["train", *args]) == 0
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
           "--num_processes", str(nproc), "-m", "genhancer", "train", *args]
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        # a worker killed by a signal during gloo's start-up is the transport, not the trainer (test_distributed)
        if proc.returncode == 0 or "Signal" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_checkpoint(a: Path, b: Path):
    for name in ("weights.safetensors", "optimizer.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")


def resume_copy(src: Path, dst: Path, step: int) -> Path:
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return dst


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:resuming")  # another batch size / process count: expected here
def test_zero2_continues_a_plain_run_exactly_and_a_plain_run_continues_it(tiny_clip, overrides, tmp_path):
    """One ZeRO launch: it resumes a plain run's checkpoint (scattered into ZeRO's shards when the engine is
    built), trains two steps at the same global batch, and saves the same weights and AdamW state as the plain
    run (gathered from the shards into torch's format); its checkpoint then resumes a plain run."""
    pytest.importorskip("deepspeed")
    common = dict(steps=4, train__grad_accum=2, optim__lr=1e-3, optim__grad_clip=0.5, train__save_every=1,
                  train__keep_last=10)
    one = tmp_path / "one"
    launch(overrides(tiny_clip, one, train__batch_size=8, **common), nproc=1)

    into_ds = resume_copy(one, tmp_path / "into-ds", step=2)
    launch(["--resume", *overrides(tiny_clip, into_ds, train__batch_size=4, **common)], nproc=2)
    for step in (3, 4):  # ZeRO's steps: same weights and the same AdamW state as one process
        assert_same_checkpoint(one / f"checkpoints/step-000000{step}", into_ds / f"checkpoints/step-000000{step}")
    assert len((into_ds / "metrics.jsonl").read_text().splitlines()) == 4  # steps 3, 4 logged once (rank 0)

    out_of_ds = resume_copy(into_ds, tmp_path / "out-of-ds", step=3)
    launch(["--resume", *overrides(tiny_clip, out_of_ds, train__batch_size=8, **common)], nproc=1)
    assert_same_checkpoint(one / "checkpoints/step-0000004", out_of_ds / "checkpoints/step-0000004")


POISONED_RUN = """
import sys
import pytest
sys.path.insert(0, {tests!r})
from test_reliability_faults import poison
from genhancer.cli import main
poison(pytest.MonkeyPatch(), nan_loss={{1}}, inf_grad={{3}})
sys.exit(main({argv!r}))
"""


@pytest.mark.slow
def test_zero2_skips_non_finite_steps_like_ddp(tiny_clip, overrides, tmp_path):
    pytest.importorskip("deepspeed")
    from test_reliability_faults import ckpt, same

    run = tmp_path / "run"
    argv = ["train", *overrides(tiny_clip, run, steps=5, train__save_every=1, train__keep_last=10, optim__lr=1e-2)]
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED_RUN.format(tests=str(Path(__file__).parent), argv=argv))
    extensions = tmp_path / "torch-extensions"  # where DeepSpeed would compile its C++ ops
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    # its shared-memory all-reduce (inference only) is not compiled at start-up: 40 s and a compiler on a CPU
    assert not extensions.exists() and "shm_comm" not in out + proc.stderr
    assert "DeepSpeed ZeRO-2: optimizer states and gradients sharded over 1 processes" in out
    assert "step 2: non-finite loss, update skipped" in out and "step 4: non-finite gradient, update skipped" in out
    assert same(ckpt(run, 1), ckpt(run, 2)) and same(ckpt(run, 3), ckpt(run, 4))  # no update, Adam state too
    assert not same(ckpt(run, 2), ckpt(run, 3)) and not same(ckpt(run, 4), ckpt(run, 5))
    assert json.loads((ckpt(run, 5) / "state.json").read_text())["counters"] == {"nonfinite": 0, "skipped_steps": 2}
