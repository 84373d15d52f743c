"""The web demo's ``--checkpoint`` takes a folder written by ``export --format hf`` (config.json names the model)."""

from __future__ import annotations

import json

import pytest


def test_checkpoint_entry_reads_an_hf_export_folder(tmp_path):
    from space import app

    folder = tmp_path / "shapes-hf"
    folder.mkdir()
    cfg = {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}
    cfg |= {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config = {"architecture": "seresnext26t_32x4d", "num_classes": 2, "label_names": ["cat", "dog"]}
    (folder / "config.json").write_text(json.dumps({**config, "pretrained_cfg": cfg}))
    assert app.checkpoint_entry(folder) == "seresnext26t_32x4d"
    with pytest.raises(SystemExit, match="fine-tuned from seresnext26t_32x4d, not seresnext50_32x4d"):
        app.checkpoint_entry(folder, "seresnext50_32x4d")
    with pytest.raises(SystemExit, match="neither a file nor an hf or openvino export folder"):
        app.checkpoint_entry(tmp_path / "missing")
