"""Exports the Hub and every client accept: the model card's metadata, --vision-only, permissions, no local paths."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_overrides
from eval_fixtures import make_mmvp, run_eval_cli
from transformers import (AutoImageProcessor, CLIPModel, CLIPVisionModelWithProjection, SiglipModel,
                          SiglipVisionModel)

from genhancer.cli import main
from genhancer.config import ModelConfig
from genhancer.modelcard import BIBTEX, PAPER_URL, front_matter, hub_id, model_card, source_license
from genhancer.recipes import load_recipe


def stage2_run(source: Path, root: Path) -> Path:
    s1, s2 = root / "s1", root / "s2"
    assert main(["train", *tiny_overrides(source, s1, steps=1)]) == 0
    assert main(["train", *tiny_overrides(source, s2, stage="stage2", steps=2, stage__init_from=s1,
                                          optim__lr=1e-2)]) == 0
    return s2


@pytest.fixture(scope="module")
def clip_run(tiny_clip, tmp_path_factory):
    """A stage-2 run on a copy of the tiny CLIP whose own model card declares a licence."""
    root = tmp_path_factory.mktemp("clip-run")
    source = root / "my-clip"
    shutil.copytree(tiny_clip, source)
    (source / "README.md").write_text("---\nlicense: cc-by-nc-4.0\ntags: [clip]\n---\n# my CLIP\n")
    return source, stage2_run(source, root)


@pytest.fixture(scope="module")
def siglip_run(tiny_siglip, tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip-run")
    return tiny_siglip, stage2_run(tiny_siglip, root)


def export(run: Path, out: Path, *flags: str) -> Path:
    assert main(["export", *flags, str(run), str(out)]) == 0
    return out


def pixels(size: int) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_card_metadata_parses_and_carries_the_licence(clip_run, tmp_path):
    _, run = clip_run
    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert card.startswith("---\n") and yaml.safe_load(card.split("---\n")[1]) == meta
    assert meta["license"] == "cc-by-nc-4.0"  # the source's own card
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert "clip" in meta["tags"] and "siglip" not in meta["tags"] and "genhancer" in meta["tags"]
    assert "base_model" not in meta  # a plain local folder has no hub id
    assert PAPER_URL in card and BIBTEX in card and "CLIPModel.from_pretrained(" in card
    assert "## Training recipe" in card and "stage2, LoRA r=16" in card and "# GenHancer-enhanced my-clip" in card


def test_no_local_path_in_the_export(clip_run, tmp_path):
    source, run = clip_run
    out = export(run, tmp_path / "export")
    info = json.loads((out / "genhancer.json").read_text())
    assert info["base_model"] == "my-clip" and info["step"] == 2 and info["checkpoint"] == "step-0000002"
    for name in ("README.md", "genhancer.json", "config.json"):
        text = (out / name).read_text()
        for local in (str(source.parent), str(tmp_path), str(Path.home()), os.getcwd()):
            assert local not in text, (name, local)


def test_every_exported_file_is_readable_like_the_card(clip_run, tmp_path):
    _, run = clip_run
    previous = os.umask(0o022)
    try:
        out = export(run, tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert "model.safetensors" in modes


def test_clip_vision_only_loads_with_its_class_and_matches_the_full_model(clip_run, tmp_path):
    _, run = clip_run
    full, tower = export(run, tmp_path / "full"), export(run, tmp_path / "tower", "--vision-only")
    x = pixels(32)
    with torch.no_grad():
        expected = CLIPModel.from_pretrained(full).get_image_features(pixel_values=x)
        expected = getattr(expected, "pooler_output", expected)  # a tensor before transformers 5
        got = CLIPVisionModelWithProjection.from_pretrained(tower)(pixel_values=x).image_embeds
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert AutoImageProcessor.from_pretrained(tower).crop_size["height"] == 32
    assert not (tower / "tokenizer_config.json").exists()
    meta = front_matter((tower / "README.md").read_text())
    assert meta["pipeline_tag"] == "image-feature-extraction" and "CLIPVisionModelWithProjection" in \
        (tower / "README.md").read_text()
    assert json.loads((tower / "genhancer.json").read_text())["vision_only"] is True


def test_siglip_export_is_tagged_siglip_and_its_vision_only_export_matches(siglip_run, tmp_path):
    _, run = siglip_run
    full, tower = export(run, tmp_path / "full"), export(run, tmp_path / "tower", "--vision-only")
    meta = front_matter((full / "README.md").read_text())
    assert "siglip" in meta["tags"] and "clip" not in meta["tags"]
    x = pixels(32)
    with torch.no_grad():
        expected = SiglipModel.from_pretrained(full).vision_model(pixel_values=x).pooler_output
        got = SiglipVisionModel.from_pretrained(tower)(pixel_values=x).pooler_output
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert AutoImageProcessor.from_pretrained(tower).size["height"] == 32


def test_base_model_is_the_hub_id_for_the_readmes_recipe():
    cfg = load_recipe("openai-clip-vit-l-14-224-stage2", ["model.weights=/models/clip-vit-large-patch14"],
                      check=False)
    card = model_card(cfg, 10, "clip", "CLIPModel", source_license(cfg.model, None), False, True)
    meta = front_matter(card)
    assert meta["base_model"] == "openai/clip-vit-large-patch14" and "/models" not in card
    metaclip = load_recipe("metaclip-vit-l-14-224-stage2", [], check=False)
    assert source_license(metaclip.model, None) == {"license": "cc-by-nc-4.0"}  # MetaCLIP is non-commercial
    siglip = load_recipe("siglip-so400m-14-384-stage2", [], check=False)
    assert front_matter(model_card(siglip, 1, "siglip", "SiglipModel", source_license(siglip.model, None), False,
                                   True))["license"] == "apache-2.0"


def test_the_card_states_the_timestep_draw_and_a_uniform_share_only_when_there_is_one():
    from genhancer.modelcard import recipe_table

    cfg = load_recipe("openai-clip-vit-l-14-224-stage2", [], check=False)
    assert "| objective | timesteps logit-normal (m=0.0, s=1.0) |" in recipe_table(cfg, 10)
    cfg.objective.uniform_share = 0.25
    assert "| objective | timesteps logit-normal (m=0.0, s=1.0), 0.25 of them uniform |" in recipe_table(cfg, 10)


def test_base_model_names_the_weights_actually_given():
    # MetaCLIP's ViT-L/14 has the OpenAI preset's architecture: its hub id, not the preset's, is the base model
    cfg = load_recipe("openai-clip-vit-l-14-224-stage2", ["model.weights=facebook/metaclip-l14-fullcc2.5b"],
                      check=False)
    assert hub_id(cfg.model) == "facebook/metaclip-l14-fullcc2.5b"
    assert hub_id(load_recipe("openai-clip-vit-l-14-224-stage2", [], check=False).model) == \
        "openai/clip-vit-large-patch14"


@pytest.mark.parametrize("source, expected", [
    ("/root/.cache/huggingface/hub/models--openai--clip-vit-base-patch32/snapshots/3d74acf9",
     "openai/clip-vit-base-patch32"),
    ("google/siglip-base-patch16-224", "google/siglip-base-patch16-224"),
    ("/models/my-clip", None),
])
def test_hub_id_of_a_folder_source(source, expected):
    assert hub_id(ModelConfig(backbone=source)) == expected


def test_eval_compare_puts_its_results_into_the_card_once(clip_run, tmp_path):
    source, run = clip_run
    out = export(run, tmp_path / "export")
    bench = make_mmvp(tmp_path / "mmvp")
    for _ in range(2):
        run_eval_cli(["eval", "compare", str(source), str(out), "--mmvp", str(bench), "--out", str(tmp_path / "r"),
                      "--device", "cpu"])
    card = (out / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and card.index("## Evaluation") < card.index("## Citation")
    assert "| Original |" in card and "| Ours |" in card and "against `my-clip`" in card
    assert str(tmp_path) not in card and "mmvp_radar.png" not in card
    assert yaml.safe_load(card.split("---\n")[1])["library_name"] == "transformers"
