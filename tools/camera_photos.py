"""Generated camera-like photos: the bundled photos upscaled, with sensor-like noise, saved as JPEG.

A phone's photo is 4032x3024 pixels, JPEG quality ~90 with 4:2:0 chroma, often with an EXIF
orientation. These stand in for such photos where the real ones cannot be shipped: the content
is one of ``assets/images`` (upscaled bicubic, so smooth), the fine detail is Gaussian noise (the
hardest case for decoding at reduced scale, which drops high frequencies first). Seeded: the same
arguments give the same bytes. Shared by the decode tests and ``benchmarks.end_to_end``::

    python -m tools.camera_photos OUT [--count 24] [--size 4032x3024]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "images"
PHOTOS = sorted(p for p in ASSETS.iterdir() if p.suffix in (".jpg", ".png"))
CAMERA_SIZE = (4032, 3024)
SMALL_SIZE = (500, 375)
NOISE_SIGMA = 4.0  # levels of 255: a phone's sensor noise at ISO ~200


def camera_photo(
    index: int = 0,
    size: tuple[int, int] = CAMERA_SIZE,
    *,
    quality: int = 90,
    orientation: int | None = None,
    sigma: float = NOISE_SIGMA,
) -> bytes:
    """JPEG bytes of bundled photo ``index`` (modulo their count) at ``size``, with noise of ``sigma`` levels.

    ``orientation``: an EXIF orientation tag (1-8) to store; the pixels are stored as given, so a
    viewer that applies it shows the photo turned, as a camera held sideways writes it.
    """
    source = Image.open(PHOTOS[index % len(PHOTOS)]).convert("RGB").resize(size, Image.BICUBIC)
    pixels = np.asarray(source, dtype=np.float32)
    noise = np.random.default_rng(index).normal(0.0, sigma, pixels.shape).astype(np.float32)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation  # the Orientation tag
        options["exif"] = exif.tobytes()
    out = io.BytesIO()
    noisy.save(out, "JPEG", quality=quality, **options)
    return out.getvalue()


def write_photos(folder: str | Path, count: int, size: tuple[int, int] = CAMERA_SIZE) -> list[Path]:
    """``count`` camera-like photos ``photo_000.jpg`` ... in ``folder`` (created); their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo_{index:03d}.jpg"
        path.write_bytes(camera_photo(index, size))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the photos into")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", default="x".join(map(str, CAMERA_SIZE)), help="WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    for path in write_photos(args.out, args.count, (width, height)):
        print(path)


if __name__ == "__main__":
    main()
