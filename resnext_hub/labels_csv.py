"""Multi-label data: images and their labels listed in a CSV file, checked at the boundary.

``finetune --multi-label`` reads one for its training images and one for its validation images;
``evaluate`` scores a multi-label model on one. The format::

    path,labels
    photos/beach.jpg,sea;sky;people
    photos/forest.png,tree
    photos/night.jpg,

- Two columns: the image's path, relative to the CSV file's folder (or absolute), and its labels
  separated by ``;``. The header line ``path,labels`` is optional; fields may be quoted as CSV quotes
  them (a path with a comma). UTF-8 (a byte-order mark is ignored); blank lines are skipped.
- Around each label, spaces are ignored; a label listed twice for one image counts once; an empty
  field (or only ``;``) means the image shows none of the labels: a negative example, which is allowed.
- The labels are the names met in the training file, sorted (their order is the output index); a
  validation row may not name a label that no training row has.
- Refused, with the file and line: a row without exactly two fields, an image listed twice, a file that
  does not exist, a label that is not valid text on one line; and a file that lists no image.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .console import printable
from .processing.labels import name_problem

HEADER = ("path", "labels")
SEPARATOR = ";"


class LabelsFileError(ValueError):
    """A labels CSV file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class LabelledImages:
    """The rows of one labels file: image paths and, for each, its label names (sorted)."""

    source: Path
    paths: list[str]
    labels: list[tuple[str, ...]]
    lines: list[int]  # the line of each row in the file, for messages

    def __len__(self) -> int:
        return len(self.paths)

    def names(self) -> tuple[str, ...]:
        """The label names met in these rows, sorted."""
        return tuple(sorted({name for row in self.labels for name in row}))

    def multi_hot(self, names: Sequence[str], whose: str = "the training labels") -> torch.Tensor:
        """The rows as 0/1 targets (images, len(names)) over ``names`` (``whose`` they are, for the message);
        ``LabelsFileError`` for a label not among them."""
        index = {name: i for i, name in enumerate(names)}
        rows = torch.zeros(len(self.paths), len(names))
        for row, (line, labels) in enumerate(zip(self.lines, self.labels)):
            for name in labels:
                if name not in index:
                    raise LabelsFileError(
                        f"{printable(self.source)}, line {line}: label {printable(name)!r} is not one of {whose} "
                        f"[{', '.join(printable(n) for n in names)}]"
                    )
                rows[row, index[name]] = 1.0
        return rows


def read_labels_csv(path: str | Path) -> LabelledImages:
    """The images and labels of one labels file (see the module's docstring for the format and refusals)."""
    path = Path(path)
    shown = printable(path)
    if not path.is_file():
        raise LabelsFileError(f"labels file {shown} does not exist (or is not a file)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            rows = [(reader.line_num, row) for row in reader]  # the line each row ends on
    except UnicodeDecodeError as error:
        raise LabelsFileError(f"labels file {shown} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise LabelsFileError(f"labels file {shown} is not a CSV file ({error})") from None
    except OSError as error:
        raise LabelsFileError(f"labels file {shown} could not be read: {error.strerror or error}") from None
    folder = path.parent
    paths: list[str] = []
    labels: list[tuple[str, ...]] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        if not row or all(not field.strip() for field in row):
            continue
        where = f"{shown}, line {line}"
        if len(row) != 2:
            raise LabelsFileError(
                f"{where}: expected 2 fields (path,labels with labels separated by {SEPARATOR!r}), got {len(row)}: "
                f"{printable(','.join(row))[:200]}; quote a path that holds a comma"
            )
        if not paths and tuple(field.strip().lower() for field in row) == HEADER:
            continue
        given = row[0].strip()
        if not given:
            raise LabelsFileError(f"{where}: the path is empty")
        image = Path(given).expanduser()
        image = image if image.is_absolute() else folder / image
        key = str(image.resolve())
        if key in first_line:
            raise LabelsFileError(f"{where}: {printable(given)} is listed twice (also on line {first_line[key]})")
        if not image.is_file():
            raise LabelsFileError(
                f"{where}: image {printable(given)} not found (looked for {printable(image)}; paths are relative "
                "to the labels file's folder)"
            )
        names = sorted({name.strip() for name in row[1].split(SEPARATOR) if name.strip()})
        for name in names:
            problem = name_problem(name)
            if problem:
                raise LabelsFileError(f"{where}: label {ascii(name)} {problem}")
        first_line[key] = line
        paths.append(str(image))
        labels.append(tuple(names))
        lines.append(line)
    if not paths:
        raise LabelsFileError(f"labels file {shown} lists no image: expected lines of path,labels")
    return LabelledImages(path, paths, labels, lines)
