"""Contrastive pretraining of the tiny base CLIP on the world's images and weak captions.

Captions are drawn afresh every step: the objects are always named, each fine attribute only with probability
``p``. The result is a ``save_pretrained`` folder (model, tokenizer, processor) plus ``pretrain.json`` with the
arguments and the loss curve.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genhancer.miniworld.base import new_base
from genhancer.miniworld.scenes import SPLITS, caption, render_many, scene_from_seed


def pretrain(out_dir: str | Path, steps: int = 400, batch_size: int = 64, num_images: int = 3000,
             p: float | None = None, lr: float = 5e-4, seed: int = 0, image_size: int = 64) -> Path:
    """Pretrain a tiny CLIP from scratch and save it with its tokenizer and processor in ``out_dir``."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, tokenizer, processor = new_base(out, image_size)
    scenes = [scene_from_seed(SPLITS["train"] + i) for i in tqdm(range(num_images), desc="render", disable=False, mininterval=5)]
    pixels = torch.from_numpy(render_many(scenes, image_size)).permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses, start = [], time.time()
    for step in (bar := tqdm(range(steps), desc="pretrain", disable=False, mininterval=5)):
        idx = rng.choice(num_images, batch_size, replace=False)
        texts = [caption(scenes[i], rng, p) for i in idx]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        images = (pixels[idx].float() / 255 - mean) / std
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=images,
                     return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    model.save_pretrained(out)
    args = dict(steps=steps, batch_size=batch_size, num_images=num_images, p=p, lr=lr, seed=seed, image_size=image_size)
    (out / "pretrain.json").write_text(json.dumps({"args": args, "seconds": round(time.time() - start),
                                                   "loss": losses}) + "\n")
    return out
