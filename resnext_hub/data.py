"""Inputs: files, folders, list files, class folders (``root/<class>/``) and flat folders with a ground-truth file
(the dataset that decodes them is :mod:`.decoding`).

Nothing is skipped silently: a folder (or sub-folder) that cannot be read is reported as
:class:`Skipped` (to the caller's list, else as a logged warning), never passed over as empty.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .console import printable
from .processing import ClassList, imagenet_classes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_LIST_LINE = 65536  # characters: far above any path or URL, far below a file that is not a list
_LISTED = 5


class Skipped(NamedTuple):
    """A folder whose images could not be listed: they are not in the inputs."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"folder {printable(self.path)} could not be read ({self.reason}): its images were skipped"


def _report(skipped: list[Skipped] | None, entry: Skipped) -> None:
    if skipped is None:
        log.warning("warning: %s", entry)
    else:
        skipped.append(entry)


def _images_under(folder: Path, skipped: list[Skipped] | None = None) -> list[Path]:
    """Every file under ``folder`` with an image suffix, sorted; symlinked folders are not followed.

    Files that are not regular (a FIFO, a dangling link) are kept: the loader reports each. A folder
    that cannot be listed is reported (:class:`Skipped`), where ``Path.rglob`` would pass over it.
    """

    def unreadable(error: OSError) -> None:
        _report(skipped, Skipped(str(error.filename or folder), error.strerror or str(error)))

    found = []
    for root, _, files in os.walk(folder, onerror=unreadable):
        found += [Path(root, name) for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def expand_inputs(inputs: Sequence[str], skipped: list[Skipped] | None = None) -> list[str]:
    """URLs and files as given; folders become their image files (recursively, sorted).

    Folders that cannot be read go to ``skipped`` (else a logged warning).
    """
    expanded = []
    for item in inputs:
        path = Path(item)
        expanded += [str(p) for p in _images_under(path, skipped)] if path.is_dir() else [item]
    return expanded


def read_list_file(path: str | Path) -> list[str]:
    """The image paths/URLs of a list file: one per line; blank lines and ``#`` comments are skipped.

    Read as UTF-8 with surrogate escapes, so a name that is not UTF-8 is the file's name as listed.
    A line over :data:`MAX_LIST_LINE` characters or with a NUL byte means the file is not a list
    (a photo given by mistake): ``ValueError``, after reading at most one such line.
    """
    entries = []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            for number, line in enumerate(iter(lambda: handle.readline(MAX_LIST_LINE + 1), ""), 1):
                content = line.rstrip("\r\n")
                if len(content) > MAX_LIST_LINE or "\x00" in content:
                    problem = "holds a NUL byte" if "\x00" in content else f"is over {MAX_LIST_LINE} characters"
                    raise ValueError(
                        f"list file {printable(path)}: line {number} {problem}; a list file is text, one image "
                        "path or URL per line"
                    )
                entry = content.strip()
                if entry and not entry.startswith("#"):
                    entries.append(entry)
    except OSError as error:
        raise ValueError(f"list file {printable(path)} could not be read: {error.strerror or error}") from error
    return entries


def collect_inputs(
    inputs: Sequence[str] = (), list_files: Sequence[str] = (), skipped: list[Skipped] | None = None
) -> list[str]:
    """Files, folders (recursive, sorted), URLs, then the entries of list files; each once, first place kept.

    Folders that cannot be read go to ``skipped`` (else a logged warning).
    """
    items = expand_inputs(list(inputs), skipped)
    for list_file in list_files:
        items += read_list_file(list_file)
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        log.info("%d repeated input(s) will be classified once", len(items) - len(unique))
    return unique


@dataclass(frozen=True)
class ClassFolders:
    """A folder whose sub-folders are classes: their names (sorted) and the image files under each (sorted)."""

    root: Path
    names: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]  # files[i]: the images under root/names[i]/, found recursively

    def samples(self, targets: Sequence[int]) -> list[tuple[str, int]]:
        """``(path, targets[i])`` of every image of folder ``names[i]``, folder by folder."""
        return [(path, target) for files, target in zip(self.files, targets, strict=True) for path in files]


def read_class_folders(root: str | Path, skipped: list[Skipped] | None = None) -> ClassFolders:
    """The class folders of ``root``: every sub-folder (hidden ones aside) is a class, its images found recursively.

    The one reader of class-folder layouts (``evaluate``'s dataset, ``finetune``'s train/ and val/).
    A class folder (or one below it) that cannot be read goes to ``skipped`` (else a logged
    warning); a ``root`` that is missing or unreadable, or without a single image in its class
    folders, is a ``ValueError``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"folder {printable(root)} does not exist (or is not a folder)")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:
        raise ValueError(f"folder {printable(root)} could not be read: {error.strerror or error}") from error
    found = ClassFolders(
        root, tuple(p.name for p in folders), tuple(tuple(map(str, _images_under(p, skipped))) for p in folders)
    )
    if not any(found.files):
        raise ValueError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {printable(root)}/<class>/: expected one "
            "sub-folder of images per class"
        )
    return found


def quoted(names: Sequence[str], limit: int = _LISTED) -> str:
    """The first ``limit`` names, quoted, for a message: ``'a', 'b', 'c' ...``."""
    return ", ".join(repr(name) for name in names[:limit]) + (" ..." if len(names) > limit else "")


def match_classes(folders: Sequence[str], classes: ClassList, *, what: str = "folder") -> dict[str, int]:
    """The class index of each folder name, or ``ValueError`` naming the folders that match none (or several).

    ``what``: what the names are, for the message (``"folder"``, or ``"label"`` of a ground-truth file).

    The rules, in order:

    1. the exact class name (a name two classes share, as ImageNet's two "crane"s, matches neither);
    2. the exact WordNet id, for class lists that have them (ImageNet-1k: ``n01440764`` = 0);
    3. the same name or WordNet id in another letter case (``str.casefold``), only when unambiguous:
       exactly one class matches, and no other folder names that class.
    """
    exact: dict[str, list[int]] = {}
    folded: dict[str, set[int]] = {}
    for index, name in enumerate(classes.names):
        exact.setdefault(name, []).append(index)
        folded.setdefault(name.casefold(), set()).add(index)
    for index, wnid in enumerate(classes.wnids or ()):
        exact.setdefault(wnid, []).append(index)
        folded.setdefault(wnid.casefold(), set()).add(index)
    matched: dict[str, int] = {}
    unmatched, ambiguous = [], []
    for folder in folders:
        if len(exact.get(folder, ())) == 1:
            matched[folder] = exact[folder][0]
        elif folder in exact:
            ambiguous.append(f"{folder!r} (classes {', '.join(map(str, exact[folder]))} share that name)")
    for folder in folders:
        if folder in exact:
            continue
        candidates = folded.get(folder.casefold(), set())
        claimed = [other for other in folders if other != folder and other.casefold() == folder.casefold()]
        if len(candidates) == 1 and not claimed:
            matched[folder] = next(iter(candidates))
        elif len(candidates) > 1:
            ambiguous.append(f"{folder!r} (in another letter case: classes {', '.join(map(str, sorted(candidates)))})")
        elif candidates:
            ambiguous.append(f"{folder!r} (in another letter case, as {claimed[0]!r}: the same class)")
        else:
            unmatched.append(folder)
    if unmatched or ambiguous:
        problems = []
        if unmatched:
            problems.append(
                f"{len(unmatched)} {what}(s) match none of the model's {len(classes)} classes: {quoted(unmatched)}"
            )
        if ambiguous:
            problems.append(f"{len(ambiguous)} {what}(s) match no single class: {', '.join(ambiguous[:_LISTED])}")
        if what != "folder":
            ids = f" (or their WordNet ids, e.g. {classes.wnids[0]})" if classes.wnids else ""
            raise ValueError(f"{'; '.join(problems)}. The model's classes are {quoted(classes.names, 3)}{ids}")
        ids = (
            f" (or their WordNet ids, e.g. {classes.wnids[0]}/; docs/distributed.md sorts ImageNet's flat "
            "validation set into such folders)"
            if classes.wnids
            else ""
        )
        raise ValueError(
            f"{'; '.join(problems)}. The model's classes are {quoted(classes.names, 3)}{ids}. Name each class "
            "folder after one of the model's classes, or evaluate a model trained on these folders "
            "(--checkpoint OUT/best.pth of `finetune`)"
        )
    return matched


ILSVRC2012_CLASSES = 1000
DEVKIT_META = "meta.mat"  # the devkit's data/ folder holds it beside ILSVRC2012_validation_ground_truth.txt


def ilsvrc2012_wnids(meta: str | Path) -> dict[int, str]:
    """The WordNet id of each ILSVRC2012 class id (1..1000) in the devkit's ``meta.mat``.

    Those ids number the classes in the devkit's own order (1 = n02119789, kit fox), not in the
    sorted-WordNet-id order of the models' outputs (0 = n01440764, tench): the devkit's readme
    describes ``meta.mat``'s ``synsets`` (``ILSVRC2012_ID``, ``WNID``, ``num_children``), and
    torchvision's ``datasets/imagenet.py`` (``parse_meta_mat``) maps them the same way, keeping the
    1,000 leaf synsets (no children). Reading it needs scipy.
    """
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as error:
        raise ValueError(
            f"reading the devkit's {DEVKIT_META} needs scipy (pip install scipy); or give the ground truth as "
            "WordNet ids, one per line"
        ) from error
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        table = {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets if int(row["num_children"]) == 0}
    except (OSError, ValueError, KeyError, TypeError, IndexError, MatReadError) as error:
        raise ValueError(
            f"{printable(meta)} is not the ILSVRC2012 devkit's {DEVKIT_META} (a struct array 'synsets' with "
            f"ILSVRC2012_ID, WNID and num_children): {error}"
        ) from error
    if sorted(table) != list(range(1, ILSVRC2012_CLASSES + 1)):
        raise ValueError(
            f"{printable(meta)} lists {len(table)} leaf synsets, not ILSVRC2012's ids 1..{ILSVRC2012_CLASSES}"
        )
    return table


def read_ground_truth(path: str | Path, classes: ClassList) -> list[int]:
    """The class index (the model's) of each line of a ground-truth file: one label per image, in file-name order.

    A line is an ILSVRC2012 class id (``ILSVRC2012_validation_ground_truth.txt`` of the devkit:
    1..1000, mapped to WordNet ids through the devkit's ``meta.mat`` found beside the file, see
    :func:`ilsvrc2012_wnids`), or a WordNet id or class name of the model (:func:`match_classes`).
    Blank lines are errors (one would shift every label after it); a trailing newline is not.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as error:
        raise ValueError(f"ground-truth file {printable(path)} could not be read: {error.strerror or error}") from None
    lines = [line.strip() for line in text.splitlines()]
    blank = [number for number, line in enumerate(lines, 1) if not line]
    if blank:
        raise ValueError(
            f"ground-truth file {printable(path)}: line {blank[0]} is blank; it needs one label per line (an "
            "ILSVRC2012 class id, WordNet id or class name), one line per image"
        )
    ids = {line for line in lines if line.isascii() and line.isdigit()}
    by_id: dict[str, int] = {}
    if ids:
        meta = Path(path).parent / DEVKIT_META
        if not meta.is_file():
            first = next(number for number, line in enumerate(lines, 1) if line in ids)
            raise ValueError(
                f"ground-truth file {printable(path)} holds ILSVRC2012 class ids (line {first}: {lines[first - 1]}), "
                "which number the classes in the devkit's order, not the "
                f"model's: put the devkit's {DEVKIT_META} beside it (ILSVRC2012_devkit_t12/data/ holds both), or "
                "give WordNet ids, one per line"
            )
        table = ilsvrc2012_wnids(meta)
        wnid_index = {wnid: i for i, wnid in enumerate(classes.wnids or ())}
        for number, line in enumerate(lines, 1):
            if line in ids and line not in by_id:
                if int(line) not in table:
                    raise ValueError(
                        f"ground-truth file {printable(path)}, line {number}: {line} is no ILSVRC2012 class id "
                        f"(1..{ILSVRC2012_CLASSES})"
                    )
                if table[int(line)] not in wnid_index:
                    raise ValueError(
                        f"ground-truth file {printable(path)}, line {number}: ILSVRC2012 class {line} "
                        f"({table[int(line)]}) is none of the model's classes: ILSVRC2012 ids need an ImageNet-1k model"
                    )
                by_id[line] = wnid_index[table[int(line)]]
    names = sorted({line for line in lines if line not in ids})
    try:
        by_name = match_classes(names, classes, what="label")
    except ValueError as error:
        raise ValueError(f"ground-truth file {printable(path)}: {error}") from None
    return [by_id[line] if line in by_id else by_name[line] for line in lines]


def find_flat_samples(root: str | Path, ground_truth: str | Path, classes: ClassList) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image directly in ``root``, sorted by file name, labelled by the lines of
    ``ground_truth`` (:func:`read_ground_truth`) in that order: ImageNet's flat validation folder
    (``ILSVRC2012_val_00000001.JPEG`` ...) as the archive unpacks. The counts must agree."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"folder {printable(root)} does not exist (or is not a folder)")
    try:
        images = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    except OSError as error:
        raise ValueError(f"folder {printable(root)} could not be read: {error.strerror or error}") from error
    labels = read_ground_truth(ground_truth, classes)
    if len(labels) != len(images):
        raise ValueError(
            f"ground-truth file {printable(ground_truth)} has {len(labels)} line(s) but {printable(root)} holds "
            f"{len(images)} image(s) ({', '.join(sorted(IMAGE_SUFFIXES))}): it needs one line per image, in "
            "file-name order"
        )
    return [(str(root / name), label) for name, label in zip(images, labels)]


def find_samples(
    root: str | Path,
    classes: ClassList | None = None,
    skipped: list[Skipped] | None = None,
    *,
    ground_truth: str | Path | None = None,
) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``root/<class>/``, folder by folder, for a model with ``classes``.

    Folders are matched to the classes by :func:`match_classes` (name, WordNet id, letter case);
    ``classes`` defaults to ImageNet-1k. Class indices are the model's, not the sort order of the
    folders present, so a subset of the classes still scores against the right outputs.
    Unreadable class folders go to ``skipped`` (:func:`read_class_folders`). With ``ground_truth``,
    ``root`` is a flat folder labelled by that file instead (:func:`find_flat_samples`).
    """
    classes = classes if classes is not None else imagenet_classes()
    if ground_truth is not None:
        return find_flat_samples(root, ground_truth, classes)
    found = read_class_folders(root, skipped)
    try:
        matched = match_classes(found.names, classes)
    except ValueError as error:
        raise ValueError(f"{printable(found.root)}: {error}") from None
    return found.samples([matched[name] for name in found.names])
