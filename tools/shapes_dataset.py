"""A generated image set where SHAPE decides the class: circles, squares and triangles.

Colours (shape and background), sizes and positions are random (squares and triangles stand
upright, tilted up to 15 degrees, and have the circle's area), so only the shape tells the classes
apart; every file is seeded, so the same arguments give the same set. Images are written in the
ImageFolder layout ``finetune`` reads (``train/<class>/...``, ``val/<class>/...``), alternately
as PNG and JPEG. ``colour_coded=True`` paints each shape in its class's colour: an easy variant
for quick tests. Shared by the fine-tuning tests and ``benchmarks.finetune_shapes``.
:func:`write_multilabel_shapes` writes a multi-label set instead: each image holds any of the three shapes
(each in its class's colour, in a quadrant of its own), listed in ``train.csv`` / ``val.csv`` as
``finetune --multi-label`` reads them::

    python -m tools.shapes_dataset OUT [--train 150] [--val 50] [--size 80] [--seed 0] [--colour-coded]
    python -m tools.shapes_dataset OUT --multi-label [--train 150] [--val 50] [--size 80] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
_SUPERSAMPLE = 4  # drawn this many times larger, then downsampled: antialiased edges
_MIN_CONTRAST = 150  # summed |R|+|G|+|B| difference between shape and background
_MARGIN = 0.07  # of the side: clear of the border a center crop removes (crop_pct 0.875: 6.25% per side)
# Circumradius per shape for the area of a square of circumradius 1: size says nothing about the class.
_TILT = 15  # degrees
_EXTENT = {"circle": 0.8, "square": 1.0, "triangle": 1.24}
# With colour_coded=True: the shape's colour per class (an easy set, learned from random weights in a few steps).
_CODED = {"circle": (220, 40, 40), "square": (40, 200, 40), "triangle": (40, 60, 230)}


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _contrasting(rng: random.Random, other: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        colour = _colour(rng)
        if sum(abs(a - b) for a, b in zip(colour, other)) >= _MIN_CONTRAST:
            return colour


def draw_shape(shape: str, size: int, rng: random.Random, *, colour_coded: bool = False) -> Image.Image:
    """One RGB image ``size`` x ``size`` of ``shape`` (one of :data:`CLASSES`) on a random background.

    ``colour_coded``: the shape has its class's colour on a grey background (colour decides too).
    """
    if shape not in CLASSES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {CLASSES}")
    big = size * _SUPERSAMPLE
    background = (rng.randrange(60, 200),) * 3 if colour_coded else _colour(rng)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.24, 0.34) * big * _EXTENT[shape]
    margin = radius + _MARGIN * big
    cx, cy = (rng.uniform(margin, big - margin) for _ in range(2))
    fill = _CODED[shape] if colour_coded else _contrasting(rng, background)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        corners = 4 if shape == "square" else 3
        # Upright (a square's sides, a triangle's base horizontal) within +-_TILT: orientation is not the class.
        angle = (math.pi / 4 if corners == 4 else -math.pi / 2) + math.radians(rng.uniform(-_TILT, _TILT))
        turns = [angle + 2 * math.pi * i / corners for i in range(corners)]
        draw.polygon([(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in turns], fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def write_shapes_dataset(
    root: str | Path, *, train: int = 150, val: int = 50, size: int = 80, seed: int = 0, colour_coded: bool = False
) -> Path:
    """``root/train/<shape>/`` and ``root/val/<shape>/`` with ``train`` / ``val`` images per class."""
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        for label, shape in enumerate(CLASSES):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # One generator per file: a file does not depend on how many others were written.
                rng = random.Random(f"{seed}/{split}/{shape}/{i}")
                image = draw_shape(shape, size, rng, colour_coded=colour_coded)
                name = folder / f"{shape}_{i:04d}.{'png' if (i + label) % 2 else 'jpg'}"
                image.save(name, **({"quality": 92} if name.suffix == ".jpg" else {}))
    return root


def draw_shapes(shapes: tuple[str, ...], size: int, rng: random.Random) -> Image.Image:
    """One RGB image holding each of ``shapes`` (colour-coded, in a random quadrant each) on a grey background."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), (rng.randrange(60, 200),) * 3)
    draw = ImageDraw.Draw(image)
    half = big / 2
    for shape, quadrant in zip(shapes, rng.sample(range(4), len(shapes))):
        radius = rng.uniform(0.13, 0.17) * big * _EXTENT[shape] / _EXTENT["triangle"]
        cx = (quadrant % 2) * half + half / 2 + rng.uniform(-0.05, 0.05) * big
        cy = (quadrant // 2) * half + half / 2 + rng.uniform(-0.05, 0.05) * big
        if shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=_CODED[shape])
        else:
            corners = 4 if shape == "square" else 3
            angle = math.pi / 4 if corners == 4 else -math.pi / 2
            turns = [angle + 2 * math.pi * i / corners for i in range(corners)]
            draw.polygon([(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in turns], fill=_CODED[shape])
    return image.resize((size, size), Image.LANCZOS)


def write_multilabel_shapes(root: str | Path, *, train: int = 60, val: int = 20, size: int = 64, seed: int = 0) -> Path:
    """``root/images/`` of images holding any subset of :data:`CLASSES` (none included), and ``root/train.csv``,
    ``root/val.csv`` listing them as ``path,labels`` (labels separated by ``;``), with the header line."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        lines = ["path,labels"]
        for i in range(count):
            rng = random.Random(f"{seed}/multi/{split}/{i}")
            shapes = tuple(shape for shape in CLASSES if rng.random() < 0.5)
            name = f"images/{split}_{i:04d}.png"
            draw_shapes(shapes, size, rng).save(root / name)
            lines.append(f"{name},{';'.join(shapes)}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output folder (train/ and val/ are created in it)")
    parser.add_argument("--train", type=int, default=150, help="training images per class")
    parser.add_argument("--val", type=int, default=50, help="validation images per class")
    parser.add_argument("--size", type=int, default=80, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colour-coded", action="store_true", help="each shape in its class's colour (an easy set)")
    parser.add_argument(
        "--multi-label",
        action="store_true",
        help="images/ holding any of the shapes, train.csv and val.csv (--train/--val: images per split)",
    )
    args = parser.parse_args()
    if args.multi_label:
        root = write_multilabel_shapes(args.root, train=args.train, val=args.val, size=args.size, seed=args.seed)
        print(f"{root}: {args.train} + {args.val} images holding any of {', '.join(CLASSES)}; train.csv, val.csv")
        return
    root = write_shapes_dataset(
        args.root, train=args.train, val=args.val, size=args.size, seed=args.seed, colour_coded=args.colour_coded
    )
    print(f"{root}: {len(CLASSES)} classes, {args.train} + {args.val} images each")


if __name__ == "__main__":
    main()
