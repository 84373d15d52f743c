"""The ``Trainer`` (:mod:`resnext_hub.training.trainer`): its validation decodes large photos at the size its preset
resizes to, as the engine does."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from resnext_hub.distributed import DistContext
from resnext_hub.processing import load_image
from resnext_hub.training.data import read_folder
from resnext_hub.training.state import FinetuneSettings
from resnext_hub.training.trainer import Trainer
from tools.shapes_dataset import write_shapes_dataset


@pytest.mark.slow
def test_validation_images_are_decoded_at_size_like_the_engine(tmp_path, small_checkpoint):
    root = write_shapes_dataset(tmp_path / "data", train=2, val=1, size=80)
    val = sorted((root / "val").rglob("*.png"))[0]
    big = val.with_suffix(".jpg")  # a photo over twice the resize target: reduced while decoded
    Image.open(val).convert("RGB").resize((640, 480)).save(big, quality=90)
    val.unlink()
    settings = FinetuneSettings(
        model="seresnext26d_32x4d", epochs=1, batch_size=2, image_size=64, pretrained_from_file=str(small_checkpoint)
    )
    trainer = Trainer(read_folder(root), tmp_path / "out", settings, DistContext(), workers=0, progress=False)
    index = trainer.val_set.items.index(str(big))
    preset = trainer.model.preprocessing
    fast, full = load_image(big, min_size=preset.resize_size), load_image(big)
    assert fast.size != full.size  # the reduced decode differs from every pixel's, so the check below can fail
    assert torch.equal(trainer.val_set[index].image, preset(fast))
