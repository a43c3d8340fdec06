"""VQ tokenizer: VQSpace shapes, train-vq, convert-vqgan against a reference taming-transformers implementation."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genhancer import vq as V
from genhancer.config import ConfigError, ModelConfig
from genhancer.latents import VQSpace, build_latent_space


# --- a minimal re-implementation of taming-transformers' VQGAN, with its parameter names ------------------------

def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = x.shape
        q, k, v = (m(h).flatten(2) for m in (self.q, self.k, self.v))
        w = torch.softmax(q.transpose(1, 2) @ k * C ** -0.5, dim=-1)  # (B, HW, HW)
        return x + self.proj_out((v @ w.transpose(1, 2)).view(B, C, H, W))


class _Level(nn.Module):
    def __init__(self, blocks, attn, resample):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(_Attn(b.conv2.out_channels) for b in blocks) if attn else nn.ModuleList()
        self.resample = resample

    def forward(self, x):
        for i, b in enumerate(self.block):
            x = b(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class _Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = _Res(c, c), _Attn(c), _Res(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Taming(nn.Module):
    """ch_mult levels, n res blocks per level, attention at the lowest resolution; z = embed dim."""

    def __init__(self, ch=32, mult=(1, 2), n=1, z=32, codes=16):
        super().__init__()
        chs = [ch * m for m in mult]
        enc, dec = nn.Module(), nn.Module()
        enc.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        enc.down = nn.ModuleList()
        cin = ch
        for i, c in enumerate(chs):
            lvl = _Level([_Res(cin if j == 0 else c, c) for j in range(n)], i == len(chs) - 1, None)
            if i != len(chs) - 1:
                lvl.downsample = nn.Module()
                lvl.downsample.conv = nn.Conv2d(c, c, 3, stride=2)
            enc.down.append(lvl)
            cin = c
        enc.mid, enc.norm_out, enc.conv_out = _Mid(cin), _norm(cin), nn.Conv2d(cin, z, 3, padding=1)
        dec.conv_in, dec.mid = nn.Conv2d(z, cin, 3, padding=1), _Mid(cin)
        dec.up = nn.ModuleList([None] * len(chs))
        for i in reversed(range(len(chs))):
            c = chs[i]
            lvl = _Level([_Res(cin if j == 0 else c, c) for j in range(n + 1)], i == len(chs) - 1, None)
            if i != 0:
                lvl.upsample = nn.Module()
                lvl.upsample.conv = nn.Conv2d(c, c, 3, padding=1)
            dec.up[i] = lvl
            cin = c
        dec.norm_out, dec.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)
        self.encoder, self.decoder = enc, dec
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z, z, 1), nn.Conv2d(z, z, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codes, z)

    def encode(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for lvl in e.down:
            h = lvl(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = e.conv_out(F.silu(e.norm_out(e.mid(h))))
        return self.quant_conv(h)

    def decode(self, zq):
        d = self.decoder
        h = d.mid(d.conv_in(self.post_quant_conv(zq)))
        for lvl in reversed(d.up):
            h = lvl(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return d.conv_out(F.silu(d.norm_out(h)))


def _taming_state_dict(seed=0):
    torch.manual_seed(seed)
    ref = _Taming()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norms and biases so that a wrong mapping shows
            p.add_(0.05 * torch.randn_like(p))
    sd = dict(ref.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # training-only weights are dropped
    return ref.eval(), sd


def test_convert_vqgan_matches_reference(tmp_path):
    ref, sd = _taming_state_dict()
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "last.ckpt")
    V.convert_vqgan(str(tmp_path / "last.ckpt"), str(tmp_path / "vq"))
    space = VQSpace.from_pretrained(str(tmp_path / "vq"))
    assert (space.codebook_size, space.downsample) == (16, 2)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(x)
        assert torch.allclose(space.vq.encode(x).latents, z_ref, atol=1e-5)
        codes = space.encode(x)
        flat = z_ref.permute(0, 2, 3, 1).reshape(-1, 32)
        assert torch.equal(codes.flatten(), torch.cdist(flat, ref.quantize.embedding.weight).argmin(1))
        zq = ref.quantize.embedding(codes).permute(0, 3, 1, 2)
        assert torch.allclose(space.vq.decode(zq, force_not_quantize=True).sample, ref.decode(zq), atol=1e-5)


def test_convert_maps_every_key_and_round_trips_weights():
    _, sd = _taming_state_dict()
    vq = V.convert_vqgan(sd)
    mapped = V.taming_to_diffusers(sd, 2)
    assert set(mapped) == set(vq.state_dict())  # every key mapped, none left over
    own = vq.state_dict()
    for key, value in sd.items():
        if key.startswith("loss."):
            continue
        new = V._rename(key, 2)
        assert torch.equal(own[new].reshape(value.shape), value), key


@pytest.mark.parametrize("codes", [1024, 16384])
def test_shipped_f16_configs_are_taming_f16(codes):
    """A taming f16 VQGAN (ch 128, ch_mult 1,1,2,2,4, 2 blocks, attention at 16x16) maps onto the shipped config
    key for key and shape for shape (meta device: no memory)."""
    from diffusers import VQModel

    with torch.device("meta"):
        sd = _Taming(ch=128, mult=(1, 1, 2, 2, 4), n=2, z=256, codes=codes).state_dict()
        cfg = V.vq_config(f"f16-{codes}")
        own = VQModel.from_config(cfg).state_dict()
    assert V.taming_config(sd) == cfg
    mapped = V.taming_to_diffusers(sd, 5)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in own.items()}


def test_convert_rejects_wrong_codebook_and_foreign_checkpoints(tmp_path):
    _, sd = _taming_state_dict()
    with pytest.raises(ConfigError, match="num_vq_embeddings=16 but 'f16-1024' expects 1024"):
        V.convert_vqgan(sd, expect="f16-1024")
    with pytest.raises(ConfigError, match="not a taming-transformers VQGAN"):
        V.convert_vqgan({"model.weight": torch.zeros(1), "encoder.down.0.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="not found"):
        V.convert_vqgan(str(tmp_path / "missing.ckpt"))


def test_vq_space_shapes_and_image_size(tmp_path):
    space = build_latent_space(ModelConfig(latent="vq", random_init=True))
    assert space.kind == "discrete" and space.codebook_size == 256 and space.downsample == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = space.encode(x)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert space.target_shape(16) == (4, 4)
    img = space.decode(codes)
    assert img.shape == (2, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    with pytest.raises(ConfigError, match="not divisible"):
        space.target_shape(18)
    with pytest.raises(ConfigError, match="model.latent_path"):
        build_latent_space(ModelConfig(latent="vq"))
    with pytest.raises(ConfigError, match="could not be loaded offline"):
        build_latent_space(ModelConfig(latent="vq", latent_path=str(tmp_path)))


def test_train_vq_lowers_loss_and_reloads(tmp_path):
    images = V.synthetic_images(32, 16, torch.Generator().manual_seed(0))
    assert images.shape == (32, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    recon = lambda space: F.mse_loss(space.decode(space.encode(images)), images).item()  # noqa: E731
    # An even smaller f2 model than "tiny" keeps this fast on a shared CPU.
    cfg = {**V.vq_config("tiny"), "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "num_vq_embeddings": 64}
    before, _ = V.train_vq(images, config=cfg, steps=0, batch_size=8)  # the same seeded initialisation, untrained
    space, losses = V.train_vq(images, str(tmp_path / "vq"), config=cfg, steps=40, batch_size=8, lr=3e-3)
    assert len(losses) == 40 and recon(space) < 0.8 * recon(before)
    loaded = build_latent_space(ModelConfig(latent="vq", latent_path=str(tmp_path / "vq")))
    assert torch.equal(loaded.encode(images[:2]), space.encode(images[:2]))


def test_cli_commands(tmp_path):
    from PIL import Image

    from genhancer.cli import vq as cli

    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(dest="command"))
    for i in range(4):
        Image.new("RGB", (20, 18), (60 * i, 10, 200 - 40 * i)).save(tmp_path / f"{i}.png")
    args = parser.parse_args(["train-vq", "--images", str(tmp_path), "--size", "16", "--steps", "2",
                              "--batch-size", "2", "--out", str(tmp_path / "vq")])
    assert args.func(args) == 0 and (tmp_path / "vq" / "config.json").is_file()
    _, sd = _taming_state_dict()
    torch.save(sd, tmp_path / "model.pt")
    args = parser.parse_args(["convert-vqgan", str(tmp_path / "model.pt"), "--out", str(tmp_path / "conv")])
    assert args.func(args) == 0 and (tmp_path / "conv" / "config.json").is_file()
    args = parser.parse_args(["train-vq", "--images", str(tmp_path / "conv"), "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="no images"):
        args.func(args)
    args = parser.parse_args(["train-vq", "--synthetic", "4", "--size", "18", "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="not divisible"):
        args.func(args)
