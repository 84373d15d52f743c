"""Multi-label labels files (``finetune --multi-label``): the format, and refusals that name the file and line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from resnext_hub.labels_csv import LabelsFileError, read_labels_csv
from resnext_hub.training.data import read_labelled


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png", "c, with comma.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    return tmp_path


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_the_format_with_header_quotes_spaces_duplicates_and_empty_labels(images):
    text = 'path,labels\nimages/a.png, sky ; sea;sky;\n\n"images/c, with comma.png",tree\nimages/b.png,\n'
    read = read_labels_csv(_write(images / "train.csv", text))
    assert read.paths == [str(images / "images" / n) for n in ("a.png", "c, with comma.png", "b.png")]
    assert read.labels == [("sea", "sky"), ("tree",), ()]  # sorted, once each; empty: none of the labels
    assert read.lines == [2, 4, 5]
    assert read.names() == ("sea", "sky", "tree")
    assert read.multi_hot(read.names()).tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]


def test_the_header_is_optional_and_a_bom_is_ignored(images):
    read = read_labels_csv(_write(images / "x.csv", "\ufeffimages/a.png,cat\nimages/b.png,dog;cat\n"))
    assert read.labels == [("cat",), ("cat", "dog")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,labels\nimages/a.png,cat\nimages/b.png\n", r"line 3: expected 2 fields .* got 1"),
        ("images/a.png,cat,dog\n", r"line 1: expected 2 fields .* got 3"),
        ("images/a.png,cat\nimages/missing.png,dog\n", r"line 2: image images/missing.png not found"),
        ("images/a.png,cat\n./images/a.png,dog\n", r"line 2: ./images/a.png is listed twice \(also on line 1\)"),
        (",cat\n", r"line 1: the path is empty"),
        ("images/a.png,ca\x07t\n", r"line 1: label .* control character"),
        ("path,labels\n\n", r"lists no image"),
    ],
)
def test_bad_rows_are_refused_with_their_line(images, text, message):
    path = _write(images / "bad.csv", text)
    with pytest.raises(LabelsFileError, match=message) as caught:
        read_labels_csv(path)
    assert "bad.csv" in str(caught.value)


def test_a_missing_or_non_utf8_file(images):
    with pytest.raises(LabelsFileError, match="does not exist"):
        read_labels_csv(images / "none.csv")
    (images / "latin.csv").write_bytes(b"images/a.png,caf\xe9\n")
    with pytest.raises(LabelsFileError, match="not UTF-8"):
        read_labels_csv(images / "latin.csv")


def test_validation_labels_must_be_training_labels(images):
    _write(images / "train.csv", "images/a.png,cat\nimages/b.png,\n")
    _write(images / "val.csv", "path,labels\nimages/a.png,cat;dog\n")
    with pytest.raises(LabelsFileError, match=r"val.csv, line 2: label 'dog' is not one of the training labels \[cat"):
        read_labelled(images, "train.csv", "val.csv")


def test_read_labelled_gives_the_training_names_and_each_splits_rows(images):
    _write(images / "train.csv", "images/a.png,sea;sky\nimages/b.png,tree\n")
    _write(images / "val.csv", '"images/c, with comma.png",sky\n')
    data = read_labelled(images, "train.csv", "val.csv")
    assert data.multi_label and data.classes == ("sea", "sky", "tree")
    assert data.val.items == [str(images / "images" / "c, with comma.png")]
    assert torch.equal(data.train.rows, torch.tensor([[1.0, 1, 0], [0, 0, 1]]))
    assert data.val.rows.tolist() == [[0, 1, 0]] and data.val.targets == [0]
    kept = data.train.subset([1])  # dropping an unreadable image keeps the targets' rows
    assert kept.rows[kept.targets[0]].tolist() == [0, 0, 1]


def test_a_training_file_without_any_label_is_refused(images):
    _write(images / "train.csv", "images/a.png,\n")
    _write(images / "val.csv", "images/b.png,\n")
    with pytest.raises(LabelsFileError, match="names no label"):
        read_labelled(images, "train.csv", "val.csv")


def test_finetune_refuses_bad_labels_files_before_any_model_loads(images, tmp_path, capsys):
    from resnext_hub import cli

    _write(images / "train.csv", "path,labels\nimages/a.png,cat\nimages/b.png;dog\n")
    _write(images / "val.csv", "images/a.png,cat\n")
    out = str(tmp_path / "run")
    assert cli.main(["finetune", str(images), "--multi-label", "-o", out, "--no-progress"]) == 2
    assert "train.csv, line 3: expected 2 fields" in capsys.readouterr().err
    assert cli.main(["finetune", str(images), "--labels", str(images / "val.csv"), "-o", out, "--no-progress"]) == 2
    assert "add --multi-label" in capsys.readouterr().err
