"""The real entry point on tiny models: stage 1 -> stage 2 -> export -> load, reconstruct and info."""

import json
import subprocess
import sys

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

from genhancer.cli import main


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_stages_then_export_loads_as_clip(tiny_clip, overrides, tmp_path):
    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "export"
    assert main(["train", *overrides(tiny_clip, s1, steps=16, optim__lr=3e-3)]) == 0
    curve = losses(s1)
    assert sum(curve[-4:]) / 4 < 0.8 * sum(curve[:4]) / 4  # stage 1 learns to reconstruct
    assert main(["train", *overrides(tiny_clip, s2, stage="stage2", steps=3, stage__init_from=s1,
                                     optim__lr=1e-3)]) == 0
    assert main(["export", str(s2), str(out)]) == 0

    base, enhanced = CLIPModel.from_pretrained(tiny_clip), CLIPModel.from_pretrained(out)
    base_sd, new_sd = base.state_dict(), enhanced.state_dict()
    assert base_sd.keys() == new_sd.keys()
    vision = [k for k in base_sd if k.startswith("vision_model.")]
    assert any(not torch.equal(base_sd[k], new_sd[k]) for k in vision)
    assert all(torch.equal(base_sd[k], new_sd[k]) for k in base_sd if k not in vision)  # text tower, projections
    assert CLIPImageProcessor.from_pretrained(out).crop_size["height"] == 32
    # LLaVA's vision-tower loader: CLIPVisionModel + CLIPImageProcessor from the same folder
    tower = CLIPVisionModel.from_pretrained(out).state_dict()  # its key prefix differs across transformers versions
    for key in vision:
        loaded = next(v for k, v in tower.items() if key.endswith(k))
        torch.testing.assert_close(loaded, new_sd[key])
    card = (out / "README.md").read_text()
    assert "stage2" in card and "LoRA r=16" in card and tiny_clip.name in card and str(tiny_clip) not in card


def test_export_equals_lora_merged_by_hand(tiny_clip, overrides, tmp_path):
    """The merged weights are W + (alpha / r) B A, computed here from the checkpoint's LoRA tensors."""
    from safetensors.torch import load_file

    from genhancer.checkpoint import latest_checkpoint

    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "export"
    main(["train", *overrides(tiny_clip, s1, steps=2)])
    main(["train", *overrides(tiny_clip, s2, stage="stage2", steps=2, stage__init_from=s1, optim__lr=1e-2,
                              stage__lora_r=4, stage__lora_alpha=8)])
    main(["export", str(s2), str(out)])
    w = load_file(str(latest_checkpoint(s2) / "weights.safetensors"))
    prefix = "backbone.model.vision_model.base_model.model.encoder.layers.0.self_attn.q_proj"
    a, b = w[f"{prefix}.lora_A.default.weight"], w[f"{prefix}.lora_B.default.weight"]
    base = CLIPModel.from_pretrained(tiny_clip).vision_model.encoder.layers[0].self_attn.q_proj.weight
    merged = CLIPModel.from_pretrained(out).vision_model.encoder.layers[0].self_attn.q_proj.weight
    assert b.abs().sum() > 0
    torch.testing.assert_close(merged, base + (8 / 4) * b @ a)


def test_reconstruct_writes_an_input_reconstruction_grid(tiny_clip, overrides, tmp_path):
    run, images = tmp_path / "s1", tmp_path / "images"
    main(["train", *overrides(tiny_clip, run, steps=2)])
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 36), (80 * i, 20, 200)).save(images / f"{i}.png")
    out = tmp_path / "grid.png"
    assert main(["reconstruct", str(run), "--images", str(images), "--out", str(out), "-n", "3", "--steps", "2"]) == 0
    w, h = Image.open(out).size
    assert (w, h) == (2 * 32 + 3 * 2, 3 * 32 + 4 * 2)  # two columns (input | reconstruction), three rows


def test_console_script_info_prints_the_papers_counts():
    out = subprocess.run([sys.executable, "-m", "genhancer", "info", "--denoiser", "flux-paper",
                          "--backbone", "openai-clip-vit-l-14-224"], capture_output=True, text=True, check=True).stdout
    assert "1,310,154,816" in out and "427,616,513" in out


def test_compiled_run_writes_the_same_checkpoint_names(tiny_clip, overrides, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    compile_module = torch.nn.Module.compile  # the eager backend: same wrapping, no minutes of C++ code generation
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager"))
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    main(["train", *overrides(tiny_clip, plain, steps=1)])
    main(["train", *overrides(tiny_clip, compiled, steps=1, train__compile="true")])
    a = load_file(str(plain / "checkpoints/step-0000001/weights.safetensors"))
    b = load_file(str(compiled / "checkpoints/step-0000001/weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
