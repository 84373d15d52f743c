"""The evaluation report of ``evaluate --report DIR``: what it holds, and the files it is written to.

``report.json``: top-1/top-5, per-class accuracy, the confusion matrix (rows: true class, columns:
top-1 prediction), and the calibration: the expected calibration error (ECE, 15 equal-width bins
of the max softmax probability) before and after temperature scaling, with the temperature. The
temperature is fitted on the evaluated images themselves (it minimises their cross-entropy), so
the "after" figures say how far one temperature can calibrate this model on this set, an
optimistic estimate for new images; fit it on a held-out split to deploy it.
``confusion_matrix.png``: the matrix as a picture, readable up to :data:`MAX_PLOTTED` classes (with
more, the classes with the most errors). Each file is written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from .metrics import ReportCounts
from .processing import ClassList
from .processing.atomic import write_atomic

REPORT_JSON = "report.json"
CONFUSION_PNG = "confusion_matrix.png"
MAX_PLOTTED = 50  # classes: beyond this a cell is too small to read
_SUMMARY_KEYS = ("model", "weights", "dataset", "ground_truth", "images", "evaluated", "failed", "top1", "top5", "loss")


def report_contents(summary: dict[str, Any], counts: ReportCounts, classes: ClassList) -> dict[str, Any]:
    """The report (JSON-ready) of an evaluation: ``summary``'s figures with ``counts`` spelled out by class."""
    wnids = classes.wnids or ()
    per_class = [
        {
            "index": index,
            "class": classes.names[index],
            **({"wnid": wnids[index]} if wnids else {}),
            "images": images,
            "correct_top1": correct,
            "top1": 100.0 * correct / images,
        }
        for index, images, correct in counts.per_class()
    ]
    confusion = counts.confusion
    shown = [i for i in range(len(confusion)) if confusion[i].any() or confusion[:, i].any()]
    matrix = confusion[shown][:, shown] if shown else confusion[:0, :0]
    calibration = counts.calibration
    return {
        **{key: summary[key] for key in _SUMMARY_KEYS if key in summary},
        "per_class": per_class,
        "confusion_matrix": {
            "rows": "true class",
            "columns": "top-1 prediction",
            "classes": shown,  # the model's class indices of the rows and columns: those with images or predictions
            "labels": [classes.names[i] for i in shown],
            "counts": matrix.tolist(),
        },
        "calibration": None
        if calibration is None
        else {
            "bins": len(calibration.bins),
            "ece": calibration.ece,
            "temperature": calibration.temperature,
            "ece_after_temperature": calibration.ece_scaled,
            "nll": calibration.nll,
            "nll_after_temperature": calibration.nll_scaled,
            "temperature_fitted_on": "the evaluated images (the same set)",
            "reliability": calibration.bins,
        },
    }


def _short(label: str, limit: int = 24) -> str:
    first = label.split(",")[0].strip()  # ImageNet names list synonyms: "tench, Tinca tinca"
    return first if len(first) <= limit else first[: limit - 1] + "…"


def plotted_classes(confusion: torch.Tensor, limit: int = MAX_PLOTTED) -> list[int]:
    """Rows/columns (positions in ``confusion``) to draw: all up to ``limit``, else the ``limit`` with the most
    errors (misclassified images of the class plus images wrongly given to it), in their order."""
    if len(confusion) <= limit:
        return list(range(len(confusion)))
    errors = confusion.sum(dim=0) + confusion.sum(dim=1) - 2 * confusion.diagonal()
    return sorted(errors.argsort(descending=True, stable=True)[:limit].tolist())


def confusion_png(report: dict[str, Any]) -> bytes:
    """The report's confusion matrix as a PNG: cells coloured by the share of the row's images, counts written in."""
    # The Figure API with the Agg canvas: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = report["confusion_matrix"]
    confusion = torch.tensor(table["counts"], dtype=torch.long).reshape(len(table["classes"]), -1)
    picked = plotted_classes(confusion)
    matrix = confusion[picked][:, picked]
    labels = [_short(table["labels"][i]) for i in picked]
    rows = matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 2.5 + 0.3 * len(picked))
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    image = axes.imshow((matrix / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's images")
    count = len(picked)
    label_size, cell_size = (10, 11) if count <= 10 else (8, 8) if count <= 25 else (7, 6)
    axes.set_xticks(range(count), labels, rotation=0 if count <= 6 else 90, fontsize=label_size)
    axes.set_yticks(range(count), labels, fontsize=label_size)
    axes.set(xlabel="top-1 prediction", ylabel="true class")
    for r in range(count):
        for c in range(count):
            if matrix[r, c]:
                dark = matrix[r, c] / rows[r, 0] > 0.5
                colour = "white" if dark else "black"
                axes.text(c, r, str(int(matrix[r, c])), ha="center", va="center", fontsize=cell_size, color=colour)
    title = f"{report.get('model', '')}: top-1 {report['top1']:.1f}% on {report['evaluated']} images"
    if len(picked) < len(confusion):
        title += f"\nthe {len(picked)} of {len(confusion)} classes with the most errors"
    axes.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write ``report.json`` and ``confusion_matrix.png`` into ``folder`` (created if missing), each atomically."""
    folder = Path(folder)
    json_path, png_path = folder / REPORT_JSON, folder / CONFUSION_PNG
    write_atomic(json_path, json.dumps(report, indent=2) + "\n")
    if report["evaluated"]:
        write_atomic(png_path, confusion_png(report))
        return [json_path, png_path]
    return [json_path]
