"""Inputs: folder walks, list files, class folders and how they match a model's classes."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from unprivileged import public_dir, run_unprivileged

from resnext_hub.data import (
    MAX_LIST_LINE,
    Skipped,
    collect_inputs,
    find_samples,
    ilsvrc2012_wnids,
    match_classes,
    read_class_folders,
)
from resnext_hub.decoding import ImageListDataset, collate
from resnext_hub.processing import ClassList, imagenet_classes, imagenet_wnids


def test_folders_map_to_wordnet_ids_not_sort_order(tmp_path):
    wnids = imagenet_wnids()
    for wnid in (wnids[999], wnids[0], wnids[500]):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / wnid / "a.png")
    assert sorted(target for _, target in find_samples(tmp_path)) == [0, 500, 999]


def test_class_folders_are_the_sorted_sub_folders_with_their_images_found_recursively(tmp_path):
    for relative in ("b/x.png", "b/deeper/y.jpg", "a/z.png", ".hidden/h.png", "a/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / relative, format="PNG")
    found = read_class_folders(tmp_path)
    assert found.names == ("a", "b")
    assert found.files == (
        (str(tmp_path / "a" / "z.png"),),
        (str(tmp_path / "b/deeper/y.jpg"), str(tmp_path / "b/x.png")),
    )
    assert found.samples([7, 3]) == [(found.files[0][0], 7), (found.files[1][0], 3), (found.files[1][1], 3)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images .* found under .*/empty/<class>/"):
        read_class_folders(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"does not exist"):
        read_class_folders(tmp_path / "missing")


def test_folders_match_class_names_then_wordnet_ids_then_an_unambiguous_letter_case():
    classes = ClassList.of(["cat", "Dog", "crane", "crane", "Bird", "bird"])
    assert match_classes(["Dog", "cat"], classes) == {"Dog": 1, "cat": 0}  # exact
    assert match_classes(["CAT", "dog"], classes) == {"CAT": 0, "dog": 1}  # one class in another case
    assert match_classes(["bird"], classes) == {"bird": 5}  # the exact name first
    for folders, problem in (
        (["BIRD"], "'BIRD' (in another letter case: classes 4, 5)"),
        (["crane"], "'crane' (classes 2, 3 share that name)"),
        (["cat", "Cat"], "'Cat' (in another letter case, as 'cat': the same class)"),
    ):
        with pytest.raises(ValueError, match="match no single class") as refused:
            match_classes(folders, classes)
        assert problem in str(refused.value)
    with pytest.raises(ValueError) as refused:
        match_classes(["cat", "zebra", "okapi"], classes)
    message = str(refused.value)
    assert "2 folder(s) match none of the model's 6 classes: 'zebra', 'okapi'" in message
    assert "The model's classes are 'cat', 'Dog', 'crane' ..." in message and "--checkpoint" in message
    assert "WordNet" not in message  # this class list has none


def test_imagenet_folders_match_by_wordnet_id_or_name():
    imagenet, wnids = imagenet_classes(), imagenet_wnids()
    folders = [wnids[0], wnids[2].upper(), "goldfish, Carassius auratus"]
    assert match_classes(folders, imagenet) == {wnids[0]: 0, wnids[2].upper(): 2, "goldfish, Carassius auratus": 1}
    with pytest.raises(ValueError, match=r"'crane' \(classes 134, 517 share that name\).*WordNet ids, e.g. n01440764/"):
        match_classes(["crane"], imagenet)


def test_a_subset_of_a_custom_model_s_classes_keeps_the_model_s_indices(tmp_path):
    for name in ("triangle", "Circle"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    samples = find_samples(tmp_path, ClassList.of(["circle", "square", "triangle"]))
    assert samples == [(str(tmp_path / "Circle" / "a.png"), 0), (str(tmp_path / "triangle" / "a.png"), 2)]


def test_list_files_skip_comments_and_repeats(tmp_path):
    (tmp_path / "list.txt").write_text("# header\nb.jpg\n\n  a.jpg  \nb.jpg\nhttp://127.0.0.1:1/c.jpg\n")
    assert collect_inputs([], [str(tmp_path / "list.txt")]) == ["b.jpg", "a.jpg", "http://127.0.0.1:1/c.jpg"]


# -- one bad input fails alone; nothing is skipped silently (issue 13) -------------------------------------


class _Preset:
    """The model's preset, except that it raises for one specific image (a 37x23 photo)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, image):
        if image.size == (37, 23):
            raise self.error
        return torch.zeros(3, 8, 8) if image.size != (41, 41) else torch.zeros(3, 9, 9)


def _photos(folder):
    names = {"good.png": (16, 16), "fault.png": (37, 23), "odd.png": (41, 41), "also_good.png": (20, 10)}
    for name, size in names.items():
        Image.new("RGB", size, "red").save(folder / name)
    return [str(folder / name) for name in names]


def test_any_exception_in_decoding_or_preprocessing_costs_that_input_only(tmp_path):
    items = _photos(tmp_path)
    dataset = ImageListDataset(items + ["~no-such-user-h13/a.jpg"], _Preset(ZeroDivisionError("division by zero")))
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch.indices == [0, 3] and batch.images.shape == (2, 3, 8, 8)
    failed = dict(batch.failed)
    assert failed[1] == "ZeroDivisionError: division by zero"
    assert failed[2] == "preprocessing gave a 3x9x9 tensor, the batch's are 3x8x8"
    assert failed[4] == "RuntimeError: Could not determine home directory."  # pathlib's, from the loader
    for stop in (KeyboardInterrupt(), SystemExit(143)):  # still stop the run
        with pytest.raises(type(stop)):
            ImageListDataset(items, _Preset(stop))[1]


def test_list_files_keep_non_utf8_names_and_refuse_what_is_not_a_list(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.jpg\r\nb.jpg\r\n")
    assert collect_inputs([], [str(tmp_path / "latin1.txt")]) == [os.fsdecode(b"caf\xe9.jpg"), "b.jpg"]
    (tmp_path / "photo.txt").write_bytes(b"a.jpg\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=r"photo.txt: line 4 holds a NUL byte; a list file is text"):
        collect_inputs([], [str(tmp_path / "photo.txt")])
    with open(tmp_path / "huge.txt", "w") as handle:  # one endless line: refused after reading 64K of it
        handle.write("a.jpg\n" + "x" * (MAX_LIST_LINE + 10) + "\n")
    with pytest.raises(ValueError, match=rf"huge.txt: line 2 is over {MAX_LIST_LINE} characters"):
        collect_inputs([], [str(tmp_path / "huge.txt")])
    (tmp_path / "ok.txt").write_text("x" * MAX_LIST_LINE + "\n")  # at the limit: an entry
    assert collect_inputs([], [str(tmp_path / "ok.txt")]) == ["x" * MAX_LIST_LINE]


_WALK = """
import json, sys
from resnext_hub.data import Skipped, collect_inputs, find_samples
skipped = []
found = collect_inputs([sys.argv[1]], skipped=skipped)
samples_skipped = []
try:
    samples = find_samples(sys.argv[2], skipped=samples_skipped)
except ValueError as error:
    samples = str(error)
print(json.dumps({"found": found, "skipped": skipped, "samples": samples, "samples_skipped": samples_skipped}))
"""


@pytest.mark.slow
def test_a_folder_that_cannot_be_read_is_reported_never_passed_over():
    wnids = imagenet_wnids()
    with public_dir() as base:
        photos, val = base / "photos", base / "val"
        for folder in (photos / "open", photos / "locked" / "deeper", val / wnids[0], val / wnids[1]):
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "a.png")
        (photos / "fifo.jpg").parent.mkdir(exist_ok=True)
        os.mkfifo(photos / "fifo.jpg")  # not a regular file: listed, and the loader says what it is
        (photos / "locked").chmod(0o000)
        (val / wnids[1]).chmod(0o000)
        walk = run_unprivileged([sys.executable, "-c", _WALK, str(photos), str(val)], cwd=ROOT)
        assert walk.returncode == 0, walk.stderr
        seen = json.loads(walk.stdout)
        assert seen["found"] == [str(photos / "fifo.jpg"), str(photos / "open" / "a.png")]
        assert seen["skipped"] == [[str(photos / "locked"), "Permission denied"]]
        assert seen["samples"] == [[str(val / wnids[0] / "a.png"), 0]]
        assert seen["samples_skipped"] == [[str(val / wnids[1]), "Permission denied"]]
        val.chmod(0o000)
        walk = run_unprivileged([sys.executable, "-c", _WALK, str(photos), str(val)], cwd=ROOT)
        assert "could not be read: Permission denied" in json.loads(walk.stdout)["samples"]
    assert str(Skipped("a\nb", "Permission denied")) == (
        "folder a\\nb could not be read (Permission denied): its images were skipped"
    )


def test_a_decode_target_reduces_large_photos_only(tmp_path):
    from resnext_hub.processing import ImageClassification
    from tools.camera_photos import camera_photo

    preset = ImageClassification(64, 56, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    large = tmp_path / "large.jpg"
    large.write_bytes(camera_photo(0, (1008, 756)))
    small = ROOT / "assets" / "images" / "chelsea.jpg"
    sizes = []
    dataset = ImageListDataset([str(large), str(small)], lambda image: sizes.append(image.size) or preset(image))
    reduced = ImageListDataset([str(large), str(small)], dataset.transform, min_size=64)
    assert [s.error for s in (dataset[0], reduced[0], reduced[1])] == [None, None, None]
    assert torch.equal(dataset[1].image, reduced[1].image)  # 451x300: 2 does not divide 451, kept whole
    assert sizes[0] == (1008, 756) and sizes[1] == (252, 189)
    with pytest.raises(ValueError, match="min_size must be None or a positive int"):
        ImageListDataset([], preset, min_size=0)


# -- issue 23: ImageNet's flat validation folder with a ground-truth file ------------------------------------------


def write_devkit_meta(folder, order: list[str]) -> None:
    """A ``meta.mat`` as ILSVRC2012's devkit lays it out: struct array ``synsets``, leaves numbered 1..1000 in
    ``order``, then inner synsets (children, ids above 1000), which the mapping must leave out."""
    from scipy.io import savemat

    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O"), ("children", "O")]
    synsets = np.zeros(len(order) + 2, dtype=fields)
    for i, wnid in enumerate(order):
        synsets[i] = (i + 1, wnid, f"words {i}", 0, np.zeros((1, 0)))
    synsets[len(order)] = (len(order) + 1, "n00001740", "entity", 2, np.array([1, 2]))
    synsets[len(order) + 1] = (len(order) + 2, "n00002137", "abstraction", 1, np.array([3]))
    savemat(folder / "meta.mat", {"synsets": synsets[:, None]})


@pytest.fixture(scope="module")
def flat_val(tmp_path_factory) -> dict:
    """A flat folder of 6 tiny images named as ImageNet's, and the devkit's meta.mat in a shuffled class order."""
    base = tmp_path_factory.mktemp("flat")
    root = base / "ILSVRC2012_img_val"
    root.mkdir()
    for i in range(6, 0, -1):  # written out of order: the file names give the order
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / f"ILSVRC2012_val_{i:08d}.JPEG")
    (root / "README.txt").write_text("not an image: not a sample\n")
    devkit = base / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    order = list(imagenet_wnids())
    np.random.default_rng(0).shuffle(order)  # the devkit's order is not the sorted one
    write_devkit_meta(devkit, order)
    return {"root": root, "devkit": devkit, "order": order}


def test_ilsvrc2012_ids_map_through_the_devkit_to_the_models_classes(flat_val):
    ids = [1, 1000, 17, 17, 500, 2]
    truth = flat_val["devkit"] / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{i}\n" for i in ids))
    samples = find_samples(flat_val["root"], imagenet_classes(), ground_truth=truth)
    wnids = imagenet_wnids()
    assert [os.path.basename(p) for p, _ in samples] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    assert [wnids[c] for _, c in samples] == [flat_val["order"][i - 1] for i in ids]
    assert ilsvrc2012_wnids(flat_val["devkit"] / "meta.mat")[1] == flat_val["order"][0]


def test_wordnet_ids_and_class_names_per_line_need_no_devkit(flat_val, tmp_path):
    wnids = imagenet_wnids()
    truth = tmp_path / "labels.txt"
    truth.write_text(f"{wnids[3]}\n{wnids[0]}\nn01440764\r\n{wnids[999]}\ntench, Tinca tinca\n {wnids[7]} ")
    samples = find_samples(flat_val["root"], imagenet_classes(), ground_truth=truth)
    assert [c for _, c in samples] == [3, 0, 0, 999, 0, 7]
    shapes = ClassList(("circle", "square"))
    truth.write_text("square\ncircle\n" * 3)
    assert [c for _, c in find_samples(flat_val["root"], shapes, ground_truth=truth)] == [1, 0] * 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1\n2\n3\n", r"has 3 line\(s\) but .* holds 6 image\(s\).*one line per image, in file-name order"),
        ("1\n2\n3\n4\n5\n6\n7\n", r"has 7 line\(s\) but .* holds 6 image\(s\)"),
        ("1\n2\n0\n4\n5\n6\n", r"line 3: 0 is no ILSVRC2012 class id \(1\.\.1000\)"),
        ("1\n2\n3\n1001\n5\n6\n", r"line 4: 1001 is no ILSVRC2012 class id"),
        ("1\n\n3\n4\n5\n6\n", r"line 2 is blank"),
        ("1\n2\nn99999999\n4\n5\n6\n", r"1 label\(s\) match none of the model's 1000 classes: 'n99999999'"),
    ],
)
def test_a_ground_truth_that_does_not_fit_is_refused_saying_why(flat_val, content, message):
    truth = flat_val["devkit"] / "bad_ground_truth.txt"
    truth.write_text(content)
    with pytest.raises(ValueError, match=message):
        find_samples(flat_val["root"], imagenet_classes(), ground_truth=truth)


def test_ilsvrc2012_ids_without_the_devkit_or_a_missing_file_are_refused(flat_val, tmp_path):
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("65\n970\n230\n809\n516\n57\n")
    with pytest.raises(ValueError, match=r"line 1: 65\).*devkit's order, not the model's: put the devkit's meta.mat"):
        find_samples(flat_val["root"], imagenet_classes(), ground_truth=truth)
    with pytest.raises(ValueError, match=r"ground-truth file .*missing.txt could not be read: No such file"):
        find_samples(flat_val["root"], imagenet_classes(), ground_truth=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"folder .*nowhere does not exist"):
        find_samples(tmp_path / "nowhere", imagenet_classes(), ground_truth=truth)
    (tmp_path / "meta.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(ValueError, match=r"is not the ILSVRC2012 devkit's meta.mat"):
        find_samples(flat_val["root"], imagenet_classes(), ground_truth=truth)
    beside_devkit = flat_val["devkit"] / "gt.txt"
    beside_devkit.write_text("1\n2\n3\n4\n5\n6\n")
    with pytest.raises(ValueError, match=r"ILSVRC2012 ids need an ImageNet-1k model"):
        find_samples(flat_val["root"], ClassList(("a", "b")), ground_truth=beside_devkit)
