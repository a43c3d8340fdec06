import pytest
import torch
from transformers import CLIPModel, SiglipModel

from genhancer.backbones import BACKBONES, VisionBackbone, build_backbone, build_from_config, vision_linear_names
from genhancer.config import ConfigError, ModelConfig
from genhancer.enhancer import select_condition

PAPER_TABLE_1 = {  # whole-model parameters in millions, as printed in the paper
    "openai-clip-vit-l-14-224": 427.6, "openai-clip-vit-l-14-336": 427.9, "metaclip-vit-l-14-224": 427.6,
    "metaclip-vit-h-14-224": 986.1, "siglip-so400m-14-224": 877.4, "siglip-so400m-14-384": 878.0,
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE_1))
def test_registered_backbones_match_table_1(name):
    with torch.device("meta"):
        model = build_from_config(BACKBONES[name].config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == PAPER_TABLE_1[name]


def test_clip_condition_is_projected_class_token(tiny_clip):
    bb = build_backbone(ModelConfig(backbone=str(tiny_clip)))
    ref = CLIPModel.from_pretrained(tiny_clip).eval()
    images = torch.rand(3, 3, 32, 32)
    x = (images - bb.mean) / bb.std
    with torch.no_grad():
        expected = ref.visual_projection(ref.vision_model(pixel_values=x).pooler_output)
        cond = bb.eval()(images)
    assert cond.shape == (3, 1, bb.cond_dim) == (3, 1, 16)
    torch.testing.assert_close(cond[:, 0], expected)


def test_siglip_condition_is_pooler_output(tiny_siglip):
    bb = build_backbone(ModelConfig(backbone=str(tiny_siglip))).eval()
    ref = SiglipModel.from_pretrained(tiny_siglip).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.vision_model(pixel_values=(images - 0.5) / 0.5).pooler_output
        cond = bb(images)
    torch.testing.assert_close(cond[:, 0], expected)


def test_local_tokens_are_the_chosen_patches_in_condition_space(tiny_clip):
    bb = build_backbone(ModelConfig(backbone=str(tiny_clip))).eval()
    images = torch.rand(2, 3, 32, 32)
    index = torch.tensor([[0, 5], [15, 3]])
    with torch.no_grad():
        tokens = bb(images, local=True)  # the global token, then every patch token
        cond = select_condition(tokens, index)
        out = bb.vision(pixel_values=(images - bb.mean) / bb.std)
        all_local = bb.model.visual_projection(bb.vision.post_layernorm(out.last_hidden_state[:, 1:]))
    assert cond.shape == (2, 3, 16) and bb.num_patches == 16 and tokens.shape == (2, 17, 16)
    torch.testing.assert_close(tokens[:, 1:], all_local)
    torch.testing.assert_close(cond[1, 1], all_local[1, 15])
    torch.testing.assert_close(cond[0, 2], all_local[0, 5])


def test_lora_targets_every_linear_of_the_vision_encoder(tiny_clip):
    bb = build_backbone(ModelConfig(backbone=str(tiny_clip)))
    names = vision_linear_names(bb)
    assert len(names) == 2 * 6 and all(n.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} for n in names)


def test_wrong_image_size_and_missing_weights(tiny_clip, tmp_path):
    bb = build_backbone(ModelConfig(backbone=str(tiny_clip)))
    with pytest.raises(ConfigError, match="takes 32px"):
        bb.check_image_size(64)
    with pytest.raises(ConfigError, match="neither a local folder nor in the Hugging Face cache"):
        build_backbone(ModelConfig(backbone="openai-clip-vit-l-14-224"))
    with pytest.raises(ConfigError, match="no config.json"):
        build_backbone(ModelConfig(backbone=str(tmp_path)))
    with torch.device("meta"):
        siglip = VisionBackbone(build_from_config(BACKBONES["siglip-so400m-14-224"].config))
    assert (siglip.cond_dim, siglip.image_size, siglip.num_patches) == (1152, 224, 256)
