"""Inputs: folder walks, list files, ImageNet-layout folders."""

from __future__ import annotations

from PIL import Image

from resnext_hub.data import collect_inputs, find_samples
from resnext_hub.processing import imagenet_wnids


def test_folders_map_to_wordnet_ids_not_sort_order(tmp_path):
    wnids = imagenet_wnids()
    for wnid in (wnids[999], wnids[0], wnids[500]):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / wnid / "a.png")
    assert sorted(target for _, target in find_samples(tmp_path)) == [0, 500, 999]


def test_list_files_skip_comments_and_repeats(tmp_path):
    (tmp_path / "list.txt").write_text("# header\nb.jpg\n\n  a.jpg  \nb.jpg\nhttp://127.0.0.1:1/c.jpg\n")
    assert collect_inputs([], [str(tmp_path / "list.txt")]) == ["b.jpg", "a.jpg", "http://127.0.0.1:1/c.jpg"]
