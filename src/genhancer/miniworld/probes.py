"""Text-free probes of a vision encoder's global embedding, on held-out "probe" seeds.

- linear probe: per attribute, a multinomial logistic regression on the frozen, standardised global embedding
  (CLIP ``image_embeds``), trained on ``n_train`` scenes and scored on ``n_test`` others (accuracy, %);
- blind pairs: per attribute, triplets (scene, the scene with that attribute changed, the scene with only its
  nuisance factors redrawn); a pair is told apart when the attribute change moves the embedding further (cosine)
  than the nuisance change does (%, higher is better).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPModel

from genhancer.miniworld.scenes import ATTRIBUTES, SPLITS, render_many, sample_nuisance, scene_from_seed
from genhancer.miniworld.benchmark import make_pair


@torch.no_grad()
def embed(model: CLIPModel, processor: CLIPImageProcessor, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """``(N, S, S, 3)`` uint8 -> ``(N, D)`` global image embeddings (the processor's normalisation, no resize)."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255
        feats = model.get_image_features(pixel_values=(x - mean) / std)
        out.append(feats if isinstance(feats, torch.Tensor) else feats.pooler_output)
    return torch.cat(out).float()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, weight_decay: float = 1e-3) -> float:
    """Test accuracy (%) of a full-batch L-BFGS logistic regression on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    torch.manual_seed(0)
    linear = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(a), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(b).argmax(1) == test_y).float().mean() * 100)


def run_probes(model_dirs: list[str | Path], n_train: int = 2000, n_test: int = 1000, n_pairs: int = 200,
               size: int = 64, split: str = "probe", first_seed: int | None = None
               ) -> list[dict[str, dict[str, float]]]:
    """Per model: ``{"linear": {attribute: acc}, "blind_pairs": {attribute: acc}}``, each with an ``"average"``.

    The scenes (of ``split``: "probe" for reported numbers, "val" for tuning; or from ``first_seed`` on, a fresh draw
    when at or above ``scenes.FRESH``) are rendered once and shared by all models.
    """
    first = SPLITS[split] if first_seed is None else first_seed
    scenes = [scene_from_seed(first + i) for i in range(n_train + n_test)]
    images = render_many(scenes, size)
    triplets = []
    for c, attribute in enumerate(ATTRIBUTES):
        for i in range(n_pairs):
            seed = first + 1_000_000 + c * 100_000 + i
            scene, changed = make_pair(seed, attribute)
            triplets += [scene, changed, scene.with_(**sample_nuisance(np.random.default_rng([seed, 2])))]
    triplet_images = render_many(triplets, size)
    labels = {a: torch.tensor([s.labels[a] for s in scenes]) for a in ATTRIBUTES}
    results = []
    for model_dir in model_dirs:
        model = CLIPModel.from_pretrained(model_dir).eval()
        processor = CLIPImageProcessor.from_pretrained(model_dir)
        feats = embed(model, processor, images)
        linear = {a: linear_probe(feats[:n_train], y[:n_train], feats[n_train:], y[n_train:], len(ATTRIBUTES[a]))
                  for a, y in labels.items()}
        e = torch.nn.functional.normalize(embed(model, processor, triplet_images), dim=-1)
        e = e.view(len(ATTRIBUTES), n_pairs, 3, -1)
        told_apart = (e[:, :, 0] * e[:, :, 1]).sum(-1) < (e[:, :, 0] * e[:, :, 2]).sum(-1)
        blind = {a: float(told_apart[c].float().mean() * 100) for c, a in enumerate(ATTRIBUTES)}
        for table in (linear, blind):
            table["average"] = float(np.mean(list(table.values())))
        results.append({"linear": linear, "blind_pairs": blind})
    return results
