"""The evaluation report (``evaluate --report DIR``): its metrics by hand, against classify's records, and its files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnext_hub.cli import main
from resnext_hub.evaluate import evaluate
from resnext_hub.metrics import (
    ReportCounts,
    ReportMeter,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    mean_nll,
)
from resnext_hub.models import build_model
from resnext_hub.options import InferenceOptions
from resnext_hub.processing import ClassList
from resnext_hub.report import CONFUSION_PNG, REPORT_JSON, plotted_classes, report_contents, write_report


def two_class_logits(confidences: list[float]) -> torch.Tensor:
    """Logits whose softmax gives class 0 exactly these probabilities."""
    p = torch.tensor(confidences, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_ece_equals_the_hand_computed_value():
    # Confidences 0.9 (right), 0.9 (wrong): bin (13/15, 14/15], accuracy 0.5 -> |0.5 - 0.9| x 2 images.
    # 0.55 (right): bin (8/15, 9/15] -> 0.45; 0.62 (right): bin (9/15, 10/15] -> 0.38. ECE = (0.8 + 0.45 + 0.38) / 4.
    logits, targets = two_class_logits([0.9, 0.9, 0.62, 0.55]), torch.tensor([0, 1, 0, 0])
    sums = calibration_bins(logits, targets)
    assert sums.shape == (3, 15)
    assert sums[0].tolist() == [0] * 8 + [1, 1, 0, 0, 0, 2, 0]
    assert sums[2, 13].item() == 1 and sums[1, 13].item() == pytest.approx(1.8)
    assert expected_calibration_error(sums) == pytest.approx(1.63 / 4, abs=1e-12)
    assert expected_calibration_error(torch.zeros(3, 15)) is None


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    # (b/15, (b+1)/15]: 1.0 is in the last bin, 2/3 (= 10/15) in bin 9.
    sums = calibration_bins(two_class_logits([1.0 - 1e-15, 2 / 3]), torch.tensor([0, 0]))
    assert sums[0, 14].item() == 1 and sums[0, 9].item() == 1


def overconfident(n: int = 400, classes: int = 10, scale: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, classes, (n,), generator=generator)
    logits = torch.randn(n, classes, generator=generator) + 1.5 * torch.nn.functional.one_hot(targets, classes)
    return scale * logits, targets


def test_the_fitted_temperature_lowers_the_nll_to_its_minimum():
    logits, targets = overconfident()
    temperature = fit_temperature(logits, targets)
    assert temperature > 1  # the logits were scaled up 4x: overconfident
    before, after = mean_nll(logits, targets), mean_nll(logits, targets, temperature)
    assert after < before - 0.1
    for nearby in (temperature * 1.01, temperature / 1.01):
        assert after < mean_nll(logits, targets, nearby)
    assert mean_nll(logits, targets) == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    # Underconfident logits get a temperature below 1; the fit does not depend on the logits' scale.
    assert fit_temperature(logits / 16, targets) == pytest.approx(temperature / 16, rel=1e-6)


def test_a_set_the_model_gets_all_right_takes_the_lowest_temperature_bound():
    logits, targets = two_class_logits([0.9, 0.8]), torch.tensor([0, 0])
    assert fit_temperature(logits, targets) == 0.01
    with pytest.raises(ValueError, match="at least one image"):
        fit_temperature(logits[:0], targets[:0])


def test_the_meter_counts_the_same_in_any_batches_and_order():
    logits, targets = overconfident(n=60, classes=5)
    whole = ReportMeter(5)
    whole.update(logits, targets, list(range(60)))
    pieces = ReportMeter(5)
    for start in (40, 0, 20):  # out of order, as ranks deliver them
        pieces.update(logits[start : start + 20], targets[start : start + 20], list(range(start, start + 20)))
    a, b = whole.merged(), pieces.merged()
    assert torch.equal(a.confusion, b.confusion) and a.confusion.sum() == 60
    expected = torch.zeros(5, 5, dtype=torch.long)
    for t, p in zip(targets.tolist(), logits.argmax(1).tolist()):
        expected[t, p] += 1
    assert torch.equal(a.confusion, expected)
    assert a.calibration == b.calibration
    assert a.calibration.ece == pytest.approx(expected_calibration_error(calibration_bins(logits, targets)))
    assert a.calibration.ece_scaled < a.calibration.ece and a.calibration.nll_scaled < a.calibration.nll


@pytest.mark.slow  # two model loads and forward passes: ~11 s on 2 cores
def test_the_report_of_an_evaluation_matches_classify_records(finetuned, tmp_path, capsys):
    val, model = finetuned["data"] / "val", ["--model", finetuned["architecture"]]
    common = [*model, "--checkpoint", str(finetuned["checkpoint"]), "--precision", "fp32", "--batch-size", "5"]
    out = tmp_path / "report"
    assert main(["evaluate", str(val), *common, "--workers", "0", "--report", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "report" not in summary and f"report: {out / REPORT_JSON}, {out / CONFUSION_PNG}" in captured.err
    assert main(["classify", str(val), *common, "--format", "json", "--top-k", "3"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    classes = finetuned["classes"]
    expected = [[0] * len(classes) for _ in classes]
    for record in records:
        truth, predicted = Path(record["input"]).parent.name, record["predictions"][0]["label"]
        expected[classes.index(truth)][classes.index(predicted)] += 1

    report = json.loads((out / REPORT_JSON).read_text())
    table = report["confusion_matrix"]
    assert table["labels"] == [classes[i] for i in table["classes"]]
    full = [[0] * len(classes) for _ in classes]
    for r, row in zip(table["classes"], table["counts"]):
        for c, count in zip(table["classes"], row):
            full[r][c] = count
    assert full == expected
    assert [(c["class"], c["images"], c["correct_top1"]) for c in report["per_class"]] == [
        (name, sum(row), row[i]) for i, (name, row) in enumerate(zip(classes, expected)) if sum(row)
    ]
    assert report["top1"] == summary["top1"] and report["top5"] == summary["top5"] == 100.0
    assert sum(c["correct_top1"] for c in report["per_class"]) == summary["correct_top1"]
    calibration = report["calibration"]
    assert calibration["bins"] == 15 and len(calibration["reliability"]) == 15
    assert calibration["nll"] == pytest.approx(summary["loss"], rel=1e-5)
    assert calibration["nll_after_temperature"] <= calibration["nll"] and calibration["temperature"] > 0
    assert sum(b["images"] for b in calibration["reliability"]) == 12
    with Image.open(out / CONFUSION_PNG) as picture:
        assert picture.format == "PNG" and min(picture.size) >= 400


def test_an_unwritable_report_folder_fails_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "cat" / "a.png")
    args = ["evaluate", str(tmp_path / "val"), "--model", "seresnext26d_32x4d"]
    assert main([*args, "--checkpoint", "/nonexistent.pth", "--report", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report") and "is a file, not a folder" in err and "nonexistent" not in err


def small_report(classes: int = 3, images: int = 30) -> dict:
    logits, targets = overconfident(n=images, classes=classes, scale=1.0)
    meter = ReportMeter(classes)
    meter.update(logits, targets, list(range(images)))
    names = ClassList(tuple(f"class {i}" for i in range(classes)))
    summary = {"model": "m", "images": images, "evaluated": images, "failed": 0, "top1": 50.0, "top5": 100.0}
    return report_contents(summary, meter.merged(), names)


def test_report_files_are_written_whole_or_not_at_all(tmp_path, umask_022):
    report = small_report()
    folder = tmp_path / "new" / "report"
    assert write_report(report, folder) == [folder / REPORT_JSON, folder / CONFUSION_PNG]
    assert json.loads((folder / REPORT_JSON).read_text()) == json.loads(json.dumps(report))
    assert stat.S_IMODE(os.stat(folder / REPORT_JSON).st_mode) == 0o644  # a plain open()'s, not mkstemp's 0600
    # A picture that cannot take its place leaves the old one, and no staging file behind.
    (folder / CONFUSION_PNG).unlink()
    (folder / CONFUSION_PNG).mkdir()
    (folder / CONFUSION_PNG / "keep").write_text("old")
    with pytest.raises(OSError):
        write_report(small_report(images=12), folder)
    assert (folder / CONFUSION_PNG / "keep").read_text() == "old"
    assert sorted(p.name for p in folder.iterdir()) == [CONFUSION_PNG, REPORT_JSON]
    assert json.loads((folder / REPORT_JSON).read_text())["evaluated"] == 12  # written before the picture


def test_a_large_matrix_is_drawn_for_its_most_confused_classes(tmp_path):
    confusion = torch.eye(80, dtype=torch.long) * 5
    confusion[3, 70] = confusion[70, 3] = confusion[10, 11] = 2
    picked = plotted_classes(confusion, limit=4)
    assert picked == [3, 10, 11, 70]
    assert plotted_classes(confusion[:4, :4]) == [0, 1, 2, 3]
    confusion = torch.eye(60, dtype=torch.long) * 2
    confusion[5, 6] = 1
    names = ClassList(tuple(f"class {i}" for i in range(60)))
    summary = {"model": "m", "images": 121, "evaluated": 121, "failed": 0, "top1": 99.2, "top5": 100.0}
    report = report_contents(summary, ReportCounts(confusion, None), names)
    assert len(report["confusion_matrix"]["classes"]) == 60 and report["calibration"] is None
    assert report["per_class"][5] == {"index": 5, "class": "class 5", "images": 3, "correct_top1": 2, "top1": 200 / 3}
    with Image.open(write_report(report, tmp_path)[1]) as picture:
        assert picture.format == "PNG" and max(picture.size) < 2500  # 50 classes drawn


@pytest.mark.slow  # two evaluations of 12 images
def test_a_flat_folder_with_a_ground_truth_file_scores_as_its_class_folders(finetuned, tmp_path):
    val, flat = finetuned["data"] / "val", tmp_path / "flat"
    flat.mkdir()
    labels = []
    for number, path in enumerate(sorted(val.glob("*/*"), key=lambda p: p.name)):
        shutil.copy(path, flat / f"val_{number:08d}{path.suffix}")
        labels.append(path.parent.name)
    (tmp_path / "ground_truth.txt").write_text("\n".join(labels) + "\n")
    model = build_model(finetuned["architecture"], pretrained_from_file=finetuned["checkpoint"])
    options = InferenceOptions(device="cpu", precision="fp32", workers=0, batch_size=12)
    by_folders = evaluate(model, val, options, report=True)
    by_file = evaluate(model, flat, options, ground_truth=tmp_path / "ground_truth.txt", report=True)
    assert by_file["ground_truth"] == str(tmp_path / "ground_truth.txt") and by_file["evaluated"] == 12
    for key in ("correct_top1", "correct_top5"):
        assert by_file[key] == by_folders[key]
    assert by_file["report"]["confusion_matrix"] == by_folders["report"]["confusion_matrix"]
    assert by_file["report"]["per_class"] == by_folders["report"]["per_class"]
