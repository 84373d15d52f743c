"""A generated set where a pattern in one quadrant decides the class, and a head trained on it: to check where
explanation maps look, and to draw the README's example without downloading weights.

Class 0 is vertical stripes, class 1 a checkerboard, each filling one random quadrant of an image of noise
(already normalised: the model's input). :func:`fit_head` trains only ``fc`` of a model on the pooled
features of its frozen backbone (a linear probe): a few hundred Adam steps on a tensor, under a second.
Shared by ``tests/models/test_explain.py`` and the picture's script::

    python -m tools.quadrant_patterns docs/explain-example.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

CLASSES = ("stripes", "checkerboard")


def quadrant_batch(count: int, size: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(images (count, 3, size, size), classes (count,), quadrants (count,))``; quadrants: 0 top left, 1 top
    right, 2 bottom left, 3 bottom right. Classes alternate; the quadrants are random (seeded)."""
    rng = np.random.default_rng(seed)
    half = size // 2
    rows, cols = np.mgrid[0:half, 0:half]
    period = max(2, size // 16)
    patterns = (
        np.sign(np.sin(cols * np.pi / period) + 1e-9),
        np.sign(np.sin(cols * np.pi / period) + 1e-9) * np.sign(np.sin(rows * np.pi / period) + 1e-9),
    )
    images, classes, quadrants = [], [], []
    for index in range(count):
        image = rng.normal(0.0, 0.3, (3, size, size)).astype(np.float32)
        label, quadrant = index % 2, int(rng.integers(4))
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        image[:, top : top + half, left : left + half] += 1.5 * patterns[label].astype(np.float32)
        images.append(image)
        classes.append(label)
        quadrants.append(quadrant)
    return torch.from_numpy(np.stack(images)), torch.tensor(classes), torch.tensor(quadrants)


def quadrant_mass(maps: Tensor, quadrants: Tensor) -> Tensor:
    """The share of each map's total in its quadrant (maps ``(N, H, W)`` with even H and W)."""
    half_h, half_w = maps.shape[1] // 2, maps.shape[2] // 2
    shares = []
    for cam, quadrant in zip(maps, quadrants.tolist()):
        top, left = (quadrant // 2) * half_h, (quadrant % 2) * half_w
        shares.append(cam[top : top + half_h, left : left + half_w].sum() / cam.sum().clamp_min(1e-12))
    return torch.stack(shares)


def fit_head(model: nn.Module, images: Tensor, classes: Tensor, *, steps: int = 300, lr: float = 0.01) -> None:
    """Train ``model.fc`` (a Linear) on the pooled features of ``images`` (the backbone stays as it is)."""
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model.fc(pooled), classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def as_photo(image: Tensor) -> Image.Image:
    """A normalised image ``(3, H, W)`` as an 8-bit RGB picture (for people; values scaled to the range)."""
    values = image.permute(1, 2, 0).numpy()
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    return Image.fromarray((values * 255).round().astype(np.uint8), "RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the README's explanation example (random backbone, probe)")
    parser.add_argument("output", type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    from resnext_hub.models import build_model
    from resnext_hub.processing.atomic import staged
    from resnext_hub.processing.overlay import overlay
    from resnext_hub.processing.presets import ImageClassification

    torch.manual_seed(0)
    model = build_model("seresnext26d_32x4d", pretrained=False, num_classes=len(CLASSES)).eval()
    images, classes, _ = quadrant_batch(32, 128, seed=0)
    fit_head(model, images, classes)
    shown, shown_classes, quadrants = quadrant_batch(4, 128, seed=3)
    maps = model.explain(shown, shown_classes)
    # The images are the model's input as they are: a preset that neither resizes nor crops them.
    identity = ImageClassification(128, 128, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    tiles = [
        overlay(as_photo(image), cam, identity).resize((192, 192), Image.NEAREST) for image, cam in zip(shown, maps)
    ]
    pairs = [as_photo(image).resize((192, 192), Image.NEAREST) for image in shown]
    gap = 8
    sheet = Image.new("RGB", ((192 + gap) * len(tiles) - gap, 384 + gap), "white")
    for index, (photo, tile) in enumerate(zip(pairs, tiles)):
        sheet.paste(photo, ((192 + gap) * index, 0))
        sheet.paste(tile, ((192 + gap) * index, 192 + gap))
    with staged(args.output) as staging:  # 256 colours: a small file for the README
        sheet.quantize(256, dither=Image.Dither.NONE).save(staging, format="PNG", optimize=True)
    names = ", ".join(f"{CLASSES[c]} in quadrant {q}" for c, q in zip(shown_classes.tolist(), quadrants.tolist()))
    print(f"wrote {args.output}: {names}")


if __name__ == "__main__":
    main()
